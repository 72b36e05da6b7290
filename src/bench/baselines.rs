//! The two baselines `pipeline bench` measures beside the pipeline, on the same broker and
//! Redis in the same run (a bare rdkafka consumer reading the same topics, pipelined Redis
//! SETs), and Redis's own account of where its time went (`INFO commandstats`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::MultiplexedConnection;
use serde::Serialize;

/// One command's line of `INFO commandstats`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RedisCommandStat {
    pub calls: u64,
    /// Seconds Redis spent executing the command (all calls).
    pub s: f64,
    pub usec_per_call: f64,
}

/// Parses `INFO commandstats` (`cmdstat_<name>:calls=<n>,usec=<u>,usec_per_call=<x>,...`).
/// Redis's own `info` and `config` calls (the bench's) are left out.
pub fn parse_commandstats(info: &str) -> BTreeMap<String, RedisCommandStat> {
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if name == "info" || name.starts_with("config") {
            continue;
        }
        let field = |key: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
            out.insert(
                name.to_owned(),
                RedisCommandStat {
                    calls: calls as u64,
                    s: (usec / 1e4).round() / 100.0,
                    usec_per_call: field("usec_per_call").unwrap_or(0.0),
                },
            );
        }
    }
    out
}

/// `INFO commandstats`, parsed.
pub(super) async fn redis_commandstats(
    conn: &mut MultiplexedConnection,
) -> anyhow::Result<BTreeMap<String, RedisCommandStat>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .context("reading Redis command statistics")?;
    Ok(parse_commandstats(&info))
}

/// Pipelined SETs per second (200,000 SETs in pipelines of 1,000), then FLUSHALL and
/// `CONFIG RESETSTAT`.
pub(super) async fn redis_baseline(conn: &mut MultiplexedConnection) -> anyhow::Result<f64> {
    let value = "x".repeat(200);
    let started = Instant::now();
    let total = 200_000;
    for chunk in 0..(total / 1000) {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET")
                .arg(format!("bench:raw:{}", chunk * 1000 + i))
                .arg(&value)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    redis::cmd("FLUSHALL").query_async::<()>(conn).await?;
    // The first cycle's command statistics start here.
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await?;
    Ok(rate)
}

/// A bare consumer reading every message of `topics` from the beginning: messages per second.
pub(super) async fn consume_baseline(bootstrap: &str, topics: &[&str]) -> anyhow::Result<f64> {
    let bootstrap = bootstrap.to_owned();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "bench-raw-consumer")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut remaining = 0i64;
        for t in &topics {
            let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                let (low, high) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10))?;
                remaining += high - low;
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let total = remaining;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(600);
        while remaining > 0 {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => remaining -= 1,
                Some(Err(e)) => bail!("raw consumer: {e}"),
                None if Instant::now() > deadline => bail!("raw consumer: {remaining} unread"),
                None => {}
            }
        }
        Ok(total as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_are_parsed_without_the_bench_s_own_commands() {
        let info = "# Commandstats\r\n\
            cmdstat_set:calls=800166,usec=2582297,usec_per_call=3.23,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_info:calls=77,usec=4342,usec_per_call=56.39,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_config|resetstat:calls=1,usec=9,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_setrange:calls=300000,usec=487924,usec_per_call=1.63,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_broken:calls=x\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(
            stats.keys().map(String::as_str).collect::<Vec<_>>(),
            ["set", "setrange"]
        );
        assert_eq!(
            stats["set"],
            RedisCommandStat {
                calls: 800_166,
                s: 2.58,
                usec_per_call: 3.23
            }
        );
        assert_eq!(stats["setrange"].s, 0.49);
    }
}
