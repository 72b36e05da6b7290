//! `KnownState`: what this worker last saw of the join state of the ids it owns, so that the
//! common cases skip Redis reads.
//!
//! A re-sent record (re-poll, redelivery) whose bytes hash to the side hash known for its id, on
//! an id whose view is confirmed, is dropped without a Redis read or a JSON parse. Every other
//! message's id is read from Redis (under the worker's partition fence, see `store::Fence`).
//!
//! Only entries written or read by this worker are kept, up to a size cap, and all are dropped
//! on every rebalance (another owner may have written meanwhile) and on a Redis data loss. To stay small (about 40 bytes per id), an id is kept as a 64-bit
//! SipHash of it and each side's content hash as its first 64 bits: mistaking a change for a
//! re-send would take both an id collision and a content collision (odds around 2^-128).

use std::collections::HashMap;
use std::hash::BuildHasher;

/// Most sides tracked per id; joins with more sides are not cached.
pub const MAX_SIDES: usize = 3;

/// Most ids kept (about 33 bytes each, 17 MB at most with the table's slack): when full, new
/// ids are no longer added (they are simply read from Redis), known ones are still updated.
const MAX_IDS: usize = 400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    /// 64-bit prefix of each side's content hash, 0 when the side is absent.
    sides: [u64; MAX_SIDES],
}

/// What this worker knows of its ids' join state.
#[derive(Debug, Default)]
pub struct KnownState {
    /// Keyed by the id's 64-bit hash (keys of a random SipHash, fixed per worker).
    ids: HashMap<u64, Known>,
    hasher: std::collections::hash_map::RandomState,
}

/// The first 64 bits of a hex SHA-256 (0 if it is not hex).
pub fn fingerprint(hex_hash: &str) -> u64 {
    hex_hash
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

impl KnownState {
    fn key(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Whether `side` of `id` is known to hold exactly the content hashed `hash` (with the id's
    /// view confirmed: only confirmed ids are recorded).
    pub fn is_unchanged(&self, id: &str, side: usize, hash: &str) -> bool {
        let fp = fingerprint(hash);
        fp != 0
            && self
                .ids
                .get(&self.key(id))
                .and_then(|k| k.sides.get(side))
                .is_some_and(|s| *s == fp)
    }

    /// Whether `id` has a known state (its Redis state must be read before a change).
    pub fn knows(&self, id: &str) -> bool {
        self.ids.contains_key(&self.key(id))
    }

    /// Records the confirmed state of `id`: each side's content hash, None when absent.
    pub fn record<'a>(&mut self, id: &str, side_hashes: impl Iterator<Item = Option<&'a str>>) {
        let key = self.key(id);
        let mut sides = [0u64; MAX_SIDES];
        for (slot, h) in sides.iter_mut().zip(side_hashes) {
            *slot = h.map_or(0, fingerprint);
        }
        if sides.iter().all(|s| *s == 0) {
            self.ids.remove(&key);
            return;
        }
        if let Some(known) = self.ids.get_mut(&key) {
            known.sides = sides;
        } else if self.ids.len() < MAX_IDS {
            self.ids.insert(key, Known { sides });
        }
    }

    /// Forgets everything (rebalance, Redis data loss, a lost fence).
    pub fn clear(&mut self) {
        self.ids = HashMap::new();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn only_the_recorded_content_of_a_side_is_unchanged() {
        let mut k = KnownState::default();
        assert!(!k.is_unchanged("1", 0, A));
        k.record("1", [Some(A), None].into_iter());
        assert!(k.knows("1"));
        assert!(k.is_unchanged("1", 0, A));
        assert!(!k.is_unchanged("1", 0, B), "a change is not unchanged");
        assert!(
            !k.is_unchanged("1", 1, A),
            "an absent side is never unchanged"
        );
        k.record("1", [Some(B), Some(A)].into_iter());
        assert!(k.is_unchanged("1", 0, B) && k.is_unchanged("1", 1, A));
        k.record("2", [Some(A)].into_iter());
        k.clear();
        assert!(k.is_empty() && !k.knows("1") && !k.is_unchanged("1", 0, B));
    }

    #[test]
    fn past_the_cap_new_ids_are_left_out_and_known_ones_still_updated() {
        let mut k = KnownState::default();
        for i in 0..MAX_IDS {
            k.record(&i.to_string(), [Some(A)].into_iter());
        }
        k.record("one more", [Some(A)].into_iter());
        assert!(!k.knows("one more"));
        assert_eq!(k.len(), MAX_IDS);
        k.record("7", [Some(B)].into_iter());
        assert!(k.is_unchanged("7", 0, B));
    }
}
