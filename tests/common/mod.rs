//! Shared helpers of the component and process-level tests: an embedded stack with a real
//! redis-server and the embedded Kafka over sockets, a raw Kafka writer/reader, and waiting on
//! conditions with deadlines.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use pipeline_kit::stack::{Stack, StackConfig};
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

/// A stack of one worker with `n` customers and products, its `/metrics` on a free port (for a
/// real Prometheus to scrape).
pub async fn stack_with_metrics(n: u64) -> Stack {
    init_logs();
    Stack::start(StackConfig {
        customers: n,
        products: n,
        consumers: 1,
        metrics_addr: Some(([127, 0, 0, 1], 0).into()),
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
    wait_until(what, || {
        let done = cond();
        async move { done.await.then_some(()).ok_or_else(|| "not yet".to_owned()) }
    })
    .await
}

/// Polls `probe` every 50 ms until it returns `Ok`, whose value it returns. `Err` describes the
/// state seen, and the last one is in the panic message when the deadline passes.
pub async fn wait_until<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    wait_until_paced(what, Duration::from_millis(50), probe).await
}

/// [`wait_until`] polling every `pace` (for probes that write, or are slow).
pub async fn wait_until_paced<T, F, Fut>(what: &str, pace: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {seen}"
            ),
        }
        tokio::time::sleep(pace).await;
    }
}

/// The value of a series of this process's metrics (`name` or `name{label="v"}`), as
/// `/metrics` exports it.
pub fn metric(series: &str) -> f64 {
    pipeline_core::metrics::sum_of(&pipeline_core::metrics::metrics().render(), series)
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

/// Reads every message of `topic` up to its end offsets (the high watermarks when it looks),
/// and again to the new ends until at least `min` were read.
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
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    loop {
        // (partition, log start, end): read up to the end offset of each.
        let ends: Vec<(i32, i64, i64)> = partitions
            .iter()
            .map(|&p| {
                let (low, high) = c
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, low, high)
            })
            .collect();
        loop {
            let position = c.position().expect("position");
            let at_end = ends.iter().all(|&(p, low, high)| {
                let next = match position.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                next >= high
            });
            if at_end {
                break;
            }
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(m.detach()),
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
            assert!(
                Instant::now() < deadline,
                "{topic} not read to its end offsets {ends:?} ({} read)",
                out.len()
            );
        }
        if out.len() >= min {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {min} messages in {topic}",
            out.len()
        );
        std::thread::sleep(Duration::from_millis(50));
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
pub mod monitoring;
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
