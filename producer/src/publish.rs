//! Publishing records to Kafka with every delivery report checked.
//!
//! Records are enqueued without waiting (librdkafka batches, compresses and retries them). Each
//! carries a shared counter of its poll as its delivery opaque, and the delivery callback counts
//! it acknowledged or failed there: no per-record future or channel. A poll only counts as
//! published when every report came back successful. Delivery reports are served on the
//! publishing task itself (so librdkafka frees each message on the thread that allocated it),
//! and by a slow background poll between cycles. A full local queue makes the publisher wait
//! for reports instead of dropping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeline_core::canonical::sha256_hex;
use pipeline_core::kafka::{self, KafkaConfig};
use pipeline_core::metrics::metrics;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
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

/// Delivery reports of one group of records (one source poll), counted by the callback.
#[derive(Default)]
struct DeliveryCounts {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl DeliveryCounts {
    fn reported(&self) -> u64 {
        self.acked.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire)
    }

    fn fail(&self, error: String) {
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(error);
        }
        self.failed.fetch_add(1, Ordering::AcqRel);
    }

    fn first_error(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .or_else(|| Some("delivery failed".to_owned()))
    }
}

/// The producer's librdkafka context: counts each delivery report into its group's counter.
#[derive(Default)]
struct PublishContext {
    /// Reports served so far, of every group: tells a poll that served something.
    served: AtomicU64,
}

impl ClientContext for PublishContext {}

impl ProducerContext for PublishContext {
    type DeliveryOpaque = Arc<DeliveryCounts>;

    fn delivery(&self, result: &DeliveryResult<'_>, counts: Arc<DeliveryCounts>) {
        self.served.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => {
                counts.acked.fetch_add(1, Ordering::AcqRel);
            }
            Err((e, _)) => counts.fail(e.to_string()),
        }
    }
}

type KafkaProducer = BaseProducer<PublishContext>;

/// The Kafka side of the producer.
pub struct Publisher {
    producer: Arc<KafkaProducer>,
    /// Serves delivery reports and errors while no poll is publishing.
    background: tokio::task::JoinHandle<()>,
}

/// Outstanding deliveries of one source poll.
pub struct Deliveries<'a> {
    source: &'a Source,
    outstanding: Outstanding<'a>,
}

/// Outstanding delivery reports per poll before the publisher waits for some: bounds memory
/// (a larger window showed as page-zeroing in profiles without publishing faster).
const MAX_PENDING: u64 = 50_000;

/// Records enqueued between two inline polls for delivery reports.
const POLL_EVERY: u64 = 64;

/// Interval of the background poll (reports and errors between cycles).
const BACKGROUND_POLL: Duration = Duration::from_millis(100);

/// How long a waiting publisher sleeps between polls when no report was ready.
const WAIT_STEP: Duration = Duration::from_millis(1);

impl Publisher {
    pub fn new(kafka: &KafkaConfig, message_timeout_ms: u64) -> anyhow::Result<Self> {
        let producer: KafkaProducer = kafka::create_with_context(
            &kafka.producer_config(message_timeout_ms),
            PublishContext::default(),
            "producer",
        )?;
        let producer = Arc::new(producer);
        let background = tokio::spawn({
            let producer = producer.clone();
            async move {
                let mut tick = tokio::time::interval(BACKGROUND_POLL);
                loop {
                    tick.tick().await;
                    producer.poll(Duration::ZERO);
                }
            }
        });
        Ok(Self {
            producer,
            background,
        })
    }

    pub fn deliveries<'a>(&'a self, source: &'a Source) -> Deliveries<'a> {
        Deliveries {
            source,
            outstanding: Outstanding::new(&self.producer),
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
        let record = BaseRecord::with_opaque_to(&d.source.topic, d.outstanding.counts.clone())
            .key(id)
            .payload(value)
            .headers(headers);
        d.enqueue(record).await;
    }

    /// Writes `value` under `key` to `topic` (`None`: a tombstone, which deletes the key from a
    /// compacted topic) and waits for the acknowledgement (source state).
    pub async fn write_acked(
        &self,
        topic: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        let mut one = Outstanding::new(&self.producer);
        let mut record = BaseRecord::with_opaque_to(topic, one.counts.clone()).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        one.enqueue(record).await;
        one.wait_below(1).await;
        match one.counts.first_error() {
            None => Ok(()),
            Some(e) => anyhow::bail!("writing {key} to {topic}: {e}"),
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

impl Drop for Publisher {
    fn drop(&mut self) {
        self.background.abort();
    }
}

/// Records of one group handed to librdkafka, and their reports so far.
struct Outstanding<'a> {
    producer: &'a KafkaProducer,
    counts: Arc<DeliveryCounts>,
    /// Records handed to librdkafka (or refused by it, and then counted failed).
    sent: u64,
}

impl<'a> Outstanding<'a> {
    fn new(producer: &'a KafkaProducer) -> Self {
        Self {
            producer,
            counts: Arc::default(),
            sent: 0,
        }
    }

    fn pending(&self) -> u64 {
        self.sent.saturating_sub(self.counts.reported())
    }

    /// Hands `record` to librdkafka, waiting for reports while its queue (or our window) is full.
    async fn enqueue(&mut self, mut record: BaseRecord<'_, str, [u8], Arc<DeliveryCounts>>) {
        if self.pending() >= MAX_PENDING {
            self.wait_below(MAX_PENDING).await;
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    if self.sent.is_multiple_of(POLL_EVERY) {
                        self.serve_ready();
                    }
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.serve_or_wait().await;
                }
                Err((e, _)) => {
                    self.sent += 1;
                    self.counts.fail(e.to_string());
                    return;
                }
            }
        }
    }

    /// Serves the delivery reports that are ready (each poll serves one event, which holds the
    /// reports of one produce batch); true if there were any.
    fn serve_ready(&self) -> bool {
        let served = &self.producer.context().served;
        let start = served.load(Ordering::Relaxed);
        loop {
            let before = served.load(Ordering::Relaxed);
            self.producer.poll(Duration::ZERO);
            if served.load(Ordering::Relaxed) == before {
                return before != start;
            }
        }
    }

    /// Serves ready delivery reports; sleeps a moment when none was ready.
    async fn serve_or_wait(&self) {
        if !self.serve_ready() {
            tokio::time::sleep(WAIT_STEP).await;
        }
    }

    /// Waits until fewer than `limit` reports are outstanding (`1`: all of them are in).
    async fn wait_below(&self, limit: u64) {
        while self.pending() >= limit {
            self.serve_or_wait().await;
        }
    }
}

impl Deliveries<'_> {
    async fn enqueue(&mut self, record: BaseRecord<'_, str, [u8], Arc<DeliveryCounts>>) {
        self.outstanding.enqueue(record).await;
    }

    /// Waits for every report; `Ok(acked)` only if none failed.
    pub async fn finish(self) -> Result<u64, PublishError> {
        self.outstanding.wait_below(1).await;
        let counts = &self.outstanding.counts;
        let acked = counts.acked.load(Ordering::Acquire);
        let failed = counts.failed.load(Ordering::Acquire);
        metrics().published(&self.source.name, acked);
        if failed > 0 {
            metrics().publish_failed(&self.source.name, failed);
            let first = counts.first_error().unwrap_or_default();
            tracing::error!(source = %self.source.name, failed, error = %first, "Kafka delivery failed");
            return Err(PublishError {
                source_name: self.source.name.clone(),
                failed,
                first,
            });
        }
        Ok(acked)
    }
}

fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
