//! Process-level tests: Apache Kafka, a real redis-server, the three mocks, the producer and
//! consumers as separate processes talking over sockets, as `docker compose` runs them.
//!
//! The kill tests freeze one consumer at a deterministic failpoint (`PIPELINE_FAILPOINT`, compiled
//! into debug builds only), `kill -9` it there, and check ARCHITECTURE.md I1–I3 from the Analytics
//! mock's ledger and the DLQ: every view delivered under one key, nothing dead-lettered, and the
//! latest view of updated ids wins.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::time::Duration;

use common::procs::{get_json, Cluster};
use pipeline_kit::apache_kafka::BrokerOptions;

const N: u64 = 3000;

/// Freezes a consumer at `failpoint`, kills it with SIGKILL, and checks the recovery.
async fn kill_at(failpoint: &str) {
    let mut c = Cluster::start(N, &["--fault-latency-ms", "20"]).await;
    let (victim, marker) = c.consumer_frozen_at("victim", failpoint, &[]);
    let second = c.consumer("consumer-2", &[]);
    let third = c.consumer("consumer-3", &[]);
    // The victim must hold partitions when the records come, or it may never claim one.
    c.wait_assigned(&[victim, second, third], 12.0).await;
    c.producer(2);

    common::wait_for(&format!("failpoint {failpoint} to be reached"), || async {
        marker.exists()
    })
    .await;
    let at_kill = c.stats().await["unique_keys"].as_u64().unwrap_or(0);
    c.procs.kill9(victim);
    c.wait_unique(N).await;

    // After recovery, changes still win: update three customers and wait for their new views.
    let client = reqwest::Client::new();
    for id in [1, 1500, 3000] {
        let r = client
            .post(format!("{}/customers", c.crm_url))
            .json(&serde_json::json!({"id": id, "name": format!("Updated {id}"), "email": format!("u{id}@example.com")}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    c.wait_unique(N + 3).await;
    c.procs.assert_running();

    let stats = c.stats().await;
    eprintln!("kill at {failpoint}: {at_kill} delivered at the kill; final {stats}");
    assert!(at_kill < N, "the kill happened mid-stream");
    assert_eq!(
        stats["unique_keys"],
        N + 3,
        "one key per view, none lost: {stats}"
    );
    assert_eq!(stats["unique_ids"], N);
    for id in [1, 1500, 3000] {
        let h = get_json(&format!("{}/analytics/data?id={id}", c.analytics_url))
            .await
            .unwrap();
        let records = h["records"].as_array().unwrap();
        assert_eq!(records.len(), 2, "id {id}: {h}");
        assert_eq!(records[1]["customer"]["name"], format!("Updated {id}"));
    }
    assert_eq!(c.count(&c.dlq_topic).await, 0, "nothing dead-lettered");
}

/// Every view delivered under one key, every id present, `dlq` dead letters, no process died.
async fn assert_complete(c: &mut Cluster, dlq: usize) -> serde_json::Value {
    c.procs.assert_running();
    let stats = c.stats().await;
    assert_eq!(stats["unique_keys"], N, "{stats}");
    assert_eq!(stats["unique_ids"], N, "{stats}");
    assert_eq!(c.count(&c.dlq_topic).await, dlq);
    stats
}

async fn three_consumers(n: u64) -> Cluster {
    let mut c = Cluster::start(n, &["--fault-latency-ms", "20"]).await;
    for name in ["consumer-1", "consumer-2", "consumer-3"] {
        c.consumer(name, &[]);
    }
    c
}

/// Asserts that `ids` were delivered once more, their last view carrying `name`.
async fn assert_updated(c: &Cluster, ids: &[u64], name: &str) {
    for id in ids {
        let h = get_json(&format!("{}/analytics/data?id={id}", c.analytics_url))
            .await
            .unwrap();
        assert_eq!(
            h["records"][1]["customer"]["name"],
            format!("{name} {id}"),
            "{h}"
        );
    }
}

/// Waits until the producer reports a failed delivery.
async fn producer_failed(c: &Cluster) {
    common::wait_for("the producer to report failed deliveries", || async {
        c.producer_metric("pipeline_producer_publish_failures_total")
            .await
            >= 1.0
    })
    .await;
}

/// Waits until the group has committed everything.
async fn lag_zero(c: &Cluster) {
    common::wait_for("the group's lag to reach 0", || async {
        c.lag_then_dlq().await.0 == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_on_its_data_mid_stream() {
    let mut c = three_consumers(N).await;
    c.producer(3600);
    c.wait_unique(300).await;
    c.kafka().kill9();
    tokio::task::block_in_place(|| c.kafka().restart()).unwrap();
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    // acks=all and the idempotent producer: nothing lost, nothing written twice.
    assert_eq!(c.count(&c.customer_topic).await, N as usize);
    assert_eq!(c.count(&c.inventory_topic).await, N as usize);
    lag_zero(&c).await;
    eprintln!("broker kill -9 and restart: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_longer_than_the_message_timeout_is_re_polled() {
    let mut c = three_consumers(N).await;
    c.producer_with(2, &[("KAFKA_MESSAGE_TIMEOUT_MS", "2000")]);
    c.wait_unique(N).await;
    tokio::task::block_in_place(|| c.kafka().stop());
    c.update_customers(&[7, 77, 777], "During outage").await;
    // The producer's next cycle cannot get its records acknowledged: it must say so.
    producer_failed(&c).await;
    tokio::task::block_in_place(|| c.kafka().restart()).unwrap();
    c.wait_unique(N + 3).await;
    assert_updated(&c, &[7, 77, 777], "During outage").await;
    assert_eq!(c.count(&c.dlq_topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_hung_shorter_than_the_message_timeout() {
    let mut c = three_consumers(N).await;
    c.producer(3600);
    c.wait_unique(300).await;
    c.kafka().pause().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the hang itself
    c.kafka().resume().unwrap();
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    assert_eq!(c.count(&c.customer_topic).await, N as usize);
    eprintln!("broker hung 3 s: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_hung_longer_than_the_message_timeout_is_re_polled() {
    let mut c = three_consumers(N).await;
    c.producer_with(2, &[("KAFKA_MESSAGE_TIMEOUT_MS", "2000")]);
    c.wait_unique(N).await;
    c.kafka().pause().unwrap();
    c.update_customers(&[8, 88, 888], "During hang").await;
    producer_failed(&c).await;
    c.kafka().resume().unwrap();
    c.wait_unique(N + 3).await;
    assert_updated(&c, &[8, 88, 888], "During hang").await;
    assert_eq!(c.count(&c.dlq_topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dlq_write_holds_the_source_offset() {
    let mut c = Cluster::start(0, &[]).await;
    // The DLQ topic refuses every record (a record batch is larger than 64 bytes).
    common::set_topic_config(&c.bootstrap, &c.dlq_topic, &[("max.message.bytes", "64")]).await;
    let bad = c.path("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    c.kcat_produce(&c.customer_topic.clone(), "bad", &bad);
    let consumer = c.consumer("consumer", &[]);
    let metrics = c.consumer_metrics[&consumer].clone();
    let held = || async {
        let (lag, dlq) = c.lag_then_dlq().await;
        // Lag read first: an offset committed then means the DLQ write was acknowledged before.
        assert!(
            lag > 0 || dlq >= 1,
            "source offset committed before its DLQ record existed"
        );
        (lag, dlq)
    };
    common::wait_for("two refused DLQ writes", || async {
        held().await;
        let text = match reqwest::get(&metrics).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return false,
        };
        pipeline_core::metrics::sum_of(&text, "pipeline_dlq_write_failures_total") >= 2.0
    })
    .await;
    common::set_topic_config(
        &c.bootstrap,
        &c.dlq_topic,
        &[("max.message.bytes", "1048588")],
    )
    .await;
    common::wait_for(
        "the dead letter to land and the offset to follow",
        || async { held().await == (0, 1) },
    )
    .await;
    assert_eq!(
        c.count(&c.dlq_topic).await,
        1,
        "written once, not once per retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_mid_stream() {
    let mut c = three_consumers(N).await;
    c.producer(3600);
    c.wait_unique(500).await;
    c.kill_redis();
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage itself
    c.restart_redis();
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    eprintln!("redis restarted empty: {stats}");
}

/// Two consumers, a third joining mid-stream, the first leaving (SIGTERM) and the second killed
/// (`kill -9`): every id still delivered, few records twice.
async fn join_leave_and_kill(consumer_env: &[(&str, &str)], broker: BrokerOptions) {
    let mut c = Cluster::start_on(N, &["--fault-latency-ms", "20"], broker).await;
    let first = c.consumer("consumer-1", consumer_env);
    let second = c.consumer("consumer-2", consumer_env);
    c.producer(3600);
    c.wait_unique(500).await;
    c.consumer("consumer-3", consumer_env);
    c.wait_unique(1000).await;
    c.procs.terminate(first);
    c.wait_unique(1500).await;
    c.procs.kill9(second);
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    assert!(stats["duplicates"].as_u64().unwrap() <= 600, "{stats}");
    eprintln!("rebalance: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joins_one_leaves_and_one_is_killed_mid_stream() {
    join_leave_and_kill(&[], BrokerOptions::default()).await;
}

/// The same under KIP-848 (`KAFKA_GROUP_PROTOCOL=consumer`): the broker's range assignor must
/// keep the sides co-partitioned while members reconcile incrementally. The broker's group
/// timing is lowered from its 45 s session to the 6 s the classic members of these tests use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_kip_848_a_consumer_joins_one_leaves_and_one_is_killed_mid_stream() {
    let broker = BrokerOptions {
        port: None,
        overrides: [
            ("group.consumer.heartbeat.interval.ms", "1000"),
            ("group.consumer.min.heartbeat.interval.ms", "1000"),
            ("group.consumer.session.timeout.ms", "6000"),
            ("group.consumer.min.session.timeout.ms", "6000"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec(),
    };
    join_leave_and_kill(&[("KAFKA_GROUP_PROTOCOL", "consumer")], broker).await;
}

/// The `pipeline_consumer_lag_messages` series one consumer exports (`topic/partition`).
async fn lag_series(url: &str) -> Vec<String> {
    let Ok(r) = reqwest::get(url).await else {
        return Vec::new();
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("pipeline_consumer_lag_messages{"))
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stops_exporting_the_lag_of_partitions_it_lost() {
    let mut c = Cluster::start(N, &[]).await;
    let first = c.consumer("consumer-1", &[]);
    let url = c.consumer_metrics[&first].clone();
    c.producer(3600);
    c.wait_unique(N).await;
    // Alone in the group: the lag of all 12 topic-partitions (statistics every 5 s).
    common::wait_for("lag series of every partition", || async {
        lag_series(&url).await.len() == 12
    })
    .await;
    c.consumer("consumer-2", &[]);
    common::wait_for(
        "the first consumer to export only the lag of what it holds",
        || async {
            let Ok(r) = reqwest::get(&url).await else {
                return false;
            };
            let text = r.text().await.unwrap_or_default();
            let assigned =
                pipeline_core::metrics::sum_of(&text, "pipeline_consumer_assigned_partitions");
            let series = lag_series(&url).await.len();
            assigned > 0.0 && assigned < 12.0 && series as f64 == assigned
        },
    )
    .await;
    c.procs.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_written_with_kcat_is_dead_lettered() {
    let mut c = Cluster::start(N, &[]).await;
    c.consumer("consumer-1", &[]);
    c.consumer("consumer-2", &[]);
    c.producer(3600);
    c.wait_unique(N).await;
    // 5 MB (decimal), above the consumer's own limit (MAX_RECORD_BYTES, 1 MiB): the topic takes
    // it, as a topic configured for large records would.
    let topic = c.customer_topic.clone();
    let large = [
        ("cleanup.policy", "compact"),
        ("max.message.bytes", "10000000"),
    ];
    common::set_topic_config(&c.bootstrap, &topic, &large).await;
    let padding = 5_000_000 - r#"{"id":"big","blob":""}"#.len();
    let big = format!(r#"{{"id":"big","blob":"{}"}}"#, "x".repeat(padding));
    let inputs: [(&str, &str, Vec<u8>); 5] = [
        ("invalid", "j1", b"{not json".to_vec()),
        // Keyed: a compacted topic refuses a record without a key (INVALID_RECORD).
        ("missing", "m1", br#"{"name":"no id"}"#.to_vec()),
        ("types", "t1", br#"{"id":"t1","updated_at":true}"#.to_vec()),
        ("big", "big", big.into_bytes()),
        ("binary", "b1", vec![0xff, 0x00, 0xfe, 0x01]),
    ];
    for (name, key, bytes) in &inputs {
        let f = c.path(name);
        std::fs::write(&f, bytes).unwrap();
        c.kcat_produce(&topic, key, &f);
    }
    common::wait_until("lag 0 and the five inputs dead-lettered", || async {
        match c.lag_then_dlq().await {
            (0, dlq) if dlq >= 5 => Ok(()),
            (lag, dlq) => Err(format!("lag {lag}, dlq {dlq}")),
        }
    })
    .await;
    assert_complete(&mut c, 5).await;
    let dlq = common::read_topic(&c.bootstrap, &c.dlq_topic, 5);
    let mut classes: Vec<String> = dlq
        .iter()
        .map(|m| common::header(m, "dlq.error.class").unwrap())
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            "invalid_json",
            "invalid_json",
            "invalid_updated_at",
            "missing_id",
            "payload_too_large"
        ]
    );
    let big = dlq
        .iter()
        .find(|m| common::header(m, "dlq.error.class").as_deref() == Some("payload_too_large"))
        .unwrap();
    assert_eq!(
        common::header(big, "dlq.value.omitted-bytes").as_deref(),
        Some("5000000")
    );
    let shown = common::procs::console_consumer(&c.bootstrap, &c.dlq_topic, 5);
    assert_eq!(shown.matches("dlq.error.class:").count(), 5, "{shown}");
    assert!(
        shown.contains("dlq.reason:") && shown.contains("dlq.original.topic:"),
        "{shown}"
    );
    for m in &dlq {
        assert!(common::header(m, "dlq.reason").is_some_and(|r| !r.is_empty()));
        assert_eq!(
            common::header(m, "dlq.original.topic").as_deref(),
            Some(topic.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_polling_reports_itself_stuck() {
    let mut c = Cluster::start(N, &[]).await;
    let (stuck, marker) =
        c.consumer_frozen_at("stuck", "after_claim", &[("POLL_STALL_MS", "2000")]);
    let metrics = c.consumer_metrics[&stuck].clone();
    let health = metrics.replace("/metrics", "/health");
    common::procs::wait_healthy(&health).await;
    c.producer(3600);
    common::wait_for("the worker to freeze after claiming", || async {
        marker.exists()
    })
    .await;
    // Frozen inside a batch, it polls Kafka no more: /health turns 503 long before librdkafka's
    // max.poll.interval.ms (300 s) would evict it.
    common::wait_for("/health 503 and the stall in the metrics", || async {
        let status = reqwest::get(&health).await.map(|r| r.status().as_u16());
        let text = match reqwest::get(&metrics).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return false,
        };
        let since = pipeline_core::metrics::sum_of(&text, "pipeline_consumer_seconds_since_poll");
        status.ok() == Some(503) && since >= 2.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_claim_before_post() {
    kill_at("after_claim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_post_in_flight() {
    kill_at("during_post").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_the_post_acknowledged_before_offsets() {
    kill_at("after_post").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_deliver_everything_and_kcat_reads_the_topics() {
    let mut c = Cluster::start(N, &[]).await;
    c.consumer("consumer-a", &[]);
    c.consumer("consumer-b", &[]);
    c.producer(3600);
    c.wait_unique(N).await;
    c.procs.assert_running();
    let stats = c.stats().await;
    assert_eq!(
        (stats["unique_keys"].as_u64(), stats["duplicates"].as_u64()),
        (Some(N), Some(0))
    );

    // Console tooling reads what the pipeline wrote, through the forwarded bootstrap port.
    let counts = (
        c.count(&c.customer_topic).await,
        c.count(&c.inventory_topic).await,
        c.count(&c.dlq_topic).await,
    );
    assert_eq!(counts, (N as usize, N as usize, 0));

    // And Apache Kafka's own tools: records with keys and headers, the group's lag.
    let bs = c.bootstrap.clone();
    let records = common::procs::console_consumer(&bs, &c.customer_topic, 5);
    let first = records.lines().next().unwrap_or_default();
    assert!(
        first.contains("source:")
            && first.contains("content-sha256:")
            && first.contains("\"email\""),
        "kafka-console-consumer shows headers, key and record: {records}"
    );
    lag_zero(&c).await;
    let describe = common::procs::kafka_tool(
        "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        &["--bootstrap-server", &bs, "--describe", "--group", &c.group],
    );
    let rows: Vec<&str> = describe
        .lines()
        .filter(|l| l.contains(&c.customer_topic) || l.contains(&c.inventory_topic))
        .collect();
    assert_eq!(
        rows.len(),
        12,
        "kafka-consumer-groups --describe: {describe}"
    );
    for row in rows {
        let lag = row.split_whitespace().nth(5).unwrap_or_default();
        assert_eq!(lag, "0", "lag per partition: {describe}");
    }
}
