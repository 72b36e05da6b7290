//! Consumer settings: every field has a flag and an environment variable; secrets are redacted
//! from `Debug` output.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::pipeline_config::{JoinPlan, PipelineArg};
use pipeline_core::retry::RetryPolicy;
use pipeline_core::secret::Secret;
use pipeline_core::topics::TopicsConfig;

/// Which consumer group protocol the worker speaks (`group.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup), range assignment done by the group leader.
    Classic,
    /// KIP-848: the broker assigns (`group.remote.assignor=range`), members reconcile
    /// incrementally.
    Consumer,
}

impl GroupProtocol {
    /// The setting's value (`classic`, `consumer`), as `group.protocol` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// Settings of one consumer worker.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub topics: TopicsConfig,
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Kafka consumer group shared by all replicas.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "analytics-pipeline")]
    pub group_id: String,
    /// Redis URL (`redis://` or `rediss://`, ACL user and password allowed).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub redis_url: Secret,
    /// Prefix of every Redis key the pipeline writes.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "pipeline:")]
    pub redis_key_prefix: String,
    /// Base URL of the Analytics API (serves `POST /analytics/data`).
    #[arg(
        long,
        env = "ANALYTICS_URL",
        hide_env_values = true,
        default_value = "http://localhost:8080"
    )]
    pub analytics_url: String,
    /// Bearer token sent to the Analytics API.
    #[arg(long, env = "ANALYTICS_TOKEN", hide_env_values = true)]
    pub analytics_token: Option<Secret>,
    /// Merged records per `POST /analytics/data`.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Kafka messages processed as one unit (join, dedup, delivery, offsets); a batch may pass
    /// it by one partition's run. Up to eight times this many wait in the pairing buffer so
    /// both sides of an id are joined in one batch (see `pairing`).
    #[arg(long, env = "BATCH_MAX_MESSAGES", default_value_t = 2000)]
    pub batch_max_messages: usize,
    /// How long to wait for a batch to fill, in milliseconds.
    #[arg(long, env = "BATCH_LINGER_MS", default_value_t = 50)]
    pub batch_linger_ms: u64,
    /// Timeout of one Analytics request, in milliseconds.
    #[arg(long, env = "HTTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_timeout_ms: u64,
    /// Delivery attempts per batch before its records are dead-lettered (`retries_exhausted`).
    #[arg(long, env = "DELIVERY_MAX_ATTEMPTS", default_value_t = 8)]
    pub delivery_max_attempts: u32,
    /// Longest backoff between two delivery attempts, in milliseconds.
    #[arg(long, env = "DELIVERY_MAX_BACKOFF_MS", default_value_t = 10_000)]
    pub delivery_max_backoff_ms: u64,
    /// Lifetime of a dedup claim, in milliseconds; must outlast the whole delivery budget.
    #[arg(long, env = "DEDUP_CLAIM_TTL_MS", default_value_t = 300_000)]
    pub claim_ttl_ms: u64,
    /// Lifetime of a confirmed dedup key, in seconds.
    #[arg(long, env = "DEDUP_TTL_S", default_value_t = 86_400)]
    pub dedup_ttl_s: u64,
    /// Consumer group protocol: `classic` (JoinGroup/SyncGroup, client-side range assignor) or
    /// `consumer` (KIP-848: the broker assigns with its range assignor and members reconcile
    /// incrementally). docs/performance.md compares the two.
    #[arg(long, env = "KAFKA_GROUP_PROTOCOL", value_enum, default_value_t = GroupProtocol::Classic)]
    pub group_protocol: GroupProtocol,
    /// Kafka `session.timeout.ms` of the group member (classic protocol only: under `consumer`
    /// the broker's `group.consumer.session.timeout.ms` applies).
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Largest accepted message value, in bytes (larger ones are dead-lettered).
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = 1_048_576)]
    pub max_record_bytes: usize,
    /// Address of `/metrics`, `/health`, `/ready`.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9000")]
    pub metrics_addr: Option<SocketAddr>,
    /// Milliseconds without a Kafka poll after which the worker declares itself stuck
    /// (`/health` 503, an error log, `pipeline_consumer_seconds_since_poll`); must stay below
    /// `max.poll.interval.ms`, past which Kafka evicts the member.
    #[arg(long, env = "POLL_STALL_MS", default_value_t = 60_000)]
    pub poll_stall_ms: u64,
}

impl ConsumerConfig {
    /// Defaults for the given brokers, Redis and Analytics (embedded stack and tests).
    pub fn new(brokers: &str, redis_url: &str, analytics_url: &str) -> Self {
        Self {
            kafka: KafkaConfig::new(brokers),
            topics: TopicsConfig::default(),
            pipeline: PipelineArg::default(),
            group_id: "analytics-pipeline".into(),
            redis_url: Secret::new(redis_url),
            redis_key_prefix: "pipeline:".into(),
            analytics_url: analytics_url.into(),
            analytics_token: None,
            batch_size: 500,
            batch_max_messages: 2000,
            batch_linger_ms: 50,
            http_timeout_ms: 10_000,
            delivery_max_attempts: 8,
            delivery_max_backoff_ms: 10_000,
            claim_ttl_ms: 300_000,
            dedup_ttl_s: 86_400,
            group_protocol: GroupProtocol::Classic,
            session_timeout_ms: 10_000,
            max_record_bytes: 1_048_576,
            metrics_addr: None,
            poll_stall_ms: 60_000,
        }
    }

    pub fn delivery_retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.delivery_max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(self.delivery_max_backoff_ms),
        }
    }

    /// Worst-case time one batch can spend in delivery retries.
    pub fn delivery_budget(&self) -> Duration {
        let per_attempt =
            Duration::from_millis(self.http_timeout_ms + self.delivery_max_backoff_ms);
        per_attempt * self.delivery_max_attempts
    }

    /// The join this worker runs and the data topics it may replay to (the built-in one joins
    /// `CUSTOMER_TOPIC` and `INVENTORY_TOPIC`).
    pub fn join_plan(&self) -> anyhow::Result<JoinPlan> {
        Ok(match self.pipeline.configured()? {
            Some(p) => p.join_plan(),
            None => JoinPlan::built_in(&self.topics),
        })
    }

    /// Checks every setting, naming the one that is wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.kafka.validate()?;
        self.topics.validate()?;
        self.join_plan()?;
        if self.group_id.trim().is_empty() {
            bail!("CONSUMER_GROUP must not be empty");
        }
        match reqwest::Url::parse(self.redis_url.expose()) {
            Ok(u) if ["redis", "rediss", "redis+unix", "unix"].contains(&u.scheme()) => {}
            _ => bail!("REDIS_URL is not a redis:// or rediss:// URL"),
        }
        match reqwest::Url::parse(&self.analytics_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => bail!(
                "ANALYTICS_URL={:?} is not an http(s) URL",
                pipeline_core::http::redact_url(&self.analytics_url)
            ),
        }
        if self.batch_size == 0 || self.batch_max_messages == 0 {
            bail!("BATCH_SIZE and BATCH_MAX_MESSAGES must be at least 1");
        }
        if self.delivery_max_attempts == 0 {
            bail!("DELIVERY_MAX_ATTEMPTS must be at least 1");
        }
        if self.dedup_ttl_s == 0 {
            bail!("DEDUP_TTL_S must be at least 1");
        }
        let max_poll_interval_ms = self
            .kafka
            .all_props()
            .into_iter()
            .find(|(k, _)| k == "max.poll.interval.ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(300_000);
        if self.poll_stall_ms == 0 || self.poll_stall_ms >= max_poll_interval_ms {
            bail!(
                "POLL_STALL_MS={} must be above 0 and below max.poll.interval.ms ({max_poll_interval_ms})",
                self.poll_stall_ms
            );
        }
        let budget = self.delivery_budget();
        if Duration::from_millis(self.claim_ttl_ms) <= budget {
            bail!(
                "DEDUP_CLAIM_TTL_MS={} must exceed the delivery budget of {} ms \
                 (DELIVERY_MAX_ATTEMPTS × (HTTP_TIMEOUT_MS + DELIVERY_MAX_BACKOFF_MS)), \
                 or a slow delivery could be duplicated",
                self.claim_ttl_ms,
                budget.as_millis()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting_and_debug_hides_secrets() {
        let mut c = ConsumerConfig::new("b:9092", "redis://user:hunter2@r:6379/", "http://a:8080");
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        c.claim_ttl_ms = 1000;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("DEDUP_CLAIM_TTL_MS"));
        let mut c = ConsumerConfig::new("b:9092", "http://r", "http://a:8080");
        assert!(c.validate().unwrap_err().to_string().contains("REDIS_URL"));
        c.redis_url = Secret::new("rediss://r:6380");
        c.analytics_url = "ftp://x".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ANALYTICS_URL"));
    }
}
