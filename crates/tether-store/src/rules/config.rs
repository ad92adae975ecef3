//! Configuration rules (protocol.md §6): the order scopes layer in, the
//! deep merge into an agent's effective configuration with the provenance
//! of every value, and the `If-Match` rule for writing a new version.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tether_proto::config::{ConfigStatus, Doc, EffectiveConfig, Provenance, Scope, doc_hash, leaves, pointer_segment};
use tether_proto::{AgentId, Labels};

use crate::{Result, StoreError};

/// One scope's current document, as it applies to an agent.
#[derive(Debug, Clone)]
pub struct Layer<'a> {
    pub scope: &'a Scope,
    pub version: u64,
    pub doc: &'a Doc,
}

/// Where a scope goes in the layering: global first, then label scopes in
/// key order, the agent's own scope last (it always wins).
fn rank(scope: &Scope) -> (u8, String) {
    match scope {
        Scope::Global => (0, String::new()),
        Scope::Label { key, value } => (1, format!("{key}={value}")),
        Scope::Agent(_) => (2, String::new()),
    }
}

/// Merges the layers that apply to one agent (in any order: they are put in
/// the layering order first) into its effective configuration. Objects merge
/// key by key, recursively; anything else (a string, a number, an array,
/// `null`, and an empty object, which clears what was there) set by a later
/// layer replaces what an earlier one set there.
pub fn effective(mut layers: Vec<Layer<'_>>) -> EffectiveConfig {
    layers.sort_by_key(|l| rank(l.scope));
    let mut doc = Doc::new();
    let mut provenance = BTreeMap::new();
    for layer in &layers {
        let source = Provenance { scope: layer.scope.clone(), version: layer.version };
        merge_into(&mut doc, layer.doc, "", &source, &mut provenance);
    }
    let hash = doc_hash(&doc);
    EffectiveConfig { doc, hash, provenance }
}

fn merge_into(
    target: &mut Doc,
    layer: &Doc,
    prefix: &str,
    source: &Provenance,
    provenance: &mut BTreeMap<String, Provenance>,
) {
    for (key, value) in layer {
        let path = format!("{prefix}/{}", pointer_segment(key));
        match (target.get_mut(key), value) {
            (Some(Value::Object(existing)), Value::Object(incoming)) if !incoming.is_empty() => {
                // An empty object was a leaf until now.
                provenance.remove(&path);
                merge_into(existing, incoming, &path, source, provenance);
            }
            _ => {
                // Whatever was under this path before is replaced, and so is its provenance.
                provenance.retain(|p, _| p != &path && !p.starts_with(&format!("{path}/")));
                record(&path, value, source, provenance);
                target.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Names `source` for every leaf under `path`.
fn record(path: &str, value: &Value, source: &Provenance, provenance: &mut BTreeMap<String, Provenance>) {
    for (leaf, _) in leaves(path, value) {
        provenance.insert(leaf, source.clone());
    }
}

/// The current documents of the scopes one decision needs (read in its
/// transaction): global and label scopes in a list, agent scopes by agent.
#[derive(Debug, Default)]
pub struct CurrentDocs {
    shared: Vec<(Scope, u64, Doc)>,
    own: HashMap<AgentId, (Scope, u64, Doc)>,
}

impl CurrentDocs {
    pub fn new(docs: impl IntoIterator<Item = (Scope, u64, Doc)>) -> Self {
        let mut out = Self::default();
        for (scope, version, doc) in docs {
            match scope {
                Scope::Agent(id) => {
                    out.own.insert(id, (scope, version, doc));
                }
                _ => out.shared.push((scope, version, doc)),
            }
        }
        out
    }

    /// The effective configuration of agent `id` carrying `labels`.
    pub fn effective_for(&self, id: AgentId, labels: &Labels) -> EffectiveConfig {
        let layers = self
            .shared
            .iter()
            .filter(|(scope, _, _)| scope.targets(id, labels))
            .chain(self.own.get(&id))
            .map(|(scope, version, doc)| Layer { scope, version: *version, doc })
            .collect();
        effective(layers)
    }
}

/// The `config_id` of a `config.updated` signal caused by a change of the
/// agent's own labels rather than of a scope (its `version` is 0).
pub const RELABELLED: &str = "labels";

/// An agent whose effective configuration a change may alter.
#[derive(Debug, Clone)]
pub struct Retarget {
    pub agent_id: AgentId,
    pub labels: Labels,
    /// Its current desired hash (`None`: never computed).
    pub config_hash: Option<String>,
}

/// The agents whose effective configuration hash differs from the one they
/// have, with the new hash: only they are told.
pub fn retargeted(docs: &CurrentDocs, agents: &[Retarget]) -> Vec<(AgentId, String)> {
    agents
        .iter()
        .filter_map(|a| {
            let hash = docs.effective_for(a.agent_id, &a.labels).hash;
            (a.config_hash.as_deref() != Some(hash.as_str())).then_some((a.agent_id, hash))
        })
        .collect()
}

/// A scope's fleet status from each targeted agent's report on its desired
/// configuration: (runs it, failed to apply it, the error). An agent that
/// neither runs it nor failed it is behind.
pub fn fleet_status(
    scope: Scope,
    version: u64,
    reports: impl IntoIterator<Item = (bool, bool, Option<String>)>,
) -> ConfigStatus {
    let mut status = ConfigStatus { scope, version, targeted: 0, applied: 0, behind: 0, failed: 0, errors: Vec::new() };
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (applied, failed, error) in reports {
        status.targeted += 1;
        // A failure of the desired hash wins over an applied report of the
        // same hash: it can only be newer (applying it clears the failure),
        // e.g. a restart whose hook failed where it had worked before.
        if failed {
            status.failed += 1;
            *errors.entry(error.unwrap_or_default()).or_default() += 1;
        } else if applied {
            status.applied += 1;
        } else {
            status.behind += 1;
        }
    }
    status.errors = super::items::group_errors(errors);
    status
}

/// The version a write makes, given the scope's current version (`None`:
/// the scope does not exist yet) and the writer's `If-Match`. Once a scope
/// exists, a write must say which version it replaces (428 otherwise), and
/// that must be the current one (409 otherwise); `If-Match: "0"` means
/// "only if it does not exist yet".
pub fn next_version(current: Option<u64>, if_match: Option<u64>) -> Result<u64> {
    match (current, if_match) {
        (None, None | Some(0)) => Ok(1),
        (None, Some(v)) => Err(StoreError::Conflict(format!("the scope has no version {v}"))),
        (Some(_), None) => Err(StoreError::PreconditionRequired(
            "the scope exists: send If-Match with the version you are replacing".into(),
        )),
        (Some(current), Some(v)) if v == current => Ok(current + 1),
        (Some(current), Some(v)) => {
            Err(StoreError::Conflict(format!("version {v} is stale: the scope is at version {current}")))
        }
    }
}

/// The history comment of a rollback's new version.
pub fn rollback_comment(version: u64) -> String {
    format!("rollback to version {version}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;
    use tether_proto::AgentId;

    use super::*;

    fn doc(v: Value) -> Doc {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn label(k: &str, v: &str) -> Scope {
        Scope::Label { key: k.into(), value: v.into() }
    }

    #[test]
    fn later_layers_win_objects_merge_and_provenance_names_the_winner() {
        let agent = Scope::Agent(AgentId::new());
        let (g, env, role) = (Scope::Global, label("env", "prod"), label("role", "web"));
        let global = doc(json!({"url": "a", "agent": {"poll_wait_s": 30, "heartbeat_s": 30}, "list": [1, 2]}));
        let by_env = doc(json!({"agent": {"heartbeat_s": 10}, "list": [3]}));
        let by_role = doc(json!({"url": "b"}));
        let own = doc(json!({"url": "c", "extra": {}}));
        let layers = vec![
            Layer { scope: &agent, version: 4, doc: &own },
            Layer { scope: &role, version: 3, doc: &by_role },
            Layer { scope: &g, version: 1, doc: &global },
            Layer { scope: &env, version: 2, doc: &by_env },
        ];
        let eff = effective(layers);
        assert_eq!(
            Value::Object(eff.doc.clone()),
            json!({"url": "c", "agent": {"poll_wait_s": 30, "heartbeat_s": 10}, "list": [3], "extra": {}})
        );
        let from = |p: &str| eff.provenance[p].clone();
        assert_eq!(from("/url"), Provenance { scope: agent.clone(), version: 4 });
        assert_eq!(from("/agent/poll_wait_s"), Provenance { scope: g, version: 1 });
        assert_eq!(from("/agent/heartbeat_s"), Provenance { scope: env.clone(), version: 2 });
        assert_eq!(from("/list"), Provenance { scope: env, version: 2 });
        assert_eq!(from("/extra"), Provenance { scope: agent, version: 4 });
        assert_eq!(eff.provenance.len(), 5);
    }

    #[test]
    fn a_value_replacing_an_object_takes_its_provenance_and_keys_with_slashes_are_escaped() {
        let (g, own) = (Scope::Global, Scope::Agent(AgentId::new()));
        let global = doc(json!({"db": {"host": "x", "port": 5432}, "a/b": {"c~d": 1}}));
        let mine = doc(json!({"db": "sqlite"}));
        let eff = effective(vec![
            Layer { scope: &g, version: 1, doc: &global },
            Layer { scope: &own, version: 1, doc: &mine },
        ]);
        let paths: Vec<&str> = eff.provenance.keys().map(String::as_str).collect();
        assert_eq!(paths, vec!["/a~1b/c~0d", "/db"]);
        assert_eq!(eff.provenance["/db"].scope, own);
    }

    #[test]
    fn only_agents_whose_hash_changes_are_retargeted() {
        let (a, b) = (AgentId::new(), AgentId::new());
        let prod: Labels = [("env".to_owned(), "prod".to_owned())].into();
        let before = CurrentDocs::new([(Scope::Global, 1, doc(json!({"x": 1})))]);
        let hash_before = before.effective_for(a, &prod).hash;
        let after = CurrentDocs::new([
            (Scope::Global, 1, doc(json!({"x": 1}))),
            (label("env", "prod"), 1, doc(json!({"x": 2}))),
            (Scope::Agent(b), 1, doc(json!({"y": 1}))),
        ]);
        let agents = vec![
            Retarget { agent_id: a, labels: prod.clone(), config_hash: Some(hash_before.clone()) },
            Retarget { agent_id: b, labels: Labels::new(), config_hash: Some(hash_before) },
        ];
        let changed = retargeted(&after, &agents);
        assert_eq!(changed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(changed[0].1, after.effective_for(a, &prod).hash);
        let unchanged = vec![Retarget { agent_id: a, labels: prod.clone(), config_hash: Some(changed[0].1.clone()) }];
        assert!(retargeted(&after, &unchanged).is_empty());
    }

    #[test]
    fn fleet_status_counts_each_agent_once_and_groups_failures_by_error() {
        let e = |s: &str| Some(s.to_owned());
        let reports = vec![
            (true, false, None),
            (true, true, e("hook exited 1")),
            (false, true, e("bad heartbeat_s")),
            (false, true, e("bad heartbeat_s")),
            (false, true, e("hook exited 1")),
            (false, false, None),
        ];
        let s = fleet_status(Scope::Global, 3, reports);
        assert_eq!((s.targeted, s.applied, s.failed, s.behind), (6, 1, 4, 1));
        let errors: Vec<(&str, u64)> = s.errors.iter().map(|e| (e.error.as_str(), e.agents)).collect();
        assert_eq!(errors, vec![("bad heartbeat_s", 2), ("hook exited 1", 2)]);
    }

    #[test]
    fn if_match_is_required_once_the_scope_exists_and_must_be_current() {
        assert_eq!(next_version(None, None).expect("create"), 1);
        assert_eq!(next_version(None, Some(0)).expect("create only"), 1);
        assert!(matches!(next_version(None, Some(3)), Err(StoreError::Conflict(_))));
        assert!(matches!(next_version(Some(3), None), Err(StoreError::PreconditionRequired(_))));
        assert!(matches!(next_version(Some(3), Some(2)), Err(StoreError::Conflict(_))));
        assert_eq!(next_version(Some(3), Some(3)).expect("current"), 4);
    }

    /// Small JSON objects: a few keys, nested a little, of every kind of value.
    fn arb_doc() -> impl Strategy<Value = Doc> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(Value::from),
            (-5i64..5).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::from),
            Just(Value::Null),
            prop::collection::vec((-2i64..2).prop_map(Value::from), 0..3).prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
        });
        prop::collection::btree_map("[a-d]", value, 0..5).prop_map(|m| m.into_iter().collect())
    }

    /// The value at a JSON Pointer.
    fn at(doc: &Doc, pointer: &str) -> Option<Value> {
        Value::Object(doc.clone()).pointer(pointer).cloned()
    }

    proptest! {
        #[test]
        fn the_agent_scope_always_wins(global in arb_doc(), labelled in arb_doc(), own in arb_doc()) {
            let (g, l, a) = (Scope::Global, label("env", "prod"), Scope::Agent(AgentId::new()));
            let eff = effective(vec![
                Layer { scope: &a, version: 3, doc: &own },
                Layer { scope: &g, version: 1, doc: &global },
                Layer { scope: &l, version: 2, doc: &labelled },
            ]);
            // Every value the agent scope sets is in the result as it set it
            // (objects merged, so compare its leaves).
            let mine = effective(vec![Layer { scope: &a, version: 3, doc: &own }]);
            for (pointer, source) in &mine.provenance {
                prop_assert_eq!(at(&eff.doc, pointer), at(&own, pointer));
                prop_assert_eq!(&eff.provenance[pointer], source);
            }
        }

        #[test]
        fn the_order_the_layers_arrive_in_does_not_matter(global in arb_doc(), labelled in arb_doc(), own in arb_doc()) {
            let (g, l, a) = (Scope::Global, label("env", "prod"), Scope::Agent(AgentId::new()));
            let forward = effective(vec![
                Layer { scope: &g, version: 1, doc: &global },
                Layer { scope: &l, version: 2, doc: &labelled },
                Layer { scope: &a, version: 3, doc: &own },
            ]);
            let backward = effective(vec![
                Layer { scope: &a, version: 3, doc: &own },
                Layer { scope: &l, version: 2, doc: &labelled },
                Layer { scope: &g, version: 1, doc: &global },
            ]);
            prop_assert_eq!(&forward, &backward);
        }

        #[test]
        fn provenance_names_exactly_the_last_layer_that_set_each_value(global in arb_doc(), labelled in arb_doc()) {
            let (g, l) = (Scope::Global, label("env", "prod"));
            let eff = effective(vec![
                Layer { scope: &g, version: 1, doc: &global },
                Layer { scope: &l, version: 2, doc: &labelled },
            ]);
            for (pointer, source) in &eff.provenance {
                let expected = if at(&labelled, pointer).is_some() { &l } else { &g };
                prop_assert_eq!(&source.scope, expected, "{}", pointer);
                let from = if source.scope == l { &labelled } else { &global };
                prop_assert_eq!(at(&eff.doc, pointer), at(from, pointer));
            }
            // And every leaf of the result has a provenance.
            let leaves = effective(vec![Layer { scope: &g, version: 0, doc: &eff.doc }]).provenance;
            prop_assert_eq!(leaves.keys().collect::<Vec<_>>(), eff.provenance.keys().collect::<Vec<_>>());
        }

        #[test]
        fn the_hash_is_stable_under_key_order_and_whitespace(d in arb_doc()) {
            let text = serde_json::to_string_pretty(&Value::Object(d.clone())).expect("json");
            let reparsed: Value = serde_json::from_str(&text).expect("json");
            let Value::Object(reparsed) = reparsed else { unreachable!("an object") };
            let reversed: Doc = d.clone().into_iter().rev().collect();
            let (g,) = (Scope::Global,);
            let hashes = [&d, &reparsed, &reversed]
                .map(|doc| effective(vec![Layer { scope: &g, version: 1, doc }]).hash);
            prop_assert_eq!(&hashes[0], &hashes[1]);
            prop_assert_eq!(&hashes[0], &hashes[2]);
        }
    }
}
