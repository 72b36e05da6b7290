//! The ETag bookkeeping: what the producer knows of each source's pages (ETag and next page by
//! URL, as of the last fully published poll), when that knowledge is saved to, outdated in or
//! deleted from the source-state topic, so a fresh producer sends `If-None-Match` only for
//! pages whose every record was published.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pipeline_core::metrics::metrics;
use reqwest::Url;

use source::Source;
use state::SavedPage;

use super::*;

/// ETag of a page and the page after it, as of the last fully published poll.
type KnownPage = (String, Option<Url>);

/// A source's pages by URL, as of its last fully published poll.
type KnownPages = HashMap<String, KnownPage>;

/// What the producer knows of a source's pages.
#[derive(Debug, Default)]
pub(crate) struct PageMemory {
    /// ETag and next page by URL, as of the last fully published poll; a page whose changes a
    /// poll publishes is dropped from that moment until a poll completes (see
    /// [`ProducerInner::forget_page`]).
    pub(crate) known: Arc<KnownPages>,
    /// What the source-state topic holds of these pages.
    pub(crate) manifest: Manifest,
    /// Chunk numbers `n` whose keys (`<source>/pages/<n>`) may hold a value in the topic (found
    /// at start-up, written since): a save in fewer chunks deletes the rest.
    pub(crate) chunk_keys: BTreeSet<usize>,
}

/// What the source-state topic holds of a source's pages, as far as this producer knows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Manifest {
    /// No manifest: nothing to delete before changes are published.
    #[default]
    Absent,
    /// A manifest may be there that does not name `known` as they are (found at start-up and
    /// since changed, a save that failed or may have landed, or not read because of
    /// `--full-export`): it must be deleted before changes are published, and a poll that
    /// changes nothing saves `known` again.
    Outdated,
    /// The manifest names `known` as they are (their last save succeeded): a poll that changes
    /// nothing need not save them again.
    Current,
}

impl Manifest {
    /// `known` no longer is what a current manifest names.
    fn outdate(&mut self) {
        if *self == Manifest::Current {
            *self = Manifest::Outdated;
        }
    }
}

impl ProducerInner {
    /// The source's pages as of its last fully published poll (a snapshot: the poll that
    /// reads them may forget them meanwhile).
    pub(crate) fn known_pages(&self, source: &str) -> Arc<KnownPages> {
        self.memory(source, |m| m.known.clone()).unwrap_or_default()
    }

    /// Runs `f` on what is known of the source's pages (None if the lock is poisoned).
    pub(crate) fn memory<T>(
        &self,
        source: &str,
        f: impl FnOnce(&mut PageMemory) -> T,
    ) -> Option<T> {
        let mut p = self.pages.lock().ok()?;
        Some(f(p.entry(source.to_owned()).or_default()))
    }

    /// Called before a poll publishes a changed page (`url`). The ETag kept for it says "this
    /// content is what was last published"; once something newer is published it is wrong, and
    /// if the poll then fails (or the producer dies) before saving new ones, the page changed
    /// back to its earlier content would answer 304 and the revert would never be published.
    /// So it is dropped from memory; the other pages' ETags still name what was last published
    /// for them, and this producer's next poll still sends them. The saved manifest names the
    /// page too: it is deleted from the source-state topic (acknowledged, before any record)
    /// when it may be there, so until a poll completes a restarted producer reads the source
    /// in full.
    pub(crate) async fn forget_page(&self, source: &str, url: &Url) -> anyhow::Result<()> {
        let manifest = self
            .memory(source, |m| {
                if m.known.contains_key(url.as_str()) {
                    // Clones the map once a poll: the poll holds the snapshot it started with.
                    Arc::make_mut(&mut m.known).remove(url.as_str());
                }
                m.manifest.outdate();
                m.manifest
            })
            .unwrap_or(Manifest::Outdated);
        if manifest != Manifest::Absent {
            // Kafka refused the poll's first record: counted like a refused data record.
            self.publisher
                .write_acked(&self.state_topic, &state::manifest_key(source), None)
                .await
                .map_err(|e| {
                    metrics().publish_failed(source, 1);
                    e.context(format!(
                        "{source}: deleting the saved page ETags before publishing changes \
                         (SOURCE_STATE_TOPIC={})",
                        self.state_topic
                    ))
                })?;
            self.memory(source, |m| m.manifest = Manifest::Absent);
        }
        Ok(())
    }

    /// Keeps the pages of a fully published poll that changed something (or whose pages are
    /// not stored yet) for the next one, and saves them in the source-state topic so that a
    /// restarted producer sends their ETags too. A failed save is only logged: the records are
    /// published, and the next producer would merely re-read pages it could have skipped.
    pub(crate) async fn remember_pages(&self, source: &Source, pages: Vec<SavedPage>) {
        let known = Arc::new(known_pages(&pages));
        self.memory(&source.name, |m| {
            m.known = known;
            m.manifest.outdate();
        });
        if pages.is_empty() {
            return;
        }
        match self.save_pages(&source.name, &pages).await {
            Ok(chunks) => {
                self.memory(&source.name, |m| m.manifest = Manifest::Current);
                self.delete_chunks_from(&source.name, chunks).await;
            }
            Err(e) => {
                tracing::warn!(source = %source.name, error = format!("{e:#}"), "could not save the page ETags; a restarted producer will re-read this source in full")
            }
        }
    }

    /// Saves `pages` (chunks, then the manifest); the number of chunks written.
    pub(crate) async fn save_pages(
        &self,
        source: &str,
        pages: &[SavedPage],
    ) -> anyhow::Result<usize> {
        let poll = uuid::Uuid::new_v4().simple().to_string();
        let saved_at = chrono::Utc::now().to_rfc3339();
        let messages = state::pages_messages(source, pages, &poll, &saved_at)?;
        let chunks = messages.len().saturating_sub(1);
        // Recorded before writing: a write that reports failure may still have landed, and a
        // manifest that landed must be deleted before the next change is published.
        self.memory(source, |m| {
            m.manifest = Manifest::Outdated;
            m.chunk_keys.extend(0..chunks);
        });
        for (key, value) in messages {
            self.publisher
                .write_acked(&self.state_topic, &key, Some(&value))
                .await?;
        }
        if self.lose_next_save_ack.swap(false, Ordering::Relaxed) {
            anyhow::bail!(
                "{source}: the acknowledgement of the saved page ETags was lost (injected)"
            );
        }
        Ok(chunks)
    }

    /// Deletes the source's chunk keys from number `first` on: chunks of earlier polls that the
    /// last save, in fewer chunks, did not overwrite. Its manifest no longer names them, so this
    /// only lets compaction drop them; a failure is logged and retried after the next save.
    pub(crate) async fn delete_chunks_from(&self, source: &str, first: usize) {
        let stale: Vec<usize> = self
            .memory(source, |m| m.chunk_keys.range(first..).copied().collect())
            .unwrap_or_default();
        for n in stale {
            let key = state::chunk_key(source, n);
            match self
                .publisher
                .write_acked(&self.state_topic, &key, None)
                .await
            {
                Ok(()) => {
                    self.memory(source, |m| m.chunk_keys.remove(&n));
                }
                Err(e) => {
                    tracing::warn!(source, error = format!("{e:#}"), "could not delete a stale chunk of saved page ETags; it is retried after the next save");
                    return;
                }
            }
        }
    }
}

/// Saved pages by URL, their next pages parsed (one that does not parse ends the chain there).
pub(crate) fn known_pages(pages: &[SavedPage]) -> KnownPages {
    pages
        .iter()
        .map(|p| {
            let next = p.next.as_deref().and_then(|n| Url::parse(n).ok());
            (p.url.clone(), (p.etag.clone(), next))
        })
        .collect()
}

pub(crate) fn saved_page(url: &Url, etag: String, next: Option<&Url>) -> SavedPage {
    SavedPage {
        url: url.to_string(),
        etag,
        next: next.map(Url::to_string),
    }
}
