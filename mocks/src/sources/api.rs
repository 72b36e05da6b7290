//! A source mock's HTTP API: the collection route (every pagination style at once, ETags,
//! `updated_since`, upserts) and the OpenAPI description generated from the same handlers and
//! types, re-rooted at the mock's own collection path.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{PageRecord, SourceMock, GENERATED_AT_MS};
use crate::api_error::{error, no_route, ApiJson, ApiQuery, ErrorBody};
use crate::faults;
use crate::openapi::served_with_docs;

/// The collection path in the generated description, replaced by the mock's own.
const DOC_PATH: &str = "/collection";

impl SourceMock {
    pub fn router(&self) -> Router {
        let data = Router::new()
            .route(&self.path, get(list).post(create))
            .with_state(self.clone());
        let api = Router::new()
            .route("/health", get(health))
            .merge(faults::faulted(data, &self.faults))
            .layer(DefaultBodyLimit::max(1024 * 1024));
        served_with_docs(api, self.openapi()).fallback(no_route)
    }

    /// The spec served at `/openapi.json`: the collection documented at this mock's path.
    pub fn openapi(&self) -> utoipa::openapi::OpenApi {
        let mut doc = SourceDoc::openapi();
        doc.info.title = format!("Source API (mock): {}", self.path);
        if let Some(item) = doc.paths.paths.remove(DOC_PATH) {
            doc.paths.paths.insert(self.path.clone(), item);
        }
        doc
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Source API (mock)",
        description = "A CRM, Inventory or Pricing API: deterministic generated records `1..=N`, \
every pagination style at once, weak ETags answered with 304, `updated_since` for incremental \
sync, upserts, and fault injection (`/admin/faults`)."
    ),
    paths(list, create, health, faults::get_faults, faults::put_faults),
    tags(
        (name = "source", description = "The collection"),
        (name = "faults", description = "Fault injection into the collection's routes")
    )
)]
struct SourceDoc;

/// Which records to return. Paging: `page` + `per_page`, `offset` + `limit`, or `cursor` (from
/// `next_cursor` or the `Link` header); all describe the same records.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Page number, from 1.
    page: Option<u64>,
    /// Records per page, 1–10,000 (default 100).
    per_page: Option<u64>,
    /// Records to skip (with `limit`).
    offset: Option<u64>,
    /// Records per page (with `offset` or `cursor`).
    limit: Option<u64>,
    /// Opaque cursor from the previous page's `next_cursor`.
    cursor: Option<String>,
    /// Only records whose `updated_at` is at or after this RFC 3339 time (or epoch ms),
    /// inclusive.
    updated_since: Option<String>,
}

/// A page's JSON body, serialised straight from the records (the keys in sorted order, as a
/// JSON object built with `json!` would have them).
#[derive(serde::Serialize, ToSchema)]
struct PageBody<'a> {
    /// The records of this page (customers, products or prices, each with its id field and
    /// `updated_at`).
    #[schema(value_type = Vec<Object>)]
    data: &'a [PageRecord],
    /// Cursor of the next page; null on the last.
    #[schema(value_type = Option<String>)]
    next_cursor: Option<&'a str>,
    /// Number of the next page; null on the last.
    next_page: Option<u64>,
    page: u64,
    per_page: u64,
    /// Records matching the query, on all pages.
    total: u64,
}

/// Lists records, a page at a time.
///
/// Send the page's last `ETag` as `If-None-Match`: an unchanged page answers 304 without a
/// body.
#[utoipa::path(get, path = "/collection", tag = "source", params(PageQuery,
        ("If-None-Match" = Option<String>, Header, description = "The ETag this page had; 304 while it still has it")),
    responses(
        (status = 200, description = "A page of records", body = PageBody,
            headers(
                ("ETag" = String, description = "Weak ETag of this page; changes whenever its data does"),
                ("Link" = Option<String>, description = "`<…?cursor=…&limit=…>; rel=\"next\"`, unless this is the last page"),
            )),
        (status = 304, description = "Not modified: the page still has the ETag sent",
            headers(("ETag" = String, description = "The unchanged ETag"))),
        (status = 400, description = "A malformed cursor, `updated_since` or number", body = ErrorBody),
        (status = 503, description = "An injected fault (status configurable in `/admin/faults`)", body = ErrorBody,
            headers(("Retry-After" = Option<u64>, description = "Seconds, when configured"))),
    ))]
async fn list(
    State(mock): State<SourceMock>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Response {
    let size = q.per_page.or(q.limit).unwrap_or(100).clamp(1, 10_000);
    let start = match (&q.cursor, q.offset, q.page) {
        (Some(c), _, _) => match c
            .strip_prefix('o')
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        {
            Some(n) => n,
            None => return error(StatusCode::BAD_REQUEST, "invalid cursor"),
        },
        (None, Some(offset), _) => offset,
        (None, None, page) => page
            .unwrap_or(1)
            .max(1)
            .saturating_sub(1)
            .saturating_mul(size),
    };
    let since = match q.updated_since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match pipeline_core::record::version_ms(Some(&Value::String(s.to_owned())))
            .or_else(|| s.parse().ok())
        {
            Some(ms) => Some(ms),
            None => return error(StatusCode::BAD_REQUEST, "invalid updated_since"),
        },
    };
    let etag = mock.etag(start, size, since);
    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return (StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
    }
    // Generated records all carry GENERATED_AT: a later cursor leaves only upserted ones.
    let (records, total) = match since {
        Some(ms) if ms > GENERATED_AT_MS => {
            let changed = mock.changed_since(ms);
            let total = changed.len() as u64;
            let page = changed
                .into_iter()
                .skip(start as usize)
                .take(size as usize)
                .map(PageRecord::Stored)
                .collect::<Vec<_>>();
            (page, total)
        }
        _ => (mock.slice(start, size), mock.total()),
    };
    let next = start.saturating_add(size);
    let more = next < total;
    let page = start / size + 1;
    let cursor = more.then(|| format!("o{next:x}"));
    let body = PageBody {
        data: &records,
        next_cursor: cursor.as_deref(),
        next_page: more.then_some(page + 1),
        page,
        per_page: size,
        total,
    };
    let mut response = ([("etag", etag)], Json(body)).into_response();
    if let Some(c) = cursor {
        let mut link = format!("<{}?cursor={c}&limit={size}", mock.path);
        if let Some(s) = &q.updated_since {
            link.push_str("&updated_since=");
            link.push_str(&url_escape(s));
        }
        link.push_str(">; rel=\"next\"");
        if let Ok(v) = link.parse() {
            response.headers_mut().insert("link", v);
        }
    }
    response
}

/// Percent-encodes what a query value cannot hold as is.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Inserts or replaces a record by its id field, stamping a strictly newer `updated_at` unless
/// the body brings one; new ids are appended after the generated ones.
#[utoipa::path(post, path = "/collection", tag = "source",
    request_body(content = Object, description = "A record with the collection's id field",
        example = json!({"id": 7, "name": "Changed", "email": "changed@example.com"})),
    responses(
        (status = 201, description = "The record as stored", body = Object),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Not an object, or without an id", body = ErrorBody),
    ))]
async fn create(State(mock): State<SourceMock>, ApiJson(body): ApiJson<Value>) -> Response {
    let Value::Object(record) = body else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "record must be a JSON object",
        );
    };
    match mock.upsert(record) {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

/// Liveness.
#[utoipa::path(get, path = "/health", tag = "source",
    responses((status = 200, description = "Serving", body = String, content_type = "text/plain", example = "ok")))]
async fn health() -> &'static str {
    "ok"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Entity;
    use crate::sources::GeneratedRecord;
    use serde_json::json;

    #[test]
    fn a_page_body_serialises_like_its_json_object_form() {
        let records = vec![
            PageRecord::Generated(GeneratedRecord {
                entity: Entity::Customers,
                id: 7,
            }),
            PageRecord::Stored(json!({"id": "x", "name": "stored"})),
        ];
        for (cursor, next_page) in [(Some("o9"), Some(3)), (None, None)] {
            let body = PageBody {
                data: &records,
                next_cursor: cursor,
                next_page,
                page: 2,
                per_page: 2,
                total: 9,
            };
            let object = json!({
                "data": records,
                "page": 2,
                "per_page": 2,
                "total": 9,
                "next_page": next_page,
                "next_cursor": cursor,
            });
            assert_eq!(serde_json::to_string(&body).unwrap(), object.to_string());
        }
    }
}
