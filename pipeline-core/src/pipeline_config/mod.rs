//! The pipeline file: which source APIs to poll and how their topics join, as configuration
//! instead of code (the way Kafka Connect and Redpanda Connect pipelines are declared).
//!
//! A file is TOML (annotated example: `examples/three-sources.toml`). Without one, the pipeline
//! runs the built-in two-source setup ([`PipelineConfig::two_sources`]) from the classic
//! settings (`CRM_URL`, `INVENTORY_URL`, `CUSTOMER_TOPIC`, ...), so existing deployments keep
//! working unchanged. Loading checks everything it can without a network: unknown keys, types,
//! `${VAR}` references to unset environment variables, URLs, names, join sides and the partition
//! counts of co-partitioned topics. Every error names the file, line and key.

mod arg;
mod builtin;
mod join_plan;
mod parse;
mod validate;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::record::RecordShape;
use crate::topics::{TopicPlan, TopicsConfig};

pub use arg::PipelineArg;
pub use builtin::TwoSources;
pub use join_plan::JoinPlan;
pub use parse::interpolate;

/// Where a configuration error is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<built-in>`).
    pub origin: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key path, e.g. `sources[2] (pricing).auth.value_env`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}: {}", self.origin, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.origin, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A whole pipeline: its sources and its join.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineConfig {
    /// The file it came from (`<built-in>` for the default).
    pub origin: String,
    pub sources: Vec<SourceConfig>,
    pub join: JoinConfig,
}

/// One source API and the topic it feeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Short unique name, used in the `source` header, metrics and the incremental-sync state.
    pub name: String,
    /// Base URL of the API; `${VAR}` and `${VAR:-default}` are taken from the environment.
    pub base_url: String,
    /// Path of the collection under `base_url`, e.g. `/customers`.
    #[serde(default = "defaults::path")]
    pub path: String,
    /// Entity name (`customer`), sent in the `entity` header.
    pub entity: String,
    /// Schema id sent in the `schema` header; default `<entity>.v1`.
    #[serde(default)]
    pub schema: Option<String>,
    /// Topic the records are published to, keyed by their id.
    pub topic: String,
    /// Partitions of `topic` when it has to be created.
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    /// Field holding the record's id (the Kafka key, hence the join key).
    #[serde(default = "defaults::id_field")]
    pub id_field: String,
    /// Field holding the record's version timestamp (RFC 3339 or epoch ms).
    #[serde(default = "defaults::updated_at_field")]
    pub updated_at_field: String,
    /// Field of the page body holding the records; default: `data`, `items` or `records`, or
    /// the body itself when it is an array.
    #[serde(default)]
    pub records_field: Option<String>,
    /// Seconds between two polls of this source.
    #[serde(default = "defaults::interval_s")]
    pub interval_s: u64,
    /// Timeout of one request, in milliseconds.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Most requests per second to this API (unlimited when absent).
    #[serde(default)]
    pub rate_limit_per_s: Option<f64>,
    #[serde(default)]
    pub pagination: Pagination,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub incremental: IncrementalConfig,
    /// Only for the embedded stack (`pipeline up`): serve this source from a generated mock.
    #[serde(default)]
    pub mock: Option<MockSourceConfig>,
}

/// How a source pages through its collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "style", rename_all = "snake_case", deny_unknown_fields)]
pub enum Pagination {
    /// `?page=1&per_page=N`, next page while the body's `next_page` is not null (or, without
    /// that field, while pages come back full).
    Page {
        #[serde(default = "defaults::page_param")]
        page_param: String,
        #[serde(default = "defaults::per_page_param")]
        size_param: String,
        #[serde(default = "defaults::page_size")]
        size: u64,
    },
    /// `?offset=0&limit=N`, next offset while pages come back full.
    Offset {
        #[serde(default = "defaults::offset_param")]
        offset_param: String,
        #[serde(default = "defaults::limit_param")]
        size_param: String,
        #[serde(default = "defaults::page_size")]
        size: u64,
    },
    /// `?cursor=<c>&limit=N`, the next cursor read from a field of the body (null or absent:
    /// last page).
    Cursor {
        #[serde(default = "defaults::cursor_param")]
        cursor_param: String,
        #[serde(default = "defaults::limit_param")]
        size_param: String,
        #[serde(default = "defaults::page_size")]
        size: u64,
        #[serde(default = "defaults::next_cursor_field")]
        next_cursor_field: String,
    },
    /// The next page's URL from the `Link: <...>; rel="next"` response header (RFC 8288).
    Link {
        #[serde(default = "defaults::per_page_param")]
        size_param: String,
        #[serde(default = "defaults::page_size")]
        size: u64,
    },
}

impl Default for Pagination {
    fn default() -> Self {
        Pagination::Page {
            page_param: defaults::page_param(),
            size_param: defaults::per_page_param(),
            size: defaults::page_size(),
        }
    }
}

impl Pagination {
    /// Records asked for per page.
    pub fn size(&self) -> u64 {
        match self {
            Pagination::Page { size, .. }
            | Pagination::Offset { size, .. }
            | Pagination::Cursor { size, .. }
            | Pagination::Link { size, .. } => *size,
        }
    }
}

/// A header whose value comes from the environment (never written in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Header name.
    #[serde(default = "defaults::auth_header")]
    pub header: String,
    /// Environment variable holding the secret.
    pub value_env: String,
    /// Text put before the secret, e.g. `"Bearer "`.
    #[serde(default)]
    pub prefix: String,
}

/// Retries of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request (first included) before the poll fails and waits for the next one.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Backoff cap of the first retry, in milliseconds (full jitter, doubling).
    #[serde(default = "defaults::initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest backoff, in milliseconds.
    #[serde(default = "defaults::max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: defaults::max_attempts(),
            initial_backoff_ms: defaults::initial_backoff_ms(),
            max_backoff_ms: defaults::max_backoff_ms(),
        }
    }
}

/// Incremental sync: fetch only what changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// Send `If-None-Match` with the ETag of the last published poll of each page.
    #[serde(default = "defaults::yes")]
    pub etag: bool,
    /// Query parameter carrying the greatest `updated_at` of the last published poll
    /// (e.g. `updated_since`). The cursor is kept in the source-state topic, so a restart
    /// resumes from it instead of re-exporting everything.
    #[serde(default)]
    pub updated_since_param: Option<String>,
}

impl Default for IncrementalConfig {
    fn default() -> Self {
        Self {
            etag: true,
            updated_since_param: None,
        }
    }
}

/// What the embedded stack's mock of a source generates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockSourceConfig {
    /// `customers`, `products` or `pricing`.
    pub entity: String,
    /// Generated records (ids 1..=N).
    #[serde(default = "defaults::mock_records")]
    pub records: u64,
}

/// The join: which topics meet on their message key (the id) and which must be present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    pub sides: Vec<JoinSide>,
}

/// One side of the join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSide {
    /// Field of the merged record holding this side's record (`customer`, `inventory`).
    pub name: String,
    /// Topic of this side; records meet on the message key, which each source sets from its
    /// `id_field`.
    pub topic: String,
    /// Required sides must all be present before a merged record is emitted; optional sides
    /// enrich it when they arrive (a new view, delivered under a new key).
    #[serde(default = "defaults::yes")]
    pub required: bool,
}

mod defaults {
    pub fn path() -> String {
        "/".into()
    }
    pub fn partitions() -> i32 {
        6
    }
    pub fn id_field() -> String {
        "id".into()
    }
    pub fn updated_at_field() -> String {
        "updated_at".into()
    }
    pub fn interval_s() -> u64 {
        60
    }
    pub fn timeout_ms() -> u64 {
        10_000
    }
    pub fn page_param() -> String {
        "page".into()
    }
    pub fn per_page_param() -> String {
        "per_page".into()
    }
    pub fn offset_param() -> String {
        "offset".into()
    }
    pub fn limit_param() -> String {
        "limit".into()
    }
    pub fn cursor_param() -> String {
        "cursor".into()
    }
    pub fn next_cursor_field() -> String {
        "next_cursor".into()
    }
    pub fn page_size() -> u64 {
        1000
    }
    pub fn auth_header() -> String {
        "Authorization".into()
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn initial_backoff_ms() -> u64 {
        200
    }
    pub fn max_backoff_ms() -> u64 {
        10_000
    }
    pub fn yes() -> bool {
        true
    }
    pub fn mock_records() -> u64 {
        1000
    }
}

impl PipelineConfig {
    /// Partition count of each source topic.
    pub fn partitions_by_topic(&self) -> BTreeMap<&str, i32> {
        let mut out = BTreeMap::new();
        for s in &self.sources {
            out.entry(s.topic.as_str()).or_insert(s.partitions);
        }
        out
    }

    /// Every data topic (source topics), each once, in declaration order.
    pub fn data_topics(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.sources {
            if !out.contains(&s.topic) {
                out.push(s.topic.clone());
            }
        }
        out
    }

    /// The join's topics in side order.
    pub fn join_topics(&self) -> Vec<&str> {
        self.join.sides.iter().map(|s| s.topic.as_str()).collect()
    }

    /// What must exist in Kafka for this pipeline: its data topics with their partition
    /// counts (compacted), co-partitioned as the join needs, and the service topics of
    /// `topics` (see [`TopicsConfig::plan`]).
    pub fn topic_plan(&self, topics: &TopicsConfig) -> TopicPlan {
        topics.plan(&self.partitions_by_topic(), &self.join_topics())
    }

    /// The record shape of the source publishing to `topic` (default shape if none does).
    pub fn shape_of_topic(&self, topic: &str) -> RecordShape {
        self.sources
            .iter()
            .find(|s| s.topic == topic)
            .map(SourceConfig::shape)
            .unwrap_or_default()
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

impl SourceConfig {
    pub fn shape(&self) -> RecordShape {
        RecordShape {
            id_field: self.id_field.clone(),
            updated_at_field: self.updated_at_field.clone(),
        }
    }

    pub fn schema(&self) -> String {
        self.schema
            .clone()
            .unwrap_or_else(|| format!("{}.v1", self.entity))
    }

    /// The collection URL (`base_url` + `path`).
    pub fn url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        match self.path.as_str() {
            "" | "/" => base.to_owned(),
            p if p.starts_with('/') => format!("{base}{p}"),
            p => format!("{base}/{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[sources]]
name = "crm"
base_url = "${CRM_URL:-http://localhost:8081}"
path = "/customers"
entity = "customer"
topic = "customer_data"

[[sources]]
name = "pricing"
base_url = "http://pricing:8083"
path = "/pricing"
entity = "price"
topic = "pricing_data"
id_field = "product_id"
pagination = { style = "cursor", size = 500 }
auth = { value_env = "PRICING_TOKEN", prefix = "Bearer " }
incremental = { updated_since_param = "updated_since" }

[join]
sides = [
  { name = "customer", topic = "customer_data" },
  { name = "pricing", topic = "pricing_data", required = false },
]
"#;

    fn env(v: &str) -> Option<String> {
        (v == "PRICING_TOKEN").then(|| "t0ken".to_owned())
    }

    #[test]
    fn parses_a_file_with_defaults_and_interpolation() {
        let c = PipelineConfig::parse(GOOD, "good.toml", &env).unwrap();
        assert_eq!(c.sources[0].url(), "http://localhost:8081/customers");
        assert_eq!(c.sources[0].schema(), "customer.v1");
        assert_eq!(c.sources[1].shape().id_field, "product_id");
        assert!(matches!(
            c.sources[1].pagination,
            Pagination::Cursor { size: 500, .. }
        ));
        assert!(!c.join.sides[1].required);
        assert_eq!(c.data_topics(), ["customer_data", "pricing_data"]);
    }

    fn error_of(text: &str) -> String {
        PipelineConfig::parse(text, "f.toml", &env)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let e = error_of(&GOOD.replace("entity = \"price\"", "entity = \"price\"\nentitty = 1"));
        assert!(e.starts_with("f.toml:14:") && e.contains("entitty"), "{e}");
        let e = error_of(&GOOD.replace("PRICING_TOKEN", "MISSING_TOKEN"));
        assert!(
            e.starts_with("f.toml:9:")
                && e.contains("sources[1] (pricing).auth.value_env")
                && e.contains("MISSING_TOKEN"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("http://pricing:8083", "pricing:8083"));
        assert!(e.contains("sources[1] (pricing).base_url"), "{e}");
        let e = error_of(&GOOD.replace("${CRM_URL:-http://localhost:8081}", "${CRM_URL}"));
        assert!(
            e.contains("CRM_URL is not set") && e.starts_with("f.toml:2:"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "topic = \"pricing_data\"\nid_field",
            "topic = \"pricing_data\"\npartitions = 3\nid_field",
        ));
        assert!(
            e.contains("same partition count") && e.contains("join.sides"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("style = \"cursor\"", "style = \"scroll\""));
        assert!(e.contains("scroll"), "{e}");
        let e = error_of(&GOOD.replace(
            "{ name = \"pricing\", topic = \"pricing_data\"",
            "{ name = \"pricing\", topic = \"orders\"",
        ));
        assert!(
            e.contains("join.sides[1] (pricing).topic") && e.contains("no source"),
            "{e}"
        );
    }

    #[test]
    fn the_built_in_pipeline_is_valid() {
        let topics = TopicsConfig::default();
        let c = PipelineConfig::two_sources(&TwoSources {
            crm_url: "http://crm:8081",
            inventory_url: "http://inventory:8082/",
            topics: &topics,
            page_size: 1000,
            interval_s: 60,
            timeout_ms: 10_000,
            max_attempts: 5,
        });
        c.validate().unwrap();
        assert_eq!(c.sources[1].url(), "http://inventory:8082/products");
        assert_eq!(c.join_topics(), ["customer_data", "inventory_data"]);
    }

    #[test]
    fn interpolation() {
        let env = |v: &str| (v == "A").then(|| "x".to_owned());
        assert_eq!(interpolate("${A}/${B:-y}", &env).unwrap(), "x/y");
        assert!(interpolate("${B}", &env)
            .unwrap_err()
            .contains("B is not set"));
    }
}
