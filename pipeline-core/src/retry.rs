//! Retry policy: exponential backoff with full jitter, bounded by attempts.
//!
//! "Full jitter" (sleep a uniform random time in `[0, min(cap, base·2^n)]`) spreads retries of
//! many workers so a recovering service is not hit by a synchronized wave. A server's
//! `Retry-After` takes precedence over the computed delay. Every retry loop of the pipeline
//! waits through [`RetryPolicy::pause`] (a backoff that shutdown cuts short), and the ones that
//! retry until success use [`RetryPolicy::until_ok`].

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Shutdown came while waiting to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// How often and how patiently to retry an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry.
    pub initial_backoff: Duration,
    /// Backoff ceiling for any retry.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0-based), honouring a server hint when present.
    pub fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(hint) = retry_after {
            return hint.min(self.max_backoff.max(Duration::from_secs(60)));
        }
        let ceiling = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.min(20)))
            .min(self.max_backoff);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    /// Whether another attempt is allowed after `attempts_made` attempts.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }

    /// Waits out the backoff before retry number `retry` (see [`RetryPolicy::backoff`]), or
    /// returns [`Stopped`] as soon as `shutdown` fires.
    pub async fn pause(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> Result<(), Stopped> {
        pause_for(self.backoff(retry, retry_after), shutdown).await
    }

    /// Runs `op` until it succeeds (ignoring `max_attempts`: for outages that pause work rather
    /// than fail it), pausing between failures; `on_failure` sees each error with its 0-based
    /// attempt number. [`Stopped`] when `shutdown` fires during a pause. An attempt runs to its
    /// end (a Redis write half done is worse than one finished); a caller that must not wait
    /// for one selects on `shutdown` around the whole call.
    pub async fn until_ok<T, E, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        mut op: F,
        mut on_failure: impl FnMut(&E, u32),
    ) -> Result<T, Stopped>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    on_failure(&e, attempt);
                    self.pause(attempt.min(20), None, shutdown).await?;
                    attempt += 1;
                }
            }
        }
    }
}

/// Waits `delay`, or returns [`Stopped`] as soon as `shutdown` fires.
pub async fn pause_for(delay: Duration, shutdown: &CancellationToken) -> Result<(), Stopped> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Stopped),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

/// Starts a component whose dependencies (Kafka, Redis) may not be up yet (compose start
/// order, an outage): `start` is retried forever with 0.5–15 s backoff, each failure logged as
/// `<what> start-up failed; retrying` after `on_failure` saw it. None when `shutdown` fires,
/// also in the middle of an attempt (start-up may wait a minute on Kafka metadata).
pub async fn start_until_up<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    start: F,
    mut on_failure: impl FnMut(),
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(15),
    };
    let starting = policy.until_ok(shutdown, start, |e: &anyhow::Error, attempt| {
        on_failure();
        tracing::warn!(
            error = format!("{e:#}"),
            attempt,
            "{what} start-up failed; retrying"
        );
    });
    tokio::select! {
        _ = shutdown.cancelled() => None,
        started = starting => started.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let p = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        };
        for retry in 0..30 {
            assert!(p.backoff(retry, None) <= Duration::from_millis(400));
        }
        assert_eq!(
            p.backoff(0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert!(p.allows_another(2));
        assert!(!p.allows_another(3));
    }

    fn quick() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn until_ok_retries_past_max_attempts_and_reports_each_failure() {
        let mut calls = 0;
        let mut seen = Vec::new();
        let out = quick()
            .until_ok(
                &CancellationToken::new(),
                || {
                    calls += 1;
                    let n = calls;
                    async move {
                        if n < 4 {
                            Err(n)
                        } else {
                            Ok(n * 10)
                        }
                    }
                },
                |e, attempt| seen.push((*e, attempt)),
            )
            .await;
        assert_eq!(out, Ok(40));
        assert_eq!(seen, vec![(1, 0), (2, 1), (3, 2)]);
    }

    #[tokio::test]
    async fn shutdown_stops_a_pause_and_an_endless_retry() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let long = RetryPolicy {
            initial_backoff: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(3600),
            ..quick()
        };
        assert_eq!(long.pause(0, None, &shutdown).await, Err(Stopped));
        assert_eq!(
            pause_for(Duration::from_secs(3600), &shutdown).await,
            Err(Stopped)
        );
        let out: Result<(), Stopped> = quick()
            .until_ok(&shutdown, || async { Err::<(), ()>(()) }, |_, _| {})
            .await;
        assert_eq!(out, Err(Stopped));
    }
}
