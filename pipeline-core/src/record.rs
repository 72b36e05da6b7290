//! Source records: validation and the version used to order them.
//!
//! A record is a JSON object with a required id (string or integer, normalised to a string key)
//! and an optional version timestamp (RFC 3339 or epoch milliseconds). Which fields hold them is
//! the source's [`RecordShape`] (`id` and `updated_at` by default). Unknown fields are kept as they
//! are. Everything that fails here carries a [`RecordError`] whose stage and class end up in the
//! DLQ headers.

use serde_json::{Map, Value};
use thiserror::Error;

use crate::dlq::Stage;

/// Why a payload is not a usable source record.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("record is not a JSON object")]
    NotAnObject,
    #[error("record has no `{0}` field")]
    MissingId(String),
    #[error("the id must be a non-empty string or an integer, found {0}")]
    InvalidId(String),
    #[error("the version timestamp must be RFC 3339 or epoch milliseconds, found {0}")]
    InvalidUpdatedAt(String),
}

impl RecordError {
    /// The DLQ stage (`dlq.stage`) this error belongs to.
    pub fn stage(&self) -> Stage {
        match self {
            RecordError::TooLarge { .. } | RecordError::InvalidJson(_) => Stage::Parse,
            _ => Stage::Validate,
        }
    }

    /// A short stable class name (`dlq.error.class`).
    pub fn class(&self) -> &'static str {
        match self {
            RecordError::TooLarge { .. } => "payload_too_large",
            RecordError::InvalidJson(_) => "invalid_json",
            RecordError::NotAnObject => "not_an_object",
            RecordError::MissingId(_) => "missing_id",
            RecordError::InvalidId(_) => "invalid_id",
            RecordError::InvalidUpdatedAt(_) => "invalid_updated_at",
        }
    }
}

/// A validated source record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The normalised id (integers rendered in decimal).
    pub id: String,
    /// `updated_at` in epoch milliseconds; 0 when the source does not send one.
    pub updated_at_ms: i64,
    /// The whole record, unknown fields included.
    pub body: Map<String, Value>,
}

/// Which fields of a source's records hold the id and the version timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordShape {
    pub id_field: String,
    pub updated_at_field: String,
}

impl Default for RecordShape {
    fn default() -> Self {
        Self {
            id_field: "id".into(),
            updated_at_field: "updated_at".into(),
        }
    }
}

/// Parses and validates raw bytes (as read from Kafka) into a [`Record`] of the default shape.
pub fn parse_record(bytes: &[u8], max_bytes: usize) -> Result<Record, RecordError> {
    parse_record_shaped(bytes, max_bytes, &RecordShape::default())
}

/// Parses and validates raw bytes into a [`Record`] of `shape`.
pub fn parse_record_shaped(
    bytes: &[u8],
    max_bytes: usize,
    shape: &RecordShape,
) -> Result<Record, RecordError> {
    if bytes.len() > max_bytes {
        return Err(RecordError::TooLarge {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| RecordError::InvalidJson(e.to_string()))?;
    validate_record_shaped(value, shape)
}

/// The id and version of a record given as bytes, read without building the record (other
/// fields are skipped, though still checked to be valid JSON). `None` when the bytes are not a
/// valid record of `shape`: [`parse_record_shaped`] then says why.
pub fn inspect_bytes(bytes: &[u8], shape: &RecordShape) -> Option<(String, i64)> {
    inspect_raw(bytes, shape).map(|(id, ms, _)| (id, ms))
}

/// [`inspect_bytes`], also giving the version field's value as written (the producer's
/// incremental-sync cursor is built from it).
pub fn inspect_raw(bytes: &[u8], shape: &RecordShape) -> Option<(String, i64, Option<Value>)> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let (id, updated_at) = de.deserialize_map(Inspect { shape }).ok()?;
    de.end().ok()?;
    let ms = parse_updated_at(updated_at.as_ref()).ok()?;
    Some((normalise_id(id.as_ref()).ok()?, ms, updated_at))
}

/// Visits a record's fields keeping only the id and version values (the last of duplicates,
/// as a parsed [`Value`] would).
struct Inspect<'a> {
    shape: &'a RecordShape,
}

enum Field {
    Id,
    UpdatedAt,
    Other,
}

impl<'de> serde::de::Visitor<'de> for Inspect<'_> {
    type Value = (Option<Value>, Option<Value>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut id, mut updated_at) = (None, None);
        while let Some(field) = map.next_key_seed(FieldSeed(self.shape))? {
            match field {
                Field::Id => id = Some(map.next_value::<Value>()?),
                Field::UpdatedAt => updated_at = Some(map.next_value::<Value>()?),
                Field::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok((id, updated_at))
    }
}

struct FieldSeed<'a>(&'a RecordShape);

impl<'de> serde::de::DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Field;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldSeed<'_> {
    type Value = Field;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Field, E> {
        Ok(if name == self.0.id_field {
            Field::Id
        } else if name == self.0.updated_at_field {
            Field::UpdatedAt
        } else {
            Field::Other
        })
    }
}

/// Validates an already parsed JSON value of the default shape.
pub fn validate_record(value: Value) -> Result<Record, RecordError> {
    validate_record_shaped(value, &RecordShape::default())
}

/// Reads the id and version of a fetched record without taking it apart (the producer
/// publishes the value as fetched).
pub fn inspect_record(value: &Value, shape: &RecordShape) -> Result<(String, i64), RecordError> {
    let Value::Object(body) = value else {
        return Err(RecordError::NotAnObject);
    };
    let id = normalise_id(body.get(&shape.id_field)).map_err(|e| match e {
        RecordError::MissingId(_) => RecordError::MissingId(shape.id_field.clone()),
        e => e,
    })?;
    Ok((id, parse_updated_at(body.get(&shape.updated_at_field))?))
}

/// Validates an already parsed JSON value (as fetched from a source API).
pub fn validate_record_shaped(value: Value, shape: &RecordShape) -> Result<Record, RecordError> {
    let (id, updated_at_ms) = inspect_record(&value, shape)?;
    let Value::Object(body) = value else {
        return Err(RecordError::NotAnObject);
    };
    Ok(Record {
        id,
        updated_at_ms,
        body,
    })
}

/// Normalises an `id` value to its string key.
pub fn normalise_id(id: Option<&Value>) -> Result<String, RecordError> {
    match id {
        None | Some(Value::Null) => Err(RecordError::MissingId("id".into())),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(other) => Err(RecordError::InvalidId(type_name(other))),
    }
}

/// A version timestamp (RFC 3339 or epoch ms) in epoch ms, if it is one.
pub fn version_ms(v: Option<&Value>) -> Option<i64> {
    parse_updated_at(v).ok()
}

fn parse_updated_at(v: Option<&Value>) -> Result<i64, RecordError> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| RecordError::InvalidUpdatedAt(n.to_string())),
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|_| RecordError::InvalidUpdatedAt(format!("{s:?}"))),
        Some(other) => Err(RecordError::InvalidUpdatedAt(type_name(other))),
    }
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a non-integer number",
        Value::String(_) => "an empty string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_string_and_integer_ids_and_keeps_unknown_fields() {
        let r = parse_record(br#"{"id": 42, "name": "x", "extra": {"a": 1}}"#, 1024).unwrap();
        assert_eq!(r.id, "42");
        assert_eq!(r.body["extra"]["a"], 1);
        let r = parse_record(
            br#"{"id": "c-7", "updated_at": "2026-01-01T00:00:01Z"}"#,
            1024,
        )
        .unwrap();
        assert_eq!(r.id, "c-7");
        assert_eq!(r.updated_at_ms, 1_767_225_601_000);
    }

    #[test]
    fn rejects_bad_input_with_a_stage_and_class() {
        let cases: [(&[u8], &str, &str); 7] = [
            (b"{not json", "parse", "invalid_json"),
            (b"[1,2]", "validate", "not_an_object"),
            (br#"{"name": "no id"}"#, "validate", "missing_id"),
            (br#"{"id": 1.5}"#, "validate", "invalid_id"),
            (br#"{"id": ""}"#, "validate", "invalid_id"),
            (
                br#"{"id": 1, "updated_at": "yesterday"}"#,
                "validate",
                "invalid_updated_at",
            ),
            (&[0xff, 0xfe, 0x00], "parse", "invalid_json"),
        ];
        for (input, stage, class) in cases {
            let err = parse_record(input, 1024).unwrap_err();
            assert_eq!((err.stage().as_str(), err.class()), (stage, class), "{err}");
        }
        let err = parse_record(&[b' '; 2048], 1024).unwrap_err();
        assert_eq!(err.class(), "payload_too_large");
    }

    #[test]
    fn inspecting_bytes_agrees_with_parsing_them() {
        let shape = RecordShape::default();
        let sku = RecordShape {
            id_field: "sku".into(),
            updated_at_field: "changed".into(),
        };
        let cases: &[(&[u8], &RecordShape)] = &[
            (
                br#"{"id": 42, "name": "x", "extra": {"a": [1, {"b": null}]}}"#,
                &shape,
            ),
            (
                br#"{"name":"\"q\"","id":"A-1","updated_at":"2024-05-01T10:00:00Z"}"#,
                &shape,
            ),
            (br#"{"id": "7", "updated_at": 1714557600000}"#, &shape),
            (br#"{"id": 1, "id": 2}"#, &shape),
            (
                br#"{"sku": "S9", "id": 3, "changed": "2024-05-01T10:00:00+02:00"}"#,
                &sku,
            ),
            (br#"{"id\u0000": 1}"#, &shape),
            (br#"{"id": 1.5}"#, &shape),
            (br#"{"id": ""}"#, &shape),
            (br#"{"id": 1, "updated_at": "yesterday"}"#, &shape),
            (br#"{"name": "no id"}"#, &shape),
            (br#"[1, 2]"#, &shape),
            (br#"{"id": 1} trailing"#, &shape),
            (br#"{"id": 1, "x": [1, 2}"#, &shape),
            (b"not json", &shape),
        ];
        for (bytes, shape) in cases {
            let parsed = parse_record_shaped(bytes, 1024, shape)
                .ok()
                .map(|r| (r.id, r.updated_at_ms));
            assert_eq!(
                inspect_bytes(bytes, shape),
                parsed,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
