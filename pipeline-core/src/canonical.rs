//! Canonical JSON and the SHA-256 identities built on it.
//!
//! Two JSON documents that mean the same thing must hash the same, whatever key order the source
//! used, so hashing always goes through [`canonical_json`] (object keys sorted, no whitespace).
//! A view's delivery key is built on its canonical form and its sides' versions
//! (`consumer::join::view_key`, ARCHITECTURE.md I2), so a revert A→B→A yields three distinct keys
//! while any re-send of one view keeps its key.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Serialises `value` with object keys sorted recursively and no insignificant whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    into_string(out)
}

/// Writes straight into `out` (no intermediate strings): canonicalisation runs for every record
/// the producer publishes and every message the consumer decodes.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            // serde_json's map is ordered by key unless its `preserve_order` feature is on;
            // sort only when the order is not the canonical one already.
            if map.keys().is_sorted() {
                write_entries(map.iter(), out);
            } else {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                write_entries(entries.into_iter(), out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        // serde_json's scalars are canonical already (minimal string escapes with UTF-8 kept,
        // shortest round-trip numbers); writing into a Vec cannot fail.
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

fn write_entries<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        write_canonical(v, out);
    }
}

/// Whether `json` (valid JSON, e.g. a [`serde_json::value::RawValue`]) is in canonical form
/// already, so that it can be used as is instead of parsed and re-serialised: no whitespace,
/// object keys strictly ascending, no escapes in strings, integers of at most 18 digits, other
/// numbers as serde_json writes them. Conservative: a canonical text with an escape or a longer
/// integer gets `false` (and is then canonicalised the long way), a text that is not canonical
/// never gets `true`.
pub fn is_canonical(json: &[u8]) -> bool {
    // Per open container: whether it is an object, and the last key seen in it.
    let mut open: Vec<(bool, Option<&[u8]>)> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            b'{' | b'[' => {
                open.push((b == b'{', None));
                expect_key = b == b'{';
                i += 1;
            }
            b'}' | b']' => {
                open.pop();
                expect_key = false;
                i += 1;
            }
            b',' => {
                expect_key = matches!(open.last(), Some((true, _)));
                i += 1;
            }
            b':' => {
                expect_key = false;
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                let Some(len) = json[start..].iter().position(|&c| c == b'"' || c == b'\\') else {
                    return false;
                };
                let end = start + len;
                if json[end] == b'\\' {
                    return false;
                }
                if expect_key {
                    let key = &json[start..end];
                    let Some((true, last)) = open.last_mut() else {
                        return false;
                    };
                    if last.is_some_and(|prev| prev >= key) {
                        return false;
                    }
                    *last = Some(key);
                    expect_key = false;
                }
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let negative = b == b'-';
                let digits = if negative { i + 1 } else { i };
                let n = json[digits..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                let first = json.get(digits).copied();
                if n == 0 || (first == Some(b'0') && n > 1) {
                    return false;
                }
                let mut end = digits + n;
                if matches!(json.get(end), Some(b'.' | b'e' | b'E')) {
                    end += json[end..]
                        .iter()
                        .take_while(|c| c.is_ascii_digit() || b".eE+-".contains(c))
                        .count();
                    if !is_canonical_float(&json[i..end]) {
                        return false;
                    }
                } else if n > 18 || (first == Some(b'0') && negative) {
                    return false;
                }
                i = end;
            }
            _ => {
                let literal: &[u8] = match b {
                    b't' => b"true",
                    b'f' => b"false",
                    b'n' => b"null",
                    _ => return false,
                };
                if !json[i..].starts_with(literal) {
                    return false;
                }
                i += literal.len();
            }
        }
    }
    open.is_empty()
}

/// Whether the number `token` (with a fraction or an exponent, so parsed as an `f64`) is written
/// exactly as serde_json writes its value: the shortest text that reads back as the same `f64`
/// (`123.45`, `1.0`, `-1.5e300`; not `1.50` or `1e3`). Prices are such numbers, so without this
/// every product took the long way.
fn is_canonical_float(token: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<f64>(token) else {
        return false;
    };
    // The longest shortest-round-trip f64 text is 24 bytes (`-2.2250738585072014e-308`): a
    // stack buffer is enough, and a longer token cannot be canonical anyway.
    let mut buf = [0u8; 32];
    let mut rest = &mut buf[..];
    if serde_json::to_writer(&mut rest, &value).is_err() {
        return false;
    }
    let written = 32 - rest.len();
    &buf[..written] == token
}

/// The canonical form of an object whose values are canonical JSON texts already (keys are
/// sorted here): how views are assembled from stored records without parsing them again.
pub fn canonical_object(mut entries: Vec<(&str, &str)>) -> String {
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let size: usize = entries.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'{');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, k);
        out.push(b':');
        out.extend_from_slice(v.as_bytes());
    }
    out.push(b'}');
    into_string(out)
}

/// `s` as a JSON string (quoted, escaped as serde_json does).
pub fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    let _ = serde_json::to_writer(&mut out, s);
    into_string(out)
}

/// Bytes written only by serde_json and as ASCII punctuation around UTF-8 input: always UTF-8.
fn into_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// Lower-case hex through a lookup table (the `hex` crate's char iterator showed in profiles:
/// every message is hashed at least once).
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 0xf) as usize]);
    }
    // Only ASCII digits were pushed, so this never fails.
    String::from_utf8(out).unwrap_or_default()
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
    fn is_canonical_only_says_yes_to_what_canonical_json_would_write() {
        let cases: &[(&str, bool)] = &[
            (
                r#"{"a":1,"b":"x","c":[1,2,{"d":null,"e":true}],"f":false}"#,
                true,
            ),
            (r#"{"email":"é@x.org","id":-12,"tier":"gold"}"#, true),
            (r#"{}"#, true),
            (r#"[]"#, true),
            (r#"{"b":1,"a":2}"#, false),
            (r#"{"a":1,"a":2}"#, false),
            (r#"{"a": 1}"#, false),
            (r#" {"a":1}"#, false),
            (r#"{"a":1.0}"#, true),
            (r#"{"price":123.45,"list_price":0.1}"#, false),
            (r#"{"list_price":0.1,"price":123.45}"#, true),
            (r#"{"a":[-1.5e+300,-0.0,0.30000000000000004,5e-324]}"#, true),
            (r#"{"a":-1.5e300}"#, false),
            (r#"{"a":1.50}"#, false),
            (r#"{"a":1e3}"#, false),
            (r#"{"a":1E300}"#, false),
            (r#"{"a":1.5e+300}"#, true),
            (r#"{"a":-0}"#, false),
            (r#"{"a":"x\"y"}"#, false),
            (r#"{"a\u0062":1}"#, false),
            (r#"{"a":12345678901234567890}"#, false),
            (r#"{"z":{"b":1,"a":2}}"#, false),
            (r#"{"a":{"z":1},"b":{"a":1}}"#, true),
            (r#"{"ab":1,"b":2}"#, true),
            (r#"{"b":1,"ab":2}"#, false),
        ];
        for (text, expected) in cases {
            let value: Value = serde_json::from_str(text).unwrap();
            let canonical = canonical_json(&value) == *text;
            assert_eq!(is_canonical(text.as_bytes()), *expected, "{text}");
            if *expected {
                assert!(canonical, "{text} is not what canonical_json writes");
            }
            // Numbers other than integers are judged exactly, not conservatively.
            if text.contains(['.', 'e', 'E']) {
                assert_eq!(*expected, canonical, "{text}");
            }
        }
        // Not JSON: leading zeros, a sign inside a number.
        for text in [r#"{"a":00.5}"#, r#"{"a":[1.5-2]}"#, r#"{"a":-.5}"#] {
            assert!(!is_canonical(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn sha256_is_lower_case_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn canonical_form_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "é\n"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"é\n","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"é\n","y":[1,2]},"b":1}"#);
        assert_eq!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn scalars_keep_serde_json_forms() {
        let v: Value = serde_json::from_str(
            r#"{"z": [null, true, false, -0, 12, -1.5e300, 0.1], "c": "\u0001\"\\/é", "b": {}, "a": []}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":[],"b":{},"c":"\u0001\"\\/é","z":[null,true,false,-0.0,12,-1.5e+300,0.1]}"#
        );
        assert_eq!(canonical_json(&v), serde_json::to_string(&v).unwrap());
    }

    #[test]
    fn an_object_of_canonical_texts_is_canonical() {
        let a = canonical_json(&json!({"z": 1, "b": [true]}));
        let joined = canonical_object(vec![("x\"", "null"), ("a", &a), ("id", "\"7\"")]);
        assert_eq!(
            joined,
            canonical_json(&json!({"x\"": null, "a": {"b": [true], "z": 1}, "id": "7"}))
        );
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
