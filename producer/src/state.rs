//! Incremental-sync cursors, kept durably in a compacted Kafka topic keyed by source name (the
//! way Kafka Connect keeps source offsets in `connect-offsets`): the producer stays stateless, a
//! restarted or rescheduled producer resumes from the last published cursor instead of
//! re-exporting everything, and `kcat -C -t pipeline_source_state` shows where each source is.
//!
//! A cursor is written only after every record of the poll that produced it was acknowledged,
//! so a crash can only make the next poll start from an older cursor (records re-fetched and
//! dropped downstream as unchanged), never skip records.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use pipeline_core::kafka::{self, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// The value stored per source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Greatest `updated_at` seen in the last fully published poll, as the source wrote it.
    pub updated_since: String,
    /// The same in epoch ms (to compare versions written in different formats).
    pub updated_since_ms: i64,
    /// When it was saved (RFC 3339).
    pub saved_at: String,
}

/// Reads every source's latest cursor from `topic` (the whole topic, last value per key wins).
pub async fn load_cursors(
    kafka: &KafkaConfig,
    topic: &str,
) -> anyhow::Result<HashMap<String, SourceCursor>> {
    let mut cfg = kafka.client_config();
    cfg.set("group.id", "pipeline-source-state-reader")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka::create(&cfg, "source-state reader")?;
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(15))
            .context("fetching metadata of the source-state topic")?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut out = HashMap::new();
        let mut ends = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, *p, Duration::from_secs(15))
                .context("reading source-state watermarks")?;
            if high > low {
                ends.insert(*p, high);
                tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
            }
        }
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() {
            if Instant::now() > deadline {
                anyhow::bail!("timed out reading the source-state topic {topic}");
            }
            let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg.context("reading the source-state topic")?;
            if let (Some(k), Some(v)) = (msg.key(), msg.payload()) {
                let name = String::from_utf8_lossy(k).into_owned();
                match serde_json::from_slice::<SourceCursor>(v) {
                    Ok(c) => {
                        out.insert(name, c);
                    }
                    Err(e) => tracing::warn!(source = %name, error = %e, "ignoring an unreadable source cursor"),
                }
            }
            if ends.get(&msg.partition()).is_some_and(|end| msg.offset() + 1 >= *end) {
                ends.remove(&msg.partition());
            }
        }
        Ok(out)
    })
    .await
    .context("source-state reader task")?
}
