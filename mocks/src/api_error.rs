//! The one error body every mock answers with, `{"error": "..."}`, for bad requests, injected
//! faults and unknown routes alike, so clients (and the OpenAPI specs) see one shape.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, in words.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Why the request failed.
    #[schema(example = "invalid cursor")]
    pub error: String,
}

/// `status` with an [`ErrorBody`].
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// A JSON body axum could not read (not JSON, wrong content type, wrong shape).
pub fn bad_json(rejection: JsonRejection) -> Response {
    error(rejection.status(), rejection.body_text())
}

/// A query string axum could not read (e.g. `?page=abc`).
pub fn bad_query(rejection: QueryRejection) -> Response {
    error(rejection.status(), rejection.body_text())
}

/// The fallback of every mock: a 404 that names the path.
pub async fn no_route(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}
