//! Writing to `analytics_DLQ` from the consumer, with acknowledgement.
//!
//! The source offset of a dead-lettered message may only be stored once Kafka acknowledged the
//! DLQ record (ARCHITECTURE.md I4), so [`DlqWriter::write_all`] returns only after every record is
//! acknowledged, retrying failed writes with backoff, or when the worker shuts down.

use std::time::Duration;

use futures::future::join_all;
use pipeline_core::dlq::Failure;
use pipeline_core::kafka::{self, KafkaConfig};
use pipeline_core::metrics::metrics;
use pipeline_core::retry::RetryPolicy;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::delivery::Abandoned;

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
}

impl DlqWriter {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Self> {
        Ok(Self {
            producer: kafka::create(&kafka.producer_config(30_000), "DLQ producer")?,
            topic: topic.to_owned(),
        })
    }

    /// Writes every item and waits for Kafka's acknowledgements.
    pub async fn write_all(
        &self,
        items: &[DlqItem],
        shutdown: &CancellationToken,
    ) -> Result<(), Abandoned> {
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
                    Ok(_) => metrics().dead_lettered("consumer", item.failure.stage.as_str()),
                    Err((e, _)) => {
                        metrics().dlq_write_failed("consumer");
                        tracing::warn!(error = %e, "DLQ write failed; source offsets are held until it succeeds");
                        failed.push(*item);
                    }
                }
            }
            pending = failed;
            if !pending.is_empty() {
                retry
                    .pause(round, None, shutdown)
                    .await
                    .map_err(|_| Abandoned)?;
                round += 1;
            }
        }
        Ok(())
    }
}
