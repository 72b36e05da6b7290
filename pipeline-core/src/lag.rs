//! Consumer-group lag: committed offsets against high watermarks, per partition.
//!
//! "Lag 0 on every partition" is the operator's definition of "caught up", and because the
//! consumer commits an offset only after the message's effects are durable it also means
//! "everything published so far is delivered or dead-lettered". The embedded stack's `--once`
//! mode and the tests wait on it.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{self, KafkaConfig};

/// Lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// Next offset the group will read (`None`: nothing committed yet).
    pub committed: Option<i64>,
    pub high_watermark: i64,
    pub lag: i64,
}

/// Reads a group's committed offsets without joining the group.
pub struct LagProbe {
    consumer: BaseConsumer,
    topics: Vec<String>,
}

impl LagProbe {
    pub fn new(kafka: &KafkaConfig, group: &str, topics: &[&str]) -> anyhow::Result<Self> {
        let mut cfg = kafka.client_config();
        cfg.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false");
        Ok(Self {
            consumer: kafka::create(&cfg, "lag probe")?,
            topics: topics.iter().map(|t| t.to_string()).collect(),
        })
    }

    /// Lag of every partition of the probe's topics (blocking; call from `spawn_blocking`).
    pub fn lag(&self, timeout: Duration) -> anyhow::Result<Vec<PartitionLag>> {
        let md = self
            .consumer
            .fetch_metadata(None, timeout)
            .context("fetching metadata")?;
        let mut tpl = TopicPartitionList::new();
        for t in md
            .topics()
            .iter()
            .filter(|t| self.topics.iter().any(|w| w == t.name()))
        {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
        let committed = self.committed(tpl, timeout)?;
        let mut out = Vec::new();
        for e in committed.elements() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)
                .context("reading watermarks")?;
            let committed = match e.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            };
            out.push(PartitionLag {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                committed,
                high_watermark: high,
                lag: high - committed.unwrap_or(low).max(low),
            });
        }
        Ok(out)
    }

    /// The group's committed offsets of `tpl`. Right after a group's first commit the broker
    /// may still be loading its coordinator (`NOT_COORDINATOR`, `COORDINATOR_LOAD_IN_PROGRESS`):
    /// asked again until `timeout` has passed.
    fn committed(
        &self,
        tpl: TopicPartitionList,
        timeout: Duration,
    ) -> anyhow::Result<TopicPartitionList> {
        use rdkafka::error::RDKafkaErrorCode::{
            CoordinatorLoadInProgress, CoordinatorNotAvailable, NotCoordinator,
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.consumer.committed_offsets(tpl.clone(), timeout) {
                Err(e)
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(NotCoordinator | CoordinatorLoadInProgress | CoordinatorNotAvailable)
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other.context("reading committed offsets"),
            }
        }
    }

    /// Total lag across partitions.
    pub fn total(&self, timeout: Duration) -> anyhow::Result<i64> {
        Ok(self.lag(timeout)?.iter().map(|p| p.lag).sum())
    }

    /// Messages in `topic` (sum of high minus low watermarks), e.g. the DLQ's size.
    pub fn topic_size(&self, topic: &str, timeout: Duration) -> anyhow::Result<i64> {
        Ok(self
            .watermarks(topic, timeout)?
            .iter()
            .map(|(l, h)| h - l)
            .sum())
    }

    /// Sum of the log start offsets of `topic`'s partitions: messages no longer held by the
    /// broker (retention, or the mock broker's per-partition size cap).
    pub fn log_start_total(&self, topic: &str, timeout: Duration) -> anyhow::Result<i64> {
        Ok(self
            .watermarks(topic, timeout)?
            .iter()
            .map(|(l, _)| l)
            .sum())
    }

    /// (low, high) watermarks of every partition of `topic`.
    fn watermarks(&self, topic: &str, timeout: Duration) -> anyhow::Result<Vec<(i64, i64)>> {
        let md = self
            .consumer
            .fetch_metadata(Some(topic), timeout)
            .context("fetching metadata")?;
        let mut out = Vec::new();
        for t in md.topics() {
            for p in t.partitions() {
                out.push(self.consumer.fetch_watermarks(t.name(), p.id(), timeout)?);
            }
        }
        Ok(out)
    }
}
