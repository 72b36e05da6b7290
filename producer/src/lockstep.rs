//! Keeps the sources of one poll cycle in step, page by page, so the two sides of an id are
//! published close together and the consumers join them in one write (see `consumer::pairing`).
//!
//! A source publishes its page `k` only once every other source still polling has published
//! page `k - 1`. A source that finishes, fails, or keeps another waiting longer than `MAX_WAIT`
//! stops holding the others back for the rest of the cycle. The fetches still run concurrently.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The longest a source waits for the others before it leaves the laggards behind.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// Pages published by each source of a cycle (None: finished, or left behind).
pub struct Lockstep {
    pages: watch::Sender<Vec<Option<u64>>>,
    /// How long a source waits for the others (`MAX_WAIT`).
    max_wait: Duration,
}

impl Lockstep {
    pub fn new(sources: usize, max_wait: Duration) -> Self {
        Self {
            pages: watch::Sender::new(vec![Some(0); sources]),
            max_wait,
        }
    }

    /// Waits until source `index` may publish its next page, or `max_wait`; then the sources
    /// still more than a page behind stop holding anyone back this cycle. A source that is
    /// finished or left behind never waits: every other source is ahead of it.
    pub async fn turn(&self, index: usize) {
        let Some(Some(page)) = self.pages.borrow().get(index).copied() else {
            return;
        };
        let behind =
            |i: usize, p: &Option<u64>| i != index && p.is_some_and(|done| done + 1 < page);
        let mut rx = self.pages.subscribe();
        let waited = rx.wait_for(|pages| !pages.iter().enumerate().any(|(i, p)| behind(i, p)));
        if tokio::time::timeout(self.max_wait, waited).await.is_err() {
            tracing::debug!(page, "a source lags: no longer publishing in step with it");
            self.pages.send_modify(|pages| {
                for (i, p) in pages.iter_mut().enumerate() {
                    if behind(i, p) {
                        *p = None;
                    }
                }
            });
        }
    }

    /// Source `index` published a page.
    pub fn published(&self, index: usize) {
        self.pages.send_modify(|pages| {
            if let Some(Some(p)) = pages.get_mut(index) {
                *p += 1;
            }
        });
    }

    /// Marks source `index` finished when the returned guard is dropped (even by a panic).
    pub fn finish_on_drop(self: &Arc<Self>, index: usize) -> Finished {
        Finished {
            step: self.clone(),
            index,
        }
    }

    /// Source `index` is done (or failed): it holds nobody back any more.
    pub fn finished(&self, index: usize) {
        self.pages.send_modify(|pages| {
            if let Some(p) = pages.get_mut(index) {
                *p = None;
            }
        });
    }
}

/// See `Lockstep::finish_on_drop`.
pub struct Finished {
    step: Arc<Lockstep>,
    index: usize,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.step.finished(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_source_waits_for_the_others_previous_page_and_not_for_finished_ones() {
        let step = Arc::new(Lockstep::new(2, Duration::from_secs(60)));
        // Page 0 and page 1 are free: the other source has published "page -1".
        tokio::time::timeout(Duration::from_secs(1), step.turn(0))
            .await
            .expect("page 0 is free");
        step.published(0);
        tokio::time::timeout(Duration::from_secs(1), step.turn(0))
            .await
            .expect("one page ahead is allowed");
        step.published(0);
        let waiting = tokio::spawn({
            let step = step.clone();
            async move { step.turn(0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "two pages ahead waits");
        step.published(1);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("released once the other source caught up")
            .expect("task");
        step.finished(1);
        for _ in 0..98 {
            step.published(0);
        }
        tokio::time::timeout(Duration::from_secs(1), step.turn(0))
            .await
            .expect("a finished source holds nobody back");
    }

    #[tokio::test]
    async fn a_source_that_keeps_the_others_waiting_is_left_behind_for_the_cycle() {
        let wait = Duration::from_millis(100);
        let step = Lockstep::new(2, wait);
        step.published(0);
        step.published(0);
        let started = std::time::Instant::now();
        // Source 1 has published nothing: page 2 of source 0 waits, but only `wait`.
        tokio::time::timeout(Duration::from_secs(5), step.turn(0))
            .await
            .expect("the wait is bounded");
        assert!(started.elapsed() >= wait);
        for _ in 0..48 {
            step.published(0);
        }
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(1), step.turn(0))
            .await
            .expect("the laggard no longer holds source 0 back");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(started.elapsed() < wait, "no second wait for the laggard");
        step.published(1);
        tokio::time::timeout(Duration::from_secs(1), step.turn(1))
            .await
            .expect("the laggard itself is not held back by the source ahead");
    }
}
