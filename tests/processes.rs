//! Process-level tests: `pipeline broker`, a real redis-server, the three mocks, the producer and
//! consumers as separate processes talking over sockets, as `docker compose` runs them.
//!
//! The kill tests freeze one consumer at a deterministic failpoint (`PIPELINE_FAILPOINT`, compiled
//! into debug builds only), `kill -9` it there, and check DESIGN.md I1–I3 from the Analytics
//! mock's ledger and the DLQ: every view delivered under one key, nothing dead-lettered, and the
//! latest view of updated ids wins.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::time::{Duration, Instant};

use common::procs::{get_json, Cluster};
use common::DEADLINE;

const N: u64 = 3000;

/// Freezes a consumer at `failpoint`, kills it with SIGKILL, and checks the recovery.
async fn kill_at(failpoint: &str) {
    let mut c = Cluster::start(N, &["--fault-latency-ms", "20"]).await;
    let (victim, marker) = c.consumer_frozen_at("victim", failpoint, &[]);
    c.consumer("consumer-2", &[]);
    c.consumer("consumer-3", &[]);
    c.producer(2);

    let deadline = Instant::now() + DEADLINE;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "failpoint {failpoint} never reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_shorter_than_the_message_timeout() {
    let mut c = three_consumers(N).await;
    c.producer(3600);
    c.wait_unique(300).await;
    if !c.broker("/admin/broker/down", None).await {
        return;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    c.broker("/admin/broker/up", None).await;
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    eprintln!("broker down 3 s: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_longer_than_the_message_timeout_is_re_polled() {
    let mut c = three_consumers(N).await;
    c.producer_with(2, &[("KAFKA_MESSAGE_TIMEOUT_MS", "2000")]);
    c.wait_unique(N).await;
    if !c.broker("/admin/broker/down", None).await {
        return;
    }
    let client = reqwest::Client::new();
    for id in [7, 77, 777] {
        let body = serde_json::json!({"id": id, "name": format!("During outage {id}"), "email": "o@example.com"});
        assert!(client
            .post(format!("{}/customers", c.crm_url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .is_success());
    }
    // The producer's next cycle cannot get its records acknowledged: it must say so.
    let deadline = Instant::now() + DEADLINE;
    while c
        .producer_metric("pipeline_producer_publish_failures_total")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the producer never reported failed deliveries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.broker("/admin/broker/up", None).await;
    c.wait_unique(N + 3).await;
    for id in [7, 77, 777] {
        let h = get_json(&format!("{}/analytics/data?id={id}", c.analytics_url))
            .await
            .unwrap();
        assert_eq!(
            h["records"][1]["customer"]["name"],
            format!("During outage {id}"),
            "{h}"
        );
    }
    assert_eq!(c.count(&c.dlq_topic).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_produce_and_offset_commit_errors() {
    let mut c = three_consumers(N).await;
    let produce = serde_json::json!({"api": "produce", "errors": ["NOT_ENOUGH_REPLICAS", "REQUEST_TIMED_OUT", "NOT_ENOUGH_REPLICAS", "NOT_LEADER_FOR_PARTITION", "REQUEST_TIMED_OUT"]});
    let commit = serde_json::json!({"api": "offset_commit", "errors": ["COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR", "REQUEST_TIMED_OUT", "NOT_COORDINATOR"]});
    if !c.broker("/admin/request-errors", Some(produce)).await {
        return;
    }
    c.broker("/admin/request-errors", Some(commit)).await;
    c.producer(3600);
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    assert_eq!(stats["duplicates"], 0, "{stats}");
    // The idempotent producer retried without writing anything twice.
    assert_eq!(c.count(&c.customer_topic).await, N as usize);
    assert_eq!(c.count(&c.inventory_topic).await, N as usize);
    let deadline = Instant::now() + DEADLINE;
    while c.lag_then_dlq().await.0 > 0 {
        assert!(
            Instant::now() < deadline,
            "offsets never committed after the commit errors"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dlq_write_holds_the_source_offset() {
    let mut c = Cluster::start(0, &[]).await;
    let bad = c.path("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    c.kcat_produce(&c.customer_topic.clone(), "bad", &bad);
    let errors =
        serde_json::json!({"api": "produce", "errors": vec!["TOPIC_AUTHORIZATION_FAILED"; 6]});
    if !c.broker("/admin/request-errors", Some(errors)).await {
        return;
    }
    c.consumer("consumer", &[]);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (lag, dlq) = c.lag_then_dlq().await;
        // Lag read first: an offset committed then means the DLQ write was acknowledged before.
        assert!(
            lag > 0 || dlq >= 1,
            "source offset committed before its DLQ record existed"
        );
        if lag == 0 && dlq >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead letter never landed (lag {lag}, dlq {dlq})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_joins_and_another_leaves_mid_stream() {
    let mut c = Cluster::start(N, &["--fault-latency-ms", "20"]).await;
    let first = c.consumer("consumer-1", &[]);
    c.consumer("consumer-2", &[]);
    c.producer(3600);
    c.wait_unique(500).await;
    c.consumer("consumer-3", &[]);
    c.wait_unique(1500).await;
    c.procs.terminate(first);
    c.wait_unique(N).await;
    let stats = assert_complete(&mut c, 0).await;
    assert!(stats["duplicates"].as_u64().unwrap() <= 400, "{stats}");
    eprintln!("rebalance: {stats}");
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
    // 5 MB (decimal): a 5,242,903-byte value was gone from librdkafka's mock broker before the
    // consumer could read it (its log per partition is bounded); the consumer's own limit
    // (MAX_RECORD_BYTES) is 1 MiB, so this still exercises the oversized path.
    let topic = c.customer_topic.clone();
    let padding = 5_000_000 - r#"{"id":"big","blob":""}"#.len();
    let big = format!(r#"{{"id":"big","blob":"{}"}}"#, "x".repeat(padding));
    let inputs: [(&str, &str, Vec<u8>); 5] = [
        ("invalid", "j1", b"{not json".to_vec()),
        ("missing", "", br#"{"name":"no id"}"#.to_vec()),
        ("types", "t1", br#"{"id":"t1","updated_at":true}"#.to_vec()),
        ("big", "big", big.into_bytes()),
        ("binary", "b1", vec![0xff, 0x00, 0xfe, 0x01]),
    ];
    for (name, key, bytes) in &inputs {
        let f = c.path(name);
        std::fs::write(&f, bytes).unwrap();
        c.kcat_produce(&topic, key, &f);
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (lag, dlq) = c.lag_then_dlq().await;
        if lag == 0 && dlq >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "lag {lag}, dlq {dlq}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
}
