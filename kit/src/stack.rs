//! The embedded stack: Apache Kafka as a child process, Redis, a mock for every source of the pipeline that asks for one, the Analytics
//! mock, N consumer workers and the operations endpoint. The producer is driven by the caller
//! (`up` runs it on a schedule or once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apache_kafka::{ApacheKafka, BrokerOptions, KAFKA_VERSION};
use crate::redis_server::RedisServer;
use anyhow::Context;
use consumer::ConsumerConfig;
use mocks::analytics::{AnalyticsMock, AnalyticsMockConfig};
use mocks::faults::FaultConfig;
use mocks::sources::{Entity, SourceMock, SourceMockConfig};
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::lag::LagProbe;
use pipeline_core::metrics::{self, Readiness};
use pipeline_core::pipeline_config::{MockSourceConfig, PipelineArg, PipelineConfig, TwoSources};
use pipeline_core::topics::TopicsConfig;
use producer::ProducerConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Shape of the embedded stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Customers served by the mock CRM (ids 1..=N).
    pub customers: u64,
    /// Products served by the mock Inventory (ids 1..=M).
    pub products: u64,
    /// Consumer workers.
    pub consumers: usize,
    /// Partitions of each data topic.
    pub partitions: i32,
    /// Where to serve `/metrics`, `/health`, `/ready` (None: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// External Redis; None spawns a `redis-server`.
    pub redis_url: Option<String>,
    /// Merged records per Analytics POST.
    pub batch_size: usize,
    /// Records per source page.
    pub page_size: u64,
    /// The broker's client port (e.g. 9092 for kcat); None: a free one.
    pub kafka_port: Option<u16>,
    /// The pipeline to run; None: the built-in CRM + Inventory one with `customers` and
    /// `products` generated records. Sources with a `mock` table are served by generated mocks.
    pub pipeline: Option<PipelineConfig>,
    /// Which Kafka to run.
    pub kafka: KafkaKind,
}

/// The Kafka a stack runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KafkaKind {
    /// Apache Kafka from the jars `scripts/kafka.sh` fetched, as a child process (needs Java).
    /// The only one: librdkafka's in-process mock, once the zero-install choice, had no
    /// compaction, dropped data beyond 5 MiB per partition and a simplified group coordinator.
    #[default]
    Apache,
}

/// `{"name": "Apache Kafka", "version"}`, as every JSON summary reports the Kafka it ran on.
pub fn describe_apache() -> serde_json::Value {
    serde_json::json!({"name": "Apache Kafka", "version": KAFKA_VERSION})
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            customers: 1000,
            products: 1000,
            consumers: 2,
            partitions: 6,
            metrics_addr: None,
            redis_url: None,
            batch_size: 500,
            page_size: 1000,
            kafka_port: None,
            pipeline: None,
            kafka: KafkaKind::default(),
        }
    }
}

impl StackConfig {
    /// The default topic names with this stack's partition count.
    fn topics(&self) -> TopicsConfig {
        TopicsConfig {
            partitions: self.partitions,
            ..TopicsConfig::default()
        }
    }

    /// The pipeline this stack runs, before its mocks are given addresses.
    fn pipeline(&self) -> PipelineConfig {
        if let Some(p) = &self.pipeline {
            return p.clone();
        }
        let topics = self.topics();
        let mut p = PipelineConfig::two_sources(&TwoSources {
            crm_url: "http://127.0.0.1:1",
            inventory_url: "http://127.0.0.1:1",
            topics: &topics,
            page_size: self.page_size,
            interval_s: 60,
            timeout_ms: 10_000,
            max_attempts: 5,
        });
        for (source, (entity, records)) in p
            .sources
            .iter_mut()
            .zip([("customers", self.customers), ("products", self.products)])
        {
            source.mock = Some(MockSourceConfig {
                entity: entity.into(),
                records,
            });
        }
        p
    }
}

/// A running embedded stack. `stop` ends the workers gracefully; dropping it without `stop`
/// aborts the workers, cancels the mocks' and the metrics servers, and stops the broker and
/// Redis it owns.
pub struct Stack {
    pub config: StackConfig,
    pub kafka: ApacheKafka,
    /// `host:port` of `kafka`.
    bootstrap: String,
    pub redis_url: String,
    /// The `redis-server` this stack spawned (None with an external `REDIS_URL`).
    pub redis_server: Option<RedisServer>,
    pub analytics: AnalyticsMock,
    /// The source mocks, by source name.
    pub mocks: Vec<(String, SourceMock)>,
    pub analytics_url: String,
    /// The pipeline with its mocked sources pointing at their mocks.
    pub pipeline: PipelineConfig,
    pub metrics_addr: Option<SocketAddr>,
    pub ready: Readiness,
    shutdown: CancellationToken,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Stack {
    /// Starts broker, Redis, mocks, the metrics endpoint and the consumer workers.
    pub async fn start(config: StackConfig) -> anyhow::Result<Self> {
        let mut pipeline = config.pipeline();
        pipeline.validate()?;
        let topics = config.topics();
        // The topics a real cluster gets for this pipeline (`ensure_topics` on start-up).
        let plan = pipeline.topic_plan(&topics);
        let options = BrokerOptions {
            port: config.kafka_port,
            ..BrokerOptions::default()
        };
        let kafka = tokio::task::spawn_blocking(move || ApacheKafka::start(&options))
            .await
            .context("starting Apache Kafka")??;
        let bootstrap = kafka.bootstrap();
        pipeline_core::topics::ensure_topics(&KafkaConfig::new(&bootstrap), &plan).await?;
        let (redis, redis_url) = match &config.redis_url {
            Some(url) => (None, url.clone()),
            None => {
                let r = RedisServer::spawn()
                    .context("no REDIS_URL given and redis-server could not be started")?;
                let url = r.url();
                (Some(r), url)
            }
        };
        let shutdown = CancellationToken::new();
        let local: SocketAddr = ([127, 0, 0, 1], 0).into();
        let analytics = AnalyticsMock::new(&AnalyticsMockConfig::default());
        let a = mocks::spawn(local, analytics.router(), shutdown.clone()).await?;
        let mut mocks = Vec::new();
        for source in &mut pipeline.sources {
            let Some(m) = &source.mock else { continue };
            let entity = Entity::parse(&m.entity).with_context(|| {
                format!("source {}: unknown mock entity {:?}", source.name, m.entity)
            })?;
            let mock = SourceMock::new(
                entity,
                &SourceMockConfig {
                    records: m.records,
                    faults: FaultConfig::default(),
                },
            )
            .with_path(&source.path);
            let addr = mocks::spawn(local, mock.router(), shutdown.clone()).await?;
            source.base_url = format!("http://{addr}");
            mocks.push((source.name.clone(), mock));
        }
        let ready = Readiness::default();
        let metrics_addr = match config.metrics_addr {
            Some(addr) => Some(metrics::serve(addr, ready.clone(), shutdown.clone()).await?),
            None => None,
        };
        let mut stack = Self {
            kafka,
            bootstrap,
            redis_url,
            redis_server: redis,
            analytics,
            mocks,
            analytics_url: format!("http://{a}"),
            pipeline,
            metrics_addr,
            ready,
            shutdown,
            workers: Vec::new(),
            config,
        };
        for _ in 0..stack.config.consumers {
            stack.spawn_consumer(stack.consumer_config());
        }
        Ok(stack)
    }

    /// The mock serving source `name`.
    pub fn mock(&self, name: &str) -> Option<&SourceMock> {
        self.mocks.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn topics(&self) -> TopicsConfig {
        self.config.topics()
    }

    /// Producer settings pointing at this stack.
    pub fn producer_config(&self) -> ProducerConfig {
        let mut c = ProducerConfig::new(self.bootstrap_servers(), "http://unused", "http://unused");
        c.topics = self.topics();
        c.page_size = self.config.page_size;
        c.pipeline = PipelineArg::given(self.pipeline.clone());
        c
    }

    /// Consumer settings pointing at this stack.
    pub fn consumer_config(&self) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(
            self.bootstrap_servers(),
            &self.redis_url,
            &self.analytics_url,
        );
        c.topics = self.topics();
        c.pipeline = PipelineArg::given(self.pipeline.clone());
        c.batch_size = self.config.batch_size;
        c
    }

    /// Starts one more consumer worker in this process; returns its index.
    pub fn spawn_consumer(&mut self, config: ConsumerConfig) -> usize {
        let (ready, token) = (self.ready.clone(), self.shutdown.child_token());
        self.workers.push(tokio::spawn(async move {
            let r = consumer::run_with(config, ready, token).await;
            if let Err(e) = &r {
                tracing::error!(error = format!("{e:#}"), "consumer worker failed");
            }
            r
        }));
        self.workers.len() - 1
    }

    /// Aborts worker `i` mid-flight, as a crash would (no graceful shutdown of its batch).
    pub fn kill_consumer(&mut self, i: usize) {
        if let Some(w) = self.workers.get(i) {
            w.abort();
        }
    }

    /// A lag probe for the consumer group.
    pub fn lag_probe(&self) -> anyhow::Result<LagProbe> {
        LagProbe::new(
            &KafkaConfig::new(self.bootstrap_servers()),
            &self.consumer_config().group_id,
            &self.pipeline.join_topics(),
        )
    }

    /// Waits until the consumer group has committed everything published (lag 0).
    pub async fn wait_caught_up(
        &self,
        timeout: Duration,
        mut on_tick: impl FnMut(i64),
    ) -> anyhow::Result<()> {
        let probe = Arc::new(self.lag_probe()?);
        let deadline = Instant::now() + timeout;
        loop {
            let p = probe.clone();
            let lag =
                tokio::task::spawn_blocking(move || p.total(Duration::from_secs(5))).await??;
            on_tick(lag);
            if lag == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "consumers still {lag} message(s) behind after {} s",
                    timeout.as_secs()
                );
            }
            if !self.workers.is_empty() && self.workers.iter().all(|w| w.is_finished()) {
                anyhow::bail!("every consumer worker has stopped");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Records in the DLQ topic.
    pub async fn dlq_size(&self) -> anyhow::Result<i64> {
        let probe = self.lag_probe()?;
        let topic = self.topics().dlq_topic;
        tokio::task::spawn_blocking(move || probe.topic_size(&topic, Duration::from_secs(5)))
            .await?
    }

    /// Stops the workers gracefully (they commit their offsets) and then everything else.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for w in self.workers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for w in &self.workers {
            w.abort();
        }
    }
}
