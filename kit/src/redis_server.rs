//! A throw-away `redis-server` child process for the embedded stack, tests and benchmarks.
//!
//! Started on a free loopback port with persistence off; killed when dropped. Production points
//! `REDIS_URL` at a real Redis instead.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running `redis-server` owned by this process.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Whether a `redis-server` binary is on the PATH.
    pub fn available() -> bool {
        Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Spawns `redis-server` on a free port and waits until it answers.
    pub fn spawn() -> anyhow::Result<Self> {
        Self::spawn_on(free_port()?)
    }

    /// Spawns an empty `redis-server` on `port` (fault tests restart one where the old one was).
    pub fn spawn_on(port: u16) -> anyhow::Result<Self> {
        Self::spawn_with(port, &[])
    }

    /// Spawns `redis-server` on `port` with extra arguments (e.g. `--requirepass`).
    pub fn spawn_with(port: u16, extra_args: &[&str]) -> anyhow::Result<Self> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting redis-server (install it: apt-get install -y redis-server)")?;
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                // `+PONG`, or `-NOAUTH` from a server that requires a password: either way it is up.
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
                {
                    return Ok(server);
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!("redis-server exited early: {status}");
            }
            if Instant::now() > deadline {
                let _ = server.child.kill();
                bail!("redis-server did not answer on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The child's pid (for fault tests that stop or kill it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(l.local_addr()?.port())
}
