//! `JoinStore`: the consumer's whole Redis layout, with a fixed number of round trips per batch.
//!
//! Keys, all under `REDIS_KEY_PREFIX`: `join:<id>` (an id's join state, byte format in `codec`),
//! `dedup:<key>` (a view's claim: `inflight:<token>`, then `done` or `dlq`; `dedup`),
//! `fence:<partition>` (the partition's current writer; `fence`), `epoch` (which Redis the
//! state was built in; `epoch`). `state` loads and commits join state under the fences.
//! Lua runs only where atomicity is needed and the arguments are small.

#[cfg(test)]
mod against_redis;
pub mod codec;
mod dedup;
mod epoch;
mod fence;
mod state;

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Script};
use tokio::sync::Mutex;

pub use dedup::{Claim, ViewOutcome};
pub use fence::Fence;
pub use state::Commit;

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
            confirm_dead: Script::new(dedup::CONFIRM_DEAD),
            release: Script::new(dedup::RELEASE),
        })
    }

    fn join_key<'a>(&'a self, id: &'a str) -> StoreKey<'a> {
        StoreKey {
            prefix: &self.prefix,
            kind: "join:",
            name: id,
        }
    }

    fn dedup_key<'a>(&'a self, key: &'a str) -> StoreKey<'a> {
        StoreKey {
            prefix: &self.prefix,
            kind: "dedup:",
            name: key,
        }
    }

    fn fence_key(&self, partition: i32) -> String {
        format!("{}fence:{partition}", self.prefix)
    }

    /// Answers PING (the tests wait on it after a Redis restart).
    #[cfg(test)]
    pub async fn ping(&self) -> bool {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
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
