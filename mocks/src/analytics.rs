//! The Analytics API stand-in.
//!
//! `POST /analytics/data` ingests a batch idempotently: every record is deduplicated on its `key`,
//! so re-sends are counted as duplicates and never applied twice. Records it cannot accept (no
//! key or id, or a customer email without `@`, the kind of semantic check a real analytics store
//! makes) come back in `rejected` for the pipeline to dead-letter. The ledger is read back with
//! `GET /analytics/data` and summarised by `GET /analytics/stats`, which is what the tests and the
//! benchmark count unique keys and duplicates with.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::faults::{self, FaultConfig, Faults};

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
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
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

#[derive(Deserialize)]
struct BatchBody {
    batch_id: Option<String>,
    /// Kept as the JSON text received: only the head of each record is parsed.
    records: Vec<Box<RawValue>>,
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

#[derive(Serialize)]
struct Rejection {
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

    pub fn router(&self) -> Router {
        let data = Router::new()
            .route("/analytics/data", post(ingest))
            .with_state(self.clone());
        let data = faults::faulted(data, &self.faults);
        Router::new()
            .route("/analytics/data", get(read_back))
            .route("/analytics/stats", get(stats))
            .route("/health", get(|| async { "ok" }))
            .with_state(self.clone())
            .merge(data)
            .layer(DefaultBodyLimit::max(crate::MAX_BODY_BYTES))
    }

    fn apply(&self, batch_id: Option<String>, records: Vec<Box<RawValue>>) -> Value {
        let Ok(mut l) = self.ledger.lock() else {
            return json!({"error": "ledger poisoned"});
        };
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
        json!({"accepted": accepted, "duplicates": duplicates, "rejected": rejected})
    }
}

fn id_of(r: &Value) -> Option<String> {
    match r.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn ingest(
    State(mock): State<AnalyticsMock>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(token) = &mock.token {
        let expected = format!("Bearer {token}");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    let batch: BatchBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("invalid batch: {e}")})),
            )
                .into_response()
        }
    };
    let batch_id = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(batch.batch_id);
    if mock
        .reject_batches
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let invalid: Vec<Value> = batch
            .records
            .iter()
            .filter_map(|r| {
                let head = RecordHead::parse(r)?;
                Some(json!({"key": head.key()?, "reason": head.rejection()?}))
            })
            .collect();
        if !invalid.is_empty() {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": "batch holds invalid records", "invalid": invalid})),
            )
                .into_response();
        }
    }
    let mock2 = mock.clone();
    let result = tokio::task::spawn_blocking(move || mock2.apply(batch_id, batch.records)).await;
    match result {
        Ok(v) => (StatusCode::ACCEPTED, Json(v)).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    page: Option<usize>,
    per_page: Option<usize>,
    id: Option<String>,
    /// `latest=true`: the latest record of every id, in no particular order.
    latest: Option<bool>,
}

async fn read_back(State(mock): State<AnalyticsMock>, Query(q): Query<ReadQuery>) -> Json<Value> {
    if let Some(id) = q.id {
        let records = mock.history(&id);
        return Json(json!({"total": records.len(), "records": records}));
    }
    if q.latest == Some(true) {
        let records: Vec<Value> = mock.latest_by_id().into_values().collect();
        return Json(json!({"total": records.len(), "records": records}));
    }
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q.per_page.unwrap_or(100).clamp(1, 10_000);
    let Ok(l) = mock.ledger.lock() else {
        return Json(json!({"error": "ledger poisoned"}));
    };
    let start = (page - 1).saturating_mul(per_page);
    let records: Vec<Value> = l
        .records
        .iter()
        .skip(start)
        .take(per_page)
        .filter_map(|r| serde_json::from_str(r).ok())
        .collect();
    let next = (start + per_page < l.records.len()).then_some(page + 1);
    Json(
        json!({"total": l.records.len(), "page": page, "per_page": per_page, "next_page": next, "records": records}),
    )
}

async fn stats(State(mock): State<AnalyticsMock>) -> Json<Stats> {
    Json(mock.stats())
}
