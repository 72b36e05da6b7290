//! HTTP client construction and response classification shared by the source poller and the
//! Analytics delivery: bounded timeouts, connection reuse, `Retry-After` parsing.

use std::time::Duration;

use anyhow::Context;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

/// Binds `addr` and serves `router` in a background task until `shutdown`; returns the bound
/// address (port 0 picks a free one). Every HTTP server of the project starts here.
pub async fn spawn_server(
    addr: std::net::SocketAddr,
    router: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(local)
}

/// A client with connect and request timeouts and a kept-alive connection pool.
pub fn client(request_timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5).min(request_timeout))
        .timeout(request_timeout)
        .pool_max_idle_per_host(16)
        .tcp_nodelay(true)
        .user_agent(concat!(
            "crm-inventory-pipeline/",
            env!("CARGO_PKG_VERSION")
        ))
        .build()
        .context("building the HTTP client")
}

/// The server's `Retry-After` hint (delta-seconds or an HTTP date).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// Whether a status is worth retrying (overload, throttling, server errors, timeouts).
pub fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Renders a URL without credentials for logs.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("redacted"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn parses_retry_after_seconds_and_classifies_statuses() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        assert!(is_retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(is_retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(!is_retryable(StatusCode::UNPROCESSABLE_ENTITY));
        assert_eq!(
            redact_url("redis://u:secret@h:6379/0"),
            "redis://u:redacted@h:6379/0"
        );
    }
}
