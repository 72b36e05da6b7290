//! A single-node Apache Kafka (KRaft) broker as a child process, from the jars that
//! `scripts/kafka.sh` fetched: the Kafka of the process tests, where the faults are real ones
//! (`kill -9` and a restart on the same data, `SIGSTOP`/`SIGCONT`).
//!
//! Ports are free loopback ports; the data directory is a temporary one, kept across
//! [`ApacheKafka::restart`]. Dropping the broker stops it (SIGTERM, then SIGKILL after a grace);
//! `scripts/test.sh` also kills any broker a killed test run left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::redis_server::free_port;

/// The Kafka version `deploy/kafka/pom.xml` pins (a unit test keeps the two equal).
pub const KAFKA_VERSION: &str = "4.1.1";

/// Any valid cluster id: every broker here is a cluster of its own.
const CLUSTER_ID: &str = "cGlwZWxpbmUtdGVzdHMtMQ";

/// How long a broker may take to serve after its JVM starts, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Starts tried when a port is taken meanwhile, and how the JVM says so.
const START_ATTEMPTS: u32 = 3;
const PORT_TAKEN: &str = "Address already in use";

/// Where the fetched jars are: `PIPELINE_KAFKA_HOME`, else `.cache/kafka-<version>` of this
/// workspace.
pub fn kafka_home() -> anyhow::Result<PathBuf> {
    let home = match std::env::var_os("PIPELINE_KAFKA_HOME") {
        Some(h) => PathBuf::from(h),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(".cache")
            .join(format!("kafka-{KAFKA_VERSION}")),
    };
    if !home.join("lib").join(".complete").exists() {
        bail!(
            "Apache Kafka {KAFKA_VERSION} is not fetched at {}: run scripts/kafka.sh (the test \
             command does)",
            home.display()
        );
    }
    Ok(home)
}

/// Runs one of Apache Kafka's own console tools (`class`, e.g.
/// `org.apache.kafka.tools.consumer.group.ConsumerGroupCommand` for `kafka-consumer-groups.sh`)
/// from the fetched jars; returns its standard output, or its standard error as the error.
pub fn run_tool(class: &str, args: &[&str]) -> anyhow::Result<String> {
    let home = kafka_home()?;
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/lib/*", home.display()))
        .arg(class)
        .args(args)
        .output()
        .with_context(|| format!("running {class} (is java installed?)"))?;
    if !out.status.success() {
        bail!(
            "{class} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Settings of a broker beyond the single-node defaults.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// The client port; None: a free one.
    pub port: Option<u16>,
    /// `key=value` broker settings, after the defaults (e.g. log-cleaner timings).
    pub overrides: Vec<(String, String)>,
}

/// A running (or stopped, for a restart) single-node broker owned by this process.
pub struct ApacheKafka {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    home: PathBuf,
    /// How long the last start took, JVM start to serving.
    pub started_in: Duration,
}

impl ApacheKafka {
    /// Formats a fresh data directory and starts a broker on free ports; returns once it serves.
    /// A port found free can be taken by another process before the JVM binds it (seconds
    /// later, with tests running side by side): then it starts again on new ports, up to
    /// [`START_ATTEMPTS`] times.
    pub fn start(options: &BrokerOptions) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(options) {
                Err(e) if attempt < START_ATTEMPTS && format!("{e:#}").contains(PORT_TAKEN) => {
                    eprintln!(
                        "apache kafka: a port was taken before the broker bound it; retrying"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(options: &BrokerOptions) -> anyhow::Result<Self> {
        let home = kafka_home()?;
        let dir = tempfile::Builder::new()
            .prefix("apache-kafka-")
            .tempdir()
            .context("creating the broker's directory")?;
        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        let controller_port = free_port()?;
        let config = server_properties(dir.path(), port, controller_port, options);
        std::fs::write(dir.path().join("server.properties"), config)?;
        std::fs::write(dir.path().join("log4j2.properties"), LOG4J2)?;
        format_storage(&home, dir.path())?;
        let mut broker = Self {
            child: None,
            dir,
            port,
            home,
            started_in: Duration::ZERO,
        };
        broker.launch()?;
        Ok(broker)
    }

    /// `127.0.0.1:<port>`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker JVM's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The broker's own log (for a failing test's message).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// SIGKILL: the broker dies with whatever it had not flushed.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean shutdown (SIGKILL after a grace).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the broker again on its data directory and ports (after `kill9` or `stop`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()
    }

    /// SIGSTOP: the broker hangs (connections open, nothing answered) until [`Self::resume`].
    pub fn pause(&self) -> anyhow::Result<()> {
        signal(self.pid().context("broker not running")?, "STOP")
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        signal(self.pid().context("broker not running")?, "CONT")
    }

    /// Starts the JVM and waits until it answers a metadata request. An accepting client port
    /// is not enough: a client that connects right then can fail its first request (librdkafka
    /// reported `UnsupportedFeature` for a metadata fetch in a suite run).
    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_path())?;
        let started = Instant::now();
        let mut child = java(&self.home)
            .args([
                "-Xms256m",
                "-Xmx512m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExplicitGCInvokesConcurrent",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.path().join("log4j2.properties").display()
            ))
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the Kafka broker (java)")?;
        let deadline = started + START_TIMEOUT;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && answers_metadata(self.port)
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the Kafka broker exited during start-up ({status}); its log ({}) ends:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path())
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the Kafka broker did not serve within {START_TIMEOUT:?}; its log ({}) ends:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.started_in = started.elapsed();
        self.child = Some(child);
        Ok(())
    }
}

/// Whether the broker on `port` answers a metadata request with itself in it.
fn answers_metadata(port: u16) -> bool {
    let client: Result<BaseConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{port}"))
        .set("log_level", "3")
        .create();
    client
        .and_then(|c| c.fetch_metadata(None, Duration::from_secs(2)))
        .is_ok_and(|md| !md.brokers().is_empty())
}

impl Drop for ApacheKafka {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a broker log: the error survives the broker's temporary directory.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `java -cp '<home>/lib/*'`.
fn java(home: &Path) -> Command {
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}/lib/*", home.display()))
        .stdin(Stdio::null());
    cmd
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed: {status}");
    }
    Ok(())
}

/// Formats `dir/data` by copying a directory formatted once per process: formatting is a JVM
/// start of its own (about 2 s), and with static voters a formatted directory holds only
/// `meta.properties` and `bootstrap.checkpoint`, the same for every broker here.
fn format_storage(home: &Path, dir: &Path) -> anyhow::Result<()> {
    static TEMPLATE: OnceLock<Result<tempfile::TempDir, String>> = OnceLock::new();
    let template = TEMPLATE
        .get_or_init(|| format_template(home).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    for entry in std::fs::read_dir(template.path().join("data"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), data.join(entry.file_name()))?;
    }
    Ok(())
}

fn format_template(home: &Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("apache-kafka-template-")
        .tempdir()?;
    let config = server_properties(dir.path(), 1, 2, &BrokerOptions::default());
    let props = dir.path().join("server.properties");
    std::fs::write(&props, config)?;
    let out = java(home)
        .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
        .arg(&props)
        .output()
        .context("formatting Kafka storage (java kafka.tools.StorageTool)")?;
    if !out.status.success() {
        bail!(
            "formatting Kafka storage failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

/// A single-node broker and controller. The counts and factors that default to 50 partitions
/// or 3 replicas are 1, and the cleaner's buffer is 16 MiB, not 128: on 2 cores every test
/// runs its own broker. The cluster-wide defaults are those of `docker-compose.yml`.
fn server_properties(dir: &Path, port: u16, controller_port: u16, o: &BrokerOptions) -> String {
    let mut p = format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=6
auto.create.topics.enable=false
offsets.topic.num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.num.partitions=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
log.cleaner.dedupe.buffer.size=16777216
",
        data = dir.join("data").display()
    );
    for (k, v) in &o.overrides {
        p.push_str(&format!("{k}={v}\n"));
    }
    p
}

const LOG4J2: &str = "status = error
appender.file.type = Console
appender.file.name = OUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_version_is_the_one_the_pom_fetches_and_compose_runs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let pom = std::fs::read_to_string(root.join("deploy/kafka/pom.xml")).expect("pom");
        assert!(
            pom.contains(&format!("<kafka.version>{KAFKA_VERSION}</kafka.version>")),
            "deploy/kafka/pom.xml pins another version than {KAFKA_VERSION}"
        );
        let compose = std::fs::read_to_string(root.join("docker-compose.yml")).expect("compose");
        assert!(
            compose.contains(&format!("apache/kafka:{KAFKA_VERSION}")),
            "docker-compose.yml runs another Kafka than {KAFKA_VERSION}"
        );
    }
}
