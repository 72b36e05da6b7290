//! The one error body every mock answers with, `{"error": "..."}`, for bad requests, injected
//! faults and unknown routes alike, so clients (and the OpenAPI specs) see one shape.

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
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

/// axum's `Json`, answering a body it cannot read (not JSON, wrong content type, wrong shape)
/// with an [`ErrorBody`] instead of axum's plain text.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

/// axum's `Query`, answering a query string it cannot read (e.g. `?page=abc`) with an
/// [`ErrorBody`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(r) => Err(error(r.status(), r.body_text())),
        }
    }
}

/// The fallback of every mock: a 404 that names the path.
pub async fn no_route(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}
