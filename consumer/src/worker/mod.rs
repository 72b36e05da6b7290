//! The consumer worker: poll a batch, join, dedup, deliver, dead-letter, then store offsets.
//!
//! A batch is the unit of work and of durability. Its offsets are stored (for the periodic
//! auto-commit) only after every effect of every message in it is durable: join state written,
//! each merged view acknowledged by Analytics or its DLQ record acknowledged by Kafka. A crash
//! anywhere before that redelivers the batch, and the store's claim/confirm protocol turns the
//! redelivery into either a re-send under the same key or a no-op.
//!
//! One file per job: `rebalance` (the librdkafka context), `client` (its settings), `flow`
//! (cutting batches, pausing, keeping the membership alive), `batch` (one batch's effects),
//! `redis_retry` (outages), `rebuild` (store-epoch checks and replays), `offsets`.

mod batch;
mod client;
mod flow;
mod offsets;
mod rebalance;
mod rebuild;
mod redis_retry;

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use pipeline_core::metrics::{metrics, Readiness};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::delivery::{Abandoned, AnalyticsClient};
use crate::dlq::DlqWriter;
use crate::join::JoinSpec;
use crate::known_state::KnownState;
use crate::liveness::{self, PollWatch};
use crate::pairing::PairingBuffer;
use crate::recovery::Rebuilds;
use crate::store::JoinStore;

use rebalance::Voided;
pub use rebalance::WorkerContext;

/// Why a batch stopped before its effects were durable.
#[derive(Debug)]
enum Interrupt {
    /// Shutting down: the batch will be redelivered.
    ShuttingDown,
    /// Redis lost the join state (its epoch changed): rebuild it from the topics.
    StateLost,
}

impl From<Abandoned> for Interrupt {
    fn from(_: Abandoned) -> Self {
        Interrupt::ShuttingDown
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
        let spec = JoinSpec::from_plan(&config.join_plan()?);
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
        let dlq = DlqWriter::new(&config.kafka, &config.topics.dlq_topic, "consumer")?;
        let cc = client::client_config(&config);
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
        metrics().init_consumer(&spec.topics());
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
                metrics().batch_took(started.elapsed().as_secs_f64());
            }
            Err(Interrupt::ShuttingDown) => {
                tracing::info!(
                    messages = batch.len(),
                    "in-flight batch abandoned at shutdown; it will be redelivered"
                );
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
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

    fn epoch(&self) -> String {
        self.epoch.lock().map(|e| e.clone()).unwrap_or_default()
    }
}
