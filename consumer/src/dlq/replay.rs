//! `pipeline dlq list` and `pipeline dlq replay`: inspect the dead-letter topic and re-deliver
//! what can be re-delivered.
//!
//! Replay is idempotent and never regresses data:
//! * `deliver` records are merged records carrying their idempotency key. One is re-sent only if
//!   it is still the latest view of its id (the join state's current key); otherwise it is
//!   reported as superseded, since sending it would make Analytics hold an older view. Analytics
//!   dedups on the key, so replaying twice re-sends nothing new.
//! * `parse`/`validate` records are re-validated; those that now pass are re-published to their
//!   original topic keyed by id (the join ignores content it already holds), the rest are
//!   reported with the reason they still fail.
//!
//! The DLQ itself is append-only; replay writes nothing back to it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::delivery::AnalyticsClient;
use crate::join::{Emission, JoinSpec, Origin};
use crate::store::JoinStore;
use crate::ConsumerConfig;
use anyhow::Context;
use pipeline_core::dlq;
use pipeline_core::kafka::{self, KafkaConfig};
use pipeline_core::metrics::Readiness;
use pipeline_core::record::parse_record_shaped;
use pipeline_core::retry::RetryPolicy;
use pipeline_core::topics::TopicsConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// `pipeline dlq ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// Count dead letters by stage and error class, with sample records.
    List {
        #[command(flatten)]
        kafka: KafkaConfig,
        #[command(flatten)]
        topics: TopicsConfig,
        /// Sample records to show.
        #[arg(long, default_value_t = 5)]
        samples: usize,
    },
    /// Re-deliver dead letters with their original idempotency keys.
    Replay(Box<ReplayConfig>),
}

/// Settings of `pipeline dlq replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayConfig {
    /// The consumers' own settings (Kafka, topics, Redis, Analytics, batch size): replay runs
    /// with the same environment as the consumer deployment.
    #[command(flatten)]
    pub consumer: ConsumerConfig,
    /// Only records of this stage (parse, validate, join, deliver).
    #[arg(long, value_parser = ["parse", "validate", "join", "deliver"])]
    pub stage: Option<String>,
    /// Report what would be replayed without doing it.
    #[arg(long)]
    pub dry_run: bool,
}

/// Summary of `dlq list`.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub total: usize,
    pub by_stage: BTreeMap<String, usize>,
    pub by_class: BTreeMap<String, usize>,
    pub samples: Vec<Value>,
}

/// A dead letter that replay could not handle.
#[derive(Debug, Serialize)]
pub struct NotReplayed {
    pub partition: i32,
    pub offset: i64,
    pub stage: String,
    pub reason: String,
}

/// Outcome of `dlq replay`.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub scanned: usize,
    pub selected: usize,
    /// Merged records Analytics accepted now.
    pub redelivered: u64,
    /// Merged records already delivered (by a previous replay), not sent again.
    pub already_delivered: u64,
    /// Merged records no longer the latest view of their id.
    pub superseded: usize,
    /// Source records re-published to their original topic.
    pub republished: usize,
    /// To be replayed (dry run).
    pub would_redeliver: usize,
    pub would_republish: usize,
    pub not_replayable: Vec<NotReplayed>,
}

/// Reads every message currently in `topic` (up to the high watermarks seen at start).
pub fn read_all(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut cfg = kafka.client_config();
    cfg.set("group.id", "pipeline-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let c: BaseConsumer = kafka::create(&cfg, "DLQ reader")?;
    let timeout = Duration::from_secs(10);
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .context("reading DLQ metadata")?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = BTreeMap::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
            remaining += high - low;
            ends.insert(p.id(), high);
        }
    }
    let mut out = Vec::with_capacity(remaining as usize);
    if remaining == 0 {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while out.len() < remaining as usize {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m))
                if ends
                    .get(&m.partition())
                    .is_some_and(|&end| m.offset() < end) =>
            {
                out.push(m.detach());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("reading the DLQ"),
            None if std::time::Instant::now() > deadline => {
                anyhow::bail!("timed out reading the DLQ")
            }
            None => {}
        }
    }
    Ok(out)
}

fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Counts dead letters by stage and class.
pub fn list(messages: &[OwnedMessage], samples: usize) -> Listing {
    let mut by_stage = BTreeMap::new();
    let mut by_class = BTreeMap::new();
    for m in messages {
        *by_stage
            .entry(header(m, dlq::STAGE).unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
        *by_class
            .entry(header(m, dlq::ERROR_CLASS).unwrap_or_else(|| "unknown".into()))
            .or_insert(0) += 1;
    }
    let samples = messages
        .iter()
        .take(samples)
        .map(|m| {
            serde_json::json!({
                "partition": m.partition(),
                "offset": m.offset(),
                "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                "stage": header(m, dlq::STAGE),
                "reason": header(m, dlq::REASON),
                "original": format!("{}/{}@{}", header(m, dlq::ORIGINAL_TOPIC).unwrap_or_default(),
                    header(m, dlq::ORIGINAL_PARTITION).unwrap_or_default(), header(m, dlq::ORIGINAL_OFFSET).unwrap_or_default()),
                "value": m.payload().map(|v| String::from_utf8_lossy(&v[..v.len().min(500)]).into_owned()),
            })
        })
        .collect();
    Listing {
        total: messages.len(),
        by_stage,
        by_class,
        samples,
    }
}

/// Replays the DLQ as configured.
pub async fn replay(
    replay_config: &ReplayConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<ReplayReport> {
    let config = &replay_config.consumer;
    config.validate()?;
    let plan = config.join_plan()?;
    let data_topics = plan.data_topics();
    let (kafka_cfg, topic) = (config.kafka.clone(), config.topics.dlq_topic.clone());
    let messages = tokio::task::spawn_blocking(move || read_all(&kafka_cfg, &topic)).await??;
    let mut report = ReplayReport {
        dry_run: replay_config.dry_run,
        scanned: messages.len(),
        ..Default::default()
    };
    let mut merged = Vec::new();
    let mut sources = Vec::new();
    for m in &messages {
        let stage = header(m, dlq::STAGE).unwrap_or_default();
        if replay_config.stage.as_ref().is_some_and(|s| *s != stage) {
            continue;
        }
        report.selected += 1;
        let not = |reason: String| NotReplayed {
            partition: m.partition(),
            offset: m.offset(),
            stage: stage.clone(),
            reason,
        };
        match stage.as_str() {
            "deliver" => match m
                .payload()
                .and_then(|v| serde_json::from_slice::<Value>(v).ok())
            {
                Some(v) if v["key"].is_string() && !v["id"].is_null() => merged.push((m, v)),
                _ => report
                    .not_replayable
                    .push(not("value is not a merged record with a key".into())),
            },
            "parse" | "validate" => {
                let topic = header(m, dlq::ORIGINAL_TOPIC).unwrap_or_default();
                if !data_topics.contains(&topic) {
                    report
                        .not_replayable
                        .push(not(format!("original topic {topic:?} is not a data topic")));
                    continue;
                }
                let shape = plan.shape_of_topic(&topic);
                match parse_record_shaped(m.payload().unwrap_or_default(), usize::MAX, &shape) {
                    Ok(r) => sources.push((m, topic, r.id)),
                    Err(e) => report
                        .not_replayable
                        .push(not(format!("still invalid: {e}"))),
                }
            }
            other => report
                .not_replayable
                .push(not(format!("stage {other:?} cannot be replayed"))),
        }
    }

    // Merged records: only the current view of each id may be re-sent.
    let store = JoinStore::connect(
        config.redis_url.expose(),
        &config.redis_key_prefix,
        600_000,
        86_400,
    )
    .await?;
    let ids: Vec<String> = merged.iter().map(|(_, v)| id_string(&v["id"])).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (states, _epoch) = store.load(&JoinSpec::from_plan(&plan), &id_refs).await?;
    let mut current = Vec::new();
    for ((m, v), id) in merged.iter().zip(&ids) {
        let key = v["key"].as_str().unwrap_or_default();
        if states.get(id).is_some_and(|s| s.key == key) {
            let origin = Origin {
                topic: header(m, dlq::ORIGINAL_TOPIC).unwrap_or_default(),
                partition: m.partition(),
                offset: m.offset(),
            };
            current.push(Emission {
                id: id.clone(),
                key: key.to_owned(),
                record: serde_json::value::RawValue::from_string(v.to_string())?,
                origin,
            });
        } else {
            report.superseded += 1;
        }
    }
    // Views already delivered (by an earlier replay) are settled: nothing to send.
    let keys: Vec<&str> = current.iter().map(|e| e.key.as_str()).collect();
    let status = store.dedup_status(&keys).await?;
    let before = current.len();
    let mut settled = status.iter().map(|s| s.as_deref() == Some("done"));
    current.retain(|_| !settled.next().unwrap_or(false));
    report.already_delivered = (before - current.len()) as u64;
    if replay_config.dry_run {
        report.would_redeliver = current.len();
        report.would_republish = sources.len();
        return Ok(report);
    }

    let client = AnalyticsClient::new(
        &config.analytics_url,
        config.analytics_token.clone(),
        Duration::from_secs(30),
        RetryPolicy::default(),
        config.batch_size,
        Readiness::default(),
    )?;
    for chunk in current.chunks(config.batch_size.max(1)) {
        let refs: Vec<&Emission> = chunk.iter().collect();
        let ack = tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
            r = client.post(&refs) => r.context("posting replayed records to Analytics")?,
        };
        report.redelivered += ack.accepted;
        report.already_delivered += ack.duplicates;
        let rejected: Vec<&str> = ack.rejected.iter().map(|r| r.key.as_str()).collect();
        for r in &ack.rejected {
            if let Some(e) = chunk.iter().find(|e| e.key == r.key) {
                report.not_replayable.push(NotReplayed {
                    partition: e.origin.partition,
                    offset: e.origin.offset,
                    stage: "deliver".into(),
                    reason: format!("rejected again: {}", r.reason),
                });
            }
        }
        let delivered: Vec<&str> = chunk
            .iter()
            .map(|e| e.key.as_str())
            .filter(|k| !rejected.contains(k))
            .collect();
        store.mark_delivered(&delivered).await?;
    }

    if !sources.is_empty() {
        let producer: FutureProducer =
            kafka::create(&config.kafka.producer_config(30_000), "replay producer")?;
        for (m, topic, id) in &sources {
            let payload = m.payload().unwrap_or_default();
            producer
                .send(
                    FutureRecord::to(topic).key(id.as_str()).payload(payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("re-publishing to {topic}: {e}"))?;
            report.republished += 1;
        }
    }
    Ok(report)
}

fn id_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs a `pipeline dlq` command, printing JSON on stdout.
pub async fn run(cmd: DlqCommand, shutdown: CancellationToken) -> anyhow::Result<bool> {
    match cmd {
        DlqCommand::List {
            kafka,
            topics,
            samples,
        } => {
            let topic = topics.dlq_topic.clone();
            let messages = tokio::task::spawn_blocking(move || read_all(&kafka, &topic)).await??;
            println!(
                "{}",
                serde_json::to_string_pretty(&list(&messages, samples))?
            );
            Ok(true)
        }
        DlqCommand::Replay(config) => {
            let report = replay(&config, &shutdown).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(true)
        }
    }
}
