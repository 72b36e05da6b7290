//! The form an id's join state takes in Redis: one string per id, `<prefix>join:<id>`.
//!
//! ```text
//! <rev: 16 digits> <dk: 64 bytes, space-padded>\n<k>\n<vh>\n( <side field> <byte length>\n<side> )*
//! side = <updated_at ms>|<offset>|<content hash>|<record, canonical JSON>
//! ```
//!
//! One string rather than a hash because Redis is the pipeline's bottleneck: a whole-state `SET`
//! costs it about half of an `HSET` into a hash whose values outgrow the compact encoding, the
//! commit writes a whole batch with one `MSET`, and a load is one `MGET`. The fixed-width
//! head lets a confirmation overwrite the delivered key in place with `SETRANGE <key> 17 <dk>`,
//! without reading the rest. Sides are length-prefixed, so a record may hold any byte.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::join::{JoinSpec, JoinState, SideState, StateWrite};

/// Width of the revision at the start of the value.
pub const REV_WIDTH: usize = 16;
/// Offset of the delivered key (`SETRANGE` target).
pub const DK_OFFSET: usize = REV_WIDTH + 1;
/// Width of the delivered key: a SHA-256 in hex.
pub const DK_WIDTH: usize = 64;
/// Length of the fixed head, its newline included.
const HEAD: usize = DK_OFFSET + DK_WIDTH + 1;

/// A delivered key as its fixed-width slot.
pub fn dk_field(key: &str) -> String {
    let mut slot: String = key.chars().take(DK_WIDTH).collect();
    while slot.len() < DK_WIDTH {
        slot.push(' ');
    }
    slot
}

/// Writes [`dk_field`]`(key)` to `out` without building it when `key` already fills the slot
/// (every real key: a SHA-256 in hex).
pub fn write_dk_field(out: &mut impl Write, key: &str) -> io::Result<()> {
    if key.len() == DK_WIDTH && key.is_ascii() {
        out.write_all(key.as_bytes())
    } else {
        out.write_all(dk_field(key).as_bytes())
    }
}

/// The value written for `w`: its state at the next revision.
#[cfg(test)]
pub fn encode(w: &StateWrite) -> String {
    let mut out = Vec::with_capacity(encoded_len(w));
    // Writing into a Vec cannot fail; the parts are UTF-8, so the whole is.
    let _ = encode_to(w, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// One side's stored form, `<updated_at ms>|<offset>|<hash>|<record>`: read back with a split
/// instead of a JSON parse. Written straight into the command buffer (`side_len` first, for the
/// length prefix): a batch writes thousands.
fn write_side(out: &mut impl Write, side: &SideState) -> io::Result<()> {
    write!(out, "{}|{}|", side.updated_at_ms, side.offset)?;
    out.write_all(side.hash.as_bytes())?;
    out.write_all(b"|")?;
    out.write_all(side.record.as_bytes())
}

/// The length of [`write_side`]'s output.
fn side_len(side: &SideState) -> usize {
    decimal_len(side.updated_at_ms)
        + decimal_len(side.offset)
        + side.hash.len()
        + side.record.len()
        + 3
}

/// Characters of `n` in decimal.
fn decimal_len(n: i64) -> usize {
    let digits = n
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1);
    digits + usize::from(n < 0)
}

/// Parses [`write_side`]'s output.
pub fn decode_side(s: &str) -> Option<SideState> {
    let mut parts = s.splitn(4, '|');
    Some(SideState {
        updated_at_ms: parts.next()?.parse().ok()?,
        offset: parts.next()?.parse().ok()?,
        hash: parts.next()?.to_owned(),
        record: Arc::from(parts.next()?),
    })
}

/// An upper bound of [`encode_to`]'s output length (sizes the command buffer).
pub fn encoded_len(w: &StateWrite) -> usize {
    let sides_len: usize = w
        .sides
        .iter()
        .map(|(f, s)| f.len() + side_len(s) + 24)
        .sum();
    HEAD + w.key.len() + w.view_hash.len() + 2 + sides_len
}

/// Writes the value for `w` (its state at the next revision) to `out`, straight into the
/// Redis command that stores it.
pub fn encode_to(w: &StateWrite, out: &mut impl Write) -> io::Result<()> {
    write!(
        out,
        "{:0width$} ",
        (w.read_rev + 1).max(0),
        width = REV_WIDTH
    )?;
    write_dk_field(out, &w.delivered_key)?;
    out.write_all(b"\n")?;
    out.write_all(w.key.as_bytes())?;
    out.write_all(b"\n")?;
    out.write_all(w.view_hash.as_bytes())?;
    out.write_all(b"\n")?;
    for (field, side) in &w.sides {
        writeln!(out, "{field} {}", side_len(side))?;
        write_side(out, side)?;
    }
    Ok(())
}

/// Reads a stored value back for `spec` (sides it no longer has are dropped). A value shorter
/// than the head is what `SETRANGE` leaves on a key that was gone (Redis lost it between a
/// commit and its confirmation): no state, revision 0.
pub fn decode(spec: &JoinSpec, value: &[u8]) -> anyhow::Result<JoinState> {
    let mut state = JoinState::empty(spec.sides.len());
    if value.len() < HEAD || value[HEAD - 1] != b'\n' {
        return Ok(state);
    }
    let text = std::str::from_utf8(value).context("join state is not UTF-8")?;
    state.rev = text[..REV_WIDTH]
        .parse()
        .with_context(|| format!("bad revision {:?}", &text[..REV_WIDTH]))?;
    state.delivered_key = text[DK_OFFSET..DK_OFFSET + DK_WIDTH].trim_end().to_owned();
    let mut rest = &text[HEAD..];
    state.key = line(&mut rest)?.to_owned();
    state.view_hash = line(&mut rest)?.to_owned();
    let fields: HashMap<&str, usize> = spec
        .sides
        .iter()
        .enumerate()
        .map(|(i, s)| (s.field.as_str(), i))
        .collect();
    while !rest.is_empty() {
        let (field, len) = line(&mut rest)?
            .split_once(' ')
            .context("bad side header in join state")?;
        let len: usize = len.parse().context("bad side length in join state")?;
        let Some(side) = rest.get(..len) else {
            bail!("truncated side {field} in join state");
        };
        rest = &rest[len..];
        if let Some(&i) = fields.get(field) {
            state.sides[i] = Some(decode_side(side).context("bad side in join state")?);
        }
    }
    Ok(state)
}

/// The text up to the next newline, which `rest` then starts after.
fn line<'a>(rest: &mut &'a str) -> anyhow::Result<&'a str> {
    let (l, r) = rest.split_once('\n').context("truncated join state")?;
    *rest = r;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JoinSpec {
        JoinSpec::of_required(&["customer", "inventory"])
    }

    fn side(record: &str) -> SideState {
        SideState {
            updated_at_ms: 1_714_557_600_000,
            offset: 42,
            hash: "ab".repeat(32),
            record: Arc::from(record),
        }
    }

    #[test]
    fn decimal_lengths_count_every_digit_and_the_sign() {
        for n in [
            0,
            7,
            10,
            99,
            100,
            1_714_557_600_000,
            -1,
            -10,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(decimal_len(n), n.to_string().len(), "{n}");
        }
    }

    #[test]
    fn a_state_reads_back_as_written() {
        let spec = spec();
        let customer = side("{\"id\":\"7\",\"note\":\"a\\nb | c \\u0000\"}");
        let w = StateWrite {
            id: "7".into(),
            read_rev: 4,
            sides: vec![(spec.sides[0].field.clone(), customer.clone())],
            key: "k".repeat(64),
            view_hash: "v".repeat(64),
            delivered_key: "d".repeat(64),
        };
        let value = encode(&w);
        assert!(value.starts_with("0000000000000005 "));
        let state = decode(&spec, value.as_bytes()).unwrap();
        assert_eq!(state.rev, 5);
        assert_eq!(state.sides, vec![Some(customer), None]);
        assert_eq!(state.key, w.key);
        assert_eq!(state.view_hash, w.view_hash);
        assert_eq!(state.delivered_key, w.delivered_key);
    }

    #[test]
    fn a_delivered_key_written_in_place_is_read_back() {
        let spec = spec();
        let w = StateWrite {
            id: "7".into(),
            read_rev: 0,
            sides: vec![(spec.sides[1].field.clone(), side("{}"))],
            key: String::new(),
            view_hash: String::new(),
            delivered_key: String::new(),
        };
        let mut value = encode(&w).into_bytes();
        assert_eq!(decode(&spec, &value).unwrap().delivered_key, "");
        // What `SETRANGE <key> 17 <dk>` does.
        value[DK_OFFSET..DK_OFFSET + DK_WIDTH]
            .copy_from_slice(dk_field(&"e".repeat(64)).as_bytes());
        let state = decode(&spec, &value).unwrap();
        assert_eq!(state.delivered_key, "e".repeat(64));
        assert_eq!(state.rev, 1);
        assert!(state.sides[1].is_some());
    }

    #[test]
    fn what_setrange_leaves_on_a_lost_key_is_no_state() {
        let mut lost = vec![0u8; DK_OFFSET];
        lost.extend_from_slice("e".repeat(64).as_bytes());
        let state = decode(&spec(), &lost).unwrap();
        assert_eq!(state.rev, 0);
        assert!(state.sides.iter().all(Option::is_none));
    }

    #[test]
    fn a_corrupt_state_is_an_error() {
        let spec = spec();
        let mut value = encode(&StateWrite {
            id: "7".into(),
            read_rev: 0,
            sides: vec![(spec.sides[0].field.clone(), side("{}"))],
            key: String::new(),
            view_hash: String::new(),
            delivered_key: String::new(),
        });
        value.truncate(value.len() - 1);
        assert!(decode(&spec, value.as_bytes()).is_err());
    }
}
