//! Fences: one writer per partition. A worker takes a partition by writing a fresh random
//! holder into its fence key before it first loads that partition's state; its commits land
//! only while the fence still names it, so a former owner's late batch is refused whole.

use anyhow::Context;

use super::JoinStore;

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

impl JoinStore {
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
}
