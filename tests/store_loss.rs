//! Process-level tests of the rebuild after Redis comes back empty (ARCHITECTURE.md, "Rebuilding after a Redis loss").
//!
//! A new owner of a partition must rebuild every side of it, whether or not that side brings
//! messages, and a rebuild cut short (a rebalance, a `kill -9`, another Redis loss) must be
//! redone by whoever owns the partition next. The chaos test mixes those faults, and broker
//! restarts, at random under a printed seed; `CHAOS_SEED=<n>` reruns one.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::procs::{get_json, Cluster};
use common::{wait_for, DEADLINE};
use pipeline_kit::apache_kafka::BrokerOptions;
use rand::{Rng, SeedableRng};

/// The latest delivered record of every id, from the Analytics mock.
async fn latest(c: &Cluster) -> HashMap<String, serde_json::Value> {
    let body = get_json(&format!("{}/analytics/data?latest=true", c.analytics_url))
        .await
        .unwrap_or_default();
    body["records"]
        .as_array()
        .map(|records| {
            records
                .iter()
                .map(|r| (json_id(&r["id"]), r.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn json_id(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Waits until all `n` ids are delivered, each id of `names` on its view with that customer
/// name, and the group has committed everything; then checks the ledger: one key per view and
/// nothing dead-lettered.
async fn settled(c: &Cluster, n: u64, names: &BTreeMap<String, String>) {
    let waiting = std::time::Instant::now();
    common::wait_until_paced(
        "the pipeline to settle",
        Duration::from_millis(200),
        || async {
            let views = latest(c).await;
            let stale: Vec<&String> = names
                .iter()
                .filter(|(id, name)| {
                    views.get(*id).map(|r| &r["customer"]["name"]) != Some(&serde_json::json!(name))
                })
                .map(|(id, _)| id)
                .collect();
            let delivered = stale.is_empty() && views.len() as u64 == n;
            // The group's lag costs a Kafka client: read once everything is delivered, or late
            // in a wait that is failing (for its message).
            let late = waiting.elapsed() > DEADLINE / 2;
            let (lag, dlq) = if delivered || late {
                c.lag_then_dlq().await
            } else {
                (-1, -1)
            };
            if delivered && lag == 0 {
                return Ok(());
            }
            // What a failure needs to be told apart (never delivered, or overtaken; consumed
            // or not): the first stale id's Analytics history, and, late, its Kafka records.
            let history = match stale.first() {
                Some(id) => get_json(&format!("{}/analytics/data?id={id}", c.analytics_url))
                    .await
                    .unwrap_or_default()
                    .to_string(),
                None => String::new(),
            };
            let records = match stale.first() {
                Some(id) if late => {
                    let prefix = format!("{id}\t");
                    common::procs::kcat_read(&c.bootstrap, &c.customer_topic, "%k\t%p@%o %s\n")
                        .lines()
                        .filter(|l| l.starts_with(&prefix))
                        .collect::<Vec<_>>()
                        .join(" | ")
                }
                _ => String::new(),
            };
            Err(format!(
                "{} of {n} ids delivered, {} updated ids not on their latest view (first: {:?}), \
                 lag {lag}, DLQ {dlq}; Analytics: {}; its history: {history}; its customer \
                 records: {records}",
                views.len(),
                stale.len(),
                stale.first(),
                c.stats().await
            ))
        },
    )
    .await;
    assert_one_key_per_view(c).await;
    assert_eq!(c.count(&c.dlq_topic).await, 0, "nothing dead-lettered");
}

/// Every distinct view (an id's merged sides) reached Analytics under exactly one key.
async fn assert_one_key_per_view(c: &Cluster) {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut page = 1;
    loop {
        let url = format!(
            "{}/analytics/data?page={page}&per_page=10000",
            c.analytics_url
        );
        let body = get_json(&url).await.unwrap();
        for r in body["records"].as_array().unwrap() {
            let view = format!("{}|{}|{}", json_id(&r["id"]), r["customer"], r["inventory"]);
            keys.entry(view)
                .or_default()
                .push(r["key"].as_str().unwrap().to_owned());
        }
        match body["next_page"].as_u64() {
            Some(next) => page = next as usize,
            None => break,
        }
    }
    let doubled: Vec<_> = keys.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(
        doubled.is_empty(),
        "{} views delivered under more than one key, e.g. {:?}",
        doubled.len(),
        doubled.first()
    );
}

/// A cluster whose one consumer delivered all `n` ids and committed both topics in full, then
/// stopped; Redis was then restarted empty. What the next owner receives: partitions whose
/// inventory side is fully committed and brings no message.
async fn delivered_then_redis_lost(n: u64) -> Cluster {
    let mut c = Cluster::start(n, &[]).await;
    let first = c.consumer("consumer-1", &[]);
    c.producer(2);
    c.wait_unique(n).await;
    wait_for("the first consumer's lag to reach 0", || async {
        c.lag_then_dlq().await.0 == 0
    })
    .await;
    c.procs.terminate(first);
    c.kill_redis();
    c.restart_redis();
    c
}

/// Ids spread over every partition.
fn every_tenth(n: u64) -> Vec<u64> {
    (1..=n).step_by(10).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_after_a_redis_loss_rebuilds_the_side_that_brings_no_messages() {
    let n = 1000;
    let mut c = delivered_then_redis_lost(n).await;
    c.consumer("consumer-2", &[]);
    let names = c.update_customers(&every_tenth(n), "Updated").await;
    settled(&c, n, &names).await;
    c.procs.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_cut_short_by_a_kill_is_redone_by_the_next_owner() {
    let n = 1000;
    let mut c = delivered_then_redis_lost(n).await;
    let (victim, marker) = c.consumer_frozen_at("victim", "rebuild_started", &[]);
    let names = c.update_customers(&every_tenth(n), "Updated").await;
    wait_for("the victim to start a rebuild", || async {
        marker.exists()
    })
    .await;
    c.procs.kill9(victim);
    c.consumer("consumer-3", &[]);
    settled(&c, n, &names).await;
    c.procs.assert_running();
}

/// Keys and values of `topic`, read with kcat (`None` for a tombstone's value).
fn read_keys(c: &Cluster, topic: &str) -> Vec<(String, Option<String>)> {
    common::procs::kcat_read(&c.bootstrap, topic, "%k\t%S\n")
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, size)| (k.to_owned(), (size != "-1").then(|| size.to_owned())))
        .collect()
}

/// Writes one record to `partition` of `topic` with kcat.
fn append(c: &Cluster, topic: &str, partition: i32, key: &str, value: &str) {
    use std::io::Write;
    let mut kcat = std::process::Command::new("kcat")
        .args([
            "-b",
            &c.bootstrap,
            "-P",
            "-t",
            topic,
            "-p",
            &partition.to_string(),
        ])
        .args(["-k", key])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    kcat.stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    assert!(kcat.wait().unwrap().success(), "kcat -P {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_from_compacted_topics_delivers_each_latest_view_once() {
    let n = 500;
    // A cleaner that runs every 100 ms, over segments that roll after 100 ms (at the next write:
    // only closed segments are cleaned).
    let broker = BrokerOptions {
        overrides: vec![("log.cleaner.backoff.ms".into(), "100".into())],
        ..BrokerOptions::default()
    };
    let mut c = Cluster::start_on(n, &[], broker).await;
    let fast = [
        ("cleanup.policy", "compact"),
        ("segment.ms", "100"),
        ("min.cleanable.dirty.ratio", "0.01"),
        ("min.compaction.lag.ms", "0"),
        ("delete.retention.ms", "100"),
    ];
    for topic in [&c.customer_topic, &c.inventory_topic, &c.state_topic] {
        common::set_topic_config(&c.bootstrap, topic, &fast).await;
    }
    let first = c.consumer("consumer-1", &[]);
    c.producer(2);
    c.wait_unique(n).await;
    let ids = every_tenth(n);
    let mut names = c.update_customers(&ids, "First").await;
    settled(&c, n, &names).await;
    names = c.update_customers(&ids, "Second").await;
    settled(&c, n, &names).await;
    let keys_before = c.stats().await["unique_keys"].as_u64().unwrap();
    assert_eq!(keys_before, n + 2 * ids.len() as u64, "one key per view");

    // Compaction removes the older versions and the producer's tombstones of its saved state.
    common::wait_until_paced("compaction", Duration::from_millis(500), || async {
        // Later writes close the segments holding the latest versions, so they get cleaned: a
        // customer that joins nothing on every partition, and a cursor no source has.
        for p in 0..6 {
            let value = format!(r#"{{"id":"roll-{p}","name":"roll","email":"r@example.com"}}"#);
            append(&c, &c.customer_topic, p, &format!("roll-{p}"), &value);
        }
        append(&c, &c.state_topic, 0, "roll", "{}");
        let customers = read_keys(&c, &c.customer_topic);
        let state = read_keys(&c, &c.state_topic);
        let copies = |id: &String| customers.iter().filter(|(k, _)| k == id).count();
        let updated_once = names.keys().filter(|id| copies(id) == 1).count();
        let tombstones = state.iter().filter(|(_, v)| v.is_none()).count();
        if updated_once >= names.len() / 2 && tombstones == 0 {
            return Ok(());
        }
        Err(format!(
            "{} customer records, {updated_once} of {} updated ids left once, {tombstones} \
             tombstones among {} source-state records",
            customers.len(),
            names.len(),
            state.len()
        ))
    })
    .await;

    c.procs.terminate(first);
    c.kill_redis();
    c.restart_redis();
    c.consumer("consumer-2", &[]);
    // The offsets are committed to the end already (lag 0): the rebuild shows in the re-sends.
    wait_for("the rebuild to re-send every id's latest view", || async {
        c.stats().await["duplicates"].as_u64().unwrap_or(0) >= n
    })
    .await;
    settled(&c, n, &names).await;
    let stats = c.stats().await;
    // Every view re-derived from the compacted topics got the key it was first delivered
    // under: Analytics dropped them all as duplicates and holds no new key.
    assert_eq!(stats["unique_keys"].as_u64(), Some(keys_before), "{stats}");
    c.procs.assert_running();
}

/// One fault of the chaos schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillConsumer,
    StopConsumer,
    KillProducer,
    RestartRedis,
    /// The broker `kill -9`ed and restarted on its data.
    RestartKafka,
    Update,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_consumer_and_producer_kills_redis_restarts_and_updates() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (rerun with CHAOS_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = 2000;
    let mut c = Cluster::start(n, &["--fault-latency-ms", "20"]).await;
    let mut consumers: Vec<usize> = (1..=3)
        .map(|i| c.consumer(&format!("consumer-{i}"), &[]))
        .collect();
    let mut started = 3;
    let mut producer = c.producer(2);
    c.wait_unique(200).await;

    // Eleven faults in random order, at least one of each kind.
    let mut schedule = vec![
        Fault::KillConsumer,
        Fault::StopConsumer,
        Fault::KillProducer,
        Fault::RestartRedis,
        Fault::RestartKafka,
        Fault::Update,
    ];
    let kinds = [
        Fault::KillConsumer,
        Fault::KillConsumer,
        Fault::StopConsumer,
        Fault::RestartRedis,
        Fault::Update,
    ];
    for _ in 0..5 {
        schedule.push(kinds[rng.random_range(0..kinds.len())]);
    }
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.random_range(0..=i));
    }
    eprintln!("chaos schedule: {schedule:?}");

    let mut names = BTreeMap::new();
    let mut round = 0;
    for fault in schedule {
        round += 1;
        match fault {
            Fault::KillConsumer | Fault::StopConsumer => {
                let victim = consumers.remove(rng.random_range(0..consumers.len()));
                if matches!(fault, Fault::KillConsumer) {
                    c.procs.kill9(victim);
                } else {
                    c.procs.terminate(victim);
                }
                started += 1;
                consumers.push(c.consumer(&format!("consumer-{started}"), &[]));
            }
            Fault::KillProducer => {
                c.procs.kill9(producer);
                producer = c.producer(2);
            }
            Fault::RestartRedis => {
                c.kill_redis();
                c.restart_redis();
            }
            Fault::RestartKafka => {
                c.kafka().kill9();
                tokio::task::block_in_place(|| c.kafka().restart()).unwrap();
            }
            Fault::Update => {
                let ids: Vec<u64> = (0..30).map(|_| rng.random_range(1..=n)).collect();
                names.extend(c.update_customers(&ids, &format!("Round {round}")).await);
            }
        }
        // The pace of the schedule, not a wait on a condition: faults land while records flow.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
    }
    settled(&c, n, &names).await;
    c.procs.assert_running();
    eprintln!("chaos seed {seed} settled: {}", c.stats().await);
}
