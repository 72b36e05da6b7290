//! `JoinStore` against a real `redis-server`: the claim/confirm protocol between two workers,
//! partition fencing of state writes (checked before a commit and, by `WATCH`, during it), and
//! recovery from an emptied script cache and from a restarted Redis.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use crate::join::{JoinSpec, JoinState, SideState, StateWrite};
use crate::store::{Claim, Commit, JoinStore, ViewOutcome};
use pipeline_kit::redis_server::RedisServer;

const CLAIM_TTL_MS: u64 = 60_000;
const DEDUP_TTL_S: u64 = 86_400;

async fn store(redis: &RedisServer) -> JoinStore {
    JoinStore::connect(&redis.url(), "t:", CLAIM_TTL_MS, DEDUP_TTL_S)
        .await
        .expect("connect to redis")
}

async fn get(redis: &RedisServer, key: &str) -> Option<String> {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("GET")
}

fn spec() -> JoinSpec {
    JoinSpec::of_required(&["customer", "inventory"])
}

/// The state of `id` as a worker loads it.
async fn state(store: &JoinStore, id: &str) -> JoinState {
    let (mut states, _) = store.load(&spec(), &[id]).await.expect("load");
    states.remove(id).expect("a state per id asked for")
}

fn write(id: &str, read_rev: i64, key: &str) -> StateWrite {
    StateWrite {
        id: id.to_owned(),
        read_rev,
        sides: vec![(
            "s:customer".to_owned(),
            SideState {
                updated_at_ms: 1,
                offset: read_rev,
                hash: "h".repeat(64),
                record: format!("{{\"id\":\"{id}\"}}").into(),
            },
        )],
        key: key.to_owned(),
        view_hash: format!("vh-{key}"),
        delivered_key: String::new(),
    }
}

fn claims(commit: Commit) -> Vec<Claim> {
    match commit {
        Commit::Done(c) => c,
        Commit::Fenced => panic!("unexpectedly fenced"),
    }
}

/// Asserts that a commit was refused by a fence.
fn fenced(commit: Commit) {
    assert!(matches!(commit, Commit::Fenced), "not fenced: {commit:?}");
}

#[tokio::test]
async fn a_claim_is_busy_for_others_until_confirmed_then_finished() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);
    let fa = a.acquire_fences(&[0]).await.unwrap();

    let first = claims(
        a.commit(&fa, &[write("1", 0, "k1")], &["k1"])
            .await
            .unwrap(),
    );
    assert_eq!(first, vec![Claim::Claimed]);
    // The same worker claiming again (a retried batch) still holds it.
    assert_eq!(
        claims(a.commit(&[], &[], &["k1"]).await.unwrap()),
        vec![Claim::Claimed]
    );
    assert_eq!(
        claims(b.commit(&[], &[], &["k1"]).await.unwrap()),
        vec![Claim::Busy]
    );
    let inflight = get(&redis, "t:dedup:k1").await.expect("claim written");
    assert!(inflight.starts_with("inflight:"), "{inflight}");

    a.confirm(&[("1", "k1", ViewOutcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k1").await.as_deref(), Some("done"));
    assert_eq!(
        claims(b.commit(&[], &[], &["k1"]).await.unwrap()),
        vec![Claim::Finished]
    );
    let s = state(&b, "1").await;
    assert_eq!(
        (s.delivered_key.as_str(), s.key.as_str(), s.rev),
        ("k1", "k1", 1)
    );
    assert!(s.sides[0].is_some() && s.sides[1].is_none());
}

#[tokio::test]
async fn a_former_owner_is_fenced_and_writes_or_claims_nothing() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);
    let fa = a.acquire_fences(&[3, 5]).await.unwrap();
    assert_eq!(
        fa.iter().map(|f| f.partition).collect::<Vec<_>>(),
        vec![3, 5]
    );
    assert_ne!(fa[0].holder, fa[1].holder);
    claims(a.commit(&fa, &[write("7", 0, "k7")], &[]).await.unwrap());

    // A rebalance gives partition 5 to `b`: `a`'s batch still in flight must not land, whole.
    let fb = b.acquire_fences(&[5]).await.unwrap();
    assert_eq!(
        get(&redis, "t:fence:5").await.as_deref(),
        Some(fb[0].holder.as_str())
    );
    let late = a
        .commit(
            &fa,
            &[write("7", 1, "late"), write("8", 0, "k8")],
            &["late"],
        )
        .await
        .unwrap();
    fenced(late);
    assert_eq!(get(&redis, "t:dedup:late").await, None, "no claim taken");
    assert_eq!(state(&a, "7").await.key, "k7");
    assert_eq!(state(&a, "8").await.rev, 0, "nothing of the batch written");

    // The new owner writes; so does `a` once it takes the partition again (and then `b` is out).
    claims(
        b.commit(&fb, &[write("7", 1, "k7b")], &["k7b"])
            .await
            .unwrap(),
    );
    assert_eq!(state(&a, "7").await.rev, 2);
    let fa = a.acquire_fences(&[5]).await.unwrap();
    claims(a.commit(&fa, &[write("7", 2, "k7c")], &[]).await.unwrap());
    fenced(b.commit(&fb, &[write("7", 3, "k7d")], &[]).await.unwrap());
    assert_eq!(state(&b, "7").await.key, "k7c");
}

#[tokio::test]
async fn a_fence_taken_between_the_check_and_the_write_discards_the_whole_commit() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);
    let fa = a.acquire_fences(&[2]).await.unwrap();
    claims(a.commit(&fa, &[write("4", 0, "k4")], &[]).await.unwrap());

    // `a` has checked its fence; a rebalance hands partition 2 to `b` before `a` writes.
    let watched = a
        .watch(&fa)
        .await
        .unwrap()
        .expect("the fence still names a");
    let fb = b.acquire_fences(&[2]).await.unwrap();
    let late = watched
        .commit(&[write("4", 1, "late4"), write("6", 0, "k6")], &["late4"])
        .await
        .unwrap();
    fenced(late);
    assert_eq!(get(&redis, "t:dedup:late4").await, None, "no claim taken");
    assert_eq!(state(&a, "4").await.key, "k4");
    assert_eq!(state(&a, "6").await.rev, 0, "nothing of the batch written");

    // The commit connection is usable again: `b` owns the partition, and `a` is refused.
    claims(
        b.commit(&fb, &[write("4", 1, "k4b")], &["k4b"])
            .await
            .unwrap(),
    );
    fenced(a.commit(&fa, &[write("4", 2, "k4c")], &[]).await.unwrap());
    assert_eq!(state(&a, "4").await.key, "k4b");
}

#[tokio::test]
async fn a_commit_after_a_watch_that_was_given_up_is_not_refused_by_it() {
    let redis = RedisServer::spawn().expect("redis-server");
    let a = store(&redis).await;
    let fa = a.acquire_fences(&[1]).await.unwrap();
    // A commit abandoned between its steps (its future dropped at shutdown, say).
    drop(a.watch(&fa).await.unwrap().expect("held"));
    // The fence is taken anew (as after a rebalance): the stale watch must not spoil what follows.
    let fa = a.acquire_fences(&[1]).await.unwrap();
    assert_eq!(
        claims(
            a.commit(&fa, &[write("5", 0, "k5")], &["k5"])
                .await
                .unwrap()
        ),
        vec![Claim::Claimed]
    );
    assert_eq!(state(&a, "5").await.key, "k5");
}

#[tokio::test]
async fn commits_reconnect_after_redis_restarts_and_a_new_redis_fences_the_old_holder() {
    let redis = RedisServer::spawn().expect("redis-server");
    let port = redis.port();
    let a = store(&redis).await;
    let fa = a.acquire_fences(&[0]).await.unwrap();
    claims(a.commit(&fa, &[write("1", 0, "k1")], &[]).await.unwrap());
    drop(redis);
    let redis = RedisServer::spawn_on(port).expect("redis-server again");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !a.ping().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the store's main connection did not come back"
        );
    }

    // The commit connection died with the old server. The first commit either fails (the dead
    // connection) or finds the new, empty Redis; neither may write under the old fence.
    loop {
        match a.commit(&fa, &[write("1", 1, "k1b")], &[]).await {
            Ok(Commit::Fenced) => break,
            Ok(Commit::Done(_)) => panic!("wrote under a fence the new Redis does not hold"),
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "still failing after 20 s: {e:#}"
            ),
        }
    }
    assert_eq!(state(&a, "1").await.rev, 0, "nothing written");
    let fa = a.acquire_fences(&[0]).await.unwrap();
    claims(a.commit(&fa, &[write("1", 0, "k1c")], &[]).await.unwrap());
    assert_eq!(state(&a, "1").await.key, "k1c");
    drop(redis);
}

#[tokio::test]
async fn a_dead_lettered_view_never_overrides_a_delivery() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);
    claims(a.commit(&[], &[], &["k9"]).await.unwrap());
    // `a`'s claim is confirmed delivered; `b` (whose claim expired, say) then gives up on it.
    a.confirm(&[("9", "k9", ViewOutcome::Delivered)])
        .await
        .unwrap();
    b.confirm(&[("9", "k9", ViewOutcome::DeadLettered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k9").await.as_deref(), Some("done"));

    claims(a.commit(&[], &[], &["k10"]).await.unwrap());
    a.confirm(&[("10", "k10", ViewOutcome::DeadLettered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k10").await.as_deref(), Some("dlq"));
}

#[tokio::test]
async fn an_emptied_script_cache_is_reloaded() {
    let redis = RedisServer::spawn().expect("redis-server");
    let a = store(&redis).await;
    let fa = a.acquire_fences(&[0]).await.unwrap();
    claims(
        a.commit(&fa, &[write("3", 0, "k3")], &["k3"])
            .await
            .unwrap(),
    );
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    claims(
        a.commit(&fa, &[write("3", 1, "k3b")], &["k3b"])
            .await
            .unwrap(),
    );
    a.confirm(&[("3", "k3b", ViewOutcome::DeadLettered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k3b").await.as_deref(), Some("dlq"));
    assert_eq!(state(&a, "3").await.rev, 2);
}
