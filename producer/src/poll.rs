//! One poll of one source: follow its pagination, publish each page's records in step with the
//! other sources, save the sync cursor and the pages once every record is acknowledged.

use std::borrow::Cow;
use std::time::Instant;

use anyhow::Context;
use lockstep::Lockstep;
use pipeline_core::canonical::{canonical_json, is_canonical};
use pipeline_core::dlq::{DlqItem, Failure};
use pipeline_core::metrics::{self, metrics};
use pipeline_core::record::{inspect_raw, inspect_record, RecordError, RecordShape};
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use source::{Page, Source};
use state::SourceCursor;

use super::pages::saved_page;
use super::*;

impl ProducerInner {
    pub(crate) async fn poll_source(
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
    pub(crate) async fn poll(
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
                    let mut dead = Vec::new();
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
                                metrics().invalid_record(&source.name);
                                dead.push(dead_letter(source, &raw, &e));
                            }
                        }
                    }
                    // A poll that is dropped (shutdown) drops this write with it; until then a
                    // refusing DLQ topic holds the poll, which saves nothing past these records.
                    if !dead.is_empty() {
                        self.dlq
                            .write_all(&dead, &CancellationToken::new())
                            .await
                            .context("dead-lettering invalid records")?;
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
        report.published = deliveries.finish().await?;
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
    pub(crate) async fn save_cursor(
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

    pub(crate) fn cursor(&self, source: &str) -> Option<SourceCursor> {
        self.cursors.lock().ok()?.get(source).cloned()
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

/// The DLQ record of a fetched record that failed validation, keyed by its id field as sent.
fn dead_letter(source: &Source, raw: &Value, err: &RecordError) -> DlqItem {
    let key = raw
        .get(&source.shape.id_field)
        .map(|v| v.to_string())
        .unwrap_or_default();
    DlqItem {
        key: Some(key.into_bytes()),
        value: Some(raw.to_string().into_bytes()),
        original_headers: OwnedHeaders::new().insert(Header {
            key: "source",
            value: Some(source.name.as_str()),
        }),
        failure: Failure {
            stage: err.stage(),
            reason: err.to_string(),
            error_class: err.class().to_owned(),
            original_topic: source.topic.clone(),
            original_partition: -1,
            original_offset: -1,
            attempts: 1,
            http_status: None,
            first_failure_at: chrono::Utc::now(),
            record_key: None,
        },
    }
}

/// A version value as the text sent back in `updated_since`.
fn cursor_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::borrow::Cow;

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
