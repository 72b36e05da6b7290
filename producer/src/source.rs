//! Fetching a source API page by page, as its configuration says: pagination style (page,
//! offset, cursor in the body, `Link: rel="next"`), auth header, rate limit, timeout, retries
//! with full-jitter backoff honouring `Retry-After`, and `If-None-Match` so unchanged pages cost
//! a 304 instead of a re-export.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pipeline_core::http;
use pipeline_core::metrics::metrics;
use pipeline_core::pipeline_config::{Pagination, SourceConfig};
use pipeline_core::record::RecordShape;
use pipeline_core::retry::RetryPolicy;
use pipeline_core::secret::Secret;
use reqwest::header::{HeaderMap, HeaderName};
use reqwest::{StatusCode, Url};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::Mutex;

/// One source system as the producer sees it: its configuration, resolved and ready to poll.
pub struct Source {
    /// Short name used in headers, metrics and the sync state (`crm`).
    pub name: String,
    /// Entity sent in the `entity` header (`customer`).
    pub entity: String,
    /// Schema id sent in the `schema` header.
    pub schema: String,
    /// Destination topic.
    pub topic: String,
    /// Which fields hold the id and the version.
    pub shape: RecordShape,
    pub config: SourceConfig,
    url: Url,
    auth: Option<(HeaderName, Secret)>,
    retry: RetryPolicy,
    timeout: Duration,
    /// Earliest start of the next request (rate limit).
    next_slot: Mutex<Instant>,
    min_gap: Option<Duration>,
}

impl Source {
    /// Resolves `config` (auth secret from the environment, URL, retry policy).
    pub fn new(config: &SourceConfig) -> anyhow::Result<Self> {
        let url = Url::parse(&config.url())
            .with_context(|| format!("source {}: base_url/path is not a valid URL", config.name))?;
        let auth = match &config.auth {
            Some(a) => {
                let value = std::env::var(&a.value_env).with_context(|| {
                    format!(
                        "source {}: auth.value_env: environment variable {} is not set",
                        config.name, a.value_env
                    )
                })?;
                let name = HeaderName::from_bytes(a.header.as_bytes())
                    .with_context(|| format!("source {}: auth.header", config.name))?;
                Some((name, Secret::new(format!("{}{value}", a.prefix))))
            }
            None => None,
        };
        Ok(Self {
            name: config.name.clone(),
            entity: config.entity.clone(),
            schema: config.schema(),
            topic: config.topic.clone(),
            shape: config.shape(),
            url,
            auth,
            retry: RetryPolicy {
                max_attempts: config.retry.max_attempts,
                initial_backoff: Duration::from_millis(config.retry.initial_backoff_ms),
                max_backoff: Duration::from_millis(config.retry.max_backoff_ms),
            },
            timeout: Duration::from_millis(config.timeout_ms),
            next_slot: Mutex::new(Instant::now()),
            min_gap: config
                .rate_limit_per_s
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            config: config.clone(),
        })
    }

    /// The first page's URL; `since` is the incremental-sync cursor, when there is one.
    pub fn first_page(&self, since: Option<&str>) -> Url {
        let mut url = self.url.clone();
        {
            let mut q = url.query_pairs_mut();
            match &self.config.pagination {
                Pagination::Page {
                    page_param,
                    size_param,
                    size,
                } => {
                    q.append_pair(page_param, "1")
                        .append_pair(size_param, &size.to_string());
                }
                Pagination::Offset {
                    offset_param,
                    size_param,
                    size,
                } => {
                    q.append_pair(offset_param, "0")
                        .append_pair(size_param, &size.to_string());
                }
                Pagination::Cursor {
                    size_param, size, ..
                }
                | Pagination::Link { size_param, size } => {
                    q.append_pair(size_param, &size.to_string());
                }
            }
            if let (Some(param), Some(since)) =
                (&self.config.incremental.updated_since_param, since)
            {
                q.append_pair(param, since);
            }
        }
        url
    }

    /// Waits for this source's next request slot (rate limit).
    async fn rate_limit(&self) {
        let Some(gap) = self.min_gap else {
            return;
        };
        let wait = {
            let mut slot = self.next_slot.lock().await;
            let now = Instant::now();
            let start = (*slot).max(now);
            *slot = start + gap;
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// The URL after `url`, from the page's body and headers, or None on the last page.
    fn next_page(&self, url: &Url, body: &Value, headers: &HeaderMap, count: usize) -> Option<Url> {
        let full = count as u64 >= self.config.pagination.size() && count > 0;
        match &self.config.pagination {
            Pagination::Page { page_param, .. } => {
                let more = match body.get("next_page") {
                    Some(Value::Null) => false,
                    Some(_) => count > 0,
                    None => full,
                };
                let page: u64 = query_value(url, page_param)?.parse().ok()?;
                more.then(|| with_query(url, page_param, &(page + 1).to_string()))
            }
            Pagination::Offset { offset_param, .. } => {
                let offset: u64 = query_value(url, offset_param)?.parse().ok()?;
                full.then(|| with_query(url, offset_param, &(offset + count as u64).to_string()))
            }
            Pagination::Cursor {
                cursor_param,
                next_cursor_field,
                ..
            } => {
                let cursor = match body.get(next_cursor_field)? {
                    Value::String(s) if !s.is_empty() => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some(with_query(url, cursor_param, &cursor))
            }
            Pagination::Link { .. } => headers
                .get_all("link")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(link_next)
                .and_then(|next| url.join(&next).ok()),
        }
    }

    /// Splits a page body into its records, kept as raw JSON texts (no tree built per record),
    /// and the body fields pagination reads.
    fn split_page(&self, body: &[u8]) -> anyhow::Result<(Vec<Box<RawValue>>, Value)> {
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Ok((serde_json::from_slice(body)?, Value::Null)),
            Some(b'{') => {
                let mut fields: HashMap<String, &RawValue> = serde_json::from_slice(body)?;
                let meta = page_meta(&fields, &self.config.pagination)?;
                let names: Vec<&str> = match &self.config.records_field {
                    Some(f) => vec![f.as_str()],
                    None => vec!["data", "items", "records"],
                };
                let records = names
                    .iter()
                    .find_map(|k| {
                        let raw = fields.remove(*k)?;
                        serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()).ok()
                    })
                    .with_context(|| format!("page has no array in {names:?}"))?;
                Ok((records, meta))
            }
            _ => bail!("page is neither an object nor an array"),
        }
    }
}

/// One fetched page.
pub enum Page {
    /// The server answered 304 to our ETag.
    NotModified,
    /// Records (raw JSON texts, as the source sent them), the page's ETag and the next page's URL.
    Records {
        records: Vec<Box<RawValue>>,
        etag: Option<String>,
        next: Option<Url>,
    },
}

/// Fetches pages over one shared connection pool.
pub struct PageFetcher {
    client: reqwest::Client,
}

impl PageFetcher {
    pub fn new() -> anyhow::Result<Self> {
        // Per-request timeouts come from each source; this is only the outer bound.
        Ok(Self {
            client: http::client(Duration::from_secs(600))?,
        })
    }

    /// Fetches `url` of `source`, sending `etag` as `If-None-Match` when known.
    pub async fn fetch(
        &self,
        source: &Source,
        url: &Url,
        etag: Option<&str>,
    ) -> anyhow::Result<Page> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            source.rate_limit().await;
            let mut req = self.client.get(url.clone()).timeout(source.timeout);
            if let Some(tag) = etag.filter(|_| source.config.incremental.etag) {
                req = req.header("if-none-match", tag);
            }
            if let Some((name, value)) = &source.auth {
                req = req.header(name, value.expose());
            }
            let started = Instant::now();
            let sent = req.send().await;
            metrics().http_took("producer", &source.name, started.elapsed().as_secs_f64());
            let (err, hint) = match sent {
                Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
                    return Ok(Page::NotModified)
                }
                Ok(resp) if resp.status().is_success() => {
                    let headers = resp.headers().clone();
                    let etag = headers
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    match resp.bytes().await.map(|body| source.split_page(&body)) {
                        Ok(Ok((records, next_body))) => {
                            let next = source.next_page(url, &next_body, &headers, records.len());
                            return Ok(Page::Records {
                                records,
                                etag,
                                next,
                            });
                        }
                        // A body cut short or garbled in transit is fetched again; a page
                        // without its records array is the source's fault and is not.
                        Ok(Err(e)) if !e.is::<serde_json::Error>() => return Err(e),
                        Ok(Err(e)) => (format!("reading the page: {e}"), None),
                        Err(e) => (format!("reading the page: {e}"), None),
                    }
                }
                Ok(resp) if http::is_retryable(resp.status()) => (
                    format!("HTTP {}", resp.status()),
                    http::retry_after(resp.headers()),
                ),
                Ok(resp) => bail!(
                    "{} answered HTTP {} for {}",
                    source.name,
                    resp.status(),
                    http::redact_url(url.as_str())
                ),
                Err(e) => (format!("request failed: {e}"), None),
            };
            if !source.retry.allows_another(attempt) {
                bail!(
                    "{} {}: giving up after {attempt} attempts: {err}",
                    source.name,
                    http::redact_url(url.as_str())
                );
            }
            metrics().http_retried("producer", &source.name);
            let delay = source.retry.backoff(attempt - 1, hint);
            tracing::warn!(source = %source.name, attempt, error = %err, delay_ms = delay.as_millis() as u64, "retrying source request");
            tokio::time::sleep(delay).await;
        }
    }
}

/// The parts of a page body pagination reads, as an object (`Null` for other paginations).
fn page_meta(fields: &HashMap<String, &RawValue>, p: &Pagination) -> anyhow::Result<Value> {
    let field = match p {
        Pagination::Page { .. } => "next_page",
        Pagination::Cursor {
            next_cursor_field, ..
        } => next_cursor_field.as_str(),
        _ => return Ok(Value::Null),
    };
    let mut meta = serde_json::Map::new();
    if let Some(raw) = fields.get(field) {
        meta.insert(field.to_owned(), serde_json::from_str(raw.get())?);
    }
    Ok(Value::Object(meta))
}

fn query_value(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `url` with query parameter `name` set to `value` (others kept in order).
fn with_query(url: &Url, name: &str, value: &str) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut out = url.clone();
    {
        let mut q = out.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        q.append_pair(name, value);
    }
    out
}

/// The `rel="next"` target of one `Link` header value (RFC 8288).
fn link_next(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .any(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_whitespace()
                        .any(|r| r == "next")
            })
            .then(|| target.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_are_parsed() {
        assert_eq!(
            link_next(r#"<https://a/x?p=1>; rel="prev", <https://a/x?c=abc>; rel="next""#)
                .as_deref(),
            Some("https://a/x?c=abc")
        );
        assert_eq!(link_next(r#"<https://a/x?p=1>; rel="prev""#), None);
    }

    #[test]
    fn query_parameters_are_replaced_in_place() {
        let u = Url::parse("http://h/p?page=1&per_page=10&updated_since=x").unwrap();
        let n = with_query(&u, "page", "2");
        assert_eq!(query_value(&n, "page").as_deref(), Some("2"));
        assert_eq!(query_value(&n, "updated_since").as_deref(), Some("x"));
        assert_eq!(n.query_pairs().count(), 3);
    }
}
