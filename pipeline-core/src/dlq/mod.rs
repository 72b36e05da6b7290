//! The dead-letter component every role writes through (ARCHITECTURE.md I5): the record
//! contract (header names and the builder that attaches them, in the spirit of Kafka Connect's
//! `__connect.errors.*` headers) and the one writer (`writer`), which returns only once Kafka
//! acknowledged every record. Reading the DLQ back (`pipeline dlq list/replay`) is the
//! consumer's, because replay needs its join store.

mod writer;

pub use writer::{DlqItem, DlqWriter, WriteAbandoned};

use rdkafka::message::{Header, OwnedHeaders};

pub const STAGE: &str = "dlq.stage";
pub const REASON: &str = "dlq.reason";
pub const ERROR_CLASS: &str = "dlq.error.class";
pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
pub const ATTEMPTS: &str = "dlq.attempts";
pub const HTTP_STATUS: &str = "dlq.http.status";
pub const FIRST_FAILURE_AT: &str = "dlq.first-failure-at";
pub const FAILED_AT: &str = "dlq.failed-at";
/// Size of an original value too large to copy into the DLQ (the value is then left out).
pub const VALUE_OMITTED: &str = "dlq.value.omitted-bytes";
/// The idempotency key of a dead-lettered merged record (used by replay).
pub const RECORD_KEY: &str = "dlq.record.key";

/// Where in the pipeline a record failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Parse,
    Validate,
    Join,
    Deliver,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Validate => "validate",
            Stage::Join => "join",
            Stage::Deliver => "deliver",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "parse" => Stage::Parse,
            "validate" => Stage::Validate,
            "join" => Stage::Join,
            "deliver" => Stage::Deliver,
            _ => return None,
        })
    }
}

/// Everything a DLQ record says about its failure.
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Stage,
    pub reason: String,
    pub error_class: String,
    pub original_topic: String,
    pub original_partition: i32,
    pub original_offset: i64,
    pub attempts: u32,
    pub http_status: Option<u16>,
    pub first_failure_at: chrono::DateTime<chrono::Utc>,
    pub record_key: Option<String>,
}

impl Failure {
    /// The Kafka headers of this failure, `extra` (e.g. the original message's headers) first.
    pub fn headers(&self, extra: OwnedHeaders) -> OwnedHeaders {
        let now = chrono::Utc::now().to_rfc3339();
        let partition = self.original_partition.to_string();
        let offset = self.original_offset.to_string();
        let attempts = self.attempts.to_string();
        let first = self.first_failure_at.to_rfc3339();
        let mut h = extra
            .insert(header(STAGE, self.stage.as_str()))
            .insert(header(REASON, &self.reason))
            .insert(header(ERROR_CLASS, &self.error_class))
            .insert(header(ORIGINAL_TOPIC, &self.original_topic))
            .insert(header(ORIGINAL_PARTITION, &partition))
            .insert(header(ORIGINAL_OFFSET, &offset))
            .insert(header(ATTEMPTS, &attempts))
            .insert(header(FIRST_FAILURE_AT, &first))
            .insert(header(FAILED_AT, &now));
        if let Some(status) = self.http_status {
            h = h.insert(header(HTTP_STATUS, &status.to_string()));
        }
        if let Some(key) = &self.record_key {
            h = h.insert(header(RECORD_KEY, key));
        }
        h
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
