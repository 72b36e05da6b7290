//! `pipeline bench`: benchmarks that print JSON. Speed is measured here, never asserted in
//! tests. `pipeline bench` runs the throughput benchmark; `pipeline bench rebalance` times the
//! consumer group's rebalances under each group protocol.

mod baselines;
mod child;
mod progress;
pub mod rebalance;
pub mod throughput;

use anyhow::Context;
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::topics::{TopicPlan, TopicsConfig};
use pipeline_kit::apache_kafka::{ApacheKafka, BrokerOptions, KAFKA_VERSION};

pub use baselines::{parse_commandstats, RedisCommandStat};
pub use throughput::{BenchConfig, BenchReport};

/// How long a benchmark's child process may take to stop after SIGTERM.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// `pipeline bench [rebalance]`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub scenario: Option<Scenario>,
    #[command(flatten)]
    pub throughput: BenchConfig,
}

/// Benchmarks other than the throughput one.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Scenario {
    /// Time a consumer joining, one leaving and one killed, per group protocol; prints JSON.
    Rebalance(rebalance::RebalanceConfig),
}

/// Runs the chosen benchmark and prints its report; `Ok(false)` when a check failed.
pub async fn print(command: BenchCommand) -> anyhow::Result<bool> {
    match command.scenario {
        Some(Scenario::Rebalance(c)) => {
            let json = c.json;
            let report = rebalance::run(c).await?;
            show(json, &report)?;
            Ok(report.success)
        }
        None => {
            let json = command.throughput.json;
            let report = throughput::run(command.throughput).await?;
            show(json, &report)?;
            Ok(report.success)
        }
    }
}

/// A report as JSON on stdout, or for reading on stderr.
fn show<R: serde::Serialize + std::fmt::Debug>(json: bool, report: &R) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        eprintln!("{report:#?}");
    }
    Ok(())
}

/// The mocks a benchmark runs in its own process: Analytics, and a CRM and an Inventory serving
/// `customers` and `products` generated records, on free loopback ports until `shutdown`.
struct BenchMocks {
    analytics: mocks::analytics::AnalyticsMock,
    analytics_addr: std::net::SocketAddr,
    crm_addr: std::net::SocketAddr,
    inventory_addr: std::net::SocketAddr,
}

impl BenchMocks {
    async fn start(
        customers: u64,
        products: u64,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Self> {
        use mocks::sources::{Entity, SourceMock, SourceMockConfig};
        let local: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
        let analytics =
            mocks::analytics::AnalyticsMock::new(&mocks::analytics::AnalyticsMockConfig::default());
        let analytics_addr = mocks::spawn(local, analytics.router(), shutdown.clone()).await?;
        let source = |entity, records| {
            SourceMock::new(
                entity,
                &SourceMockConfig {
                    records,
                    faults: mocks::faults::FaultConfig::default(),
                },
            )
            .router()
        };
        let crm_addr = mocks::spawn(
            local,
            source(Entity::Customers, customers),
            shutdown.clone(),
        )
        .await?;
        let inventory_addr =
            mocks::spawn(local, source(Entity::Products, products), shutdown.clone()).await?;
        Ok(Self {
            analytics,
            analytics_addr,
            crm_addr,
            inventory_addr,
        })
    }
}

/// Starts Apache Kafka with the topics created as in production (data topics compacted).
async fn start_apache(
    topics: &TopicsConfig,
    options: BrokerOptions,
) -> anyhow::Result<ApacheKafka> {
    let k = tokio::task::spawn_blocking(move || ApacheKafka::start(&options))
        .await
        .context("starting Apache Kafka")??;
    eprintln!(
        "bench: Apache Kafka {KAFKA_VERSION} served in {:.1} s",
        k.started_in.as_secs_f64()
    );
    let data = [
        topics.customer_topic.clone(),
        topics.inventory_topic.clone(),
    ];
    let plan = TopicPlan {
        topics: topics
            .all()
            .into_iter()
            .map(|mut t| {
                t.compacted |= data.contains(&t.name);
                t
            })
            .collect(),
        replication: 1,
        co_partitioned: Vec::new(),
    };
    pipeline_core::topics::ensure_topics(&KafkaConfig::new(k.bootstrap()), &plan).await?;
    Ok(k)
}
