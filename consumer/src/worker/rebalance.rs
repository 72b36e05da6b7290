//! The worker's librdkafka context: it sees every rebalance first (counting them, voiding what
//! the pairing buffer holds of revoked partitions, resuming what a held-up batch paused) and
//! exports lag for the partitions this member holds.

use std::collections::HashSet;

use pipeline_core::metrics::metrics;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::pairing::PairingBuffer;

/// Logs rebalances and commit failures, and counts rebalances (which invalidate what the
/// worker knows of its ids' state).
#[derive(Default)]
pub struct WorkerContext {
    pub(super) rebalances: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Partitions whose buffered messages are void (see `Worker::voided`).
    pub(super) voided: Voided,
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
            metrics().lag_forgotten(e.topic(), e.partition());
        }
    }
}

/// Partitions revoked or sought back since the worker last looked: their messages waiting in
/// the pairing buffer will be fetched again (by their next owner, or from the new position), so
/// they must be dropped, never processed. Shared by the context (revocations) and the worker
/// (seeks).
#[derive(Default, Clone)]
pub(super) struct Voided(std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>>);

impl Voided {
    pub(super) fn add(&self, partitions: &TopicPartitionList) {
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
    pub(super) fn drop_from<M: Message>(&self, pending: &mut PairingBuffer<M>) {
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
                metrics().lag(topic, *partition, lag);
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
        metrics().assigned(held);
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
