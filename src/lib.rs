//! The all-in-one `pipeline` binary's library: the embedded stack (`pipeline up`), the standalone
//! broker (`pipeline broker`) and the JSON summary of a one-shot run. Tests and benchmarks use
//! [`stack::Stack`] directly, so everything `pipeline up` does is testable without a process
//! boundary.

pub mod bench;
pub mod broker;
pub mod config_cmd;
pub mod stack;
pub mod up;
