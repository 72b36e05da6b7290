//! Component tests: the whole pipeline in one process on the embedded Kafka (real sockets), a real
//! redis-server and the mocks on port 0. Each test starts its own stack.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_both_sides_in_either_order() {
    let s = stack(0, 1).await;
    s.mock("crm")
        .unwrap()
        .upsert(customer("a", "Ann", "ann@example.com"))
        .unwrap();
    s.mock("inventory")
        .unwrap()
        .upsert(product("b", "Bolt"))
        .unwrap();
    poll(&s).await;
    caught_up(&s).await;
    assert_eq!(
        s.analytics.stats().unique_keys,
        0,
        "one side alone must not be delivered"
    );

    s.mock("inventory")
        .unwrap()
        .upsert(product("a", "Anvil"))
        .unwrap();
    s.mock("crm")
        .unwrap()
        .upsert(customer("b", "Bob", "bob@example.com"))
        .unwrap();
    poll(&s).await;
    caught_up(&s).await;
    let latest = s.analytics.latest_by_id();
    assert_eq!(latest.len(), 2);
    assert_eq!(latest["a"]["customer"]["name"], "Ann");
    assert_eq!(latest["a"]["inventory"]["name"], "Anvil");
    assert_eq!(latest["b"]["customer"]["name"], "Bob");
    assert_eq!(latest["b"]["inventory"]["name"], "Bolt");
    assert_eq!(latest["a"]["key"].as_str().map(str::len), Some(64));
    let stats = s.analytics.stats();
    assert_eq!((stats.unique_keys, stats.duplicates), (2, 0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repolls_of_unchanged_data_deliver_nothing_new() {
    let s = stack(300, 2).await;
    let p = producer::Producer::new(&s.producer_config()).await.unwrap();
    assert_eq!(p.poll_cycle().await.unwrap().published(), 600);
    caught_up(&s).await;
    let first = s.analytics.stats();
    assert_eq!(first.unique_keys, 300);

    // Same producer: the ETags answer 304 and nothing is re-published.
    let again = p.poll_cycle().await.unwrap();
    assert_eq!(again.published(), 0);
    assert!(again
        .sources
        .iter()
        .all(|r| r.pages_not_modified == r.pages));

    // A fresh producer (a restart) reads the ETags the first one saved in the source-state
    // topic: every page is a 304 again.
    let restarted = poll(&s).await;
    assert_eq!(restarted.published(), 0);
    assert!(restarted
        .sources
        .iter()
        .all(|r| r.pages > 0 && r.pages_not_modified == r.pages));

    // Told to ignore them (`--full-export`), it re-publishes everything; the join drops it all.
    let mut full = s.producer_config();
    full.full_export = true;
    let p = producer::Producer::new(&full).await.unwrap();
    assert_eq!(p.poll_cycle().await.unwrap().published(), 600);
    caught_up(&s).await;
    let second = s.analytics.stats();
    assert_eq!(
        second.records_received, first.records_received,
        "nothing re-sent to Analytics"
    );
    assert_eq!(second.batches, first.batches);
    assert_eq!(second.unique_keys, 300);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_delivers_a_new_view() {
    let s = stack(50, 1).await;
    poll(&s).await;
    caught_up(&s).await;
    let mut c = customer("7", "Renamed", "seven@example.com");
    c.insert("loyalty".into(), json!({"points": 12}));
    s.mock("crm").unwrap().upsert(c).unwrap();
    poll(&s).await;
    caught_up(&s).await;
    let history = s.analytics.history("7");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["customer"]["name"], "Customer 7");
    assert_eq!(history[1]["customer"]["name"], "Renamed");
    assert_eq!(
        history[1]["customer"]["loyalty"]["points"], 12,
        "unknown fields pass through"
    );
    assert_ne!(history[0]["key"], history[1]["key"]);
    assert_eq!(s.analytics.stats().unique_keys, 51);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_a_b_a_is_delivered_three_times() {
    let s = stack(0, 1).await;
    let bs = s.bootstrap_servers().to_owned();
    produce_raw(
        &bs,
        "inventory_data",
        Some("r1"),
        br#"{"id":"r1","name":"Rivet"}"#,
    )
    .await;
    // No updated_at: versions are ordered by offset; the third view equals the first exactly.
    for name in ["A", "B", "A"] {
        let v = json!({"id": "r1", "name": name, "email": "r@example.com"}).to_string();
        produce_raw(&bs, "customer_data", Some("r1"), v.as_bytes()).await;
        caught_up(&s).await;
    }
    let history = s.analytics.history("r1");
    let names: Vec<&str> = history
        .iter()
        .map(|r| r["customer"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["A", "B", "A"]);
    let keys: std::collections::HashSet<&str> =
        history.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 3, "a revert gets its own key");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_does_not_overwrite_a_newer_one() {
    let s = stack(0, 1).await;
    let bs = s.bootstrap_servers().to_owned();
    produce_raw(
        &bs,
        "inventory_data",
        Some("s1"),
        br#"{"id":"s1","name":"Screw"}"#,
    )
    .await;
    let newer =
        r#"{"id":"s1","name":"New","email":"n@example.com","updated_at":"2026-05-01T00:00:00Z"}"#;
    let older =
        r#"{"id":"s1","name":"Old","email":"o@example.com","updated_at":"2026-04-01T00:00:00Z"}"#;
    produce_raw(&bs, "customer_data", Some("s1"), newer.as_bytes()).await;
    caught_up(&s).await;
    produce_raw(&bs, "customer_data", Some("s1"), older.as_bytes()).await;
    caught_up(&s).await;
    let history = s.analytics.history("s1");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(s.analytics.latest_by_id()["s1"]["customer"]["name"], "New");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_record_goes_to_the_dlq_and_the_rest_is_delivered() {
    let s = stack(20, 1).await;
    s.mock("crm")
        .unwrap()
        .upsert(customer("3", "Bad Email", "not-an-address"))
        .unwrap();
    poll(&s).await;
    caught_up(&s).await;
    let stats = s.analytics.stats();
    assert_eq!(stats.unique_keys, 19);
    assert_eq!(stats.rejected, 1);
    let dlq = read_topic(s.bootstrap_servers(), "analytics_DLQ", 1);
    assert_eq!(dlq.len(), 1);
    let m = &dlq[0];
    assert_eq!(header(m, "dlq.stage").as_deref(), Some("deliver"));
    assert!(header(m, "dlq.reason").unwrap().contains("email"));
    assert_eq!(header(m, "dlq.error.class").as_deref(), Some("rejected"));
    assert_eq!(header(m, "dlq.http.status").as_deref(), Some("202"));
    assert!(["customer_data", "inventory_data"]
        .contains(&header(m, "dlq.original.topic").unwrap().as_str()));
    assert!(
        header(m, "dlq.original.offset")
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= 0
    );
    for h in [
        "dlq.original.partition",
        "dlq.attempts",
        "dlq.first-failure-at",
        "dlq.failed-at",
        "dlq.record.key",
    ] {
        assert!(header(m, h).is_some(), "missing header {h}");
    }
    let value: serde_json::Value =
        serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap();
    assert_eq!(value["id"], "3");
    assert_eq!(
        value["key"].as_str(),
        header(m, "dlq.record.key").as_deref()
    );

    // Re-polling does not dead-letter it again: its key is settled.
    poll(&s).await;
    caught_up(&s).await;
    assert_eq!(s.dlq_size().await.unwrap(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_go_to_the_dlq_and_the_worker_continues() {
    let s = stack(0, 1).await;
    let bs = s.bootstrap_servers().to_owned();
    produce_raw(&bs, "customer_data", Some("x"), b"{not json").await;
    // Keyed: a compacted topic refuses a record without a key.
    produce_raw(&bs, "customer_data", Some("m1"), br#"{"name":"no id"}"#).await;
    produce_raw(&bs, "inventory_data", Some("y"), &[0xff, 0x00, 0xfe]).await;
    produce_raw(&bs, "inventory_data", Some("z"), br#"{"id":{"nested":1}}"#).await;
    produce_raw(
        &bs,
        "customer_data",
        Some("ok"),
        br#"{"id":"ok","name":"Fine","email":"f@example.com"}"#,
    )
    .await;
    produce_raw(
        &bs,
        "inventory_data",
        Some("ok"),
        br#"{"id":"ok","name":"Widget"}"#,
    )
    .await;
    caught_up(&s).await;
    assert_eq!(
        s.analytics.latest_by_id().keys().collect::<Vec<_>>(),
        ["ok"]
    );
    let dlq = read_topic(&bs, "analytics_DLQ", 4);
    assert_eq!(dlq.len(), 4);
    let mut classes: Vec<(String, String)> = dlq
        .iter()
        .map(|m| {
            (
                header(m, "dlq.stage").unwrap(),
                header(m, "dlq.error.class").unwrap(),
            )
        })
        .collect();
    classes.sort();
    assert_eq!(
        classes,
        [
            ("parse".to_string(), "invalid_json".to_string()),
            ("parse".to_string(), "invalid_json".to_string()),
            ("validate".to_string(), "invalid_id".to_string()),
            ("validate".to_string(), "missing_id".to_string()),
        ]
    );
    let raw = dlq
        .iter()
        .find(|m| rdkafka::Message::key(*m) == Some(b"y".as_slice()))
        .unwrap();
    assert_eq!(
        rdkafka::Message::payload(raw),
        Some([0xff, 0x00, 0xfe].as_slice()),
        "original value kept"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_crash_mid_stream_loses_nothing_and_keeps_keys() {
    let mut s = stack(3000, 0).await;
    let mut cfg = s.consumer_config();
    cfg.http_timeout_ms = 2000;
    cfg.delivery_max_attempts = 3;
    cfg.delivery_max_backoff_ms = 1000;
    cfg.claim_ttl_ms = 10_000;
    cfg.batch_max_messages = 300;
    let first = s.spawn_consumer(cfg.clone());
    poll(&s).await;
    let analytics = s.analytics.clone();
    wait_for("some deliveries", || {
        let a = analytics.clone();
        async move { a.stats().unique_keys >= 300 }
    })
    .await;
    s.kill_consumer(first);
    let at_kill = s.analytics.stats().unique_keys;
    s.spawn_consumer(cfg);
    caught_up(&s).await;
    let stats = s.analytics.stats();
    eprintln!("crash test: {at_kill} delivered at the kill; after recovery {stats:?}");
    assert!(
        at_kill < 3000,
        "the crash happened mid-stream ({at_kill} delivered)"
    );
    assert_eq!(
        stats.unique_keys, 3000,
        "every view delivered, under one key each"
    );
    assert_eq!(stats.unique_ids, 3000);
    assert!(
        stats.duplicates <= 300,
        "re-sends bounded by one in-flight batch: {}",
        stats.duplicates
    );
    assert_eq!(s.dlq_size().await.unwrap(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_delivery_failure_is_surfaced_and_a_repoll_recovers() {
    let mut s = stack(100, 1).await;
    let mut cfg = s.producer_config();
    cfg.message_timeout_ms = 2000;
    let p = producer::Producer::new(&cfg).await.unwrap();
    let broker = &mut s.kafka;
    tokio::task::block_in_place(|| broker.stop());
    let err = p
        .poll_cycle()
        .await
        .expect_err("a cycle whose records were not acknowledged fails");
    assert!(format!("{err:#}").contains("not acknowledged"), "{err:#}");
    let broker = &mut s.kafka;
    tokio::task::block_in_place(|| broker.restart()).unwrap();
    // The failed poll kept no ETags, so the next one re-publishes everything.
    let report = p.poll_cycle().await.expect("poll after recovery");
    assert_eq!(report.published(), 200);
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().unique_keys, 100);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analytics_outage_holds_records_instead_of_dead_lettering_them() {
    use mocks::faults::FaultConfig;
    let s = stack(200, 1).await;
    s.analytics.faults().set(FaultConfig {
        error_rate: 1.0,
        error_status: 503,
        retry_after_s: Some(1),
        ..Default::default()
    });
    poll(&s).await;
    let ready = s.ready.clone();
    wait_for("readiness to report the outage", || {
        let r = ready.clone();
        async move { r.snapshot().get("analytics") == Some(&false) }
    })
    .await;
    assert_eq!(s.analytics.stats().unique_keys, 0);
    s.analytics.faults().set(FaultConfig::default());
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().unique_keys, 200);
    assert_eq!(
        s.dlq_size().await.unwrap(),
        0,
        "an outage dead-letters nothing"
    );
    assert!(s.ready.is_ready(), "{:?}", s.ready.snapshot());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_delivery_budget_dead_letters_with_retries_exhausted() {
    use mocks::faults::FaultConfig;
    let mut s = stack(20, 0).await;
    let mut cfg = s.consumer_config();
    cfg.delivery_max_attempts = 2;
    cfg.delivery_max_backoff_ms = 20;
    s.spawn_consumer(cfg);
    s.analytics.faults().set(FaultConfig {
        error_rate: 1.0,
        error_status: 500,
        ..Default::default()
    });
    poll(&s).await;
    caught_up(&s).await;
    let dlq = read_topic(s.bootstrap_servers(), "analytics_DLQ", 20);
    assert_eq!(
        dlq.len(),
        20,
        "each record dead-lettered once, after the chunk was split down to it"
    );
    for m in &dlq {
        assert_eq!(
            header(m, "dlq.error.class").as_deref(),
            Some("retries_exhausted")
        );
        assert_eq!(header(m, "dlq.attempts").as_deref(), Some("2"));
        assert_eq!(header(m, "dlq.http.status").as_deref(), Some("500"));
        assert!(header(m, "dlq.first-failure-at").unwrap() <= header(m, "dlq.failed-at").unwrap());
    }
    assert_eq!(s.analytics.stats().unique_keys, 0);
    s.stop().await;
}
