//! The consumer's dead-letter component: the writer its workers dead-letter through (`writer`),
//! and `pipeline dlq list` / `pipeline dlq replay` (`replay`), which read the DLQ back with the
//! consumer's own join store and Analytics client. The record contract (header names) is in
//! `pipeline_core::dlq`, shared with the producer.

mod replay;
mod writer;

pub use replay::{
    list, read_all, replay, run, DlqCommand, Listing, NotReplayed, ReplayConfig, ReplayReport,
};
pub(crate) use writer::{DlqItem, DlqWriter};
