//! The Analytics mock's HTTP API: its routes, and the OpenAPI description generated from the
//! same handlers and types (`/openapi.json`, Swagger UI at `/docs`).

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{AnalyticsMock, BatchBody, BatchRefused, Ingested, RecordHead, Rejection, Stats};
use crate::api_error::{error, no_route, ApiQuery, ErrorBody};
use crate::faults;
use crate::openapi::{served_with_docs, BearerAuth};

impl AnalyticsMock {
    pub fn router(&self) -> Router {
        let data = Router::new()
            .route("/analytics/data", post(ingest))
            .with_state(self.clone());
        let data = faults::faulted(data, &self.faults);
        let api = Router::new()
            .route("/analytics/data", get(read_back))
            .route("/analytics/stats", get(stats))
            .route("/health", get(health))
            .with_state(self.clone())
            .merge(data)
            .layer(DefaultBodyLimit::max(crate::MAX_BODY_BYTES));
        served_with_docs(api, openapi()).fallback(no_route)
    }
}

/// The Analytics mock's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Analytics API (mock)",
        description = "Idempotent ingestion of merged records: every record is deduplicated on its `key`, \
so a re-sent record is counted as a duplicate and never applied twice. A ledger to read back, \
and fault injection (`/admin/faults`) for tests and demos."
    ),
    paths(ingest, read_back, stats, health, faults::get_faults, faults::put_faults),
    modifiers(&BearerAuth),
    tags(
        (name = "analytics", description = "Ingestion and the ledger"),
        (name = "faults", description = "Fault injection into the data routes (`POST /analytics/data`)")
    )
)]
struct AnalyticsDoc;

/// The spec served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    AnalyticsDoc::openapi()
}

/// Ingests a batch of merged records, idempotently.
///
/// Each record is applied once per `key`; re-sends count as `duplicates`. A record without a
/// string `key` and an `id`, or a customer whose `email` has no `@`, is refused in `rejected`
/// (202), or, with `--reject-batches`, the whole batch is refused (422). Injected faults answer
/// with their configured status (and `Retry-After`).
#[utoipa::path(post, path = "/analytics/data", tag = "analytics",
    request_body(content = BatchBody, example = json!({"records": [{"key": "3f2a…", "id": "7",
        "customer": {"id": 7, "email": "a@example.com"}, "inventory": {"id": 7, "sku": "SKU-7"},
        "merged_at": "2026-01-01T00:00:00Z"}]})),
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "Identifies the batch (the pipeline sends `sha256` of its sorted record keys); a re-sent batch counts in `batches` again but not in `unique_batches`"),
    ),
    security((), ("bearer" = [])),
    responses(
        (status = 202, description = "Applied; per-record duplicates and rejections", body = Ingested),
        (status = 400, description = "The body is not a batch", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (when the mock has one)", body = ErrorBody),
        (status = 422, description = "The whole batch is refused (`--reject-batches`)", body = BatchRefused),
        (status = 503, description = "An injected fault (status configurable in `/admin/faults`)", body = ErrorBody,
            headers(("Retry-After" = Option<u64>, description = "Seconds, when configured"))),
    ))]
async fn ingest(
    State(mock): State<AnalyticsMock>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(token) = &mock.token {
        let expected = format!("Bearer {token}");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    let batch: BatchBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid batch: {e}")),
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
        let invalid: Vec<Rejection> = batch
            .records
            .iter()
            .filter_map(|r| {
                let head = RecordHead::parse(r)?;
                Some(Rejection {
                    key: head.key()?,
                    reason: head.rejection()?,
                })
            })
            .collect();
        if !invalid.is_empty() {
            let refused = BatchRefused {
                error: "batch holds invalid records".into(),
                invalid,
            };
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(refused)).into_response();
        }
    }
    let mock2 = mock.clone();
    let result = tokio::task::spawn_blocking(move || mock2.apply(batch_id, batch.records)).await;
    match result {
        Ok(Some(ingested)) => (StatusCode::ACCEPTED, Json(ingested)).into_response(),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "the ledger failed"),
    }
}

/// Which part of the ledger to read.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReadQuery {
    /// Page number, from 1 (default 1).
    page: Option<usize>,
    /// Records per page, 1–10,000 (default 100).
    per_page: Option<usize>,
    /// Every applied record of this id, oldest first (no paging).
    id: Option<String>,
    /// `true`: the latest record of every id, in no particular order (no paging).
    latest: Option<bool>,
}

/// Applied records.
#[derive(Serialize, Deserialize, ToSchema)]
struct LedgerPage {
    /// Records in the ledger (or of the id, or ids with a record).
    total: usize,
    /// The page (paged reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<usize>,
    /// Records per page (paged reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    per_page: Option<usize>,
    /// The next page; null on the last one, and for unpaged reads.
    next_page: Option<usize>,
    /// Merged records as received.
    #[schema(value_type = Vec<Object>)]
    records: Vec<Value>,
}

/// Reads the ledger back: a page of applied records in arrival order, one id's history, or the
/// latest record of every id.
#[utoipa::path(get, path = "/analytics/data", tag = "analytics", params(ReadQuery),
    responses(
        (status = 200, description = "The records asked for", body = LedgerPage),
        (status = 400, description = "A malformed query (e.g. `page=abc`)", body = ErrorBody),
    ))]
async fn read_back(
    State(mock): State<AnalyticsMock>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Response {
    let whole = |records: Vec<Value>| LedgerPage {
        total: records.len(),
        page: None,
        per_page: None,
        next_page: None,
        records,
    };
    if let Some(id) = q.id {
        return Json(whole(mock.history(&id))).into_response();
    }
    if q.latest == Some(true) {
        return Json(whole(mock.latest_by_id().into_values().collect())).into_response();
    }
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q.per_page.unwrap_or(100).clamp(1, 10_000);
    let Ok(l) = mock.ledger.lock() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "the ledger failed");
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
    Json(LedgerPage {
        total: l.records.len(),
        page: Some(page),
        per_page: Some(per_page),
        next_page: next,
        records,
    })
    .into_response()
}

/// Counters of everything received: what the tests and the benchmark count with.
#[utoipa::path(get, path = "/analytics/stats", tag = "analytics",
    responses((status = 200, description = "The counters", body = Stats)))]
async fn stats(State(mock): State<AnalyticsMock>) -> Json<Stats> {
    Json(mock.stats())
}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "analytics",
    responses((status = 200, description = "Serving", body = String, content_type = "text/plain", example = "ok")))]
async fn health() -> &'static str {
    "ok"
}
