//! `mocks`: the Analytics, CRM and Inventory stand-ins as a standalone process.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Mock Analytics / CRM / Inventory APIs")]
struct Cli {
    #[command(subcommand)]
    mock: mocks::cli::MockCommand,
}

fn main() -> anyhow::Result<()> {
    pipeline_core::telemetry::init("info");
    let cli = Cli::parse();
    pipeline_core::shutdown::block_on_main(async {
        mocks::cli::run(cli.mock, pipeline_core::shutdown::on_signal()).await
    })?
}
