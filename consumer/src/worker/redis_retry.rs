//! Redis outages pause consumption: an operation is retried with backoff until Redis answers
//! or the worker shuts down, and readiness says Redis is down meanwhile.

use std::time::Duration;

use pipeline_core::retry::RetryPolicy;
use tokio_util::sync::CancellationToken;

use super::Worker;

use crate::delivery::Abandoned;

impl Worker {
    /// Runs a Redis operation until it succeeds (pausing with backoff while Redis is down).
    pub(super) async fn retry_redis<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        op: &str,
        f: F,
    ) -> Result<T, Abandoned>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let policy = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        };
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => {
                    if attempt > 0 {
                        tracing::info!(op, "Redis is back");
                    }
                    self.ready.set("redis", true);
                    return Ok(v);
                }
                Err(e) => {
                    self.ready.set("redis", false);
                    tracing::warn!(
                        op,
                        attempt,
                        error = format!("{e:#}"),
                        "Redis operation failed; consumption paused"
                    );
                    let delay = policy.backoff(attempt.min(10), None);
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(Abandoned),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
