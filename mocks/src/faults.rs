//! Fault injection for the mocks: an error rate with a chosen status, added latency and a
//! `Retry-After` hint. Set at start-up by flags/env and changed at run time with
//! `PUT /admin/faults` (JSON), so a test can break and heal a running mock.
//!
//! The error rate is deterministic (request n fails when `floor((n+1)·rate) > floor(n·rate)`), so a
//! 30 % rate fails exactly 3 of every 10 requests, spread evenly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api_error::{error, ApiJson, ErrorBody};

/// Fault settings of one mock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args, ToSchema)]
#[serde(default)]
pub struct FaultConfig {
    /// Fraction of data requests answered with `error_status` (0.0–1.0).
    #[arg(
        long = "fault-error-rate",
        env = "FAULT_ERROR_RATE",
        default_value_t = 0.0
    )]
    pub error_rate: f64,
    /// Status code of injected errors.
    #[arg(
        long = "fault-error-status",
        env = "FAULT_ERROR_STATUS",
        default_value_t = 503
    )]
    pub error_status: u16,
    /// Latency added to every data request, in milliseconds.
    #[arg(
        long = "fault-latency-ms",
        env = "FAULT_LATENCY_MS",
        default_value_t = 0
    )]
    pub latency_ms: u64,
    /// `Retry-After` seconds sent with injected errors.
    #[arg(long = "fault-retry-after-s", env = "FAULT_RETRY_AFTER_S")]
    pub retry_after_s: Option<u64>,
}

impl FaultConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            anyhow::bail!(
                "FAULT_ERROR_RATE must be within 0.0..=1.0, got {}",
                self.error_rate
            );
        }
        if StatusCode::from_u16(self.error_status).is_err() {
            anyhow::bail!(
                "FAULT_ERROR_STATUS {} is not an HTTP status",
                self.error_status
            );
        }
        Ok(())
    }
}

/// Shared, mutable fault state of one mock.
#[derive(Clone, Default)]
pub struct Faults {
    config: Arc<RwLock<FaultConfig>>,
    requests: Arc<AtomicU64>,
}

impl Faults {
    pub fn new(config: FaultConfig) -> Self {
        Self {
            config: Arc::new(RwLock::new(config)),
            requests: Arc::default(),
        }
    }

    /// Data requests seen so far (failed ones included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn get(&self) -> FaultConfig {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set(&self, config: FaultConfig) {
        if let Ok(mut c) = self.config.write() {
            *c = config;
        }
    }

    /// The injected failure for the next request, if any.
    fn next_failure(&self) -> (Duration, Option<(StatusCode, Option<u64>)>) {
        let cfg = self.get();
        let n = self.requests.fetch_add(1, Ordering::Relaxed) as f64;
        let fail = cfg.error_rate > 0.0
            && ((n + 1.0) * cfg.error_rate).floor() > (n * cfg.error_rate).floor();
        let status =
            StatusCode::from_u16(cfg.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        (
            Duration::from_millis(cfg.latency_ms),
            fail.then_some((status, cfg.retry_after_s)),
        )
    }
}

/// Middleware applying the faults to the routes it wraps.
pub async fn inject(State(faults): State<Faults>, req: Request, next: Next) -> Response {
    let (latency, failure) = faults.next_failure();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some((status, retry_after)) = failure {
        let mut resp = error(status, "injected fault");
        if let Some(s) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        return resp;
    }
    next.run(req).await
}

/// The fault settings in force.
#[utoipa::path(get, path = "/admin/faults", tag = "faults",
    responses((status = 200, description = "The fault settings in force", body = FaultConfig)))]
pub async fn get_faults(State(faults): State<Faults>) -> Json<FaultConfig> {
    Json(faults.get())
}

/// Replaces the fault settings of the running mock; the data routes (never `/admin/faults`
/// itself) answer with them from the next request on. Omitted fields take their defaults.
#[utoipa::path(put, path = "/admin/faults", tag = "faults",
    request_body = FaultConfig,
    responses(
        (status = 200, description = "The fault settings now in force", body = FaultConfig),
        (status = 400, description = "Not JSON, or a setting out of range", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape", body = ErrorBody),
    ))]
pub async fn put_faults(
    State(faults): State<Faults>,
    ApiJson(cfg): ApiJson<FaultConfig>,
) -> Response {
    if let Err(e) = cfg.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    faults.set(cfg.clone());
    Json(cfg).into_response()
}

/// `data` with faults injected into its routes, merged with `GET`/`PUT /admin/faults` (which are
/// never faulted themselves): every mock serves its fault knobs this way.
pub fn faulted(data: axum::Router, faults: &Faults) -> axum::Router {
    let admin = axum::Router::new()
        .route(
            "/admin/faults",
            axum::routing::get(get_faults).put(put_faults),
        )
        .with_state(faults.clone());
    data.route_layer(axum::middleware::from_fn_with_state(faults.clone(), inject))
        .merge(admin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rate_is_exact_and_evenly_spread() {
        let f = Faults::new(FaultConfig {
            error_rate: 0.3,
            ..FaultConfig::default()
        });
        let failures = (0..100).filter(|_| f.next_failure().1.is_some()).count();
        assert_eq!(failures, 30);
        assert!(FaultConfig {
            error_rate: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
