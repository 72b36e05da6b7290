//! Shared building blocks of the pipeline: the data contracts (records, canonical hashing, DLQ
//! headers), clients for Kafka, Redis and HTTP, the retry policy, the metrics registry with its
//! `/metrics` `/health` `/ready` server, telemetry and shutdown.
//!
//! Every deployable (`producer`, `consumer`, the mocks, the all-in-one `pipeline` binary) is built
//! from these pieces so that names and contracts (ARCHITECTURE.md) live in exactly one place.

pub mod canonical;
pub mod dlq;
pub mod failpoint;
pub mod http;
pub mod kafka;
pub mod lag;
pub mod memory;
pub mod metrics;
pub mod pipeline_config;
pub mod record;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod topics;
