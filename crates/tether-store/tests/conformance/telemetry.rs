//! Telemetry: metric batches and their rollups, inventory, presence,
//! heartbeats in batches, agent deletion and retention.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;
use tether_proto::AgentId;
use tether_proto::command::{CommandStatus, ResultReport, TargetSpec};
use tether_proto::config::Scope;
use tether_proto::files::ItemReport;
use tether_proto::telemetry::{InventoryItem, InventoryKey, MetricPoint, Resolution, Series, SeriesPoint};
use tether_store::{
    AgentFilter, AuditEntry, AuditFilter, CommandFilter, Entity, HeartbeatRow, Horizons, ItemKind, MetricQuery,
    MetricsOutcome, NewConfigVersion, NewFileAssignment, NewMetrics, RefreshOutcome, StatusFilter, Store, StoreError,
    verify_audit,
};

use crate::fixtures::{T0, audit_entry, batch, command, enroll, enroll_with, labels, rand_hash, rotate};
use crate::harness::{Harness, conformance};

conformance!(
    a_metric_batch_is_stored_once_within_the_series_cap_for_a_known_agent,
    rollups_equal_a_recomputation_and_retention_removes_exactly_what_is_past_its_horizon,
    finished_commands_past_the_horizon_are_pruned_and_the_rest_kept,
    audit_retention_leaves_a_chain_that_verifies_and_still_shows_tampering,
    inventory_is_upserted_removed_replaced_and_listed_in_pages,
    presence_transitions_are_recorded_and_reported_once,
    agents_are_filtered_by_status_in_id_pages_and_counted,
    a_disconnected_agent_is_offline_until_seen_again,
    heartbeats_are_written_in_one_batch,
    deleting_an_agent_removes_everything_only_its,
);

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn point(name: &str, ts_ms: i64, value: f64, l: &[(&str, &str)]) -> MetricPoint {
    MetricPoint { name: name.into(), ts_ms, value, labels: labels(l) }
}

fn metrics<'a>(agent_id: AgentId, batch_id: &'a str, points: &'a [MetricPoint], max_series: u32) -> NewMetrics<'a> {
    NewMetrics { agent_id, batch_id, points, max_series, now: T0 }
}

fn query(agent_id: AgentId, name: &str, resolution: Resolution) -> MetricQuery {
    MetricQuery { agent_id, name: name.into(), from: T0 - 10 * DAY, to: T0 + 10 * DAY, resolution, max_points: 100_000 }
}

async fn series(store: &dyn Store, q: &MetricQuery) -> Vec<Series> {
    let (series, truncated) = store.query_metrics(q).await.expect("query");
    assert!(!truncated);
    series
}

fn raw_count(series: &[Series]) -> usize {
    series.iter().map(|s| s.points.len()).sum()
}

async fn a_metric_batch_is_stored_once_within_the_series_cap_for_a_known_agent(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let points = [
        point("cpu", T0, 1.0, &[("core", "0")]),
        point("cpu", T0, 9.0, &[("core", "0")]),
        point("cpu", T0 + 1, 2.0, &[("core", "1")]),
    ];
    let stored = store.store_metrics(metrics(agent, "b1", &points, 2)).await.expect("store");
    assert_eq!(stored, MetricsOutcome::Stored { points: 2 }, "the repeated (series, ts) is ignored");
    let again = store.store_metrics(metrics(agent, "b1", &points, 2)).await.expect("again");
    assert_eq!(again, MetricsOutcome::Duplicate);
    let got = series(store, &query(agent, "cpu", Resolution::Raw)).await;
    assert_eq!(raw_count(&got), 2, "the duplicate batch wrote nothing");
    assert_eq!(got[0].points[0].sum, 1.0, "the first value of a (series, ts) stays");
    assert_eq!(got[0].labels, labels(&[("core", "0")]));

    // A third series is over the cap: nothing of the batch is written.
    let over = [point("cpu", T0 + 5, 3.0, &[("core", "0")]), point("mem", T0 + 5, 3.0, &[])];
    let refused = store.store_metrics(metrics(agent, "b2", &over, 2)).await;
    assert!(
        matches!(&refused, Err(StoreError::Invalid { field: "points", message }) if message.contains('2')),
        "{refused:?}"
    );
    assert_eq!(raw_count(&series(store, &query(agent, "cpu", Resolution::Raw)).await), 2, "no point written");
    assert!(series(store, &query(agent, "mem", Resolution::Raw)).await.is_empty(), "no series written");
    let hourly = series(store, &query(agent, "cpu", Resolution::Hour)).await;
    assert_eq!(hourly.iter().map(|s| s.points[0].count).sum::<u64>(), 2, "no rollup written");
    // The batch id was not kept either: it can be sent again within the cap.
    let fits = [point("cpu", T0 + 5, 3.0, &[("core", "0")])];
    let stored = store.store_metrics(metrics(agent, "b2", &fits, 2)).await.expect("retry");
    assert_eq!(stored, MetricsOutcome::Stored { points: 1 });

    let nan = [point("cpu", T0 + 6, f64::NAN, &[("core", "0")])];
    let refused = store.store_metrics(metrics(agent, "b3", &nan, 2)).await;
    assert!(matches!(refused, Err(StoreError::Invalid { field: "points", .. })), "{refused:?}");
    let unknown = store.store_metrics(metrics(AgentId::new(), "b1", &points, 2)).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Agent))), "{unknown:?}");

    // The point limit cuts the answer.
    let q = MetricQuery { max_points: 2, ..query(agent, "cpu", Resolution::Raw) };
    let (cut, truncated) = store.query_metrics(&q).await.expect("cut");
    assert_eq!((raw_count(&cut), truncated), (2, true));
}

/// One generated case: points over three series of `cpu` (and one of
/// `mem`), hours and days, sent in batches, with repeats.
#[derive(Debug, Clone)]
struct Case {
    /// (series, ts offset from the base, value, batch)
    points: Vec<(usize, i64, i64, usize)>,
    raw_cut: i64,
    hourly_cut: i64,
    daily_cut: i64,
    max_rows: u32,
}

fn case() -> impl Strategy<Value = Case> {
    let offset = (0i64..72, 0i64..3).prop_map(|(hour, quarter)| hour * HOUR + quarter * 15 * 60_000);
    (
        prop::collection::vec((0usize..4, offset, -50i64..50, 0usize..4), 1..40),
        0i64..4 * DAY,
        0i64..4 * DAY,
        0i64..4 * DAY,
        3u32..20,
    )
        .prop_map(|(points, raw_cut, hourly_cut, daily_cut, max_rows)| Case {
            points,
            raw_cut,
            hourly_cut,
            daily_cut,
            max_rows,
        })
}

const SERIES: [(&str, &str); 4] = [("cpu", "0"), ("cpu", "1"), ("cpu", "2"), ("mem", "0")];

fn bucket(ts: i64, width: i64) -> i64 {
    ts - ts.rem_euclid(width)
}

/// What a query of `name` should answer, recomputed naively from the
/// distinct points `(series, ts) → value`.
fn expected(
    distinct: &BTreeMap<(usize, i64), f64>,
    name: &str,
    width: Option<i64>,
    since: i64,
) -> BTreeMap<String, Vec<SeriesPoint>> {
    let mut buckets: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
    for (&(s, ts), &value) in distinct {
        let (n, core) = SERIES[s];
        let at = width.map_or(ts, |w| bucket(ts, w));
        if n == name && at >= since {
            let key = serde_json::to_string(&labels(&[("core", core)])).expect("json");
            buckets.entry((key, at)).or_default().push(value);
        }
    }
    let mut out: BTreeMap<String, Vec<SeriesPoint>> = BTreeMap::new();
    for ((key, at), values) in buckets {
        let sum: f64 = values.iter().sum();
        let count = values.len() as u64;
        out.entry(key).or_default().push(SeriesPoint {
            ts_ms: at,
            count,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            avg: sum / count as f64,
            sum,
        });
    }
    out
}

fn answered(series: Vec<Series>) -> BTreeMap<String, Vec<SeriesPoint>> {
    series.into_iter().map(|s| (serde_json::to_string(&s.labels).expect("json"), s.points)).collect()
}

async fn run_case(store: &dyn Store, c: &Case) {
    let agent = enroll(store, &[]).await;
    // A base that is no hour's start, so buckets do not line up with batches.
    let base = bucket(T0, DAY) + 17 * 60_000;
    let mut distinct: BTreeMap<(usize, i64), f64> = BTreeMap::new();
    for b in 0..4 {
        let batch: Vec<&(usize, i64, i64, usize)> = c.points.iter().filter(|p| p.3 == b).collect();
        if batch.is_empty() {
            continue;
        }
        let points: Vec<MetricPoint> = batch
            .iter()
            .map(|&&(s, off, v, _)| point(SERIES[s].0, base + off, v as f64, &[("core", SERIES[s].1)]))
            .collect();
        let mut new = 0;
        for &&(s, off, v, _) in &batch {
            if let std::collections::btree_map::Entry::Vacant(e) = distinct.entry((s, base + off)) {
                e.insert(v as f64);
                new += 1;
            }
        }
        let stored = store.store_metrics(metrics(agent, &format!("batch-{b}"), &points, 10)).await.expect("store");
        assert_eq!(stored, MetricsOutcome::Stored { points: new }, "{c:?}");
    }
    for name in ["cpu", "mem"] {
        for (resolution, width) in
            [(Resolution::Raw, None), (Resolution::Hour, Some(HOUR)), (Resolution::Day, Some(DAY))]
        {
            let got = answered(series(store, &query(agent, name, resolution)).await);
            assert_eq!(got, expected(&distinct, name, width, i64::MIN), "{name} {resolution:?} {c:?}");
        }
    }

    let h = Horizons {
        raw_metrics_before: base + c.raw_cut,
        hourly_before: base + c.hourly_cut,
        daily_before: base + c.daily_cut,
        metric_batches_before: i64::MIN,
        finished_commands_before: i64::MIN,
        audit_before: i64::MIN,
    };
    let mut calls = 0;
    loop {
        let counts = store.prune_history(&h, c.max_rows).await.expect("prune");
        assert!(counts.raw <= u64::from(c.max_rows) && counts.hourly <= u64::from(c.max_rows), "{counts:?}");
        calls += 1;
        assert!(calls < 1000, "pruning ends");
        if !counts.more(c.max_rows) {
            break;
        }
    }
    for name in ["cpu", "mem"] {
        for (resolution, width, since) in [
            (Resolution::Raw, None, h.raw_metrics_before),
            (Resolution::Hour, Some(HOUR), h.hourly_before),
            (Resolution::Day, Some(DAY), h.daily_before),
        ] {
            let got = answered(series(store, &query(agent, name, resolution)).await);
            assert_eq!(got, expected(&distinct, name, width, since), "after pruning: {name} {resolution:?} {c:?}");
        }
    }
}

async fn rollups_equal_a_recomputation_and_retention_removes_exactly_what_is_past_its_horizon(h: &Harness) {
    let mut runner = TestRunner::new(Config { cases: 20, ..Config::default() });
    let strategy = case();
    for _ in 0..20 {
        let c = strategy.new_tree(&mut runner).expect("case").current();
        run_case(h.store(), &c).await;
    }
}

async fn finished_commands_past_the_horizon_are_pruned_and_the_rest_kept(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let audit = |_: &tether_proto::command::Command, _| audit_entry("command.result");
    let finish = |at: i64| async move {
        let id = command(store, agent, 60, T0).await;
        store.report_result(agent, id, &ResultReport::new(CommandStatus::Succeeded), at, &audit).await.expect("done");
        id
    };
    let (old1, old2, old3) = (finish(T0 + 10).await, finish(T0 + 11).await, finish(T0 + 12).await);
    let newer = finish(T0 + 100).await;
    let queued = command(store, agent, 60, T0).await;
    let running = command(store, agent, 60, T0).await;
    store.report_running(agent, running, T0 + 1).await.expect("running");
    let old_batch = store.get_command(old1).await.expect("get").expect("command").batch_id;
    let none = Horizons {
        raw_metrics_before: i64::MIN,
        hourly_before: i64::MIN,
        daily_before: i64::MIN,
        metric_batches_before: i64::MIN,
        finished_commands_before: T0 + 50,
        audit_before: i64::MIN,
    };
    let first = store.prune_history(&none, 2).await.expect("prune");
    assert_eq!(first.commands, 2);
    assert!(first.more(2));
    let second = store.prune_history(&none, 2).await.expect("prune");
    assert_eq!(second.commands, 1);
    assert!(!second.more(2));
    for gone in [old1, old2, old3] {
        assert!(store.get_command(gone).await.expect("get").is_none());
    }
    assert!(store.get_batch(old_batch).await.expect("batch").is_none(), "a batch left empty goes with them");
    for kept in [newer, queued, running] {
        assert!(store.get_command(kept).await.expect("get").is_some());
    }
    let filter = CommandFilter { agent_id: Some(agent), limit: 100, ..Default::default() };
    assert_eq!(store.list_commands(&filter).await.expect("list").len(), 3);
}

async fn audit_retention_leaves_a_chain_that_verifies_and_still_shows_tampering(h: &Harness) {
    let store = h.store();
    for i in 0..8 {
        let entry = AuditEntry { ts: T0 + i, details: json!({"i": i}), ..audit_entry("a") };
        store.append_audit(entry).await.expect("append");
    }
    let horizons = Horizons {
        raw_metrics_before: i64::MIN,
        hourly_before: i64::MIN,
        daily_before: i64::MIN,
        metric_batches_before: i64::MIN,
        finished_commands_before: i64::MIN,
        audit_before: T0 + 5,
    };
    assert_eq!(store.prune_history(&horizons, 3).await.expect("prune").audit, 3);
    assert_eq!(store.prune_history(&horizons, 3).await.expect("prune").audit, 2);
    assert_eq!(store.prune_history(&horizons, 3).await.expect("prune").audit, 0);
    let rows = store.list_audit(0, 100).await.expect("rows");
    assert_eq!(rows.iter().map(|r| r.ts).collect::<Vec<_>>(), vec![T0 + 5, T0 + 6, T0 + 7]);
    let anchor = store.audit_anchor().await.expect("anchor").expect("pruned");
    assert_eq!(anchor.hash, rows[0].prev_hash);
    let v = verify_audit(store).await.expect("verify");
    assert_eq!((v.checked, v.broken_count), (3, 0), "{v:?}");
    // Appends go on from the chain as it is.
    store.append_audit(audit_entry("after")).await.expect("append");
    assert_eq!(verify_audit(store).await.expect("verify").broken_count, 0);
    // Everything older goes, then appends continue from the anchor.
    let all = Horizons { audit_before: i64::MAX, ..horizons };
    assert_eq!(store.prune_history(&all, 100).await.expect("prune").audit, 4);
    store.append_audit(audit_entry("fresh")).await.expect("append");
    let v = verify_audit(store).await.expect("verify");
    assert_eq!((v.checked, v.broken_count), (1, 0), "{v:?}");
    store.append_audit(audit_entry("more")).await.expect("append");
    let rows = store.list_audit(0, 100).await.expect("rows");
    h.exec(&format!("UPDATE audit SET details = '{{\"i\":99}}' WHERE id = {}", rows[0].id)).await;
    let v = verify_audit(store).await.expect("verify");
    assert_eq!(v.broken.iter().map(|b| b.id).collect::<Vec<_>>(), vec![rows[0].id], "{v:?}");
}

fn item(kind: &str, key: &str, attrs: serde_json::Value) -> InventoryItem {
    InventoryItem { kind: kind.into(), key: key.into(), attrs }
}

async fn inventory_is_upserted_removed_replaced_and_listed_in_pages(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let other = enroll(store, &[]).await;
    let upsert = [
        item("printer", "p2", json!({"ink": 10})),
        item("printer", "p1", json!({"ink": 50})),
        item("scanner", "s1", json!({})),
        item("printer", "p2", json!({"ink": 20})),
    ];
    store.change_inventory(agent, &upsert, &[], T0).await.expect("upsert");
    store.change_inventory(other, &[item("printer", "p1", json!({}))], &[], T0).await.expect("other");
    let list = |kind: Option<&'static str>, after: Option<(String, String)>, limit| async move {
        let got = store.list_inventory(agent, kind, after, limit).await.expect("list");
        got.into_iter().map(|r| (r.kind, r.key, r.attrs, r.updated_at)).collect::<Vec<_>>()
    };
    let all = list(None, None, 10).await;
    let keys: Vec<_> = all.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert_eq!(keys, vec![("printer", "p1"), ("printer", "p2"), ("scanner", "s1")]);
    assert_eq!(all[1].2, json!({"ink": 20}), "the last upsert of a key wins");
    let page = list(None, None, 2).await;
    let rest = list(None, Some((page[1].0.clone(), page[1].1.clone())), 2).await;
    assert_eq!(rest.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), vec!["s1"]);
    assert_eq!(list(Some("scanner"), None, 10).await.len(), 1);
    assert_eq!(list(Some("printer"), Some(("printer".into(), "p1".into())), 10).await.len(), 1);

    let remove = [
        InventoryKey { kind: "printer".into(), key: "p1".into() },
        InventoryKey { kind: "printer".into(), key: "gone".into() },
    ];
    let change = [item("printer", "p2", json!({"ink": 5}))];
    store.change_inventory(agent, &change, &remove, T0 + 1).await.expect("change");
    let now = list(None, None, 10).await;
    assert_eq!(now.len(), 2);
    assert_eq!((now[0].1.as_str(), &now[0].2, now[0].3), ("p2", &json!({"ink": 5}), T0 + 1));
    assert_eq!(now[1].3, T0, "untouched items keep their time");

    store.replace_inventory(agent, &[item("ups", "u1", json!({"load": 3}))], T0 + 2).await.expect("replace");
    let replaced = list(None, None, 10).await;
    assert_eq!(replaced, vec![("ups".into(), "u1".into(), json!({"load": 3}), T0 + 2)]);
    assert_eq!(store.list_inventory(other, None, None, 10).await.expect("other").len(), 1, "another agent's stays");
    store.replace_inventory(agent, &[], T0 + 3).await.expect("empty");
    assert!(list(None, None, 10).await.is_empty());

    let unknown = store.change_inventory(AgentId::new(), &change, &[], T0).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Agent))), "{unknown:?}");
    let unknown = store.replace_inventory(AgentId::new(), &change, T0).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Agent))), "{unknown:?}");
}

async fn presence_transitions_are_recorded_and_reported_once(h: &Harness) {
    let store = h.store();
    let (a, b, c) = (enroll(store, &[]).await, enroll(store, &[]).await, enroll(store, &[]).await);
    let online = |id| async move { store.get_agent(id).await.expect("get").expect("agent").online };
    assert_eq!(online(a).await, Some(true), "a new agent starts online");
    store.revoke_agent(c, "gone", T0 + 1, audit_entry("agent.revoke")).await.expect("revoke");
    h.exec(&format!("UPDATE agents SET online = NULL WHERE id = '{a}'")).await;
    store.touch_agents(&[(b, T0 + 100)]).await.expect("touch");

    let changes = store.update_presence(T0 + 50, T0 + 200).await.expect("presence");
    assert!(changes.is_empty(), "an undecided agent is set, not reported: {changes:?}");
    assert_eq!((online(a).await, online(b).await), (Some(false), Some(true)));
    assert_eq!(online(c).await, Some(true), "a revoked agent is left alone");

    let changes = store.update_presence(T0 + 150, T0 + 300).await.expect("presence");
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].agent_id, changes[0].online, changes[0].last_seen), (b, false, Some(T0 + 100)));
    assert_eq!(changes[0].hostname, "host");
    assert!(store.update_presence(T0 + 150, T0 + 301).await.expect("again").is_empty(), "reported once");

    store.touch_agents(&[(a, T0 + 400)]).await.expect("touch");
    let changes = store.update_presence(T0 + 350, T0 + 500).await.expect("presence");
    assert_eq!(changes.iter().map(|c| (c.agent_id, c.online)).collect::<Vec<_>>(), vec![(a, true)]);

    // Two servers at once: the transition is reported by one of them.
    let other = h.another_server().await;
    let (x, y) = tokio::join!(store.update_presence(T0 + 1000, T0 + 1000), other.update_presence(T0 + 1000, T0 + 1000));
    let (x, y) = (x.expect("x"), y.expect("y"));
    assert_eq!(x.len() + y.len(), 1, "{x:?} {y:?}");

    let filter = AuditFilter { actor: Some("server".into()), limit: 100, ..Default::default() };
    let audits: Vec<_> =
        store.query_audit(&filter).await.expect("audit").into_iter().map(|r| (r.action, r.target)).rev().collect();
    assert_eq!(
        audits,
        vec![
            ("agent.offline".into(), b.to_string()),
            ("agent.online".into(), a.to_string()),
            ("agent.offline".into(), a.to_string()),
        ]
    );
    assert_eq!(verify_audit(store).await.expect("verify").broken_count, 0);
}

async fn agents_are_filtered_by_status_in_id_pages_and_counted(h: &Harness) {
    let store = h.store();
    let mut offline = Vec::new();
    for _ in 0..3 {
        offline.push(enroll(store, &[("env", "prod")]).await);
    }
    offline.sort();
    let up = enroll(store, &[("env", "prod")]).await;
    let revoked = enroll(store, &[("env", "prod")]).await;
    store.touch_agents(&[(up, T0 + 100), (revoked, T0 + 100)]).await.expect("touch");
    store.revoke_agent(revoked, "x", T0 + 1, audit_entry("agent.revoke")).await.expect("revoke");
    let list = |status, after, limit| async move {
        let filter = AgentFilter { status: Some(status), after, limit, labels: labels(&[("env", "prod")]), q: None };
        store.list_agents(&filter).await.expect("list").into_iter().map(|a| a.id).collect::<Vec<_>>()
    };
    let since = T0 + 50;
    assert_eq!(list(StatusFilter::Online { seen_since: since }, None, 10).await, vec![up]);
    assert_eq!(list(StatusFilter::Revoked, None, 10).await, vec![revoked]);
    assert_eq!(list(StatusFilter::Offline { seen_since: since }, None, 10).await, offline);
    let page = list(StatusFilter::Offline { seen_since: since }, None, 2).await;
    assert_eq!(page, offline[..2]);
    let rest = list(StatusFilter::Offline { seen_since: since }, Some(page[1]), 2).await;
    assert_eq!(rest, offline[2..]);
    assert_eq!(list(StatusFilter::Online { seen_since: T0 }, None, 10).await.len(), 4);
    // The gauges count by the same rule.
    command(store, up, 60, T0).await;
    let counts = store.fleet_counts(since).await.expect("counts");
    assert_eq!((counts.agents_online, counts.agents_offline, counts.agents_revoked), (1, 3, 1));
    assert_eq!(counts.commands, vec![("queued".to_owned(), 1)]);
}

async fn a_disconnected_agent_is_offline_until_seen_again(h: &Harness) {
    let store = h.store();
    let (gone, stays) = (enroll(store, &[("env", "ws")]).await, enroll(store, &[("env", "ws")]).await);
    store.touch_agents(&[(gone, T0 + 100), (stays, T0 + 100)]).await.expect("touch");
    let since = T0 + 50;
    let online = |id| async move { store.get_agent(id).await.expect("get").expect("agent").online };

    // Flipped at once, with its audit row, reported once.
    let change = store.disconnect_agent(gone, T0 + 120).await.expect("disconnect").expect("a transition");
    assert_eq!((change.agent_id, change.online, change.last_seen), (gone, false, Some(T0 + 100)));
    assert!(store.disconnect_agent(gone, T0 + 121).await.expect("again").is_none(), "reported once");
    assert_eq!((online(gone).await, online(stays).await), (Some(false), Some(true)));
    let rec = store.get_agent(gone).await.expect("get").expect("agent");
    assert_eq!(rec.disconnected_at, Some(T0 + 121));
    assert!(!rec.online_at(rec.last_seen, since), "seen before the close");

    // Every reader applies the same rule, and the presence job does not undo it.
    let filter = |status| AgentFilter {
        status: Some(status),
        after: None,
        limit: 10,
        labels: labels(&[("env", "ws")]),
        q: None,
    };
    let ids = |status| async move {
        store.list_agents(&filter(status)).await.expect("list").into_iter().map(|a| a.id).collect::<Vec<_>>()
    };
    assert_eq!(ids(StatusFilter::Online { seen_since: since }).await, vec![stays]);
    assert_eq!(ids(StatusFilter::Offline { seen_since: since }).await, vec![gone]);
    let counts = store.fleet_counts(since).await.expect("counts");
    assert_eq!((counts.agents_online, counts.agents_offline), (1, 1));
    assert!(store.update_presence(since, T0 + 130).await.expect("presence").is_empty());

    // A late flush of an older `last_seen` changes nothing; being seen after the close does.
    store.touch_agents(&[(gone, T0 + 110)]).await.expect("late flush");
    assert!(store.update_presence(since, T0 + 140).await.expect("presence").is_empty());
    store.touch_agents(&[(gone, T0 + 150)]).await.expect("back");
    let changes = store.update_presence(since, T0 + 160).await.expect("presence");
    assert_eq!(changes.iter().map(|c| (c.agent_id, c.online)).collect::<Vec<_>>(), vec![(gone, true)]);
    assert_eq!(ids(StatusFilter::Online { seen_since: since }).await.len(), 2);

    // Seen after the moment given (another replica got it first): nothing flips.
    assert!(store.disconnect_agent(gone, T0 + 140).await.expect("stale").is_none());
    assert_eq!(online(gone).await, Some(true));
    assert!(store.disconnect_agent(AgentId::new(), T0).await.expect("unknown agent").is_none());
    assert_eq!(verify_audit(store).await.expect("verify").broken_count, 0);
}

async fn heartbeats_are_written_in_one_batch(h: &Harness) {
    let store = h.store();
    let (a, b) = (enroll(store, &[]).await, enroll(store, &[]).await);
    let beat = |agent_id, version: &str, at| HeartbeatRow {
        agent_id,
        version: Some(version.into()),
        applied_config_hash: None,
        failed_config: Some(("h1".into(), "bad".into())),
        body: json!({"v": version}).to_string(),
        at,
    };
    let beats =
        [beat(a, "1.0", T0 + 10), beat(AgentId::new(), "9", T0), beat(b, "2.0", T0 - 5), beat(a, "1.1", T0 + 20)];
    store.record_heartbeats(&beats).await.expect("beats");
    store.record_heartbeats(&[]).await.expect("nothing");
    let a = store.get_agent(a).await.expect("get").expect("a");
    assert_eq!((a.version.as_deref(), a.last_seen), (Some("1.1"), Some(T0 + 20)), "the latest of an agent's rows");
    assert_eq!((a.config_failed_hash.as_deref(), a.config_error.as_deref()), (Some("h1"), Some("bad")));
    let b = store.get_agent(b).await.expect("get").expect("b");
    assert_eq!((b.version.as_deref(), b.last_seen), (Some("2.0"), Some(T0)), "last_seen never moves back");
}

async fn deleting_an_agent_removes_everything_only_its(h: &Harness) {
    let store = h.store();
    let victim_refresh = rand_hash();
    let victim = enroll_with(store, &[("role", "web")], victim_refresh).await;
    let other = enroll(store, &[("role", "web")]).await;
    // Commands: one only its, one batch shared with the other agent.
    let own = command(store, victim, 60, T0).await;
    let audit = |_: &tether_proto::command::Command, _| audit_entry("command.result");
    let mut done = ResultReport::new(CommandStatus::Succeeded);
    done.stdout = "output".into();
    store.report_result(victim, own, &done, T0 + 1, &audit).await.expect("result");
    let own_batch = store.get_command(own).await.expect("get").expect("command").batch_id;
    let shared = batch(TargetSpec::Agents(vec![victim, other]), T0);
    let shared = store.create_batch(shared, &|_| audit_entry("command.create")).await.expect("shared");
    // A file both hold, and their reports.
    let sha = crate::files::blob(store, b"content").await;
    let file = NewFileAssignment {
        sha256: sha,
        path: "/etc/x".into(),
        mode: 0o644,
        owner: None,
        group: None,
        hook: None,
        target: TargetSpec::Labels(labels(&[("role", "web")])),
        by: "alice".into(),
        now: T0,
    };
    let file = store.assign_file(file, &|_| audit_entry("file.assign")).await.expect("assign").item.id;
    for agent in [victim, other] {
        store.report_item(agent, ItemKind::File, file, ItemReport::applied(1), T0).await.expect("report");
        let points = [point("cpu", T0, 1.0, &[])];
        store.store_metrics(metrics(agent, "b1", &points, 10)).await.expect("metrics");
        store.change_inventory(agent, &[item("printer", "p1", json!({}))], &[], T0).await.expect("inventory");
        assert!(store.remember_nonce(agent, "n1", 2_000_000_000).await.expect("nonce"));
    }
    let scope = Scope::Agent(victim);
    let doc = serde_json::from_value(json!({"x": 1})).expect("doc");
    let config = NewConfigVersion {
        scope: scope.clone(),
        doc,
        if_match: None,
        author: "alice".into(),
        comment: String::new(),
        now: T0,
    };
    store.put_config(config, audit_entry("config.put")).await.expect("config");

    let deleted = store.delete_agent(victim, audit_entry("agent.delete")).await.expect("delete");
    assert_eq!(deleted.id, victim);
    let again = store.delete_agent(victim, audit_entry("agent.delete")).await;
    assert!(matches!(again, Err(StoreError::NotFound(Entity::Agent))), "{again:?}");
    // Other servers hear of it when they catch up: as a revocation.
    let changes = store.stream_changes(T0).await.expect("changes");
    let change = changes.iter().find(|c| c.agent_id == victim).expect("the deleted agent is a stream change");
    assert_eq!((change.revoked_at, change.revoke_reason.as_deref()), (Some(T0), Some("deleted")));

    assert!(store.get_agent(victim).await.expect("get").is_none());
    let all = store.list_agents(&AgentFilter { limit: 100, ..Default::default() }).await.expect("list");
    assert_eq!(all.iter().map(|a| a.id).collect::<Vec<_>>(), vec![other]);
    let commands = |agent| async move {
        store.list_commands(&CommandFilter { agent_id: Some(agent), limit: 100, ..Default::default() }).await
    };
    assert!(commands(victim).await.expect("commands").is_empty());
    assert!(store.get_command(own).await.expect("get").is_none());
    assert!(store.get_batch(own_batch).await.expect("batch").is_none(), "a batch only its goes");
    let shared_batch = store.get_batch(shared.batch_id).await.expect("batch").expect("a shared batch stays");
    assert_eq!(shared_batch.total, 1);
    assert!(store.read_signals(victim, 0, 100).await.expect("signals").is_empty());
    assert!(series(store, &query(victim, "cpu", Resolution::Raw)).await.is_empty());
    assert!(series(store, &query(victim, "cpu", Resolution::Hour)).await.is_empty());
    assert!(store.list_inventory(victim, None, None, 10).await.expect("inventory").is_empty());
    assert!(store.remember_nonce(victim, "n1", 2_000_000_000).await.expect("nonce"), "its nonces are forgotten");
    assert!(store.get_config(&scope, None).await.expect("config").is_none());
    assert!(store.list_configs().await.expect("configs").is_empty());
    let refreshed = rotate(store, victim, victim_refresh, rand_hash(), T0 + 2).await;
    assert_eq!(refreshed, RefreshOutcome::Invalid);
    let status = store.item_status(ItemKind::File, file).await.expect("status");
    assert_eq!((status.targeted, status.current), (1, 1), "{status:?}");
    // Metrics can be stored for it no more.
    let points = [point("cpu", T0 + 1, 1.0, &[])];
    let late = store.store_metrics(metrics(victim, "b2", &points, 10)).await;
    assert!(matches!(late, Err(StoreError::NotFound(Entity::Agent))), "{late:?}");

    // The other agent's data is untouched.
    assert!(store.get_agent(other).await.expect("get").is_some());
    assert_eq!(commands(other).await.expect("commands").len(), 1);
    assert_eq!(store.read_signals(other, 0, 100).await.expect("signals").len(), 2, "a command and a file");
    assert_eq!(raw_count(&series(store, &query(other, "cpu", Resolution::Raw)).await), 1);
    assert_eq!(raw_count(&series(store, &query(other, "cpu", Resolution::Day)).await), 1);
    assert_eq!(store.list_inventory(other, None, None, 10).await.expect("inventory").len(), 1);
    assert!(!store.remember_nonce(other, "n1", 2_000_000_000).await.expect("nonce"));
    // Audit rows about it stay, and the chain is whole.
    let filter = AuditFilter { action: Some("agent.delete".into()), limit: 10, ..Default::default() };
    assert_eq!(store.query_audit(&filter).await.expect("audit").len(), 1);
    assert_eq!(verify_audit(store).await.expect("verify").broken_count, 0);
}
