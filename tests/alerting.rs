//! The shipped alerts, end to end with the real programs: a consumer whose Analytics answers 401
//! halts delivery, Debian's Prometheus scrapes it and evaluates `deploy/prometheus/alerts.yml`
//! (its `for:` shortened to seconds), Debian's Alertmanager runs `deploy/alertmanager/
//! alertmanager.yml` as compose renders it, and both of its receivers (the JSON webhook and the
//! Slack-compatible one) post to this test; once the credentials work again the alert resolves.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::monitoring::{shipped_rules_with_for, Alertmanager, Prometheus, WebhookReceiver};
use common::{caught_up, poll, stack_with_metrics, wait_until};
use mocks::faults::FaultConfig;
use serde_json::Value;

/// The first webhook payload whose status is `status` and that carries `alertname`.
fn payload_with(posted: &[Value], status: &str, alertname: &str) -> Option<Value> {
    posted
        .iter()
        .find(|p| {
            p["status"] == status
                && p["alerts"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["labels"]["alertname"] == alertname))
        })
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_analytics_fires_delivery_halted_through_alertmanager_and_resolves() {
    let s = stack_with_metrics(200).await;
    let dir = tempfile::tempdir().unwrap();
    let receiver = WebhookReceiver::start().await;
    let am = Alertmanager::start(dir.path(), &receiver).await;
    let rules = shipped_rules_with_for("2s");
    let _prom = Prometheus::start(
        dir.path(),
        &[("consumer", s.metrics_addr.unwrap())],
        Some(&rules),
        Some(&am.addr),
    )
    .await;

    s.analytics.faults().set(FaultConfig {
        error_rate: 1.0,
        error_status: 401,
        ..Default::default()
    });
    poll(&s).await;
    let firing = wait_until("PipelineDeliveryHalted to reach the webhook", || async {
        let posted = receiver.posted_to("webhook");
        payload_with(&posted, "firing", "PipelineDeliveryHalted")
            .ok_or_else(|| format!("posted so far: {posted:?}"))
    })
    .await;
    eprintln!("firing webhook payload: {firing}");
    let alert = firing["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "PipelineDeliveryHalted")
        .unwrap()
        .clone();
    assert_eq!(alert["status"], "firing");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(
        alert["annotations"]["runbook"],
        "docs/operations.md#pipelinedeliveryhalted"
    );
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("401/403"),
        "{alert}"
    );
    assert_eq!(firing["receiver"], "on-call");
    // The Slack-compatible receiver got the same alert in Slack's message format.
    let slack = wait_until(
        "the alert to reach the Slack-compatible receiver",
        || async {
            let posted = receiver.posted_to("slack");
            posted
                .iter()
                .find(|p| p.to_string().contains("[FIRING] PipelineDeliveryHalted"))
                .cloned()
                .ok_or_else(|| format!("posted so far: {posted:?}"))
        },
    )
    .await;
    eprintln!("firing Slack payload: {slack}");
    assert!(slack["attachments"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Runbook: docs/operations.md#pipelinedeliveryhalted"));

    // The credentials work again: everything is delivered and the alert resolves.
    s.analytics.faults().set(FaultConfig::default());
    caught_up(&s).await;
    let resolved = wait_until(
        "PipelineDeliveryHalted to resolve at the webhook",
        || async {
            let posted = receiver.posted_to("webhook");
            payload_with(&posted, "resolved", "PipelineDeliveryHalted")
                .ok_or_else(|| format!("posted so far: {posted:?}"))
        },
    )
    .await;
    eprintln!("resolved webhook payload: {resolved}");
    assert_eq!(s.analytics.stats().unique_keys, 200);
    assert_eq!(s.dlq_size().await.unwrap(), 0);
    s.stop().await;
}
