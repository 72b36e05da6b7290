//! Publishing records to Kafka with every delivery report checked.
//!
//! Records are enqueued without waiting (librdkafka batches, compresses and retries them) and
//! their delivery futures are collected; a cycle only counts as published when every report came
//! back successful. A full local queue makes the publisher wait for reports instead of dropping.

use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use pipeline_core::canonical::sha256_hex;
use pipeline_core::dlq::Failure;
use pipeline_core::kafka::{self, KafkaConfig};
use pipeline_core::metrics::metrics;
use pipeline_core::record::RecordError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde_json::Value;
use thiserror::Error;

use crate::source::Source;

/// Delivery failed for some records of a cycle.
#[derive(Debug, Error)]
#[error("{failed} record(s) of {source_name} were not acknowledged by Kafka; first error: {first}")]
pub struct PublishError {
    pub source_name: String,
    pub failed: u64,
    pub first: String,
}

/// The Kafka side of the producer.
pub struct Publisher {
    producer: FutureProducer,
    dlq_topic: String,
}

/// Outstanding deliveries of one source poll.
pub struct Deliveries<'a> {
    source: &'a Source,
    pending: FuturesUnordered<DeliveryFuture>,
    acked: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Outstanding delivery reports per poll before the publisher waits for some: bounds memory
/// (a larger window showed as page-zeroing in profiles without publishing faster).
const MAX_PENDING: usize = 50_000;

impl Publisher {
    pub fn new(
        kafka: &KafkaConfig,
        dlq_topic: &str,
        message_timeout_ms: u64,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer =
            kafka::create(&kafka.producer_config(message_timeout_ms), "producer")?;
        Ok(Self {
            producer,
            dlq_topic: dlq_topic.to_owned(),
        })
    }

    pub fn deliveries<'a>(&self, source: &'a Source) -> Deliveries<'a> {
        Deliveries {
            source,
            pending: FuturesUnordered::new(),
            acked: 0,
            failed: 0,
            first_error: None,
        }
    }

    /// Enqueues one valid record keyed by its id.
    pub async fn publish(&self, d: &mut Deliveries<'_>, id: &str, value: &[u8], fetched_at: &str) {
        let sha = sha256_hex(value);
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(h("source", &d.source.name))
            .insert(h("entity", &d.source.entity))
            .insert(h("schema", &d.source.schema))
            .insert(h("fetched-at", fetched_at))
            .insert(h("content-sha256", &sha));
        let record = FutureRecord::to(&d.source.topic)
            .key(id)
            .payload(value)
            .headers(headers);
        self.enqueue(d, record).await;
    }

    /// Enqueues a record that failed validation to the DLQ.
    pub async fn dead_letter(&self, d: &mut Deliveries<'_>, raw: &Value, err: &RecordError) {
        metrics()
            .invalid_records
            .with_label_values(&[&d.source.name])
            .inc();
        metrics()
            .dlq_records
            .with_label_values(&["producer", err.stage().as_str()])
            .inc();
        let value = raw.to_string();
        let key = raw
            .get(&d.source.shape.id_field)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let failure = Failure {
            stage: err.stage(),
            reason: err.to_string(),
            error_class: err.class().to_owned(),
            original_topic: d.source.topic.clone(),
            original_partition: -1,
            original_offset: -1,
            attempts: 1,
            http_status: None,
            first_failure_at: chrono::Utc::now(),
            record_key: None,
        };
        let headers = failure.headers(OwnedHeaders::new().insert(h("source", &d.source.name)));
        let record = FutureRecord::to(&self.dlq_topic)
            .key(key.as_str())
            .payload(value.as_bytes())
            .headers(headers);
        self.enqueue(d, record).await;
    }

    async fn enqueue(&self, d: &mut Deliveries<'_>, mut record: FutureRecord<'_, str, [u8]>) {
        loop {
            if d.pending.len() >= MAX_PENDING {
                d.settle_one().await;
            }
            match self.producer.send_result(record) {
                Ok(fut) => {
                    d.pending.push(fut);
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    if !d.settle_one().await {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Err((e, _)) => {
                    d.record_failure(e.to_string());
                    return;
                }
            }
        }
    }

    /// Writes `value` under `key` to `topic` and waits for the acknowledgement (source state).
    pub async fn write_acked(&self, topic: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let record = FutureRecord::to(topic).key(key).payload(value);
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err((e, _)) => anyhow::bail!("writing {key} to {topic}: {e}"),
        }
    }

    /// Waits for every outstanding librdkafka message (shutdown).
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        self.producer.flush(timeout)?;
        let left = self.producer.in_flight_count();
        if left > 0 {
            anyhow::bail!("{left} message(s) still in flight after flush");
        }
        Ok(())
    }
}

impl Deliveries<'_> {
    /// Waits for one report; false when none was pending.
    async fn settle_one(&mut self) -> bool {
        match self.pending.next().await {
            Some(Ok(Ok(_))) => {
                self.acked += 1;
                true
            }
            Some(Ok(Err((e, _)))) => {
                self.record_failure(e.to_string());
                true
            }
            Some(Err(_)) => {
                self.record_failure("delivery report channel closed".into());
                true
            }
            None => false,
        }
    }

    fn record_failure(&mut self, e: String) {
        self.failed += 1;
        metrics()
            .publish_failures
            .with_label_values(&[&self.source.name])
            .inc();
        if self.first_error.is_none() {
            tracing::error!(source = %self.source.name, error = %e, "Kafka delivery failed");
            self.first_error = Some(e);
        }
    }

    /// Waits for every report; `Ok(acked)` only if none failed.
    pub async fn finish(mut self) -> Result<u64, PublishError> {
        while self.settle_one().await {}
        metrics()
            .records_published
            .with_label_values(&[&self.source.name])
            .inc_by(self.acked);
        if self.failed > 0 {
            return Err(PublishError {
                source_name: self.source.name.clone(),
                failed: self.failed,
                first: self.first_error.unwrap_or_default(),
            });
        }
        Ok(self.acked)
    }
}

fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
