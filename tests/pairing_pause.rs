//! A side whose fetch runs ahead of the other's is paused and resumed (see `consumer::pairing`)
//! without losing, skipping or re-reading a message. Its own test binary, because it reads the
//! process-wide metrics registry.

mod common;

use common::*;

/// The customers are all published before any product, so at first only the customer side
/// arrives: with 40-message batches, a customer partition that has buffered 20 while its
/// product partition holds nothing is paused, released unpaired by the linger, and resumed.
/// Then the products arrive and every id is delivered once, each message consumed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_that_runs_ahead_is_paused_and_resumed_without_loss() {
    let n = 3000;
    let mut s = stack(n, 0).await;
    let producer = producer::Producer::new(&s.producer_config())
        .await
        .expect("producer starts");
    let paused = || common::metric("pipeline_consumer_sides_paused_total");
    let paused_before = paused();
    let consumed = |topic: &str| {
        common::metric(&format!(
            "pipeline_consumer_messages_consumed_total{{topic=\"{topic}\"}}"
        )) as u64
    };
    let topics = s.topics();
    let consumed_before = (
        consumed(&topics.customer_topic),
        consumed(&topics.inventory_topic),
    );
    let mut config = s.consumer_config();
    config.batch_max_messages = 40;
    s.spawn_consumer(config);

    let customers = producer.poll_source(0).await.expect("customers polled");
    assert_eq!((customers.source.as_str(), customers.published), ("crm", n));
    wait_for("the customer side to be paused", || async {
        paused() > paused_before
    })
    .await;
    let products = producer.poll_source(1).await.expect("products polled");
    assert_eq!(
        (products.source.as_str(), products.published),
        ("inventory", n)
    );
    caught_up(&s).await;

    let stats = s.analytics.stats();
    assert_eq!((stats.unique_keys, stats.duplicates), (n, 0));
    assert_eq!(
        (
            consumed(&topics.customer_topic) - consumed_before.0,
            consumed(&topics.inventory_topic) - consumed_before.1,
        ),
        (n, n),
        "every message consumed exactly once across the pauses"
    );
    assert_eq!(s.dlq_size().await.expect("DLQ size"), 0);
    s.stop().await;
}
