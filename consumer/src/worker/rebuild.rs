//! The worker's side of `recovery`: checking newly assigned partitions' committed progress
//! against the store epoch, and replaying from the beginning what cannot be trusted.

use std::time::Duration;

use pipeline_core::failpoint;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::Worker;

use crate::delivery::Abandoned;
use crate::recovery::{self, Committed};

impl Worker {
    /// Checks, before anything of them is processed, the committed progress of the partition
    /// numbers assigned since the last rebalance (see `recovery`). A number with any side
    /// committed under another store epoch is rebuilt: all its sides are sought back to their
    /// beginning, and its messages in this batch are dropped (they come again). Redis found to
    /// have lost its data meanwhile rewinds every assigned partition.
    pub(super) async fn check_partitions<M: Message + Sync>(
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

    /// Redis lost the join state: adopt the new epoch and replay every assigned partition from
    /// its beginning, so half-joined ids are joined again. Views already delivered come back
    /// under the same keys (the chain restarts from the same first view) and Analytics drops
    /// them as duplicates.
    pub(super) async fn rewind(&self, shutdown: &CancellationToken) -> Result<(), Abandoned> {
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
    pub(super) fn commit_rebuilds(&self, mode: CommitMode) {
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
}
