//! The consumer worker: poll a batch, join, dedup, deliver, dead-letter, then store offsets.
//!
//! A batch is the unit of work and of durability. Its offsets are stored (for the periodic
//! auto-commit) only after every effect of every message in it is durable: join state written,
//! each merged view acknowledged by Analytics or its DLQ record acknowledged by Kafka (I4). A
//! crash anywhere before that redelivers the batch, and the store's claim/confirm protocol
//! turns the redelivery into either a re-send under the same key or a no-op (I2).
//!
//! One partition is consumed by one worker in order, and the `range` assignor gives a worker the
//! same partition numbers of both co-partitioned topics, so both sides of an id meet in one place.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use pipeline_core::dlq::{Failure, Stage};
use pipeline_core::failpoint;
use pipeline_core::metrics::{metrics, Readiness};
use pipeline_core::retry::RetryPolicy;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{ConsumerConfig, GroupProtocol};
use crate::delivery::{Abandoned, AnalyticsClient, Outcome as Delivery};
use crate::dlq::{DlqItem, DlqWriter};
use crate::join::{Emission, Input, JoinBatch, JoinSpec, JoinState};
use crate::known_state::{KnownState, MAX_SIDES};
use crate::liveness::{self, PollWatch};
use crate::message::decode;
use crate::pairing::PairingBuffer;
use crate::recovery::{self, Committed, Rebuilds};
use crate::store::{Claim, Commit, Fence, JoinStore, Outcome};

/// Logs rebalances and commit failures, and counts rebalances (which invalidate what the
/// worker knows of its ids' state).
#[derive(Default)]
pub struct WorkerContext {
    rebalances: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Partitions whose buffered messages are void (see `Worker::voided`).
    voided: Voided,
    /// The topic-partitions this member holds: lag is exported for these only.
    assigned: std::sync::Mutex<HashSet<(String, i32)>>,
}

impl WorkerContext {
    /// Drops the lag series of partitions this member no longer holds: their new owner
    /// reports them, and a last value kept here would never return to 0.
    fn forget_lag(&self, revoked: &TopicPartitionList) {
        let Ok(mut assigned) = self.assigned.lock() else {
            return;
        };
        for e in revoked.elements() {
            assigned.remove(&(e.topic().to_owned(), e.partition()));
            let _ = metrics()
                .consumer_lag
                .remove_label_values(&[e.topic(), &e.partition().to_string()]);
        }
    }
}

/// Partitions revoked or sought back since the worker last looked: their messages waiting in
/// the pairing buffer will be fetched again (by their next owner, or from the new position), so
/// they must be dropped, never processed. Shared by the context (revocations) and the worker
/// (seeks).
#[derive(Default, Clone)]
struct Voided(std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>>);

impl Voided {
    fn add(&self, partitions: &TopicPartitionList) {
        if let Ok(mut v) = self.0.lock() {
            v.extend(
                partitions
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition())),
            );
        }
    }

    /// Drops the buffered messages of the partitions voided since the last call.
    fn drop_from<M: Message>(&self, pending: &mut PairingBuffer<M>) {
        let voided = self
            .0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        pending.drop_partitions(&voided);
    }
}

impl ClientContext for WorkerContext {
    /// librdkafka statistics (every `statistics.interval.ms`): lag per assigned partition.
    fn stats(&self, stats: rdkafka::Statistics) {
        let Ok(assigned) = self.assigned.lock() else {
            return;
        };
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if !assigned.contains(&(topic.clone(), *partition)) {
                    continue;
                }
                // Negative lag means unknown: nothing stored since the assignment, then the
                // committed offset tells.
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else {
                    p.consumer_lag
                };
                if lag < 0 {
                    continue;
                }
                metrics()
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(lag);
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                self.voided.add(tpl);
                self.forget_lag(tpl);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                if let Ok(mut assigned) = self.assigned.lock() {
                    assigned.extend(
                        tpl.elements()
                            .iter()
                            .map(|e| (e.topic().to_owned(), e.partition())),
                    );
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    /// A partition paused while a batch was held up (see `keep_polling`) stays paused through
    /// a rebalance in librdkafka, even when it is revoked and assigned again: if that batch
    /// completed mid-rebalance, its resume missed it and the partition would never be fetched
    /// again. So every assignment starts resumed; a batch still held up pauses what arrives.
    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "resuming assigned partitions failed");
                }
            }
            Rebalance::Revoke(_) | Rebalance::Error(_) => {}
        }
        // The whole assignment, not the callback's list: under KIP-848 callbacks are
        // incremental and name only what was added or taken away.
        let held = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        metrics().assigned_partitions.set(held as i64);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; it is retried with the next commit")
            }
        }
    }
}

/// Why a batch stopped before its effects were durable.
#[derive(Debug)]
enum Interrupt {
    /// Shutting down: the batch will be redelivered.
    Abandoned,
    /// Redis lost the join state (its epoch changed): rebuild it from the topics.
    StateLost,
}

impl From<Abandoned> for Interrupt {
    fn from(_: Abandoned) -> Self {
        Interrupt::Abandoned
    }
}

/// One consumer-group member and its clients.
pub struct Worker {
    /// The store epoch this worker's state was built under.
    epoch: std::sync::Mutex<String>,
    /// Messages received while partitions were paused, first in the next batch.
    carry: std::sync::Mutex<Vec<OwnedMessage>>,
    consumer: StreamConsumer<WorkerContext>,
    store: JoinStore,
    analytics: AnalyticsClient,
    dlq: DlqWriter,
    config: ConsumerConfig,
    /// What this worker knows of its ids' join state (skips Redis reads; see `known_state`).
    known: std::sync::Mutex<KnownState>,
    /// Partition → the fence holder id this worker wrote for it (see `store::Fence`).
    fences: std::sync::Mutex<HashMap<i32, String>>,
    /// Rebalances counted by the context, and the count `known` was built under.
    rebalances: std::sync::Arc<std::sync::atomic::AtomicU64>,
    known_generation: std::sync::atomic::AtomicU64,
    /// Partitions revoked (by the context) or sought back (by the worker) whose buffered
    /// messages must be dropped before the next batch is cut.
    voided: Voided,
    /// The join this worker runs (sides, topics, record shapes).
    spec: std::sync::Arc<JoinSpec>,
    ready: Readiness,
    /// When the worker last polled Kafka (see `liveness`).
    poll_watch: std::sync::Arc<PollWatch>,
    /// Which partitions' committed progress was checked against the store epoch, and which are
    /// being rebuilt (see `recovery`).
    rebuilds: std::sync::Mutex<Rebuilds>,
    /// (partition, side) paused because that side's fetch ran ahead of the other's (see
    /// `pairing`). A hint: a rebalance or an outage resumes every partition, and an entry that
    /// outlived that is removed the next time its queue is short.
    ahead: std::sync::Mutex<HashSet<(i32, usize)>>,
}

impl Worker {
    /// Connects to Redis and Kafka and joins the group.
    pub async fn new(config: ConsumerConfig, ready: Readiness) -> anyhow::Result<Self> {
        config.validate()?;
        let spec = JoinSpec::from_pipeline(&*config.pipeline()?);
        ready.set("redis", false);
        ready.set("kafka", false);
        let store = JoinStore::connect(
            config.redis_url.expose(),
            &config.redis_key_prefix,
            config.claim_ttl_ms,
            config.dedup_ttl_s,
        )
        .await?;
        let epoch = std::sync::Mutex::new(store.epoch().await?);
        ready.set("redis", true);
        let analytics = AnalyticsClient::new(
            &config.analytics_url,
            config.analytics_token.clone(),
            Duration::from_millis(config.http_timeout_ms),
            config.delivery_retry(),
            config.batch_size,
            ready.clone(),
        )?;
        ready.set("analytics", true);
        let dlq = DlqWriter::new(&config.kafka, &config.topics.dlq_topic)?;
        let mut cc = config.kafka.client_config();
        cc.set("group.id", &config.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            // Bounded prefetch (librdkafka defaults to 64 MB queued + 50 MB fetches): a worker
            // takes a batch at a time, and memory is a target (README "Performance"). At 500k
            // records 4-8 MB queued ran as fast as 16 MB did, with 40 MB less peak RSS.
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.max.bytes", "4194304")
            // Small runs per partition (librdkafka's default is 1 MB, about 7,000 compressed
            // records): a fetch then brings every partition of both topics, so the two sides of
            // an id reach the pairing buffer close together. Kafka still returns a record batch
            // larger than this whole.
            .set("max.partition.fetch.bytes", "16384");
        // Range assignment in both protocols: it gives one member the same partition number of
        // every side topic, which the join needs (co-partitioning).
        match config.group_protocol {
            GroupProtocol::Classic => cc
                .set("partition.assignment.strategy", "range")
                .set("session.timeout.ms", config.session_timeout_ms.to_string())
                .set(
                    "heartbeat.interval.ms",
                    (config.session_timeout_ms / 4).max(100).to_string(),
                ),
            // The broker owns session and heartbeat timing here; librdkafka refuses both.
            GroupProtocol::Consumer => cc
                .set("group.protocol", "consumer")
                .set("group.remote.assignor", "range"),
        };
        for (k, v) in config.kafka.all_props() {
            cc.set(k, v);
        }
        let context = WorkerContext::default();
        let rebalances = context.rebalances.clone();
        let voided = context.voided.clone();
        let consumer: StreamConsumer<WorkerContext> = cc
            .create_with_context(context)
            .map_err(|e| anyhow::anyhow!("creating the Kafka consumer: {e}"))?;
        consumer
            .subscribe(&spec.topics())
            .map_err(|e| anyhow::anyhow!("subscribing: {e}"))?;
        ready.set("kafka", true);
        for topic in spec.topics() {
            metrics().messages_consumed.with_label_values(&[topic]);
        }
        metrics()
            .dlq_write_failures
            .with_label_values(&["consumer"]);
        Ok(Self {
            epoch,
            carry: std::sync::Mutex::default(),
            consumer,
            store,
            analytics,
            dlq,
            config,
            known: std::sync::Mutex::default(),
            fences: std::sync::Mutex::default(),
            rebalances,
            known_generation: std::sync::atomic::AtomicU64::new(0),
            voided,
            spec,
            ready,
            rebuilds: std::sync::Mutex::default(),
            poll_watch: std::sync::Arc::default(),
            ahead: std::sync::Mutex::default(),
        })
    }

    /// Consumes until `shutdown`, then commits stored offsets and leaves the group.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let watch = tokio::spawn(liveness::watch(
            self.poll_watch.clone(),
            Duration::from_millis(self.config.poll_stall_ms),
            self.ready.clone(),
            shutdown.child_token(),
        ));
        let mut pending = PairingBuffer::new(self.spec.sides.len());
        loop {
            let carried = self
                .carry
                .lock()
                .map(|mut c| std::mem::take(&mut *c))
                .unwrap_or_default();
            let flow = if carried.is_empty() {
                let batch = self.next_batch(&mut pending, &shutdown).await;
                self.handle(batch, &shutdown).await
            } else {
                self.handle(carried, &shutdown).await
            };
            if flow.is_break() || shutdown.is_cancelled() {
                break;
            }
        }
        self.commit_rebuilds(CommitMode::Sync);
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final offset commit failed"),
        }
        watch.abort();
        tracing::info!("consumer worker stopped");
        Ok(())
    }

    /// Processes one batch and stores its offsets; `Break` when the worker must stop (shutdown).
    /// Messages come as received (borrowed from the consumer: copying each one's key, value and
    /// five headers was a measurable part of a worker's CPU) or carried over from a held-up batch.
    async fn handle<M: Message + Sync>(
        &self,
        batch: Vec<M>,
        shutdown: &CancellationToken,
    ) -> ControlFlow<()> {
        self.forget_if_rebalanced();
        // Before anything else, even without a batch (see `recovery`).
        let Ok(batch) = self
            .keep_polling(self.check_partitions(batch, shutdown))
            .await
        else {
            return ControlFlow::Break(());
        };
        if batch.is_empty() {
            return ControlFlow::Continue(());
        }
        let started = Instant::now();
        match self.keep_polling(self.process(&batch, shutdown)).await {
            Err(Interrupt::StateLost) => {
                if self.keep_polling(self.rewind(shutdown)).await.is_err() {
                    return ControlFlow::Break(());
                }
            }
            Ok(()) => {
                self.store_offsets(&batch);
                metrics()
                    .batch_duration
                    .with_label_values(&[] as &[&str])
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(Interrupt::Abandoned) => {
                tracing::info!(
                    messages = batch.len(),
                    "in-flight batch abandoned at shutdown; it will be redelivered"
                );
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// Cuts the next batch (at most `batch_max_messages`, give or take one partition's run) from
    /// the pairing buffer (see `pairing`). It receives until the buffer holds twice
    /// `batch_max_messages`, then releases what the partitions' sides hold in step. When that is
    /// under half a batch, it receives on, up to eight batches' worth: past that one side is far
    /// behind, and whole partitions are released rather than stall. When `batch_linger_ms`
    /// passes first, nothing more is arriving to pair with, and whole partitions are released.
    async fn next_batch<'a>(
        &'a self,
        pending: &mut PairingBuffer<BorrowedMessage<'a>>,
        shutdown: &CancellationToken,
    ) -> Vec<BorrowedMessage<'a>> {
        // A paused side whose buffered messages were just dropped (revoked, sought back) is
        // resumed before waiting: with nothing else arriving, no batch would be cut to resume it.
        self.voided.drop_from(pending);
        self.resume_caught_up(pending);
        let batch = self.cut_batch(pending, shutdown).await;
        self.resume_caught_up(pending);
        batch
    }

    /// `next_batch` without the pausing bookkeeping around it; `pending` holds nothing void.
    async fn cut_batch<'a>(
        &'a self,
        pending: &mut PairingBuffer<BorrowedMessage<'a>>,
        shutdown: &CancellationToken,
    ) -> Vec<BorrowedMessage<'a>> {
        if pending.is_empty() {
            // Wakes up idle every second: partitions assigned meanwhile are checked (and rebuilt
            // if need be) without waiting for a message.
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Vec::new(),
                _ = tokio::time::sleep(IDLE_CHECK) => return Vec::new(),
                m = self.recv() => m,
            };
            match first {
                Ok(m) => self.buffer(pending, m),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Vec::new();
                }
            }
        }
        let max = self.config.batch_max_messages.max(1);
        let fill = max.saturating_mul(2);
        let cap = max.saturating_mul(8);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.batch_linger_ms);
        let mut target = fill;
        loop {
            while pending.len() < target {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return pending.take_any(max),
                    m = self.recv() => match m {
                        Ok(m) => self.buffer(pending, m),
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error");
                            return pending.take_any(max);
                        }
                    },
                }
            }
            if pending.paired_len() >= max / 2 {
                return pending.take_paired(max);
            }
            if pending.len() >= cap {
                return pending.take_any(max);
            }
            target = cap;
        }
    }

    /// Adds a received message to the pairing buffer, after dropping what a rebalance during
    /// the receive made void. When its side now runs ahead of the partition's other side, its
    /// topic-partition is paused: librdkafka drops what it prefetched of it and, on resume,
    /// fetches on from the last message received, so nothing is skipped or received twice.
    fn buffer<'a>(&self, pending: &mut PairingBuffer<BorrowedMessage<'a>>, m: BorrowedMessage<'a>) {
        self.voided.drop_from(pending);
        let side = self.spec.side_of(m.topic());
        let partition = m.partition();
        pending.push(m, side);
        let Some(side) = side else { return };
        if !pending.runs_ahead(partition, side, self.ahead_limit()) {
            return;
        }
        let Ok(mut ahead) = self.ahead.lock() else {
            return;
        };
        if ahead.insert((partition, side)) {
            metrics().sides_paused.inc();
            if let Err(e) = self.consumer.pause(&self.side_partition(partition, side)) {
                tracing::debug!(partition, side, error = %e, "pausing a side that runs ahead failed");
            }
        }
    }

    /// Resumes the sides paused by `buffer` whose queue has drained to under half the limit.
    fn resume_caught_up<M: Message>(&self, pending: &PairingBuffer<M>) {
        let low = self.ahead_limit() / 2;
        let Ok(mut ahead) = self.ahead.lock() else {
            return;
        };
        ahead.retain(|&(partition, side)| {
            if pending.queue_len(partition, side) >= low {
                return true;
            }
            // Fails for a partition revoked meanwhile: nothing to resume then.
            if let Err(e) = self.consumer.resume(&self.side_partition(partition, side)) {
                tracing::debug!(partition, side, error = %e, "resuming a paused side failed");
            }
            false
        });
    }

    /// Receives the next message; the watch knows the worker waits in a poll meanwhile (until
    /// the message arrives or the caller gives up on it).
    async fn recv(&self) -> KafkaResult<BorrowedMessage<'_>> {
        let _polling = Polling::enter(&self.poll_watch);
        self.consumer.recv().await
    }

    /// Messages one side of a partition may buffer ahead of the other's: half a batch.
    fn ahead_limit(&self) -> usize {
        (self.config.batch_max_messages / 2).max(1)
    }

    fn side_partition(&self, partition: i32, side: usize) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        if let Some(s) = self.spec.sides.get(side) {
            tpl.add_partition(&s.topic, partition);
        }
        tpl
    }

    /// Seeks `partitions` back to their beginning (their progress cannot be trusted), and voids
    /// what the pairing buffer holds of them: those messages come again.
    fn replay_from_beginning(&self, partitions: &TopicPartitionList) {
        self.voided.add(partitions);
        for p in partitions.elements() {
            tracing::info!(
                topic = p.topic(),
                partition = p.partition(),
                "replaying the partition from its beginning"
            );
            if let Err(e) = self.consumer.seek(
                p.topic(),
                p.partition(),
                Offset::Beginning,
                Duration::from_secs(10),
            ) {
                tracing::warn!(topic = p.topic(), partition = p.partition(), error = %e, "seek to the beginning failed");
            }
        }
    }

    /// Runs `work` (a batch, or the checks before one) while keeping the group membership
    /// alive. Work that takes more than a second is waiting out an outage (Analytics, Redis, the
    /// DLQ): every assigned partition is then paused and the consumer keeps polling, so the
    /// member neither fetches more (memory stays bounded) nor exceeds `max.poll.interval.ms` and gets evicted. A message that still
    /// arrives (a partition assigned meanwhile) is kept for the next batch and its partition
    /// paused; all are resumed when the batch completes.
    async fn keep_polling<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        let pause_at = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(pause_at);
        let mut paused = false;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = &mut pause_at, if !paused => {
                    paused = true;
                    if let Ok(assignment) = self.consumer.assignment() {
                        if let Err(e) = self.consumer.pause(&assignment) {
                            tracing::warn!(error = %e, "pausing partitions failed");
                        }
                    }
                    tracing::info!("batch held up: partitions paused while it completes");
                }
                m = self.recv(), if paused => match m {
                    Ok(m) => {
                        let m = m.detach();
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition(m.topic(), m.partition());
                        let _ = self.consumer.pause(&tpl);
                        if let Ok(mut c) = self.carry.lock() {
                            c.push(m);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "consumer error while paused"),
                },
            }
        };
        if paused {
            if let Ok(assignment) = self.consumer.assignment() {
                if let Err(e) = self.consumer.resume(&assignment) {
                    tracing::warn!(error = %e, "resuming partitions failed");
                }
            }
            if let Ok(mut ahead) = self.ahead.lock() {
                ahead.clear();
            }
            tracing::info!("partitions resumed");
        }
        result
    }

    /// Makes every effect of `batch` durable. Outages are retried here; only shutdown ends it early.
    async fn process<M: Message + Sync>(
        &self,
        batch: &[M],
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        let mut dead = Vec::new();
        let mut slots = Vec::with_capacity(batch.len());
        for msg in batch {
            let Some(side) = self.spec.side_of(msg.topic()) else {
                continue;
            };
            slots.push(match unparsed(msg, side, self.config.max_record_bytes) {
                Some(slot) => slot,
                None => Slot::Decoded(self.decode(msg, side, &mut dead)),
            });
        }
        let Joined {
            emissions,
            claims,
            side_hashes,
        } = self.join_and_claim(slots, &mut dead, shutdown).await?;
        let mut to_deliver: Vec<&Emission> = Vec::new();
        let mut finished: Vec<&Emission> = Vec::new();
        let mut busy: Vec<&Emission> = Vec::new();
        for (e, c) in emissions.iter().zip(&claims) {
            match c {
                Claim::Claimed => to_deliver.push(e),
                Claim::Finished => finished.push(e),
                Claim::Busy => busy.push(e),
            }
        }
        // Views claimed by another worker (a rebalance moved the partition): wait until that claim
        // is confirmed or expires, then deliver or skip.
        let mut round = 0;
        while !busy.is_empty() {
            let delay = RetryPolicy::default().backoff(round.min(6), None);
            round += 1;
            tokio::select! {
                _ = shutdown.cancelled() => { self.release(&to_deliver).await; return Err(Interrupt::Abandoned) }
                _ = tokio::time::sleep(delay) => {}
            }
            let keys: Vec<&str> = busy.iter().map(|e| e.key.as_str()).collect();
            let Ok(Commit::Done(again)) = self.store.commit(&[], &[], &keys).await else {
                continue;
            };
            let mut still = Vec::new();
            for (e, c) in busy.into_iter().zip(again) {
                match c {
                    Claim::Claimed => to_deliver.push(e),
                    Claim::Finished => finished.push(e),
                    Claim::Busy => still.push(e),
                }
            }
            busy = still;
        }
        metrics().duplicates_skipped.inc_by(finished.len() as u64);

        if !to_deliver.is_empty() {
            failpoint::hit("after_claim");
        }
        let outcomes = match self.analytics.deliver_all(&to_deliver, shutdown).await {
            Ok(o) => o,
            Err(Abandoned) => {
                self.release(&to_deliver).await;
                return Err(Interrupt::Abandoned);
            }
        };
        if !to_deliver.is_empty() {
            failpoint::hit("after_post");
        }
        let mut confirmations: Vec<(&str, &str, Outcome)> =
            Vec::with_capacity(to_deliver.len() + finished.len());
        for (e, outcome) in to_deliver.iter().zip(&outcomes) {
            match outcome {
                Delivery::Delivered => confirmations.push((&e.id, &e.key, Outcome::Delivered)),
                Delivery::Failed { reason, .. } => {
                    tracing::warn!(id = %e.id, key = %e.key, %reason, "merged record sent to the DLQ");
                    dead.push(deliver_failure(e, outcome));
                    confirmations.push((&e.id, &e.key, Outcome::DeadLettered));
                }
            }
        }
        for e in &finished {
            confirmations.push((&e.id, &e.key, Outcome::AlreadyFinished));
        }
        self.dlq.write_all(&dead, shutdown).await?;
        self.retry_redis(shutdown, "confirm", || self.store.confirm(&confirmations))
            .await?;
        // Every id the batch touched now has its state written and its view confirmed.
        if let Ok(mut known) = self.known.lock() {
            for (id, hashes) in &side_hashes {
                known.record(id, hashes.iter().map(Option::as_deref));
            }
        }
        Ok(())
    }

    /// Drops what the worker knows if the group rebalanced since it was learnt.
    fn forget_if_rebalanced(&self) {
        use std::sync::atomic::Ordering;
        let now = self.rebalances.load(Ordering::SeqCst);
        if self.known_generation.swap(now, Ordering::SeqCst) != now {
            self.forget_all();
            if let Ok(mut r) = self.rebuilds.lock() {
                r.reset();
            }
        }
    }

    /// Drops what the worker knows of its ids and its fences (rebalance, Redis data loss, a
    /// lost fence): both are taken again before the next read.
    fn forget_all(&self) {
        if let Ok(mut known) = self.known.lock() {
            known.clear();
        }
        if let Ok(mut fences) = self.fences.lock() {
            fences.clear();
        }
    }

    /// Decodes one message, or queues its DLQ item.
    fn decode<M: Message>(&self, msg: &M, side: usize, dead: &mut Vec<DlqItem>) -> Option<Input> {
        let shape = &self.spec.sides[side].shape;
        match decode(msg, side, shape, self.config.max_record_bytes) {
            Ok(i) => Some(i),
            Err(item) => {
                tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), reason = %item.failure.reason, "invalid message sent to the DLQ");
                dead.push(*item);
                None
            }
        }
    }

    /// Loads state, joins and commits with claims; retries lost fences and Redis outages.
    ///
    /// A message whose bytes hash to the side content this worker knows for its id (see
    /// `known_state`) is unchanged (a re-poll, a redelivery) and is dropped unparsed: the
    /// producer publishes canonical JSON, so a re-published record hashes the same. Everything
    /// else is decoded and validated (invalid messages join `dead`) and applied in batch order,
    /// over the states read from Redis under this worker's fences of the batch's partitions.
    async fn join_and_claim<M: Message + Sync>(
        &self,
        slots: Vec<Slot<'_, M>>,
        dead: &mut Vec<DlqItem>,
        shutdown: &CancellationToken,
    ) -> Result<Joined, Interrupt> {
        let cacheable = self.spec.sides.len() <= MAX_SIDES;
        let skip: Vec<bool> = {
            let known = self.known.lock().map_err(|_| Interrupt::Abandoned)?;
            slots
                .iter()
                .map(|slot| match slot {
                    // Hash the bytes only for ids whose state is known: unseen ids (the
                    // first cycle) are decoded anyway.
                    Slot::Unparsed { msg, id, side } => {
                        cacheable
                            && known.knows(id)
                            && known.is_unchanged(
                                id,
                                *side,
                                &pipeline_core::canonical::sha256_hex(
                                    msg.payload().unwrap_or_default(),
                                ),
                            )
                    }
                    Slot::Decoded(_) => false,
                })
                .collect()
        };
        let inputs: Vec<Input> = slots
            .into_iter()
            .zip(skip)
            .filter_map(|(slot, skip)| match slot {
                Slot::Decoded(i) => i,
                Slot::Unparsed { .. } if skip => None,
                Slot::Unparsed { msg, side, .. } => self.decode(msg, side, dead),
            })
            .collect();
        let mut seen = HashSet::new();
        let ids: Vec<&str> = inputs
            .iter()
            .map(|i| i.id.as_str())
            .filter(|id| seen.insert(*id))
            .collect();
        let partitions: Vec<i32> = inputs
            .iter()
            .map(|i| i.origin.partition)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        loop {
            // Fences first: the states read after them are the latest until they are lost.
            let fences = self.fences(&partitions, shutdown).await?;
            let (states, epoch) = self.load(&ids, shutdown).await?;
            if epoch.as_deref() != Some(self.epoch().as_str()) {
                return Err(Interrupt::StateLost);
            }
            let mut join = JoinBatch::new(self.spec.clone(), states);
            for i in &inputs {
                join.apply(i);
            }
            let side_hashes = join.side_hashes();
            let (writes, emissions) = join.finish();
            let keys: Vec<&str> = emissions.iter().map(|e| e.key.as_str()).collect();
            match self
                .retry_redis(shutdown, "commit", || {
                    self.store.commit(&fences, &writes, &keys)
                })
                .await?
            {
                Commit::Done(claims) => {
                    metrics().records_merged.inc_by(emissions.len() as u64);
                    metrics().join_states_written.inc_by(writes.len() as u64);
                    return Ok(Joined {
                        emissions,
                        claims,
                        side_hashes,
                    });
                }
                Commit::Fenced => {
                    // Another worker took one of these partitions after this one did (a
                    // rebalance this worker has not processed yet, or a batch it still had in
                    // flight across one). Take them again and redo the batch on fresh state;
                    // the rebalance then settles who keeps them.
                    tracing::info!(
                        ?partitions,
                        "a partition's fence moved to another worker; reloading the batch"
                    );
                    self.forget_all();
                    continue;
                }
            }
        }
    }

    /// This worker's fences for `partitions`, acquiring the ones it does not hold yet.
    async fn fences(
        &self,
        partitions: &[i32],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Fence>, Interrupt> {
        let missing: Vec<i32> = {
            let held = self.fences.lock().map_err(|_| Interrupt::Abandoned)?;
            partitions
                .iter()
                .copied()
                .filter(|p| !held.contains_key(p))
                .collect()
        };
        // Only when a fence is missing: a call without I/O would still mark Redis ready.
        let acquired = if missing.is_empty() {
            Vec::new()
        } else {
            self.retry_redis(shutdown, "fences", || self.store.acquire_fences(&missing))
                .await?
        };
        let mut held = self.fences.lock().map_err(|_| Interrupt::Abandoned)?;
        held.extend(acquired.into_iter().map(|f| (f.partition, f.holder)));
        Ok(partitions
            .iter()
            .filter_map(|&partition| {
                held.get(&partition).map(|holder| Fence {
                    partition,
                    holder: holder.clone(),
                })
            })
            .collect())
    }

    async fn load(
        &self,
        ids: &[&str],
        shutdown: &CancellationToken,
    ) -> Result<(HashMap<String, JoinState>, Option<String>), Interrupt> {
        Ok(self
            .retry_redis(shutdown, "load", || self.store.load(&self.spec, ids))
            .await?)
    }

    /// Runs a Redis operation until it succeeds (pausing with backoff while Redis is down).
    async fn retry_redis<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        op: &str,
        f: F,
    ) -> Result<T, Abandoned>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let policy = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        };
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => {
                    if attempt > 0 {
                        tracing::info!(op, "Redis is back");
                    }
                    self.ready.set("redis", true);
                    return Ok(v);
                }
                Err(e) => {
                    self.ready.set("redis", false);
                    tracing::warn!(
                        op,
                        attempt,
                        error = format!("{e:#}"),
                        "Redis operation failed; consumption paused"
                    );
                    let delay = policy.backoff(attempt.min(10), None);
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(Abandoned),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Checks, before anything of them is processed, the committed progress of the partition
    /// numbers assigned since the last rebalance (see `recovery`). A number with any side
    /// committed under another store epoch is rebuilt: all its sides are sought back to their
    /// beginning, and its messages in this batch are dropped (they come again). Redis found to
    /// have lost its data meanwhile rewinds every assigned partition.
    async fn check_partitions<M: Message + Sync>(
        &self,
        batch: Vec<M>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<M>, Abandoned> {
        let assignment = self.consumer.assignment().unwrap_or_default();
        let unchecked = {
            let r = self.rebuilds.lock().map_err(|_| Abandoned)?;
            r.unchecked(assignment.elements().iter().map(|e| e.partition()))
        };
        if unchecked.is_empty() {
            return Ok(batch);
        }
        let epoch = self
            .retry_redis(shutdown, "epoch", || self.store.epoch())
            .await?;
        if epoch != self.epoch() {
            self.rewind_to(epoch);
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::new();
        for side in &self.spec.sides {
            for &p in &unchecked {
                tpl.add_partition(&side.topic, p);
            }
        }
        let stale = match self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
        {
            Ok(list) => recovery::untrusted(&Committed::from_list(&list), &epoch),
            Err(e) => {
                // Unknown progress is untrusted progress: rebuilding is always correct.
                tracing::warn!(error = %e, "reading committed offsets failed; rebuilding those partitions");
                unchecked.clone()
            }
        };
        if let Ok(mut r) = self.rebuilds.lock() {
            r.mark_checked(unchecked.iter().copied());
        }
        if stale.is_empty() {
            return Ok(batch);
        }
        tracing::info!(
            partitions = ?stale,
            "partition progress was committed under another store epoch; rebuilding every side of it"
        );
        let mut sides = TopicPartitionList::new();
        for side in &self.spec.sides {
            for &p in &stale {
                sides.add_partition(&side.topic, p);
            }
        }
        self.forget_all();
        self.rebuild(&sides);
        failpoint::hit("rebuild_started");
        Ok(batch
            .into_iter()
            .filter(|m| !stale.contains(&m.partition()))
            .collect())
    }

    fn epoch(&self) -> String {
        self.epoch.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Redis lost the join state: adopt the new epoch and replay every assigned partition from
    /// its beginning, so half-joined ids are joined again. Views already delivered come back
    /// under the same keys (the chain restarts from the same first view) and Analytics drops
    /// them as duplicates.
    async fn rewind(&self, shutdown: &CancellationToken) -> Result<(), Abandoned> {
        let epoch = self
            .retry_redis(shutdown, "epoch", || self.store.epoch())
            .await?;
        self.rewind_to(epoch);
        Ok(())
    }

    fn rewind_to(&self, epoch: String) {
        tracing::error!(%epoch, "Redis lost the join state; replaying the assigned partitions from the beginning");
        if let Ok(mut e) = self.epoch.lock() {
            *e = epoch;
        }
        if let Ok(mut c) = self.carry.lock() {
            c.clear();
        }
        self.forget_all();
        let assignment = self.consumer.assignment().unwrap_or_default();
        if let Ok(mut r) = self.rebuilds.lock() {
            r.mark_checked(assignment.elements().iter().map(|e| e.partition()));
        }
        self.rebuild(&assignment);
    }

    /// Seeks `partitions` back to their beginning to rebuild their state, and commits their
    /// progress explicitly from now on (see `recovery::Rebuilds`).
    fn rebuild(&self, partitions: &TopicPartitionList) {
        if let Ok(mut r) = self.rebuilds.lock() {
            r.start(partitions);
        }
        self.replay_from_beginning(partitions);
    }

    /// Commits the progress of the partitions being rebuilt, under the current epoch.
    fn commit_rebuilds(&self, mode: CommitMode) {
        let Ok(progress) = self.rebuilds.lock().map(|r| r.progress(&self.epoch())) else {
            return;
        };
        if progress.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&progress, mode) {
            tracing::warn!(error = %e, "committing a rebuild's progress failed; it is retried after the next batch");
        }
    }

    async fn release(&self, emissions: &[&Emission]) {
        let keys: Vec<&str> = emissions.iter().map(|e| e.key.as_str()).collect();
        if let Err(e) = self.store.release(&keys).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not release dedup claims; they expire on their own"
            );
        }
    }

    /// Stores `last offset + 1` of every partition in the batch.
    fn store_offsets<M: Message>(&self, batch: &[M]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
        for m in batch {
            let e = next.entry((m.topic(), m.partition())).or_insert(0);
            *e = (*e).max(m.offset() + 1);
            *per_topic.entry(m.topic()).or_insert(0) += 1;
        }
        for (topic, n) in per_topic {
            metrics()
                .messages_consumed
                .with_label_values(&[topic])
                .inc_by(n);
        }
        // Each offset carries the epoch its effects were written under (see `recovery`).
        let epoch = self.epoch();
        let mut tpl = TopicPartitionList::new();
        let mut rebuilding = false;
        for ((topic, partition), offset) in next {
            recovery::add_with_epoch(&mut tpl, topic, partition, offset, &epoch);
            if let Ok(mut r) = self.rebuilds.lock() {
                rebuilding |= r.stored(topic, partition, offset);
            }
        }
        match self.consumer.store_offsets(&tpl) {
            Ok(()) => {}
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
                tracing::debug!("partition revoked before its offsets were stored; the new owner replays them idempotently");
            }
            Err(e) => tracing::warn!(error = %e, "storing offsets failed"),
        }
        if rebuilding {
            self.commit_rebuilds(CommitMode::Async);
        }
    }
}

/// How long an idle worker waits for a message before it looks at its assignment again.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A wait in a poll, ended when dropped (a `select!` may drop the receive unfinished).
struct Polling<'a>(&'a PollWatch);

impl<'a> Polling<'a> {
    fn enter(watch: &'a PollWatch) -> Self {
        watch.enter();
        Self(watch)
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

fn deliver_failure(e: &Emission, outcome: &Delivery) -> DlqItem {
    let (reason, class, status, attempts, first_failure_at) = match outcome {
        Delivery::Failed {
            reason,
            class,
            status,
            attempts,
            first_failure_at,
        } => (
            reason.as_str(),
            *class,
            *status,
            *attempts,
            *first_failure_at,
        ),
        Delivery::Delivered => ("delivered", "none", None, 0, chrono::Utc::now()),
    };
    DlqItem {
        key: Some(e.id.as_bytes().to_vec()),
        value: Some(e.record.get().as_bytes().to_vec()),
        original_headers: OwnedHeaders::new(),
        failure: Failure {
            stage: Stage::Deliver,
            reason: reason.to_owned(),
            error_class: class.to_owned(),
            original_topic: e.origin.topic.clone(),
            original_partition: e.origin.partition,
            original_offset: e.origin.offset,
            attempts,
            http_status: status,
            first_failure_at,
            record_key: Some(e.key.clone()),
        },
    }
}

/// A batch joined and committed: the views it emits, their claims (in the same order), and the
/// side hashes of every id it touched (for `KnownState` once the batch is confirmed).
struct Joined {
    emissions: Vec<Emission>,
    claims: Vec<Claim>,
    side_hashes: Vec<(String, Vec<Option<String>>)>,
}

/// A message of a batch before the join: decoded, or (when it may be an unchanged re-send)
/// kept unparsed.
enum Slot<'a, M> {
    /// Decoded; None when it went to the DLQ.
    Decoded(Option<Input>),
    Unparsed {
        msg: &'a M,
        side: usize,
        /// The message key (the record's id), borrowed from the message.
        id: &'a str,
    },
}

/// The unparsed slot of a message keyed by a UTF-8 id and within the size limit; None when it
/// must be decoded right away.
fn unparsed<M: Message>(msg: &M, side: usize, max_bytes: usize) -> Option<Slot<'_, M>> {
    let id = std::str::from_utf8(msg.key()?)
        .ok()
        .filter(|k| !k.is_empty())?;
    let payload = msg.payload()?;
    if payload.len() > max_bytes {
        return None;
    }
    Some(Slot::Unparsed { msg, side, id })
}
