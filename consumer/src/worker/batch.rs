//! One batch's effects, in order: decode (or skip what is known unchanged), join under the
//! partitions' fences, claim each view's dedup key, deliver, dead-letter, confirm.

use std::collections::{HashMap, HashSet};

use pipeline_core::dlq::{Failure, Stage};
use pipeline_core::failpoint;
use pipeline_core::metrics::metrics;
use pipeline_core::retry::RetryPolicy;
use rdkafka::message::{Message, OwnedHeaders};
use tokio_util::sync::CancellationToken;

use super::{Interrupt, Worker};

use crate::delivery::{Abandoned, Delivery};
use crate::dlq::DlqItem;
use crate::join::{Emission, Input, JoinBatch, JoinState};
use crate::known_state::MAX_SIDES;
use crate::message::decode;
use crate::store::{Claim, Commit, Fence, ViewOutcome};

impl Worker {
    /// Makes every effect of `batch` durable. Outages are retried here; only shutdown ends it early.
    pub(super) async fn process<M: Message + Sync>(
        &self,
        batch: &[M],
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        let mut dead = Vec::new();
        let mut slots = Vec::with_capacity(batch.len());
        for msg in batch {
            let Some(side) = self.spec.side_of(msg.topic()) else {
                continue;
            };
            slots.push(match unparsed(msg, side, self.config.max_record_bytes) {
                Some(slot) => slot,
                None => Slot::Decoded(self.decode(msg, side, &mut dead)),
            });
        }
        let Joined {
            emissions,
            claims,
            side_hashes,
        } = self.join_and_claim(slots, &mut dead, shutdown).await?;
        let mut to_deliver: Vec<&Emission> = Vec::new();
        let mut finished: Vec<&Emission> = Vec::new();
        let mut busy: Vec<&Emission> = Vec::new();
        for (e, c) in emissions.iter().zip(&claims) {
            match c {
                Claim::Claimed => to_deliver.push(e),
                Claim::Finished => finished.push(e),
                Claim::Busy => busy.push(e),
            }
        }
        // Views claimed by another worker (a rebalance moved the partition): wait until that claim
        // is confirmed or expires, then deliver or skip.
        let mut round = 0;
        while !busy.is_empty() {
            if RetryPolicy::default()
                .pause(round.min(6), None, shutdown)
                .await
                .is_err()
            {
                self.release(&to_deliver).await;
                return Err(Interrupt::ShuttingDown);
            }
            round += 1;
            let keys: Vec<&str> = busy.iter().map(|e| e.key.as_str()).collect();
            let Ok(Commit::Done(again)) = self.store.commit(&[], &[], &keys).await else {
                continue;
            };
            let mut still = Vec::new();
            for (e, c) in busy.into_iter().zip(again) {
                match c {
                    Claim::Claimed => to_deliver.push(e),
                    Claim::Finished => finished.push(e),
                    Claim::Busy => still.push(e),
                }
            }
            busy = still;
        }
        metrics().duplicates_skipped(finished.len() as u64);

        if !to_deliver.is_empty() {
            failpoint::hit("after_claim");
        }
        let outcomes = match self.analytics.deliver_all(&to_deliver, shutdown).await {
            Ok(o) => o,
            Err(Abandoned) => {
                self.release(&to_deliver).await;
                return Err(Interrupt::ShuttingDown);
            }
        };
        if !to_deliver.is_empty() {
            failpoint::hit("after_post");
        }
        let mut confirmations: Vec<(&str, &str, ViewOutcome)> =
            Vec::with_capacity(to_deliver.len() + finished.len());
        for (e, outcome) in to_deliver.iter().zip(&outcomes) {
            match outcome {
                Delivery::Delivered => confirmations.push((&e.id, &e.key, ViewOutcome::Delivered)),
                Delivery::Failed { reason, .. } => {
                    tracing::warn!(id = %e.id, key = %e.key, %reason, "merged record sent to the DLQ");
                    dead.push(deliver_failure(e, outcome));
                    confirmations.push((&e.id, &e.key, ViewOutcome::DeadLettered));
                }
            }
        }
        for e in &finished {
            confirmations.push((&e.id, &e.key, ViewOutcome::AlreadyFinished));
        }
        self.dlq
            .write_all(&dead, shutdown)
            .await
            .map_err(Abandoned::from)?;
        self.retry_redis(shutdown, "confirm", || self.store.confirm(&confirmations))
            .await?;
        // Every id the batch touched now has its state written and its view confirmed.
        if let Ok(mut known) = self.known.lock() {
            for (id, hashes) in &side_hashes {
                known.record(id, hashes.iter().map(Option::as_deref));
            }
        }
        Ok(())
    }

    /// Decodes one message, or queues its DLQ item.
    fn decode<M: Message>(&self, msg: &M, side: usize, dead: &mut Vec<DlqItem>) -> Option<Input> {
        let shape = &self.spec.sides[side].shape;
        match decode(msg, side, shape, self.config.max_record_bytes) {
            Ok(i) => Some(i),
            Err(item) => {
                tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), reason = %item.failure.reason, "invalid message sent to the DLQ");
                dead.push(*item);
                None
            }
        }
    }

    /// Loads state, joins and commits with claims; retries lost fences and Redis outages.
    ///
    /// A message whose bytes hash to the side content this worker knows for its id (see
    /// `known_state`) is unchanged (a re-poll, a redelivery) and is dropped unparsed: the
    /// producer publishes canonical JSON, so a re-published record hashes the same. Everything
    /// else is decoded and validated (invalid messages join `dead`) and applied in batch order,
    /// over the states read from Redis under this worker's fences of the batch's partitions.
    async fn join_and_claim<M: Message + Sync>(
        &self,
        slots: Vec<Slot<'_, M>>,
        dead: &mut Vec<DlqItem>,
        shutdown: &CancellationToken,
    ) -> Result<Joined, Interrupt> {
        let cacheable = self.spec.sides.len() <= MAX_SIDES;
        let skip: Vec<bool> = {
            let known = self.known.lock().map_err(|_| Interrupt::ShuttingDown)?;
            slots
                .iter()
                .map(|slot| match slot {
                    // Hash the bytes only for ids whose state is known: unseen ids (the
                    // first cycle) are decoded anyway.
                    Slot::Unparsed { msg, id, side } => {
                        cacheable
                            && known.knows(id)
                            && known.is_unchanged(
                                id,
                                *side,
                                &pipeline_core::canonical::sha256_hex(
                                    msg.payload().unwrap_or_default(),
                                ),
                            )
                    }
                    Slot::Decoded(_) => false,
                })
                .collect()
        };
        let inputs: Vec<Input> = slots
            .into_iter()
            .zip(skip)
            .filter_map(|(slot, skip)| match slot {
                Slot::Decoded(i) => i,
                Slot::Unparsed { .. } if skip => None,
                Slot::Unparsed { msg, side, .. } => self.decode(msg, side, dead),
            })
            .collect();
        let mut seen = HashSet::new();
        let ids: Vec<&str> = inputs
            .iter()
            .map(|i| i.id.as_str())
            .filter(|id| seen.insert(*id))
            .collect();
        let partitions: Vec<i32> = inputs
            .iter()
            .map(|i| i.origin.partition)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        loop {
            // Fences first: the states read after them are the latest until they are lost.
            let fences = self.fences(&partitions, shutdown).await?;
            let (states, epoch) = self.load(&ids, shutdown).await?;
            if epoch.as_deref() != Some(self.epoch().as_str()) {
                return Err(Interrupt::StateLost);
            }
            let mut join = JoinBatch::new(self.spec.clone(), states);
            for i in &inputs {
                join.apply(i);
            }
            let side_hashes = join.side_hashes();
            let (writes, emissions) = join.finish();
            let keys: Vec<&str> = emissions.iter().map(|e| e.key.as_str()).collect();
            match self
                .retry_redis(shutdown, "commit", || {
                    self.store.commit(&fences, &writes, &keys)
                })
                .await?
            {
                Commit::Done(claims) => {
                    metrics().joined(emissions.len() as u64, writes.len() as u64);
                    return Ok(Joined {
                        emissions,
                        claims,
                        side_hashes,
                    });
                }
                Commit::Fenced => {
                    // Another worker took one of these partitions after this one did (a
                    // rebalance this worker has not processed yet, or a batch it still had in
                    // flight across one). Take them again and redo the batch on fresh state;
                    // the rebalance then settles who keeps them.
                    tracing::info!(
                        ?partitions,
                        "a partition's fence moved to another worker; reloading the batch"
                    );
                    self.forget_all();
                    continue;
                }
            }
        }
    }

    /// This worker's fences for `partitions`, acquiring the ones it does not hold yet.
    async fn fences(
        &self,
        partitions: &[i32],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Fence>, Interrupt> {
        let missing: Vec<i32> = {
            let held = self.fences.lock().map_err(|_| Interrupt::ShuttingDown)?;
            partitions
                .iter()
                .copied()
                .filter(|p| !held.contains_key(p))
                .collect()
        };
        // Only when a fence is missing: a call without I/O would still mark Redis ready.
        let acquired = if missing.is_empty() {
            Vec::new()
        } else {
            self.retry_redis(shutdown, "fences", || self.store.acquire_fences(&missing))
                .await?
        };
        let mut held = self.fences.lock().map_err(|_| Interrupt::ShuttingDown)?;
        held.extend(acquired.into_iter().map(|f| (f.partition, f.holder)));
        Ok(partitions
            .iter()
            .filter_map(|&partition| {
                held.get(&partition).map(|holder| Fence {
                    partition,
                    holder: holder.clone(),
                })
            })
            .collect())
    }

    async fn load(
        &self,
        ids: &[&str],
        shutdown: &CancellationToken,
    ) -> Result<(HashMap<String, JoinState>, Option<String>), Interrupt> {
        Ok(self
            .retry_redis(shutdown, "load", || self.store.load(&self.spec, ids))
            .await?)
    }

    async fn release(&self, emissions: &[&Emission]) {
        let keys: Vec<&str> = emissions.iter().map(|e| e.key.as_str()).collect();
        if let Err(e) = self.store.release(&keys).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not release dedup claims; they expire on their own"
            );
        }
    }
}

fn deliver_failure(e: &Emission, outcome: &Delivery) -> DlqItem {
    let (reason, class, status, attempts, first_failure_at) = match outcome {
        Delivery::Failed {
            reason,
            class,
            status,
            attempts,
            first_failure_at,
        } => (
            reason.as_str(),
            *class,
            *status,
            *attempts,
            *first_failure_at,
        ),
        Delivery::Delivered => ("delivered", "none", None, 0, chrono::Utc::now()),
    };
    DlqItem {
        key: Some(e.id.as_bytes().to_vec()),
        value: Some(e.record.get().as_bytes().to_vec()),
        original_headers: OwnedHeaders::new(),
        failure: Failure {
            stage: Stage::Deliver,
            reason: reason.to_owned(),
            error_class: class.to_owned(),
            original_topic: e.origin.topic.clone(),
            original_partition: e.origin.partition,
            original_offset: e.origin.offset,
            attempts,
            http_status: status,
            first_failure_at,
            record_key: Some(e.key.clone()),
        },
    }
}

/// A batch joined and committed: the views it emits, their claims (in the same order), and the
/// side hashes of every id it touched (for `KnownState` once the batch is confirmed).
struct Joined {
    emissions: Vec<Emission>,
    claims: Vec<Claim>,
    side_hashes: Vec<(String, Vec<Option<String>>)>,
}

/// A message of a batch before the join: decoded, or (when it may be an unchanged re-send)
/// kept unparsed.
enum Slot<'a, M> {
    /// Decoded; None when it went to the DLQ.
    Decoded(Option<Input>),
    Unparsed {
        msg: &'a M,
        side: usize,
        /// The message key (the record's id), borrowed from the message.
        id: &'a str,
    },
}

/// The unparsed slot of a message keyed by a UTF-8 id and within the size limit; None when it
/// must be decoded right away.
fn unparsed<M: Message>(msg: &M, side: usize, max_bytes: usize) -> Option<Slot<'_, M>> {
    let id = std::str::from_utf8(msg.key()?)
        .ok()
        .filter(|k| !k.is_empty())?;
    let payload = msg.payload()?;
    if payload.len() > max_bytes {
        return None;
    }
    Some(Slot::Unparsed { msg, side, id })
}
