//! `producer`: polls the CRM and Inventory APIs and publishes their records to Kafka.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Polls CRM and Inventory and publishes their records to Kafka"
)]
struct Cli {
    #[command(flatten)]
    config: producer::ProducerConfig,
}

fn main() -> anyhow::Result<()> {
    pipeline_core::telemetry::init("info");
    let cli = Cli::parse();
    pipeline_core::shutdown::block_on_main(async {
        producer::run(cli.config, pipeline_core::shutdown::on_signal()).await
    })?
}
