//! `pipeline broker`: hosts the embedded Kafka as a standalone process so that producers,
//! consumers and kcat in other processes can use it. Topics are created here because the mock
//! broker does not implement the CreateTopics API for outside clients.

use std::path::PathBuf;

use anyhow::Context;
use pipeline_core::embedded_kafka::EmbeddedKafka;
use pipeline_core::topics::TopicsConfig;
use tokio_util::sync::CancellationToken;

/// Settings of `pipeline broker`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerConfig {
    /// Fixed bootstrap port forwarded to the broker (0: none, use the printed address).
    #[arg(long, env = "BROKER_PORT", default_value_t = 9092)]
    pub port: u16,
    /// Partitions of each topic created at start.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Extra topics to create (the pipeline's three are always created).
    #[arg(long = "topic")]
    pub extra_topics: Vec<String>,
    /// Write the bootstrap address to this file once the broker is up.
    #[arg(long, env = "BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,
}

/// Runs the broker until `shutdown`.
pub async fn run(config: BrokerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topics = TopicsConfig::default();
    let mut names: Vec<&str> = topics.all().to_vec();
    names.extend(config.extra_topics.iter().map(String::as_str));
    let kafka = EmbeddedKafka::start(&names, config.partitions)?;
    let mut bootstrap = kafka.bootstrap_servers().to_owned();
    if config.port != 0 {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", config.port))
            .await
            .with_context(|| format!("binding the bootstrap port {} (BROKER_PORT)", config.port))?;
        kafka.forward(l)?;
        bootstrap = format!("127.0.0.1:{}", config.port);
    }
    if let Some(path) = &config.bootstrap_file {
        std::fs::write(path, &bootstrap).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "embedded Kafka ready: bootstrap.servers={bootstrap} (broker listener {})",
        kafka.bootstrap_servers()
    );
    eprintln!(
        "topics: {} ({} partitions each)",
        names.join(", "),
        config.partitions
    );
    eprintln!("try: kcat -b {bootstrap} -L");
    shutdown.cancelled().await;
    Ok(())
}
