//! Configuration documents, their versions, and how changes reach agents.

use std::sync::Arc;

use futures::future::join_all;
use serde_json::{Value, json};
use tether_proto::AgentId;
use tether_proto::config::{ConfigUpdated, Doc, Scope};
use tether_proto::signal::CONFIG_UPDATED;
use tether_store::{AgentUpdate, Entity, HeartbeatRow, NewConfigVersion, Store, StoreError};

use crate::fixtures::{T0, audit_entry, enroll, labels};
use crate::harness::{Harness, conformance};

conformance!(
    a_scope_is_written_with_if_match_and_keeps_every_version,
    a_label_scope_tells_only_the_agents_whose_effective_config_changed,
    the_effective_config_layers_scopes_and_names_where_each_value_came_from,
    rollback_writes_the_old_document_again_and_restores_the_hashes,
    relabelling_an_agent_retargets_it,
    a_new_agent_starts_with_its_effective_hash_and_no_signal,
    an_agent_scope_needs_an_active_agent,
    fleet_status_counts_what_agents_reported,
    concurrent_writes_and_enrollments_on_two_servers_leave_every_agent_its_true_effective_hash,
);

fn doc(v: Value) -> Doc {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn scope(s: &str) -> Scope {
    s.parse().expect("scope")
}

async fn put(
    store: &dyn Store,
    s: &Scope,
    d: Value,
    if_match: Option<u64>,
) -> Result<tether_store::ConfigChange, StoreError> {
    let new = NewConfigVersion {
        scope: s.clone(),
        doc: doc(d),
        if_match,
        author: "alice".into(),
        comment: "test".into(),
        now: T0,
    };
    store.put_config(new, audit_entry("config.put")).await
}

/// The `config.updated` signals in an agent's stream, oldest first.
async fn config_signals(store: &dyn Store, agent: AgentId) -> Vec<ConfigUpdated> {
    let signals = store.read_signals(agent, 0, 1000).await.expect("signals");
    signals
        .into_iter()
        .filter(|(_, s)| s.kind == CONFIG_UPDATED)
        .map(|(_, s)| serde_json::from_value(s.reference).expect("config.updated ref"))
        .collect()
}

async fn desired(store: &dyn Store, agent: AgentId) -> Option<String> {
    store.get_agent(agent).await.expect("get").expect("agent").config_hash
}

async fn a_scope_is_written_with_if_match_and_keeps_every_version(h: &Harness) {
    let store = h.store();
    let g = Scope::Global;
    assert_eq!(put(store, &g, json!({"a": 1}), None).await.expect("create").version, 1);
    assert!(matches!(put(store, &g, json!({"a": 2}), None).await, Err(StoreError::PreconditionRequired(_))));
    assert!(matches!(put(store, &g, json!({"a": 2}), Some(3)).await, Err(StoreError::Conflict(_))));
    let v2 = put(store, &g, json!({"b": 2, "a": 2}), Some(1)).await.expect("update");
    assert_eq!(v2.version, 2);
    let label = scope("label:env=prod");
    assert!(matches!(put(store, &label, json!({}), Some(1)).await, Err(StoreError::Conflict(_))), "no version 1 yet");
    put(store, &label, json!({"c": 3}), Some(0)).await.expect("create only");

    let history = store.config_history(&g, None, 10).await.expect("history");
    assert_eq!(history.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!((history[0].author.as_str(), history[0].comment.as_str()), ("alice", "test"));
    assert_eq!(history[0].hash, v2.hash);
    assert_eq!(Value::Object(history[1].doc.clone()), json!({"a": 1}));
    assert_eq!(store.config_history(&g, Some(2), 10).await.expect("older").len(), 1);
    assert_eq!(store.get_config(&g, None).await.expect("get").expect("current").version, 2);
    assert_eq!(store.get_config(&g, Some(1)).await.expect("get").expect("v1").version, 1);
    assert!(store.get_config(&g, Some(9)).await.expect("get").is_none());
    let scopes: Vec<String> = store.list_configs().await.expect("list").iter().map(|s| s.scope.to_string()).collect();
    assert_eq!(scopes, vec!["global", "label:env=prod"]);
    let writes = store.list_audit(0, 100).await.expect("audit").iter().filter(|r| r.action == "config.put").count();
    assert_eq!(writes, 3, "each write has its audit row; refused ones none");
}

async fn a_label_scope_tells_only_the_agents_whose_effective_config_changed(h: &Harness) {
    let store = h.store();
    let prod = enroll(store, &[("env", "prod")]).await;
    let dev = enroll(store, &[("env", "dev")]).await;
    let global = put(store, &Scope::Global, json!({"url": "a"}), None).await.expect("global");
    assert_eq!((global.agents_changed, global.heads.len()), (2, 2));
    let label = scope("label:env=prod");
    let change = put(store, &label, json!({"url": "b"}), None).await.expect("label");
    assert_eq!((change.agents_changed, change.heads.len(), change.heads[0].agent_id), (1, 1, prod));
    // The same document again changes no agent's effective configuration.
    let same = put(store, &label, json!({"url": "b"}), Some(1)).await.expect("again");
    assert_eq!((same.version, same.agents_changed), (2, 0));
    // A label scope that says what global says already changes nothing either.
    let redundant = put(store, &scope("label:env=dev"), json!({"url": "a"}), None).await.expect("redundant");
    assert_eq!(redundant.agents_changed, 0);

    let signals = config_signals(store, prod).await;
    assert_eq!(signals.len(), 2);
    assert_eq!((signals[1].config_id.as_str(), signals[1].version), ("label:env=prod", 1));
    assert_eq!(Some(signals[1].hash.clone()), desired(store, prod).await);
    assert_eq!(config_signals(store, dev).await.len(), 1);
    let effective = store.effective_config(prod).await.expect("effective").expect("agent");
    assert_eq!(Some(effective.hash), desired(store, prod).await, "the desired hash is the effective one");
}

async fn the_effective_config_layers_scopes_and_names_where_each_value_came_from(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[("env", "prod"), ("role", "web")]).await;
    put(store, &Scope::Global, json!({"url": "a", "agent": {"poll_wait_s": 30}}), None).await.expect("global");
    put(store, &scope("label:env=prod"), json!({"url": "b"}), None).await.expect("env");
    put(store, &scope("label:role=web"), json!({"url": "c", "agent": {"heartbeat_s": 10}}), None).await.expect("role");
    let own = Scope::Agent(agent);
    put(store, &own, json!({"agent": {"poll_wait_s": 5}}), None).await.expect("own");
    let eff = store.effective_config(agent).await.expect("effective").expect("agent");
    assert_eq!(Value::Object(eff.doc.clone()), json!({"url": "c", "agent": {"poll_wait_s": 5, "heartbeat_s": 10}}));
    assert_eq!(eff.provenance["/url"].scope, scope("label:role=web"), "label scopes in key order: role after env");
    assert_eq!(eff.provenance["/agent/poll_wait_s"].scope, own, "the agent's own scope wins");
    assert_eq!(eff.provenance["/agent/heartbeat_s"].scope, scope("label:role=web"));
    assert!(store.effective_config(AgentId::new()).await.expect("unknown").is_none());
}

async fn rollback_writes_the_old_document_again_and_restores_the_hashes(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    put(store, &Scope::Global, json!({"v": 1}), None).await.expect("v1");
    let first = desired(store, agent).await;
    put(store, &Scope::Global, json!({"v": 2}), Some(1)).await.expect("v2");
    assert_ne!(desired(store, agent).await, first);
    let back = store.rollback_config(&Scope::Global, 1, "bob", T0 + 1, audit_entry("config.rollback")).await;
    let back = back.expect("rollback");
    assert_eq!((back.version, back.agents_changed), (3, 1));
    assert_eq!(desired(store, agent).await, first, "every agent is back on the old hash");
    let v3 = store.get_config(&Scope::Global, None).await.expect("get").expect("v3");
    assert_eq!(
        (Value::Object(v3.doc), v3.comment.as_str(), v3.author.as_str()),
        (json!({"v": 1}), "rollback to version 1", "bob")
    );
    let missing = store.rollback_config(&Scope::Global, 9, "bob", T0, audit_entry("config.rollback")).await;
    assert!(matches!(missing, Err(StoreError::NotFound(Entity::Config))), "{missing:?}");
    let no_scope = store.rollback_config(&scope("label:a=b"), 1, "bob", T0, audit_entry("config.rollback")).await;
    assert!(matches!(no_scope, Err(StoreError::NotFound(Entity::Config))), "{no_scope:?}");
}

async fn relabelling_an_agent_retargets_it(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[("env", "dev")]).await;
    put(store, &scope("label:env=prod"), json!({"db": "prod-db"}), None).await.expect("label");
    let before = desired(store, agent).await;
    let renamed = AgentUpdate { name: Some("web-7".into()), labels: None };
    let (rec, heads) = store.update_agent(agent, renamed, T0 + 1, audit_entry("agent.update")).await.expect("rename");
    assert_eq!((rec.name.as_str(), heads.len()), ("web-7", 0));
    let moved = AgentUpdate { labels: Some(labels(&[("env", "prod")])), name: None };
    let (rec, heads) = store.update_agent(agent, moved, T0 + 2, audit_entry("agent.update")).await.expect("relabel");
    assert_eq!((rec.labels, heads.len()), (labels(&[("env", "prod")]), 1));
    assert_ne!(rec.config_hash, before);
    let signal = config_signals(store, agent).await.pop().expect("told");
    assert_eq!((signal.config_id.as_str(), signal.version, Some(signal.hash)), ("labels", 0, rec.config_hash));
    let unknown = store.update_agent(AgentId::new(), AgentUpdate::default(), T0, audit_entry("agent.update")).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Agent))), "{unknown:?}");
}

async fn a_new_agent_starts_with_its_effective_hash_and_no_signal(h: &Harness) {
    let store = h.store();
    put(store, &scope("label:env=prod"), json!({"x": 1}), None).await.expect("label");
    let agent = enroll(store, &[("env", "prod")]).await;
    let eff = store.effective_config(agent).await.expect("effective").expect("agent");
    assert_eq!(Value::Object(eff.doc), json!({"x": 1}));
    assert_eq!(desired(store, agent).await, Some(eff.hash));
    assert!(store.read_signals(agent, 0, 10).await.expect("signals").is_empty(), "a new stream is empty");
}

async fn an_agent_scope_needs_an_active_agent(h: &Harness) {
    let store = h.store();
    let unknown = put(store, &Scope::Agent(AgentId::new()), json!({}), None).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::Agent))), "{unknown:?}");
    assert!(store.list_configs().await.expect("list").is_empty(), "nothing was written");
}

async fn fleet_status_counts_what_agents_reported(h: &Harness) {
    let store = h.store();
    let agents = [enroll(store, &[]).await, enroll(store, &[]).await, enroll(store, &[]).await];
    put(store, &Scope::Global, json!({"x": 1}), None).await.expect("global");
    let hash = desired(store, agents[0]).await.expect("desired");
    let hash = hash.as_str();
    let failed = beat(agents[1], None, Some((hash, "invalid agent.heartbeat_s")), T0);
    // Both in one batch.
    store.record_heartbeats(&[beat(agents[0], Some(hash), None, T0), failed]).await.expect("applied and failed");
    let status = store.config_status(&Scope::Global).await.expect("status");
    assert_eq!((status.targeted, status.applied, status.failed, status.behind), (3, 1, 1, 1));
    assert_eq!(status.errors[0].error, "invalid agent.heartbeat_s");
    let failed = store.get_agent(agents[1]).await.expect("get").expect("agent");
    assert_eq!(failed.config_error.as_deref(), Some("invalid agent.heartbeat_s"));
    // Applying later clears the failure.
    store.record_heartbeats(&[beat(agents[1], Some(hash), None, T0 + 1)]).await.expect("applied now");
    let status = store.config_status(&Scope::Global).await.expect("status");
    assert_eq!((status.applied, status.failed, status.behind), (2, 0, 1));
    assert!(status.errors.is_empty());
    let missing = store.config_status(&scope("label:a=b")).await;
    assert!(matches!(missing, Err(StoreError::NotFound(Entity::Config))), "{missing:?}");
}

fn beat(agent_id: AgentId, applied: Option<&str>, failed: Option<(&str, &str)>, at: i64) -> HeartbeatRow {
    HeartbeatRow {
        agent_id,
        version: Some("1.0".into()),
        applied_config_hash: applied.map(Into::into),
        failed_config: failed.map(|(h, e)| (h.into(), e.into())),
        body: "{}".into(),
        at,
    }
}

async fn concurrent_writes_and_enrollments_on_two_servers_leave_every_agent_its_true_effective_hash(h: &Harness) {
    let stores: [Arc<dyn Store>; 2] = [h.store.clone(), h.another_server().await];
    let mut agents = Vec::new();
    for i in 0..6 {
        agents.push(enroll(h.store(), &[("env", if i % 2 == 0 { "prod" } else { "dev" })]).await);
    }
    let writes = (0..10).map(|i| {
        let store = stores[i % 2].clone();
        let target = match i % 3 {
            0 => Scope::Global,
            1 => scope("label:env=prod"),
            _ => scope("label:env=dev"),
        };
        async move {
            // Retry on a stale version: writers race on the same scopes.
            for _ in 0..50 {
                let current = store.get_config(&target, None).await.expect("get").map(|c| c.version).unwrap_or(0);
                match put(store.as_ref(), &target, json!({"writer": i}), Some(current)).await {
                    Ok(_) => return,
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => panic!("{e:?}"),
                }
            }
            panic!("writer {i} never got its turn");
        }
    });
    // Agents enrolling meanwhile, on both servers, start with the right hash too.
    let enrollments = (0..6).map(|i| {
        let store = stores[i % 2].clone();
        async move { enroll(store.as_ref(), &[("env", if i % 2 == 0 { "prod" } else { "dev" })]).await }
    });
    let (_, late) = futures::join!(join_all(writes), join_all(enrollments));
    for agent in late {
        let effective = h.store().effective_config(agent).await.expect("effective").expect("agent");
        assert_eq!(desired(h.store(), agent).await, Some(effective.hash), "late agent {agent}");
    }
    for agent in agents {
        let effective = h.store().effective_config(agent).await.expect("effective").expect("agent");
        assert_eq!(desired(h.store(), agent).await, Some(effective.hash.clone()), "agent {agent}");
        let last = config_signals(h.store(), agent).await.pop().expect("told at least once");
        assert_eq!(last.hash, effective.hash, "the last signal carries the hash it ended on");
    }
}
