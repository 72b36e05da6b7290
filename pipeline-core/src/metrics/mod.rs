//! The metrics registry and the operations endpoint (`/metrics`, `/health`, `/ready`).
//!
//! All metric names live here, named `pipeline_<component>_<what>_<unit|total>` with
//! low-cardinality labels, and code records them through the named methods of [`Metrics`] in
//! `record` (`metrics().published(source, n)`): the metric fields are private, so no metric is
//! named, labelled or registered anywhere else. One registry per process: several workers hosted
//! in one process (the embedded stack) add up into the same series.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

mod record;

/// Every metric the pipeline exports.
pub struct Metrics {
    registry: Registry,
    records_fetched: IntCounterVec,
    records_published: IntCounterVec,
    publish_failures: IntCounterVec,
    invalid_records: IntCounterVec,
    poll_duration: HistogramVec,
    poll_failures: IntCounterVec,
    http_retries: IntCounterVec,
    http_duration: HistogramVec,
    messages_consumed: IntCounterVec,
    records_merged: IntCounter,
    join_states_written: IntCounter,
    sides_paused: IntCounter,
    duplicates_skipped: IntCounter,
    records_delivered: IntCounter,
    dlq_records: IntCounterVec,
    batch_duration: HistogramVec,
    redis_duration: HistogramVec,
    delivery_halted: IntGauge,
    consumer_lag: IntGaugeVec,
    assigned_partitions: IntGauge,
    /// DLQ records Kafka refused (retried; the source offset is held meanwhile).
    dlq_write_failures: IntCounterVec,
    /// Seconds since the worker last polled Kafka (0 while it waits in a poll).
    seconds_since_poll: IntGauge,
    build_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(0.0005, 2.0, 18).expect("static buckets");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric name");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            records_fetched: counter(
                &r,
                "pipeline_producer_records_fetched_total",
                "Records fetched from a source API.",
                &["source"],
            ),
            records_published: counter(
                &r,
                "pipeline_producer_records_published_total",
                "Records acknowledged by Kafka.",
                &["source"],
            ),
            publish_failures: counter(
                &r,
                "pipeline_producer_publish_failures_total",
                "Records whose Kafka delivery report was an error.",
                &["source"],
            ),
            invalid_records: counter(
                &r,
                "pipeline_producer_invalid_records_total",
                "Fetched records that failed validation (sent to the DLQ).",
                &["source"],
            ),
            poll_duration: histogram(
                &r,
                "pipeline_producer_poll_duration_seconds",
                "Duration of one full poll of a source (all pages, published).",
                &["source"],
            ),
            poll_failures: counter(
                &r,
                "pipeline_producer_poll_failures_total",
                "Polls of a source that failed (retries exhausted, Kafka did not acknowledge); \
                 the source is polled again on its next interval.",
                &["source"],
            ),
            http_duration: histogram(
                &r,
                "pipeline_http_request_duration_seconds",
                "HTTP request latency, by component and target.",
                &["component", "target"],
            ),
            http_retries: counter(
                &r,
                "pipeline_http_retries_total",
                "HTTP requests retried, by component and target.",
                &["component", "target"],
            ),
            messages_consumed: counter(
                &r,
                "pipeline_consumer_messages_consumed_total",
                "Kafka messages processed (offset stored).",
                &["topic"],
            ),
            records_merged: counter(
                &r,
                "pipeline_consumer_records_merged_total",
                "New merged views produced by the join.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            join_states_written: counter(
                &r,
                "pipeline_consumer_join_states_written_total",
                "Join states written to Redis (one per id per batch that changed it).",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            sides_paused: counter(
                &r,
                "pipeline_consumer_sides_paused_total",
                "Topic-partitions paused because their fetch ran ahead of the other side's.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            duplicates_skipped: counter(
                &r,
                "pipeline_consumer_duplicates_skipped_total",
                "Merged views not sent because their key was already delivered.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            records_delivered: counter(
                &r,
                "pipeline_consumer_records_delivered_total",
                "Merged records acknowledged by the Analytics API.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            dlq_records: counter(
                &r,
                "pipeline_dlq_records_total",
                "Records written to the DLQ, by component and stage.",
                &["component", "stage"],
            ),
            batch_duration: histogram(
                &r,
                "pipeline_consumer_batch_duration_seconds",
                "Time to process one consumer batch (join, dedup, delivery, DLQ).",
                &[],
            ),
            redis_duration: histogram(
                &r,
                "pipeline_consumer_redis_duration_seconds",
                "Redis round-trip latency by operation.",
                &["op"],
            ),
            delivery_halted: gauge(
                &r,
                "pipeline_consumer_delivery_halted",
                "1 while delivery is halted by an outage or a 401/403 from Analytics.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            consumer_lag: gauge(
                &r,
                "pipeline_consumer_lag_messages",
                "Messages between the stored offset and the high watermark.",
                &["topic", "partition"],
            ),
            assigned_partitions: gauge(
                &r,
                "pipeline_consumer_assigned_partitions",
                "Partitions currently assigned to this consumer-group member.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            dlq_write_failures: counter(
                &r,
                "pipeline_dlq_write_failures_total",
                "DLQ records Kafka refused; retried while the source offset is held.",
                &["component"],
            ),
            seconds_since_poll: gauge(
                &r,
                "pipeline_consumer_seconds_since_poll",
                "Seconds since this worker last polled Kafka; 0 while it waits in a poll.",
                &[],
            )
            .with_label_values(&[] as &[&str]),
            build_info: gauge(
                &r,
                "pipeline_build_info",
                "Build information.",
                &["version"],
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Known label values start at 0, so every series exists before its first event and
        // rate() and alerts work from the first scrape.
        for source in ["crm", "inventory"] {
            m.init_source(source);
        }
        m.http_retries.with_label_values(&["consumer", "analytics"]);
        m.http_duration
            .with_label_values(&["consumer", "analytics"]);
        for stage in ["parse", "validate", "join", "deliver"] {
            m.dlq_records.with_label_values(&["consumer", stage]);
            m.dlq_records.with_label_values(&["producer", stage]);
        }
        for op in ["load", "commit", "confirm"] {
            m.redis_duration.with_label_values(&[op]);
        }
        m.batch_duration.with_label_values(&[] as &[&str]);
        m
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Every metric the pipeline documents (docs/operations.md); a test checks each is exported.
pub const DOCUMENTED: &[&str] = &[
    "pipeline_producer_records_fetched_total",
    "pipeline_producer_records_published_total",
    "pipeline_producer_publish_failures_total",
    "pipeline_producer_invalid_records_total",
    "pipeline_producer_poll_duration_seconds",
    "pipeline_producer_poll_failures_total",
    "pipeline_http_request_duration_seconds",
    "pipeline_http_retries_total",
    "pipeline_consumer_messages_consumed_total",
    "pipeline_consumer_records_merged_total",
    "pipeline_consumer_join_states_written_total",
    "pipeline_consumer_sides_paused_total",
    "pipeline_consumer_duplicates_skipped_total",
    "pipeline_consumer_records_delivered_total",
    "pipeline_dlq_records_total",
    "pipeline_dlq_write_failures_total",
    "pipeline_consumer_batch_duration_seconds",
    "pipeline_consumer_redis_duration_seconds",
    "pipeline_consumer_lag_messages",
    "pipeline_consumer_assigned_partitions",
    "pipeline_consumer_seconds_since_poll",
    "pipeline_consumer_delivery_halted",
    "pipeline_build_info",
];

/// Sum of the samples in Prometheus text `exposition` whose line starts with `series` (a
/// metric name, optionally with its labels, e.g. `x_total{source="crm"}`). For readers of
/// `/metrics`: the benchmark and the process tests.
pub fn sum_of(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Named readiness checks; `/ready` is 200 only when all are true. `/health` is 200 unless the
/// process declared itself stuck ([`Readiness::set_alive`]): a supervisor should restart it.
#[derive(Default, Clone)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
    stuck: Arc<std::sync::atomic::AtomicBool>,
}

impl Readiness {
    /// Declares the process alive or stuck (`/health` then answers 503).
    pub fn set_alive(&self, alive: bool) {
        self.stuck
            .store(!alive, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_alive(&self) -> bool {
        !self.stuck.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set(&self, check: &str, ok: bool) {
        if let Ok(mut c) = self.checks.lock() {
            c.insert(check.to_owned(), ok);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, bool> {
        self.checks.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn is_ready(&self) -> bool {
        let snap = self.snapshot();
        !snap.is_empty() && snap.values().all(|ok| *ok)
    }
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics().render(),
    )
}

async fn ready_handler(State(ready): State<Readiness>) -> impl IntoResponse {
    let status = if ready.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(ready.snapshot()))
}

async fn health_handler(State(ready): State<Readiness>) -> impl IntoResponse {
    if ready.is_alive() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stuck")
    }
}

/// The operations router: `/metrics`, `/health`, `/ready`.
pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .route("/ready", get(ready_handler))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(16 * 1024))
        .with_state(ready)
}

/// Binds `addr` and serves the operations endpoint until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    crate::http::spawn_server(addr, router(ready), shutdown)
        .await
        .with_context(|| format!("serving the metrics endpoint on {addr} (METRICS_ADDR)"))
}

/// Observes the duration of an async operation into a histogram.
pub async fn timed<T>(h: &prometheus::Histogram, fut: impl std::future::Future<Output = T>) -> T {
    let start = std::time::Instant::now();
    let out = fut.await;
    h.observe(start.elapsed().as_secs_f64());
    out
}

/// Formats a duration in seconds for JSON summaries.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_the_samples_of_one_series() {
        let text = "# HELP x_total X\nx_total{source=\"a\"} 2\nx_total{source=\"b\"} 3\nx_total_other 7\ny 1\n";
        assert_eq!(super::sum_of(text, "x_total"), 5.0);
        assert_eq!(super::sum_of(text, "x_total{source=\"b\"}"), 3.0);
        assert_eq!(super::sum_of(text, "z"), 0.0);
    }
}
