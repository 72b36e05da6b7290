//! Join state: one `MGET` to load a batch's ids, and a commit of two round trips: `WATCH` the
//! batch's fence keys and check they name this worker, then one `MULTI`/`EXEC` that writes the
//! states with one `MSET` and claims each view to deliver. `WATCH` rather than a script: Lua
//! would copy every state (most of a batch's bytes) in and out (docs/performance.md).

use std::collections::HashMap;

use anyhow::Context;
use pipeline_core::metrics::{metrics, timed};
use redis::aio::MultiplexedConnection;
use tokio::sync::MutexGuard;

use crate::join::{JoinSpec, JoinState, StateWrite};

use super::{codec, Claim, Fence, JoinStore};

/// Result of a commit.
#[derive(Debug)]
pub enum Commit {
    /// States written; one claim result per requested key.
    Done(Vec<Claim>),
    /// Another worker took one of the batch's partitions since this one's fence was acquired:
    /// nothing was written and no claim taken.
    Fenced,
}

/// An id's new state, encoded straight into the `MSET` that writes it.
struct StateValue<'a>(&'a StateWrite);

impl redis::ToRedisArgs for StateValue<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        let _ = codec::encode_to(self.0, &mut w);
    }
}

impl JoinStore {
    /// Loads the states of `ids` (the sides of `spec`) and the store's epoch in one round trip.
    pub async fn load(
        &self,
        spec: &JoinSpec,
        ids: &[&str],
    ) -> anyhow::Result<(HashMap<String, JoinState>, Option<String>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(format!("{}epoch", self.prefix));
        if !ids.is_empty() {
            let mget = pipe.cmd("MGET");
            for id in ids {
                mget.arg(self.join_key(id));
            }
        }
        let mut c = self.conn.clone();
        let h = metrics().redis_timer("load");
        let replies: Vec<redis::Value> = timed(&h, pipe.query_async(&mut c))
            .await
            .context("loading join state from Redis")?;
        let mut values = replies.into_iter();
        let epoch: Option<String> =
            redis::from_redis_value(values.next().unwrap_or(redis::Value::Nil))
                .context("reading the store epoch")?;
        let rows: Vec<Option<Vec<u8>>> = match values.next() {
            Some(v) => redis::from_redis_value(v).context("decoding join states")?,
            None => Vec::new(),
        };
        if rows.len() != ids.len() {
            anyhow::bail!(
                "Redis answered {} join states for {} ids",
                rows.len(),
                ids.len()
            );
        }
        let mut out = HashMap::with_capacity(ids.len());
        for (id, row) in ids.iter().zip(rows) {
            let state = match row {
                Some(bytes) => codec::decode(spec, &bytes)
                    .with_context(|| format!("corrupt join state of id {id}"))?,
                None => JoinState::empty(spec.sides.len()),
            };
            out.insert(id.to_string(), state);
        }
        Ok((out, epoch))
    }

    /// Writes `writes` and claims `claim_keys` if `fences` still hold, in two round trips
    /// ([`JoinStore::watch`], then [`Watched::commit`]). Either all of it happens or, when another
    /// worker took one of the partitions, none of it ([`Commit::Fenced`]).
    pub async fn commit(
        &self,
        fences: &[Fence],
        writes: &[StateWrite],
        claim_keys: &[&str],
    ) -> anyhow::Result<Commit> {
        if writes.is_empty() && claim_keys.is_empty() {
            return Ok(Commit::Done(Vec::new()));
        }
        let h = metrics().redis_timer("commit");
        timed(&h, async {
            match self.watch(fences).await? {
                Some(watched) => watched.commit(writes, claim_keys).await,
                None => Ok(Commit::Fenced),
            }
        })
        .await
    }

    /// Starts a commit: `WATCH`es the fence keys on the commit connection and checks that each
    /// still names this worker's holder. `None` when one does not (another worker took the
    /// partition); otherwise the connection stays reserved for [`Watched::commit`], whose `EXEC`
    /// writes nothing if a fence changes in between.
    pub async fn watch(&self, fences: &[Fence]) -> anyhow::Result<Option<Watched<'_>>> {
        let mut conn = self.committer.lock().await;
        let keys: Vec<String> = fences.iter().map(|f| self.fence_key(f.partition)).collect();
        // A commit given up between its two steps left its keys watched: clear them first.
        let mut pipe = redis::pipe();
        pipe.cmd("UNWATCH").ignore();
        if !keys.is_empty() {
            pipe.cmd("WATCH").arg(&keys).ignore();
            pipe.cmd("MGET").arg(&keys);
        }
        let mut replies: Vec<Vec<Option<String>>> = self
            .on_committer(&mut conn, &pipe)
            .await
            .context("reading partition fences")?;
        // No fences: no `MGET` reply, and nothing to check.
        let holders = replies.pop().unwrap_or_default();
        let held = holders.len() == fences.len()
            && fences
                .iter()
                .zip(&holders)
                .all(|(f, h)| h.as_deref() == Some(f.holder.as_str()));
        Ok(held.then_some(Watched { store: self, conn }))
    }
}

/// A commit between its two steps: the batch's fences are watched on the commit connection, and
/// each named this worker when read. Holds the commit connection until [`Watched::commit`].
pub struct Watched<'a> {
    store: &'a JoinStore,
    conn: MutexGuard<'a, Option<MultiplexedConnection>>,
}

impl Watched<'_> {
    /// Writes `writes` with one `MSET` and claims `claim_keys` with
    /// `SET <key> inflight:<token> NX PX <ttl> GET` (whose reply, the previous value, tells
    /// claimed, busy or finished), all in one `MULTI`/`EXEC`. Redis discards the transaction if a
    /// watched fence changed since [`JoinStore::watch`]: then nothing is written or claimed.
    pub async fn commit(
        mut self,
        writes: &[StateWrite],
        claim_keys: &[&str],
    ) -> anyhow::Result<Commit> {
        let store = self.store;
        let mine = format!("inflight:{}", store.token);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !writes.is_empty() {
            let bytes: usize = writes
                .iter()
                .map(|w| store.prefix.len() + w.id.len() + codec::encoded_len(w) + 32)
                .sum();
            let mut mset = redis::Cmd::with_capacity(1 + 2 * writes.len(), bytes + 4);
            mset.arg("MSET");
            for w in writes {
                mset.arg(store.join_key(&w.id)).arg(StateValue(w));
            }
            pipe.add_command(mset).ignore();
        }
        for k in claim_keys {
            pipe.cmd("SET")
                .arg(store.dedup_key(k))
                .arg(&mine)
                .arg("NX")
                .arg("PX")
                .arg(store.claim_ttl_ms)
                .arg("GET");
        }
        let replies: Option<Vec<Option<String>>> = store
            .on_committer(&mut self.conn, &pipe)
            .await
            .context("committing join state to Redis")?;
        let Some(previous) = replies else {
            return Ok(Commit::Fenced);
        };
        if previous.len() != claim_keys.len() {
            anyhow::bail!(
                "Redis answered {} claims for {}",
                previous.len(),
                claim_keys.len()
            );
        }
        let claims = previous
            .into_iter()
            .map(|v| match v {
                None => Claim::Claimed,
                Some(v) if v == mine => Claim::Claimed,
                Some(v) if v.starts_with("inflight:") => Claim::Busy,
                Some(_) => Claim::Finished,
            })
            .collect();
        Ok(Commit::Done(claims))
    }
}
