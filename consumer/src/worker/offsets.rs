//! Offsets last: a batch's offsets are stored, each with the store epoch as its commit
//! metadata, only once every effect of the batch is durable.

use std::collections::BTreeMap;

use pipeline_core::metrics::metrics;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;

use super::Worker;

use crate::recovery::{self};

impl Worker {
    /// Stores `last offset + 1` of every partition in the batch.
    pub(super) fn store_offsets<M: Message>(&self, batch: &[M]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
        for m in batch {
            let e = next.entry((m.topic(), m.partition())).or_insert(0);
            *e = (*e).max(m.offset() + 1);
            *per_topic.entry(m.topic()).or_insert(0) += 1;
        }
        for (topic, n) in per_topic {
            metrics().consumed(topic, n);
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
