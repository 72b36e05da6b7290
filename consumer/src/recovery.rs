//! When a partition's committed progress can be trusted, and the rebuild when it cannot.
//!
//! Redis holds the join state that the committed offsets stand for; if Redis comes back empty,
//! those offsets point past records whose state is gone. So every offset a worker commits
//! carries, as its Kafka commit metadata, the store epoch its effects were written under
//! (`JoinStore::epoch`). Offset and epoch land in one commit, so the pair can never disagree.
//! Before a worker processes anything after a rebalance it reads the committed offsets of every
//! side topic of each partition number it holds; a number with any side committed under another
//! epoch is rebuilt: every side of it is replayed from its beginning, together, so the rebuilt
//! views follow the same order (and get the same keys) as the first time. A rebuild's progress
//! is committed after every batch, under the new epoch; until its first commit lands the old
//! epoch is still committed, so whoever owns the partition next rebuilds it again.

use std::collections::{BTreeSet, HashMap, HashSet};

use rdkafka::{Offset, TopicPartitionList};

/// One side topic-partition's committed progress, as the group coordinator answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Committed {
    pub topic: String,
    pub partition: i32,
    /// None when the group never committed this topic-partition.
    pub offset: Option<i64>,
    /// The store epoch the commit was made under (its metadata).
    pub epoch: String,
}

impl Committed {
    /// Reads what `committed_offsets` answered.
    pub fn from_list(list: &TopicPartitionList) -> Vec<Committed> {
        list.elements()
            .iter()
            .map(|e| Committed {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                offset: match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
                epoch: e.metadata().to_owned(),
            })
            .collect()
    }
}

/// The partition numbers whose progress was not all made under `epoch`: some side has an
/// offset committed under another epoch (or under none: a commit made before epochs were
/// recorded). A side never committed holds nothing to distrust.
pub(crate) fn untrusted(committed: &[Committed], epoch: &str) -> BTreeSet<i32> {
    committed
        .iter()
        .filter(|c| c.offset.is_some() && c.epoch != epoch)
        .map(|c| c.partition)
        .collect()
}

/// A worker's view of its partitions' trust since the last rebalance.
#[derive(Debug, Default)]
pub(crate) struct Rebuilds {
    /// Partition numbers whose committed progress was checked since the last rebalance.
    checked: HashSet<i32>,
    /// Side topic-partitions sought back to be rebuilt, with the next offset stored for each.
    /// They are committed explicitly after every batch: librdkafka's auto-commit only commits
    /// an offset past the committed one, and that one is the old, untrusted progress.
    rebuilding: HashMap<(String, i32), Option<i64>>,
}

impl Rebuilds {
    /// After a rebalance: what was checked may have moved, and a rebuild is judged afresh by
    /// what it committed.
    pub fn reset(&mut self) {
        self.checked.clear();
        self.rebuilding.clear();
    }

    /// The partition numbers of `assigned` not checked yet.
    pub fn unchecked(&self, assigned: impl IntoIterator<Item = i32>) -> BTreeSet<i32> {
        assigned
            .into_iter()
            .filter(|p| !self.checked.contains(p))
            .collect()
    }

    pub fn mark_checked(&mut self, partitions: impl IntoIterator<Item = i32>) {
        self.checked.extend(partitions);
    }

    /// Records that these topic-partitions were sought back to their beginning.
    pub fn start(&mut self, partitions: &TopicPartitionList) {
        for e in partitions.elements() {
            self.rebuilding
                .insert((e.topic().to_owned(), e.partition()), None);
        }
    }

    /// Records a stored offset; true when its topic-partition is being rebuilt.
    pub fn stored(&mut self, topic: &str, partition: i32, next_offset: i64) -> bool {
        // The common case, nothing rebuilding, costs no key allocation per partition.
        if self.rebuilding.is_empty() {
            return false;
        }
        match self.rebuilding.get_mut(&(topic.to_owned(), partition)) {
            Some(slot) => {
                *slot = Some(next_offset);
                true
            }
            None => false,
        }
    }

    /// The rebuilding topic-partitions' stored offsets under `epoch`, for an explicit commit.
    pub fn progress(&self, epoch: &str) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &self.rebuilding {
            if let Some(offset) = offset {
                add_with_epoch(&mut tpl, topic, *partition, *offset, epoch);
            }
        }
        tpl
    }
}

/// Adds `topic`/`partition` at `next_offset` with `epoch` as its commit metadata.
pub(crate) fn add_with_epoch(
    tpl: &mut TopicPartitionList,
    topic: &str,
    partition: i32,
    next_offset: i64,
    epoch: &str,
) {
    let mut e = tpl.add_partition(topic, partition);
    // Only a logical offset without a raw value can be refused; this one is concrete.
    if e.set_offset(Offset::Offset(next_offset)).is_ok() {
        e.set_metadata(epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(topic: &str, partition: i32, offset: Option<i64>, epoch: &str) -> Committed {
        Committed {
            topic: topic.into(),
            partition,
            offset,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn a_partition_is_untrusted_when_any_side_was_committed_under_another_epoch() {
        let c = [
            committed("customer", 0, Some(10), "e2"),
            committed("inventory", 0, Some(10), "e2"),
            // Customer side rebuilt under e2, inventory side still e1's progress.
            committed("customer", 1, Some(3), "e2"),
            committed("inventory", 1, Some(900), "e1"),
            // Committed before epochs were recorded.
            committed("customer", 2, Some(5), ""),
            committed("inventory", 2, None, ""),
            // Never committed: nothing to distrust.
            committed("customer", 3, None, ""),
            committed("inventory", 3, None, ""),
        ];
        assert_eq!(untrusted(&c, "e2"), BTreeSet::from([1, 2]));
    }

    #[test]
    fn only_rebuilding_partitions_are_committed_explicitly_with_the_epoch() {
        let mut r = Rebuilds::default();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("customer", 4);
        tpl.add_partition("inventory", 4);
        r.start(&tpl);
        assert!(r.stored("customer", 4, 120));
        assert!(!r.stored("customer", 5, 7), "not rebuilding");
        let progress = r.progress("e2");
        let elems = progress.elements();
        assert_eq!(elems.len(), 1, "inventory 4 stored nothing yet");
        assert_eq!(elems[0].topic(), "customer");
        assert_eq!(elems[0].offset(), Offset::Offset(120));
        assert_eq!(elems[0].metadata(), "e2");
        r.reset();
        assert_eq!(r.progress("e2").count(), 0);
        assert_eq!(r.unchecked([1, 2]), BTreeSet::from([1, 2]));
        r.mark_checked([1]);
        assert_eq!(r.unchecked([1, 2]), BTreeSet::from([2]));
    }
}
