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
/// Largest label set of one point, as JSON: the series key must stay
/// small enough for a database index.
pub const MAX_LABELS_BYTES: usize = 1_024;

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricBatch {
    pub batch_id: String,
    pub points: Vec<MetricPoint>,
}

/// The answer to a metric batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
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

/// Whether `key=value` may label a metric point: a metric-name-like key and
/// a printable value of at most [`MAX_NAME_LEN`] bytes.
pub fn label_ok(key: &str, value: &str) -> bool {
    metric_name_ok(key) && value.len() <= MAX_NAME_LEN && !value.chars().any(char::is_control)
}

/// What is wrong with a batch, found before anything is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchProblem {
    /// More items than the limit (answered 413).
    TooMany { limit: usize },
    /// A field that is not acceptable (answered 400).
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: String) -> BatchProblem {
    BatchProblem::Invalid { field, message }
}

impl MetricBatch {
    /// Checks the whole batch against the limits of protocol.md §8, with
    /// `now_ms` the server's clock and `oldest_ms` the oldest time raw
    /// points are still kept (an older point would be pruned at once and,
    /// if sent again, counted twice in the rollups): a batch is stored
    /// whole or not at all.
    pub fn check(&self, now_ms: i64, oldest_ms: i64) -> Result<(), BatchProblem> {
        if self.points.len() > MAX_METRIC_POINTS {
            return Err(BatchProblem::TooMany { limit: MAX_METRIC_POINTS });
        }
        if self.batch_id.is_empty()
            || self.batch_id.len() > MAX_BATCH_ID_LEN
            || self.batch_id.chars().any(char::is_control)
        {
            return Err(invalid("batch_id", format!("batch_id must be 1-{MAX_BATCH_ID_LEN} printable chars")));
        }
        for (i, p) in self.points.iter().enumerate() {
            if !metric_name_ok(&p.name) {
                return Err(invalid("name", format!("points[{i}].name {:?} is not a metric name", p.name)));
            }
            if p.ts_ms < oldest_ms.max(0) || p.ts_ms > now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
                return Err(invalid(
                    "ts_ms",
                    format!("points[{i}].ts_ms is older than raw metrics are kept, or too far in the future"),
                ));
            }
            if !p.value.is_finite() {
                return Err(invalid("value", format!("points[{i}].value must be a finite number")));
            }
            if p.labels.len() > MAX_POINT_LABELS {
                return Err(invalid("labels", format!("points[{i}] has more than {MAX_POINT_LABELS} labels")));
            }
            if p.labels.iter().any(|(k, v)| !label_ok(k, v)) {
                return Err(invalid("labels", format!("points[{i}] has a malformed label")));
            }
            if serde_json::to_string(&p.labels).map_or(0, |s| s.len()) > MAX_LABELS_BYTES {
                return Err(invalid("labels", format!("points[{i}] has labels over {MAX_LABELS_BYTES} bytes")));
            }
        }
        Ok(())
    }
}

fn item_name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

fn check_item(i: usize, kind: &str, key: &str, attrs: Option<&Value>) -> Result<(), BatchProblem> {
    if !item_name_ok(kind) {
        return Err(invalid("kind", format!("item {i}: kind must be 1-{MAX_NAME_LEN} printable chars")));
    }
    if !item_name_ok(key) {
        return Err(invalid("key", format!("item {i}: key must be 1-{MAX_NAME_LEN} printable chars")));
    }
    if attrs.is_some_and(|a| a.to_string().len() > MAX_ATTRS_BYTES) {
        return Err(invalid("attrs", format!("item {i}: attrs are over {MAX_ATTRS_BYTES} bytes")));
    }
    Ok(())
}

impl InventoryChange {
    /// At most [`MAX_INVENTORY_ITEMS`] upserts and removals together, each well formed.
    pub fn check(&self) -> Result<(), BatchProblem> {
        if self.upsert.len() + self.remove.len() > MAX_INVENTORY_ITEMS {
            return Err(BatchProblem::TooMany { limit: MAX_INVENTORY_ITEMS });
        }
        for (i, item) in self.upsert.iter().enumerate() {
            check_item(i, &item.kind, &item.key, Some(&item.attrs))?;
        }
        for (i, item) in self.remove.iter().enumerate() {
            check_item(i, &item.kind, &item.key, None)?;
        }
        Ok(())
    }
}

impl InventoryReplace {
    /// At most [`MAX_INVENTORY_ITEMS`] items, each well formed.
    pub fn check(&self) -> Result<(), BatchProblem> {
        if self.items.len() > MAX_INVENTORY_ITEMS {
            return Err(BatchProblem::TooMany { limit: MAX_INVENTORY_ITEMS });
        }
        for (i, item) in self.items.iter().enumerate() {
            check_item(i, &item.kind, &item.key, Some(&item.attrs))?;
        }
        Ok(())
    }
}

/// One inventory entry, e.g. a printer an agent looks after (`kind`
/// `printer`, `key` its serial number). `attrs` is free-form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryItem {
    pub kind: String,
    pub key: String,
    #[serde(default)]
    pub attrs: Value,
}

/// Names an inventory entry to remove.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryKey {
    pub kind: String,
    pub key: String,
}

/// `POST /api/v1/agents/self/inventory`: a change applied as one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryChange {
    #[serde(default)]
    pub upsert: Vec<InventoryItem>,
    #[serde(default)]
    pub remove: Vec<InventoryKey>,
}

/// `PUT /api/v1/agents/self/inventory`: the whole inventory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryReplace {
    pub items: Vec<InventoryItem>,
}

/// An inventory entry as operators read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct InventoryEntry {
    pub kind: String,
    pub key: String,
    pub attrs: Value,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: crate::Timestamp,
}

/// Which stored form answered a metric query.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Series {
    pub labels: Labels,
    pub points: Vec<SeriesPoint>,
}

/// `GET /api/v1/agents/{id}/metrics?name&from&to`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
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

    fn point(name: &str, ts_ms: i64) -> MetricPoint {
        MetricPoint { name: name.into(), ts_ms, value: 1.0, labels: Labels::new() }
    }

    #[test]
    fn batches_are_checked_whole() {
        let now = 1_700_000_000_000;
        let ok = MetricBatch { batch_id: "b1".into(), points: vec![point("cpu", now); MAX_METRIC_POINTS] };
        assert_eq!(ok.check(now, 0), Ok(()));
        let big = MetricBatch { batch_id: "b1".into(), points: vec![point("cpu", now); MAX_METRIC_POINTS + 1] };
        assert_eq!(big.check(now, 0), Err(BatchProblem::TooMany { limit: MAX_METRIC_POINTS }));
        let future = MetricBatch { batch_id: "b".into(), points: vec![point("cpu", now + MAX_FUTURE_SKEW_MS + 1)] };
        assert!(matches!(future.check(now, 0), Err(BatchProblem::Invalid { field: "ts_ms", .. })));
        let bad_name = MetricBatch { batch_id: "b".into(), points: vec![point("cpu load", now)] };
        assert!(matches!(bad_name.check(now, 0), Err(BatchProblem::Invalid { field: "name", .. })));
        let no_id = MetricBatch { batch_id: String::new(), points: vec![] };
        assert!(matches!(no_id.check(now, 0), Err(BatchProblem::Invalid { field: "batch_id", .. })));
        let old = MetricBatch { batch_id: "b".into(), points: vec![point("cpu", now - 10)] };
        assert!(matches!(old.check(now, now - 5), Err(BatchProblem::Invalid { field: "ts_ms", .. })));
        let mut wide = point("cpu", now);
        wide.labels = (0..10).map(|i| (format!("k{i}"), "v".repeat(150))).collect();
        let wide = MetricBatch { batch_id: "b".into(), points: vec![wide] };
        assert!(matches!(wide.check(now, 0), Err(BatchProblem::Invalid { field: "labels", .. })));
        let item = |k: &str| InventoryItem { kind: "printer".into(), key: k.into(), attrs: Value::Null };
        let many = InventoryReplace { items: (0..=MAX_INVENTORY_ITEMS).map(|i| item(&i.to_string())).collect() };
        assert_eq!(many.check(), Err(BatchProblem::TooMany { limit: MAX_INVENTORY_ITEMS }));
        let empty_key = InventoryChange { upsert: vec![item("")], remove: vec![] };
        assert!(matches!(empty_key.check(), Err(BatchProblem::Invalid { field: "key", .. })));
    }

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
