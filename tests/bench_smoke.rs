//! The benchmark command as CI runs it: a small `pipeline bench --json` whose correctness fields
//! are checked (never its timings: speed is reported, not asserted).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::procs::BIN;

/// Runs `pipeline bench <args> --json` and returns its report.
fn bench(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--json", "--timeout-s", "300"])
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

#[test]
fn the_rebalance_bench_times_both_protocols_and_finds_them_co_partitioned() {
    let r = bench(&[
        "rebalance",
        "--rounds",
        "1",
        "--records",
        "2000",
        "--broker-setting",
        "group.consumer.heartbeat.interval.ms=1000",
        "--broker-setting",
        "group.consumer.min.heartbeat.interval.ms=1000",
        "--broker-setting",
        "group.consumer.session.timeout.ms=6000",
        "--broker-setting",
        "group.consumer.min.session.timeout.ms=6000",
    ]);
    assert_eq!(r["kafka"]["name"], "Apache Kafka", "{r}");
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(
        r["broker_settings"]["group.consumer.session.timeout.ms"], "6000",
        "{r}"
    );
    for protocol in ["classic", "consumer"] {
        let p = &r["protocols"][protocol];
        assert_eq!(p["join_s"].as_array().map(Vec::len), Some(2), "{r}");
        for event in ["join", "leave", "kill"] {
            let median = p[format!("{event}_median_s")].as_f64().unwrap();
            assert!(median > 0.0, "{protocol} {event}: {r}");
            let held = p[format!("{event}_fewest_held")].as_i64().unwrap();
            assert!((0..12).contains(&held), "{protocol} {event}: {r}");
        }
    }
    // KIP-848 keeps what does not move: some partitions stay held while a member joins.
    assert!(
        r["protocols"]["consumer"]["join_fewest_held"].as_i64() > Some(0),
        "{r}"
    );
}
