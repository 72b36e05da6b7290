//! Decoding a Kafka message into a join [`Input`], or into the DLQ item that says why it can't be.

use pipeline_core::canonical::{canonical_json, is_canonical, sha256_hex};
use pipeline_core::dlq::{Failure, Stage};
use pipeline_core::record::{inspect_bytes, parse_record_shaped, RecordError, RecordShape};
use rdkafka::message::{Headers, Message, OwnedHeaders};
use serde_json::Value;

use crate::dlq::DlqItem;
use crate::join::{Input, Origin};

/// Decodes one message of join side `side`, whose records have `shape`.
///
/// The join stores and hashes records as canonical JSON. This pipeline's producer publishes
/// that form already: a value that is canonical ([`is_canonical`]) and a valid record is used
/// as is, its id and version read without building the record. Anything else (another
/// producer, a value edited on the way) is parsed and canonicalised in full. Both give the same
/// text and hash for the same record. The `content-sha256` header is not read: it would say
/// the same thing, but librdkafka parses a message's headers into one allocation each on first
/// access, which was 8 % of a worker's CPU.
pub fn decode<M: Message>(
    msg: &M,
    side: usize,
    shape: &RecordShape,
    max_bytes: usize,
) -> Result<Input, Box<DlqItem>> {
    let origin = Origin {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    let payload = msg.payload().unwrap_or_default();
    if payload.len() <= max_bytes && is_canonical(payload) {
        return match decode_as_sent(msg, side, shape, payload, origin) {
            Ok(input) => Ok(input),
            Err(origin) => decode_parsed(msg, side, shape, max_bytes, origin),
        };
    }
    decode_parsed(msg, side, shape, max_bytes, origin)
}

/// The fast path, for a value in canonical form. Gives `origin` back when the value is not a
/// valid record of `shape` (which also makes sure it is valid JSON) or its key is not its id:
/// the full path then says why.
fn decode_as_sent<M: Message>(
    msg: &M,
    side: usize,
    shape: &RecordShape,
    payload: &[u8],
    origin: Origin,
) -> Result<Input, Origin> {
    let Some((id, updated_at_ms)) = inspect_bytes(payload, shape) else {
        return Err(origin);
    };
    let Ok(text) = std::str::from_utf8(payload) else {
        return Err(origin);
    };
    if msg.key().is_some_and(|k| k != id.as_bytes()) {
        return Err(origin);
    }
    Ok(Input {
        side,
        id,
        updated_at_ms,
        hash: sha256_hex(payload),
        record: text.into(),
        origin,
    })
}

/// The full path: parse, validate, canonicalise.
fn decode_parsed<M: Message>(
    msg: &M,
    side: usize,
    shape: &RecordShape,
    max_bytes: usize,
    origin: Origin,
) -> Result<Input, Box<DlqItem>> {
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
pub fn dead_letter<M: Message>(
    msg: &M,
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedMessage, Timestamp};

    fn message(key: &str, payload: &str, content_sha256: Option<&str>) -> OwnedMessage {
        let mut headers = OwnedHeaders::new();
        if let Some(sha) = content_sha256 {
            headers = headers.insert(Header {
                key: "content-sha256",
                value: Some(sha),
            });
        }
        OwnedMessage::new(
            Some(payload.as_bytes().to_vec()),
            Some(key.as_bytes().to_vec()),
            "customer_data".into(),
            Timestamp::NotAvailable,
            3,
            17,
            Some(headers),
        )
    }

    fn decoded(msg: &OwnedMessage) -> Input {
        decode(msg, 0, &RecordShape::default(), 1 << 20).unwrap_or_else(|e| {
            panic!("{}", e.failure.reason);
        })
    }

    #[test]
    fn a_value_sent_in_canonical_form_is_used_as_sent_whatever_its_headers_say() {
        let canonical =
            r#"{"email":"a@x","id":"7","name":"A","updated_at":"2024-05-01T10:00:00Z"}"#;
        let expected = sha256_hex(canonical.as_bytes());
        for header in [Some(expected.as_str()), Some("not-the-hash"), None] {
            let input = decoded(&message("7", canonical, header));
            assert_eq!(&*input.record, canonical);
            assert_eq!(input.hash, expected);
            assert_eq!(input.id, "7");
            assert_eq!(input.updated_at_ms, 1_714_557_600_000);
        }
    }

    #[test]
    fn values_the_fast_path_declines_decode_to_the_canonical_form() {
        // Unsorted and spaced; an escape; a fraction with a trailing zero: the long way.
        for (sent, canonical) in [
            (r#"{ "name": "A", "id": 7 }"#, r#"{"id":7,"name":"A"}"#),
            (
                r#"{"id":"7","name":"A \"q\""}"#,
                r#"{"id":"7","name":"A \"q\""}"#,
            ),
            (r#"{"id":"7","price":1.50}"#, r#"{"id":"7","price":1.5}"#),
        ] {
            let input = decoded(&message("7", sent, None));
            assert_eq!(&*input.record, canonical);
            assert_eq!(input.hash, sha256_hex(canonical.as_bytes()));
        }
    }

    #[test]
    fn an_invalid_value_that_scans_as_canonical_is_dead_lettered() {
        // No whitespace, keys ascending, but not JSON: the fast path must not take it.
        for sent in [
            r#"{"id":"7","name":"A""#,
            "{\"id\":\"7\",\"n\":\"a\u{1}b\"}",
        ] {
            let msg = message("7", sent, None);
            let Err(err) = decode(&msg, 0, &RecordShape::default(), 1 << 20) else {
                panic!("{sent} is not a record");
            };
            assert_eq!(err.failure.stage, Stage::Parse, "{sent}");
        }
    }

    #[test]
    fn a_key_that_does_not_match_the_id_is_dead_lettered_on_either_path() {
        for sent in [r#"{"id":"7"}"#, r#"{ "id": "7" }"#] {
            let msg = message("8", sent, None);
            let Err(err) = decode(&msg, 0, &RecordShape::default(), 1 << 20) else {
                panic!("a key mismatch is rejected");
            };
            assert_eq!(err.failure.error_class, "key_mismatch");
        }
    }
}
