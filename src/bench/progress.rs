//! Watching the benchmark's processes: until the consumers hold their partitions, the producer
//! finished, everything is delivered and the lag is zero; and what their metrics say about
//! where the consumers' time went.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Context};
use mocks::analytics::AnalyticsMock;
use pipeline_core::lag::LagProbe;
use pipeline_core::metrics::sum_of;
use pipeline_kit::process::ChildProcess;

/// What `producer --once` printed.
#[derive(serde::Deserialize)]
pub(super) struct OnceReport {
    pub(super) published: u64,
    pub(super) peak_rss_mb: Option<f64>,
    pub(super) cpu_s: Option<f64>,
}

/// Waits until the consumers' `pipeline_consumer_assigned_partitions` add up to `total`.
pub(super) async fn wait_assigned(
    urls: &[String],
    total: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let client = reqwest::Client::new();
    loop {
        let sum: i64 = fetch_all(&client, urls)
            .await
            .iter()
            .map(|text| sum_of(text, "pipeline_consumer_assigned_partitions") as i64)
            .sum();
        if sum == total {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("consumers hold {sum} of {total} partitions after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `/metrics` text of every consumer that answers.
pub(super) async fn fetch_all(client: &reqwest::Client, urls: &[String]) -> Vec<String> {
    let mut texts = Vec::with_capacity(urls.len());
    for url in urls {
        if let Ok(r) = client.get(url).send().await {
            texts.push(r.text().await.unwrap_or_default());
        }
    }
    texts
}

/// Sums of the consumers' duration histograms (batch, Redis by op, Analytics HTTP), in seconds.
pub(super) fn consumer_time(texts: &[String]) -> BTreeMap<String, f64> {
    let wanted = [
        ("pipeline_consumer_batch_duration_seconds_sum", "batches"),
        ("pipeline_consumer_redis_duration_seconds_sum{op=\"load\"}", "redis_load"),
        ("pipeline_consumer_redis_duration_seconds_sum{op=\"commit\"}", "redis_commit"),
        ("pipeline_consumer_redis_duration_seconds_sum{op=\"confirm\"}", "redis_confirm"),
        (
            "pipeline_http_request_duration_seconds_sum{component=\"consumer\",target=\"analytics\"}",
            "analytics_post",
        ),
        ("pipeline_consumer_batch_duration_seconds_count", "batch_count"),
    ];
    let mut out = BTreeMap::new();
    for text in texts {
        for (metric, name) in wanted {
            *out.entry(name.to_owned()).or_insert(0.0) += sum_of(text, metric);
        }
    }
    for v in out.values_mut() {
        *v = (*v * 1000.0).round() / 1000.0;
    }
    out
}

/// Waits for `producer --once` to exit; its report and how long it ran.
pub(super) async fn wait_producer(
    mut p: ChildProcess,
    timeout: Duration,
) -> anyhow::Result<(OnceReport, Duration)> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        if let Some(status) = p.try_wait() {
            let elapsed = started.elapsed();
            if !status.success() {
                bail!("{} exited with {status}", p.name());
            }
            let mut out = String::new();
            if let Some(mut stdout) = p.take_stdout() {
                std::io::Read::read_to_string(&mut stdout, &mut out)?;
            }
            let report = serde_json::from_str(out.trim())
                .with_context(|| format!("reading the producer's report {out:?}"))?;
            return Ok((report, elapsed));
        }
        if Instant::now() > deadline {
            bail!("{} still running after {timeout:?}", p.name());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until Analytics holds `expected` ids; the time since `started`.
pub(super) async fn wait_delivered(
    analytics: &AnalyticsMock,
    expected: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let mut last_print = Instant::now();
    loop {
        let s = analytics.stats();
        if s.unique_ids >= expected {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "only {} of {expected} ids delivered after {timeout:?}",
                s.unique_ids
            );
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("bench:   {:>9} of {expected} delivered", s.unique_ids);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the group has stored and committed every offset.
pub(super) async fn wait_lag_zero(
    probe: &Arc<LagProbe>,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    loop {
        let p = probe.clone();
        let lag = tokio::task::spawn_blocking(move || p.total(Duration::from_secs(5))).await??;
        if lag == 0 {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("consumers still {lag} messages behind after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages the broker no longer holds at the start of each partition (log start offset).
pub(super) fn evicted_messages(probe: &LagProbe, topics: &[&str]) -> anyhow::Result<i64> {
    let mut evicted = 0;
    for t in topics {
        evicted += probe.log_start_total(t, Duration::from_secs(5))?;
    }
    Ok(evicted)
}
