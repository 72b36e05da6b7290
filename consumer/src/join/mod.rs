//! The join: the latest record of every side per id, and the merged views it emits.
//!
//! Pure logic, no I/O: [`JoinBatch`] takes the states of the ids a batch touches (as loaded from
//! Redis), applies the batch's records in order and yields the state writes and the merged views
//! to deliver. The sides come from the pipeline's join ([`JoinSpec`]); the built-in one is
//! `customer` ⋈ `inventory`, both required. Rules:
//!
//! * A side is replaced only by a newer version: `(updated_at, offset)` compares greater and the
//!   content differs. Stale versions (older `updated_at`) never overwrite newer state, and a
//!   redelivered message (same offset) is a no-op.
//! * A view exists once every required side is present; optional sides enrich it when present
//!   (absent ones are `null` in the merged record and left out of the view's identity, so adding
//!   an optional side to a pipeline does not re-deliver the views that lack it).
//! * Every change that alters the view emits it under a key made of the view and its sides'
//!   versions (`view_key`), so a re-send of one view keeps its key, a rebuild from compacted
//!   topics re-derives it, and A→B→A yields three keys (ARCHITECTURE.md I2, I3).
//! * An id whose current key was never confirmed delivered (`delivered_key != key`, e.g. after a
//!   crash between the state write and the POST) is emitted again under the same key.

mod spec;
mod view;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::RawValue;

pub use spec::JoinSpec;
use view::{complete, merged_record, next_view};

/// Where a message came from (for DLQ headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A validated record ready to join.
#[derive(Debug, Clone)]
pub struct Input {
    /// Index of its side in the [`JoinSpec`].
    pub side: usize,
    pub id: String,
    pub updated_at_ms: i64,
    /// SHA-256 of `record`.
    pub hash: String,
    /// The record as canonical JSON (sorted keys, no whitespace): parsed once when decoded,
    /// then only copied by reference, concatenated into views and merged records, and stored.
    pub record: Arc<str>,
    pub origin: Origin,
}

/// The stored version of one side (its byte form: `store::codec`).
#[derive(Debug, Clone, PartialEq)]
pub struct SideState {
    /// `updated_at` in epoch ms.
    pub updated_at_ms: i64,
    /// Kafka offset of the message it came from (tie-break within one `updated_at`).
    pub offset: i64,
    /// Content hash.
    pub hash: String,
    /// The record, canonical JSON.
    pub record: Arc<str>,
}

/// Join state of one id, as stored in Redis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinState {
    /// One slot per side of the [`JoinSpec`].
    pub sides: Vec<Option<SideState>>,
    /// Key of the last emitted view ("" before the first).
    pub key: String,
    /// Hash of the last emitted view.
    pub view_hash: String,
    /// Last key confirmed delivered (or dead-lettered).
    pub delivered_key: String,
    /// How many times the state was written (see [`StateWrite::read_rev`]).
    pub rev: i64,
}

impl JoinState {
    /// The state of an id never seen, for a join of `sides` sides.
    pub fn empty(sides: usize) -> Self {
        Self {
            sides: vec![None; sides],
            ..Self::default()
        }
    }
}

/// What applying one input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The side changed.
    Changed,
    /// Same content as stored (a re-poll or a redelivery).
    Unchanged,
    /// Older than the stored version: ignored.
    Stale,
}

/// A merged view to deliver.
#[derive(Debug, Clone)]
pub struct Emission {
    pub id: String,
    pub key: String,
    /// The merged record as sent to Analytics (JSON text, embedded as is in the POST body).
    pub record: Box<RawValue>,
    pub origin: Origin,
}

/// A state to write back whole (under the worker's partition fence, see `store::Fence`).
#[derive(Debug, Clone)]
pub struct StateWrite {
    pub id: String,
    /// The revision the state was read at; the write stores the next one. Revisions count the
    /// writes of an id (for inspection); nothing compares them since writes are fenced.
    pub read_rev: i64,
    /// Every present side: (side field, its state).
    pub sides: Vec<(String, SideState)>,
    pub key: String,
    pub view_hash: String,
    /// Kept as read: only a confirmation changes it.
    pub delivered_key: String,
}

struct Entry {
    state: JoinState,
    /// A side changed: the whole state is written back.
    dirty: bool,
    emitted_current: bool,
    last_origin: Origin,
}

impl Entry {
    fn new(mut state: JoinState, sides: usize, origin: Origin) -> Self {
        state.sides.resize(sides, None);
        Self {
            state,
            dirty: false,
            emitted_current: false,
            last_origin: origin,
        }
    }
}

/// The join work of one batch.
pub struct JoinBatch {
    spec: Arc<JoinSpec>,
    entries: HashMap<String, Entry>,
    /// Ids in first-touched order (keeps emission order deterministic).
    order: Vec<String>,
    touched: HashSet<String>,
    emissions: Vec<Emission>,
    merged_at: String,
}

impl JoinBatch {
    /// Starts a batch over the loaded states (missing ids start empty).
    pub fn new(spec: Arc<JoinSpec>, loaded: HashMap<String, JoinState>) -> Self {
        let n = spec.sides.len();
        let none = Origin {
            topic: String::new(),
            partition: -1,
            offset: -1,
        };
        Self {
            entries: loaded
                .into_iter()
                .map(|(id, state)| (id, Entry::new(state, n, none.clone())))
                .collect(),
            spec,
            order: Vec::new(),
            touched: HashSet::new(),
            emissions: Vec::new(),
            merged_at: chrono::Utc::now().to_rfc3339(),
        }
    }

    /// Applies one input in batch order. The record is copied only when it changes the state,
    /// so re-polls and redeliveries (the common case) cost no allocation per message.
    pub fn apply(&mut self, input: &Input) -> Applied {
        if self.touched.insert(input.id.clone()) {
            self.order.push(input.id.clone());
        }
        let n = self.spec.sides.len();
        let entry = self
            .entries
            .entry(input.id.clone())
            .or_insert_with(|| Entry::new(JoinState::empty(n), n, input.origin.clone()));
        entry.last_origin = input.origin.clone();
        let Some(slot) = entry.state.sides.get_mut(input.side) else {
            return Applied::Stale;
        };
        // A change that moves the side's `updated_at` is told apart by its version alone; one
        // that does not (a source without versions, or content changed under the same one)
        // is chained to the previous view's key (see `view_key`).
        let chain = input.updated_at_ms == 0
            || slot
                .as_ref()
                .is_some_and(|cur| cur.updated_at_ms == input.updated_at_ms);
        if let Some(cur) = slot {
            if (input.updated_at_ms, input.origin.offset) <= (cur.updated_at_ms, cur.offset) {
                return if cur.hash == input.hash {
                    Applied::Unchanged
                } else {
                    Applied::Stale
                };
            }
            if cur.hash == input.hash {
                return Applied::Unchanged;
            }
        }
        *slot = Some(SideState {
            updated_at_ms: input.updated_at_ms,
            offset: input.origin.offset,
            hash: input.hash.clone(),
            record: input.record.clone(),
        });
        entry.dirty = true;
        if let Some((key, record)) = next_view(
            &self.spec,
            &input.id,
            &mut entry.state,
            &self.merged_at,
            chain,
        ) {
            entry.emitted_current = true;
            self.emissions.push(Emission {
                id: input.id.clone(),
                key,
                record,
                origin: input.origin.clone(),
            });
        }
        Applied::Changed
    }

    /// The content hash of every side of every id the batch touched, as the batch leaves them.
    pub fn side_hashes(&self) -> Vec<(String, Vec<Option<String>>)> {
        self.order
            .iter()
            .filter_map(|id| {
                let e = self.entries.get(id)?;
                let hashes = e
                    .state
                    .sides
                    .iter()
                    .map(|s| s.as_ref().map(|s| s.hash.clone()))
                    .collect();
                Some((id.clone(), hashes))
            })
            .collect()
    }

    /// The state writes and the views to deliver (new ones, then unconfirmed earlier ones).
    pub fn finish(mut self) -> (Vec<StateWrite>, Vec<Emission>) {
        let mut writes = Vec::new();
        for id in &self.order {
            let Some(e) = self.entries.get(id) else {
                continue;
            };
            let s = &e.state;
            if e.dirty {
                writes.push(StateWrite {
                    id: id.clone(),
                    read_rev: s.rev,
                    sides: self
                        .spec
                        .sides
                        .iter()
                        .zip(&s.sides)
                        .filter_map(|(spec, side)| {
                            Some((spec.field.clone(), side.as_ref()?.clone()))
                        })
                        .collect(),
                    key: s.key.clone(),
                    view_hash: s.view_hash.clone(),
                    delivered_key: s.delivered_key.clone(),
                });
            }
            if !e.emitted_current
                && !s.key.is_empty()
                && s.key != s.delivered_key
                && complete(&self.spec, s)
            {
                let record = merged_record(&self.spec, &s.key, id, s, &self.merged_at);
                self.emissions.push(Emission {
                    id: id.clone(),
                    key: s.key.clone(),
                    record,
                    origin: e.last_origin.clone(),
                });
            }
        }
        (writes, self.emissions)
    }
}

#[cfg(test)]
mod tests {
    use super::spec::SideSpec;
    use super::*;
    use pipeline_core::canonical::{canonical_json, delivery_key, sha256_hex};
    use pipeline_core::record::RecordShape;
    use serde_json::{json, Value};

    /// An emission's merged record, parsed.
    fn rec(e: &Emission) -> Value {
        serde_json::from_str(e.record.get()).unwrap()
    }

    const CUSTOMER: usize = 0;
    const PRODUCT: usize = 1;
    const PRICING: usize = 2;

    fn spec(optional_pricing: bool) -> Arc<JoinSpec> {
        let side = |name: &str, required: bool| SideSpec {
            name: name.into(),
            topic: format!("{name}_data"),
            required,
            shape: RecordShape::default(),
            field: format!("s:{name}"),
        };
        let mut sides = vec![side("customer", true), side("inventory", true)];
        if optional_pricing {
            sides.push(side("pricing", false));
        }
        Arc::new(JoinSpec { sides })
    }

    fn input(side: usize, id: &str, u: i64, offset: i64, name: &str) -> Input {
        let record = canonical_json(&json!({"id": id, "name": name, "updated_at": u}));
        Input {
            side,
            id: id.into(),
            updated_at_ms: u,
            hash: sha256_hex(record.as_bytes()),
            record: Arc::from(record),
            origin: Origin {
                topic: "t".into(),
                partition: 0,
                offset,
            },
        }
    }

    /// Runs one batch over `state`, persisting writes like the store would.
    fn run(state: &mut JoinState, inputs: Vec<Input>) -> Vec<Emission> {
        run_with(&spec(false), state, inputs)
    }

    fn run_with(spec: &Arc<JoinSpec>, state: &mut JoinState, inputs: Vec<Input>) -> Vec<Emission> {
        let mut loaded = HashMap::new();
        loaded.insert("1".to_string(), state.clone());
        let mut b = JoinBatch::new(spec.clone(), loaded);
        for i in &inputs {
            b.apply(i);
        }
        let (writes, emissions) = b.finish();
        for w in writes {
            state.sides.resize(spec.sides.len(), None);
            for (field, written) in w.sides {
                let side = spec.sides.iter().position(|s| s.field == field).unwrap();
                state.sides[side] = Some(written);
            }
            state.key = w.key;
            state.view_hash = w.view_hash;
            state.rev += 1;
        }
        emissions
    }

    #[test]
    fn joins_in_either_order_and_resends_unconfirmed_views() {
        let mut s = JoinState::default();
        assert!(run(&mut s, vec![input(PRODUCT, "1", 1, 0, "p")]).is_empty());
        let e = run(&mut s, vec![input(CUSTOMER, "1", 1, 0, "c")]);
        assert_eq!(e.len(), 1);
        assert_eq!(rec(&e[0])["customer"]["name"], "c");
        assert_eq!(rec(&e[0])["inventory"]["name"], "p");
        // Not confirmed: a redelivery of the same message re-sends the same key.
        let again = run(&mut s, vec![input(CUSTOMER, "1", 1, 0, "c")]);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].key, e[0].key);
        // Confirmed: nothing more.
        s.delivered_key = s.key.clone();
        assert!(run(&mut s, vec![input(CUSTOMER, "1", 1, 5, "c")]).is_empty());
    }

    #[test]
    fn a_revert_gets_a_new_key_and_stale_versions_are_ignored() {
        let mut s = JoinState::default();
        run(&mut s, vec![input(PRODUCT, "1", 1, 0, "p")]);
        let a = run(&mut s, vec![input(CUSTOMER, "1", 1, 0, "A")]);
        s.delivered_key = s.key.clone();
        let b = run(&mut s, vec![input(CUSTOMER, "1", 2, 1, "B")]);
        s.delivered_key = s.key.clone();
        let a2 = run(&mut s, vec![input(CUSTOMER, "1", 3, 2, "A")]);
        s.delivered_key = s.key.clone();
        let keys = [&a[0].key, &b[0].key, &a2[0].key];
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
        // An older version arriving late changes nothing.
        assert!(run(&mut s, vec![input(CUSTOMER, "1", 2, 9, "B")]).is_empty());
        let stored: Value =
            serde_json::from_str(&s.sides[CUSTOMER].as_ref().unwrap().record).unwrap();
        assert_eq!(stored["name"], "A");
    }

    #[test]
    fn changes_within_one_batch_emit_each_view_in_order() {
        let mut s = JoinState::default();
        let e = run(
            &mut s,
            vec![
                input(PRODUCT, "1", 1, 0, "p"),
                input(CUSTOMER, "1", 1, 0, "A"),
                input(CUSTOMER, "1", 2, 1, "B"),
            ],
        );
        assert_eq!(e.len(), 2);
        assert_eq!(rec(&e[1])["customer"]["name"], "B");
        assert_eq!(s.key, e[1].key);
    }

    #[test]
    fn the_built_in_join_keeps_the_two_sided_key() {
        let mut s = JoinState::default();
        run(&mut s, vec![input(PRODUCT, "1", 1, 0, "p")]);
        let e = run(&mut s, vec![input(CUSTOMER, "1", 1, 0, "c")]);
        let view = json!({
            "id": "1",
            "customer": {"id": "1", "name": "c", "updated_at": 1},
            "inventory": {"id": "1", "name": "p", "updated_at": 1},
        });
        assert_eq!(
            e[0].key,
            delivery_key("|customer@1|inventory@1", &canonical_json(&view))
        );
    }

    #[test]
    fn a_rebuild_from_only_the_latest_records_derives_the_delivered_key() {
        // First time: A, then B (a newer version), delivered in turn.
        let mut s = JoinState::default();
        run(&mut s, vec![input(PRODUCT, "1", 1, 0, "p")]);
        run(&mut s, vec![input(CUSTOMER, "1", 1, 0, "A")]);
        s.delivered_key = s.key.clone();
        let b = run(&mut s, vec![input(CUSTOMER, "1", 2, 1, "B")]);
        // After a Redis loss, compacted topics hold only B and p: the same view, the same key.
        let mut rebuilt = JoinState::default();
        let again = run(
            &mut rebuilt,
            vec![
                input(CUSTOMER, "1", 2, 1, "B"),
                input(PRODUCT, "1", 1, 0, "p"),
            ],
        );
        assert_eq!(again[0].key, b[0].key);
    }

    #[test]
    fn a_change_under_the_same_version_and_its_revert_get_keys_of_their_own() {
        let mut s = JoinState::default();
        run(&mut s, vec![input(PRODUCT, "1", 1, 0, "p")]);
        let a = run(&mut s, vec![input(CUSTOMER, "1", 5, 0, "A")]);
        s.delivered_key = s.key.clone();
        // The source changed the record without a new updated_at, then changed it back.
        let b = run(&mut s, vec![input(CUSTOMER, "1", 5, 1, "B")]);
        s.delivered_key = s.key.clone();
        let a2 = run(&mut s, vec![input(CUSTOMER, "1", 5, 2, "A")]);
        let keys = [&a[0].key, &b[0].key, &a2[0].key];
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
    }

    #[test]
    fn an_optional_side_enriches_without_holding_back_the_view() {
        let spec = spec(true);
        // The enrichment alone emits nothing.
        let mut lone = JoinState::empty(3);
        assert!(run_with(&spec, &mut lone, vec![input(PRICING, "1", 1, 0, "x")]).is_empty());
        let mut s = JoinState::empty(3);
        let e = run_with(
            &spec,
            &mut s,
            vec![
                input(PRODUCT, "1", 1, 0, "p"),
                input(CUSTOMER, "1", 1, 0, "c"),
            ],
        );
        assert_eq!(e.len(), 1);
        assert_eq!(rec(&e[0])["pricing"], Value::Null);
        s.delivered_key = s.key.clone();
        // The enrichment arriving later is a new view under a new key, chained to the first.
        let e2 = run_with(&spec, &mut s, vec![input(PRICING, "1", 1, 0, "x")]);
        assert_eq!(e2.len(), 1);
        assert_eq!(rec(&e2[0])["pricing"]["name"], "x");
        assert_ne!(e2[0].key, e[0].key);
        // Without the optional side, the view's identity is the two-sided one.
        let two = spec_two_sided_key(&e[0]);
        assert_eq!(e[0].key, two);
    }

    fn spec_two_sided_key(e: &Emission) -> String {
        let r = rec(e);
        let view = json!({"id": e.id, "customer": r["customer"], "inventory": r["inventory"]});
        delivery_key("|customer@1|inventory@1", &canonical_json(&view))
    }
}
