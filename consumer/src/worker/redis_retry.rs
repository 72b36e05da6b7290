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
        let mut failed = false;
        let value = policy
            .until_ok(shutdown, f, |e, attempt| {
                failed = true;
                self.ready.set("redis", false);
                tracing::warn!(
                    op,
                    attempt,
                    error = format!("{e:#}"),
                    "Redis operation failed; consumption paused"
                );
            })
            .await
            .map_err(|_| Abandoned)?;
        if failed {
            tracing::info!(op, "Redis is back");
        }
        self.ready.set("redis", true);
        Ok(value)
    }
}
