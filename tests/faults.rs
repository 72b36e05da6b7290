//! Component fault tests: Redis hung and emptied, Analytics refusing credentials, throttling and
//! failing a third of its requests, on the embedded stack. Each checks that nothing is lost,
//! nothing is applied twice at Analytics, and outages are not dead-lettered.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::process::Command;

use common::*;
use mocks::faults::FaultConfig;

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

async fn wait_ready(s: &pipeline_kit::stack::Stack, check: &str, want: bool) {
    let ready = s.ready.clone();
    let check = check.to_owned();
    wait_for(&format!("readiness {check}={want}"), || {
        let (r, c) = (ready.clone(), check.clone());
        async move { r.snapshot().get(&c) == Some(&want) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_pauses_delivery_and_loses_nothing() {
    let s = stack(1000, 1).await;
    let pid = s.redis_server.as_ref().unwrap().pid();
    signal(pid, "-STOP");
    poll(&s).await;
    wait_ready(&s, "redis", false).await;
    assert_eq!(
        s.analytics.stats().unique_keys,
        0,
        "no delivery bypasses dedup"
    );
    signal(pid, "-CONT");
    caught_up(&s).await;
    let stats = s.analytics.stats();
    assert_eq!((stats.unique_keys, stats.duplicates), (1000, 0));
    assert_eq!(s.dlq_size().await.unwrap(), 0);
    wait_ready(&s, "redis", true).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_emptied_and_replayed_from_earliest_applies_nothing_twice() {
    let mut s = stack(500, 1).await;
    poll(&s).await;
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().unique_keys, 500);
    let port = s.redis_server.as_ref().unwrap().port().to_string();
    let out = Command::new("redis-cli")
        .args(["-p", &port, "FLUSHALL"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // A new group replays both topics from the earliest offset against the empty Redis.
    let mut cfg = s.consumer_config();
    cfg.group_id = "replay-from-earliest".into();
    s.spawn_consumer(cfg);
    let analytics = s.analytics.clone();
    wait_for("the replay to reach Analytics", || {
        let a = analytics.clone();
        async move { a.stats().records_received >= 1000 }
    })
    .await;
    let stats = s.analytics.stats();
    assert_eq!(
        stats.unique_keys, 500,
        "the same views get the same keys: {stats:?}"
    );
    assert_eq!(
        stats.duplicates, 500,
        "every replayed view was recognised by its key"
    );
    assert_eq!(s.dlq_size().await.unwrap(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_halts_delivery_without_flooding_the_dlq() {
    let s = stack(300, 1).await;
    s.analytics.faults().set(FaultConfig {
        error_rate: 1.0,
        error_status: 401,
        ..Default::default()
    });
    poll(&s).await;
    wait_ready(&s, "analytics", false).await;
    assert!(!s.ready.is_ready());
    s.analytics.faults().set(FaultConfig::default());
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().unique_keys, 300);
    assert_eq!(
        s.dlq_size().await.unwrap(),
        0,
        "a credentials fault dead-letters nothing"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_30_percent_server_errors_still_deliver_everything_once() {
    let s = stack(2000, 2).await;
    s.analytics.faults().set(FaultConfig {
        error_rate: 0.3,
        error_status: 500,
        ..Default::default()
    });
    poll(&s).await;
    let analytics = s.analytics.clone();
    wait_for("half the records under 500s", || {
        let a = analytics.clone();
        async move { a.stats().unique_keys >= 1000 }
    })
    .await;
    s.analytics.faults().set(FaultConfig {
        error_rate: 0.5,
        error_status: 429,
        retry_after_s: Some(1),
        ..Default::default()
    });
    caught_up(&s).await;
    let stats = s.analytics.stats();
    assert_eq!((stats.unique_keys, stats.duplicates), (2000, 0));
    assert_eq!(s.dlq_size().await.unwrap(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_batch_is_split_until_the_bad_record_is_isolated() {
    let s = stack(300, 1).await;
    s.analytics.set_reject_batches(true);
    s.mock("crm")
        .unwrap()
        .upsert(customer("150", "No Email", "nowhere"))
        .unwrap();
    poll(&s).await;
    caught_up(&s).await;
    let stats = s.analytics.stats();
    assert_eq!((stats.unique_keys, stats.duplicates), (299, 0));
    let dlq = read_topic(s.bootstrap_servers(), "analytics_DLQ", 1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], "dlq.http.status").as_deref(), Some("422"));
    assert_eq!(
        header(&dlq[0], "dlq.error.class").as_deref(),
        Some("rejected")
    );
    assert_eq!(rdkafka::Message::key(&dlq[0]), Some(b"150".as_slice()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_timeouts_are_retried_without_loss() {
    let mut s = stack(300, 0).await;
    let mut cfg = s.consumer_config();
    cfg.http_timeout_ms = 300;
    cfg.delivery_max_attempts = 20;
    cfg.delivery_max_backoff_ms = 200;
    s.spawn_consumer(cfg);
    s.analytics.faults().set(FaultConfig {
        latency_ms: 1000,
        ..Default::default()
    });
    poll(&s).await;
    let analytics = s.analytics.clone();
    wait_for("three timed-out POSTs", || {
        let a = analytics.clone();
        async move { a.faults().requests() >= 3 }
    })
    .await;
    s.analytics.faults().set(FaultConfig::default());
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().unique_keys, 300);
    assert_eq!(s.dlq_size().await.unwrap(), 0);
    s.stop().await;
}
