//! Sources and joins declared in a pipeline file (issue 5): the example three-source file on the
//! embedded stack, twelve configured sources with two of them failing, `pipeline config check`,
//! and the fault-suite guarantees for the third (optional) side across processes: `kill -9`
//! mid-delivery, re-polls that deliver nothing, and incremental sync surviving a producer
//! `kill -9`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::{get_json, Cluster, BIN};
use common::wait_for;
use mocks::faults::FaultConfig;
use pipeline_core::lag::LagProbe;
use pipeline_core::pipeline_config::{
    IncrementalConfig, JoinConfig, JoinSide, MockSourceConfig, Pagination, PipelineConfig,
    RetryConfig, SourceConfig,
};
use pipeline_kit::stack::{Stack, StackConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn example(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_source_example_joins_the_optional_side() {
    common::init_logs();
    let pipeline = PipelineConfig::load(&example("three-sources.toml")).unwrap();
    let stack = Stack::start(StackConfig {
        consumers: 2,
        batch_size: 200,
        pipeline: Some(pipeline),
        ..StackConfig::default()
    })
    .await
    .unwrap();
    let producer = producer::Producer::new(&stack.producer_config())
        .await
        .unwrap();
    let report = producer.poll_cycle().await.unwrap();
    for source in ["crm", "inventory", "pricing"] {
        assert_eq!(report.source(source).unwrap().published, 1000, "{source}");
    }
    common::caught_up(&stack).await;
    let latest = stack.analytics.latest_by_id();
    assert_eq!(latest.len(), 1000);
    for (id, view) in &latest {
        assert_eq!(view["customer"]["id"].to_string(), *id, "{view}");
        assert_eq!(view["inventory"]["id"].to_string(), *id, "{view}");
        assert_eq!(view["pricing"]["product_id"].to_string(), *id, "{view}");
    }
    let stats = stack.analytics.stats();
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    assert_eq!(stack.dlq_size().await.unwrap(), 0);
    // A price change is one new view of that id, chained to its previous one.
    let before = stack.analytics.history("7").len();
    stack
        .mock("pricing")
        .unwrap()
        .upsert(common::object(
            json!({"product_id": 7, "currency": "EUR", "list_price": 1.0}),
        ))
        .unwrap();
    let again = producer.poll_cycle().await.unwrap();
    assert_eq!(
        again.source("crm").unwrap().fetched,
        0,
        "ETags: unchanged pages are 304s"
    );
    common::caught_up(&stack).await;
    let history = stack.analytics.history("7");
    assert_eq!(history.len(), before + 1);
    assert_eq!(history.last().unwrap()["pricing"]["list_price"], 1.0);
    // The cursor moved to that change and was saved in the source-state topic, with the page
    // ETags: a new producer gets 304s from CRM and asks Pricing only for what changed since
    // (inclusive, so the boundary record comes again and is dropped as unchanged).
    let restarted = producer::Producer::new(&stack.producer_config())
        .await
        .unwrap();
    let third = restarted.poll_cycle().await.unwrap();
    let pricing = third.source("pricing").unwrap();
    assert_eq!(pricing.fetched, 1, "{pricing:?}");
    assert!(pricing.updated_since.is_some());
    let crm = third.source("crm").unwrap();
    assert_eq!(crm.fetched, 0, "{crm:?}");
    assert_eq!(crm.pages_not_modified, crm.pages, "{crm:?}");
    common::caught_up(&stack).await;
    assert_eq!(stack.analytics.history("7").len(), before + 1);
    assert_eq!(
        stack.analytics.stats().records_received,
        stats.records_received + 1
    );
    stack.stop().await;
}

/// Source `i` of the twelve: every pagination style, one entity mock each.
fn source(i: usize, records: u64) -> SourceConfig {
    let pagination = match i % 4 {
        0 => Pagination::Page {
            page_param: "page".into(),
            size_param: "per_page".into(),
            size: 100,
        },
        1 => Pagination::Offset {
            offset_param: "offset".into(),
            size_param: "limit".into(),
            size: 100,
        },
        2 => Pagination::Cursor {
            cursor_param: "cursor".into(),
            size_param: "limit".into(),
            size: 100,
            next_cursor_field: "next_cursor".into(),
        },
        _ => Pagination::Link {
            size_param: "limit".into(),
            size: 100,
        },
    };
    let entity = ["customers", "products", "pricing"][i % 3];
    SourceConfig {
        name: format!("s{i:02}"),
        base_url: "http://127.0.0.1:1".into(),
        path: format!("/s{i:02}"),
        entity: entity.trim_end_matches('s').into(),
        schema: None,
        topic: format!("s{i:02}_data"),
        partitions: 3,
        id_field: if entity == "pricing" {
            "product_id"
        } else {
            "id"
        }
        .into(),
        updated_at_field: "updated_at".into(),
        records_field: None,
        interval_s: 1,
        timeout_ms: 300,
        rate_limit_per_s: None,
        pagination,
        auth: None,
        retry: RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 50,
            max_backoff_ms: 200,
        },
        incremental: IncrementalConfig::default(),
        mock: Some(MockSourceConfig {
            entity: entity.into(),
            records,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_sources_publish_and_failing_ones_do_not_delay_the_others() {
    common::init_logs();
    const RECORDS: u64 = 700;
    let sources: Vec<SourceConfig> = (0..12).map(|i| source(i, RECORDS)).collect();
    let pipeline = PipelineConfig {
        origin: "twelve".into(),
        join: JoinConfig {
            sides: vec![
                JoinSide {
                    name: "a".into(),
                    topic: sources[0].topic.clone(),
                    required: true,
                },
                JoinSide {
                    name: "b".into(),
                    topic: sources[1].topic.clone(),
                    required: true,
                },
            ],
        },
        sources,
    };
    let stack = Stack::start(StackConfig {
        consumers: 0,
        partitions: 3,
        pipeline: Some(pipeline),
        ..StackConfig::default()
    })
    .await
    .unwrap();
    // s10 answers 500 to everything; s11 answers after 2 s (its timeout is 300 ms).
    let (broken, slow) = (stack.mock("s10").unwrap(), stack.mock("s11").unwrap());
    broken.faults().set(FaultConfig {
        error_rate: 1.0,
        error_status: 500,
        ..FaultConfig::default()
    });
    slow.faults().set(FaultConfig {
        latency_ms: 2000,
        ..FaultConfig::default()
    });
    let shutdown = CancellationToken::new();
    let mut config = stack.producer_config();
    config.metrics_addr = None;
    let producer = tokio::spawn(producer::run(config, shutdown.clone()));

    let probe = Arc::new(stack.lag_probe().unwrap());
    let sizes = |probe: Arc<LagProbe>, topics: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .map(|t| probe.topic_size(t, Duration::from_secs(5)).unwrap())
                .collect::<Vec<i64>>()
        })
        .await
        .unwrap()
    };
    let healthy: Vec<String> = (0..10).map(|i| format!("s{i:02}_data")).collect();
    let started = Instant::now();
    let all_published = |topics: &Vec<String>| {
        let (probe, topics) = (probe.clone(), topics.clone());
        async move {
            sizes(probe, topics)
                .await
                .iter()
                .all(|n| *n == RECORDS as i64)
        }
    };
    wait_for("the ten healthy sources to be published", || {
        all_published(&healthy)
    })
    .await;
    let healthy_s = started.elapsed().as_secs_f64();
    // While the ten were published, the failing two kept failing and published nothing.
    let failing = vec!["s10_data".to_string(), "s11_data".to_string()];
    assert_eq!(sizes(probe.clone(), failing.clone()).await, [0, 0]);
    assert!(broken.faults().requests() > 0 && slow.faults().requests() > 0);
    eprintln!("10 healthy sources published in {healthy_s:.2} s while 2 failed");

    // s10's 500s fail its poll (after its retries; on a loaded machine that can come after the
    // ten healthy sources were published, so wait for it before healing).
    let s10_failures =
        || async { common::metric("pipeline_producer_poll_failures_total{source=\"s10\"}") >= 1.0 };
    wait_for("a failed poll of s10 to be counted", s10_failures).await;

    // Healed, they are re-polled on their next interval and catch up; nothing is duplicated.
    broken.faults().set(FaultConfig::default());
    slow.faults().set(FaultConfig::default());
    wait_for("the healed sources to be published", || {
        all_published(&failing)
    })
    .await;
    shutdown.cancel();
    producer.await.unwrap().unwrap();
    let all: Vec<String> = (0..12).map(|i| format!("s{i:02}_data")).collect();
    assert!(
        all_published(&all).await,
        "exactly {RECORDS} per topic: none duplicated"
    );
    stack.stop().await;
}

#[test]
fn config_check_accepts_the_example_and_names_the_broken_key() {
    let ok = std::process::Command::new(BIN)
        .args(["config", "check"])
        .arg(example("three-sources.toml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("pricing") && out.contains("optional"), "{out}");

    let bad = std::process::Command::new(BIN)
        .args(["config", "check"])
        .arg(example("broken.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(
        err.contains("broken.toml:10:") && err.contains("intervall_s"),
        "the error names the line and key: {err}"
    );

    // A missing secret is named too, before anything starts.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example("three-sources.toml"))
        .unwrap()
        .replace("# auth = { header", "auth = { header");
    let f = dir.path().join("auth.toml");
    std::fs::write(&f, text).unwrap();
    let missing = std::process::Command::new(BIN)
        .args(["config", "check"])
        .arg(&f)
        .env_remove("PRICING_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sources[2] (pricing).auth.value_env") && err.contains("PRICING_TOKEN"),
        "{err}"
    );
}

const N: u64 = 2000;

/// Completed polls of the pricing source by the last producer started.
async fn pricing_polls(c: &Cluster) -> u64 {
    c.producer_metric("pipeline_producer_poll_duration_seconds_count{source=\"pricing\"}")
        .await as u64
}

/// Latest views held by Analytics, by id.
async fn latest(c: &Cluster) -> Vec<Value> {
    get_json(&format!("{}/analytics/data?latest=true", c.analytics_url))
        .await
        .unwrap()["records"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until every id's latest view carries its price.
async fn wait_all_priced(c: &Cluster) -> Vec<Value> {
    common::wait_until("every id's latest view priced", || async {
        let views = latest(c).await;
        let priced = views.iter().filter(|v| !v["pricing"].is_null()).count();
        if views.len() as u64 == N && priced as u64 == N {
            return Ok(views);
        }
        Err(format!(
            "{} ids, {priced} priced; Analytics: {}",
            views.len(),
            c.stats().await
        ))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_source_kill_9_with_a_post_in_flight() {
    let mut c = Cluster::start_with_pricing(N, &["--fault-latency-ms", "20"]).await;
    let (victim, marker) = c.consumer_frozen_at("victim", "during_post", &[]);
    let second = c.consumer("consumer-2", &[]);
    // The victim must hold partitions when the records come, or it may never post.
    c.wait_assigned(&[victim, second], 18.0).await;
    c.producer(2);
    common::wait_for("the failpoint to be reached", || async { marker.exists() }).await;
    c.procs.kill9(victim);
    c.consumer("consumer-3", &[]);
    wait_all_priced(&c).await;
    // Lag 0 and no DLQ: every message of the three topics was processed, nothing dead-lettered.
    common::wait_until("lag 0", || async {
        let (lag, dlq) = c.lag_then_dlq().await;
        assert_eq!(dlq, 0, "nothing dead-lettered");
        if lag == 0 {
            Ok(())
        } else {
            Err(format!("lag {lag}"))
        }
    })
    .await;
    let stats = c.stats().await;
    eprintln!("three sources, kill -9 during a POST: {stats}");
    // Every delivered record is a distinct view: re-sends after the kill were dropped by key.
    let keys = stats["unique_keys"].as_u64().unwrap();
    assert!((N..=2 * N).contains(&keys), "{stats}");
    assert_eq!(stats["unique_ids"], N);
    c.procs.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_source_re_polls_deliver_nothing_and_its_cursor_survives_a_producer_kill() {
    let mut c = Cluster::start_with_pricing(N, &[]).await;
    c.consumer("consumer-1", &[]);
    c.consumer("consumer-2", &[]);
    let producer = c.producer(1);
    wait_all_priced(&c).await;
    let settled = c.stats().await;
    // Three more polls of unchanged data: nothing reaches Analytics.
    let start = pricing_polls(&c).await;
    wait_for("three more polls", || async {
        pricing_polls(&c).await >= start + 3
    })
    .await;
    let (lag, _) = c.lag_then_dlq().await;
    let after = c.stats().await;
    assert_eq!(
        after["records_received"], settled["records_received"],
        "lag {lag}: {after}"
    );

    // A price change moves the pricing cursor (saved once its poll is fully published: wait
    // for the poll after the one that carried it).
    let (pricing_url, analytics_url) = (c.pricing_url.clone().unwrap(), c.analytics_url.clone());
    let set_price = |id: u64, price: f64| {
        let pricing = pricing_url.clone();
        async move {
            let r = reqwest::Client::new()
                .post(format!("{pricing}/pricing"))
                .json(&json!({"product_id": id, "currency": "EUR", "list_price": price}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    };
    let priced = |id: u64, price: f64| {
        let url = format!("{analytics_url}/analytics/data?id={id}");
        async move {
            let h = get_json(&url).await.unwrap_or_default();
            h["records"]
                .as_array()
                .and_then(|r| r.last())
                .is_some_and(|v| v["pricing"]["list_price"] == price)
        }
    };
    set_price(41, 0.25).await;
    wait_for("the first changed price", || priced(41, 0.25)).await;
    let seen = pricing_polls(&c).await;
    wait_for("the poll after it", || async {
        pricing_polls(&c).await >= seen + 2
    })
    .await;

    // Another price changes while the producer is killed; a new producer resumes from the
    // saved cursor: it fetches only what changed since (not 2,000 records), delivered once.
    c.procs.kill9(producer);
    set_price(42, 0.5).await;
    c.producer(1);
    wait_for("the second changed price", || priced(42, 0.5)).await;
    let fetched = c
        .producer_metric("pipeline_producer_records_fetched_total{source=\"pricing\"}")
        .await;
    let crm = c
        .producer_metric("pipeline_producer_records_fetched_total{source=\"crm\"}")
        .await;
    // Each poll of the new producer asks from the cursor (inclusive): 2 records on the first,
    // then the boundary record again on each later one; never the 2,000 of a full export.
    assert!(
        fetched < 20.0,
        "pricing resumed from its cursor: {fetched} fetched"
    );
    assert_eq!(
        crm, 0.0,
        "crm (no cursor) answered 304 to the page ETags the killed producer saved: {crm}"
    );
    let end = c.stats().await;
    assert_eq!(end["duplicates"], settled["duplicates"], "{end}");
    assert_eq!(
        end["unique_keys"].as_u64().unwrap(),
        settled["unique_keys"].as_u64().unwrap() + 2,
        "exactly one new view per change: {end}"
    );
    c.procs.assert_running();
}
