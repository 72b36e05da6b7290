//! What a poll did, per source and per cycle (`producer --once` prints it as JSON).

use serde::Serialize;

/// What one poll of one source did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceReport {
    pub source: String,
    /// Records fetched (pages answered 304 not included).
    pub fetched: u64,
    /// Records acknowledged on the data topic.
    pub published: u64,
    /// Records dead-lettered by validation.
    pub invalid: u64,
    /// Pages fetched, and pages answered 304.
    pub pages: u64,
    pub pages_not_modified: u64,
    /// The incremental-sync cursor the poll started from.
    pub updated_since: Option<String>,
    pub elapsed_s: f64,
}

/// What one polling cycle did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CycleReport {
    pub sources: Vec<SourceReport>,
}

impl CycleReport {
    pub fn published(&self) -> u64 {
        self.sources.iter().map(|s| s.published).sum()
    }
    pub fn invalid(&self) -> u64 {
        self.sources.iter().map(|s| s.invalid).sum()
    }
    pub fn source(&self, name: &str) -> Option<&SourceReport> {
        self.sources.iter().find(|s| s.source == name)
    }
}
