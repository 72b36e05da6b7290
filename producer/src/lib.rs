//! The producer: polls each configured source API on its interval, follows its pagination,
//! validates each record and publishes it to the source's partitioned topic keyed by id (invalid
//! records go to the DLQ with a reason). A poll succeeds only when Kafka acknowledged every
//! record; a failed poll is logged, counted, and re-polled on the source's next tick, so nothing
//! is lost to a broker outage. Sources on the same interval are polled together and publish in
//! step (see `lockstep`); a failing source holds the others' publishing back by one second per
//! poll at most, but their next poll waits until its own poll has given up.

pub mod config;
pub mod lockstep;
mod pages;
mod poll;
pub mod publish;
mod report;
pub mod source;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep::Lockstep;
use pipeline_core::metrics::{self, metrics, Readiness};
use pipeline_core::pipeline_config::PipelineConfig;
use pipeline_core::retry;
use pipeline_core::topics;
use tokio_util::sync::CancellationToken;

pub use config::ProducerConfig;
use pipeline_core::dlq::DlqWriter;
use publish::Publisher;
use source::{PageFetcher, Source};
use state::SourceCursor;

use pages::{known_pages, Manifest, PageMemory};
pub use report::{CycleReport, SourceReport};

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
    /// Where records that fail validation go, acknowledged before the poll counts as published.
    dlq: DlqWriter,
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
            publisher: Publisher::new(&config.kafka, config.message_timeout_ms)?,
            dlq: DlqWriter::new(&config.kafka, &config.topics.dlq_topic, "producer")?,
            state_topic: config.topics.state_topic.clone(),
            pages: Mutex::new(pages),
            cursors: Mutex::new(saved.cursors),
            lose_next_save_ack: AtomicBool::new(false),
        })
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
