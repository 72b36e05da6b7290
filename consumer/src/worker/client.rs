//! The consumer's librdkafka settings: offsets stored by the worker and auto-committed, a bounded
//! prefetch, and range assignment in either group protocol so that one member holds the same
//! partition number of every side topic (the join needs it).

use rdkafka::ClientConfig;

use crate::config::{ConsumerConfig, GroupProtocol};

/// The client configuration of one worker; `KAFKA_PROP_*` settings win.
pub(super) fn client_config(config: &ConsumerConfig) -> ClientConfig {
    let mut cc = config.kafka.client_config();
    cc.set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Bounded prefetch (librdkafka defaults to 64 MB queued + 50 MB fetches): a worker
        // takes a batch at a time, and memory is a target (docs/performance.md).
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "4194304")
        // Small runs per partition (librdkafka's default is 1 MB, about 7,000 compressed
        // records): a fetch then brings every partition of both topics, so the two sides of
        // an id reach the pairing buffer close together. Kafka still returns a record batch
        // larger than this whole.
        .set("max.partition.fetch.bytes", "16384");
    // Range assignment in both protocols: it gives one member the same partition number of
    // every side topic, which the join needs (co-partitioning).
    match config.group_protocol {
        GroupProtocol::Classic => cc
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout_ms / 4).max(100).to_string(),
            ),
        // The broker owns session and heartbeat timing here; librdkafka refuses both.
        GroupProtocol::Consumer => cc
            .set("group.protocol", "consumer")
            .set("group.remote.assignor", "range"),
    };
    for (k, v) in config.kafka.all_props() {
        cc.set(k, v);
    }
    cc
}
