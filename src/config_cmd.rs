//! `pipeline config check FILE`: validates a pipeline file before it is deployed, the way
//! `promtool check config` does for Prometheus: syntax, unknown keys, types, `${VAR}`s and
//! `auth.value_env`s that are not set, URLs, names, join sides and the partition counts of the
//! joined topics; with `--brokers`, also the partition counts of the topics that already exist.

use std::path::PathBuf;

use pipeline_core::kafka::KafkaConfig;
use pipeline_core::pipeline_config::PipelineConfig;
use pipeline_core::topics::{check_co_partitioned, partition_counts};

/// `pipeline config ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a pipeline file; prints what it declares, or the first error with its line and key.
    Check {
        /// The pipeline file (TOML).
        file: PathBuf,
        /// Also check the joined topics that exist on these brokers (bootstrap servers).
        #[arg(long)]
        brokers: Option<String>,
    },
}

/// Runs the command; `Ok(false)` when the file is invalid.
pub async fn run(cmd: ConfigCommand) -> anyhow::Result<bool> {
    let ConfigCommand::Check { file, brokers } = cmd;
    let pipeline = match PipelineConfig::load(&file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(false);
        }
    };
    if let Some(brokers) = brokers {
        let kafka = KafkaConfig::new(&brokers);
        let joined: Vec<String> = pipeline
            .join_topics()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let names: Vec<&str> = joined.iter().map(String::as_str).collect();
        let counts = partition_counts(&kafka, &names).await?;
        if let Err(e) = check_co_partitioned(&counts, &joined) {
            eprintln!("error: {}: join.sides: {e}", file.display());
            return Ok(false);
        }
        let declared = pipeline.partitions_by_topic();
        for (topic, n) in &counts {
            if let Some(d) = declared.get(topic.as_str()).filter(|d| **d as usize != *n) {
                eprintln!(
                    "warning: topic {topic} exists with {n} partitions; the file declares {d}"
                );
            }
        }
    }
    println!("{}: OK", file.display());
    for s in &pipeline.sources {
        println!(
            "  source {:<12} {} -> {} (every {} s, {} pagination{})",
            s.name,
            pipeline_core::http::redact_url(&s.url()),
            s.topic,
            s.interval_s,
            pagination_name(&s.pagination),
            if s.incremental.updated_since_param.is_some() {
                ", incremental"
            } else {
                ""
            }
        );
    }
    for side in &pipeline.join.sides {
        println!(
            "  join   {:<12} {} ({})",
            side.name,
            side.topic,
            if side.required {
                "required"
            } else {
                "optional"
            }
        );
    }
    Ok(true)
}

fn pagination_name(p: &pipeline_core::pipeline_config::Pagination) -> &'static str {
    use pipeline_core::pipeline_config::Pagination::*;
    match p {
        Page { .. } => "page",
        Offset { .. } => "offset",
        Cursor { .. } => "cursor",
        Link { .. } => "link",
    }
}
