//! Checking a pipeline without a network: names, URLs, pagination, join sides and the partition
//! counts of co-partitioned topics.

use std::collections::HashSet;

use crate::topics::is_topic;

use super::*;

/// Names the merged record already uses.
const RESERVED_SIDE_NAMES: [&str; 3] = ["id", "key", "merged_at"];

impl PipelineConfig {
    /// Checks a configuration built in code (the default, tests) like a file would be.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: String, message: String| ConfigError {
            origin: self.origin.clone(),
            line: None,
            key,
            message,
        };
        let env = |v: &str| std::env::var(v).ok();
        for (i, s) in self.sources.iter().enumerate() {
            check_source(s, &env)
                .map_err(|(k, m)| err(format!("sources[{i}] ({}).{k}", s.name), m))?;
        }
        for (i, side) in self.join.sides.iter().enumerate() {
            check_side(side)
                .map_err(|(k, m)| err(format!("join.sides[{i}] ({}).{k}", side.name), m))?;
        }
        self.check_join().map_err(|(k, m)| err(k, m))
    }

    pub(super) fn check_join(&self) -> Result<(), (String, String)> {
        let sides = &self.join.sides;
        if sides.is_empty() {
            return Err(("join.sides".into(), "at least one side is needed".into()));
        }
        if !sides.iter().any(|s| s.required) {
            return Err((
                "join.sides".into(),
                "at least one side must be required (`required = true`)".into(),
            ));
        }
        let mut seen_names = HashSet::new();
        let mut seen_topics = HashSet::new();
        for s in sides {
            if !seen_names.insert(&s.name) {
                return Err((
                    format!("join.sides ({}).name", s.name),
                    "two sides have the same name".into(),
                ));
            }
            if !seen_topics.insert(&s.topic) {
                return Err((
                    format!("join.sides ({}).topic", s.name),
                    format!("topic {:?} is already another side", s.topic),
                ));
            }
        }
        // Co-partitioning: one id must land on the same partition number in every side.
        let counts = self.partitions_by_topic();
        let declared: Vec<(String, usize)> = counts
            .iter()
            .map(|(t, n)| (t.to_string(), (*n).max(0) as usize))
            .collect();
        let joined: Vec<String> = sides.iter().map(|s| s.topic.clone()).collect();
        if let Some(((first, m), (other, n))) =
            crate::topics::partition_mismatch(&declared, &joined)
        {
            let side = sides
                .iter()
                .find(|s| s.topic == other)
                .map_or("", |s| &s.name);
            return Err((
                format!("join.sides ({side}).topic"),
                format!(
                    "topic {other:?} has {n} partitions but {first:?} has {m}; joined topics \
                     need the same partition count"
                ),
            ));
        }
        for (topic, n) in &counts {
            let differing = self
                .sources
                .iter()
                .find(|s| s.topic == *topic && s.partitions != *n);
            if let Some(s) = differing {
                return Err((
                    format!("sources ({}).partitions", s.name),
                    format!(
                        "topic {topic:?} is declared with {n} and {} partitions",
                        s.partitions
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `Ok` or the offending key (relative to the source) and why.
pub(super) fn check_source(
    s: &SourceConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (&'static str, String)> {
    if !is_name(&s.name) {
        return Err((
            "name",
            format!("{:?} must be 1-64 of [A-Za-z0-9_-]", s.name),
        ));
    }
    match reqwest::Url::parse(&s.url()) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
        Ok(u) => {
            return Err((
                "base_url",
                format!("{:?}: scheme {:?} is not http(s)", s.base_url, u.scheme()),
            ))
        }
        Err(e) => return Err(("base_url", format!("{:?} is not a valid URL: {e}", s.url()))),
    }
    if s.entity.trim().is_empty() {
        return Err(("entity", "must not be empty".into()));
    }
    if !is_topic(&s.topic) {
        return Err((
            "topic",
            format!("{:?} is not a valid Kafka topic name", s.topic),
        ));
    }
    if s.partitions < 1 {
        return Err((
            "partitions",
            format!("must be at least 1, got {}", s.partitions),
        ));
    }
    if s.id_field.is_empty() || s.updated_at_field.is_empty() {
        return Err(("id_field", "field names must not be empty".into()));
    }
    if s.interval_s == 0 {
        return Err(("interval_s", "must be at least 1".into()));
    }
    if s.timeout_ms == 0 {
        return Err(("timeout_ms", "must be at least 1".into()));
    }
    if let Some(r) = s.rate_limit_per_s {
        if !(r.is_finite() && r > 0.0) {
            return Err((
                "rate_limit_per_s",
                format!("must be a positive number, got {r}"),
            ));
        }
    }
    if !(1..=10_000).contains(&s.pagination.size()) {
        return Err((
            "pagination.size",
            format!("must be within 1..=10000, got {}", s.pagination.size()),
        ));
    }
    if let Some(a) = &s.auth {
        if reqwest::header::HeaderName::from_bytes(a.header.as_bytes()).is_err() {
            return Err((
                "auth.header",
                format!("{:?} is not a valid header name", a.header),
            ));
        }
        if env(&a.value_env).is_none() {
            return Err((
                "auth.value_env",
                format!("environment variable {} is not set", a.value_env),
            ));
        }
    }
    if s.retry.max_attempts == 0 {
        return Err(("retry.max_attempts", "must be at least 1".into()));
    }
    if s.retry.initial_backoff_ms > s.retry.max_backoff_ms {
        return Err((
            "retry.initial_backoff_ms",
            "must not exceed retry.max_backoff_ms".into(),
        ));
    }
    if let Some(m) = &s.mock {
        if !["customers", "products", "pricing"].contains(&m.entity.as_str()) {
            return Err((
                "mock.entity",
                format!("{:?} is not one of customers, products, pricing", m.entity),
            ));
        }
    }
    Ok(())
}

pub(super) fn check_side(side: &JoinSide) -> Result<(), (&'static str, String)> {
    if !is_name(&side.name) || RESERVED_SIDE_NAMES.contains(&side.name.as_str()) {
        return Err((
            "name",
            format!(
                "{:?} must be 1-64 of [A-Za-z0-9_-] and not one of id, key, merged_at",
                side.name
            ),
        ));
    }
    if !is_topic(&side.topic) {
        return Err((
            "topic",
            format!("{:?} is not a valid Kafka topic name", side.topic),
        ));
    }
    Ok(())
}

pub(super) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
