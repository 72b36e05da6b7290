//! Command line of the standalone mocks (`mocks <analytics|crm|inventory|source>` and
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
    /// Any source mock: `--entity customers|products|pricing` on `--path`.
    Source {
        /// Listen address.
        #[arg(long, env = "MOCK_ADDR", default_value = "0.0.0.0:8083")]
        addr: SocketAddr,
        /// What the records look like.
        #[arg(long, env = "MOCK_ENTITY", value_enum)]
        entity: Entity,
        /// Collection path (default: the entity's, e.g. `/pricing`).
        #[arg(long, env = "MOCK_PATH")]
        path: Option<String>,
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
        MockCommand::Source {
            addr,
            entity,
            path,
            config,
        } => {
            config.faults.validate()?;
            let mock = SourceMock::new(entity, &config);
            let mock = match path {
                Some(p) => mock.with_path(&p),
                None => mock,
            };
            crate::serve(addr, mock.router(), shutdown).await
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
