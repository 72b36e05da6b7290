//! Dedup claims: a view's key is claimed (`inflight:<token>`) in the commit, then confirmed
//! `done` (24 h TTL) or `dlq` once delivered or dead-lettered, and its key recorded in the id's
//! state in place (`SETRANGE`); claims of an abandoned delivery are released.

use anyhow::Context;
use pipeline_core::metrics::{metrics, timed};

use super::{codec, JoinStore};

/// The result of claiming one dedup key.
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
pub enum ViewOutcome {
    /// Analytics acknowledged it: its dedup key becomes `done`.
    Delivered,
    /// It went to the DLQ: its dedup key becomes `dlq` unless someone delivered it meanwhile.
    DeadLettered,
    /// Its dedup key was already final (another worker's delivery): only the id's state learns.
    AlreadyFinished,
}

/// Dead-lettered views: compare-and-set the claim to `dlq` (a view another worker delivered
/// meanwhile stays `done`) and record the key in the id's state.
pub(super) const CONFIRM_DEAD: &str = r#"
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

pub(super) const RELEASE: &str = r#"
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

/// A delivered key as the state's fixed-width slot ([`codec::dk_field`]).
struct DkField<'a>(&'a str);

impl redis::ToRedisArgs for DkField<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut w = out.writer_for_next_arg();
        let _ = codec::write_dk_field(&mut w, self.0);
    }
}

impl JoinStore {
    /// Records what became of views (24 h TTL on their dedup keys) and the key in each id's
    /// state, one round trip. A delivered view's key is set to `done` outright: whoever held the
    /// claim, the view is at Analytics. Only dead-lettered ones need a compare-and-set (script).
    pub async fn confirm(&self, items: &[(&str, &str, ViewOutcome)]) -> anyhow::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut dead = self.confirm_dead.prepare_invoke();
        dead.arg(&self.token)
            .arg(self.dedup_ttl_s)
            .arg(codec::DK_OFFSET);
        let mut any_dead = false;
        for (id, key, outcome) in items {
            match outcome {
                ViewOutcome::Delivered => {
                    pipe.cmd("SET")
                        .arg(self.dedup_key(key))
                        .arg("done")
                        .arg("EX")
                        .arg(self.dedup_ttl_s)
                        .ignore();
                }
                ViewOutcome::AlreadyFinished => {}
                ViewOutcome::DeadLettered => {
                    dead.key(self.dedup_key(key))
                        .key(self.join_key(id))
                        .arg(DkField(key));
                    any_dead = true;
                    continue;
                }
            }
            pipe.cmd("SETRANGE")
                .arg(self.join_key(id))
                .arg(codec::DK_OFFSET)
                .arg(DkField(key))
                .ignore();
        }
        if any_dead {
            pipe.invoke_script(&dead).ignore();
        }
        let h = metrics().redis_timer("confirm");
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
