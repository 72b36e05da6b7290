//! Test and demo infrastructure, kept out of `pipeline-core` so that the producer and consumer
//! crates never link it: a single-node Apache Kafka (`apache_kafka`) and a `redis-server`
//! (`redis_server`) as child processes on free ports, and the supervisor of every other child
//! process (`process`). `pipeline up`, `pipeline broker`, the benchmarks and the tests start
//! theirs here.

pub mod apache_kafka;
pub mod process;
pub mod redis_server;
