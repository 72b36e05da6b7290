//! Canonical JSON and the SHA-256 identities built on it.
//!
//! Two JSON documents that mean the same thing must hash the same, whatever key order the source
//! used, so hashing always goes through [`canonical_json`] (object keys sorted, no whitespace).
//! The delivery key chains each id's views (`sha256(prev_key ‖ canonical(view))`, DESIGN.md §4 I3)
//! so a revert A→B→A yields three distinct keys while any re-send of one view keeps its key.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Serialises `value` with object keys sorted recursively and no insignificant whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(s: &str, out: &mut String) {
    // serde_json's string escaping is canonical already (minimal escapes, UTF-8 kept).
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// Lower-case hex through a lookup table (the `hex` crate's char iterator showed in profiles:
/// every message is hashed at least once).
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// SHA-256 of the canonical form of `value`.
pub fn content_hash(value: &Value) -> String {
    sha256_hex(canonical_json(value).as_bytes())
}

/// The idempotency key of a merged view: chained to the previous key emitted for the same id.
pub fn delivery_key(prev_key: &str, canonical_view: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_key.as_bytes());
    h.update([0u8]);
    h.update(canonical_view.as_bytes());
    to_hex(&h.finalize())
}

/// The id of a delivery batch: SHA-256 of its sorted record keys, so a retry of the same batch
/// carries the same `Idempotency-Key`.
pub fn batch_id<'a>(keys: impl IntoIterator<Item = &'a str>) -> String {
    let mut sorted: Vec<&str> = keys.into_iter().collect();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for k in sorted {
        h.update(k.as_bytes());
        h.update(b"\n");
    }
    to_hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "é\n"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"é\n","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"é\n","y":[1,2]},"b":1}"#);
        assert_eq!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn chained_keys_distinguish_a_revert() {
        let a = canonical_json(&json!({"name": "A"}));
        let b = canonical_json(&json!({"name": "B"}));
        let k1 = delivery_key("", &a);
        let k2 = delivery_key(&k1, &b);
        let k3 = delivery_key(&k2, &a);
        assert_ne!(k1, k3);
        assert_ne!(k1, k2);
        assert_eq!(
            k1,
            delivery_key("", &a),
            "a re-send of one view keeps its key"
        );
        assert_eq!(k1.len(), 64);
    }

    #[test]
    fn batch_id_is_order_independent() {
        assert_eq!(batch_id(["b", "a", "c"]), batch_id(["c", "b", "a"]));
        assert_ne!(batch_id(["a", "b"]), batch_id(["a", "b", "c"]));
    }
}
