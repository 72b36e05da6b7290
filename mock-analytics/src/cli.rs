//! Command line of the standalone mocks (`mock-analytics <analytics|crm|inventory>` and
//! `pipeline mock ...`).

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::analytics::{AnalyticsMock, AnalyticsMockConfig};
use crate::sources::{Entity, SourceMock, SourceMockConfig};

/// Which mock to serve.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MockCommand {
    /// The Analytics API (`POST /analytics/data`, `GET /analytics/stats`).
    Analytics {
        /// Listen address.
        #[arg(long, env = "MOCK_ADDR", default_value = "0.0.0.0:8080")]
        addr: SocketAddr,
        #[command(flatten)]
        config: AnalyticsMockConfig,
    },
    /// The CRM API (`GET /customers`).
    Crm {
        /// Listen address.
        #[arg(long, env = "MOCK_ADDR", default_value = "0.0.0.0:8081")]
        addr: SocketAddr,
        #[command(flatten)]
        config: SourceMockConfig,
    },
    /// The Inventory API (`GET /products`).
    Inventory {
        /// Listen address.
        #[arg(long, env = "MOCK_ADDR", default_value = "0.0.0.0:8082")]
        addr: SocketAddr,
        #[command(flatten)]
        config: SourceMockConfig,
    },
}

/// Serves the chosen mock until `shutdown`.
pub async fn run(cmd: MockCommand, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cmd {
        MockCommand::Analytics { addr, config } => {
            config.faults.validate()?;
            crate::serve(addr, AnalyticsMock::new(&config).router(), shutdown).await
        }
        MockCommand::Crm { addr, config } => {
            config.faults.validate()?;
            crate::serve(
                addr,
                SourceMock::new(Entity::Customers, &config).router(),
                shutdown,
            )
            .await
        }
        MockCommand::Inventory { addr, config } => {
            config.faults.validate()?;
            crate::serve(
                addr,
                SourceMock::new(Entity::Products, &config).router(),
                shutdown,
            )
            .await
        }
    }
}
