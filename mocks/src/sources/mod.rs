//! Source API stand-ins: CRM (`/customers`), Inventory (`/products`) and Pricing (`/pricing`,
//! keyed by `product_id`), or any of them on another path.
//!
//! Records `1..=count` are generated deterministically from their id, so a million-record source
//! costs no memory; `POST` upserts a record (new ids are appended) and stamps a strictly
//! increasing `updated_at` unless the body brings its own. Every pagination style the producer
//! speaks is served at once: `?page=&per_page=`, `?offset=&limit=`, `?cursor=` with
//! `next_cursor` in the body, and a `Link: <...>; rel="next"` header. `?updated_since=` returns
//! only records with a newer or equal `updated_at`. A weak ETag changes whenever the data does
//! and `If-None-Match` is answered with `304`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

mod api;

use serde_json::{Map, Value};

use crate::faults::{FaultConfig, Faults};

/// Which source system a mock plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Entity {
    Customers,
    Products,
    Pricing,
}

impl Entity {
    /// The default collection path.
    pub fn path(self) -> &'static str {
        match self {
            Entity::Customers => "/customers",
            Entity::Products => "/products",
            Entity::Pricing => "/pricing",
        }
    }

    /// The field holding a record's id.
    pub fn id_field(self) -> &'static str {
        match self {
            Entity::Customers | Entity::Products => "id",
            Entity::Pricing => "product_id",
        }
    }

    /// Parses `customers`, `products` or `pricing`.
    pub fn parse(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name, true).ok()
    }
}

/// Settings of one source mock.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceMockConfig {
    /// Number of generated records (ids 1..=N).
    #[arg(long, env = "MOCK_RECORDS", default_value_t = 1000)]
    pub records: u64,
    #[command(flatten)]
    pub faults: FaultConfig,
}

const TIERS: [&str; 3] = ["bronze", "silver", "gold"];

/// `updated_at` of every generated record.
pub const GENERATED_AT: &str = "2026-01-01T00:00:00Z";
const GENERATED_AT_MS: i64 = 1_767_225_600_000;

#[derive(Default)]
struct Overrides {
    by_id: HashMap<String, Value>,
    /// Ids beyond the generated range, in insertion order.
    extra: Vec<String>,
    version: u64,
    last_stamp_ms: i64,
}

/// Shared state of one source mock.
#[derive(Clone)]
pub struct SourceMock {
    entity: Entity,
    path: String,
    count: u64,
    overrides: Arc<RwLock<Overrides>>,
    faults: Faults,
}

/// One record of a page: generated on the fly (serialised straight from its id, no JSON tree)
/// or an upserted one.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum PageRecord {
    Generated(GeneratedRecord),
    Stored(Value),
}

/// Generated record `id` of `entity`, serialised straight from its id (sorted keys).
#[derive(Debug, Clone, Copy)]
pub struct GeneratedRecord {
    entity: Entity,
    id: u64,
}

impl serde::Serialize for GeneratedRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let i = self.id;
        let price = ((i * 37) % 100_000) as f64 / 100.0;
        match self.entity {
            Entity::Customers => {
                let mut m = s.serialize_map(Some(5))?;
                m.serialize_entry("email", &format!("customer{i}@example.com"))?;
                m.serialize_entry("id", &i)?;
                m.serialize_entry("name", &format!("Customer {i}"))?;
                m.serialize_entry("tier", TIERS[(i % 3) as usize])?;
                m.serialize_entry("updated_at", GENERATED_AT)?;
                m.end()
            }
            Entity::Products => {
                let mut m = s.serialize_map(Some(6))?;
                m.serialize_entry("id", &i)?;
                m.serialize_entry("name", &format!("Product {i}"))?;
                m.serialize_entry("price", &price)?;
                m.serialize_entry("sku", &format!("SKU-{i:08}"))?;
                m.serialize_entry("stock", &((i * 13) % 500))?;
                m.serialize_entry("updated_at", GENERATED_AT)?;
                m.end()
            }
            Entity::Pricing => {
                let mut m = s.serialize_map(Some(5))?;
                m.serialize_entry("currency", "EUR")?;
                m.serialize_entry("discount_pct", &(i % 30))?;
                m.serialize_entry("list_price", &price)?;
                m.serialize_entry("product_id", &i)?;
                m.serialize_entry("updated_at", GENERATED_AT)?;
                m.end()
            }
        }
    }
}

impl SourceMock {
    pub fn new(entity: Entity, config: &SourceMockConfig) -> Self {
        Self {
            entity,
            path: entity.path().to_owned(),
            count: config.records,
            overrides: Arc::default(),
            faults: Faults::new(config.faults.clone()),
        }
    }

    /// Serves the collection on `path` instead of the entity's default.
    pub fn with_path(mut self, path: &str) -> Self {
        self.path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        self
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Inserts or replaces a record; returns the stored record.
    pub fn upsert(&self, mut record: Map<String, Value>) -> Result<Value, String> {
        let id = pipeline_core::record::normalise_id(record.get(self.entity.id_field()))
            .map_err(|e| e.to_string())?;
        let Ok(mut o) = self.overrides.write() else {
            return Err("state poisoned".into());
        };
        if !record.contains_key("updated_at") {
            let now = chrono::Utc::now()
                .timestamp_millis()
                .max(GENERATED_AT_MS + 1);
            let stamp = now.max(o.last_stamp_ms + 1);
            o.last_stamp_ms = stamp;
            let ts = chrono::DateTime::from_timestamp_millis(stamp).unwrap_or_default();
            record.insert(
                "updated_at".into(),
                Value::String(ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            );
        }
        let generated = id
            .parse::<u64>()
            .map(|n| (1..=self.count).contains(&n))
            .unwrap_or(false);
        if !generated && !o.by_id.contains_key(&id) {
            o.extra.push(id.clone());
        }
        let value = Value::Object(record);
        o.by_id.insert(id, value.clone());
        o.version += 1;
        Ok(value)
    }

    fn total(&self) -> u64 {
        self.count
            + self
                .overrides
                .read()
                .map(|o| o.extra.len() as u64)
                .unwrap_or(0)
    }

    /// Records of one page (1-based).
    pub fn page(&self, page: u64, per_page: u64) -> Vec<Value> {
        self.slice(page.saturating_sub(1).saturating_mul(per_page), per_page)
            .into_iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect()
    }

    /// `limit` records from position `start` of the full listing.
    pub fn slice(&self, start: u64, limit: u64) -> Vec<PageRecord> {
        let Ok(o) = self.overrides.read() else {
            return Vec::new();
        };
        let end = (start.saturating_add(limit)).min(self.count + o.extra.len() as u64);
        (start..end)
            .filter_map(|i| {
                if i < self.count {
                    let id = i + 1;
                    let stored = (!o.by_id.is_empty())
                        .then(|| o.by_id.get(&id.to_string()))
                        .flatten();
                    Some(match stored {
                        Some(v) => PageRecord::Stored(v.clone()),
                        None => PageRecord::Generated(GeneratedRecord {
                            entity: self.entity,
                            id,
                        }),
                    })
                } else {
                    let extra_id = o.extra.get((i - self.count) as usize)?;
                    o.by_id.get(extra_id).cloned().map(PageRecord::Stored)
                }
            })
            .collect()
    }

    /// Upserted records with `updated_at >= since_ms`, in listing order.
    fn changed_since(&self, since_ms: i64) -> Vec<Value> {
        let Ok(o) = self.overrides.read() else {
            return Vec::new();
        };
        let mut ids: Vec<(u64, &String)> = o
            .by_id
            .keys()
            .map(|id| match id.parse::<u64>() {
                Ok(n) if (1..=self.count).contains(&n) => (n, id),
                _ => {
                    let pos = o.extra.iter().position(|e| e == id).unwrap_or(0) as u64;
                    (self.count + 1 + pos, id)
                }
            })
            .collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|(_, id)| o.by_id.get(id))
            .filter(|r| {
                pipeline_core::record::version_ms(r.get("updated_at")).unwrap_or(i64::MAX)
                    >= since_ms
            })
            .cloned()
            .collect()
    }

    fn etag(&self, start: u64, size: u64, since: Option<i64>) -> String {
        let v = self.overrides.read().map(|o| o.version).unwrap_or(0);
        let since = since.map(|s| s.to_string()).unwrap_or_default();
        format!("W/\"{}-{v}-{start}-{size}-{since}\"", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The generated record `i` of `entity` written out as JSON: what [`GeneratedRecord`] must
    /// serialise to.
    fn generated(entity: Entity, i: u64) -> Value {
        match entity {
            Entity::Customers => json!({
                "id": i,
                "name": format!("Customer {i}"),
                "email": format!("customer{i}@example.com"),
                "tier": TIERS[(i % 3) as usize],
                "updated_at": GENERATED_AT,
            }),
            Entity::Products => json!({
                "id": i,
                "name": format!("Product {i}"),
                "sku": format!("SKU-{i:08}"),
                "price": ((i * 37) % 100_000) as f64 / 100.0,
                "stock": (i * 13) % 500,
                "updated_at": GENERATED_AT,
            }),
            Entity::Pricing => json!({
                "product_id": i,
                "currency": "EUR",
                "list_price": ((i * 37) % 100_000) as f64 / 100.0,
                "discount_pct": i % 30,
                "updated_at": GENERATED_AT,
            }),
        }
    }

    #[test]
    fn pages_cover_generated_and_upserted_records_once() {
        let mock = SourceMock::new(
            Entity::Customers,
            &SourceMockConfig {
                records: 25,
                faults: FaultConfig::default(),
            },
        );
        let mut r = Map::new();
        r.insert("id".into(), json!(3));
        r.insert("name".into(), json!("changed"));
        mock.upsert(r).unwrap();
        let mut r = Map::new();
        r.insert("id".into(), json!("new-1"));
        mock.upsert(r).unwrap();
        let all: Vec<Value> = (1..=3).flat_map(|p| mock.page(p, 10)).collect();
        assert_eq!(all.len(), 26);
        assert_eq!(all[2]["name"], "changed");
        assert_ne!(all[2]["updated_at"], GENERATED_AT);
        assert_eq!(all[25]["id"], "new-1");
        assert_eq!(all[0], generated(Entity::Customers, 1));
    }

    #[test]
    fn generated_records_serialise_like_their_json_form() {
        for entity in [Entity::Customers, Entity::Products, Entity::Pricing] {
            for id in [1, 7, 99_999] {
                let typed = serde_json::to_string(&GeneratedRecord { entity, id }).unwrap();
                assert_eq!(typed, generated(entity, id).to_string());
            }
        }
    }
}
