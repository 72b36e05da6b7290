//! Writing to `analytics_DLQ`, with acknowledgement, for the producer and the consumer.
//!
//! Nothing may move past a dead-lettered record before Kafka acknowledged its DLQ record: not
//! the consumer's source offset (ARCHITECTURE.md I4), not the producer's cursor or page ETags
//! (I1). So [`DlqWriter::write_all`] returns only after every record is acknowledged, retrying
//! failed writes with backoff (a refusing DLQ topic pauses the work, I6), or at shutdown.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use super::Failure;
use crate::kafka::{self, KafkaConfig};
use crate::metrics::metrics;
use crate::retry::RetryPolicy;

/// Shutdown came before every DLQ record was acknowledged; what depends on them must not move.
#[derive(Debug, thiserror::Error)]
#[error("shutting down before the DLQ records were acknowledged")]
pub struct WriteAbandoned;

/// One record to dead-letter.
#[derive(Debug, Clone)]
pub struct DlqItem {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Headers of the original message, kept.
    pub original_headers: OwnedHeaders,
    pub failure: Failure,
}

/// Producer for the DLQ topic.
pub struct DlqWriter {
    producer: FutureProducer,
    topic: String,
    /// The role writing (`producer`, `consumer`): the `component` label of the DLQ metrics.
    component: &'static str,
}

impl DlqWriter {
    pub fn new(kafka: &KafkaConfig, topic: &str, component: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            producer: kafka::create(&kafka.producer_config(30_000), "DLQ producer")?,
            topic: topic.to_owned(),
            component,
        })
    }

    /// Writes every item and waits for Kafka's acknowledgements.
    pub async fn write_all(
        &self,
        items: &[DlqItem],
        shutdown: &CancellationToken,
    ) -> Result<(), WriteAbandoned> {
        let retry = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        };
        let mut pending: Vec<&DlqItem> = items.iter().collect();
        let mut round = 0u32;
        while !pending.is_empty() {
            let results = join_all(pending.iter().map(|item| {
                let headers = item.failure.headers(item.original_headers.clone());
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.topic).headers(headers);
                if let Some(k) = &item.key {
                    record = record.key(k.as_slice());
                }
                if let Some(v) = &item.value {
                    record = record.payload(v.as_slice());
                }
                self.producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
            }))
            .await;
            let mut failed = Vec::new();
            for (item, r) in pending.iter().zip(results) {
                match r {
                    Ok(_) => metrics().dead_lettered(self.component, item.failure.stage.as_str()),
                    Err((e, _)) => {
                        metrics().dlq_write_failed(self.component);
                        tracing::warn!(component = self.component, error = %e, "DLQ write failed; what depends on it is held until it succeeds");
                        failed.push(*item);
                    }
                }
            }
            pending = failed;
            if !pending.is_empty() {
                retry
                    .pause(round, None, shutdown)
                    .await
                    .map_err(|_| WriteAbandoned)?;
                round += 1;
            }
        }
        Ok(())
    }
}
