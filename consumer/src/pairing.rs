//! Lines up the co-partitioned topics before a batch is cut, so both sides of an id tend to be
//! joined in the same batch (one Redis write per id instead of two; docs/performance.md).
//!
//! One queue per (partition, side); a partition's messages are released up to its *frontier*,
//! the oldest of its sides' newest timestamps, as Kafka Streams synchronises a task's
//! partitions by stream time. Releases are whole prefixes of each queue, so per-partition order
//! and the contiguous offsets the worker stores are kept: which messages wait changes how much
//! is written, never what. A side that runs far ahead is paused by the worker (`runs_ahead`).
//!
//! Buffered messages are not processed and their offsets not stored: they are dropped
//! (`drop_partitions`) only for partitions revoked or sought back, which are fetched again.

use std::collections::{BTreeMap, VecDeque};

use rdkafka::Message;

/// Messages received but not yet handed to a batch.
pub struct PairingBuffer<M> {
    sides: usize,
    /// Partition → one queue per side, in arrival (= offset) order.
    queues: BTreeMap<i32, Vec<VecDeque<M>>>,
    /// Messages of topics that are not a side: released with the next batch.
    other: Vec<M>,
    len: usize,
    /// Where the next release starts (rotates over the partitions).
    next_start: i32,
}

impl<M: Message> PairingBuffer<M> {
    /// A buffer for a join of `sides` topics.
    pub fn new(sides: usize) -> Self {
        Self {
            sides: sides.max(1),
            queues: BTreeMap::new(),
            other: Vec::new(),
            len: 0,
            next_start: 0,
        }
    }

    /// Messages buffered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buffers `msg`, which came from side `side` (None: a topic the join does not read).
    pub fn push(&mut self, msg: M, side: Option<usize>) {
        self.len += 1;
        match side.filter(|s| *s < self.sides) {
            Some(s) => {
                let sides = self.sides;
                self.queues
                    .entry(msg.partition())
                    .or_insert_with(|| (0..sides).map(|_| VecDeque::new()).collect())[s]
                    .push_back(msg);
            }
            None => self.other.push(msg),
        }
    }

    /// Messages buffered for side `side` of `partition`.
    pub fn queue_len(&self, partition: i32, side: usize) -> usize {
        self.queues
            .get(&partition)
            .and_then(|q| q.get(side))
            .map_or(0, VecDeque::len)
    }

    /// True when side `side` of `partition` holds at least `limit` messages while another side
    /// of it holds under a quarter of that: the fetch of this side runs ahead of the other's,
    /// and buffering more of it only grows what waits (see `Worker::buffer`).
    pub fn runs_ahead(&self, partition: i32, side: usize, limit: usize) -> bool {
        let Some(queues) = self.queues.get(&partition) else {
            return false;
        };
        queues.get(side).is_some_and(|q| q.len() >= limit)
            && queues
                .iter()
                .enumerate()
                .any(|(s, q)| s != side && q.len() < limit / 4)
    }

    /// How many messages `take_paired` would release now.
    pub fn paired_len(&self) -> usize {
        self.other.len()
            + self
                .queues
                .values()
                .filter_map(|queues| {
                    let f = frontier(queues)?;
                    Some(
                        queues
                            .iter()
                            .map(|q| q.iter().take_while(|m| timestamp(*m) <= f).count())
                            .sum::<usize>(),
                    )
                })
                .sum::<usize>()
    }

    /// Releases, for every partition whose sides all have messages buffered, each side's
    /// messages up to the partition's frontier (the oldest of the sides' newest timestamps).
    /// A partition with a side still empty releases nothing. Stops after the partition that
    /// reaches `limit` messages; the next call starts after it, so none waits forever.
    pub fn take_paired(&mut self, limit: usize) -> Vec<M> {
        self.take(limit, true)
    }

    /// Releases whole partitions (every side's queue, in order) until `limit` messages, in the
    /// same rotation as `take_paired`.
    pub fn take_any(&mut self, limit: usize) -> Vec<M> {
        self.take(limit, false)
    }

    fn take(&mut self, limit: usize, paired_only: bool) -> Vec<M> {
        let mut out = std::mem::take(&mut self.other);
        let order: Vec<i32> = self
            .queues
            .range(self.next_start..)
            .chain(self.queues.range(..self.next_start))
            .map(|(p, _)| *p)
            .collect();
        for p in order {
            if out.len() >= limit {
                break;
            }
            let Some(queues) = self.queues.get_mut(&p) else {
                continue;
            };
            let f = if paired_only {
                match frontier(queues) {
                    Some(f) => f,
                    None => continue,
                }
            } else {
                i64::MAX
            };
            // The sides interleaved by timestamp, each in its own order: a batch then applies an
            // id's changes in the order they were published, so a rebuild after a Redis loss
            // passes through the same views (and keys) as the first time.
            while let Some(side) = queues
                .iter()
                .enumerate()
                .filter_map(|(i, q)| Some((i, timestamp(q.front()?))))
                .filter(|&(_, t)| t <= f)
                .min_by_key(|&(i, t)| (t, i))
                .map(|(i, _)| i)
            {
                out.extend(queues[side].pop_front());
            }
            self.next_start = p.saturating_add(1);
        }
        self.len -= out.len();
        self.queues.retain(|_, q| q.iter().any(|s| !s.is_empty()));
        out
    }

    /// Drops the buffered messages of `topic`/`partition` pairs (revoked or sought back).
    pub fn drop_partitions(&mut self, dropped: &[(String, i32)]) {
        if dropped.is_empty() || self.is_empty() {
            return;
        }
        let gone = |m: &M| {
            dropped
                .iter()
                .any(|(t, p)| *p == m.partition() && t == m.topic())
        };
        for queues in self.queues.values_mut() {
            for q in queues.iter_mut() {
                q.retain(|m| !gone(m));
            }
        }
        self.other.retain(|m| !gone(m));
        self.queues.retain(|_, q| q.iter().any(|s| !s.is_empty()));
        self.len = self.other.len()
            + self
                .queues
                .values()
                .flat_map(|q| q.iter().map(VecDeque::len))
                .sum::<usize>();
    }
}

/// The oldest of a partition's sides' newest timestamps; None while a side has nothing.
fn frontier<M: Message>(queues: &[VecDeque<M>]) -> Option<i64> {
    queues
        .iter()
        .map(|q| q.back().map(timestamp))
        .try_fold(i64::MAX, |f, newest| newest.map(|n| f.min(n)))
}

/// A message's timestamp in ms; one without (pre-0.10 formats) sorts first.
fn timestamp<M: Message>(m: &M) -> i64 {
    m.timestamp().to_millis().unwrap_or(i64::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn msg(topic: &str, partition: i32, offset: i64, ts: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(offset.to_string().into_bytes()),
            topic.to_owned(),
            Timestamp::CreateTime(ts),
            partition,
            offset,
            None,
        )
    }

    fn side(topic: &str) -> Option<usize> {
        match topic {
            "c" => Some(0),
            "i" => Some(1),
            _ => None,
        }
    }

    fn push(b: &mut PairingBuffer<OwnedMessage>, m: OwnedMessage) {
        let s = side(m.topic());
        b.push(m, s);
    }

    fn ids(ms: &[OwnedMessage]) -> Vec<(String, i32, i64)> {
        ms.iter()
            .map(|m| (m.topic().to_owned(), m.partition(), m.offset()))
            .collect()
    }

    #[test]
    fn a_partition_is_released_up_to_the_older_of_its_sides_newest_timestamps() {
        let mut b = PairingBuffer::new(2);
        for (o, ts) in [(0, 10), (1, 20), (2, 30), (3, 40)] {
            push(&mut b, msg("c", 3, o, ts));
        }
        for (o, ts) in [(0, 11), (1, 21)] {
            push(&mut b, msg("i", 3, o, ts));
        }
        assert_eq!(b.paired_len(), 4);
        let out = b.take_paired(usize::MAX);
        assert_eq!(
            ids(&out),
            vec![
                ("c".into(), 3, 0),
                ("i".into(), 3, 0),
                ("c".into(), 3, 1),
                ("i".into(), 3, 1)
            ],
            "the sides interleaved by timestamp"
        );
        assert_eq!(b.len(), 2, "customers past the frontier wait");
        push(&mut b, msg("i", 3, 2, 45));
        let out = b.take_paired(usize::MAX);
        assert_eq!(
            ids(&out),
            vec![("c".into(), 3, 2), ("c".into(), 3, 3)],
            "the customers caught up to 40; the product of 45 waits for a customer"
        );
        assert_eq!(b.paired_len(), 0);
        assert_eq!(ids(&b.take_any(usize::MAX)), vec![("i".into(), 3, 2)]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_partition_with_an_empty_side_waits_until_everything_is_taken() {
        let mut b = PairingBuffer::new(2);
        push(&mut b, msg("c", 1, 0, 10));
        push(&mut b, msg("c", 1, 1, 10));
        push(&mut b, msg("x", 1, 7, 10));
        let out = b.take_paired(usize::MAX);
        assert_eq!(
            ids(&out),
            vec![("x".into(), 1, 7)],
            "other topics never wait"
        );
        assert_eq!(b.len(), 2);
        let out = b.take_any(usize::MAX);
        assert_eq!(ids(&out), vec![("c".into(), 1, 0), ("c".into(), 1, 1)]);
        assert!(b.is_empty());
        assert!(b.take_paired(usize::MAX).is_empty());
    }

    #[test]
    fn releases_are_prefixes_so_offsets_stay_in_order_per_partition() {
        let mut b = PairingBuffer::new(2);
        // An out-of-order timestamp stops the release at it, even if later ones are older.
        push(&mut b, msg("c", 0, 0, 10));
        push(&mut b, msg("c", 0, 1, 50));
        push(&mut b, msg("c", 0, 2, 20));
        push(&mut b, msg("i", 0, 0, 15));
        push(&mut b, msg("i", 0, 1, 60));
        // Frontier: min(newest customer 20, newest product 60) = 20.
        assert_eq!(b.paired_len(), 2);
        let out = b.take_paired(usize::MAX);
        assert_eq!(
            ids(&out),
            vec![("c".into(), 0, 0), ("i".into(), 0, 0)],
            "customer 2 (ts 20) stays behind customer 1 (ts 50)"
        );
        let rest = b.take_any(usize::MAX);
        assert_eq!(
            ids(&rest),
            vec![("c".into(), 0, 1), ("c".into(), 0, 2), ("i".into(), 0, 1)]
        );
    }

    #[test]
    fn dropped_partitions_leave_the_others_untouched() {
        let mut b = PairingBuffer::new(2);
        push(&mut b, msg("c", 0, 0, 10));
        push(&mut b, msg("i", 0, 0, 10));
        push(&mut b, msg("c", 1, 0, 10));
        push(&mut b, msg("i", 1, 0, 10));
        b.drop_partitions(&[("c".into(), 0), ("i".into(), 1)]);
        assert_eq!(b.len(), 2);
        let out = b.take_any(usize::MAX);
        assert_eq!(ids(&out), vec![("i".into(), 0, 0), ("c".into(), 1, 0)]);
        push(&mut b, msg("c", 2, 0, 10));
        b.drop_partitions(&[("c".into(), 2)]);
        assert!(b.is_empty());
        assert!(b.take_any(usize::MAX).is_empty());
    }

    #[test]
    fn a_limited_release_rotates_over_the_partitions() {
        let mut b = PairingBuffer::new(2);
        for p in 0..3 {
            for o in 0..2 {
                push(&mut b, msg("c", p, o, 10));
                push(&mut b, msg("i", p, o, 10));
            }
        }
        let parts = |ms: &[OwnedMessage]| {
            let mut p: Vec<i32> = ms.iter().map(|m| m.partition()).collect();
            p.dedup();
            p
        };
        let first = b.take_paired(3);
        assert_eq!(
            first.len(),
            4,
            "whole partitions: the limit is passed by one partition"
        );
        assert_eq!(parts(&first), vec![0]);
        assert_eq!(parts(&b.take_any(1)), vec![1]);
        assert_eq!(parts(&b.take_paired(1)), vec![2]);
        push(&mut b, msg("c", 0, 2, 10));
        push(&mut b, msg("c", 2, 2, 10));
        assert_eq!(
            parts(&b.take_any(1)),
            vec![0],
            "after the last partition, round again"
        );
        assert_eq!(parts(&b.take_any(1)), vec![2]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_side_runs_ahead_when_it_holds_the_limit_and_another_side_under_a_quarter_of_it() {
        let mut b = PairingBuffer::new(2);
        for o in 0..8 {
            b.push(msg("c", 0, o, o), side("c"));
        }
        assert_eq!((b.queue_len(0, 0), b.queue_len(0, 1)), (8, 0));
        assert!(b.runs_ahead(0, 0, 8), "8 buffered against none");
        assert!(!b.runs_ahead(0, 0, 9), "under the limit");
        assert!(!b.runs_ahead(0, 1, 8), "the empty side is not ahead");
        assert!(!b.runs_ahead(1, 0, 1), "a partition with nothing buffered");
        for o in 0..2 {
            b.push(msg("i", 0, o, o), side("i"));
        }
        assert!(
            !b.runs_ahead(0, 0, 8),
            "the other side holds a quarter of the limit"
        );
        b.take_any(100);
        assert_eq!((b.queue_len(0, 0), b.queue_len(0, 1)), (0, 0));
    }
}
