//! Flow control: cutting batches from the pairing buffer, pausing a side that runs ahead of the
//! other, and keeping the group membership alive (polling, partitions paused) while a batch
//! waits out an outage.

use std::time::Duration;

use pipeline_core::metrics::metrics;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;
use tokio_util::sync::CancellationToken;

use super::Worker;

use crate::liveness::PollWatch;
use crate::pairing::PairingBuffer;

impl Worker {
    /// Cuts the next batch (at most `batch_max_messages`, give or take one partition's run) from
    /// the pairing buffer (see `pairing`). It receives until the buffer holds twice
    /// `batch_max_messages`, then releases what the partitions' sides hold in step. When that is
    /// under half a batch, it receives on, up to eight batches' worth: past that one side is far
    /// behind, and whole partitions are released rather than stall. When `batch_linger_ms`
    /// passes first, nothing more is arriving to pair with, and whole partitions are released.
    pub(super) async fn next_batch<'a>(
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
            metrics().side_paused();
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

    /// Runs `work` (a batch, or the checks before one) while keeping the group membership
    /// alive. Work that takes more than a second is waiting out an outage (Analytics, Redis, the
    /// DLQ): every assigned partition is then paused and the consumer keeps polling, so the
    /// member neither fetches more (memory stays bounded) nor exceeds `max.poll.interval.ms` and gets evicted. A message that still
    /// arrives (a partition assigned meanwhile) is kept for the next batch and its partition
    /// paused; all are resumed when the batch completes.
    pub(super) async fn keep_polling<T>(&self, work: impl std::future::Future<Output = T>) -> T {
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
