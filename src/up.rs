//! `pipeline up`: run the embedded stack, either continuously or for one polling cycle whose
//! outcome is summarised as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pipeline_core::metrics::secs;
use pipeline_core::pipeline_config::PipelineConfig;
use producer::Producer;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use pipeline_kit::stack::{describe_apache, KafkaKind, Stack, StackConfig};

/// Settings of `pipeline up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpConfig {
    /// Pipeline file (sources and join); sources with a `mock` table are served by generated
    /// mocks. Without it: the built-in CRM + Inventory pipeline.
    #[arg(long = "config", env = "PIPELINE_CONFIG")]
    pub pipeline_file: Option<PathBuf>,
    /// Customers served by the mock CRM (ids 1..=N; built-in pipeline).
    #[arg(long, env = "MOCK_CUSTOMERS", default_value_t = 1000)]
    pub customers: u64,
    /// Products served by the mock Inventory (ids 1..=M; ids 1..=min(N,M) join; built-in
    /// pipeline).
    #[arg(long, env = "MOCK_PRODUCTS", default_value_t = 1000)]
    pub products: u64,
    /// Consumer workers (each its own group member).
    #[arg(long, env = "CONSUMERS", default_value_t = 2)]
    pub consumers: usize,
    /// Partitions of each data topic.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Merged records per Analytics POST.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Records per source page.
    #[arg(long, env = "PAGE_SIZE", default_value_t = 1000)]
    pub page_size: u64,
    /// Seconds between polling cycles (continuous mode).
    #[arg(long, env = "POLL_INTERVAL_S", default_value_t = 60)]
    pub poll_interval_s: u64,
    /// `/metrics`, `/health`, `/ready` address.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9000")]
    pub metrics_addr: SocketAddr,
    /// Use this Redis instead of spawning `redis-server`.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Serve the broker on this port (e.g. 9092, for kcat and Kafka's console tools).
    #[arg(long, env = "KAFKA_PORT")]
    pub kafka_port: Option<u16>,
    /// Which Kafka to run: Apache Kafka (fetched by `scripts/kafka.sh`, needs Java), the only
    /// one since librdkafka's in-process mock was removed.
    #[arg(long, env = "PIPELINE_KAFKA", value_enum, default_value_t = KafkaKind::Apache)]
    pub kafka: KafkaKind,
    /// Run one polling cycle, wait until everything is delivered or dead-lettered, and exit.
    #[arg(long)]
    pub once: bool,
    /// Print the one-shot summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Longest wait for the consumers to catch up in `--once` mode, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// The one-shot summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub customers: u64,
    pub products: u64,
    pub consumers: usize,
    pub partitions: i32,
    /// The Kafka it ran on: `{"name", "version"}`.
    pub kafka: serde_json::Value,
    pub published: u64,
    /// Records published per source.
    pub sources: BTreeMap<String, u64>,
    /// Ids whose required sides all exist (from the mocks' sizes).
    pub merged_expected: u64,
    /// Ids Analytics holds a view of.
    pub ids_delivered: u64,
    /// Per join side: ids whose latest delivered view carries that side.
    pub sides_present: BTreeMap<String, u64>,
    pub delivered_unique: u64,
    pub records_received: u64,
    pub duplicates_received: u64,
    pub dlq: i64,
    pub export_s: f64,
    pub elapsed_s: f64,
    pub merged_per_s: f64,
    pub success: bool,
}

impl UpConfig {
    fn stack_config(&self) -> anyhow::Result<StackConfig> {
        let pipeline = match &self.pipeline_file {
            Some(path) => Some(PipelineConfig::load(path)?),
            None => None,
        };
        Ok(StackConfig {
            customers: self.customers,
            products: self.products,
            consumers: self.consumers,
            partitions: self.partitions,
            metrics_addr: Some(self.metrics_addr),
            redis_url: self.redis_url.clone(),
            batch_size: self.batch_size,
            page_size: self.page_size,
            kafka_port: self.kafka_port,
            pipeline,
            kafka: self.kafka,
        })
    }
}

fn print_where(stack: &Stack) {
    eprintln!("pipeline up: embedded stack running");
    eprintln!(
        "  kafka      {} ({} {})",
        stack.bootstrap_servers(),
        describe_apache()["name"].as_str().unwrap_or_default(),
        describe_apache()["version"].as_str().unwrap_or_default()
    );
    eprintln!(
        "  redis      {}",
        pipeline_core::http::redact_url(&stack.redis_url)
    );
    for s in &stack.pipeline.sources {
        let docs = match stack.mock(&s.name) {
            Some(_) => format!("  (API docs: {}/docs)", s.base_url),
            None => String::new(),
        };
        eprintln!("  {:<10} {} -> {}{docs}", s.name, s.url(), s.topic);
    }
    eprintln!(
        "  analytics  {}/analytics/stats  (API docs: {}/docs)",
        stack.analytics_url, stack.analytics_url
    );
    if let Some(m) = stack.metrics_addr {
        eprintln!("  metrics    http://{m}/metrics  (/health, /ready)");
    }
    eprintln!("  consumers  {}", stack.config.consumers);
}

/// Runs `pipeline up`.
pub async fn run(config: UpConfig, shutdown: CancellationToken) -> anyhow::Result<bool> {
    let stack = Stack::start(config.stack_config()?).await?;
    print_where(&stack);
    let mut producer_cfg = stack.producer_config();
    producer_cfg.poll_interval_s = config.poll_interval_s;
    if !config.once {
        let stop = shutdown.clone();
        let status = tokio::spawn(report_progress(stack.analytics.clone(), stop));
        let r = producer::run(producer_cfg, shutdown).await;
        status.abort();
        stack.stop().await;
        r?;
        return Ok(true);
    }
    let summary = run_once(&stack, &config, producer_cfg).await;
    stack.stop().await;
    let summary = summary?;
    if config.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprintln!("{summary:#?}");
    }
    Ok(summary.success)
}

async fn report_progress(analytics: mocks::analytics::AnalyticsMock, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let s = analytics.stats();
        eprintln!(
            "analytics: {} unique records, {} batches, {} duplicates received",
            s.unique_keys, s.batches, s.duplicates
        );
    }
}

/// One polling cycle, then wait until the group has caught up.
pub async fn run_once(
    stack: &Stack,
    config: &UpConfig,
    producer_cfg: producer::ProducerConfig,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let producer = Producer::new(&producer_cfg).await?;
    let report = producer.poll_cycle().await?;
    let export = started.elapsed();
    eprintln!(
        "exported {} records in {:.2} s; waiting for the consumers",
        report.published(),
        export.as_secs_f64()
    );
    let mut last_print = Instant::now();
    let analytics = stack.analytics.clone();
    stack
        .wait_caught_up(Duration::from_secs(config.timeout_s), |lag| {
            if last_print.elapsed() > Duration::from_secs(2) {
                last_print = Instant::now();
                eprintln!(
                    "  lag {lag:>9} messages, {:>9} merged records delivered",
                    analytics.stats().unique_keys
                );
            }
        })
        .await?;
    let elapsed = started.elapsed();
    let stats = stack.analytics.stats();
    let dlq = stack.dlq_size().await?;
    let merged_expected = merged_expected(&stack.pipeline);
    let latest = stack.analytics.latest_by_id();
    let sides_present = stack
        .pipeline
        .join
        .sides
        .iter()
        .map(|side| {
            let n = latest
                .values()
                .filter(|v| v.get(&side.name).is_some_and(|s| !s.is_null()))
                .count();
            (side.name.clone(), n as u64)
        })
        .collect();
    let ids_delivered = latest.len() as u64;
    let success = ids_delivered + dlq.max(0) as u64 >= merged_expected && report.invalid() == 0;
    let mock_records = |entity: &str| {
        stack
            .pipeline
            .sources
            .iter()
            .filter_map(|s| s.mock.as_ref())
            .filter(|m| m.entity == entity)
            .map(|m| m.records)
            .sum()
    };
    Ok(Summary {
        kafka: describe_apache(),
        customers: mock_records("customers"),
        products: mock_records("products"),
        sources: report
            .sources
            .iter()
            .map(|s| (s.source.clone(), s.published))
            .collect(),
        ids_delivered,
        sides_present,
        consumers: stack.config.consumers,
        partitions: stack.config.partitions,
        published: report.published(),
        merged_expected,
        delivered_unique: stats.unique_keys,
        records_received: stats.records_received,
        duplicates_received: stats.duplicates,
        dlq,
        export_s: secs(export),
        elapsed_s: secs(elapsed),
        merged_per_s: (stats.unique_keys as f64 / elapsed.as_secs_f64()).round(),
        success,
    })
}

/// Ids 1..=n of every mocked required side: the smallest mock among them.
fn merged_expected(p: &PipelineConfig) -> u64 {
    p.join
        .sides
        .iter()
        .filter(|side| side.required)
        .filter_map(|side| {
            p.sources
                .iter()
                .find(|s| s.topic == side.topic)
                .and_then(|s| s.mock.as_ref())
                .map(|m| m.records)
        })
        .min()
        .unwrap_or(0)
}
