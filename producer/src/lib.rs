//! The producer: polls the CRM and Inventory APIs on a schedule, follows pagination, validates
//! each record and publishes it to its partitioned topic keyed by id (invalid records go to the
//! DLQ with a reason). A cycle succeeds only when Kafka acknowledged every record; a failed cycle
//! is logged, counted, and re-polled from scratch on the next tick, so nothing is lost to a
//! broker outage.

pub mod config;
pub mod publish;
pub mod source;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use pipeline_core::metrics::{self, metrics, Readiness};
use pipeline_core::record::validate_record;
use pipeline_core::retry::RetryPolicy;
use pipeline_core::topics;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use config::ProducerConfig;
use publish::Publisher;
use source::{Page, PageFetcher, Source};

/// What one poll of one source did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceReport {
    pub source: String,
    /// Records fetched (pages answered 304 not included).
    pub fetched: u64,
    /// Records acknowledged on the data topic.
    pub published: u64,
    /// Records dead-lettered by validation.
    pub invalid: u64,
    /// Pages fetched, and pages answered 304.
    pub pages: u64,
    pub pages_not_modified: u64,
    pub elapsed_s: f64,
}

/// What one polling cycle did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CycleReport {
    pub sources: Vec<SourceReport>,
}

impl CycleReport {
    pub fn published(&self) -> u64 {
        self.sources.iter().map(|s| s.published).sum()
    }
    pub fn invalid(&self) -> u64 {
        self.sources.iter().map(|s| s.invalid).sum()
    }
    pub fn source(&self, name: &str) -> Option<&SourceReport> {
        self.sources.iter().find(|s| s.source == name)
    }
}

/// A ready-to-poll producer: HTTP fetcher, Kafka publisher and per-page ETags.
pub struct Producer {
    sources: Vec<Source>,
    fetcher: PageFetcher,
    publisher: Publisher,
    /// (source, page) → (ETag, has_next) of the last successfully published poll.
    etags: Mutex<HashMap<(String, u64), (String, bool)>>,
}

impl Producer {
    /// Validates the config, checks/creates the topics and connects.
    pub async fn new(config: &ProducerConfig) -> anyhow::Result<Self> {
        config.validate()?;
        if config.create_topics {
            topics::ensure_topics(&config.kafka, &config.topics).await?;
        }
        let base = |u: &str| u.trim_end_matches('/').to_owned();
        let sources = vec![
            Source {
                name: "crm",
                entity: "customer",
                schema: "customer.v1",
                url: format!("{}/customers", base(&config.crm_url)),
                topic: config.topics.customer_topic.clone(),
            },
            Source {
                name: "inventory",
                entity: "product",
                schema: "product.v1",
                url: format!("{}/products", base(&config.inventory_url)),
                topic: config.topics.inventory_topic.clone(),
            },
        ];
        Ok(Self {
            sources,
            fetcher: PageFetcher::new(
                Duration::from_millis(config.http_timeout_ms),
                config.http_max_attempts,
                config.page_size,
            )?,
            publisher: Publisher::new(
                &config.kafka,
                &config.topics.dlq_topic,
                config.message_timeout_ms,
            )?,
            etags: Mutex::default(),
        })
    }

    /// Polls every source once, concurrently. Fails if any source failed.
    pub async fn poll_cycle(&self) -> anyhow::Result<CycleReport> {
        let results =
            futures::future::join_all(self.sources.iter().map(|s| self.poll_source(s))).await;
        let mut report = CycleReport::default();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(s) => report.sources.push(s),
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "source poll failed; it will be re-polled"
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    async fn poll_source(&self, source: &Source) -> anyhow::Result<SourceReport> {
        let started = Instant::now();
        let mut report = SourceReport {
            source: source.name.to_owned(),
            ..Default::default()
        };
        let mut deliveries = self.publisher.deliveries(source);
        let mut new_etags = Vec::new();
        let mut page = 1u64;
        loop {
            let known = self.etag(source.name, page);
            let fetched = self
                .fetcher
                .fetch(source, page, known.as_ref().map(|(t, _)| t.as_str()))
                .await?;
            report.pages += 1;
            let has_next = match fetched {
                Page::NotModified => {
                    report.pages_not_modified += 1;
                    known.map(|(_, next)| next).unwrap_or(false)
                }
                Page::Records {
                    records,
                    etag,
                    has_next,
                } => {
                    let fetched_at = chrono::Utc::now().to_rfc3339();
                    report.fetched += records.len() as u64;
                    metrics()
                        .records_fetched
                        .with_label_values(&[source.name])
                        .inc_by(records.len() as u64);
                    for raw in records {
                        match validate_record(raw.clone()) {
                            Ok(rec) => {
                                let value = serde_json::to_vec(&rec.body)
                                    .context("serialising a record")?;
                                self.publisher
                                    .publish(&mut deliveries, &rec.id, &value, &fetched_at)
                                    .await;
                            }
                            Err(e) => {
                                report.invalid += 1;
                                tracing::warn!(source = source.name, error = %e, "invalid record sent to the DLQ");
                                self.publisher.dead_letter(&mut deliveries, &raw, &e).await;
                            }
                        }
                    }
                    if let Some(tag) = etag {
                        new_etags.push((page, tag, has_next));
                    }
                    has_next
                }
            };
            if !has_next {
                break;
            }
            page += 1;
        }
        let acked = deliveries.finish().await?;
        report.published = acked.saturating_sub(report.invalid);
        // Only a fully acknowledged poll may skip these pages next time.
        if let Ok(mut tags) = self.etags.lock() {
            for (page, tag, next) in new_etags {
                tags.insert((source.name.to_owned(), page), (tag, next));
            }
        }
        report.elapsed_s = metrics::secs(started.elapsed());
        metrics()
            .poll_duration
            .with_label_values(&[source.name])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            source = source.name,
            fetched = report.fetched,
            published = report.published,
            invalid = report.invalid,
            pages = report.pages,
            elapsed_s = report.elapsed_s,
            "source polled"
        );
        Ok(report)
    }

    fn etag(&self, source: &str, page: u64) -> Option<(String, bool)> {
        self.etags
            .lock()
            .ok()?
            .get(&(source.to_owned(), page))
            .cloned()
    }

    /// Flushes outstanding messages (shutdown).
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        self.publisher.flush(timeout)
    }
}

/// Runs the producer until `shutdown`: a cycle every `poll_interval_s`.
pub async fn run(config: ProducerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ready = Readiness::default();
    if let Some(addr) = config.metrics_addr {
        let bound = metrics::serve(addr, ready.clone(), shutdown.clone()).await?;
        tracing::info!(%bound, "metrics endpoint listening");
    }
    config.validate()?;
    // Kafka may not be up yet (compose start order, an outage): retry instead of exiting.
    let mut attempt = 0;
    let producer = loop {
        match Producer::new(&config).await {
            Ok(p) => break p,
            Err(e) => {
                ready.set("kafka", false);
                let delay = RetryPolicy {
                    max_attempts: u32::MAX,
                    initial_backoff: Duration::from_millis(500),
                    max_backoff: Duration::from_secs(15),
                }
                .backoff(attempt, None);
                attempt += 1;
                tracing::warn!(
                    error = format!("{e:#}"),
                    attempt,
                    "producer start-up failed; retrying"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    ready.set("kafka", true);
    let interval = Duration::from_secs(config.poll_interval_s);
    loop {
        let started = Instant::now();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = producer.poll_cycle() => {
                ready.set("sources", r.is_ok());
                if let Ok(report) = r {
                    tracing::info!(published = report.published(), invalid = report.invalid(), "poll cycle complete");
                }
            }
        }
        let wait = interval.saturating_sub(started.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("producer stopping: flushing Kafka");
    producer.flush(Duration::from_secs(30))
}
