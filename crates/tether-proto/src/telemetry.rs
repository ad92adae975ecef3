//! Telemetry on the wire (protocol.md §8): metric batches an agent ships,
//! its inventory, and the answers of the operator queries over them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Labels;

/// Most points in one metric batch; a bigger batch is refused whole (413).
pub const MAX_METRIC_POINTS: usize = 5_000;
/// Most inventory items (upserts plus removals) in one request.
pub const MAX_INVENTORY_ITEMS: usize = 1_000;
/// Longest metric name, inventory kind or key.
pub const MAX_NAME_LEN: usize = 200;
/// Most labels on one metric point.
pub const MAX_POINT_LABELS: usize = 16;
/// How far ahead of the server's clock a point may be stamped.
pub const MAX_FUTURE_SKEW_MS: i64 = 5 * 60_000;
/// Largest `attrs` of one inventory item, as JSON.
pub const MAX_ATTRS_BYTES: usize = 4_096;
/// Longest batch id.
pub const MAX_BATCH_ID_LEN: usize = 128;

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricPoint {
    /// `[A-Za-z_:][A-Za-z0-9_:.]*`, at most [`MAX_NAME_LEN`] bytes.
    pub name: String,
    pub ts_ms: i64,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// `POST /api/v1/agents/self/metrics`. The same `batch_id` sent again is
/// stored once, so an agent may retry a batch whose answer it lost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricBatch {
    pub batch_id: String,
    pub points: Vec<MetricPoint>,
}

/// The answer to a metric batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricBatchAccepted {
    /// Points written now (0 when the batch id was stored before).
    pub stored: u64,
    /// True when this batch id had been stored already.
    pub duplicate: bool,
}

/// Whether a metric name is well formed (the Prometheus rule, plus `.`).
pub fn metric_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.'))
}

/// One inventory entry, e.g. a printer an agent looks after (`kind`
/// `printer`, `key` its serial number). `attrs` is free-form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryItem {
    pub kind: String,
    pub key: String,
    #[serde(default)]
    pub attrs: Value,
}

/// Names an inventory entry to remove.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InventoryKey {
    pub kind: String,
    pub key: String,
}

/// `POST /api/v1/agents/self/inventory`: a change applied as one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryChange {
    #[serde(default)]
    pub upsert: Vec<InventoryItem>,
    #[serde(default)]
    pub remove: Vec<InventoryKey>,
}

/// `PUT /api/v1/agents/self/inventory`: the whole inventory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryReplace {
    pub items: Vec<InventoryItem>,
}

/// An inventory entry as operators read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InventoryEntry {
    pub kind: String,
    pub key: String,
    pub attrs: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: crate::Timestamp,
}

/// Which stored form answered a metric query.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Every point as sent.
    Raw,
    /// One aggregate per hour.
    Hour,
    /// One aggregate per day (UTC).
    Day,
}

/// One value of a series: a raw point has `count` 1 and
/// `min` = `max` = `avg` = its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeriesPoint {
    /// The point's time, or the start of its bucket.
    pub ts_ms: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub sum: f64,
}

/// The points of one series (one name and label set).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub labels: Labels,
    pub points: Vec<SeriesPoint>,
}

/// `GET /api/v1/agents/{id}/metrics?name&from&to`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricQueryResult {
    pub name: String,
    pub resolution: Resolution,
    pub from_ms: i64,
    pub to_ms: i64,
    pub series: Vec<Series>,
    /// True when the answer was cut at the point limit.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names() {
        for ok in ["cpu_pct", "host.mem_used_bytes", "_x", "a:b"] {
            assert!(metric_name_ok(ok), "{ok}");
        }
        for bad in ["", "1cpu", "cpu pct", "cpu-pct", "é", &"a".repeat(MAX_NAME_LEN + 1)] {
            assert!(!metric_name_ok(bad), "{bad}");
        }
    }
}
