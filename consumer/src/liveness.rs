//! Notices a worker that stopped polling Kafka.
//!
//! A worker that awaits something forever (a hung call, a lock) stops polling; librdkafka then
//! evicts it from the group after `max.poll.interval.ms`, and its partitions wait that long.
//! The watch says so much earlier: after `POLL_STALL_MS` without a poll the process reports
//! itself stuck (`/health` 503, so a supervisor restarts it), logs an error once and exports
//! the time in `pipeline_consumer_seconds_since_poll`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_core::metrics::{metrics, Readiness};
use tokio_util::sync::CancellationToken;

/// When the worker last polled, and whether it is waiting in a poll right now.
#[derive(Debug)]
pub(crate) struct PollWatch {
    started: Instant,
    /// Milliseconds after `started` of the last poll's start or end.
    last_ms: AtomicU64,
    polling: AtomicBool,
}

impl Default for PollWatch {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            polling: AtomicBool::new(false),
        }
    }
}

impl PollWatch {
    /// The worker starts waiting in a poll.
    pub fn enter(&self) {
        self.touch();
        self.polling.store(true, Ordering::SeqCst);
    }

    /// The worker's poll returned: it works on what it got.
    pub fn leave(&self) {
        self.polling.store(false, Ordering::SeqCst);
        self.touch();
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::SeqCst);
    }

    /// How long the worker has gone without polling (zero while it waits in a poll).
    pub fn since_poll(&self) -> Duration {
        if self.polling.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Checks `watch` every second until `shutdown`, reporting a stall longer than `limit`.
pub(crate) async fn watch(
    watch: Arc<PollWatch>,
    limit: Duration,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let mut stuck = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let since = watch.since_poll();
        metrics().since_poll(since.as_secs());
        let now_stuck = since > limit;
        if now_stuck && !stuck {
            tracing::error!(
                seconds = since.as_secs(),
                "the worker has not polled Kafka for longer than POLL_STALL_MS; reporting unhealthy"
            );
        } else if stuck && !now_stuck {
            tracing::info!("the worker polls Kafka again");
        }
        if now_stuck != stuck {
            ready.set_alive(!now_stuck);
            stuck = now_stuck;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_in_a_poll_is_not_a_stall() {
        let w = PollWatch::default();
        w.enter();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(w.since_poll(), Duration::ZERO);
        w.leave();
        std::thread::sleep(Duration::from_millis(30));
        assert!(w.since_poll() >= Duration::from_millis(30));
        w.enter();
        assert_eq!(w.since_poll(), Duration::ZERO);
    }
}
