//! `pipeline bench rebalance`: how long the consumer group takes to settle after a member
//! joins, leaves (SIGTERM) or is killed (`kill -9`), under the classic protocol and under
//! KIP-848, on one Apache Kafka broker in one run so the figures are comparable.
//!
//! Two consumers first read a small export to its end, so every partition has committed
//! progress; then each round starts a third member, stops it, starts it again and kills it. A
//! settle is timed from the event to the moment every live member reports its even share in
//! `pipeline_consumer_assigned_partitions`; `kafka-consumer-groups --describe --members
//! --verbose` then proves each member holds the same partition numbers of both topics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pipeline_core::kafka::KafkaConfig;
use pipeline_core::lag::LagProbe;
use pipeline_core::metrics::{secs, sum_of};
use pipeline_core::topics::TopicsConfig;
use pipeline_kit::apache_kafka::{run_tool, BrokerOptions};
use pipeline_kit::redis_server::{free_port, RedisServer};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use pipeline_kit::process::ChildProcess;

use super::progress::{fetch_all, wait_lag_zero, wait_producer};
use super::{child, STOP_GRACE};

/// Settings of `pipeline bench rebalance`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebalanceConfig {
    /// The protocols to time, one after the other on the same broker.
    #[arg(long, value_delimiter = ',', default_values = ["classic", "consumer"])]
    pub group_protocol: Vec<consumer::config::GroupProtocol>,
    /// Rounds per protocol (each: a join, a leave, a join, a kill).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Partitions per data topic; a multiple of 6 splits evenly over two and three members.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Customers and products exported before the rounds.
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    /// Give up after this many seconds per settle.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// A broker setting (`key=value`, repeatable) on top of the defaults compose also runs
    /// with, e.g. `group.consumer.heartbeat.interval.ms=2500`.
    #[arg(long = "broker-setting", value_parser = parse_setting)]
    pub broker_settings: Vec<(String, String)>,
    /// Print the result as JSON (progress always goes to stderr).
    #[arg(long)]
    pub json: bool,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Seconds per event of one protocol.
#[derive(Debug, Clone, Serialize)]
pub struct ProtocolTimes {
    /// Two members subscribing until both hold their share.
    pub form_s: f64,
    /// A third member's process start until all three hold their share.
    pub join_s: Vec<f64>,
    /// SIGTERM to the third member until the other two hold their share.
    pub leave_s: Vec<f64>,
    /// `kill -9` of the third member until the other two hold their share.
    pub kill_s: Vec<f64>,
    pub join_median_s: f64,
    pub leave_median_s: f64,
    pub kill_median_s: f64,
    /// The fewest partitions (of all of both topics) the live members held together at any
    /// sample while settling: what a rebalance stops. The classic protocol revokes everything
    /// from everyone; KIP-848 moves only what changes owner.
    pub join_fewest_held: i64,
    pub leave_fewest_held: i64,
    pub kill_fewest_held: i64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct RebalanceReport {
    pub kafka: serde_json::Value,
    pub partitions: i32,
    pub rounds: usize,
    /// The settings given with `--broker-setting`.
    pub broker_settings: BTreeMap<String, String>,
    pub protocols: BTreeMap<String, ProtocolTimes>,
    /// Every settled assignment was co-partitioned (checked with `kafka-consumer-groups`).
    pub success: bool,
}

/// One protocol's group of consumer processes.
struct Group {
    name: String,
    protocol: consumer::config::GroupProtocol,
    env: Vec<(&'static str, String)>,
    members: Vec<(ChildProcess, String)>,
    total: i64,
    timeout: Duration,
    bootstrap: String,
}

impl Group {
    fn spawn_member(&mut self) -> anyhow::Result<()> {
        let port = free_port()?;
        let mut env = self.env.clone();
        env.push(("METRICS_ADDR", format!("127.0.0.1:{port}")));
        let name = format!("{}-{}", self.name, self.members.len());
        let child = child::spawn(&name, &["consumer"], &env)?;
        self.members
            .push((child, format!("http://127.0.0.1:{port}/metrics")));
        Ok(())
    }

    /// Waits until every member holds `total / members` partitions; the time since `since` and
    /// the fewest partitions the members held together at any sample meanwhile.
    async fn settle(&self, since: Instant) -> anyhow::Result<(f64, i64)> {
        let urls: Vec<String> = self.members.iter().map(|(_, u)| u.clone()).collect();
        let share = self.total / urls.len() as i64;
        let client = reqwest::Client::new();
        let mut fewest = self.total;
        loop {
            let texts = fetch_all(&client, &urls).await;
            let held: Vec<i64> = texts
                .iter()
                .map(|t| sum_of(t, "pipeline_consumer_assigned_partitions") as i64)
                .collect();
            fewest = fewest.min(held.iter().sum());
            if held.len() == urls.len() && held.iter().all(|&h| h == share) {
                return Ok((secs(since.elapsed()), fewest));
            }
            if since.elapsed() > self.timeout {
                bail!(
                    "{} ({:?}): members hold {held:?}, not {share} each, after {:?}",
                    self.name,
                    self.protocol,
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the coordinator's view of the group is co-partitioned with one member per
    /// share.
    async fn co_partitioned(&self) -> anyhow::Result<bool> {
        let (bootstrap, group) = (self.bootstrap.clone(), self.name.clone());
        let out = tokio::task::spawn_blocking(move || {
            run_tool(
                "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                &[
                    "--bootstrap-server",
                    &bootstrap,
                    "--describe",
                    "--group",
                    &group,
                    "--members",
                    "--verbose",
                ],
            )
        })
        .await??;
        let members = assignments(&out);
        let ok = members.len() == self.members.len()
            && members
                .iter()
                .all(|m| m.len() == 2 && m.values().collect::<BTreeSet<_>>().len() == 1);
        tracing::debug!(%out, ok, "group described");
        if !ok {
            eprintln!("bench: not co-partitioned:\n{out}");
        }
        Ok(ok)
    }
}

/// The assignment of each member line of `kafka-consumer-groups --describe --members
/// --verbose`: topic → partition numbers, from the line's first assignment column (KIP-848
/// groups print the target assignment after it).
fn assignments(describe: &str) -> Vec<BTreeMap<String, BTreeSet<i32>>> {
    describe
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("GROUP"))
        .filter_map(|line| line.split_whitespace().find_map(assignment))
        .collect()
}

/// One assignment column: `customer_data:0,1;inventory_data:0,1` (Kafka 4.x) or
/// `customer_data(0,1),inventory_data(0,1)` (older tools). None for any other field.
fn assignment(field: &str) -> Option<BTreeMap<String, BTreeSet<i32>>> {
    let parts: Vec<(&str, &str)> = if field.ends_with(')') {
        field
            .split("),")
            .map(|p| p.trim_end_matches(')').split_once('('))
            .collect::<Option<_>>()?
    } else {
        field
            .split(';')
            .map(|p| p.split_once(':'))
            .collect::<Option<_>>()?
    };
    let mut member = BTreeMap::new();
    for (topic, list) in parts {
        if topic.is_empty() || topic.starts_with('/') {
            return None;
        }
        let partitions = list
            .split(',')
            .map(|p| p.parse().ok())
            .collect::<Option<BTreeSet<i32>>>()?;
        member.insert(topic.to_owned(), partitions);
    }
    Some(member)
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => ((s[n / 2 - 1] + s[n / 2]) * 500.0).round() / 1000.0,
    }
}

/// Runs the benchmark.
pub async fn run(config: RebalanceConfig) -> anyhow::Result<RebalanceReport> {
    if config.partitions % 6 != 0 {
        bail!("--partitions must be a multiple of 6 (an even share for two and three members)");
    }
    let topics = TopicsConfig {
        partitions: config.partitions,
        ..TopicsConfig::default()
    };
    let broker = BrokerOptions {
        port: None,
        overrides: config.broker_settings.clone(),
    };
    let kafka = super::start_apache(&topics, broker).await?;
    let bootstrap = kafka.bootstrap();
    let redis = RedisServer::spawn().context("the bench needs redis-server")?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mocks = super::BenchMocks::start(config.records, config.records, &shutdown).await?;
    let a = mocks.analytics_addr;
    let sources = [mocks.crm_addr, mocks.inventory_addr];
    let common = vec![
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.clone()),
        ("TOPIC_PARTITIONS", config.partitions.to_string()),
        ("CREATE_TOPICS", "false".to_owned()),
    ];
    let mut producer_env = common.clone();
    producer_env.extend([
        ("CRM_URL", format!("http://{}", sources[0])),
        ("INVENTORY_URL", format!("http://{}", sources[1])),
        ("METRICS_ADDR", format!("127.0.0.1:{}", free_port()?)),
    ]);
    let timeout = Duration::from_secs(config.timeout_s);
    let producer = child::spawn("producer", &["producer", "--once"], &producer_env)?;
    wait_producer(producer, timeout).await?;

    let mut protocols = BTreeMap::new();
    let mut success = true;
    for &protocol in &config.group_protocol {
        let name = format!("rebalance-{}", protocol.as_str());
        let mut env = common.clone();
        env.extend([
            ("REDIS_URL", redis.url()),
            ("REDIS_KEY_PREFIX", format!("{name}:")),
            ("ANALYTICS_URL", format!("http://{a}")),
            ("CONSUMER_GROUP", name.clone()),
            ("KAFKA_GROUP_PROTOCOL", protocol.as_str().to_owned()),
        ]);
        let mut group = Group {
            name: name.clone(),
            protocol,
            env,
            members: Vec::new(),
            total: 2 * i64::from(config.partitions),
            timeout,
            bootstrap: bootstrap.clone(),
        };
        let formed = Instant::now();
        group.spawn_member()?;
        group.spawn_member()?;
        let (form_s, _) = group.settle(formed).await?;
        let probe = Arc::new(LagProbe::new(
            &KafkaConfig::new(&bootstrap),
            &name,
            &[&topics.customer_topic, &topics.inventory_topic],
        )?);
        wait_lag_zero(&probe, Instant::now(), timeout).await?;
        eprintln!("bench: {name}: formed in {form_s:.2} s, export read");
        let (mut join_s, mut leave_s, mut kill_s) = (Vec::new(), Vec::new(), Vec::new());
        let total = group.total;
        let (mut join_fewest, mut leave_fewest, mut kill_fewest) = (total, total, total);
        for round in 0..config.rounds {
            for leaving in [Leave::Sigterm, Leave::Kill9] {
                let t = Instant::now();
                group.spawn_member()?;
                let (s, fewest) = group.settle(t).await?;
                join_s.push(s);
                join_fewest = join_fewest.min(fewest);
                success &= group.co_partitioned().await?;
                let (mut third, _) = group.members.pop().context("the third member")?;
                let t = Instant::now();
                match leaving {
                    Leave::Sigterm => third.sigterm()?,
                    Leave::Kill9 => third.kill9(),
                }
                let (settled, fewest) = group.settle(t).await?;
                match leaving {
                    Leave::Sigterm => {
                        leave_s.push(settled);
                        leave_fewest = leave_fewest.min(fewest);
                    }
                    Leave::Kill9 => {
                        kill_s.push(settled);
                        kill_fewest = kill_fewest.min(fewest);
                    }
                }
                success &= group.co_partitioned().await?;
                tokio::task::block_in_place(|| third.terminate(STOP_GRACE));
            }
            eprintln!(
                "bench: {name}: round {}: join {:?} leave {:?} kill {:?}",
                round + 1,
                &join_s[join_s.len() - 2..],
                leave_s.last(),
                kill_s.last()
            );
        }
        for (m, _) in &mut group.members {
            tokio::task::block_in_place(|| m.terminate(STOP_GRACE));
        }
        protocols.insert(
            protocol.as_str().to_owned(),
            ProtocolTimes {
                form_s,
                join_median_s: median(&join_s),
                leave_median_s: median(&leave_s),
                kill_median_s: median(&kill_s),
                join_fewest_held: join_fewest,
                leave_fewest_held: leave_fewest,
                kill_fewest_held: kill_fewest,
                join_s,
                leave_s,
                kill_s,
            },
        );
    }
    Ok(RebalanceReport {
        kafka: pipeline_kit::stack::describe_apache(),
        partitions: config.partitions,
        rounds: config.rounds,
        broker_settings: config.broker_settings.into_iter().collect(),
        protocols,
        success,
    })
}

/// How the third member goes.
#[derive(Clone, Copy)]
enum Leave {
    Sigterm,
    Kill9,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_members_assignment_from_the_describe_output() {
        let kip848 = "\nGROUP  CONSUMER-ID  HOST  CLIENT-ID  #PARTITIONS  CURRENT-EPOCH  CURRENT-ASSIGNMENT  TARGET-EPOCH  TARGET-ASSIGNMENT\n\
            g  BRtK  /127.0.0.1  rdkafka  4  5  customer_data:0,1;inventory_data:0,1  5  customer_data:0,1;inventory_data:0,1\n\
            g  Tn8g  /0:0:0:0:0:0:0:1  rdkafka  4  5  customer_data:4,5;inventory_data:2,3  5  -\n";
        let members = assignments(kip848);
        assert_eq!(members.len(), 2);
        assert_eq!(members[0]["customer_data"], BTreeSet::from([0, 1]));
        assert_eq!(members[0]["inventory_data"], BTreeSet::from([0, 1]));
        assert_eq!(members[1]["customer_data"], BTreeSet::from([4, 5]));
        assert_eq!(members[1]["inventory_data"], BTreeSet::from([2, 3]));
        let classic =
            "g  rdkafka-1  /127.0.0.1  rdkafka  4  customer_data(0,1),inventory_data(0,1)\n";
        assert_eq!(
            assignments(classic)[0]["inventory_data"],
            BTreeSet::from([0, 1])
        );
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
