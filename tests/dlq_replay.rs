//! `pipeline dlq list` / `replay` against a real DLQ: re-delivery with the original keys,
//! idempotent on a second run, superseded views skipped, unparseable records reported.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::*;
use consumer::dlq::{self, ReplayConfig};
use mocks::faults::FaultConfig;
use pipeline_core::kafka::KafkaConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_redelivers_once_and_never_regresses_a_view() {
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
    produce_raw(
        s.bootstrap_servers(),
        "customer_data",
        Some("bad"),
        b"{oops",
    )
    .await;
    caught_up(&s).await;
    assert_eq!(s.dlq_size().await.unwrap(), 21);

    // Analytics recovers; customer 5 changes, so its dead-lettered view is superseded.
    s.analytics.faults().set(FaultConfig::default());
    s.mock("crm")
        .unwrap()
        .upsert(customer("5", "Changed", "five@example.com"))
        .unwrap();
    poll(&s).await;
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().unique_keys, 1);

    let kafka = KafkaConfig::new(s.bootstrap_servers());
    let listing = dlq::list(&dlq::read_all(&kafka, "analytics_DLQ").unwrap(), 3);
    assert_eq!(listing.total, 21);
    assert_eq!(listing.by_stage["deliver"], 20);
    assert_eq!(listing.by_class["retries_exhausted"], 20);
    assert_eq!(listing.by_class["invalid_json"], 1);
    assert_eq!(listing.samples.len(), 3);

    let mut consumer = s.consumer_config();
    consumer.batch_size = 7;
    let mut config = ReplayConfig {
        consumer,
        stage: None,
        dry_run: true,
    };
    let token = CancellationToken::new();
    let dry = dlq::replay(&config, &token).await.unwrap();
    assert_eq!(
        (dry.would_redeliver, dry.superseded, dry.redelivered),
        (19, 1, 0)
    );
    assert_eq!(dry.not_replayable.len(), 1);
    assert!(
        dry.not_replayable[0].reason.contains("still invalid"),
        "{:?}",
        dry.not_replayable
    );
    assert_eq!(
        s.analytics.stats().unique_keys,
        1,
        "a dry run sends nothing"
    );

    config.dry_run = false;
    let first = dlq::replay(&config, &token).await.unwrap();
    assert_eq!(
        (first.redelivered, first.already_delivered, first.superseded),
        (19, 0, 1)
    );
    let received = s.analytics.stats().records_received;
    let second = dlq::replay(&config, &token).await.unwrap();
    assert_eq!(
        (
            second.redelivered,
            second.already_delivered,
            second.superseded
        ),
        (0, 19, 1),
        "{second:?}"
    );
    assert_eq!(
        s.analytics.stats().records_received,
        received,
        "a second replay sends nothing"
    );

    let stats = s.analytics.stats();
    assert_eq!(
        (stats.unique_keys, stats.unique_ids, stats.duplicates),
        (20, 20, 0)
    );
    assert_eq!(
        s.analytics.latest_by_id()["5"]["customer"]["name"],
        "Changed",
        "replay did not regress id 5"
    );

    // A re-poll after replay sends nothing: the replayed keys are confirmed in Redis.
    let before = s.analytics.stats().records_received;
    poll(&s).await;
    caught_up(&s).await;
    assert_eq!(s.analytics.stats().records_received, before);
    s.stop().await;
}
