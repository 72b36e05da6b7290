//! `pipeline dlq list` / `pipeline dlq replay`: reading the DLQ back with the consumer's own join
//! store and Analytics client. The record contract and the writer both roles dead-letter
//! through are `pipeline_core::dlq`.

mod replay;

pub(crate) use pipeline_core::dlq::{DlqItem, DlqWriter};
pub use replay::{
    list, read_all, replay, run, DlqCommand, Listing, NotReplayed, ReplayConfig, ReplayReport,
};
