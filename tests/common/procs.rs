//! Process-level harness: Apache Kafka, a redis-server, the mocks, producer and consumers as
//! separate processes of the binary under test, killed when the harness drops.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use pipeline_kit::apache_kafka::{ApacheKafka, BrokerOptions};
use pipeline_kit::process::ChildProcess;
use pipeline_kit::redis_server::{free_port, RedisServer};

use super::{wait_for, DEADLINE};

pub const BIN: &str = env!("CARGO_BIN_EXE_pipeline");

/// The cluster's child processes (`pipeline_kit::process`), killed in reverse order (clients
/// first) when dropped.
#[derive(Default)]
pub struct Procs {
    children: Vec<ChildProcess>,
    /// Stopped on purpose: no longer expected to run.
    stopped: std::collections::HashSet<usize>,
}

impl Procs {
    pub fn spawn(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("REDIS_URL")
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .env(
                "RUST_LOG",
                std::env::var("CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = ChildProcess::spawn(name, cmd).unwrap_or_else(|e| panic!("{e:#}"));
        self.children.push(child);
        self.children.len() - 1
    }

    pub fn kill9(&mut self, i: usize) {
        self.children[i].kill9();
    }

    /// Sends SIGTERM (graceful shutdown) and waits for a clean exit.
    pub fn terminate(&mut self, i: usize) {
        let c = &mut self.children[i];
        let exit = c.terminate(DEADLINE);
        assert!(
            exit.is_some_and(|e| e.success()),
            "{} did not shut down cleanly: {exit:?}",
            c.name()
        );
        self.stopped.insert(i);
    }

    /// Panics if a process exited on its own (killed or stopped ones excepted).
    pub fn assert_running(&mut self) {
        for (i, c) in self.children.iter_mut().enumerate() {
            if self.stopped.contains(&i) {
                continue;
            }
            if let Some(status) = c.try_wait() {
                if status.code().is_some() {
                    panic!("{} exited: {status}", c.name());
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        while let Some(mut c) = self.children.pop() {
            c.kill9();
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

/// Every message of `topic`, one line each in kcat's `-f` `format` (with a trailing `\n`).
pub fn kcat_read(bootstrap: &str, topic: &str, format: &str) -> String {
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
        ])
        .args(["-f", format])
        .output()
        .expect("kcat is installed (the test command installs it)");
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Messages in `topic`, counted with kcat.
pub fn kcat_count(bootstrap: &str, topic: &str) -> usize {
    kcat_read(bootstrap, topic, "%o\\n")
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}

/// Runs one of Apache Kafka's own console tools (`class`, e.g.
/// `org.apache.kafka.tools.consumer.ConsoleConsumer` for `kafka-console-consumer.sh`) from the
/// fetched jars; returns its standard output.
pub fn kafka_tool(class: &str, args: &[&str]) -> String {
    pipeline_kit::apache_kafka::run_tool(class, args).unwrap()
}

/// `kafka-console-consumer` reading the first `max` records of `topic` with keys and headers.
pub fn console_consumer(bootstrap: &str, topic: &str, max: usize) -> String {
    let max = max.to_string();
    kafka_tool(
        "org.apache.kafka.tools.consumer.ConsoleConsumer",
        &[
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topic,
            "--from-beginning",
            "--max-messages",
            &max,
            "--timeout-ms",
            "20000",
            "--property",
            "print.key=true",
            "--property",
            "print.headers=true",
        ],
    )
}

/// A broker, Redis and the three mocks as separate processes.
///
/// With `KAFKA_BOOTSTRAP_SERVERS` set, the suite targets that broker instead of starting its
/// own, with topic and group names unique to the run; scenarios that fault the broker fail
/// there (`Cluster::kafka`), they never pass without running.
pub struct Cluster {
    pub procs: Procs,
    pub redis: Option<RedisServer>,
    pub redis_port: u16,
    pub dir: tempfile::TempDir,
    pub bootstrap: String,
    pub crm_url: String,
    pub inventory_url: String,
    pub analytics_url: String,
    /// customer, inventory, DLQ, source-state and pricing topic names, and the consumer group.
    pub customer_topic: String,
    pub inventory_topic: String,
    pub dlq_topic: String,
    pub state_topic: String,
    pub pricing_topic: String,
    /// The pricing mock, when the cluster runs the three-source pipeline file.
    pub pricing_url: Option<String>,
    pub group: String,
    /// `/metrics` of the last producer started.
    pub producer_metrics: String,
    /// `/metrics` of each consumer, by its process index.
    pub consumer_metrics: std::collections::HashMap<usize, String>,
    /// The test's own Apache Kafka (None with an external broker). Declared after `procs`, so
    /// the clients stop before it does.
    pub kafka: Option<ApacheKafka>,
}

impl Cluster {
    /// Starts broker, Redis and mocks serving `n` customers and products; `analytics_args` are
    /// extra flags of the Analytics mock (e.g. injected latency).
    pub async fn start(n: u64, analytics_args: &[&str]) -> Self {
        Self::start_inner(n, analytics_args, false, BrokerOptions::default()).await
    }

    /// Like [`Cluster::start`] on a broker started with `broker` (e.g. a fast log cleaner).
    pub async fn start_on(n: u64, analytics_args: &[&str], broker: BrokerOptions) -> Self {
        Self::start_inner(n, analytics_args, false, broker).await
    }

    /// Like [`Cluster::start`], plus a pricing mock (`product_id`, `Link` pagination) joined as
    /// an optional third side through a pipeline file (`PIPELINE_CONFIG`), with incremental sync.
    pub async fn start_with_pricing(n: u64, analytics_args: &[&str]) -> Self {
        Self::start_inner(n, analytics_args, true, BrokerOptions::default()).await
    }

    async fn start_inner(
        n: u64,
        analytics_args: &[&str],
        pricing: bool,
        broker: BrokerOptions,
    ) -> Self {
        super::init_logs();
        let redis = RedisServer::spawn().expect("redis-server");
        let dir = tempfile::tempdir().unwrap();
        let mut procs = Procs::default();
        let external = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .ok()
            .filter(|s| !s.is_empty());
        let run = uuid_like();
        // A shared external broker gets names unique to the run; a broker of the test's own
        // gets the production names.
        let suffix = if external.is_some() {
            format!("_{run}")
        } else {
            String::new()
        };
        let names = [
            "customer_data",
            "inventory_data",
            "analytics_DLQ",
            "pipeline_source_state",
            "pricing_data",
        ]
        .map(|n| format!("{n}{suffix}"));
        let (bootstrap, kafka) = match external {
            Some(bs) => (bs, None),
            None => {
                let kafka = tokio::task::spawn_blocking(move || ApacheKafka::start(&broker))
                    .await
                    .unwrap()
                    .expect("Apache Kafka starts (scripts/kafka.sh fetches it)");
                (kafka.bootstrap(), Some(kafka))
            }
        };
        // The topics as production has them (the producer's plan, `docker-compose.yml`):
        // data topics and the source state compacted, the state in one partition.
        let spec =
            |name: &str, partitions: i32, compacted: bool| pipeline_core::topics::TopicSpec {
                name: name.to_owned(),
                partitions,
                compacted,
            };
        let plan = pipeline_core::topics::TopicPlan {
            topics: vec![
                spec(&names[0], 6, true),
                spec(&names[1], 6, true),
                spec(&names[2], 6, false),
                spec(&names[3], 1, true),
                spec(&names[4], 6, true),
            ],
            replication: 1,
            co_partitioned: vec![names[0].clone(), names[1].clone(), names[4].clone()],
        };
        let admin = pipeline_core::kafka::KafkaConfig::new(&bootstrap);
        pipeline_core::topics::ensure_topics(&admin, &plan)
            .await
            .expect("creating the run's topics with the AdminClient");
        let [customer_topic, inventory_topic, dlq_topic, state_topic, pricing_topic] = names;
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
        let pricing_url = if pricing {
            let port = free_port().unwrap();
            procs.spawn(
                "pricing",
                &[
                    "mock",
                    "source",
                    "--entity",
                    "pricing",
                    "--addr",
                    &addr(port),
                    "--records",
                    &records,
                ],
                &[],
            );
            let url = format!("http://127.0.0.1:{port}");
            wait_healthy(&format!("{url}/health")).await;
            Some(url)
        } else {
            None
        };
        let c = Self {
            procs,
            redis_port: redis.port(),
            redis: Some(redis),
            dir,
            bootstrap,
            kafka,
            customer_topic,
            inventory_topic,
            dlq_topic,
            group: format!("analytics-pipeline-{run}"),
            producer_metrics: String::new(),
            consumer_metrics: std::collections::HashMap::new(),
            crm_url: format!("http://127.0.0.1:{crm}"),
            inventory_url: format!("http://127.0.0.1:{inv}"),
            analytics_url: format!("http://127.0.0.1:{ana}"),
            state_topic,
            pricing_topic,
            pricing_url,
        };
        if c.pricing_url.is_some() {
            c.write_pipeline(2);
        }
        c
    }

    /// Writes the three-source pipeline file, every source polled every `interval_s`.
    fn write_pipeline(&self, interval_s: u64) {
        let Some(pricing_url) = &self.pricing_url else {
            return;
        };
        let text = format!(
            r#"
[[sources]]
name = "crm"
base_url = "{crm}"
path = "/customers"
entity = "customer"
topic = "{ct}"
interval_s = {interval_s}

[[sources]]
name = "inventory"
base_url = "{inv}"
path = "/products"
entity = "product"
topic = "{it}"
interval_s = {interval_s}
pagination = {{ style = "offset", size = 1000 }}

[[sources]]
name = "pricing"
base_url = "{pricing_url}"
path = "/pricing"
entity = "price"
topic = "{pt}"
id_field = "product_id"
interval_s = {interval_s}
pagination = {{ style = "link", size_param = "limit", size = 500 }}
incremental = {{ updated_since_param = "updated_since" }}

[join]
sides = [
  {{ name = "customer", topic = "{ct}" }},
  {{ name = "inventory", topic = "{it}" }},
  {{ name = "pricing", topic = "{pt}", required = false }},
]
"#,
            crm = self.crm_url,
            inv = self.inventory_url,
            ct = self.customer_topic,
            it = self.inventory_topic,
            pt = self.pricing_topic,
        );
        std::fs::write(self.path("pipeline.toml"), text).unwrap();
    }

    /// Starts a consumer with short timeouts (so failover is quick) plus `env`.
    pub fn consumer(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        let redis_url = format!("redis://127.0.0.1:{}/", self.redis_port);
        let metrics = format!("127.0.0.1:{}", free_port().unwrap());
        let pipeline = self.path("pipeline.toml");
        let mut all = self.topic_env();
        if self.pricing_url.is_some() {
            all.push(("PIPELINE_CONFIG", pipeline.to_str().unwrap()));
        }
        all.extend([
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
            ("CONSUMER_GROUP", self.group.as_str()),
        ]);
        all.extend_from_slice(env);
        let all: Vec<(String, String)> = all
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let i = self.procs.spawn(name, &["consumer"], &refs);
        self.consumer_metrics
            .insert(i, format!("http://{metrics}/metrics"));
        i
    }

    /// Starts a consumer that freezes at `failpoint` (`pipeline_core::failpoint`) plus `env`;
    /// returns its process index and the file that appears once it froze there.
    pub fn consumer_frozen_at(
        &mut self,
        name: &str,
        failpoint: &str,
        env: &[(&str, &str)],
    ) -> (usize, PathBuf) {
        let marker = self.path(&format!("failpoint-{name}"));
        let marker_s = marker.to_str().unwrap().to_owned();
        let mut all = vec![
            ("PIPELINE_FAILPOINT", failpoint),
            ("PIPELINE_FAILPOINT_FILE", marker_s.as_str()),
        ];
        all.extend_from_slice(env);
        (self.consumer(name, &all), marker)
    }

    /// Starts the producer polling every `interval_s` seconds.
    pub fn producer(&mut self, interval_s: u64) -> usize {
        self.producer_with(interval_s, &[])
    }

    /// Starts the producer with extra environment; returns its process index and metrics URL.
    pub fn producer_with(&mut self, interval_s: u64, env: &[(&str, &str)]) -> usize {
        let metrics = format!("127.0.0.1:{}", free_port().unwrap());
        self.producer_metrics = format!("http://{metrics}/metrics");
        let interval = interval_s.to_string();
        self.write_pipeline(interval_s);
        let pipeline = self.path("pipeline.toml");
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
        let mut all = self.topic_env();
        if self.pricing_url.is_some() {
            all.push(("PIPELINE_CONFIG", pipeline.to_str().unwrap()));
        }
        all.push(("KAFKA_BOOTSTRAP_SERVERS", bs.as_str()));
        all.extend_from_slice(env);
        let all: Vec<(String, String)> = all
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.procs.spawn("producer", &args, &refs)
    }

    fn topic_env(&self) -> Vec<(&str, &str)> {
        vec![
            ("CUSTOMER_TOPIC", self.customer_topic.as_str()),
            ("INVENTORY_TOPIC", self.inventory_topic.as_str()),
            ("DLQ_TOPIC", self.dlq_topic.as_str()),
            ("SOURCE_STATE_TOPIC", self.state_topic.as_str()),
        ]
    }

    /// The test's own broker, for broker faults (`kill -9`, restart, `SIGSTOP`). A scenario
    /// that needs one fails against an external broker.
    pub fn kafka(&mut self) -> &mut ApacheKafka {
        self.kafka
            .as_mut()
            .expect("this scenario needs the test's own broker, not KAFKA_BOOTSTRAP_SERVERS")
    }

    /// Posts a new name, `<tag> <id>`, for each customer in `ids` to the CRM mock; returns
    /// id → the new name.
    pub async fn update_customers(
        &self,
        ids: &[u64],
        tag: &str,
    ) -> std::collections::BTreeMap<String, String> {
        let client = reqwest::Client::new();
        let mut names = std::collections::BTreeMap::new();
        for id in ids {
            let name = format!("{tag} {id}");
            let body =
                serde_json::json!({"id": id, "name": name, "email": format!("u{id}@example.com")});
            let r = client
                .post(format!("{}/customers", self.crm_url))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "updating customer {id}");
            names.insert(id.to_string(), name);
        }
        names
    }

    /// Waits until the consumers `members` hold `total` topic-partitions between them, each at
    /// least one: the group has settled with all of them in it.
    pub async fn wait_assigned(&self, members: &[usize], total: f64) {
        let urls: Vec<String> = members
            .iter()
            .map(|i| self.consumer_metrics[i].clone())
            .collect();
        super::wait_for("every consumer to hold partitions", || {
            let urls = urls.clone();
            async move {
                let mut sum = 0.0;
                for url in &urls {
                    let Ok(r) = reqwest::get(url).await else {
                        return false;
                    };
                    let text = r.text().await.unwrap_or_default();
                    let held = pipeline_core::metrics::sum_of(
                        &text,
                        "pipeline_consumer_assigned_partitions",
                    );
                    if held < 1.0 {
                        return false;
                    }
                    sum += held;
                }
                sum == total
            }
        })
        .await;
    }

    /// Kills the Redis server (its data is lost, as with a restart without persistence).
    pub fn kill_redis(&mut self) {
        self.redis = None;
    }

    /// Starts an empty Redis on the old port.
    pub fn restart_redis(&mut self) {
        self.redis = Some(RedisServer::spawn_on(self.redis_port).expect("redis-server restarts"));
    }

    /// Counts messages of a topic with kcat.
    pub async fn count(&self, topic: &str) -> usize {
        let (bs, t) = (self.bootstrap.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || kcat_count(&bs, &t))
            .await
            .unwrap()
    }

    /// Writes one raw message from a file with kcat (`key` empty for none).
    pub fn kcat_produce(&self, topic: &str, key: &str, value_file: &std::path::Path) {
        let mut args: Vec<String> = [
            "-b",
            &self.bootstrap,
            "-P",
            "-t",
            topic,
            "-X",
            "message.max.bytes=10000000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !key.is_empty() {
            args.extend(["-k".to_string(), key.to_string()]);
        }
        args.push(value_file.to_str().unwrap().to_string());
        let out = Command::new("kcat").args(&args).output().expect("kcat");
        assert!(
            out.status.success(),
            "kcat -P failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub async fn stats(&self) -> serde_json::Value {
        get_json(&format!("{}/analytics/stats", self.analytics_url))
            .await
            .unwrap_or_default()
    }

    /// Waits until Analytics holds at least `n` unique keys (reporting its stats on timeout).
    pub async fn wait_unique(&self, n: u64) {
        super::wait_until(&format!("{n} unique keys"), || async {
            let stats = self.stats().await;
            if stats["unique_keys"].as_u64().unwrap_or(0) >= n {
                Ok(())
            } else {
                Err(format!("Analytics: {stats}"))
            }
        })
        .await
    }

    /// Total lag of the consumer group and the DLQ size, read in that order.
    pub async fn lag_then_dlq(&self) -> (i64, i64) {
        let kafka = pipeline_core::kafka::KafkaConfig::new(&self.bootstrap);
        let mut topics = vec![self.customer_topic.clone(), self.inventory_topic.clone()];
        if self.pricing_url.is_some() {
            topics.push(self.pricing_topic.clone());
        }
        let (group, dlq) = (self.group.clone(), self.dlq_topic.clone());
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            let probe = pipeline_core::lag::LagProbe::new(&kafka, &group, &refs).unwrap();
            // Time for a coordinator that is still loading after the group's first commit.
            let t = Duration::from_secs(10);
            let lag = probe.total(t).unwrap();
            (lag, probe.topic_size(&dlq, t).unwrap())
        })
        .await
        .unwrap()
    }

    /// A counter's value in the last producer's `/metrics`.
    pub async fn producer_metric(&self, name: &str) -> f64 {
        let Ok(r) = reqwest::get(&self.producer_metrics).await else {
            return 0.0;
        };
        pipeline_core::metrics::sum_of(&r.text().await.unwrap_or_default(), name)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A short random suffix for topic and group names.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", nanos & 0xffff_ffff, std::process::id())
}
