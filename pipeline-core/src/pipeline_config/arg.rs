//! The `--config` / `PIPELINE_CONFIG` setting: a pipeline file, or the built-in pipeline.

use std::path::PathBuf;
use std::sync::Arc;

use super::PipelineConfig;

/// The `--config` / `PIPELINE_CONFIG` setting shared by the producer and the consumer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PipelineArg {
    /// Pipeline file declaring the sources and the join (TOML, see
    /// `examples/three-sources.toml`). Without it, the built-in CRM + Inventory pipeline runs.
    #[arg(long = "config", env = "PIPELINE_CONFIG")]
    pub file: Option<PathBuf>,
    /// A pipeline given in code (embedded stack, tests); wins over `file`.
    #[arg(skip)]
    pub given: Option<Arc<PipelineConfig>>,
}

impl PipelineArg {
    /// A pipeline given in code.
    pub fn given(p: PipelineConfig) -> Self {
        Self {
            file: None,
            given: Some(Arc::new(p)),
        }
    }

    /// Whether a pipeline other than the built-in one is configured.
    pub fn is_set(&self) -> bool {
        self.file.is_some() || self.given.is_some()
    }

    /// The configured pipeline, or `built_in()` when none is.
    pub fn resolve(
        &self,
        built_in: impl FnOnce() -> PipelineConfig,
    ) -> anyhow::Result<Arc<PipelineConfig>> {
        match self.configured()? {
            Some(p) => Ok(p),
            None => {
                let p = Arc::new(built_in());
                p.validate()?;
                Ok(p)
            }
        }
    }

    /// The pipeline file or the given pipeline, validated; `None` for the built-in one.
    pub fn configured(&self) -> anyhow::Result<Option<Arc<PipelineConfig>>> {
        let p = match (&self.given, &self.file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => Arc::new(PipelineConfig::load(path)?),
            (None, None) => return Ok(None),
        };
        p.validate()?;
        Ok(Some(p))
    }
}
