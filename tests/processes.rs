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

use common::procs::{get_json, kcat_count, Cluster};
use common::DEADLINE;

const N: u64 = 3000;

/// Freezes a consumer at `failpoint`, kills it with SIGKILL, and checks the recovery.
async fn kill_at(failpoint: &str) {
    let mut c = Cluster::start(N, &["--fault-latency-ms", "20"]).await;
    let marker = c.path("failpoint");
    let marker_s = marker.to_str().unwrap().to_owned();
    let victim = c.consumer(
        "victim",
        &[
            ("PIPELINE_FAILPOINT", failpoint),
            ("PIPELINE_FAILPOINT_FILE", &marker_s),
        ],
    );
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
    let bs = c.bootstrap.clone();
    let dlq = tokio::task::spawn_blocking(move || kcat_count(&bs, "analytics_DLQ"))
        .await
        .unwrap();
    assert_eq!(dlq, 0, "nothing dead-lettered");
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
    let bs = c.bootstrap.clone();
    let counts = tokio::task::spawn_blocking(move || {
        (
            kcat_count(&bs, "customer_data"),
            kcat_count(&bs, "inventory_data"),
            kcat_count(&bs, "analytics_DLQ"),
        )
    })
    .await
    .unwrap();
    assert_eq!(counts, (N as usize, N as usize, 0));
}
