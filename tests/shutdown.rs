//! SIGTERM is honoured in every phase: while start-up waits on a Kafka that does not answer,
//! and during `producer --once`. A process that ignores it until some Kafka timeout fires gets
//! SIGKILLed by its supervisor and loses its graceful shutdown.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use pipeline_kit::process::ChildProcess;
use pipeline_kit::redis_server::{free_port, RedisServer};

/// Well below every Kafka timeout a stuck start-up would wait for (30-60 s).
const GRACE: Duration = Duration::from_secs(10);

/// Starts `pipeline <args>` with `env` and its metrics on a free port; waits until it serves
/// `/health`, that is, until it is in its start-up.
async fn start(args: &[&str], env: &[(&str, &str)]) -> ChildProcess {
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(args)
        .env("METRICS_ADDR", &metrics)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null());
    let child = ChildProcess::spawn(&args.join(" "), cmd).unwrap();
    common::procs::wait_healthy(&format!("http://{metrics}/health")).await;
    child
}

/// Sends SIGTERM and waits (up to [`GRACE`]) for the exit.
async fn terminate_within_grace(mut child: ChildProcess, what: &str) {
    let exit = tokio::task::block_in_place(|| child.terminate(GRACE));
    assert!(
        exit.is_some_and(|e| e.code().is_some()),
        "{what} did not exit on its own within {GRACE:?} of SIGTERM: {exit:?}"
    );
}

/// A bootstrap address where nothing listens: Kafka start-up waits there until its timeouts.
fn dead_kafka() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_starting_against_an_unreachable_kafka_stops_on_sigterm() {
    let kafka = dead_kafka();
    let env = [("KAFKA_BOOTSTRAP_SERVERS", kafka.as_str())];
    let producer = start(&["producer"], &env).await;
    terminate_within_grace(producer, "producer in start-up").await;
    let once = start(&["producer", "--once"], &env).await;
    terminate_within_grace(once, "producer --once in start-up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_starting_against_an_unreachable_kafka_stops_on_sigterm() {
    let redis = RedisServer::spawn().unwrap();
    let (kafka, redis_url) = (dead_kafka(), redis.url());
    let env = [
        ("KAFKA_BOOTSTRAP_SERVERS", kafka.as_str()),
        ("REDIS_URL", redis_url.as_str()),
    ];
    let consumer = start(&["consumer"], &env).await;
    terminate_within_grace(consumer, "consumer waiting for Kafka").await;
}
