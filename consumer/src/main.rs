//! `consumer`: one consumer-group worker (join, dedup, deliver, dead-letter).

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Joins customer and product records and delivers them to Analytics"
)]
struct Cli {
    #[command(flatten)]
    config: consumer::ConsumerConfig,
}

fn main() -> anyhow::Result<()> {
    pipeline_core::telemetry::init("info");
    let cli = Cli::parse();
    pipeline_core::shutdown::block_on_main(async {
        consumer::run(cli.config, pipeline_core::shutdown::on_signal()).await
    })?
}
