//! `pipeline broker`: a single-node Apache Kafka (the jars `scripts/kafka.sh` fetched) with the
//! pipeline's topics created as in production, so that producers, consumers, kcat and Kafka's
//! console tools in other processes can use it without Docker. Its data lives in a temporary
//! directory and goes when it stops.

use std::path::PathBuf;

use anyhow::Context;
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::pipeline_config::{PipelineConfig, TwoSources};
use pipeline_core::topics::{TopicSpec, TopicsConfig};
use pipeline_kit::apache_kafka::{ApacheKafka, BrokerOptions, KAFKA_VERSION};
use tokio_util::sync::CancellationToken;

/// Settings of `pipeline broker`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerConfig {
    /// The broker's client port (0: a free one, printed and written to `--bootstrap-file`).
    #[arg(long, env = "BROKER_PORT", default_value_t = 9092)]
    pub port: u16,
    /// Partitions of each topic created at start.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Extra topics to create (the pipeline's default topics are always created).
    #[arg(long = "topic")]
    pub extra_topics: Vec<String>,
    /// Create the topics of this pipeline file (its sources' partition counts) instead of the
    /// built-in pipeline's.
    #[arg(long = "config", env = "PIPELINE_CONFIG")]
    pub pipeline_file: Option<PathBuf>,
    /// Write the bootstrap address to this file once the broker serves.
    #[arg(long, env = "BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,
}

/// Runs the broker until `shutdown`, then stops it.
pub async fn run(config: BrokerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topics = TopicsConfig {
        partitions: config.partitions,
        ..TopicsConfig::default()
    };
    // The built-in pipeline's topics unless a file names others.
    let pipeline = match &config.pipeline_file {
        Some(path) => PipelineConfig::load(path)?,
        None => PipelineConfig::two_sources(&TwoSources::topics_only(&topics)),
    };
    let mut plan = pipeline.topic_plan(&topics);
    plan.topics
        .extend(config.extra_topics.iter().map(|name| TopicSpec {
            name: name.clone(),
            partitions: config.partitions,
            compacted: false,
        }));
    let options = BrokerOptions {
        port: (config.port != 0).then_some(config.port),
        ..BrokerOptions::default()
    };
    let mut kafka = tokio::task::spawn_blocking(move || ApacheKafka::start(&options))
        .await
        .context("starting Apache Kafka")??;
    let bootstrap = kafka.bootstrap();
    pipeline_core::topics::ensure_topics(&KafkaConfig::new(&bootstrap), &plan).await?;
    if let Some(path) = &config.bootstrap_file {
        std::fs::write(path, &bootstrap).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "Apache Kafka {KAFKA_VERSION} ready in {:.1} s: bootstrap.servers={bootstrap}",
        kafka.started_in.as_secs_f64()
    );
    let listed: Vec<String> = plan
        .topics
        .iter()
        .map(|t| {
            let compacted = if t.compacted { ", compacted" } else { "" };
            format!("{} ({}{compacted})", t.name, t.partitions)
        })
        .collect();
    eprintln!("topics (partitions): {}", listed.join(", "));
    eprintln!("try: kcat -b {bootstrap} -L");
    shutdown.cancelled().await;
    tokio::task::spawn_blocking(move || kafka.stop())
        .await
        .context("stopping Apache Kafka")?;
    Ok(())
}
