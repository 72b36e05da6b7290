//! Delivery of merged records to the Analytics API.
//!
//! Records go out in `POST /analytics/data` batches carrying `Idempotency-Key: <batch_id>`
//! (SHA-256 of the sorted record keys). Failures are classified ([`DeliveryError`]) because each
//! class is handled differently:
//!
//! * unavailable (connection refused, 502/503/504): the service is down, not the records at
//!   fault. Delivery holds (readiness false, no budget spent, nothing dead-lettered) and probes
//!   with capped backoff, honouring `Retry-After`, until it answers;
//! * unauthorized (401/403): a configuration fault; held the same way;
//! * retryable (500, 429, 408, timeouts): backoff with full jitter honouring `Retry-After`, up to
//!   the delivery budget; an exhausted chunk is split in halves so one poisonous record cannot
//!   take its neighbours down, and a single record that exhausts the budget is dead-lettered as
//!   `retries_exhausted`;
//! * permanent (other 4xx): the chunk is split in halves until the offending records are
//!   isolated and dead-lettered.
//!
//! Per-record rejections in a 202 answer are returned for dead-lettering; the rest is delivered.

use std::collections::VecDeque;
use std::time::Duration;

use pipeline_core::canonical::batch_id;
use pipeline_core::failpoint;
use pipeline_core::http;
use pipeline_core::metrics::{metrics, Readiness};
use pipeline_core::retry::RetryPolicy;
use pipeline_core::secret::Secret;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::join::Emission;

/// Why one POST failed.
#[derive(Debug, Error)]
pub enum DeliveryError {
    #[error("Analytics unavailable: {reason}")]
    Unavailable {
        reason: String,
        status: Option<u16>,
        retry_after: Option<Duration>,
    },
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
    records: Vec<&'a serde_json::value::RawValue>,
}

/// What happened to one emission.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Delivered,
    /// To be dead-lettered.
    Failed {
        reason: String,
        class: &'static str,
        status: Option<u16>,
        attempts: u32,
        first_failure_at: chrono::DateTime<chrono::Utc>,
    },
}

/// The last failure of a chunk that could not be delivered.
struct ChunkFailure {
    error: DeliveryError,
    attempts: u32,
    first_at: chrono::DateTime<chrono::Utc>,
}

/// Delivery was abandoned because the worker is shutting down.
#[derive(Debug, Error)]
#[error("delivery abandoned: shutting down")]
pub struct Abandoned;

impl From<pipeline_core::dlq::WriteAbandoned> for Abandoned {
    fn from(_: pipeline_core::dlq::WriteAbandoned) -> Self {
        Abandoned
    }
}

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
            records: records.iter().map(|e| &*e.record).collect(),
        };
        let mut req = self
            .client
            .post(&self.url)
            .header("idempotency-key", &id)
            .json(&body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        tracing::debug!(batch_id = %id, records = records.len(), "posting batch");
        let started = std::time::Instant::now();
        let sending = req.send();
        let sent = if failpoint::armed("during_post") {
            // Let the request reach the server, then freeze with it in flight.
            let task = tokio::spawn(sending);
            tokio::time::sleep(Duration::from_millis(20)).await;
            failpoint::hit("during_post");
            task.await.unwrap_or_else(unreachable_join)
        } else {
            sending.await
        };
        metrics().http_took("consumer", "analytics", started.elapsed().as_secs_f64());
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return Err(DeliveryError::Unavailable {
                    reason: format!("cannot connect: {e}"),
                    status: None,
                    retry_after: None,
                })
            }
            Err(e) => {
                return Err(DeliveryError::Retryable {
                    reason: format!("request failed: {e}"),
                    status: None,
                    retry_after: None,
                })
            }
        };
        let status = resp.status();
        let code = Some(status.as_u16());
        if status.is_success() {
            return resp
                .json::<Ack>()
                .await
                .map_err(|e| DeliveryError::Retryable {
                    reason: format!("unreadable answer: {e}"),
                    status: code,
                    retry_after: None,
                });
        }
        let retry_after = http::retry_after(resp.headers());
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(DeliveryError::Unauthorized {
                status: status.as_u16(),
            }),
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Err(DeliveryError::Unavailable {
                reason: format!("HTTP {status}"),
                status: code,
                retry_after,
            }),
            s if http::is_retryable(s) => Err(DeliveryError::Retryable {
                reason: format!("HTTP {status}"),
                status: code,
                retry_after,
            }),
            _ => {
                let body = resp.text().await.unwrap_or_default();
                Err(DeliveryError::Permanent {
                    status: status.as_u16(),
                    body: body.chars().take(300).collect(),
                })
            }
        }
    }

    /// Delivers every emission; returns one outcome per emission (same order).
    pub async fn deliver_all(
        &self,
        emissions: &[&Emission],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Delivery>, Abandoned> {
        let mut outcomes = vec![Delivery::Delivered; emissions.len()];
        let all: Vec<usize> = (0..emissions.len()).collect();
        let mut queue: VecDeque<Vec<usize>> =
            all.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        while let Some(chunk) = queue.pop_front() {
            let records: Vec<&Emission> = chunk.iter().map(|&i| emissions[i]).collect();
            let failure = match self.post_with_retries(&records, shutdown).await? {
                Ok(ack) => {
                    for r in ack.rejected {
                        if let Some(&i) = chunk.iter().find(|&&i| emissions[i].key == r.key) {
                            outcomes[i] = Delivery::Failed {
                                reason: r.reason,
                                class: "rejected",
                                status: Some(202),
                                attempts: 1,
                                first_failure_at: chrono::Utc::now(),
                            };
                        }
                    }
                    continue;
                }
                Err(f) => f,
            };
            if chunk.len() > 1 {
                // Isolate the records at fault: their neighbours deserve delivery.
                let (a, b) = chunk.split_at(chunk.len() / 2);
                queue.push_front(b.to_vec());
                queue.push_front(a.to_vec());
                continue;
            }
            let (class, status, reason) = match &failure.error {
                DeliveryError::Permanent { status, body } => {
                    ("rejected", Some(*status), format!("HTTP {status}: {body}"))
                }
                DeliveryError::Retryable { status, reason, .. } => (
                    "retries_exhausted",
                    *status,
                    format!("retries_exhausted: {reason}"),
                ),
                // Outages and auth faults are held in post_with_retries, never returned.
                other => ("undeliverable", None, other.to_string()),
            };
            outcomes[chunk[0]] = Delivery::Failed {
                reason,
                class,
                status,
                attempts: failure.attempts,
                first_failure_at: failure.first_at,
            };
        }
        Ok(outcomes)
    }

    /// POSTs one chunk: holds through outages and auth faults, retries retryable failures within
    /// the budget, and returns the final failure otherwise.
    async fn post_with_retries(
        &self,
        records: &[&Emission],
        shutdown: &CancellationToken,
    ) -> Result<Result<Ack, ChunkFailure>, Abandoned> {
        let mut attempts = 0u32;
        let mut held_rounds = 0u32;
        let mut first_at = None;
        loop {
            let err = match self.post(records).await {
                Ok(ack) => {
                    self.set_halted(false);
                    metrics().delivered(ack.accepted + ack.duplicates);
                    return Ok(Ok(ack));
                }
                Err(e) => e,
            };
            let first = *first_at.get_or_insert_with(chrono::Utc::now);
            let delay = match &err {
                DeliveryError::Unauthorized { .. } | DeliveryError::Unavailable { .. } => {
                    // Not the records' fault: hold them (no budget spent, nothing dead-lettered).
                    self.set_halted(true);
                    held_rounds += 1;
                    if held_rounds == 1 || held_rounds.is_multiple_of(20) {
                        tracing::error!(error = %err, records = records.len(), "delivery held; records are kept, not dead-lettered");
                    }
                    let hint = match &err {
                        DeliveryError::Unavailable { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    self.retry
                        .backoff(held_rounds.min(8), hint)
                        .max(Duration::from_millis(100))
                }
                DeliveryError::Retryable {
                    retry_after,
                    reason,
                    ..
                } => {
                    attempts += 1;
                    if !self.retry.allows_another(attempts) {
                        return Ok(Err(ChunkFailure {
                            error: err,
                            attempts,
                            first_at: first,
                        }));
                    }
                    metrics().http_retried("consumer", "analytics");
                    tracing::warn!(attempt = attempts, error = %reason, "delivery failed, retrying");
                    self.retry.backoff(attempts - 1, *retry_after)
                }
                DeliveryError::Permanent { .. } => {
                    return Ok(Err(ChunkFailure {
                        error: err,
                        attempts: attempts + 1,
                        first_at: first,
                    }))
                }
            };
            pipeline_core::retry::pause_for(delay, shutdown)
                .await
                .map_err(|_| Abandoned)?;
        }
    }

    fn set_halted(&self, halted: bool) {
        metrics().delivery_halted(halted);
        self.ready.set("analytics", !halted);
    }
}

/// A spawned request task cannot be cancelled or panic short of a bug in reqwest.
fn unreachable_join(e: tokio::task::JoinError) -> reqwest::Result<reqwest::Response> {
    std::panic::resume_unwind(e.into_panic())
}
