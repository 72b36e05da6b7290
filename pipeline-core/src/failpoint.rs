//! Deterministic crash points for the fault suite.
//!
//! In debug builds (the binaries the tests run), `PIPELINE_FAILPOINT=<name>[:<n>]` makes the
//! `n`-th (default first) arrival at [`hit`]`(name)` freeze the process: it logs, touches
//! `PIPELINE_FAILPOINT_FILE` if set, and blocks forever so the test can `kill -9` it at exactly
//! that point. Release builds compile the checks away.

#[cfg(debug_assertions)]
static SPEC: std::sync::LazyLock<Option<(String, u64)>> = std::sync::LazyLock::new(|| {
    let v = std::env::var("PIPELINE_FAILPOINT").ok()?;
    let (name, n) = match v.split_once(':') {
        Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
        None => (v, 1),
    };
    Some((name, n))
});

/// Whether the failpoint `name` is configured (it may still be waiting for its n-th arrival).
#[cfg(debug_assertions)]
pub fn armed(name: &str) -> bool {
    SPEC.as_ref().is_some_and(|(wanted, _)| wanted == name)
}

/// Release builds carry no failpoints.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn armed(_name: &str) -> bool {
    false
}

/// Freezes the process here if the configured failpoint is `name`.
#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static ARRIVALS: AtomicU64 = AtomicU64::new(0);

    let Some((wanted, n)) = SPEC.as_ref() else {
        return;
    };
    if wanted != name || ARRIVALS.fetch_add(1, Ordering::SeqCst) + 1 != *n {
        return;
    }
    tracing::warn!(failpoint = name, "failpoint reached: freezing until killed");
    if let Ok(path) = std::env::var("PIPELINE_FAILPOINT_FILE") {
        let _ = std::fs::write(path, name);
    }
    loop {
        std::thread::park();
    }
}

/// Release builds carry no failpoints.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) {}
