//! `pipeline`: the all-in-one command. `up` runs the embedded stack, `broker` runs Apache Kafka
//! with the pipeline's topics for other processes, and `producer`, `consumer`, `mock` run one
//! component standalone.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc, without transparent huge pages, also serving librdkafka's `malloc`/`free`: glibc
// malloc was the largest cost in every role's profile (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "CRM + Inventory -> Kafka -> Analytics streaming pipeline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything from one command on Apache Kafka (`--once --json` for one cycle).
    Up(pipeline::up::UpConfig),
    /// Benchmark the pipeline on the embedded stack; prints JSON (`--json`).
    Bench(pipeline::bench::BenchCommand),
    /// Run Apache Kafka with the pipeline's topics for producers, consumers and kcat.
    Broker(pipeline::broker::BrokerConfig),
    /// Run the producer (source pollers → Kafka).
    Producer(producer::ProducerConfig),
    /// Run one consumer worker (join, dedup, deliver, DLQ).
    Consumer(consumer::ConsumerConfig),
    /// Inspect (`list`) or re-deliver (`replay`) the dead-letter topic.
    #[command(subcommand)]
    Dlq(consumer::dlq::DlqCommand),
    /// Validate a pipeline file (`pipeline config check FILE`).
    #[command(subcommand)]
    Config(pipeline::config_cmd::ConfigCommand),
    /// Run a mock API (analytics, crm, inventory, or any source).
    #[command(subcommand)]
    Mock(mocks::cli::MockCommand),
}

fn main() -> ExitCode {
    pipeline_core::telemetry::init("info,rdkafka=warn");
    let cli = Cli::parse();
    match pipeline_core::shutdown::block_on_main(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let shutdown = pipeline_core::shutdown::on_signal();
    let result = match cli.command {
        Command::Up(c) => pipeline::up::run(c, shutdown).await,
        Command::Bench(c) => pipeline::bench::print(c).await,
        Command::Broker(c) => pipeline::broker::run(c, shutdown).await.map(|_| true),
        Command::Producer(c) => producer::run(c, shutdown).await.map(|_| true),
        Command::Consumer(c) => consumer::run(c, shutdown).await.map(|_| true),
        Command::Dlq(c) => consumer::dlq::run(c, shutdown).await,
        Command::Config(c) => pipeline::config_cmd::run(c).await,
        Command::Mock(c) => mocks::cli::run(c, shutdown).await.map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
