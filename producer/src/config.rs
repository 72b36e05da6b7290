//! Producer settings: every field has a flag and an environment variable.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::bail;
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::pipeline_config::{PipelineArg, PipelineConfig, TwoSources};
use pipeline_core::topics::TopicsConfig;

/// Settings of the source poller / Kafka publisher.
#[derive(Debug, Clone, clap::Args)]
pub struct ProducerConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub topics: TopicsConfig,
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Base URL of the CRM API (serves `GET /customers`).
    #[arg(
        long,
        env = "CRM_URL",
        hide_env_values = true,
        default_value = "http://localhost:8081"
    )]
    pub crm_url: String,
    /// Base URL of the Inventory API (serves `GET /products`).
    #[arg(
        long,
        env = "INVENTORY_URL",
        hide_env_values = true,
        default_value = "http://localhost:8082"
    )]
    pub inventory_url: String,
    /// Seconds between the starts of two polls of a source (built-in pipeline; a pipeline file
    /// sets `interval_s` per source).
    #[arg(long, env = "POLL_INTERVAL_S", default_value_t = 60)]
    pub poll_interval_s: u64,
    /// Records requested per page (`per_page`).
    #[arg(long, env = "PAGE_SIZE", default_value_t = 1000)]
    pub page_size: u64,
    /// Timeout of one HTTP request, in milliseconds.
    #[arg(long, env = "HTTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_timeout_ms: u64,
    /// Attempts per HTTP request (first included) before the cycle fails.
    #[arg(long, env = "HTTP_MAX_ATTEMPTS", default_value_t = 5)]
    pub http_max_attempts: u32,
    /// Kafka `message.timeout.ms`: how long a record may wait for its delivery report.
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 30_000)]
    pub message_timeout_ms: u64,
    /// Poll every source once, print the report as JSON on stdout and exit (non-zero if a
    /// source failed): for cron-style runs and the benchmark.
    #[arg(long)]
    pub once: bool,
    /// Ignore the page ETags and sync cursors saved in the source-state topic: this run reads
    /// and publishes every source in full (e.g. after the data topics were recreated). What it
    /// publishes is saved as usual.
    #[arg(long, env = "FULL_EXPORT")]
    pub full_export: bool,
    /// Create missing topics at start-up.
    #[arg(long, env = "CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_topics: bool,
    /// Address of `/metrics`, `/health`, `/ready` (9001 so it can share a host with a consumer).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9001")]
    pub metrics_addr: Option<SocketAddr>,
}

impl ProducerConfig {
    /// Defaults for the given brokers and source URLs (used by the embedded stack and tests).
    pub fn new(brokers: &str, crm_url: &str, inventory_url: &str) -> Self {
        Self {
            kafka: KafkaConfig::new(brokers),
            topics: TopicsConfig::default(),
            pipeline: PipelineArg::default(),
            crm_url: crm_url.into(),
            inventory_url: inventory_url.into(),
            poll_interval_s: 60,
            page_size: 1000,
            http_timeout_ms: 10_000,
            http_max_attempts: 5,
            message_timeout_ms: 30_000,
            once: false,
            full_export: false,
            create_topics: true,
            metrics_addr: None,
        }
    }

    /// The pipeline to run: the one given in code, the file, or the built-in two sources.
    pub fn pipeline(&self) -> anyhow::Result<Arc<PipelineConfig>> {
        self.pipeline.resolve(|| {
            PipelineConfig::two_sources(&TwoSources {
                crm_url: &self.crm_url,
                inventory_url: &self.inventory_url,
                topics: &self.topics,
                page_size: self.page_size,
                interval_s: self.poll_interval_s,
                timeout_ms: self.http_timeout_ms,
                max_attempts: self.http_max_attempts,
            })
        })
    }

    /// Checks every setting, naming the one that is wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.kafka.validate()?;
        self.topics.validate()?;
        if self.pipeline.is_set() {
            self.pipeline()?;
            if self.poll_interval_s == 0 {
                bail!("POLL_INTERVAL_S must be at least 1");
            }
            return Ok(());
        }
        for (url, setting) in [
            (&self.crm_url, "CRM_URL"),
            (&self.inventory_url, "INVENTORY_URL"),
        ] {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => bail!("{setting}={url:?} is not an http(s) URL"),
            }
        }
        if self.poll_interval_s == 0 {
            bail!("POLL_INTERVAL_S must be at least 1");
        }
        if !(1..=10_000).contains(&self.page_size) {
            bail!("PAGE_SIZE must be within 1..=10000, got {}", self.page_size);
        }
        if self.http_timeout_ms == 0 || self.http_max_attempts == 0 {
            bail!("HTTP_TIMEOUT_MS and HTTP_MAX_ATTEMPTS must be at least 1");
        }
        Ok(())
    }
}
