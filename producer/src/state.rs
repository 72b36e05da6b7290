//! What the producer remembers between runs, kept durably in a compacted Kafka topic (the way
//! Kafka Connect keeps source offsets in `connect-offsets`), so the producer itself stays
//! stateless and a restarted or rescheduled producer picks up where the last one stopped instead
//! of re-exporting everything. `kcat -C -t pipeline_source_state -K '\t'` shows it all:
//!
//! * key `<source>`: the source's incremental-sync cursor ([`SourceCursor`]).
//! * key `<source>/pages`: a [`PagesManifest`] naming the poll whose page ETags are saved, and
//!   keys `<source>/pages/<n>`: those pages in chunks ([`PagesChunk`]). A fresh producer sends
//!   them as `If-None-Match`, so unchanged pages cost a 304 instead of a re-publish.
//!
//! Source names are `[A-Za-z0-9_-]`, so the three key forms cannot collide. State is written
//! only after every record of the poll that produced it was acknowledged, so a crash can only
//! make the next poll start from older state (records re-fetched and dropped downstream as
//! unchanged), never skip records. The chunks of a poll are written before its manifest, and
//! chunks of another poll than the manifest's are ignored: a crash between the two leaves the
//! source's pages unknown (a full re-read), never a mix of two polls. A poll that publishes a
//! changed page first deletes the manifest (a tombstone), so ETags older than what was last
//! published are never sent again. A save in fewer chunks than an earlier one deletes the chunk
//! keys it did not overwrite (tombstones, after its manifest), so compaction can drop them.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use pipeline_core::kafka::{self, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

/// Bytes of page URLs and ETags per `<source>/pages/<n>` message, far below Kafka's default
/// 1 MB message limit (about 1,500 pages of the built-in sources).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The value stored per source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Greatest `updated_at` seen in the last fully published poll, as the source wrote it.
    pub updated_since: String,
    /// The same in epoch ms (to compare versions written in different formats).
    pub updated_since_ms: i64,
    /// When it was saved (RFC 3339).
    pub saved_at: String,
}

/// One page of a fully published poll: its URL, the ETag it was served with, and the page
/// after it (`None` on the last page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPage {
    pub url: String,
    pub etag: String,
    pub next: Option<String>,
}

/// Which poll's pages are saved for a source, in how many chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagesManifest {
    /// Random id of the poll; every chunk carries it.
    pub poll: String,
    pub chunks: usize,
    pub pages: usize,
    /// When it was saved (RFC 3339).
    pub saved_at: String,
}

/// Up to [`CHUNK_BYTES`] of pages of one poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagesChunk {
    pub poll: String,
    pub pages: Vec<SavedPage>,
}

/// Everything the source-state topic holds for the producer.
#[derive(Debug, Default)]
pub struct SavedState {
    /// Source → incremental-sync cursor.
    pub cursors: HashMap<String, SourceCursor>,
    /// Source → the pages of its last fully published poll.
    pub pages: HashMap<String, Vec<SavedPage>>,
    /// Source → the chunk numbers `n` whose keys (`<source>/pages/<n>`) hold a value, of any
    /// poll: a later save in fewer chunks deletes the ones it does not overwrite.
    pub chunk_keys: HashMap<String, BTreeSet<usize>>,
}

/// The key of a source's pages manifest.
pub fn manifest_key(source: &str) -> String {
    format!("{source}/pages")
}

/// The key of chunk `n` of a source's pages.
pub fn chunk_key(source: &str, n: usize) -> String {
    format!("{source}/pages/{n}")
}

/// The messages that save `pages` as the source's last poll, in the order to write them
/// (chunks first, the manifest last): `(key, value)`.
pub fn pages_messages(
    source: &str,
    pages: &[SavedPage],
    poll: &str,
    saved_at: &str,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut chunk: Vec<SavedPage> = Vec::new();
    let mut bytes = 0;
    for (i, page) in pages.iter().enumerate() {
        bytes += page.url.len() + page.etag.len() + page.next.as_ref().map_or(0, String::len);
        chunk.push(page.clone());
        if bytes >= CHUNK_BYTES || i + 1 == pages.len() {
            let value = serde_json::to_vec(&PagesChunk {
                poll: poll.to_owned(),
                pages: std::mem::take(&mut chunk),
            })?;
            out.push((chunk_key(source, out.len()), value));
            bytes = 0;
        }
    }
    let manifest = PagesManifest {
        poll: poll.to_owned(),
        chunks: out.len(),
        pages: pages.len(),
        saved_at: saved_at.to_owned(),
    };
    out.push((manifest_key(source), serde_json::to_vec(&manifest)?));
    Ok(out)
}

/// Sorts the latest value of each key of the topic into cursors and page lists. Unreadable
/// entries, and pages whose chunks do not all belong to their manifest's poll, are left out
/// with a warning: the source is then read in full, which is safe.
pub fn interpret(latest: HashMap<String, Vec<u8>>) -> SavedState {
    let mut state = SavedState::default();
    let mut manifests = HashMap::new();
    let mut chunks = HashMap::new();
    for (key, value) in latest {
        match key.split_once('/') {
            None => match serde_json::from_slice::<SourceCursor>(&value) {
                Ok(c) => {
                    state.cursors.insert(key, c);
                }
                Err(e) => {
                    tracing::warn!(source = %key, error = %e, "ignoring an unreadable source cursor")
                }
            },
            Some((source, "pages")) => match serde_json::from_slice::<PagesManifest>(&value) {
                Ok(m) => {
                    manifests.insert(source.to_owned(), m);
                }
                Err(e) => {
                    tracing::warn!(source, error = %e, "ignoring unreadable saved page ETags")
                }
            },
            Some((source, rest)) => {
                let n = rest
                    .strip_prefix("pages/")
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(n) = n {
                    state
                        .chunk_keys
                        .entry(source.to_owned())
                        .or_default()
                        .insert(n);
                }
                match (n, serde_json::from_slice::<PagesChunk>(&value)) {
                    (Some(n), Ok(c)) => {
                        chunks.insert((source.to_owned(), n), c);
                    }
                    _ => tracing::warn!(%key, "ignoring an unreadable source-state entry"),
                }
            }
        }
    }
    for (source, manifest) in manifests {
        // Not sized from `manifest.pages`: a corrupt count must not allocate.
        let mut pages = Vec::new();
        let whole = (0..manifest.chunks).all(|n| match chunks.remove(&(source.clone(), n)) {
            Some(c) if c.poll == manifest.poll => {
                pages.extend(c.pages);
                true
            }
            _ => false,
        });
        if whole && pages.len() == manifest.pages {
            state.pages.insert(source, pages);
        } else {
            tracing::warn!(%source, "saved page ETags are incomplete; the source will be read in full");
        }
    }
    state
}

/// Reads the latest value of every key of `topic`.
pub async fn load(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<SavedState> {
    let mut cfg = kafka.client_config();
    cfg.set("group.id", "pipeline-source-state-reader")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false");
    let topic = topic.to_owned();
    let latest = tokio::task::spawn_blocking(move || read_latest(&cfg, &topic))
        .await
        .context("source-state reader task")??;
    Ok(interpret(latest))
}

fn read_latest(
    cfg: &rdkafka::ClientConfig,
    topic: &str,
) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let consumer: BaseConsumer = kafka::create(cfg, "source-state reader")?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .context("fetching metadata of the source-state topic")?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut out = HashMap::new();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(15))
            .context("reading source-state watermarks")?;
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
    }
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out reading the source-state topic {topic}");
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.context("reading the source-state topic")?;
        if let Some(k) = msg.key() {
            let key = String::from_utf8_lossy(k).into_owned();
            match msg.payload() {
                Some(v) => out.insert(key, v.to_vec()),
                // A tombstone deletes the key.
                None => out.remove(&key),
            };
        }
        if ends
            .get(&msg.partition())
            .is_some_and(|end| msg.offset() + 1 >= *end)
        {
            ends.remove(&msg.partition());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize) -> SavedPage {
        SavedPage {
            url: format!("http://crm/customers?page={n}"),
            etag: format!("W/\"{n}\""),
            next: Some(format!("http://crm/customers?page={}", n + 1)),
        }
    }

    fn as_latest(messages: Vec<(String, Vec<u8>)>) -> HashMap<String, Vec<u8>> {
        messages.into_iter().collect()
    }

    #[test]
    fn saved_pages_come_back_in_order_across_chunks() {
        // About 90 bytes a page: 4,000 pages do not fit one chunk.
        let pages: Vec<SavedPage> = (0..4000).map(page).collect();
        let messages = pages_messages("crm", &pages, "poll-1", "now").unwrap();
        assert_eq!(messages.len(), 3, "two chunks, then the manifest");
        assert!(messages.iter().all(|(_, v)| v.len() < 1_000_000));
        assert_eq!(messages[2].0, "crm/pages");
        let state = interpret(as_latest(messages));
        assert_eq!(state.pages["crm"], pages);
        assert!(state.cursors.is_empty());
    }

    #[test]
    fn pages_of_a_half_written_poll_are_not_used() {
        let old: Vec<SavedPage> = (0..4000).map(page).collect();
        let mut latest = as_latest(pages_messages("crm", &old, "poll-1", "then").unwrap());
        // A newer poll wrote its first chunk, then the producer died before the manifest.
        let newer: Vec<SavedPage> = (10..20).map(page).collect();
        let mut partial = pages_messages("crm", &newer, "poll-2", "now").unwrap();
        partial.truncate(1);
        latest.extend(partial);
        let state = interpret(latest);
        assert!(!state.pages.contains_key("crm"), "{:?}", state.pages.keys());
    }

    #[test]
    fn chunk_keys_of_every_poll_are_listed_for_deletion() {
        let old: Vec<SavedPage> = (0..4000).map(page).collect();
        let mut latest = as_latest(pages_messages("crm", &old, "poll-1", "then").unwrap());
        // The next poll had one chunk: chunk 1 of the first one is left over.
        latest.extend(pages_messages("crm", &[page(1)], "poll-2", "now").unwrap());
        latest.insert("inventory/pages/3".into(), b"not json".to_vec());
        let state = interpret(latest);
        assert_eq!(state.pages["crm"], vec![page(1)]);
        assert_eq!(state.chunk_keys["crm"], BTreeSet::from([0, 1]));
        assert_eq!(state.chunk_keys["inventory"], BTreeSet::from([3]));
    }

    #[test]
    fn cursors_and_pages_of_several_sources_are_told_apart() {
        let cursor = SourceCursor {
            updated_since: "2026-01-01T00:00:00Z".into(),
            updated_since_ms: 1_767_225_600_000,
            saved_at: "now".into(),
        };
        let mut latest = as_latest(pages_messages("crm", &[page(1)], "a", "now").unwrap());
        latest.extend(pages_messages("pricing", &[page(2), page(3)], "b", "now").unwrap());
        latest.insert("pricing".into(), serde_json::to_vec(&cursor).unwrap());
        latest.insert("inventory".into(), b"not json".to_vec());
        let state = interpret(latest);
        assert_eq!(state.pages["crm"], vec![page(1)]);
        assert_eq!(state.pages["pricing"], vec![page(2), page(3)]);
        assert_eq!(state.cursors.len(), 1);
        assert_eq!(state.cursors["pricing"], cursor);
    }
}
