//! Topic names, partition counts and start-up topic creation.
//!
//! The join relies on co-partitioning: the joined topics (`customer_data` and `inventory_data`
//! by default) keyed by id with the same partition count put one id on the same partition number
//! in all of them, so one consumer owns every side of an id. Start-up therefore refuses joined
//! topics whose counts differ.

use std::collections::BTreeMap;
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
    /// Compacted topic keeping each source's incremental-sync cursor (the producer's offsets).
    #[arg(
        long,
        env = "SOURCE_STATE_TOPIC",
        default_value = "pipeline_source_state"
    )]
    pub state_topic: String,
    /// Partitions of each data topic when it has to be created.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor when a topic has to be created.
    #[arg(long, env = "TOPIC_REPLICATION", default_value_t = 1)]
    pub replication: i32,
}

/// Partitions of the source-state topic: a handful of keys per source, read whole at start-up.
const STATE_TOPIC_PARTITIONS: i32 = 1;

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            customer_topic: "customer_data".into(),
            inventory_topic: "inventory_data".into(),
            dlq_topic: "analytics_DLQ".into(),
            state_topic: "pipeline_source_state".into(),
            partitions: 6,
            replication: 1,
        }
    }
}

/// Kafka's topic name rule.
pub fn is_topic(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl TopicsConfig {
    /// Checks names and counts.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, setting) in [
            (&self.customer_topic, "CUSTOMER_TOPIC"),
            (&self.inventory_topic, "INVENTORY_TOPIC"),
            (&self.dlq_topic, "DLQ_TOPIC"),
            (&self.state_topic, "SOURCE_STATE_TOPIC"),
        ] {
            if !is_topic(name) {
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

    /// The default data topics, the DLQ and the source-state topic, in that order, as
    /// [`TopicsConfig::plan`] creates them for the default pipeline (for an embedded broker
    /// started without one).
    pub fn all(&self) -> Vec<TopicSpec> {
        let mut topics: Vec<TopicSpec> = [&self.customer_topic, &self.inventory_topic]
            .into_iter()
            .map(|name| TopicSpec {
                name: name.clone(),
                partitions: self.partitions,
                compacted: false,
            })
            .collect();
        topics.extend(self.service_topics());
        topics
    }

    /// The DLQ and the compacted source-state topic, as every pipeline gets them.
    fn service_topics(&self) -> [TopicSpec; 2] {
        [
            TopicSpec {
                name: self.dlq_topic.clone(),
                partitions: self.partitions,
                compacted: false,
            },
            TopicSpec {
                name: self.state_topic.clone(),
                partitions: STATE_TOPIC_PARTITIONS,
                compacted: true,
            },
        ]
    }

    /// What `pipeline` needs to exist: the data topics (`data`: name → partitions) with their
    /// partition counts, `joined` co-partitioned, the DLQ, and the compacted source-state topic.
    pub fn plan(&self, data: &BTreeMap<&str, i32>, joined: &[&str]) -> TopicPlan {
        let mut topics: Vec<TopicSpec> = data
            .iter()
            .map(|(name, partitions)| (*name, *partitions))
            // Compacted, as `docker-compose.yml` creates them: a rebuild after a Redis loss
            // reads every id's latest record from them, whatever its age.
            .map(|(name, partitions)| TopicSpec {
                name: name.to_owned(),
                partitions,
                compacted: true,
            })
            .collect();
        topics.extend(self.service_topics());
        TopicPlan {
            topics,
            replication: self.replication,
            co_partitioned: joined.iter().map(|t| t.to_string()).collect(),
        }
    }
}

/// One topic to create when missing.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `cleanup.policy=compact` (state that keeps only the latest value per key).
    pub compacted: bool,
}

/// The topics to make sure of, and which of them must be co-partitioned.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicPlan {
    pub topics: Vec<TopicSpec>,
    pub replication: i32,
    pub co_partitioned: Vec<String>,
}

impl TopicPlan {
    pub fn names(&self) -> Vec<&str> {
        self.topics.iter().map(|t| t.name.as_str()).collect()
    }
}

/// Makes sure every topic of `plan` exists (creating missing ones with the AdminClient) and
/// that the co-partitioned topics have the same partition count.
pub async fn ensure_topics(kafka: &KafkaConfig, plan: &TopicPlan) -> anyhow::Result<()> {
    let names = plan.names();
    let existing = partition_counts(kafka, &names).await?;
    let missing: Vec<&TopicSpec> = plan
        .topics
        .iter()
        .filter(|t| !existing.iter().any(|(name, _)| *name == t.name))
        .collect();
    if !missing.is_empty() {
        let admin: AdminClient<DefaultClientContext> =
            kafka::create(&kafka.client_config(), "admin client")?;
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|t| {
                let n = NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(plan.replication),
                );
                if t.compacted {
                    n.set("cleanup.policy", "compact")
                } else {
                    n
                }
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics(&new, &opts)
            .await
            .context("creating topics")?;
        for r in results {
            match r {
                Ok(t) => tracing::info!(topic = %t, "created topic"),
                Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic = %t, "topic exists")
                }
                Err((t, e)) => bail!("could not create topic {t}: {e}"),
            }
        }
    }
    if !missing.is_empty() {
        wait_for_leaders(kafka, &names).await?;
    }
    let counts = partition_counts(kafka, &names).await?;
    check_co_partitioned(&counts, &plan.co_partitioned)
}

/// Waits (up to 30 s) until every partition of `topics` has a leader that serves. Apache Kafka
/// answers a `CreateTopics` before the leaders are known to the brokers' metadata, and a
/// client that writes or reads watermarks in between gets `NOT_LEADER_OR_FOLLOWER`.
async fn wait_for_leaders(kafka: &KafkaConfig, topics: &[&str]) -> anyhow::Result<()> {
    let mut cfg = kafka.client_config();
    cfg.set("allow.auto.create.topics", "false");
    let wanted: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka::create(&cfg, "metadata client")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(5))
                .context("fetching Kafka metadata (is KAFKA_BOOTSTRAP_SERVERS reachable?)")?;
            let leaderless: Vec<&str> = wanted
                .iter()
                .filter(|w| {
                    !md.topics().iter().any(|t| {
                        t.name() == w.as_str()
                            && t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions()
                                .iter()
                                .all(|p| p.error().is_none() && p.leader() >= 0)
                    })
                })
                .map(String::as_str)
                .collect();
            // A leader in the metadata may still answer NOT_LEADER_OR_FOLLOWER for a moment:
            // ready means every partition answers for its watermarks.
            let serving = leaderless.is_empty()
                && md
                    .topics()
                    .iter()
                    .filter(|t| wanted.iter().any(|w| w == t.name()))
                    .all(|t| {
                        t.partitions().iter().all(|p| {
                            consumer
                                .fetch_watermarks(t.name(), p.id(), Duration::from_secs(5))
                                .is_ok()
                        })
                    });
            if serving {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                if leaderless.is_empty() {
                    bail!(
                        "topics {wanted:?} have partitions that do not serve 30 s after creation"
                    );
                }
                bail!("topics {leaderless:?} have partitions without a leader 30 s after creation");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .context("metadata task")?
}

/// Fails when two of `joined` exist with different partition counts.
pub fn check_co_partitioned(counts: &[(String, usize)], joined: &[String]) -> anyhow::Result<()> {
    match partition_mismatch(counts, joined) {
        Some(((f, m), (t, n))) => bail!(
            "topics {f} ({m} partitions) and {t} ({n} partitions) must have the same \
             partition count for the join"
        ),
        None => Ok(()),
    }
}

/// A topic and its partition count.
pub type TopicCount<'a> = (&'a str, usize);

/// The first joined topic and the first other joined topic whose partition counts differ
/// (topics absent from `counts` are skipped).
pub fn partition_mismatch<'a>(
    counts: &'a [(String, usize)],
    joined: &[String],
) -> Option<(TopicCount<'a>, TopicCount<'a>)> {
    let mut present = joined
        .iter()
        .filter_map(|t| counts.iter().find(|(name, _)| name == t))
        .map(|(name, n)| (name.as_str(), *n));
    let first = present.next()?;
    present
        .find(|(_, n)| *n != first.1)
        .map(|other| (first, other))
}

/// Partition counts of those of our topics that exist.
pub async fn partition_counts(
    kafka: &KafkaConfig,
    topics: &[&str],
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut cfg = kafka.client_config();
    cfg.set("allow.auto.create.topics", "false");
    let wanted: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
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
