//! Test and demo infrastructure, kept out of `pipeline-core` so that the producer and consumer
//! crates never link it: a single-node Apache Kafka (`apache_kafka`) and a `redis-server`
//! (`redis_server`) as child processes on free ports, and the supervisor of every other child
//! process (`process`); and the embedded stack built from them (`stack`: Kafka, Redis, the mocks
//! and N consumers in one process). `pipeline up`, `pipeline broker`, the benchmarks and the
//! tests start theirs here.
//!
//! The consumer's debug-build failpoints stay in `pipeline-core`: the consumer calls them, and
//! it must not link this crate.

pub mod apache_kafka;
pub mod process;
pub mod redis_server;
pub mod stack;
