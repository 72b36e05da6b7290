//! The Grafana dashboard proven against what the pipeline exports: a small pipeline runs, a
//! real Prometheus scrapes it, and every panel's PromQL from
//! `deploy/grafana/dashboards/pipeline.json` is evaluated through Prometheus's HTTP API. Each
//! must parse and return at least one series. Panels that show data only under a fault get that
//! fault first: a record Analytics rejects (DLQ records), Analytics answering 500 at times (HTTP
//! retries), and the broker stopped during a poll (producer delivery failures).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::monitoring::Prometheus;
use common::{caught_up, customer, poll, stack_with_metrics, wait_until};
use mocks::faults::FaultConfig;

/// Every (panel title, PromQL) of the dashboard.
fn panel_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("deploy/grafana/dashboards/pipeline.json").unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    let mut s = stack_with_metrics(300).await;
    let dir = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(
        dir.path(),
        &[("consumer", s.metrics_addr.unwrap())],
        None,
        None,
    )
    .await;

    // A customer whose email Analytics rejects (DLQ), and Analytics failing a third of the
    // requests (retries), during the first cycle.
    s.mock("crm")
        .unwrap()
        .upsert(customer("7", "Rejected", "no-at-sign"))
        .unwrap();
    s.analytics.faults().set(FaultConfig {
        error_rate: 0.3,
        error_status: 500,
        ..Default::default()
    });
    poll(&s).await;
    caught_up(&s).await;
    s.analytics.faults().set(FaultConfig::default());
    assert!(
        s.dlq_size().await.unwrap() >= 1,
        "the rejected record is dead-lettered"
    );

    // A poll while the broker is down: its records are not acknowledged. (A full export: the
    // saved ETags would make every page a 304 with nothing to publish.)
    let mut cfg = s.producer_config();
    cfg.message_timeout_ms = 2000;
    cfg.full_export = true;
    let p = producer::Producer::new(&cfg).await.unwrap();
    let broker = &mut s.kafka;
    tokio::task::block_in_place(|| broker.stop());
    assert!(
        p.poll_cycle().await.is_err(),
        "records were not acknowledged"
    );
    let broker = &mut s.kafka;
    tokio::task::block_in_place(|| broker.restart()).unwrap();

    let queries = panel_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, expr) in &queries {
        let series = wait_until(&format!("panel {title:?} to return a series"), || async {
            match prom.query(expr).await {
                Ok(series) if !series.is_empty() => Ok(series),
                Ok(_) => Err(format!("{expr}: no series yet")),
                Err(e) if e.contains("bad_data") => panic!("panel {title:?}: {expr}: {e}"),
                Err(e) => Err(e),
            }
        })
        .await;
        eprintln!("{title}: {expr} -> {} series", series.len());
    }
    s.stop().await;
}
