//! The benchmark command as CI runs it: a small `pipeline bench --json` whose correctness fields
//! are checked (never its timings: speed is reported, not asserted).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::procs::BIN;

/// Runs `pipeline bench --json` with `args` and returns its report.
fn bench(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["bench", "--json", "--timeout-s", "300"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    eprintln!("{r}");
    r
}

#[test]
fn a_small_bench_delivers_everything_once() {
    let r = bench(&["--customers", "20000", "--products", "20000"]);
    assert_eq!(r["published"], 40_000, "{r}");
    // The re-poll's fresh producer sent the ETags the first one saved: all 304s.
    assert_eq!(r["repoll_published"], 0, "{r}");
    assert_eq!(r["delivered_unique"], 20_000, "{r}");
    assert_eq!(r["duplicates_received"], 0, "{r}");
    assert_eq!(r["repoll_delivered"], 0, "{r}");
    assert_eq!(r["dlq"], 0, "{r}");
    assert_eq!(r["broker_evicted_msgs"], 0, "{r}");
    assert_eq!(r["success"], true, "{r}");
    for field in [
        "export_s",
        "end_to_end_s",
        "merged_per_s",
        "input_msgs_per_s",
        "repoll_s",
        "consumer_peak_rss_mb",
        "producer_peak_rss_mb",
        "raw_consume_msgs_per_s",
        "raw_redis_ops_per_s",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    // Redis's accounting of the first cycle: each delivered id was claimed and confirmed (two
    // SETs) and its delivered key written into its state (SETRANGE); the baseline's 200,000
    // SETs were reset before the cycle, not counted.
    let calls = |cmd: &str| r["redis_commands"][cmd]["calls"].as_u64().unwrap_or(0);
    assert!(calls("set") >= 40_000 && calls("set") < 200_000, "{r}");
    assert!(calls("setrange") >= 20_000, "{r}");
    assert!(calls("mset") >= 1 && calls("exec") >= 1, "{r}");
}

#[test]
fn a_full_re_export_is_absorbed_by_the_consumers() {
    let r = bench(&[
        "--customers",
        "5000",
        "--products",
        "5000",
        "--repoll-full-export",
    ]);
    assert_eq!(r["published"], 10_000, "{r}");
    assert_eq!(r["repoll_published"], 10_000, "{r}");
    assert_eq!(r["repoll_delivered"], 0, "{r}");
    assert_eq!(r["delivered_unique"], 5_000, "{r}");
    assert_eq!(r["duplicates_received"], 0, "{r}");
    assert_eq!(r["success"], true, "{r}");
}
