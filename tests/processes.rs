//! Process-level test: `pipeline broker`, a real redis-server, the three mocks, the producer and
//! consumers as separate processes talking over sockets, as `docker compose` runs them. One
//! consumer is killed with SIGKILL mid-stream and replaced; kcat reads the topics.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, DEADLINE};
use pipeline_core::redis_server::{free_port, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_pipeline");

/// Child processes killed when the test ends, however it ends.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("REDIS_URL")
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        self.0.push((name.to_owned(), child));
        self.0.len() - 1
    }

    fn kill9(&mut self, i: usize) {
        let pid = self.0[i].1.id().to_string();
        let status = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let _ = self.0[i].1.wait();
    }

    fn assert_running(&mut self) {
        for (name, c) in &mut self.0 {
            if let Ok(Some(status)) = c.try_wait() {
                if status.code().is_some() {
                    panic!("{name} exited: {status}");
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // Clients first, the broker last, so nobody logs a vanished broker.
        for (_, c) in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn get_json(url: &str) -> Option<serde_json::Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

async fn wait_healthy(url: &str) {
    let u = url.to_owned();
    wait_for(url, || {
        let u = u.clone();
        async move {
            reqwest::get(&u)
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        }
    })
    .await;
}

fn kcat_count(bootstrap: &str, topic: &str) -> usize {
    let out = Command::new("kcat")
        .args([
            "-b",
            bootstrap,
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%k\\n",
        ])
        .output()
        .expect("kcat is installed (the test command installs it)");
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_deliver_everything_once_through_a_consumer_kill() {
    const N: u64 = 5000;
    let redis = RedisServer::spawn().expect("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let bs_file = dir.path().join("bootstrap");
    let mut procs = Procs::default();

    let broker_port = free_port().unwrap().to_string();
    procs.spawn(
        "broker",
        &[
            "broker",
            "--port",
            &broker_port,
            "--bootstrap-file",
            bs_file.to_str().unwrap(),
        ],
        &[],
    );
    let deadline = Instant::now() + DEADLINE;
    while !Path::new(&bs_file).exists() {
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bootstrap = std::fs::read_to_string(&bs_file).unwrap();

    let (crm, inv, ana) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let records = N.to_string();
    procs.spawn(
        "crm",
        &[
            "mock",
            "crm",
            "--addr",
            &format!("127.0.0.1:{crm}"),
            "--records",
            &records,
        ],
        &[],
    );
    procs.spawn(
        "inventory",
        &[
            "mock",
            "inventory",
            "--addr",
            &format!("127.0.0.1:{inv}"),
            "--records",
            &records,
        ],
        &[],
    );
    // Some latency at Analytics keeps records in flight long enough to kill a consumer mid-stream.
    procs.spawn(
        "analytics",
        &[
            "mock",
            "analytics",
            "--addr",
            &format!("127.0.0.1:{ana}"),
            "--fault-latency-ms",
            "40",
        ],
        &[],
    );
    for port in [crm, inv, ana] {
        wait_healthy(&format!("http://127.0.0.1:{port}/health")).await;
    }

    let redis_url = redis.url();
    let analytics_url = format!("http://127.0.0.1:{ana}");
    let consumer_env = [
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("ANALYTICS_URL", analytics_url.as_str()),
        ("BATCH_SIZE", "100"),
        ("BATCH_MAX_MESSAGES", "400"),
        ("HTTP_TIMEOUT_MS", "2000"),
        ("DELIVERY_MAX_ATTEMPTS", "3"),
        ("DELIVERY_MAX_BACKOFF_MS", "1000"),
        ("DEDUP_CLAIM_TTL_MS", "10000"),
        ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
    ];
    let metrics_a = free_port().unwrap();
    let a = procs.spawn(
        "consumer-a",
        &[
            "consumer",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_a}"),
        ],
        &consumer_env,
    );
    let metrics_b = format!("127.0.0.1:{}", free_port().unwrap());
    procs.spawn(
        "consumer-b",
        &["consumer", "--metrics-addr", &metrics_b],
        &consumer_env,
    );
    procs.spawn(
        "producer",
        &[
            "producer",
            "--crm-url",
            &format!("http://127.0.0.1:{crm}"),
            "--inventory-url",
            &format!("http://127.0.0.1:{inv}"),
            "--poll-interval-s",
            "3600",
        ],
        &[("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str())],
    );

    let stats_url = format!("{analytics_url}/analytics/stats");
    let unique = |min: u64| {
        let u = stats_url.clone();
        move || {
            let u = u.clone();
            async move {
                get_json(&u)
                    .await
                    .and_then(|s| s["unique_keys"].as_u64())
                    .unwrap_or(0)
                    >= min
            }
        }
    };
    wait_for("first deliveries", unique(500)).await;
    let ready = reqwest::get(format!("http://127.0.0.1:{metrics_a}/ready"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "consumer-a ready");
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_a}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pipeline_consumer_records_delivered_total"),
        "{metrics}"
    );

    procs.kill9(a);
    let at_kill = get_json(&stats_url).await.unwrap()["unique_keys"]
        .as_u64()
        .unwrap();
    let metrics_c = format!("127.0.0.1:{}", free_port().unwrap());
    procs.spawn(
        "consumer-c",
        &["consumer", "--metrics-addr", &metrics_c],
        &consumer_env,
    );
    wait_for("all merged records", unique(N)).await;
    procs.assert_running();

    let stats = get_json(&stats_url).await.unwrap();
    eprintln!("processes: {at_kill} delivered at the kill; final {stats}");
    assert!(at_kill < N, "the kill happened mid-stream");
    assert_eq!(stats["unique_keys"], N);
    assert_eq!(stats["unique_ids"], N);
    assert!(
        stats["duplicates"].as_u64().unwrap() <= 400,
        "re-sends bounded by one batch: {stats}"
    );

    // Console tooling reads what the pipeline wrote, through the forwarded bootstrap port.
    let bs = bootstrap.clone();
    let (customers, products, dlq) = tokio::task::spawn_blocking(move || {
        (
            kcat_count(&bs, "customer_data"),
            kcat_count(&bs, "inventory_data"),
            kcat_count(&bs, "analytics_DLQ"),
        )
    })
    .await
    .unwrap();
    assert_eq!((customers, products, dlq), (N as usize, N as usize, 0));
}
