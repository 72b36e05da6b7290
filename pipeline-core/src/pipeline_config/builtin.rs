//! The built-in pipeline, CRM customers ⋈ Inventory products, from the classic settings
//! (`CRM_URL`, `INVENTORY_URL`, `CUSTOMER_TOPIC`, ...), for deployments without a file.

use crate::topics::TopicsConfig;

use super::*;

/// Settings of the built-in two-source pipeline.
#[derive(Debug, Clone)]
pub struct TwoSources<'a> {
    pub crm_url: &'a str,
    pub inventory_url: &'a str,
    pub topics: &'a TopicsConfig,
    pub page_size: u64,
    pub interval_s: u64,
    pub timeout_ms: u64,
    pub max_attempts: u32,
}

impl<'a> TwoSources<'a> {
    /// The built-in pipeline's settings for a role that needs only its topics and its join
    /// (the consumer, `pipeline broker`), not where its sources are or how they are polled.
    pub fn topics_only(topics: &'a TopicsConfig) -> Self {
        Self {
            crm_url: "http://localhost:8081",
            inventory_url: "http://localhost:8082",
            topics,
            page_size: 1000,
            interval_s: 60,
            timeout_ms: 10_000,
            max_attempts: 5,
        }
    }
}

impl PipelineConfig {
    /// The built-in pipeline: CRM customers ⋈ Inventory products, both required.
    pub fn two_sources(s: &TwoSources<'_>) -> Self {
        let source = |name: &str, url: &str, path: &str, entity: &str, topic: &str| SourceConfig {
            name: name.into(),
            base_url: url.into(),
            path: path.into(),
            entity: entity.into(),
            schema: None,
            topic: topic.into(),
            partitions: s.topics.partitions,
            id_field: defaults::id_field(),
            updated_at_field: defaults::updated_at_field(),
            records_field: None,
            interval_s: s.interval_s,
            timeout_ms: s.timeout_ms,
            rate_limit_per_s: None,
            pagination: Pagination::Page {
                page_param: defaults::page_param(),
                size_param: defaults::per_page_param(),
                size: s.page_size,
            },
            auth: None,
            retry: RetryConfig {
                max_attempts: s.max_attempts,
                ..RetryConfig::default()
            },
            incremental: IncrementalConfig::default(),
            mock: None,
        };
        Self {
            origin: "<built-in>".into(),
            sources: vec![
                source(
                    "crm",
                    s.crm_url,
                    "/customers",
                    "customer",
                    &s.topics.customer_topic,
                ),
                source(
                    "inventory",
                    s.inventory_url,
                    "/products",
                    "product",
                    &s.topics.inventory_topic,
                ),
            ],
            join: join(s.topics),
        }
    }
}

/// The built-in join: `customer` ⋈ `inventory` on `CUSTOMER_TOPIC` and `INVENTORY_TOPIC`, both
/// required.
pub(super) fn join(topics: &TopicsConfig) -> JoinConfig {
    let side = |name: &str, topic: &String| JoinSide {
        name: name.into(),
        topic: topic.clone(),
        required: true,
    };
    JoinConfig {
        sides: vec![
            side("customer", &topics.customer_topic),
            side("inventory", &topics.inventory_topic),
        ],
    }
}
