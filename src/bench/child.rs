//! A benchmark's child `pipeline` process (a consumer, a producer): its memory and CPU are its
//! own. Supervised by `pipeline_kit::process`.

use std::process::{Command, Stdio};

use anyhow::Context;
use pipeline_kit::process::ChildProcess;

/// Starts `pipeline <args>` as `name` with `env`, its stdout piped (a producer's `--once`
/// report), logging at `RUST_LOG` (default `warn`).
pub(crate) fn spawn(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<ChildProcess> {
    let exe = std::env::current_exe().context("locating the pipeline binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildProcess::spawn(name, cmd)
}
