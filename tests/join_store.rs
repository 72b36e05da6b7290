//! `JoinStore` against a real `redis-server`: the claim/confirm protocol between two workers,
//! the revision check on state writes, and recovery from an emptied script cache.

use consumer::join::StateWrite;
use consumer::store::{Claim, Commit, JoinStore, Outcome};
use pipeline_core::redis_server::RedisServer;

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

async fn join_hash(redis: &RedisServer, id: &str) -> std::collections::HashMap<String, String> {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    redis::cmd("HGETALL")
        .arg(format!("t:join:{id}"))
        .query_async(&mut c)
        .await
        .expect("HGETALL")
}

fn write(id: &str, expected_rev: i64, key: &str) -> StateWrite {
    StateWrite {
        id: id.to_owned(),
        expected_rev,
        sides: vec![("s:customer".to_owned(), format!("record of {id}"))],
        key: key.to_owned(),
        view_hash: format!("vh-{key}"),
    }
}

fn claims(commit: Commit) -> Vec<Claim> {
    match commit {
        Commit::Done(c) => c,
        Commit::Conflict => panic!("unexpected conflict"),
    }
}

#[tokio::test]
async fn a_claim_is_busy_for_others_until_confirmed_then_finished() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);

    let first = claims(a.commit(&[write("1", 0, "k1")], &["k1"]).await.unwrap());
    assert_eq!(first, vec![Claim::Claimed]);
    // The same worker claiming again (a retried batch) still holds it.
    assert_eq!(
        claims(a.commit(&[], &["k1"]).await.unwrap()),
        vec![Claim::Claimed]
    );
    assert_eq!(
        claims(b.commit(&[], &["k1"]).await.unwrap()),
        vec![Claim::Busy]
    );
    let inflight = get(&redis, "t:dedup:k1").await.expect("claim written");
    assert!(inflight.starts_with("inflight:"), "{inflight}");

    a.confirm(&[("1", "k1", Outcome::Delivered)]).await.unwrap();
    assert_eq!(get(&redis, "t:dedup:k1").await.as_deref(), Some("done"));
    assert_eq!(
        claims(b.commit(&[], &["k1"]).await.unwrap()),
        vec![Claim::Finished]
    );
    let state = join_hash(&redis, "1").await;
    assert_eq!(state.get("dk").map(String::as_str), Some("k1"));
    assert_eq!(state.get("rev").map(String::as_str), Some("1"));
}

#[tokio::test]
async fn a_stale_revision_conflicts_writes_nothing_and_gives_its_claims_back() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);
    claims(a.commit(&[write("7", 0, "k7")], &[]).await.unwrap());

    // `b` read id 7 before `a` wrote it: its write and claim must not land.
    let stale = b
        .commit(&[write("7", 0, "other")], &["other"])
        .await
        .unwrap();
    assert!(matches!(stale, Commit::Conflict));
    assert_eq!(get(&redis, "t:dedup:other").await, None);
    let state = join_hash(&redis, "7").await;
    assert_eq!(state.get("k").map(String::as_str), Some("k7"));

    // Written at the revision it now has, it lands.
    claims(b.commit(&[write("7", 1, "k7b")], &["k7b"]).await.unwrap());
    assert_eq!(
        join_hash(&redis, "7").await.get("rev").map(String::as_str),
        Some("2")
    );
}

#[tokio::test]
async fn a_dead_lettered_view_never_overrides_a_delivery() {
    let redis = RedisServer::spawn().expect("redis-server");
    let (a, b) = (store(&redis).await, store(&redis).await);
    claims(a.commit(&[], &["k9"]).await.unwrap());
    // `a`'s claim is confirmed delivered; `b` (whose claim expired, say) then gives up on it.
    a.confirm(&[("9", "k9", Outcome::Delivered)]).await.unwrap();
    b.confirm(&[("9", "k9", Outcome::DeadLettered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k9").await.as_deref(), Some("done"));

    claims(a.commit(&[], &["k10"]).await.unwrap());
    a.confirm(&[("10", "k10", Outcome::DeadLettered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k10").await.as_deref(), Some("dlq"));
}

#[tokio::test]
async fn an_emptied_script_cache_is_reloaded() {
    let redis = RedisServer::spawn().expect("redis-server");
    let a = store(&redis).await;
    claims(a.commit(&[write("3", 0, "k3")], &["k3"]).await.unwrap());
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    claims(a.commit(&[write("3", 1, "k3b")], &["k3b"]).await.unwrap());
    a.confirm(&[("3", "k3b", Outcome::DeadLettered)])
        .await
        .unwrap();
    assert_eq!(get(&redis, "t:dedup:k3b").await.as_deref(), Some("dlq"));
    assert_eq!(
        join_hash(&redis, "3").await.get("rev").map(String::as_str),
        Some("2")
    );
}
