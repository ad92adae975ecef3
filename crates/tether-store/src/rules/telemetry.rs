//! Telemetry decisions every backend shares: which bucket a point rolls up
//! into, whether a batch may be stored (finite values, the series cap),
//! how rollups are aggregated, how a query answer is cut at its point
//! limit, what one inventory change writes, and how much of the audit
//! chain retention may delete.

use std::collections::BTreeMap;

use tether_proto::Labels;
use tether_proto::telemetry::{InventoryItem, MetricPoint, Series, SeriesPoint};

use crate::{Millis, Result, StoreError};

/// The width of an hourly bucket.
pub const HOUR_MS: i64 = 3_600_000;
/// The width of a daily bucket: days are UTC days (the epoch is midnight UTC
/// and Unix time has no leap seconds).
pub const DAY_MS: i64 = 86_400_000;

/// The start of the bucket of width `width` that `ts` falls in; also right
/// for instants before the epoch (`rem_euclid`, not `%`).
pub fn bucket_start(ts: Millis, width: i64) -> Millis {
    ts - ts.rem_euclid(width)
}

/// The same as [`bucket_start`] in SQL, for the column or expression
/// `ts` (both backends' `%` truncates toward zero, hence the double modulo).
pub fn bucket_sql(ts: &str, width: i64) -> String {
    format!("({ts} - ((({ts} % {width}) + {width}) % {width}))")
}

/// Refuses a batch with a value no backend stores faithfully (NaN and the
/// infinities: SQLite keeps NaN as NULL, and neither sums to anything).
pub fn check_points(points: &[MetricPoint]) -> Result<()> {
    match points.iter().find(|p| !p.value.is_finite()) {
        Some(p) => Err(StoreError::Invalid {
            field: "points",
            message: format!("{} at {} is not a finite number", p.name, p.ts_ms),
        }),
        None => Ok(()),
    }
}

/// A series' identity as stored: its name and its labels as canonical JSON
/// (a `BTreeMap` serializes with sorted keys and no whitespace), so one
/// label set always has one text.
pub fn series_key(name: &str, labels: &Labels) -> (String, String) {
    (name.to_owned(), crate::sql::json_text(labels))
}

/// The distinct series of a batch (as [`series_key`]s, in key order) and,
/// for each point, the index of its series: each label set is serialized
/// once per batch, not once per point.
pub fn index_series(points: &[MetricPoint]) -> (Vec<(String, String)>, Vec<usize>) {
    let mut index: BTreeMap<(&str, &Labels), usize> = BTreeMap::new();
    for p in points {
        index.entry((&p.name, &p.labels)).or_insert(0);
    }
    let mut keys = Vec::with_capacity(index.len());
    for (i, ((name, labels), slot)) in index.iter_mut().enumerate() {
        *slot = i;
        keys.push(series_key(name, labels));
    }
    let of_point = points.iter().map(|p| index[&(p.name.as_str(), &p.labels)]).collect();
    (keys, of_point)
}

/// Whether an agent holding `existing` series may create `new` more.
pub fn series_cap(existing: u64, new: u64, max_series: u32) -> Result<()> {
    if existing + new > u64::from(max_series) {
        return Err(StoreError::Invalid {
            field: "points",
            message: format!(
                "the batch would create {new} new series, and the agent has {existing} of at most {max_series}"
            ),
        });
    }
    Ok(())
}

/// The count, sum, min and max of the points in one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Agg {
    pub fn of(value: f64) -> Self {
        Self { count: 1, sum: value, min: value, max: value }
    }

    /// Both aggregates as one (what an incremental rollup update does).
    pub fn merge(self, other: Agg) -> Self {
        Self {
            count: self.count + other.count,
            sum: self.sum + other.sum,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
        }
    }

    pub fn point(self, ts_ms: Millis) -> SeriesPoint {
        SeriesPoint {
            ts_ms,
            count: self.count,
            min: self.min,
            max: self.max,
            avg: self.sum / self.count.max(1) as f64,
            sum: self.sum,
        }
    }
}

/// Inserted points `(series, ts, value)` aggregated per series and bucket
/// of `width`: what is added to the rollup table, one row per bucket.
pub fn rollup(points: &[(i64, Millis, f64)], width: i64) -> BTreeMap<(i64, Millis), Agg> {
    let mut out: BTreeMap<(i64, Millis), Agg> = BTreeMap::new();
    for &(series, ts, value) in points {
        let key = (series, bucket_start(ts, width));
        let agg = Agg::of(value);
        out.entry(key).and_modify(|a| *a = a.merge(agg)).or_insert(agg);
    }
    out
}

/// Builds a query answer from rows ordered by label text, then time (at
/// most `max_points + 1` of them): the series in that order, cut after
/// `max_points` points, and whether anything was cut.
pub fn assemble_series(
    rows: impl IntoIterator<Item = Result<(String, SeriesPoint)>>,
    max_points: u32,
) -> Result<(Vec<Series>, bool)> {
    let mut out: Vec<(String, Series)> = Vec::new();
    for (taken, row) in rows.into_iter().enumerate() {
        let (labels_text, point) = row?;
        if taken as u64 == u64::from(max_points) {
            return Ok((out.into_iter().map(|(_, s)| s).collect(), true));
        }
        match out.last_mut() {
            Some((text, series)) if *text == labels_text => series.points.push(point),
            _ => {
                let labels = crate::sql::parse_json(&labels_text)?;
                out.push((labels_text, Series { labels, points: vec![point] }));
            }
        }
    }
    Ok((out.into_iter().map(|(_, s)| s).collect(), false))
}

/// The items one upsert writes: one per `(kind, key)`, the last given
/// winning (a single statement may not write one row twice), in key order.
pub fn last_per_key(items: &[InventoryItem]) -> Vec<&InventoryItem> {
    let mut by_key: BTreeMap<(&str, &str), &InventoryItem> = BTreeMap::new();
    for item in items {
        by_key.insert((&item.kind, &item.key), item);
    }
    by_key.into_values().collect()
}

/// How many of the oldest audit rows (`ts` of each, in id order) retention
/// may delete: the longest prefix older than `before`. It stops at the
/// first newer row even when older ones follow (a clock step back), so
/// what remains is always one unbroken chain.
pub fn audit_prefix(ts_in_id_order: &[Millis], before: Millis) -> usize {
    ts_in_id_order.iter().take_while(|&&ts| ts < before).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_start_at_the_hour_and_the_utc_day() {
        assert_eq!(bucket_start(1_800_000_123_456, HOUR_MS), 1_800_000_000_000);
        assert_eq!(bucket_start(1_800_000_123_456, DAY_MS), 1_799_971_200_000);
        assert_eq!(bucket_start(-1, HOUR_MS), -HOUR_MS);
        assert_eq!(bucket_start(0, DAY_MS), 0);
    }

    #[test]
    fn each_point_knows_its_series() {
        let p = |name: &str, l: &[(&str, &str)]| MetricPoint {
            name: name.into(),
            ts_ms: 0,
            value: 0.0,
            labels: l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let points = [p("b", &[]), p("a", &[("z", "1"), ("y", "2")]), p("b", &[])];
        let (keys, of_point) = index_series(&points);
        assert_eq!(keys, vec![("a".into(), r#"{"y":"2","z":"1"}"#.into()), ("b".into(), "{}".into())]);
        assert_eq!(of_point, vec![1, 0, 1]);
    }

    #[test]
    fn the_series_cap_counts_what_exists_and_what_is_new() {
        assert!(series_cap(8, 2, 10).is_ok());
        let refused = series_cap(9, 2, 10);
        assert!(matches!(&refused, Err(StoreError::Invalid { field: "points", message }) if message.contains("10")));
    }

    #[test]
    fn non_finite_values_are_refused() {
        let p = |value| MetricPoint { name: "x".into(), ts_ms: 1, value, labels: Labels::new() };
        assert!(check_points(&[p(1.0), p(-0.0)]).is_ok());
        assert!(check_points(&[p(1.0), p(f64::NAN)]).is_err());
        assert!(check_points(&[p(f64::INFINITY)]).is_err());
    }

    #[test]
    fn rollups_aggregate_per_series_and_bucket() {
        let got = rollup(&[(1, 10, 2.0), (1, HOUR_MS + 1, 5.0), (1, 20, -1.0), (2, 10, 7.0)], HOUR_MS);
        assert_eq!(got[&(1, 0)], Agg { count: 2, sum: 1.0, min: -1.0, max: 2.0 });
        assert_eq!(got[&(1, HOUR_MS)], Agg::of(5.0));
        assert_eq!(got[&(2, 0)], Agg::of(7.0));
        assert_eq!(Agg { count: 2, sum: 3.0, min: 1.0, max: 2.0 }.point(0).avg, 1.5);
    }

    #[test]
    fn answers_are_cut_at_the_point_limit() {
        let row = |labels: &str, ts| Ok((labels.to_owned(), Agg::of(1.0).point(ts)));
        let rows = || vec![row("{\"a\":\"1\"}", 1), row("{\"a\":\"1\"}", 2), row("{\"a\":\"2\"}", 1)];
        let (all, cut) = assemble_series(rows(), 3).expect("all");
        assert_eq!((all.len(), all[0].points.len(), cut), (2, 2, false));
        let (some, cut) = assemble_series(rows(), 2).expect("some");
        assert_eq!((some.len(), some[0].points.len(), cut), (1, 2, true));
    }

    #[test]
    fn the_last_upsert_of_a_key_wins() {
        let item = |key: &str, v| InventoryItem { kind: "printer".into(), key: key.into(), attrs: v };
        let items = [item("b", 1.into()), item("a", 2.into()), item("b", 3.into())];
        let got: Vec<_> = last_per_key(&items).into_iter().map(|i| (i.key.as_str(), i.attrs.clone())).collect();
        assert_eq!(got, vec![("a", 2.into()), ("b", 3.into())]);
    }

    #[test]
    fn audit_retention_deletes_only_an_old_prefix() {
        assert_eq!(audit_prefix(&[1, 2, 9, 3], 5), 2);
        assert_eq!(audit_prefix(&[6, 1], 5), 0);
        assert_eq!(audit_prefix(&[1, 2], 5), 2);
    }
}
