//! Fetching a source API page by page: timeouts, retries with full-jitter backoff honouring
//! `Retry-After`, and `If-None-Match` so unchanged pages cost a 304 instead of a re-export.

use std::time::Duration;

use anyhow::{bail, Context};
use pipeline_core::http;
use pipeline_core::metrics::metrics;
use pipeline_core::retry::RetryPolicy;
use reqwest::StatusCode;
use serde_json::Value;

/// One source system as the producer sees it.
#[derive(Debug, Clone)]
pub struct Source {
    /// Short name used in headers and metrics (`crm`, `inventory`).
    pub name: &'static str,
    /// The entity (`customer`, `product`).
    pub entity: &'static str,
    /// Schema id sent in the `schema` header.
    pub schema: &'static str,
    /// Collection URL, e.g. `http://crm:8081/customers`.
    pub url: String,
    /// Destination topic.
    pub topic: String,
}

/// One fetched page.
pub enum Page {
    /// The server answered 304 to our ETag.
    NotModified,
    /// Records, the page's ETag and whether a next page exists.
    Records {
        records: Vec<Value>,
        etag: Option<String>,
        has_next: bool,
    },
}

/// Fetches pages of a source with retries.
pub struct PageFetcher {
    client: reqwest::Client,
    retry: RetryPolicy,
    per_page: u64,
}

impl PageFetcher {
    pub fn new(timeout: Duration, max_attempts: u32, per_page: u64) -> anyhow::Result<Self> {
        Ok(Self {
            client: http::client(timeout)?,
            retry: RetryPolicy {
                max_attempts,
                ..RetryPolicy::default()
            },
            per_page,
        })
    }

    /// Fetches page `page` (1-based), sending `etag` as `If-None-Match` when known.
    pub async fn fetch(
        &self,
        source: &Source,
        page: u64,
        etag: Option<&str>,
    ) -> anyhow::Result<Page> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .get(&source.url)
                .query(&[("page", page), ("per_page", self.per_page)]);
            if let Some(tag) = etag {
                req = req.header("if-none-match", tag);
            }
            let started = std::time::Instant::now();
            let sent = req.send().await;
            metrics()
                .http_duration
                .with_label_values(&["producer", source.name])
                .observe(started.elapsed().as_secs_f64());
            let (err, hint) = match sent {
                Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
                    return Ok(Page::NotModified)
                }
                Ok(resp) if resp.status().is_success() => {
                    let etag = resp
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    match resp.json::<Value>().await {
                        Ok(body) => return parse_page(body, etag, self.per_page),
                        Err(e) => (format!("reading page {page}: {e}"), None),
                    }
                }
                Ok(resp) if http::is_retryable(resp.status()) => (
                    format!("HTTP {}", resp.status()),
                    http::retry_after(resp.headers()),
                ),
                Ok(resp) => bail!(
                    "{} answered HTTP {} for page {page}",
                    source.url,
                    resp.status()
                ),
                Err(e) => (format!("request failed: {e}"), None),
            };
            if !self.retry.allows_another(attempt) {
                bail!(
                    "{} page {page}: giving up after {attempt} attempts: {err}",
                    source.url
                );
            }
            metrics()
                .http_retries
                .with_label_values(&["producer", source.name])
                .inc();
            let delay = self.retry.backoff(attempt - 1, hint);
            tracing::warn!(source = source.name, page, attempt, error = %err, delay_ms = delay.as_millis() as u64, "retrying source request");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Accepts `{"data": [...], "next_page": n|null}` (also `items`/`records`) or a bare array.
fn parse_page(body: Value, etag: Option<String>, per_page: u64) -> anyhow::Result<Page> {
    let (records, next) = match body {
        Value::Array(items) => (items, None),
        Value::Object(mut map) => {
            let records = ["data", "items", "records"]
                .iter()
                .find_map(|k| match map.remove(*k) {
                    Some(Value::Array(a)) => Some(a),
                    _ => None,
                })
                .context("page has no `data` array")?;
            (records, map.get("next_page").cloned())
        }
        _ => bail!("page is neither an object nor an array"),
    };
    let has_next = match next {
        Some(Value::Null) => false,
        Some(_) => !records.is_empty(),
        None => records.len() as u64 >= per_page && !records.is_empty(),
    };
    Ok(Page::Records {
        records,
        etag,
        has_next,
    })
}
