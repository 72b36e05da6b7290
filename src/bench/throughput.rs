//! `pipeline bench`: the throughput benchmark. It starts Apache Kafka, a real `redis-server`
//! and the mocks, runs the consumers and the producer as separate processes (so
//! their memory is their own), and prints one JSON object: the pipeline's figures next to two
//! baselines measured in the same run on the same broker and Redis (a bare rdkafka consumer
//! reading the same topics, pipelined Redis SETs).
//!
//! Phases: baseline Redis → consumers join → first cycle (export and end to end) → a re-poll of
//! unchanged data by a fresh producer process (it sends the page ETags the first one saved in
//! the source-state topic, so unchanged pages are 304s; with `--repoll-full-export` it ignores
//! them, re-publishes every record, and the consumers must recognise each as unchanged) →
//! baseline consumer over the topics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::baselines::{consume_baseline, redis_baseline, redis_commandstats, RedisCommandStat};
use super::progress::{
    consumer_time, evicted_messages, fetch_all, wait_assigned, wait_delivered, wait_lag_zero,
    wait_producer,
};
use super::{child, STOP_GRACE};
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::lag::LagProbe;
use pipeline_core::memory::peak_rss_mb;
use pipeline_core::metrics::{secs, sum_of};
use pipeline_core::topics::TopicsConfig;
use pipeline_kit::redis_server::{free_port, RedisServer};
use pipeline_kit::stack::{describe_apache, KafkaKind};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Settings of `pipeline bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchConfig {
    /// Customers served by the mock CRM.
    #[arg(long, default_value_t = 1_000_000)]
    pub customers: u64,
    /// Products served by the mock Inventory.
    #[arg(long, default_value_t = 1_000_000)]
    pub products: u64,
    /// Consumer processes (one consumer-group member each). Three, as `docker-compose.yml`
    /// deploys: each worker handles one batch at a time, and a third keeps the two cores busy
    /// while the others wait on Redis or Analytics.
    #[arg(long, default_value_t = 3)]
    pub consumers: usize,
    /// Merged records per Analytics POST.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Partitions per data topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Which Kafka to run (Apache Kafka as a child process, the only one).
    #[arg(long, value_enum, default_value_t = KafkaKind::Apache)]
    pub kafka: KafkaKind,
    /// Print the result as JSON (progress always goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds per phase.
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// Run the re-poll's producer with `--full-export`: it ignores the saved page ETags and
    /// re-publishes every record (the cost of a re-export the consumers must absorb).
    #[arg(long)]
    pub repoll_full_export: bool,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The Kafka it ran on: `{"name", "version"}`.
    pub kafka: serde_json::Value,
    pub customers: u64,
    pub products: u64,
    pub consumers: usize,
    pub partitions: i32,
    pub batch_size: usize,
    /// Records published by the first cycle (both sources).
    pub published: u64,
    /// Producer: fetch + publish of both sources, all pages, every record acknowledged.
    pub export_s: f64,
    /// First poll → last merged record acknowledged by the Analytics mock.
    pub end_to_end_s: f64,
    pub merged_per_s: f64,
    /// Input messages (both topics) per second of `end_to_end_s`.
    pub input_msgs_per_s: f64,
    /// A fresh producer re-polls unchanged data until the consumers have processed every
    /// re-published message.
    pub repoll_s: f64,
    /// Records the re-poll published (0 when every page was a 304).
    pub repoll_published: u64,
    /// Records Analytics received during the re-poll (must be 0).
    pub repoll_delivered: u64,
    pub delivered_unique: u64,
    pub duplicates_received: u64,
    pub dlq: i64,
    pub consumer_peak_rss_mb: f64,
    pub producer_peak_rss_mb: f64,
    /// The broker JVM's peak RSS (0 with the in-process mock).
    pub broker_peak_rss_mb: f64,
    /// A bare rdkafka consumer reading the same topics from the same broker.
    pub raw_consume_msgs_per_s: f64,
    /// Pipelined `SET`s against the same Redis.
    pub raw_redis_ops_per_s: f64,
    /// Where the consumers' time went (sums over all consumers, seconds): batches, Redis round
    /// trips by operation, Analytics POSTs; from their own `/metrics`.
    pub consumer_time_s: BTreeMap<String, f64>,
    /// Join states the consumers wrote to Redis over both cycles: one per id when both sides
    /// of an id were joined in the same batch, two when they arrived apart.
    pub join_states_written: u64,
    /// Topic-partitions the consumers paused because their fetch ran ahead of the other side's
    /// (see `consumer::pairing`), over both cycles.
    pub sides_paused: u64,
    /// CPU seconds (user + system) of each part over the whole run: consumers (sum), producer
    /// (both cycles), redis-server, the Kafka broker (its JVM; in this process with the mock),
    /// and this process (mocks, Analytics mock).
    pub cpu_s: BTreeMap<String, f64>,
    /// Redis's own accounting of the first cycle (`INFO commandstats`, reset after the
    /// baseline): per command, its calls and the seconds Redis spent executing them (socket
    /// reads, parsing and replies not included). Says which of the per-id operations Redis's
    /// single thread spends its time on.
    pub redis_commands: BTreeMap<String, RedisCommandStat>,
    /// Messages the mock broker dropped from the start of its logs (0: nothing evicted).
    pub broker_evicted_msgs: i64,
    /// Every correctness check held (all ids delivered once, no duplicates, nothing re-sent on
    /// the re-poll, nothing dead-lettered, nothing evicted unread).
    pub success: bool,
}

/// Runs the benchmark.
pub async fn run(config: BenchConfig) -> anyhow::Result<BenchReport> {
    let topics = TopicsConfig {
        partitions: config.partitions,
        ..TopicsConfig::default()
    };
    eprintln!(
        "bench: {} customers x {} products, {} consumers, {} partitions",
        config.customers, config.products, config.consumers, config.partitions
    );
    let kafka = super::start_apache(&topics, Default::default()).await?;
    let bootstrap = kafka.bootstrap();
    let broker_pid = kafka.pid();
    let redis = RedisServer::spawn().context("the bench needs redis-server")?;
    // The bench's own connection: the baseline, then Redis's accounting of the first cycle.
    let mut redis_conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to the bench's redis-server")?;
    let raw_redis_ops_per_s = redis_baseline(&mut redis_conn).await?;
    eprintln!("bench: redis baseline {raw_redis_ops_per_s:.0} pipelined SETs/s");

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mocks = super::BenchMocks::start(config.customers, config.products, &shutdown).await?;
    let (analytics, a, crm, inv) = (
        &mocks.analytics,
        mocks.analytics_addr,
        mocks.crm_addr,
        mocks.inventory_addr,
    );

    let common = vec![
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.clone()),
        ("TOPIC_PARTITIONS", config.partitions.to_string()),
        ("CREATE_TOPICS", "false".to_owned()),
    ];
    let mut consumers = Vec::new();
    let mut metrics_urls = Vec::new();
    for i in 0..config.consumers {
        let port = free_port()?;
        let mut env = common.clone();
        env.extend([
            ("REDIS_URL", redis.url()),
            ("ANALYTICS_URL", format!("http://{a}")),
            ("BATCH_SIZE", config.batch_size.to_string()),
            ("METRICS_ADDR", format!("127.0.0.1:{port}")),
        ]);
        consumers.push(child::spawn(&format!("consumer-{i}"), &["consumer"], &env)?);
        metrics_urls.push(format!("http://127.0.0.1:{port}/metrics"));
    }
    let timeout = Duration::from_secs(config.timeout_s);
    wait_assigned(&metrics_urls, 2 * config.partitions as i64, timeout).await?;
    eprintln!("bench: {} consumers joined the group", config.consumers);

    let mut producer_env = common.clone();
    producer_env.extend([
        ("CRM_URL", format!("http://{crm}")),
        ("INVENTORY_URL", format!("http://{inv}")),
        ("METRICS_ADDR", format!("127.0.0.1:{}", free_port()?)),
    ]);
    let probe = Arc::new(LagProbe::new(
        &KafkaConfig::new(&bootstrap),
        "analytics-pipeline",
        &[&topics.customer_topic, &topics.inventory_topic],
    )?);
    let expected = config.customers.min(config.products);

    // First cycle: export, then everything delivered.
    let started = Instant::now();
    let first = child::spawn("producer", &["producer", "--once"], &producer_env)?;
    let (first_report, export) = wait_producer(first, timeout).await?;
    eprintln!(
        "bench: exported {} records in {:.2} s",
        first_report.published,
        export.as_secs_f64()
    );
    let end_to_end = wait_delivered(analytics, expected, started, timeout).await?;
    wait_lag_zero(&probe, started, timeout).await?;
    let after_first = analytics.stats();
    let redis_commands = redis_commandstats(&mut redis_conn).await?;
    eprintln!(
        "bench: {} merged records delivered in {:.2} s",
        after_first.unique_keys,
        end_to_end.as_secs_f64()
    );

    // Re-poll of unchanged data by a fresh producer: nothing may be delivered.
    let repoll_started = Instant::now();
    let mut second_args = vec!["producer", "--once"];
    if config.repoll_full_export {
        second_args.push("--full-export");
    }
    let second = child::spawn("producer", &second_args, &producer_env)?;
    let (second_report, second_export) = wait_producer(second, timeout).await?;
    eprintln!(
        "bench: re-poll exported {} records in {:.2} s",
        second_report.published,
        second_export.as_secs_f64()
    );
    wait_lag_zero(&probe, repoll_started, timeout).await?;
    let repoll = repoll_started.elapsed();
    let after_repoll = analytics.stats();
    eprintln!("bench: re-poll processed in {:.2} s", repoll.as_secs_f64());

    let consumer_metrics = fetch_all(&reqwest::Client::new(), &metrics_urls).await;
    let consumer_time_s = consumer_time(&consumer_metrics);
    let consumer_total = |name: &str| {
        consumer_metrics
            .iter()
            .map(|text| sum_of(text, name))
            .sum::<f64>() as u64
    };
    let join_states_written = consumer_total("pipeline_consumer_join_states_written_total");
    let sides_paused = consumer_total("pipeline_consumer_sides_paused_total");
    let cpu = |pid: Option<u32>| pipeline_core::memory::cpu_seconds(pid).unwrap_or(0.0);
    let mut cpu_s = BTreeMap::new();
    cpu_s.insert(
        "consumers".to_owned(),
        consumers.iter().map(|c| cpu(Some(c.pid()))).sum::<f64>(),
    );
    cpu_s.insert(
        "producer".to_owned(),
        first_report.cpu_s.unwrap_or(0.0) + second_report.cpu_s.unwrap_or(0.0),
    );
    cpu_s.insert("redis".to_owned(), cpu(Some(redis.pid())));
    cpu_s.insert("broker".to_owned(), cpu(broker_pid));
    cpu_s.insert("mocks_host".to_owned(), cpu(None));
    let broker_peak_rss_mb = broker_pid.and_then(|p| peak_rss_mb(Some(p))).unwrap_or(0.0);
    cpu_s.insert("wall_s".to_owned(), started.elapsed().as_secs_f64());
    for v in cpu_s.values_mut() {
        *v = (*v * 100.0).round() / 100.0;
    }
    let consumer_peak = consumers
        .iter()
        .filter_map(|c| peak_rss_mb(Some(c.pid())))
        .fold(0.0, f64::max);
    for c in &mut consumers {
        tokio::task::block_in_place(|| c.terminate(STOP_GRACE));
    }
    let evicted = evicted_messages(&probe, &[&topics.customer_topic, &topics.inventory_topic])?;
    let raw_consume = consume_baseline(
        &bootstrap,
        &[&topics.customer_topic, &topics.inventory_topic],
    )
    .await?;
    eprintln!("bench: raw consume baseline {raw_consume:.0} msgs/s");
    let dlq = {
        let p = probe.clone();
        let t = topics.dlq_topic.clone();
        tokio::task::spawn_blocking(move || p.topic_size(&t, Duration::from_secs(5))).await??
    };

    let repoll_delivered = after_repoll.records_received - after_first.records_received;
    let success = after_repoll.unique_keys == expected
        && after_repoll.unique_ids == expected
        && after_repoll.duplicates == 0
        && repoll_delivered == 0
        && dlq == 0
        && evicted == 0;
    Ok(BenchReport {
        kafka: describe_apache(),
        customers: config.customers,
        products: config.products,
        consumers: config.consumers,
        partitions: config.partitions,
        batch_size: config.batch_size,
        published: first_report.published,
        export_s: secs(export),
        end_to_end_s: secs(end_to_end),
        merged_per_s: (expected as f64 / end_to_end.as_secs_f64()).round(),
        input_msgs_per_s: (first_report.published as f64 / end_to_end.as_secs_f64()).round(),
        repoll_s: secs(repoll),
        repoll_published: second_report.published,
        repoll_delivered,
        delivered_unique: after_repoll.unique_keys,
        duplicates_received: after_repoll.duplicates,
        dlq,
        consumer_peak_rss_mb: consumer_peak,
        producer_peak_rss_mb: first_report
            .peak_rss_mb
            .unwrap_or(0.0)
            .max(second_report.peak_rss_mb.unwrap_or(0.0)),
        broker_peak_rss_mb,
        raw_consume_msgs_per_s: raw_consume.round(),
        raw_redis_ops_per_s: raw_redis_ops_per_s.round(),
        consumer_time_s,
        join_states_written,
        sides_paused,
        cpu_s,
        redis_commands,
        broker_evicted_msgs: evicted,
        success,
    })
}
