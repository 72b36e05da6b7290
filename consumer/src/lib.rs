//! The consumer: consumer-group workers that join customer and product records by id, suppress
//! duplicates with claim/confirm keys in Redis, deliver merged records in batches to the
//! Analytics API and dead-letter what cannot be delivered. Scale by running more replicas.
//!
//! The public API is narrow: [`run`] / [`run_with`] a worker from its [`ConsumerConfig`], and
//! the DLQ commands ([`dlq`]). Everything else is the crate's own.

pub mod config;
mod delivery;
pub mod dlq;
mod join;
mod known_state;
mod liveness;
mod message;
mod pairing;
mod recovery;
mod store;
mod worker;

use pipeline_core::metrics::{self, Readiness};
use pipeline_core::retry;
use tokio_util::sync::CancellationToken;

pub use config::ConsumerConfig;
use worker::Worker;

/// Runs one worker until `shutdown` (serving `/metrics` when `metrics_addr` is set).
pub async fn run(config: ConsumerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ready = Readiness::default();
    if let Some(addr) = config.metrics_addr {
        let bound = metrics::serve(addr, ready.clone(), shutdown.clone()).await?;
        tracing::info!(%bound, "metrics endpoint listening");
    }
    run_with(config, ready, shutdown).await
}

/// Runs one worker reporting into the given readiness (embedded stack, tests).
pub async fn run_with(
    config: ConsumerConfig,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(group = %config.group_id, analytics = %config.analytics_url, redis = %pipeline_core::http::redact_url(config.redis_url.expose()), "consumer starting");
    config.validate()?;
    let start = || Worker::new(config.clone(), ready.clone());
    let Some(worker) = retry::start_until_up("consumer", &shutdown, start, || {}).await else {
        return Ok(());
    };
    worker.run(shutdown).await
}
