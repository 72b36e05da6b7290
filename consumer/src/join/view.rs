//! Views: when an id's state makes one (every required side present), its canonical form, the
//! key it is delivered under (`view_key`: the sides' versions and the view, ARCHITECTURE.md I2)
//! and the merged record sent to Analytics.

use std::fmt::Write as _;

use pipeline_core::canonical::{canonical_object, delivery_key, json_string, sha256_hex};
use serde_json::value::RawValue;

use super::{JoinSpec, JoinState};

/// Every required side is present.
pub(super) fn complete(spec: &JoinSpec, state: &JoinState) -> bool {
    spec.sides
        .iter()
        .zip(&state.sides)
        .all(|(side, slot)| !side.required || slot.is_some())
}

/// Emits the view of `state` if it is complete and differs from the last one.
pub(super) fn next_view(
    spec: &JoinSpec,
    id: &str,
    state: &mut JoinState,
    merged_at: &str,
    chain: bool,
) -> Option<(String, Box<RawValue>)> {
    if !complete(spec, state) {
        return None;
    }
    let canonical = canonical_view(spec, id, state);
    let view_hash = sha256_hex(canonical.as_bytes());
    if view_hash == state.view_hash {
        return None;
    }
    let key = view_key(spec, state, &canonical, chain);
    state.key = key.clone();
    state.view_hash = view_hash;
    let record = merged_record(spec, &key, id, state, merged_at);
    Some((key, record))
}

/// A view's idempotency key: `sha256(versions ‖ canonical(view))`, where `versions` names the
/// `updated_at` of each present side. It depends only on the latest records the view is made
/// of, so a rebuild from compacted topics (which keep only those) derives the key the first
/// delivery had, and Analytics drops the re-send. A revert A → B → A is a new version, hence a
/// new key. Only a change that moves no version (a source without `updated_at`, or content
/// changed under the same one) is chained to the previous key, `sha256(prev_key ‖ versions ‖
/// view)`, so that its revert is not swallowed either.
fn view_key(spec: &JoinSpec, state: &JoinState, canonical: &str, chain: bool) -> String {
    let mut context = if chain {
        state.key.clone()
    } else {
        String::new()
    };
    for (side, slot) in spec.sides.iter().zip(&state.sides) {
        if let Some(s) = slot {
            // Writing into a String cannot fail.
            let _ = write!(context, "|{}@{}", side.name, s.updated_at_ms);
        }
    }
    delivery_key(&context, canonical)
}

/// `canonical_json({"id": id, <side>: record, ...})` over the present sides, assembled from the
/// sides' canonical texts.
fn canonical_view(spec: &JoinSpec, id: &str, state: &JoinState) -> String {
    let id_json = json_string(id);
    let mut entries: Vec<(&str, &str)> = spec
        .sides
        .iter()
        .zip(&state.sides)
        .filter_map(|(side, slot)| Some((side.name.as_str(), &*slot.as_ref()?.record)))
        .collect();
    entries.push(("id", &id_json));
    canonical_object(entries)
}

/// `{"key", "id", <one field per side, null when absent>, "merged_at"}` as JSON text.
pub(super) fn merged_record(
    spec: &JoinSpec,
    key: &str,
    id: &str,
    state: &JoinState,
    merged_at: &str,
) -> Box<RawValue> {
    let mut out = String::with_capacity(
        state
            .sides
            .iter()
            .flatten()
            .map(|s| s.record.len())
            .sum::<usize>()
            + 200,
    );
    out.push_str("{\"key\":");
    out.push_str(&json_string(key));
    out.push_str(",\"id\":");
    out.push_str(&json_string(id));
    for (side, slot) in spec.sides.iter().zip(&state.sides) {
        out.push(',');
        out.push_str(&json_string(&side.name));
        out.push(':');
        out.push_str(slot.as_ref().map_or("null", |s| &*s.record));
    }
    out.push_str(",\"merged_at\":");
    out.push_str(&json_string(merged_at));
    out.push('}');
    // Every piece is JSON already (canonical records, escaped strings): this cannot fail.
    RawValue::from_string(out).unwrap_or_else(|_| RawValue::NULL.to_owned())
}
