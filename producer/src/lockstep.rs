//! Keeps the sources of one poll cycle in step, page by page.
//!
//! The consumers join the two sides of an id in one write when both arrive in the same batch
//! (see `consumer::pairing`). Polled independently, one source ran up to 200 ms ahead of the
//! other, so the two sides of an id were published far apart and most ids were written to
//! Redis twice. In step, a source publishes its page `k` only once every other source still
//! polling has published page `k - 1`: the sides of the ids that both sources list in the same
//! order are published within a page of each other. A source that finishes (or fails) stops
//! holding the others back. The fetches themselves still run concurrently.

use std::sync::Arc;

use tokio::sync::watch;

/// Pages published by each source of a cycle (None: finished).
pub struct Lockstep {
    pages: watch::Sender<Vec<Option<u64>>>,
}

impl Lockstep {
    pub fn new(sources: usize) -> Self {
        Self {
            pages: watch::Sender::new(vec![Some(0); sources]),
        }
    }

    /// Waits until source `index` may publish its page `page` (counted from 0).
    pub async fn turn(&self, index: usize, page: u64) {
        let mut rx = self.pages.subscribe();
        let _ = rx
            .wait_for(|pages| {
                pages
                    .iter()
                    .enumerate()
                    .all(|(i, p)| i == index || p.is_none_or(|done| done + 1 >= page))
            })
            .await;
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
        let step = Arc::new(Lockstep::new(2));
        // Page 0 and page 1 are free: the other source has published "page -1".
        tokio::time::timeout(Duration::from_secs(1), step.turn(0, 0))
            .await
            .expect("page 0 is free");
        step.published(0);
        tokio::time::timeout(Duration::from_secs(1), step.turn(0, 1))
            .await
            .expect("one page ahead is allowed");
        step.published(0);
        let waiting = tokio::spawn({
            let step = step.clone();
            async move { step.turn(0, 2).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "two pages ahead waits");
        step.published(1);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("released once the other source caught up")
            .expect("task");
        step.finished(1);
        tokio::time::timeout(Duration::from_secs(1), step.turn(0, 100))
            .await
            .expect("a finished source holds nobody back");
    }
}
