//! `pipeline broker`: hosts the embedded Kafka as a standalone process so that producers,
//! consumers and kcat in other processes can use it. Topics are created here because the mock
//! broker does not implement the CreateTopics API for outside clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use pipeline_core::embedded_kafka::{api_key, error_code, BrokerCommand, EmbeddedKafka};
use pipeline_core::topics::{TopicSpec, TopicsConfig};
use serde::Deserialize;
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
    /// Extra topics to create (the pipeline's default topics are always created).
    #[arg(long = "topic")]
    pub extra_topics: Vec<String>,
    /// Also create the data topics of this pipeline file, with their partition counts.
    #[arg(long = "config", env = "PIPELINE_CONFIG")]
    pub pipeline_file: Option<PathBuf>,
    /// Write the bootstrap address to this file once the broker is up.
    #[arg(long, env = "BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,
    /// Serve fault injection (`POST /admin/broker/down|up`, `POST /admin/request-errors`) here.
    #[arg(long, env = "BROKER_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
}

#[derive(Deserialize)]
struct NewTopic {
    name: String,
    partitions: i32,
}

#[derive(Deserialize)]
struct RequestErrors {
    /// `produce`, `fetch`, `offset_commit`, `offset_fetch`, `heartbeat`.
    api: String,
    /// Kafka error names, e.g. `REQUEST_TIMED_OUT`, one per failing request.
    errors: Vec<String>,
}

fn reply(r: anyhow::Result<()>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

/// The fault-injection API of a standalone broker (used by the process-level fault suite).
fn admin_router(kafka: Arc<EmbeddedKafka>) -> Router {
    let down = kafka.clone();
    let up = kafka.clone();
    let topics = kafka.clone();
    Router::new()
        .route(
            "/admin/topics",
            post(move |Json(t): Json<NewTopic>| async move {
                reply(topics.command(BrokerCommand::CreateTopic(t.name, t.partitions)))
            }),
        )
        .route(
            "/admin/broker/down",
            post(move || async move { reply(down.command(BrokerCommand::BrokerDown(1))) }),
        )
        .route(
            "/admin/broker/up",
            post(move || async move { reply(up.command(BrokerCommand::BrokerUp(1))) }),
        )
        .route(
            "/admin/request-errors",
            post(move |Json(req): Json<RequestErrors>| async move {
                let Some(api) = api_key(&req.api) else {
                    return reply(Err(anyhow::anyhow!("unknown api {:?}", req.api)));
                };
                let errs: Option<Vec<_>> = req.errors.iter().map(|e| error_code(e)).collect();
                let Some(errs) = errs else {
                    return reply(Err(anyhow::anyhow!(
                        "unknown error name in {:?}",
                        req.errors
                    )));
                };
                reply(kafka.command(BrokerCommand::RequestErrors(api, errs)))
            }),
        )
        .route("/health", get(|| async { "ok" }))
}

/// Runs the broker until `shutdown`.
pub async fn run(config: BrokerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topics = TopicsConfig {
        partitions: config.partitions,
        ..TopicsConfig::default()
    };
    let mut created = topics.all();
    created.extend(config.extra_topics.iter().map(|name| TopicSpec {
        name: name.clone(),
        partitions: config.partitions,
        compacted: false,
    }));
    let kafka = Arc::new(EmbeddedKafka::start(&created)?);
    if let Some(path) = &config.pipeline_file {
        let pipeline = pipeline_core::pipeline_config::PipelineConfig::load(path)?;
        for (topic, partitions) in pipeline.partitions_by_topic() {
            if !created.iter().any(|t| t.name == topic) {
                kafka.command(BrokerCommand::CreateTopic(topic.to_owned(), partitions))?;
                eprintln!(
                    "topic {topic} ({partitions} partitions) from {}",
                    path.display()
                );
            }
        }
    }
    let mut bootstrap = kafka.bootstrap_servers().to_owned();
    if config.port != 0 {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", config.port))
            .await
            .with_context(|| format!("binding the bootstrap port {} (BROKER_PORT)", config.port))?;
        kafka.forward(l)?;
        bootstrap = format!("127.0.0.1:{}", config.port);
    }
    if let Some(addr) = config.admin_addr {
        let bound =
            mock_analytics::spawn(addr, admin_router(kafka.clone()), shutdown.clone()).await?;
        eprintln!("fault injection: http://{bound}/admin/broker/down|up, /admin/request-errors");
    }
    if let Some(path) = &config.bootstrap_file {
        std::fs::write(path, &bootstrap).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "embedded Kafka ready: bootstrap.servers={bootstrap} (broker listener {})",
        kafka.bootstrap_servers()
    );
    let listed: Vec<String> = created
        .iter()
        .map(|t| format!("{} ({})", t.name, t.partitions))
        .collect();
    eprintln!("topics (partitions): {}", listed.join(", "));
    eprintln!("try: kcat -b {bootstrap} -L");
    shutdown.cancelled().await;
    Ok(())
}
