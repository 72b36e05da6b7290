//! Decoding a Kafka message into a join [`Input`], or into the DLQ item that says why it can't be.

use pipeline_core::canonical::{canonical_json, sha256_hex};
use pipeline_core::dlq::{Failure, Stage};
use pipeline_core::record::{parse_record_shaped, RecordError, RecordShape};
use rdkafka::message::{Headers, Message, OwnedHeaders, OwnedMessage};
use serde_json::Value;

use crate::dlq::DlqItem;
use crate::join::{Input, Origin};

/// Decodes one message of join side `side`, whose records have `shape`.
pub fn decode(
    msg: &OwnedMessage,
    side: usize,
    shape: &RecordShape,
    max_bytes: usize,
) -> Result<Input, Box<DlqItem>> {
    let origin = Origin {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    let fail = |err: RecordError| {
        Box::new(dead_letter(
            msg,
            err.stage(),
            err.to_string(),
            err.class(),
            max_bytes,
        ))
    };
    let payload = msg.payload().unwrap_or_default();
    let record = parse_record_shaped(payload, max_bytes, shape).map_err(fail)?;
    if let Some(key) = msg.key() {
        if key != record.id.as_bytes() {
            return Err(Box::new(dead_letter(
                msg,
                Stage::Validate,
                format!(
                    "message key {:?} does not match record id {:?}",
                    String::from_utf8_lossy(key),
                    record.id
                ),
                "key_mismatch",
                max_bytes,
            )));
        }
    }
    let canonical = canonical_json(&Value::Object(record.body));
    Ok(Input {
        side,
        id: record.id,
        updated_at_ms: record.updated_at_ms,
        hash: sha256_hex(canonical.as_bytes()),
        record: canonical.into(),
        origin,
    })
}

/// A DLQ item keeping the original key, value and headers. A value over `max_value_bytes` (the
/// reason it was rejected) is left out, with its size in `dlq.value.omitted-bytes`: the DLQ
/// producer could not write it either, and the original stays readable at its source offset.
pub fn dead_letter(
    msg: &OwnedMessage,
    stage: Stage,
    reason: String,
    class: &str,
    max_value_bytes: usize,
) -> DlqItem {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = msg.headers() {
        for header in h.iter() {
            headers = headers.insert(rdkafka::message::Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    let payload = msg.payload().unwrap_or_default();
    let value = if payload.len() > max_value_bytes {
        let size = payload.len().to_string();
        headers = headers.insert(rdkafka::message::Header {
            key: pipeline_core::dlq::VALUE_OMITTED,
            value: Some(size.as_str()),
        });
        None
    } else {
        msg.payload().map(<[u8]>::to_vec)
    };
    DlqItem {
        key: msg.key().map(<[u8]>::to_vec),
        value,
        original_headers: headers,
        failure: Failure {
            stage,
            reason,
            error_class: class.to_owned(),
            original_topic: msg.topic().to_owned(),
            original_partition: msg.partition(),
            original_offset: msg.offset(),
            attempts: 1,
            http_status: None,
            first_failure_at: chrono::Utc::now(),
            record_key: None,
        },
    }
}
