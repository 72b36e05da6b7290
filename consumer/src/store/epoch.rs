//! The store epoch: which Redis the join state was built in. A change means Redis lost its data
//! and the state must be rebuilt from the topics (see `recovery`).

use anyhow::Context;

use super::JoinStore;

impl JoinStore {
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
}
