//! The join: latest customer + latest product per id, and the merged views it emits.
//!
//! Pure logic, no I/O: [`JoinBatch`] takes the states of the ids a batch touches (as loaded from
//! Redis), applies the batch's records in order and yields the state writes and the merged views
//! to deliver. Rules:
//!
//! * A side is replaced only by a newer version: `(updated_at, offset)` compares greater and the
//!   content differs. Stale versions (older `updated_at`) never overwrite newer state, and a
//!   redelivered message (same offset) is a no-op.
//! * Every change that alters the view emits it under `key = sha256(prev_key ‖ canonical(view))`,
//!   so a re-send of one view keeps its key while A→B→A yields three keys (DESIGN.md I2, I3).
//! * An id whose current key was never confirmed delivered (`delivered_key != key`, e.g. after a
//!   crash between the state write and the POST) is emitted again under the same key.

use std::collections::{HashMap, HashSet};

use pipeline_core::canonical::{canonical_json, delivery_key, sha256_hex};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Which join side a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Customer,
    Product,
}

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
    pub side: Side,
    pub id: String,
    pub updated_at_ms: i64,
    pub hash: String,
    pub record: Value,
    pub origin: Origin,
}

/// The stored version of one side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideState {
    /// `updated_at` in epoch ms.
    pub u: i64,
    /// Kafka offset of the message it came from (tie-break within one `updated_at`).
    pub o: i64,
    /// Content hash.
    pub h: String,
    /// The record.
    pub r: Value,
}

/// Join state of one id, as stored in Redis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinState {
    pub customer: Option<SideState>,
    pub product: Option<SideState>,
    /// Key of the last emitted view ("" before the first).
    pub key: String,
    /// Hash of the last emitted view.
    pub view_hash: String,
    /// Last key confirmed delivered (or dead-lettered).
    pub delivered_key: String,
    /// Optimistic-concurrency revision.
    pub rev: i64,
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
    /// The merged record as sent to Analytics.
    pub record: Value,
    pub origin: Origin,
}

/// A state to write back, guarded by the revision it was read at.
#[derive(Debug, Clone)]
pub struct StateWrite {
    pub id: String,
    pub expected_rev: i64,
    pub customer: Option<String>,
    pub product: Option<String>,
    pub key: String,
    pub view_hash: String,
}

struct Entry {
    state: JoinState,
    customer_dirty: bool,
    product_dirty: bool,
    emitted_current: bool,
    last_origin: Origin,
}

/// The join work of one batch.
pub struct JoinBatch {
    entries: HashMap<String, Entry>,
    /// Ids in first-touched order (keeps emission order deterministic).
    order: Vec<String>,
    touched: HashSet<String>,
    emissions: Vec<Emission>,
    merged_at: String,
}

impl JoinBatch {
    /// Starts a batch over the loaded states (missing ids start empty).
    pub fn new(loaded: HashMap<String, JoinState>) -> Self {
        Self {
            entries: loaded
                .into_iter()
                .map(|(id, state)| {
                    let origin = Origin {
                        topic: String::new(),
                        partition: -1,
                        offset: -1,
                    };
                    (
                        id,
                        Entry {
                            state,
                            customer_dirty: false,
                            product_dirty: false,
                            emitted_current: false,
                            last_origin: origin,
                        },
                    )
                })
                .collect(),
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
        let entry = self
            .entries
            .entry(input.id.clone())
            .or_insert_with(|| Entry {
                state: JoinState::default(),
                customer_dirty: false,
                product_dirty: false,
                emitted_current: false,
                last_origin: input.origin.clone(),
            });
        entry.last_origin = input.origin.clone();
        let (slot, dirty) = match input.side {
            Side::Customer => (&mut entry.state.customer, &mut entry.customer_dirty),
            Side::Product => (&mut entry.state.product, &mut entry.product_dirty),
        };
        if let Some(cur) = slot {
            if (input.updated_at_ms, input.origin.offset) <= (cur.u, cur.o) {
                return if cur.h == input.hash {
                    Applied::Unchanged
                } else {
                    Applied::Stale
                };
            }
            if cur.h == input.hash {
                return Applied::Unchanged;
            }
        }
        *slot = Some(SideState {
            u: input.updated_at_ms,
            o: input.origin.offset,
            h: input.hash.clone(),
            r: input.record.clone(),
        });
        *dirty = true;
        if let Some((key, record)) = next_view(&input.id, &mut entry.state, &self.merged_at) {
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

    /// The state writes and the views to deliver (new ones, then unconfirmed earlier ones).
    pub fn finish(mut self) -> (Vec<StateWrite>, Vec<Emission>) {
        let mut writes = Vec::new();
        for id in &self.order {
            let Some(e) = self.entries.get(id) else {
                continue;
            };
            let s = &e.state;
            if e.customer_dirty || e.product_dirty {
                writes.push(StateWrite {
                    id: id.clone(),
                    expected_rev: s.rev,
                    customer: e.customer_dirty.then(|| side_json(&s.customer)),
                    product: e.product_dirty.then(|| side_json(&s.product)),
                    key: s.key.clone(),
                    view_hash: s.view_hash.clone(),
                });
            }
            if !e.emitted_current && !s.key.is_empty() && s.key != s.delivered_key {
                if let (Some(c), Some(p)) = (&s.customer, &s.product) {
                    let record = merged_record(&s.key, id, &c.r, &p.r, &self.merged_at);
                    self.emissions.push(Emission {
                        id: id.clone(),
                        key: s.key.clone(),
                        record,
                        origin: e.last_origin.clone(),
                    });
                }
            }
        }
        (writes, self.emissions)
    }
}

fn side_json(side: &Option<SideState>) -> String {
    side.as_ref()
        .and_then(|s| serde_json::to_string(s).ok())
        .unwrap_or_default()
}

/// Emits the view of `state` if both sides exist and the view differs from the last one.
fn next_view(id: &str, state: &mut JoinState, merged_at: &str) -> Option<(String, Value)> {
    let (c, p) = (state.customer.as_ref()?, state.product.as_ref()?);
    let view = json!({"id": id, "customer": c.r, "inventory": p.r});
    let canonical = canonical_json(&view);
    let view_hash = sha256_hex(canonical.as_bytes());
    if view_hash == state.view_hash {
        return None;
    }
    let key = delivery_key(&state.key, &canonical);
    let record = merged_record(&key, id, &c.r, &p.r, merged_at);
    state.key = key.clone();
    state.view_hash = view_hash;
    Some((key, record))
}

fn merged_record(
    key: &str,
    id: &str,
    customer: &Value,
    inventory: &Value,
    merged_at: &str,
) -> Value {
    json!({"key": key, "id": id, "customer": customer, "inventory": inventory, "merged_at": merged_at})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(side: Side, id: &str, u: i64, offset: i64, name: &str) -> Input {
        let record = json!({"id": id, "name": name, "updated_at": u});
        Input {
            side,
            id: id.into(),
            updated_at_ms: u,
            hash: pipeline_core::canonical::content_hash(&record),
            record,
            origin: Origin {
                topic: "t".into(),
                partition: 0,
                offset,
            },
        }
    }

    /// Runs one batch over `state`, persisting writes like the store would.
    fn run(state: &mut JoinState, inputs: Vec<Input>) -> Vec<Emission> {
        let mut loaded = HashMap::new();
        loaded.insert("1".to_string(), state.clone());
        let mut b = JoinBatch::new(loaded);
        for i in &inputs {
            b.apply(i);
        }
        let (writes, emissions) = b.finish();
        for w in writes {
            if let Some(c) = w.customer {
                state.customer = serde_json::from_str(&c).unwrap();
            }
            if let Some(p) = w.product {
                state.product = serde_json::from_str(&p).unwrap();
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
        assert!(run(&mut s, vec![input(Side::Product, "1", 1, 0, "p")]).is_empty());
        let e = run(&mut s, vec![input(Side::Customer, "1", 1, 0, "c")]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].record["customer"]["name"], "c");
        assert_eq!(e[0].record["inventory"]["name"], "p");
        // Not confirmed: a redelivery of the same message re-sends the same key.
        let again = run(&mut s, vec![input(Side::Customer, "1", 1, 0, "c")]);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].key, e[0].key);
        // Confirmed: nothing more.
        s.delivered_key = s.key.clone();
        assert!(run(&mut s, vec![input(Side::Customer, "1", 1, 5, "c")]).is_empty());
    }

    #[test]
    fn a_revert_gets_a_new_key_and_stale_versions_are_ignored() {
        let mut s = JoinState::default();
        run(&mut s, vec![input(Side::Product, "1", 1, 0, "p")]);
        let a = run(&mut s, vec![input(Side::Customer, "1", 1, 0, "A")]);
        s.delivered_key = s.key.clone();
        let b = run(&mut s, vec![input(Side::Customer, "1", 2, 1, "B")]);
        s.delivered_key = s.key.clone();
        let a2 = run(&mut s, vec![input(Side::Customer, "1", 3, 2, "A")]);
        s.delivered_key = s.key.clone();
        let keys = [&a[0].key, &b[0].key, &a2[0].key];
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
        // An older version arriving late changes nothing.
        assert!(run(&mut s, vec![input(Side::Customer, "1", 2, 9, "B")]).is_empty());
        assert_eq!(s.customer.as_ref().unwrap().r["name"], "A");
    }

    #[test]
    fn changes_within_one_batch_emit_each_view_in_order() {
        let mut s = JoinState::default();
        let e = run(
            &mut s,
            vec![
                input(Side::Product, "1", 1, 0, "p"),
                input(Side::Customer, "1", 1, 0, "A"),
                input(Side::Customer, "1", 2, 1, "B"),
            ],
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].record["customer"]["name"], "B");
        assert_eq!(s.key, e[1].key);
    }
}
