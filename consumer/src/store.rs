//! `JoinStore`: join state and dedup keys in Redis, a fixed number of round trips per batch.
//!
//! * `load`: one `MGET` of the touched ids' states (see `stored_state` for their form) with the
//!   store's epoch, one round trip.
//! * `commit`: two round trips on a connection of its own: `WATCH` the fence keys of the batch's
//!   partitions and read them; then, if they still name this worker, one `MULTI`/`EXEC` that
//!   writes the new states with one native `MSET` and claims each view to deliver with
//!   `SET dedup:<key> inflight:<token> NX PX <claim-ttl> GET`. `EXEC` does nothing if a fence
//!   changed after it was read.
//! * Fencing instead of a per-id compare-and-set: an id's state is only ever written through its
//!   partition (both topics are co-partitioned), and a partition has one owner at a time. A
//!   worker takes a partition by writing a fresh random holder into its fence key
//!   (`SET fence:<partition> <holder>`) before it first loads that partition's state; its
//!   writes then land only while the fence still names it. So the state it loaded is the latest
//!   (nobody else wrote since), and a former owner's late batch is refused whole (states and
//!   claims) instead of overwriting.
//! * Why `WATCH` and not a script: inside Lua every argument is copied into a Lua string and back,
//!   and the states are most of a batch's bytes. With 2,000 states of 700 bytes a batch, Redis
//!   spent 5.2–5.6 µs of CPU per state in the fence-checking script against 2.8–3.2 µs with
//!   `WATCH` + `MULTI`/`MSET`/`EXEC`, and Redis is the bottleneck of the whole pipeline.
//! * `confirm`: one pipelined round trip: `SET dedup:<key> done EX 86400` per delivered view and
//!   the key recorded as delivered in the id's state in place (`SETRANGE`); a dead-lettered
//!   view's claim is compare-and-set to `dlq` by a script.
//! * `release`: gives claims back when delivery is abandoned (shutdown), so another worker can
//!   deliver without waiting for the claim to expire.
//!
//! Lua runs only where atomicity is needed and the arguments are small.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use pipeline_core::metrics::{metrics, timed};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Script};
use tokio::sync::{Mutex, MutexGuard};

use crate::join::{JoinSpec, JoinState, StateWrite};
use crate::stored_state;

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

/// What became of a view this batch emitted, as recorded by [`JoinStore::confirm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Analytics acknowledged it: its dedup key becomes `done`.
    Delivered,
    /// It went to the DLQ: its dedup key becomes `dlq` unless someone delivered it meanwhile.
    DeadLettered,
    /// Its dedup key was already final (another worker's delivery): only the id's state learns.
    AlreadyFinished,
}

/// Result of a commit.
#[derive(Debug)]
pub enum Commit {
    /// States written; one claim result per requested key.
    Done(Vec<Claim>),
    /// Another worker took one of the batch's partitions since this one's fence was acquired:
    /// nothing was written and no claim taken.
    Fenced,
}

/// This worker's hold on a partition's join state: a random holder id it wrote into the
/// partition's fence key. Writes carry it, and a worker assigned the partition later writes its
/// own, so a former owner's writes (a batch still in flight across a rebalance) are refused. A
/// random id, not a counter: a counter restarts when Redis loses its data, and a stale holder
/// could then match again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub partition: i32,
    pub holder: String,
}

/// Dead-lettered views: compare-and-set the claim to `dlq` (a view another worker delivered
/// meanwhile stays `done`) and record the key in the id's state.
const CONFIRM_DEAD: &str = r#"
local mine = 'inflight:' .. ARGV[1]
for i = 1, #KEYS, 2 do
  local v = redis.call('GET', KEYS[i])
  if v == false or v == mine then
    redis.call('SET', KEYS[i], 'dlq', 'EX', ARGV[2])
  end
  redis.call('SETRANGE', KEYS[i + 1], ARGV[3], ARGV[3 + (i + 1) / 2])
end
return 0
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

/// A key of this store, `<prefix><kind><name>`, written straight into the command that uses it
/// (no `String` per key: a batch names thousands).
struct StoreKey<'a> {
    prefix: &'a str,
    kind: &'static str,
    name: &'a str,
}

impl redis::ToRedisArgs for StoreKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        // A command's buffer is a Vec: writing to it cannot fail.
        let _ = w.write_all(self.prefix.as_bytes());
        let _ = w.write_all(self.kind.as_bytes());
        let _ = w.write_all(self.name.as_bytes());
    }
}

/// An id's new state, encoded straight into the `MSET` that writes it.
struct StateValue<'a>(&'a StateWrite);

impl redis::ToRedisArgs for StateValue<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        let _ = stored_state::encode_to(self.0, &mut w);
    }
}

/// A delivered key as the state's fixed-width slot ([`stored_state::dk_field`]).
struct DkField<'a>(&'a str);

impl redis::ToRedisArgs for DkField<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        let _ = stored_state::write_dk_field(&mut w, self.0);
    }
}

/// Claims use `SET ... NX ... GET`, which Redis accepts from 7.0 on: an older server would fail
/// every batch, so it is refused at start-up instead.
fn check_version(info: &str) -> anyhow::Result<()> {
    let Some(version) = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
    else {
        return Ok(());
    };
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 7 {
        anyhow::bail!("REDIS_URL: Redis 7.0 or newer is required, the server reports {version}");
    }
    Ok(())
}

/// Redis-backed join state and dedup keys.
#[derive(Clone)]
pub struct JoinStore {
    conn: ConnectionManager,
    /// The connection commits run on, one at a time. `WATCH` lives on a connection until `EXEC`,
    /// so nothing else may run on it in between (another `EXEC` would clear it), and it must
    /// never be replaced unnoticed: a reconnected connection watches nothing, and its `EXEC`
    /// would write unguarded. So it is not the `ConnectionManager` (which reconnects
    /// transparently) but a plain connection, opened on first use and dropped on any error.
    committer: std::sync::Arc<Mutex<Option<MultiplexedConnection>>>,
    client: redis::Client,
    prefix: String,
    token: String,
    claim_ttl_ms: u64,
    dedup_ttl_s: u64,
    confirm_dead: Script,
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
            ConnectionManager::new_with_config(client.clone(), cfg),
        )
        .await
        .context("timed out connecting to Redis (REDIS_URL)")?
        .context("connecting to Redis (REDIS_URL)")?;
        let mut probe = conn.clone();
        // An ACL user may not be allowed `INFO`: then the version goes unchecked.
        match redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut probe)
            .await
        {
            Ok(info) => check_version(&info)?,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the Redis version (7.0 or newer is required)")
            }
        }
        Ok(Self {
            conn,
            committer: std::sync::Arc::default(),
            client,
            prefix: prefix.to_owned(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            claim_ttl_ms,
            dedup_ttl_s,
            confirm_dead: Script::new(CONFIRM_DEAD),
            release: Script::new(RELEASE),
        })
    }

    fn join_key<'a>(&'a self, id: &'a str) -> StoreKey<'a> {
        StoreKey {
            prefix: &self.prefix,
            kind: "join:",
            name: id,
        }
    }

    fn fence_key(&self, partition: i32) -> String {
        format!("{}fence:{partition}", self.prefix)
    }

    /// Takes `partitions` for this worker: a fresh holder id into each fence key, one round trip.
    pub async fn acquire_fences(&self, partitions: &[i32]) -> anyhow::Result<Vec<Fence>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let fences: Vec<Fence> = partitions
            .iter()
            .map(|&partition| Fence {
                partition,
                holder: uuid::Uuid::new_v4().simple().to_string(),
            })
            .collect();
        let mut pipe = redis::pipe();
        for f in &fences {
            pipe.cmd("SET")
                .arg(self.fence_key(f.partition))
                .arg(&f.holder)
                .ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c)
            .await
            .context("acquiring partition fences")?;
        Ok(fences)
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
        let h = metrics().redis_duration.with_label_values(&["load"]);
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
                Some(bytes) => stored_state::decode(spec, &bytes)
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
        let h = metrics().redis_duration.with_label_values(&["commit"]);
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

    /// Runs `pipe` on the commit connection, opening it if there is none. Any error drops the
    /// connection: the next commit starts on a fresh one, with nothing watched.
    async fn on_committer<T: redis::FromRedisValue>(
        &self,
        conn: &mut Option<MultiplexedConnection>,
        pipe: &redis::Pipeline,
    ) -> anyhow::Result<T> {
        let c = match conn {
            Some(c) => c,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(5)));
                let opened = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .context("connecting to Redis for commits (REDIS_URL)")?;
                conn.insert(opened)
            }
        };
        let result = pipe.query_async(c).await;
        if result.is_err() {
            *conn = None;
        }
        Ok(result?)
    }

    fn dedup_key<'a>(&'a self, key: &'a str) -> StoreKey<'a> {
        StoreKey {
            prefix: &self.prefix,
            kind: "dedup:",
            name: key,
        }
    }

    /// Records what became of views (24 h TTL on their dedup keys) and the key in each id's
    /// state, one round trip. A delivered view's key is set to `done` outright: whoever held the
    /// claim, the view is at Analytics. Only dead-lettered ones need a compare-and-set (script).
    pub async fn confirm(&self, items: &[(&str, &str, Outcome)]) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut dead = self.confirm_dead.prepare_invoke();
        dead.arg(&self.token)
            .arg(self.dedup_ttl_s)
            .arg(stored_state::DK_OFFSET);
        let mut any_dead = false;
        for (id, key, outcome) in items {
            match outcome {
                Outcome::Delivered => {
                    pipe.cmd("SET")
                        .arg(self.dedup_key(key))
                        .arg("done")
                        .arg("EX")
                        .arg(self.dedup_ttl_s)
                        .ignore();
                }
                Outcome::AlreadyFinished => {}
                Outcome::DeadLettered => {
                    dead.key(self.dedup_key(key))
                        .key(self.join_key(id))
                        .arg(DkField(key));
                    any_dead = true;
                    continue;
                }
            }
            pipe.cmd("SETRANGE")
                .arg(self.join_key(id))
                .arg(stored_state::DK_OFFSET)
                .arg(DkField(key))
                .ignore();
        }
        if any_dead {
            pipe.invoke_script(&dead).ignore();
        }
        let h = metrics().redis_duration.with_label_values(&["confirm"]);
        timed(&h, self.query_scripted(&pipe))
            .await
            .context("confirming deliveries in Redis")?;
        Ok(())
    }

    /// Runs `pipe`; if Redis does not know one of this store's scripts (a restart emptied its
    /// script cache), loads them and runs it once more. Every command sent this way is safe to
    /// repeat.
    async fn query_scripted(
        &self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        let mut c = self.conn.clone();
        match pipe.query_async(&mut c).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.confirm_dead
                    .prepare_invoke()
                    .load_async(&mut c)
                    .await?;
                pipe.query_async(&mut c).await
            }
            other => other,
        }
    }

    /// The dedup status (`done`, `dlq`, `inflight:<token>`) of each key, one round trip.
    pub async fn dedup_status(&self, keys: &[&str]) -> anyhow::Result<Vec<Option<String>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for k in keys {
            mget.arg(self.dedup_key(k));
        }
        let mut c = self.conn.clone();
        mget.query_async(&mut c).await.context("reading dedup keys")
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
                .map(|w| store.prefix.len() + w.id.len() + stored_state::encoded_len(w) + 32)
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

#[cfg(test)]
mod tests {
    use super::check_version;

    #[test]
    fn redis_older_than_7_is_refused_naming_the_setting() {
        assert!(
            check_version("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n").is_ok()
        );
        assert!(check_version("redis_version:8.2.1\r\n").is_ok());
        let err = check_version("redis_version:6.2.14\r\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("REDIS_URL") && err.contains("6.2.14"), "{err}");
        assert!(
            check_version("no version here").is_ok(),
            "unknown is not refused"
        );
    }
}
