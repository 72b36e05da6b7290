//! `JoinStore`: join state and dedup keys in Redis, a fixed number of round trips per batch.
//!
//! * `load`: one pipelined `HMGET` per touched id, sent as one round trip.
//! * `commit`: one Lua script that checks every id's revision (optimistic concurrency: a
//!   conflicting writer during a rebalance makes the batch reload and retry), writes the new
//!   states and claims the dedup key of every view to deliver with
//!   `SET dedup:<key> inflight:<token> NX PX <claim-ttl>`.
//! * `confirm`: one Lua script that compare-and-sets each claim to `done` (or `dlq`) with the 24 h
//!   TTL and records the key as delivered in the id's state.
//! * `release`: gives claims back when delivery is abandoned (shutdown), so another worker can
//!   deliver without waiting for the claim to expire.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use pipeline_core::metrics::{metrics, timed};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use crate::join::{JoinSpec, JoinState, SideState, StateWrite};

/// Outcome of claiming one dedup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This worker holds the claim and must deliver.
    Claimed,
    /// Already delivered or dead-lettered: skip.
    Finished,
    /// Another worker holds a live claim: wait for it to finish or expire.
    Busy,
}

/// Final status written to a dedup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    DeadLettered,
}

/// Result of a commit.
#[derive(Debug)]
pub enum Commit {
    /// States written; one claim result per requested key.
    Done(Vec<Claim>),
    /// Some id changed since it was loaded: reload and retry the batch.
    Conflict,
}

/// ARGV: token, claim TTL, number of writes, then per write: expected rev and the number of
/// field/value pairs to set (the new rev included), then the pairs. KEYS: the writes' join
/// hashes, then the dedup keys to claim. Two commands per write, one per claim.
const COMMIT: &str = r#"
local nw = tonumber(ARGV[3])
local starts = {}
local pos = 4
for i = 1, nw do
  local rev = tonumber(redis.call('HGET', KEYS[i], 'rev') or '0')
  if rev ~= tonumber(ARGV[pos]) then return {-1} end
  starts[i] = pos
  pos = pos + 2 + 2 * tonumber(ARGV[pos + 1])
end
for i = 1, nw do
  local p = starts[i]
  local nf = tonumber(ARGV[p + 1])
  redis.call('HSET', KEYS[i], unpack(ARGV, p + 2, p + 1 + 2 * nf))
end
local res = {0}
local mine = 'inflight:' .. ARGV[1]
for j = nw + 1, #KEYS do
  if redis.call('SET', KEYS[j], mine, 'NX', 'PX', ARGV[2]) then
    res[#res + 1] = 1
  else
    local v = redis.call('GET', KEYS[j])
    if v == mine then
      redis.call('PEXPIRE', KEYS[j], ARGV[2])
      res[#res + 1] = 1
    elseif v and string.sub(v, 1, 9) == 'inflight:' then
      res[#res + 1] = 3
    else
      res[#res + 1] = 2
    end
  end
end
return res
"#;

const CONFIRM: &str = r#"
local mine = 'inflight:' .. ARGV[1]
local n = 0
for i = 1, #KEYS, 2 do
  local idx = (i + 1) / 2
  local status = ARGV[2 + (idx - 1) * 2 + 1]
  local key = ARGV[2 + (idx - 1) * 2 + 2]
  local v = redis.call('GET', KEYS[i])
  if v == false or v == mine then
    redis.call('SET', KEYS[i], status, 'EX', ARGV[2])
    n = n + 1
  end
  -- Unconditional: if a newer view already replaced `key`, dk ~= k still marks it
  -- unconfirmed, and a stale dk only makes a confirmed view's claim come back Finished.
  redis.call('HSET', KEYS[i + 1], 'dk', key)
end
return n
"#;

const RELEASE: &str = r#"
local mine = 'inflight:' .. ARGV[1]
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == mine then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"#;

/// Redis-backed join state and dedup keys.
#[derive(Clone)]
pub struct JoinStore {
    conn: ConnectionManager,
    prefix: String,
    token: String,
    claim_ttl_ms: u64,
    dedup_ttl_s: u64,
    commit: Script,
    confirm: Script,
    release: Script,
}

impl JoinStore {
    /// Connects (with reconnects and bounded timeouts) to `url`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        claim_ttl_ms: u64,
        dedup_ttl_s: u64,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("REDIS_URL is not a valid Redis URL")?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            Duration::from_secs(15),
            ConnectionManager::new_with_config(client, cfg),
        )
        .await
        .context("timed out connecting to Redis (REDIS_URL)")?
        .context("connecting to Redis (REDIS_URL)")?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            claim_ttl_ms,
            dedup_ttl_s,
            commit: Script::new(COMMIT),
            confirm: Script::new(CONFIRM),
            release: Script::new(RELEASE),
        })
    }

    fn join_key(&self, id: &str) -> String {
        format!("{}join:{id}", self.prefix)
    }

    fn dedup_key(&self, key: &str) -> String {
        format!("{}dedup:{key}", self.prefix)
    }

    /// Answers PING (readiness probe).
    pub async fn ping(&self) -> bool {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
    }

    /// The store's epoch: a random value written once into an empty Redis. A change (or its
    /// absence) means Redis lost its data (restart without persistence, FLUSHALL, failover to
    /// an empty replica), so the join state must be rebuilt from the topics.
    pub async fn epoch(&self) -> anyhow::Result<String> {
        let key = format!("{}epoch", self.prefix);
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let mut c = self.conn.clone();
        let (current,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(&fresh)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&key)
            .query_async(&mut c)
            .await
            .context("reading the store epoch")?;
        current.context("store epoch vanished while being written")
    }

    fn partition_key(&self, topic: &str, partition: i32) -> String {
        format!("{}partition-epoch:{topic}:{partition}", self.prefix)
    }

    /// The epoch each partition's progress was last (re)built under, one round trip.
    pub async fn partition_marks(
        &self,
        parts: &[(String, i32)],
    ) -> anyhow::Result<Vec<Option<String>>> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = parts
            .iter()
            .map(|(t, p)| self.partition_key(t, *p))
            .collect();
        let mut c = self.conn.clone();
        redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .context("reading partition epochs")
    }

    /// Records that these partitions are (being) rebuilt under `epoch`.
    pub async fn mark_partitions(
        &self,
        parts: &[(String, i32)],
        epoch: &str,
    ) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for (t, p) in parts {
            pipe.cmd("SET")
                .arg(self.partition_key(t, *p))
                .arg(epoch)
                .ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c)
            .await
            .context("writing partition epochs")
    }

    /// Loads the states of `ids` (the sides of `spec`) and the store's epoch in one round trip.
    pub async fn load(
        &self,
        spec: &JoinSpec,
        ids: &[&str],
    ) -> anyhow::Result<(HashMap<String, JoinState>, Option<String>)> {
        const FIXED: [&str; 4] = ["k", "vh", "dk", "rev"];
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(format!("{}epoch", self.prefix));
        for id in ids {
            let cmd = pipe.cmd("HMGET").arg(self.join_key(id)).arg(&FIXED);
            for side in &spec.sides {
                cmd.arg(&side.field);
            }
        }
        let mut c = self.conn.clone();
        let h = metrics().redis_duration.with_label_values(&["load"]);
        let mut values: Vec<redis::Value> = timed(&h, pipe.query_async(&mut c))
            .await
            .context("loading join state from Redis")?;
        if values.is_empty() {
            anyhow::bail!("Redis answered an empty pipeline");
        }
        let rows = values.split_off(1);
        let epoch: Option<String> =
            redis::from_redis_value(values.remove(0)).context("reading the store epoch")?;
        let mut out = HashMap::with_capacity(ids.len());
        for (id, row) in ids.iter().zip(rows) {
            let mut fields: Vec<Option<String>> =
                redis::from_redis_value(row).context("decoding join state")?;
            let sides = fields.split_off(FIXED.len().min(fields.len()));
            let mut fixed = fields.into_iter();
            let mut next = || fixed.next().flatten().unwrap_or_default();
            let (key, view_hash, delivered_key, rev) = (next(), next(), next(), next());
            let sides = sides
                .into_iter()
                .map(|s| match s.filter(|s| !s.is_empty()) {
                    Some(s) => SideState::decode(&s)
                        .map(Some)
                        .with_context(|| format!("corrupt join state of id {id}")),
                    None => Ok(None),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            out.insert(
                id.to_string(),
                JoinState {
                    sides,
                    key,
                    view_hash,
                    delivered_key,
                    rev: rev.parse().unwrap_or(0),
                },
            );
        }
        Ok((out, epoch))
    }

    /// Writes `writes` (if no id changed meanwhile) and claims `claim_keys`, atomically.
    pub async fn commit(
        &self,
        writes: &[StateWrite],
        claim_keys: &[&str],
    ) -> anyhow::Result<Commit> {
        if writes.is_empty() && claim_keys.is_empty() {
            return Ok(Commit::Done(Vec::new()));
        }
        let mut inv = self.commit.prepare_invoke();
        inv.arg(&self.token)
            .arg(self.claim_ttl_ms)
            .arg(writes.len());
        for w in writes {
            inv.key(self.join_key(&w.id));
            inv.arg(w.expected_rev).arg(w.sides.len() + 3);
            for (field, value) in &w.sides {
                inv.arg(field).arg(value);
            }
            inv.arg("k")
                .arg(&w.key)
                .arg("vh")
                .arg(&w.view_hash)
                .arg("rev")
                .arg(w.expected_rev + 1);
        }
        for k in claim_keys {
            inv.key(self.dedup_key(k));
        }
        let mut c = self.conn.clone();
        let h = metrics().redis_duration.with_label_values(&["commit"]);
        let res: Vec<i64> = timed(&h, inv.invoke_async(&mut c))
            .await
            .context("committing join state to Redis")?;
        if res.first() == Some(&-1) {
            return Ok(Commit::Conflict);
        }
        Ok(Commit::Done(
            res.iter()
                .skip(1)
                .map(|r| match r {
                    1 => Claim::Claimed,
                    3 => Claim::Busy,
                    _ => Claim::Finished,
                })
                .collect(),
        ))
    }

    /// Marks claims as delivered / dead-lettered (24 h TTL) and records them in the join state.
    pub async fn confirm(&self, items: &[(&str, &str, Outcome)]) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut inv = self.confirm.prepare_invoke();
        inv.arg(&self.token).arg(self.dedup_ttl_s);
        for (id, key, outcome) in items {
            inv.key(self.dedup_key(key)).key(self.join_key(id));
            inv.arg(match outcome {
                Outcome::Delivered => "done",
                Outcome::DeadLettered => "dlq",
            })
            .arg(*key);
        }
        let mut c = self.conn.clone();
        let h = metrics().redis_duration.with_label_values(&["confirm"]);
        let _: i64 = timed(&h, inv.invoke_async(&mut c))
            .await
            .context("confirming deliveries in Redis")?;
        Ok(())
    }

    /// The dedup status (`done`, `dlq`, `inflight:<token>`) of each key, one round trip.
    pub async fn dedup_status(&self, keys: &[&str]) -> anyhow::Result<Vec<Option<String>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let full: Vec<String> = keys.iter().map(|k| self.dedup_key(k)).collect();
        let mut c = self.conn.clone();
        redis::cmd("MGET")
            .arg(&full)
            .query_async(&mut c)
            .await
            .context("reading dedup keys")
    }

    /// Marks keys delivered outright (a DLQ replay that Analytics acknowledged).
    pub async fn mark_delivered(&self, keys: &[&str]) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("SET")
                .arg(self.dedup_key(k))
                .arg("done")
                .arg("EX")
                .arg(self.dedup_ttl_s)
                .ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c)
            .await
            .context("marking replayed keys delivered")
    }

    /// Releases this worker's claims on `keys`.
    pub async fn release(&self, keys: &[&str]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut inv = self.release.prepare_invoke();
        inv.arg(&self.token);
        for k in keys {
            inv.key(self.dedup_key(k));
        }
        let mut c = self.conn.clone();
        let _: i64 = inv
            .invoke_async(&mut c)
            .await
            .context("releasing dedup claims")?;
        Ok(())
    }
}
