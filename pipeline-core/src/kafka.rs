//! Kafka client configuration shared by every component.
//!
//! Any librdkafka property can be passed through, either as `--kafka-prop key=value` or as an
//! environment variable `KAFKA_PROP_<KEY>` (`KAFKA_PROP_SASL_PASSWORD` → `sasl.password`), so
//! SASL/TLS deployments need no code change. Values of secret-looking keys never reach logs.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Context};
use rdkafka::ClientConfig;

/// Connection settings for Kafka.
#[derive(Clone, clap::Args)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "localhost:9092"
    )]
    pub brokers: String,
    /// Extra librdkafka properties, `key=value`, repeatable (env: `KAFKA_PROP_<KEY>`).
    #[arg(long = "kafka-prop", value_parser = parse_prop)]
    pub props: Vec<(String, String)>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = self.all_props();
        let props: BTreeMap<&str, &str> = all
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("props", &props)
            .finish()
    }
}

fn parse_prop(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// Whether a librdkafka property holds a secret.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.contains("key.pem") || k.contains("token")
}

impl KafkaConfig {
    /// A config for the given bootstrap servers with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            props: Vec::new(),
        }
    }

    /// Properties from `--kafka-prop` and `KAFKA_PROP_*` (flags win).
    pub fn all_props(&self) -> Vec<(String, String)> {
        let mut props: Vec<(String, String)> = std::env::vars()
            .filter_map(|(k, v)| {
                k.strip_prefix("KAFKA_PROP_")
                    .map(|rest| (rest.to_ascii_lowercase().replace('_', "."), v))
            })
            .collect();
        props.extend(self.props.iter().cloned());
        props
    }

    /// Checks the settings that can be checked without a broker.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.brokers.trim().is_empty() {
            bail!("KAFKA_BOOTSTRAP_SERVERS (--kafka-brokers) must not be empty");
        }
        Ok(())
    }

    /// The base librdkafka config: brokers plus every passthrough property.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        for (k, v) in self.all_props() {
            cfg.set(k, v);
        }
        cfg
    }

    /// Producer settings for durable, ordered, deduplicated writes.
    pub fn producer_config(&self, message_timeout_ms: u64) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "100000")
            .set("message.timeout.ms", message_timeout_ms.to_string());
        for (k, v) in self.all_props() {
            cfg.set(k, v);
        }
        cfg
    }
}

/// Builds a client from `cfg`, naming the failing setting in the error.
pub fn create<T: rdkafka::config::FromClientConfig>(
    cfg: &ClientConfig,
    what: &str,
) -> anyhow::Result<T> {
    cfg.create().with_context(|| creating(what))
}

/// Builds a client with `context` from `cfg`, naming the failing setting in the error.
pub fn create_with_context<
    C: rdkafka::ClientContext,
    T: rdkafka::config::FromClientConfigAndContext<C>,
>(
    cfg: &ClientConfig,
    context: C,
    what: &str,
) -> anyhow::Result<T> {
    cfg.create_with_context(context)
        .with_context(|| creating(what))
}

fn creating(what: &str) -> String {
    format!("creating the Kafka {what} (check KAFKA_BOOTSTRAP_SERVERS and KAFKA_PROP_* settings)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let cfg = KafkaConfig {
            brokers: "b:9092".into(),
            props: vec![
                ("sasl.password".into(), "hunter2".into()),
                ("acks".into(), "all".into()),
            ],
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("acks"),
            "{shown}"
        );
        assert!(parse_prop("novalue").is_err());
    }
}
