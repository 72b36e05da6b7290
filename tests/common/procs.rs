//! Process-level harness: `pipeline broker`, a redis-server, the mocks, producer and consumers as
//! separate processes of the binary under test, killed when the harness drops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipeline_core::redis_server::{free_port, RedisServer};

use super::{wait_for, DEADLINE};

pub const BIN: &str = env!("CARGO_BIN_EXE_pipeline");

/// Child processes, killed (clients first, broker last) when dropped.
#[derive(Default)]
pub struct Procs(Vec<(String, Child)>);

impl Procs {
    pub fn spawn(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
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

    pub fn kill9(&mut self, i: usize) {
        let pid = self.0[i].1.id().to_string();
        let status = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let _ = self.0[i].1.wait();
    }

    pub fn assert_running(&mut self) {
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
        for (_, c) in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

pub async fn wait_healthy(url: &str) {
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

/// Messages in `topic`, counted with kcat.
pub fn kcat_count(bootstrap: &str, topic: &str) -> usize {
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

/// A broker, Redis and the three mocks as separate processes.
pub struct Cluster {
    pub procs: Procs,
    pub redis: RedisServer,
    pub dir: tempfile::TempDir,
    pub bootstrap: String,
    pub crm_url: String,
    pub inventory_url: String,
    pub analytics_url: String,
}

impl Cluster {
    /// Starts broker, Redis and mocks serving `n` customers and products; `analytics_args` are
    /// extra flags of the Analytics mock (e.g. injected latency).
    pub async fn start(n: u64, analytics_args: &[&str]) -> Self {
        super::init_logs();
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
        while !bs_file.exists() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let bootstrap = std::fs::read_to_string(&bs_file).unwrap();
        let (crm, inv, ana) = (
            free_port().unwrap(),
            free_port().unwrap(),
            free_port().unwrap(),
        );
        let records = n.to_string();
        let addr = |p: u16| format!("127.0.0.1:{p}");
        procs.spawn(
            "crm",
            &["mock", "crm", "--addr", &addr(crm), "--records", &records],
            &[],
        );
        procs.spawn(
            "inventory",
            &[
                "mock",
                "inventory",
                "--addr",
                &addr(inv),
                "--records",
                &records,
            ],
            &[],
        );
        let mut args = vec!["mock", "analytics", "--addr"];
        let a = addr(ana);
        args.push(&a);
        args.extend_from_slice(analytics_args);
        procs.spawn("analytics", &args, &[]);
        for port in [crm, inv, ana] {
            wait_healthy(&format!("http://127.0.0.1:{port}/health")).await;
        }
        Self {
            procs,
            redis,
            dir,
            bootstrap,
            crm_url: format!("http://127.0.0.1:{crm}"),
            inventory_url: format!("http://127.0.0.1:{inv}"),
            analytics_url: format!("http://127.0.0.1:{ana}"),
        }
    }

    /// Starts a consumer with short timeouts (so failover is quick) plus `env`.
    pub fn consumer(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        let redis_url = self.redis.url();
        let metrics = format!("127.0.0.1:{}", free_port().unwrap());
        let mut all = vec![
            ("KAFKA_BOOTSTRAP_SERVERS", self.bootstrap.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("ANALYTICS_URL", self.analytics_url.as_str()),
            ("METRICS_ADDR", metrics.as_str()),
            ("BATCH_SIZE", "100"),
            ("BATCH_MAX_MESSAGES", "400"),
            ("HTTP_TIMEOUT_MS", "2000"),
            ("DELIVERY_MAX_ATTEMPTS", "3"),
            ("DELIVERY_MAX_BACKOFF_MS", "1000"),
            ("DEDUP_CLAIM_TTL_MS", "10000"),
            ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ];
        all.extend_from_slice(env);
        self.procs.spawn(name, &["consumer"], &all)
    }

    /// Starts the producer polling every `interval_s` seconds.
    pub fn producer(&mut self, interval_s: u64) -> usize {
        let metrics = format!("127.0.0.1:{}", free_port().unwrap());
        let interval = interval_s.to_string();
        let args = [
            "producer",
            "--crm-url",
            &self.crm_url,
            "--inventory-url",
            &self.inventory_url,
            "--poll-interval-s",
            &interval,
            "--metrics-addr",
            &metrics,
        ];
        let bs = self.bootstrap.clone();
        self.procs.spawn(
            "producer",
            &args,
            &[("KAFKA_BOOTSTRAP_SERVERS", bs.as_str())],
        )
    }

    pub async fn stats(&self) -> serde_json::Value {
        get_json(&format!("{}/analytics/stats", self.analytics_url))
            .await
            .unwrap_or_default()
    }

    /// Waits until Analytics holds at least `n` unique keys.
    pub async fn wait_unique(&self, n: u64) {
        let url = format!("{}/analytics/stats", self.analytics_url);
        wait_for(&format!("{n} unique keys"), || {
            let u = url.clone();
            async move {
                get_json(&u)
                    .await
                    .and_then(|s| s["unique_keys"].as_u64())
                    .unwrap_or(0)
                    >= n
            }
        })
        .await;
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
