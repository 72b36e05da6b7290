//! The producer: polls each configured source API on its interval, follows its pagination,
//! validates each record and publishes it to the source's partitioned topic keyed by id (invalid
//! records go to the DLQ with a reason). A poll succeeds only when Kafka acknowledged every
//! record; a failed poll is logged, counted, and re-polled on the source's next tick, so nothing
//! is lost to a broker outage. Sources on the same interval are polled together and publish in
//! step (see `lockstep`); a failing source holds the others' publishing back by one second per
//! poll at most, but their next poll waits until its own poll has given up.

pub mod config;
pub mod lockstep;
pub mod publish;
pub mod source;
pub mod state;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lockstep::Lockstep;
use pipeline_core::canonical::{canonical_json, is_canonical};
use pipeline_core::metrics::{self, metrics, Readiness};
use pipeline_core::pipeline_config::PipelineConfig;
use pipeline_core::record::{inspect_raw, inspect_record, RecordError, RecordShape};
use pipeline_core::retry;
use pipeline_core::topics;
use reqwest::Url;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use config::ProducerConfig;
use publish::Publisher;
use source::{Page, PageFetcher, Source};
use state::{SavedPage, SourceCursor};

/// What one poll of one source did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceReport {
    pub source: String,
    /// Records fetched (pages answered 304 not included).
    pub fetched: u64,
    /// Records acknowledged on the data topic.
    pub published: u64,
    /// Records dead-lettered by validation.
    pub invalid: u64,
    /// Pages fetched, and pages answered 304.
    pub pages: u64,
    pub pages_not_modified: u64,
    /// The incremental-sync cursor the poll started from.
    pub updated_since: Option<String>,
    pub elapsed_s: f64,
}

/// What one polling cycle did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CycleReport {
    pub sources: Vec<SourceReport>,
}

impl CycleReport {
    pub fn published(&self) -> u64 {
        self.sources.iter().map(|s| s.published).sum()
    }
    pub fn invalid(&self) -> u64 {
        self.sources.iter().map(|s| s.invalid).sum()
    }
    pub fn source(&self, name: &str) -> Option<&SourceReport> {
        self.sources.iter().find(|s| s.source == name)
    }
}

/// ETag of a page and the page after it, as of the last fully published poll.
type KnownPage = (String, Option<Url>);

/// A source's pages by URL, as of its last fully published poll.
type KnownPages = HashMap<String, KnownPage>;

/// What the producer knows of a source's pages.
#[derive(Debug, Default)]
struct PageMemory {
    /// ETag and next page by URL, as of the last fully published poll; a page whose changes a
    /// poll publishes is dropped from that moment until a poll completes (see
    /// [`ProducerInner::forget_page`]).
    known: Arc<KnownPages>,
    /// What the source-state topic holds of these pages.
    manifest: Manifest,
    /// Chunk numbers `n` whose keys (`<source>/pages/<n>`) may hold a value in the topic (found
    /// at start-up, written since): a save in fewer chunks deletes the rest.
    chunk_keys: BTreeSet<usize>,
}

/// What the source-state topic holds of a source's pages, as far as this producer knows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Manifest {
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

/// A ready-to-poll producer: sources, HTTP fetcher, Kafka publisher, ETags and sync cursors.
/// Cheap to clone; each source of a cycle is polled on its own task, so sources are parsed
/// and published in parallel.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<ProducerInner>,
}

struct ProducerInner {
    pipeline: Arc<PipelineConfig>,
    sources: Vec<Source>,
    fetcher: PageFetcher,
    publisher: Publisher,
    state_topic: String,
    /// Source → its pages' ETags and next pages (loaded from the source-state topic, then kept
    /// by every fully published poll), and whether they may be saved there.
    pages: Mutex<HashMap<String, PageMemory>>,
    /// Source → incremental-sync cursor.
    cursors: Mutex<HashMap<String, SourceCursor>>,
    /// Fault injection ([`Producer::lose_next_save_ack`]).
    lose_next_save_ack: AtomicBool,
}

impl Producer {
    /// Validates the config, checks/creates the topics, loads the sync cursors and connects.
    pub async fn new(config: &ProducerConfig) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(ProducerInner::new(config).await?),
        })
    }

    /// Fault injection for tests: the next save of a source's page ETags is written in full and
    /// then reported as failed, as when Kafka's acknowledgement of the last write is lost (a
    /// timeout after the broker appended it).
    #[doc(hidden)]
    pub fn lose_next_save_ack(&self) {
        self.inner.lose_next_save_ack.store(true, Ordering::Relaxed);
    }

    /// The pipeline this producer runs.
    pub fn pipeline(&self) -> &PipelineConfig {
        &self.inner.pipeline
    }

    /// Polls every source once, in step. Fails if any source failed.
    pub async fn poll_cycle(&self) -> anyhow::Result<CycleReport> {
        let all: Vec<usize> = (0..self.inner.sources.len()).collect();
        let mut report = CycleReport::default();
        let mut first_err = None;
        for r in self.poll_in_step(&all).await {
            match r {
                Ok(s) => report.sources.push(s),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Polls the sources `indices` once, each on its own task, publishing in step (see
    /// `lockstep`); one result per source, in the order given. Dropping the future stops the
    /// polls.
    pub async fn poll_in_step(&self, indices: &[usize]) -> Vec<anyhow::Result<SourceReport>> {
        let step = Arc::new(Lockstep::new(indices.len(), lockstep::MAX_WAIT));
        let mut tasks = tokio::task::JoinSet::new();
        for (slot, &index) in indices.iter().enumerate() {
            let (inner, step) = (self.inner.clone(), step.clone());
            tasks.spawn(async move {
                let _finished = step.finish_on_drop(slot);
                (slot, inner.poll_source(index, Some((&step, slot))).await)
            });
        }
        let mut results: Vec<Option<anyhow::Result<SourceReport>>> =
            indices.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((slot, r)) => {
                    if let Some(out) = results.get_mut(slot) {
                        *out = Some(r);
                    }
                }
                Err(e) => tracing::error!(error = %e, "source poll task failed"),
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("source poll task failed"))))
            .collect()
    }

    /// Polls source `index` once: every page, published and acknowledged.
    pub async fn poll_source(&self, index: usize) -> anyhow::Result<SourceReport> {
        self.inner.poll_source(index, None).await
    }

    /// Flushes outstanding messages (shutdown).
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        self.inner.publisher.flush(timeout)
    }
}

impl ProducerInner {
    async fn new(config: &ProducerConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let pipeline = config.pipeline()?;
        if config.create_topics {
            topics::ensure_topics(&config.kafka, &pipeline.topic_plan(&config.topics)).await?;
        }
        let sources = pipeline
            .sources
            .iter()
            .map(Source::new)
            .collect::<anyhow::Result<Vec<_>>>()?;
        for s in &sources {
            metrics().init_source(&s.name);
        }
        let remembers = pipeline
            .sources
            .iter()
            .any(|s| s.incremental.etag || s.incremental.updated_since_param.is_some());
        let saved = if remembers && !config.full_export {
            state::load(&config.kafka, &config.topics.state_topic).await?
        } else {
            state::SavedState::default()
        };
        let mut pages: HashMap<String, PageMemory> = saved
            .pages
            .into_iter()
            .map(|(source, pages)| {
                let memory = PageMemory {
                    known: Arc::new(known_pages(&pages)),
                    manifest: Manifest::Current,
                    chunk_keys: BTreeSet::new(),
                };
                (source, memory)
            })
            .collect();
        for (source, keys) in saved.chunk_keys {
            pages.entry(source).or_default().chunk_keys = keys;
        }
        if config.full_export {
            for s in &sources {
                pages.entry(s.name.clone()).or_default().manifest = Manifest::Outdated;
            }
        }
        Ok(Self {
            pipeline,
            sources,
            fetcher: PageFetcher::new()?,
            publisher: Publisher::new(
                &config.kafka,
                &config.topics.dlq_topic,
                config.message_timeout_ms,
            )?,
            state_topic: config.topics.state_topic.clone(),
            pages: Mutex::new(pages),
            cursors: Mutex::new(saved.cursors),
            lose_next_save_ack: AtomicBool::new(false),
        })
    }

    async fn poll_source(
        &self,
        index: usize,
        step: Option<(&Lockstep, usize)>,
    ) -> anyhow::Result<SourceReport> {
        let source = self
            .sources
            .get(index)
            .context("no source with that index")?;
        let r = self.poll(source, step).await;
        if let Err(e) = &r {
            metrics().poll_failed(&source.name);
            tracing::error!(
                source = %source.name,
                error = format!("{e:#}"),
                "source poll failed; it will be re-polled"
            );
        }
        r
    }

    /// Polls `source` once; with `step`, in step with the cycle's other sources.
    async fn poll(
        &self,
        source: &Source,
        step: Option<(&Lockstep, usize)>,
    ) -> anyhow::Result<SourceReport> {
        let started = Instant::now();
        let since = self.cursor(&source.name);
        let mut report = SourceReport {
            source: source.name.clone(),
            updated_since: since.as_ref().map(|c| c.updated_since.clone()),
            ..Default::default()
        };
        let mut newest: Option<(i64, String)> =
            since.map(|c| (c.updated_since_ms, c.updated_since));
        let mut deliveries = self.publisher.deliveries(source);
        let mut pages = Vec::new();
        // The ETags sent are those of the last fully published poll, as this poll starts.
        let known_pages = self.known_pages(&source.name);
        let mut changed = false;
        let mut url = source.first_page(report.updated_since.as_deref());
        loop {
            let known = known_pages.get(url.as_str()).cloned();
            let fetched = self
                .fetcher
                .fetch(source, &url, known.as_ref().map(|(t, _)| t.as_str()))
                .await?;
            // Before this source's turn: the acknowledged write must not hold the others.
            if matches!(fetched, Page::Records { .. }) {
                if source.config.incremental.etag {
                    self.forget_page(&source.name, &url).await?;
                }
                changed = true;
            }
            if let Some((step, i)) = step {
                step.turn(i).await;
            }
            report.pages += 1;
            let next = match fetched {
                Page::NotModified => {
                    report.pages_not_modified += 1;
                    // A 304 answers the ETag sent, so `known` is there (a server answering 304
                    // to a request without one ends the pagination, as before).
                    let (etag, next) = known.unzip();
                    let next = next.flatten();
                    if let Some(etag) = etag {
                        pages.push(saved_page(&url, etag, next.as_ref()));
                    }
                    next
                }
                Page::Records {
                    records,
                    etag,
                    next,
                } => {
                    let fetched_at = chrono::Utc::now().to_rfc3339();
                    report.fetched += records.len() as u64;
                    metrics().fetched(&source.name, records.len() as u64);
                    for raw in &records {
                        match prepare(raw, &source.shape) {
                            Ok(r) => {
                                if newest.as_ref().is_none_or(|(ms, _)| r.updated_ms > *ms) {
                                    if let Some(v) = &r.version {
                                        newest = Some((r.updated_ms, cursor_text(v)));
                                    }
                                }
                                self.publisher
                                    .publish(&mut deliveries, &r.id, &r.value, &fetched_at)
                                    .await;
                            }
                            Err((raw, e)) => {
                                report.invalid += 1;
                                tracing::warn!(source = %source.name, error = %e, "invalid record sent to the DLQ");
                                self.publisher.dead_letter(&mut deliveries, &raw, &e).await;
                            }
                        }
                    }
                    if let Some(tag) = etag {
                        pages.push(saved_page(&url, tag, next.as_ref()));
                    }
                    next
                }
            };
            if let Some((step, i)) = step {
                step.published(i);
            }
            match next {
                Some(n) if n == url => {
                    anyhow::bail!("{}: pagination does not advance past {n}", source.name)
                }
                Some(n) => url = n,
                None => break,
            }
        }
        let acked = deliveries.finish().await?;
        report.published = acked.saturating_sub(report.invalid);
        // Only a fully acknowledged poll may skip these pages or move the cursor.
        let current = self
            .memory(&source.name, |m| m.manifest == Manifest::Current)
            .unwrap_or(false);
        if source.config.incremental.etag && (changed || !current) {
            self.remember_pages(source, pages).await;
        }
        if source.config.incremental.updated_since_param.is_some() {
            self.save_cursor(source, newest).await?;
        }
        report.elapsed_s = metrics::secs(started.elapsed());
        metrics().poll_took(&source.name, started.elapsed().as_secs_f64());
        tracing::info!(
            source = %source.name,
            fetched = report.fetched,
            published = report.published,
            invalid = report.invalid,
            pages = report.pages,
            elapsed_s = report.elapsed_s,
            "source polled"
        );
        Ok(report)
    }

    /// Persists the newest version seen as the source's cursor (when it moved).
    async fn save_cursor(
        &self,
        source: &Source,
        newest: Option<(i64, String)>,
    ) -> anyhow::Result<()> {
        let Some((ms, text)) = newest else {
            return Ok(());
        };
        if self
            .cursor(&source.name)
            .is_some_and(|c| c.updated_since == text)
        {
            return Ok(());
        }
        let cursor = SourceCursor {
            updated_since: text,
            updated_since_ms: ms,
            saved_at: chrono::Utc::now().to_rfc3339(),
        };
        let value = serde_json::to_vec(&cursor)?;
        self.publisher
            .write_acked(&self.state_topic, &source.name, Some(&value))
            .await
            .context("saving the incremental-sync cursor")?;
        if let Ok(mut c) = self.cursors.lock() {
            c.insert(source.name.clone(), cursor);
        }
        Ok(())
    }

    fn cursor(&self, source: &str) -> Option<SourceCursor> {
        self.cursors.lock().ok()?.get(source).cloned()
    }

    /// The source's pages as of its last fully published poll (a snapshot: the poll that
    /// reads them may forget them meanwhile).
    fn known_pages(&self, source: &str) -> Arc<KnownPages> {
        self.memory(source, |m| m.known.clone()).unwrap_or_default()
    }

    /// Runs `f` on what is known of the source's pages (None if the lock is poisoned).
    fn memory<T>(&self, source: &str, f: impl FnOnce(&mut PageMemory) -> T) -> Option<T> {
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
    async fn forget_page(&self, source: &str, url: &Url) -> anyhow::Result<()> {
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
    async fn remember_pages(&self, source: &Source, pages: Vec<SavedPage>) {
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
    async fn save_pages(&self, source: &str, pages: &[SavedPage]) -> anyhow::Result<usize> {
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
    async fn delete_chunks_from(&self, source: &str, first: usize) {
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
fn known_pages(pages: &[SavedPage]) -> KnownPages {
    pages
        .iter()
        .map(|p| {
            let next = p.next.as_deref().and_then(|n| Url::parse(n).ok());
            (p.url.clone(), (p.etag.clone(), next))
        })
        .collect()
}

fn saved_page(url: &Url, etag: String, next: Option<&Url>) -> SavedPage {
    SavedPage {
        url: url.to_string(),
        etag,
        next: next.map(Url::to_string),
    }
}

/// A fetched record ready to publish.
struct Prepared<'a> {
    id: String,
    updated_ms: i64,
    /// The version field as fetched (for the incremental-sync cursor), when present.
    version: Option<Value>,
    /// Canonical JSON (sorted keys, compact): the consumer recognises an unchanged record by
    /// hashing these bytes, without parsing.
    value: Cow<'a, [u8]>,
}

/// Reads and canonicalises one fetched record. A record in canonical form already (what most
/// sources serve, the mocks included) is used as fetched and read without building a tree;
/// any other is parsed, validated and canonicalised. An invalid one comes back parsed, for the
/// DLQ.
fn prepare<'a>(
    raw: &'a RawValue,
    shape: &RecordShape,
) -> Result<Prepared<'a>, (Value, RecordError)> {
    let bytes = raw.get().as_bytes();
    if is_canonical(bytes) {
        if let Some((id, updated_ms, version)) = inspect_raw(bytes, shape) {
            return Ok(Prepared {
                id,
                updated_ms,
                version,
                value: Cow::Borrowed(bytes),
            });
        }
    }
    // A RawValue is valid JSON, so this parse does not fail.
    let value: Value = serde_json::from_str(raw.get()).unwrap_or_default();
    match inspect_record(&value, shape) {
        Ok((id, updated_ms)) => Ok(Prepared {
            id,
            updated_ms,
            version: value.get(&shape.updated_at_field).cloned(),
            value: Cow::Owned(canonical_json(&value).into_bytes()),
        }),
        Err(e) => Err((value, e)),
    }
}

/// A version value as the text sent back in `updated_since`.
fn cursor_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs the producer until `shutdown`: the sources of each interval polled together, in step.
pub async fn run(config: ProducerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ready = Readiness::default();
    if let Some(addr) = config.metrics_addr {
        let bound = metrics::serve(addr, ready.clone(), shutdown.clone()).await?;
        tracing::info!(%bound, "metrics endpoint listening");
    }
    config.validate()?;
    let start = || Producer::new(&config);
    let down = || ready.set("kafka", false);
    let Some(producer) = retry::start_until_up("producer", &shutdown, start, down).await else {
        return Ok(());
    };
    ready.set("kafka", true);
    if config.once {
        return run_once(&producer, &shutdown).await;
    }
    // Sources polled on the same interval are polled together, in step (see `lockstep`).
    let mut groups: BTreeMap<u64, (Vec<usize>, Vec<String>)> = BTreeMap::new();
    for (i, source) in producer.pipeline().sources.iter().enumerate() {
        let (group, checks) = groups.entry(source.interval_s).or_default();
        group.push(i);
        checks.push(format!("source:{}", source.name));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (interval_s, (group, checks)) in groups {
        let (producer, ready, shutdown) = (producer.clone(), ready.clone(), shutdown.clone());
        let interval = Duration::from_secs(interval_s);
        tasks.spawn(async move {
            loop {
                let started = Instant::now();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    results = producer.poll_in_step(&group) => {
                        for (check, r) in checks.iter().zip(results) {
                            ready.set(check, r.is_ok());
                        }
                    }
                }
                let wait = interval.saturating_sub(started.elapsed());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!("producer stopping: flushing Kafka");
    producer.flush(SHUTDOWN_FLUSH)
}

/// How long a stopping producer waits for outstanding records. What is not acknowledged by
/// then is not lost: the poll it belongs to saved no ETags or cursors, so it is polled again.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// `--once`: one cycle, its report (and this process's peak memory) as JSON on stdout.
async fn run_once(producer: &Producer, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    let result = tokio::select! {
        _ = shutdown.cancelled() => {
            producer.flush(SHUTDOWN_FLUSH)?;
            anyhow::bail!("shutdown requested before the poll completed");
        }
        r = producer.poll_cycle() => r,
    };
    producer.flush(Duration::from_secs(30))?;
    let report = result?;
    let out = serde_json::json!({
        "published": report.published(),
        "invalid": report.invalid(),
        "elapsed_s": metrics::secs(started.elapsed()),
        "peak_rss_mb": pipeline_core::memory::peak_rss_mb(None),
        "cpu_s": pipeline_core::memory::cpu_seconds(None),
        "sources": report.sources,
    });
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("valid JSON")
    }

    #[test]
    fn canonical_records_are_published_as_fetched_and_others_canonicalised() {
        let shape = RecordShape::default();
        let sent = raw(r#"{"id":7,"name":"A","updated_at":"2026-01-01T00:00:00Z"}"#);
        let r = prepare(&sent, &shape).expect("valid");
        assert!(matches!(r.value, Cow::Borrowed(_)), "used as fetched");
        assert_eq!((r.id.as_str(), r.updated_ms), ("7", 1_767_225_600_000));
        assert_eq!(r.version, Some(Value::from("2026-01-01T00:00:00Z")));

        let unsorted = raw(r#"{ "updated_at": "2026-01-01T00:00:00Z", "name": "A", "id": 7 }"#);
        let u = prepare(&unsorted, &shape).expect("valid");
        assert!(matches!(u.value, Cow::Owned(_)));
        assert_eq!(u.value, r.value, "the same record, the same bytes");
        assert_eq!(
            (u.id, u.updated_ms, u.version),
            (r.id, r.updated_ms, r.version)
        );

        let bare = raw(r#"{"id":"x"}"#);
        let no_version = prepare(&bare, &shape).expect("valid");
        assert_eq!((no_version.updated_ms, no_version.version), (0, None));

        for invalid in [
            r#"{"name":"no id"}"#,
            r#"{"id":1,"updated_at":"soon"}"#,
            "[1]",
        ] {
            let (value, _) = prepare(&raw(invalid), &shape).err().expect(invalid);
            assert_eq!(value, serde_json::from_str::<Value>(invalid).expect("JSON"));
        }
    }
}
