//! Blobs, file assignments, agents' reports on them, and relabels.

use serde_json::Value;
use sha2::{Digest, Sha256};
use tether_proto::AgentId;
use tether_proto::command::TargetSpec;
use tether_proto::config::ApplyState;
use tether_proto::files::{FileRemoved, FileUpdated, ItemReport};
use tether_proto::signal::{FILE_REMOVED, FILE_UPDATED};
use tether_store::{
    AgentUpdate, BLOB_CHUNK, Entity, FileAssignmentRecord, ItemChange, ItemKind, NewFileAssignment, Store, StoreError,
};

use crate::fixtures::{T0, audit_entry, enroll, labels};
use crate::harness::{Harness, conformance};

conformance!(
    a_blob_is_stored_in_chunks_once_and_read_back,
    an_assignment_reaches_its_targets_and_an_unassignment_tells_them,
    the_same_path_and_target_is_one_assignment_whose_version_goes_up,
    assignments_need_stored_content_and_known_agents,
    reports_feed_the_fleet_view_and_only_targeted_agents_may_report,
    a_relabel_gains_and_loses_files,
);

/// Stores `bytes` as a blob; its sha256.
pub async fn blob(store: &dyn Store, bytes: &[u8]) -> String {
    let sha = hex::encode(Sha256::digest(bytes));
    let mut source = bytes;
    store.put_blob(&sha, bytes.len() as u64, &mut source, T0).await.expect("put blob");
    sha
}

fn assignment(sha256: &str, path: &str, target: TargetSpec) -> NewFileAssignment {
    NewFileAssignment {
        sha256: sha256.into(),
        path: path.into(),
        mode: 0o640,
        owner: None,
        group: None,
        hook: None,
        target,
        by: "alice".into(),
        now: T0,
    }
}

async fn assign(store: &dyn Store, new: NewFileAssignment) -> Result<ItemChange<FileAssignmentRecord>, StoreError> {
    store.assign_file(new, &|_| audit_entry("file.assign")).await
}

/// The file signals in an agent's stream: (type, ref), oldest first.
async fn file_signals(store: &dyn Store, agent: AgentId) -> Vec<(String, Value)> {
    store
        .read_signals(agent, 0, 1000)
        .await
        .expect("signals")
        .into_iter()
        .filter(|(_, s)| s.kind.starts_with("file."))
        .map(|(_, s)| (s.kind, s.reference))
        .collect()
}

fn web() -> TargetSpec {
    TargetSpec::Labels(labels(&[("role", "web")]))
}

async fn a_blob_is_stored_in_chunks_once_and_read_back(h: &Harness) {
    let bytes: Vec<u8> = (0..BLOB_CHUNK * 2 + 100).map(|i| (i % 251) as u8).collect();
    let sha = blob(h.store(), &bytes).await;
    assert_eq!(h.store().blob_size(&sha).await.expect("size"), Some(bytes.len() as u64));
    let mut read = Vec::new();
    let mut index = 0;
    while let Some(chunk) = h.store().blob_chunk(&sha, index).await.expect("chunk") {
        read.extend(chunk);
        index += 1;
    }
    assert_eq!((index, read == bytes), (3, true), "three chunks, the same bytes");
    let mut again = &bytes[..];
    assert!(!h.store().put_blob(&sha, bytes.len() as u64, &mut again, T0).await.expect("again"), "stored once");
    assert_eq!(h.store().blob_size(&"0".repeat(64)).await.expect("size"), None);
}

async fn an_assignment_reaches_its_targets_and_an_unassignment_tells_them(h: &Harness) {
    let (w1, w2, db) = (
        enroll(h.store(), &[("role", "web")]).await,
        enroll(h.store(), &[("role", "web")]).await,
        enroll(h.store(), &[("role", "db")]).await,
    );
    let sha = blob(h.store(), b"listen 80;").await;
    let change = assign(h.store(), assignment(&sha, "/etc/app/app.conf", web())).await.expect("assign");
    assert_eq!((change.agents_told, change.heads.len()), (2, 2));
    let file = change.item;
    assert_eq!((file.version, file.size, file.mode), (1, 10, 0o640));
    for agent in [w1, w2] {
        let signals = file_signals(h.store(), agent).await;
        assert_eq!(signals.len(), 1);
        let updated: FileUpdated = serde_json::from_value(signals[0].1.clone()).expect("file.updated");
        assert_eq!((signals[0].0.as_str(), updated.file_id, updated.sha256.as_str()), (FILE_UPDATED, file.id, &*sha));
        assert_eq!(h.store().agent_files(agent).await.expect("files"), vec![file.clone()]);
    }
    assert!(file_signals(h.store(), db).await.is_empty());
    assert!(h.store().agent_files(db).await.expect("files").is_empty());

    let gone = h.store().unassign_file(file.id, T0 + 1, audit_entry("file.unassign")).await.expect("unassign");
    assert_eq!((gone.agents_told, gone.item.removed_at), (2, Some(T0 + 1)));
    let signals = file_signals(h.store(), w1).await;
    let removed: FileRemoved = serde_json::from_value(signals[1].1.clone()).expect("file.removed");
    assert_eq!((signals[1].0.as_str(), removed.path.as_str()), (FILE_REMOVED, "/etc/app/app.conf"));
    assert!(h.store().agent_files(w1).await.expect("files").is_empty());
    assert!(h.store().list_file_assignments().await.expect("list").is_empty());
    let again = h.store().unassign_file(file.id, T0 + 2, audit_entry("file.unassign")).await;
    assert!(matches!(again, Err(StoreError::NotFound(Entity::FileAssignment))), "{again:?}");
}

async fn the_same_path_and_target_is_one_assignment_whose_version_goes_up(h: &Harness) {
    let a = enroll(h.store(), &[]).await;
    let b = enroll(h.store(), &[]).await;
    let (one, two) = (blob(h.store(), b"one").await, blob(h.store(), b"two").await);
    let first = assign(h.store(), assignment(&one, "/srv/x", TargetSpec::Agents(vec![a, b]))).await.expect("first");
    // The same agents in another order are the same target.
    let second = assign(h.store(), assignment(&two, "/srv/x", TargetSpec::Agents(vec![b, a]))).await.expect("second");
    assert_eq!((second.item.id, second.item.version, second.item.sha256.as_str()), (first.item.id, 2, &*two));
    // Another path, or another target, is another assignment.
    let other = assign(h.store(), assignment(&two, "/srv/y", TargetSpec::Agents(vec![a]))).await.expect("other");
    assert_ne!(other.item.id, first.item.id);
    assert_eq!(h.store().list_file_assignments().await.expect("list").len(), 2);
    assert_eq!(h.store().agent_files(a).await.expect("files").len(), 2);
}

async fn assignments_need_stored_content_and_known_agents(h: &Harness) {
    let missing = assign(h.store(), assignment(&"a".repeat(64), "/x", TargetSpec::All)).await;
    assert!(matches!(missing, Err(StoreError::NotFound(Entity::Blob))), "{missing:?}");
    let sha = blob(h.store(), b"x").await;
    let unknown = assign(h.store(), assignment(&sha, "/x", TargetSpec::Agents(vec![AgentId::new()]))).await;
    assert!(matches!(unknown, Err(StoreError::Invalid { field: "target", .. })), "{unknown:?}");
    assert!(h.store().list_file_assignments().await.expect("list").is_empty(), "nothing written");
}

async fn reports_feed_the_fleet_view_and_only_targeted_agents_may_report(h: &Harness) {
    let agents = [
        enroll(h.store(), &[("role", "web")]).await,
        enroll(h.store(), &[("role", "web")]).await,
        enroll(h.store(), &[("role", "web")]).await,
    ];
    let outsider = enroll(h.store(), &[("role", "db")]).await;
    let sha = blob(h.store(), b"v1").await;
    let first = assign(h.store(), assignment(&sha, "/x", web())).await.expect("assign").item;
    let file = assign(h.store(), assignment(&sha, "/x", web())).await.expect("again").item;
    assert_eq!((first.id, first.version, file.version), (file.id, 1, 2));
    let report = |agent, r| h.store().report_item(agent, ItemKind::File, file.id, r, T0 + 5);
    report(agents[0], ItemReport::applied(2)).await.expect("report");
    report(agents[1], ItemReport::failed(2, "sha256 mismatch".into())).await.expect("report");
    report(agents[2], ItemReport::applied(1)).await.expect("an older version");
    let status = h.store().item_status(ItemKind::File, file.id).await.expect("status");
    assert_eq!((status.targeted, status.current, status.failed, status.behind), (3, 1, 1, 1));
    assert_eq!(status.errors[0].error, "sha256 mismatch");
    assert!(status.agents.iter().any(|a| a.agent_id == agents[1] && a.state == ApplyState::Failed));

    let refused = report(outsider, ItemReport::applied(2)).await;
    assert!(matches!(refused, Err(StoreError::NotFound(Entity::FileAssignment))), "{refused:?}");
    let unknown = h.store().report_item(agents[0], ItemKind::File, file.id + 100, ItemReport::applied(1), T0).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(Entity::FileAssignment))), "{unknown:?}");
}

async fn a_relabel_gains_and_loses_files(h: &Harness) {
    let agent = enroll(h.store(), &[("role", "web")]).await;
    let sha = blob(h.store(), b"x").await;
    let web_file = assign(h.store(), assignment(&sha, "/web", web())).await.expect("web").item;
    let db_target = TargetSpec::Labels(labels(&[("role", "db")]));
    let db_file = assign(h.store(), assignment(&sha, "/db", db_target)).await.expect("db").item;
    let update = AgentUpdate { labels: Some(labels(&[("role", "db")])), name: None };
    let (_, heads) = h.store().update_agent(agent, update, T0 + 1, audit_entry("agent.update")).await.expect("relabel");
    assert_eq!(heads.len(), 2, "one file gained, one lost");
    let signals = file_signals(h.store(), agent).await;
    let kinds: Vec<(&str, i64)> =
        signals.iter().map(|(k, r)| (k.as_str(), r["file_id"].as_i64().expect("id"))).collect();
    assert_eq!(kinds, vec![(FILE_UPDATED, web_file.id), (FILE_REMOVED, web_file.id), (FILE_UPDATED, db_file.id)]);
    assert_eq!(h.store().agent_files(agent).await.expect("files"), vec![db_file]);
}
