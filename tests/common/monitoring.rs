//! A real Prometheus and a real Alertmanager (Debian's `prometheus` and
//! `prometheus-alertmanager`, installed by the test command) as child processes on free ports,
//! with the repository's own rules and Alertmanager config, and a webhook receiver that records
//! what Alertmanager posts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use axum::{Json, Router};
use pipeline_kit::process::ChildProcess;
use pipeline_kit::redis_server::free_port;
use serde_json::Value;

use super::wait_until;

/// The shipped alert rules with every `for:` shortened to `for`, so a test sees them fire in
/// seconds; the expressions, labels and annotations are the shipped ones.
pub fn shipped_rules_with_for(for_duration: &str) -> String {
    let rules = std::fs::read_to_string("deploy/prometheus/alerts.yml").unwrap();
    rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("        for: {for_duration}"),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running Prometheus scraping `targets` (job name → addresses) every second.
pub struct Prometheus {
    pub url: String,
    _process: ChildProcess,
}

impl Prometheus {
    /// Starts Prometheus in `dir` with `rules` (if any) and alerts sent to `alertmanager`.
    pub async fn start(
        dir: &Path,
        targets: &[(&str, SocketAddr)],
        rules: Option<&str>,
        alertmanager: Option<&str>,
    ) -> Self {
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if let Some(rules) = rules {
            std::fs::write(dir.join("alerts.yml"), rules).unwrap();
            config.push_str("rule_files:\n  - alerts.yml\n");
        }
        if let Some(am) = alertmanager {
            config.push_str(&format!(
                "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']\n"
            ));
        }
        config.push_str("scrape_configs:\n");
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let args = [
            format!("--config.file={}", path.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
        ];
        let (process, port) = start_ready("prometheus", &args, dir).await;
        Self {
            url: format!("http://127.0.0.1:{port}"),
            _process: process,
        }
    }

    /// Evaluates `expr` now: the error Prometheus gives, or the result's series.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// A running Alertmanager on the shipped config, its receivers' URLs pointing at `receiver`.
pub struct Alertmanager {
    pub addr: String,
    _process: ChildProcess,
}

impl Alertmanager {
    /// Renders `deploy/alertmanager/alertmanager.yml` with `render.sh` as compose does, with
    /// the grouping waits shortened to a second, and starts it.
    pub async fn start(dir: &Path, receiver: &WebhookReceiver) -> Self {
        let rendered = dir.join("alertmanager.rendered.yml");
        let status = Command::new("deploy/alertmanager/render.sh")
            .arg("deploy/alertmanager/alertmanager.yml")
            .arg(&rendered)
            .env("ALERT_WEBHOOK_URL", format!("{}/webhook", receiver.url))
            .env("ALERT_SLACK_WEBHOOK_URL", format!("{}/slack", receiver.url))
            .status()
            .unwrap();
        assert!(status.success(), "render.sh failed");
        let config = std::fs::read_to_string(&rendered)
            .unwrap()
            .replace("group_wait: 30s", "group_wait: 1s")
            .replace("group_interval: 5m", "group_interval: 1s");
        let path: PathBuf = dir.join("alertmanager.yml");
        std::fs::write(&path, config).unwrap();
        let args = [
            format!("--config.file={}", path.display()),
            format!("--storage.path={}", dir.join("am-data").display()),
            "--cluster.listen-address=".to_owned(),
        ];
        let (process, port) = start_ready("prometheus-alertmanager", &args, dir).await;
        Self {
            addr: format!("127.0.0.1:{port}"),
            _process: process,
        }
    }
}

/// Starts `program` (Prometheus or Alertmanager) with `args` and `--web.listen-address` on a
/// free port, its stderr in `dir/<program>.log`, and waits until its `/-/ready` answers.
async fn start_ready(program: &str, args: &[String], dir: &Path) -> (ChildProcess, u16) {
    let port = free_port().unwrap();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{program}.log"))).unwrap());
    let process = ChildProcess::spawn(program, cmd)
        .unwrap_or_else(|e| panic!("{program} is installed (the test command installs it): {e}"));
    wait_ready(&format!("http://127.0.0.1:{port}/-/ready"), program).await;
    (process, port)
}

/// Every POST received, as (name, JSON body).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// An axum server on port 0 recording every POST to `/<name>` as (name, JSON body).
pub struct WebhookReceiver {
    pub url: String,
    received: Received,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let received: Received = Arc::default();
        let app = Router::new()
            .route("/{name}", post(record))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, received }
    }

    /// Every body posted to `/<name>` so far.
    pub fn posted_to(&self, name: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, body)| body.clone())
            .collect()
    }
}

async fn record(
    State(received): State<Received>,
    UrlPath(name): UrlPath<String>,
    Json(body): Json<Value>,
) {
    received.lock().unwrap().push((name, body));
}

async fn wait_ready(url: &str, what: &str) {
    let url = url.to_owned();
    wait_until(&format!("{what} to be ready"), || {
        let url = url.clone();
        async move {
            match reqwest::get(&url).await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
}
