//! Shared helpers of the component and process-level tests: an embedded stack with a real
//! redis-server and the embedded Kafka over sockets, a raw Kafka writer/reader, and waiting on
//! conditions with deadlines.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use pipeline::stack::{Stack, StackConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Map, Value};

/// Generous: deadlines only bound failures, and CI runs many process tests on two cores.
pub const DEADLINE: Duration = Duration::from_secs(180);

pub fn init_logs() {
    pipeline_core::telemetry::init("warn");
}

/// A stack with `consumers` workers and `n` customers and products.
pub async fn stack(n: u64, consumers: usize) -> Stack {
    init_logs();
    Stack::start(StackConfig {
        customers: n,
        products: n,
        consumers,
        batch_size: 100,
        page_size: 500,
        ..StackConfig::default()
    })
    .await
    .expect("embedded stack starts (is redis-server installed?)")
}

/// One producer cycle against the stack.
pub async fn poll(stack: &Stack) -> producer::CycleReport {
    let p = producer::Producer::new(&stack.producer_config())
        .await
        .expect("producer starts");
    p.poll_cycle().await.expect("poll cycle succeeds")
}

/// Waits until the consumer group has committed everything.
pub async fn caught_up(stack: &Stack) {
    stack
        .wait_caught_up(DEADLINE, |_| {})
        .await
        .expect("consumers catch up");
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

pub fn customer(id: &str, name: &str, email: &str) -> Map<String, Value> {
    object(json!({"id": id, "name": name, "email": email}))
}

pub fn product(id: &str, name: &str) -> Map<String, Value> {
    object(json!({"id": id, "name": name, "sku": format!("SKU-{id}"), "price": 9.5, "stock": 3}))
}

/// Writes raw messages straight into a topic (as kcat or a foreign producer would).
pub async fn produce_raw(bootstrap: &str, topic: &str, key: Option<&str>, value: &[u8]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    let mut r: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(value);
    if let Some(k) = key {
        r = r.key(k);
    }
    p.send(r, Duration::from_secs(10))
        .await
        .expect("raw produce acknowledged");
}

/// Reads every message currently in `topic`, waiting until at least `min` arrived.
pub fn read_topic(bootstrap: &str, topic: &str, min: usize) -> Vec<OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    let mut idle_since = Instant::now();
    loop {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(m.detach());
                idle_since = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {
                if out.len() >= min && idle_since.elapsed() > Duration::from_millis(500) {
                    return out;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {min} messages in {topic}",
            out.len()
        );
    }
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
pub mod procs;

/// Sets the dynamic configs of `topic` with the AdminClient (`kafka-configs --alter`). Not
/// incremental: configs not named return to the broker's defaults.
pub async fn set_topic_config(bootstrap: &str, topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (key, value) in configs {
        change = change.set(key, value);
    }
    let results = admin
        .alter_configs(&[change], &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        assert!(r.is_ok(), "setting {configs:?} on {topic}: {r:?}");
    }
}
