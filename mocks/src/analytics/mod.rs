//! The Analytics API stand-in.
//!
//! `POST /analytics/data` ingests a batch idempotently: every record is deduplicated on its `key`,
//! so re-sends are counted as duplicates and never applied twice. Records it cannot accept (no
//! key or id, or a customer email without `@`, the kind of semantic check a real analytics store
//! makes) come back in `rejected` for the pipeline to dead-letter. The ledger is read back with
//! `GET /analytics/data` and summarised by `GET /analytics/stats`, which is what the tests and the
//! benchmark count unique keys and duplicates with.

mod api;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::ToSchema;

use crate::faults::{FaultConfig, Faults};

pub use api::openapi;

/// Settings of the Analytics mock.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AnalyticsMockConfig {
    /// Bearer token required on `POST /analytics/data` (none = open).
    #[arg(
        long = "analytics-token",
        env = "ANALYTICS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Answer 422 for a whole batch that holds an invalid record (instead of per-record
    /// rejections in a 202), as stricter APIs do.
    #[arg(long, env = "ANALYTICS_REJECT_BATCHES")]
    pub reject_batches: bool,
    #[command(flatten)]
    pub faults: FaultConfig,
}

/// Counters of what the mock has received.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Stats {
    /// Batches accepted (a re-sent batch counts again).
    pub batches: u64,
    /// Distinct `Idempotency-Key`s seen.
    pub unique_batches: u64,
    /// Records received, duplicates included.
    pub records_received: u64,
    /// Distinct record keys applied.
    pub unique_keys: u64,
    /// Records received whose key had already been applied.
    pub duplicates: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Distinct ids with at least one record.
    pub unique_ids: u64,
}

#[derive(Default)]
struct Ledger {
    stats: Stats,
    keys: HashSet<String>,
    batch_ids: HashSet<String>,
    /// Applied records in arrival order, as compact JSON.
    records: Vec<Box<str>>,
    /// id → index of its latest applied record.
    latest: HashMap<String, usize>,
}

/// Shared state of one Analytics mock.
#[derive(Clone)]
pub struct AnalyticsMock {
    ledger: Arc<Mutex<Ledger>>,
    token: Option<Arc<str>>,
    reject_batches: Arc<std::sync::atomic::AtomicBool>,
    faults: Faults,
}

/// A batch of merged records, as the consumer posts it.
#[derive(Deserialize, ToSchema)]
struct BatchBody {
    /// The batch's id; the `Idempotency-Key` header wins when both are sent.
    batch_id: Option<String>,
    /// Merged records, each with a string `key` (its idempotency key) and an `id`. Kept as the
    /// JSON text received: only the head of each record is parsed.
    #[schema(value_type = Vec<Object>)]
    records: Vec<Box<RawValue>>,
}

/// The answer to an accepted batch: what was applied, what was a re-send, what was refused.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct Ingested {
    /// Records applied for the first time.
    accepted: u64,
    /// Records whose `key` was applied before (re-sends), not applied again.
    duplicates: u64,
    /// Records refused, each with its key and why; the pipeline dead-letters them.
    rejected: Vec<Rejection>,
}

/// A whole batch refused (`--reject-batches`): the records that made it invalid.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct BatchRefused {
    error: String,
    invalid: Vec<Rejection>,
}

/// The fields of a merged record the mock looks at (everything else is skipped unparsed).
#[derive(Deserialize)]
struct RecordHead {
    key: Option<Value>,
    id: Option<Value>,
    customer: Option<CustomerHead>,
}

#[derive(Deserialize)]
struct CustomerHead {
    email: Option<Value>,
}

impl RecordHead {
    fn parse(raw: &RawValue) -> Option<Self> {
        serde_json::from_str(raw.get()).ok()
    }

    fn key(&self) -> Option<String> {
        self.key.as_ref()?.as_str().map(str::to_owned)
    }

    fn id(&self) -> Option<String> {
        match self.id.as_ref()? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// The mock's business rule: a customer email must look like an address.
    fn rejection(&self) -> Option<String> {
        let email = self.customer.as_ref()?.email.as_ref()?;
        match email.as_str() {
            Some(e) if e.contains('@') => None,
            _ => Some(format!("customer.email {email} is not a valid address")),
        }
    }
}

/// One record refused.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct Rejection {
    /// The record's `key` (empty when it had none).
    key: String,
    reason: String,
}

impl AnalyticsMock {
    pub fn new(config: &AnalyticsMockConfig) -> Self {
        Self {
            ledger: Arc::default(),
            token: config.token.as_deref().map(Arc::from),
            reject_batches: Arc::new(config.reject_batches.into()),
            faults: Faults::new(config.faults.clone()),
        }
    }

    /// Switches between per-record rejections (202) and whole-batch 422s.
    pub fn set_reject_batches(&self, on: bool) {
        self.reject_batches
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The fault knobs (tests change them while the pipeline runs).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn stats(&self) -> Stats {
        self.ledger
            .lock()
            .map(|l| l.stats.clone())
            .unwrap_or_default()
    }

    /// The latest applied record of every id.
    pub fn latest_by_id(&self) -> HashMap<String, Value> {
        let Ok(l) = self.ledger.lock() else {
            return HashMap::new();
        };
        l.latest
            .iter()
            .filter_map(|(id, &i)| Some((id.clone(), serde_json::from_str(&l.records[i]).ok()?)))
            .collect()
    }

    /// Every applied record of one id, oldest first.
    pub fn history(&self, id: &str) -> Vec<Value> {
        let Ok(l) = self.ledger.lock() else {
            return Vec::new();
        };
        l.records
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r).ok())
            .filter(|r| id_of(r).as_deref() == Some(id))
            .collect()
    }

    fn apply(&self, batch_id: Option<String>, records: Vec<Box<RawValue>>) -> Option<Ingested> {
        let mut l = self.ledger.lock().ok()?;
        l.stats.batches += 1;
        if let Some(b) = batch_id {
            if l.batch_ids.insert(b) {
                l.stats.unique_batches += 1;
            }
        }
        let (mut accepted, mut duplicates) = (0u64, 0u64);
        let mut rejected = Vec::new();
        for r in records {
            l.stats.records_received += 1;
            let head = RecordHead::parse(&r);
            let key = head.as_ref().and_then(RecordHead::key);
            let id = head.as_ref().and_then(RecordHead::id);
            let (Some(head), Some(key), Some(id)) = (head, key.clone(), id) else {
                rejected.push(Rejection {
                    key: key.unwrap_or_default(),
                    reason: "record needs a string `key` and an `id`".into(),
                });
                continue;
            };
            if let Some(reason) = head.rejection() {
                rejected.push(Rejection { key, reason });
                continue;
            }
            if !l.keys.insert(key) {
                duplicates += 1;
                continue;
            }
            accepted += 1;
            let idx = l.records.len();
            l.records.push(Box::<str>::from(r));
            if l.latest.insert(id, idx).is_none() {
                l.stats.unique_ids += 1;
            }
        }
        l.stats.unique_keys += accepted;
        l.stats.duplicates += duplicates;
        l.stats.rejected += rejected.len() as u64;
        Some(Ingested {
            accepted,
            duplicates,
            rejected,
        })
    }
}

fn id_of(r: &Value) -> Option<String> {
    match r.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
