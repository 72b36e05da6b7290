//! Delivery of merged records to the Analytics API.
//!
//! Records go out in `POST /analytics/data` batches carrying `Idempotency-Key: <batch_id>`
//! (SHA-256 of the sorted record keys). Failures are classified ([`DeliveryError`]) because each
//! class is handled differently:
//!
//! * retryable (timeouts, 5xx, 429, 408): backoff with full jitter honouring `Retry-After`, up to
//!   the delivery budget; then the records are dead-lettered as `retries_exhausted`;
//! * unauthorized (401/403): a configuration fault. Delivery halts (readiness false, nothing
//!   dead-lettered) and probes until the credentials work or the worker shuts down;
//! * permanent (other 4xx): the batch is split in halves until the offending records are
//!   isolated, so one bad record does not take its batch to the DLQ.
//!
//! Per-record rejections in a 202 answer are returned for dead-lettering; the rest is delivered.

use std::collections::VecDeque;
use std::time::Duration;

use pipeline_core::canonical::batch_id;
use pipeline_core::http;
use pipeline_core::metrics::{metrics, Readiness};
use pipeline_core::retry::RetryPolicy;
use pipeline_core::secret::Secret;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::join::Emission;

/// Why one POST failed.
#[derive(Debug, Error)]
pub enum DeliveryError {
    #[error("retryable failure: {reason}")]
    Retryable {
        reason: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
    #[error("batch rejected with HTTP {status}: {body}")]
    Permanent { status: u16, body: String },
    #[error("Analytics refused our credentials (HTTP {status})")]
    Unauthorized { status: u16 },
}

/// The Analytics API's answer to an accepted batch.
#[derive(Debug, Default, Deserialize)]
pub struct Ack {
    #[serde(default)]
    pub accepted: u64,
    #[serde(default)]
    pub duplicates: u64,
    #[serde(default)]
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Deserialize)]
pub struct Rejected {
    pub key: String,
    pub reason: String,
}

#[derive(Serialize)]
struct BatchBody<'a> {
    batch_id: &'a str,
    generated_at: String,
    records: Vec<&'a Value>,
}

/// What happened to one emission.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    /// To be dead-lettered.
    Failed {
        reason: String,
        class: &'static str,
        status: Option<u16>,
        attempts: u32,
    },
}

/// Delivery was abandoned because the worker is shutting down.
#[derive(Debug, Error)]
#[error("delivery abandoned: shutting down")]
pub struct Abandoned;

/// HTTP client for the Analytics API.
pub struct AnalyticsClient {
    client: reqwest::Client,
    url: String,
    token: Option<Secret>,
    retry: RetryPolicy,
    batch_size: usize,
    ready: Readiness,
}

impl AnalyticsClient {
    pub fn new(
        base_url: &str,
        token: Option<Secret>,
        timeout: Duration,
        retry: RetryPolicy,
        batch_size: usize,
        ready: Readiness,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: http::client(timeout)?,
            url: format!("{}/analytics/data", base_url.trim_end_matches('/')),
            token,
            retry,
            batch_size,
            ready,
        })
    }

    /// One POST of `records`.
    pub async fn post(&self, records: &[&Emission]) -> Result<Ack, DeliveryError> {
        let id = batch_id(records.iter().map(|e| e.key.as_str()));
        let body = BatchBody {
            batch_id: &id,
            generated_at: chrono::Utc::now().to_rfc3339(),
            records: records.iter().map(|e| &e.record).collect(),
        };
        let mut req = self
            .client
            .post(&self.url)
            .header("idempotency-key", &id)
            .json(&body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let resp = req.send().await.map_err(|e| DeliveryError::Retryable {
            reason: format!("request failed: {e}"),
            status: None,
            retry_after: None,
        })?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json::<Ack>()
                .await
                .map_err(|e| DeliveryError::Retryable {
                    reason: format!("unreadable answer: {e}"),
                    status: Some(status.as_u16()),
                    retry_after: None,
                });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(DeliveryError::Unauthorized {
                status: status.as_u16(),
            });
        }
        if http::is_retryable(status) {
            return Err(DeliveryError::Retryable {
                reason: format!("HTTP {status}"),
                status: Some(status.as_u16()),
                retry_after: http::retry_after(resp.headers()),
            });
        }
        let body = resp.text().await.unwrap_or_default();
        Err(DeliveryError::Permanent {
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }

    /// Delivers every emission; returns one outcome per emission (same order).
    pub async fn deliver_all(
        &self,
        emissions: &[&Emission],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Outcome>, Abandoned> {
        let mut outcomes = vec![Outcome::Delivered; emissions.len()];
        let mut queue: VecDeque<Vec<usize>> = (0..emissions.len())
            .collect::<Vec<_>>()
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        while let Some(chunk) = queue.pop_front() {
            let records: Vec<&Emission> = chunk.iter().map(|&i| emissions[i]).collect();
            match self.post_with_retries(&records, shutdown).await? {
                Ok(ack) => {
                    for r in ack.rejected {
                        for &i in &chunk {
                            if emissions[i].key == r.key {
                                outcomes[i] = Outcome::Failed {
                                    reason: r.reason.clone(),
                                    class: "rejected",
                                    status: Some(202),
                                    attempts: 1,
                                };
                            }
                        }
                    }
                }
                Err((DeliveryError::Permanent { .. }, _)) if chunk.len() > 1 => {
                    let (a, b) = chunk.split_at(chunk.len() / 2);
                    queue.push_front(b.to_vec());
                    queue.push_front(a.to_vec());
                }
                Err((err, attempts)) => {
                    let (class, status, reason) = match &err {
                        DeliveryError::Permanent { status, body } => {
                            ("rejected", Some(*status), format!("HTTP {status}: {body}"))
                        }
                        DeliveryError::Retryable { status, reason, .. } => (
                            "retries_exhausted",
                            *status,
                            format!("retries_exhausted: {reason}"),
                        ),
                        DeliveryError::Unauthorized { status } => {
                            ("unauthorized", Some(*status), err.to_string())
                        }
                    };
                    for &i in &chunk {
                        outcomes[i] = Outcome::Failed {
                            reason: reason.clone(),
                            class,
                            status,
                            attempts,
                        };
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// POSTs one chunk, retrying retryable failures within the budget and halting on 401/403.
    async fn post_with_retries(
        &self,
        records: &[&Emission],
        shutdown: &CancellationToken,
    ) -> Result<Result<Ack, (DeliveryError, u32)>, Abandoned> {
        let mut attempts = 0u32;
        let mut halted_rounds = 0u32;
        loop {
            attempts += 1;
            let err = match self.post(records).await {
                Ok(ack) => {
                    self.set_halted(false);
                    metrics()
                        .records_delivered
                        .inc_by(ack.accepted + ack.duplicates);
                    return Ok(Ok(ack));
                }
                Err(e) => e,
            };
            let delay = match &err {
                DeliveryError::Unauthorized { .. } => {
                    // Not the records' fault: hold them (no DLQ), probe slowly.
                    self.set_halted(true);
                    attempts = 0;
                    halted_rounds += 1;
                    tracing::error!(error = %err, "delivery halted: fix ANALYTICS_TOKEN; records are held, not dead-lettered");
                    self.retry
                        .backoff(halted_rounds.min(8), None)
                        .max(Duration::from_millis(500))
                }
                DeliveryError::Retryable {
                    retry_after,
                    reason,
                    ..
                } => {
                    self.ready.set("analytics", false);
                    if !self.retry.allows_another(attempts) {
                        return Ok(Err((err, attempts)));
                    }
                    metrics()
                        .http_retries
                        .with_label_values(&["consumer", "analytics"])
                        .inc();
                    tracing::warn!(attempt = attempts, error = %reason, "delivery failed, retrying");
                    self.retry.backoff(attempts - 1, *retry_after)
                }
                DeliveryError::Permanent { .. } => return Ok(Err((err, attempts))),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Abandoned),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn set_halted(&self, halted: bool) {
        metrics().delivery_halted.set(i64::from(halted));
        self.ready.set("analytics", !halted);
    }
}
