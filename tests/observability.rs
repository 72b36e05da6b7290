//! Observability and security: every documented metric and every metric the Grafana dashboard
//! queries is exported; a real Prometheus scrapes the delivery counters; secrets never reach logs.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::monitoring::Prometheus;
use common::*;
use pipeline_kit::redis_server::{free_port, RedisServer};
use pipeline_kit::stack::Stack;

async fn scrape(url: &str) -> String {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    client.get(url).send().await.unwrap().text().await.unwrap()
}

fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// One stack for the scrape checks (they run in sequence: see the note on `observability`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_dashboard_and_a_real_prometheus_scrape() {
    let s = stack_with_metrics(50).await;
    let url = format!("http://{}/metrics", s.metrics_addr.unwrap());
    poll(&s).await;
    caught_up(&s).await;
    every_documented_and_dashboard_metric_is_exported(&url).await;
    a_real_prometheus_scrapes_the_delivery_counters(&s).await;
    s.stop().await;
}

async fn every_documented_and_dashboard_metric_is_exported(url: &str) {
    let url = url.to_owned();
    // Lag comes from librdkafka statistics, emitted every 5 s.
    let u = url.clone();
    wait_for("consumer lag in the scrape", || {
        let u = u.clone();
        async move { scrape(&u).await.contains("pipeline_consumer_lag_messages{") }
    })
    .await;
    let text = scrape(&url).await;
    let names = exported(&text);
    for m in pipeline_core::metrics::DOCUMENTED {
        assert!(names.contains(*m), "documented metric {m} is not exported");
    }
    assert!(
        text.contains("pipeline_consumer_records_delivered_total 50"),
        "{text}"
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/dashboards/pipeline.json").unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("pipeline_") {
                    used.insert(word.trim_end_matches("_bucket").to_owned());
                }
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for m in &used {
        assert!(
            names.contains(m),
            "dashboard queries {m}, which is not exported"
        );
    }
}

async fn a_real_prometheus_scrapes_the_delivery_counters(s: &Stack) {
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(
        dir.path(),
        &[("pipeline", s.metrics_addr.unwrap())],
        None,
        None,
    )
    .await;
    let sum = |expr: &'static str| {
        let prom = &prom;
        async move {
            let series = prom.query(expr).await?;
            series
                .first()
                .and_then(|v| v["value"][1].as_str())
                .and_then(|x| x.parse::<f64>().ok())
                .ok_or_else(|| format!("{expr}: {series:?}"))
        }
    };
    let value = common::wait_until("Prometheus to scrape the delivered counter", || {
        sum("sum(pipeline_consumer_records_delivered_total)")
    })
    .await;
    assert!(value >= 50.0, "delivered counter scraped as {value}");
    let published = sum("sum(pipeline_producer_records_published_total)")
        .await
        .unwrap();
    assert!(
        published >= 100.0,
        "published counter scraped as {published}"
    );
}

/// Every subcommand's `--help`, with secrets in every variable that may carry one.
#[test]
fn no_subcommand_help_shows_a_secret_from_the_environment() {
    let bin = env!("CARGO_BIN_EXE_pipeline");
    let env = [
        ("REDIS_URL", "redis://user:hunter2-redis@127.0.0.1:6379/"),
        ("ANALYTICS_TOKEN", "hunter2-token"),
        (
            "ANALYTICS_URL",
            "http://user:hunter2-analytics@127.0.0.1:8080",
        ),
        ("CRM_URL", "http://user:hunter2-crm@127.0.0.1:8081"),
        (
            "INVENTORY_URL",
            "http://user:hunter2-inventory@127.0.0.1:8082",
        ),
        ("KAFKA_PROP_SASL_PASSWORD", "hunter2-sasl"),
    ];
    let subcommands: [&[&str]; 12] = [
        &["up"],
        &["bench"],
        &["broker"],
        &["producer"],
        &["consumer"],
        &["dlq", "list"],
        &["dlq", "replay"],
        &["config", "check"],
        &["mock", "analytics"],
        &["mock", "crm"],
        &["mock", "inventory"],
        &["mock", "source"],
    ];
    for args in subcommands {
        let out = Command::new(bin)
            .args(args)
            .arg("--help")
            .envs(env)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && help.contains("Usage"),
            "{args:?}: {help}"
        );
        assert!(
            !help.contains("hunter2"),
            "{args:?} --help shows a secret: {help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_secrets_never_appear_in_logs_or_help() {
    let s = stack(30, 0).await;
    // A Redis that requires a password, so the URL must carry it.
    let port = free_port().unwrap();
    let redis = RedisServer::spawn_with(port, &["--requirepass", "hunter2-redis"]).unwrap();
    let redis_url = format!("redis://default:hunter2-redis@127.0.0.1:{port}/");
    let secrets = ["hunter2-redis", "hunter2-sasl", "hunter2-token"];
    let bin = env!("CARGO_BIN_EXE_pipeline");
    let env = [
        ("KAFKA_BOOTSTRAP_SERVERS", s.bootstrap_servers().to_owned()),
        ("REDIS_URL", redis_url.clone()),
        ("ANALYTICS_URL", s.analytics_url.clone()),
        ("ANALYTICS_TOKEN", "hunter2-token".to_owned()),
        ("KAFKA_PROP_SASL_PASSWORD", "hunter2-sasl".to_owned()),
        (
            "METRICS_ADDR",
            format!("127.0.0.1:{}", free_port().unwrap()),
        ),
        ("LOG_FORMAT", "json".to_owned()),
        (
            "RUST_LOG",
            "debug,rdkafka=info,librdkafka=info,hyper=info,reqwest=info,h2=info".to_owned(),
        ),
    ];
    let help = Command::new(bin)
        .args(["consumer", "--help"])
        .envs(env.clone())
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("REDIS_URL"));
    for secret in secrets {
        assert!(!help.contains(secret), "--help shows {secret}");
    }

    let log_path = std::env::temp_dir().join(format!("consumer-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut consumer = Command::new(bin)
        .arg("consumer")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    poll(&s).await;
    let analytics = s.analytics.clone();
    wait_for("deliveries by the consumer process", || {
        let a = analytics.clone();
        async move { a.stats().unique_keys >= 30 }
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &consumer.id().to_string()])
        .status();
    let _ = consumer.wait();
    drop(redis);
    let output = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(output.contains("consumer starting"), "{output}");
    assert!(
        output.contains("redacted"),
        "the Redis URL is logged redacted: {output}"
    );
    for secret in secrets {
        assert!(!output.contains(secret), "log output contains {secret}");
    }
    // JSON logs carry batch ids as fields.
    let batch_line = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "posting batch")
        .expect("a JSON log line per posted batch");
    assert_eq!(batch_line["batch_id"].as_str().map(str::len), Some(64));
    s.stop().await;
}
