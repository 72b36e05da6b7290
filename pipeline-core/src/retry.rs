//! Retry policy: exponential backoff with full jitter, bounded by attempts.
//!
//! "Full jitter" (sleep a uniform random time in `[0, min(cap, base·2^n)]`) spreads retries of
//! many workers so a recovering service is not hit by a synchronized wave. A server's
//! `Retry-After` takes precedence over the computed delay.

use std::time::Duration;

use rand::Rng;

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
}
