//! Graceful shutdown: one `CancellationToken` cancelled on SIGTERM or Ctrl-C and passed down to
//! every component, which then finishes its in-flight work and stops; and a `main` runtime that
//! does not wait for blocking Kafka calls still running when the work is done.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGTERM or Ctrl-C.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// How long a finished `main` waits for blocking calls still running (a Kafka metadata fetch
/// or flush, which cannot be cancelled) before the process exits anyway.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// Runs a binary's `main` future on a multi-threaded runtime. Unlike `#[tokio::main]`, whose
/// runtime waits for every `spawn_blocking` task on drop, it gives them [`BLOCKING_GRACE`]:
/// a SIGTERM during a start-up that waits on an unreachable Kafka then exits promptly.
pub fn block_on_main<F: Future>(main: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = runtime.block_on(main);
    runtime.shutdown_timeout(BLOCKING_GRACE);
    Ok(out)
}
