//! The all-in-one `pipeline` binary's library: `pipeline up` on the kit's embedded stack, the
//! standalone broker (`pipeline broker`), the benchmarks and `config check`. Tests use
//! `pipeline_kit::stack::Stack` directly, so everything `pipeline up` does is testable without a
//! process boundary.

pub mod bench;
pub mod broker;
pub mod config_cmd;
pub mod up;
