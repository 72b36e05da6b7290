//! Topic names, partition counts and start-up topic creation.
//!
//! The join relies on co-partitioning: `customer_data` and `inventory_data` keyed by id with the
//! same partition count put one id on the same partition number in both, so one consumer owns
//! both sides of an id. Start-up therefore refuses topics whose counts differ.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::{self, KafkaConfig};

/// The topics the pipeline reads and writes.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicsConfig {
    /// Topic of customer records.
    #[arg(long, env = "CUSTOMER_TOPIC", default_value = "customer_data")]
    pub customer_topic: String,
    /// Topic of product records.
    #[arg(long, env = "INVENTORY_TOPIC", default_value = "inventory_data")]
    pub inventory_topic: String,
    /// Dead-letter topic.
    #[arg(long, env = "DLQ_TOPIC", default_value = "analytics_DLQ")]
    pub dlq_topic: String,
    /// Partitions of each data topic when it has to be created.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor when a topic has to be created.
    #[arg(long, env = "TOPIC_REPLICATION", default_value_t = 1)]
    pub replication: i32,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            customer_topic: "customer_data".into(),
            inventory_topic: "inventory_data".into(),
            dlq_topic: "analytics_DLQ".into(),
            partitions: 6,
            replication: 1,
        }
    }
}

impl TopicsConfig {
    /// Checks names and counts.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, setting) in [
            (&self.customer_topic, "CUSTOMER_TOPIC"),
            (&self.inventory_topic, "INVENTORY_TOPIC"),
            (&self.dlq_topic, "DLQ_TOPIC"),
        ] {
            if name.is_empty()
                || name.len() > 249
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                bail!("{setting}={name:?} is not a valid Kafka topic name");
            }
        }
        if self.partitions < 1 {
            bail!(
                "TOPIC_PARTITIONS must be at least 1, got {}",
                self.partitions
            );
        }
        Ok(())
    }

    /// The data topics and the DLQ, in that order.
    pub fn all(&self) -> [&str; 3] {
        [&self.customer_topic, &self.inventory_topic, &self.dlq_topic]
    }
}

/// Makes sure every topic exists (creating missing ones with the AdminClient) and that the two
/// data topics have the same partition count.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &TopicsConfig) -> anyhow::Result<()> {
    let existing = partition_counts(kafka, topics).await?;
    let missing: Vec<&str> = topics
        .all()
        .into_iter()
        .filter(|t| !existing.iter().any(|(name, _)| name == t))
        .collect();
    if !missing.is_empty() {
        let admin: AdminClient<DefaultClientContext> =
            kafka::create(&kafka.client_config(), "admin client")?;
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    topics.partitions,
                    TopicReplication::Fixed(topics.replication),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics(&new, &opts)
            .await
            .context("creating topics")?;
        for r in results {
            match r {
                Ok(t) => {
                    tracing::info!(topic = %t, partitions = topics.partitions, "created topic")
                }
                Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic = %t, "topic exists")
                }
                Err((t, e)) => bail!("could not create topic {t}: {e}"),
            }
        }
    }
    let counts = partition_counts(kafka, topics).await?;
    let count = |name: &str| counts.iter().find(|(t, _)| t == name).map(|(_, n)| *n);
    if let (Some(c), Some(i)) = (
        count(&topics.customer_topic),
        count(&topics.inventory_topic),
    ) {
        if c != i {
            bail!(
                "topics {} ({c} partitions) and {} ({i} partitions) must have the same partition count for the join",
                topics.customer_topic,
                topics.inventory_topic
            );
        }
    }
    Ok(())
}

/// Partition counts of those of our topics that exist.
pub async fn partition_counts(
    kafka: &KafkaConfig,
    topics: &TopicsConfig,
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut cfg = kafka.client_config();
    cfg.set("allow.auto.create.topics", "false");
    let wanted: Vec<String> = topics.all().iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka::create(&cfg, "metadata client")?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(15))
            .context("fetching Kafka metadata (is KAFKA_BOOTSTRAP_SERVERS reachable?)")?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| {
                wanted.iter().any(|w| w == t.name())
                    && t.error().is_none()
                    && !t.partitions().is_empty()
            })
            .map(|t| (t.name().to_owned(), t.partitions().len()))
            .collect())
    })
    .await
    .context("metadata task")?
}
