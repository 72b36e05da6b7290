//! Stand-ins for the three external systems: the Analytics API (`POST /analytics/data` with
//! idempotent, deduplicating ingestion and a ledger to read back) and the CRM / Inventory source
//! APIs (deterministic generated data of any size, pagination, ETags, updates). All three have
//! fault injection so demos, tests and benchmarks can exercise the pipeline's failure handling.
//! Each describes itself at `/openapi.json` (Swagger UI at `/docs`), generated from its handlers.

pub mod analytics;
pub mod api_error;
pub mod cli;
pub mod faults;
pub mod openapi;
pub mod sources;

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request body any mock accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Binds `addr` and serves `router` in a background task until `shutdown`; returns the address.
pub async fn spawn(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    pipeline_core::http::spawn_server(addr, router, shutdown).await
}

/// Serves `router` on `addr` until `shutdown` (for the standalone binaries).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, docs = %format!("http://{bound}/docs"), "listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving HTTP")
}
