//! Certificates, the CAs, and what agents are told about them.

use std::sync::Arc;

use serde_json::Value;
use tether_proto::AgentId;
use tether_proto::certs::CertSource;
use tether_proto::command::TargetSpec;
use tether_proto::files::ItemReport;
use tether_proto::signal::{CERT_RENEWED, CERT_REVOKED};
use tether_store::{
    AgentUpdate, CertRecord, Entity, IssuedRecord, ItemChange, ItemKind, NewCa, NewCert, SealedMaterial, Store,
    StoreError,
};

use crate::fixtures::{T0, audit_entry, enroll, labels};
use crate::harness::{Harness, conformance};

conformance!(
    an_uploaded_certificate_is_told_replaced_and_revoked,
    names_are_unique_among_active_certificates,
    one_ca_is_active_and_a_rotation_reissues_every_issued_certificate,
    two_servers_starting_at_once_agree_on_one_ca,
    expiring_certificates_are_announced_once,
    a_relabel_gains_and_loses_certificates,
);

const DAY: i64 = 86_400_000;

fn material(serial: &str, not_after: i64) -> SealedMaterial {
    SealedMaterial {
        serial: serial.into(),
        not_after,
        cert_pem: format!("CERT {serial}"),
        chain_pem: String::new(),
        key_sealed: vec![1, 2, 3],
    }
}

fn uploaded(name: &str, target: TargetSpec, serial: &str) -> NewCert {
    NewCert {
        name: name.into(),
        target,
        group: None,
        hook: Some("reload-nginx".into()),
        material: Some(material(serial, T0 + 90 * DAY)),
        dns_names: vec![],
        ip_addresses: vec![],
        validity_days: None,
        by: "alice".into(),
        now: T0,
    }
}

fn issued(name: &str, target: TargetSpec) -> NewCert {
    NewCert {
        material: None,
        dns_names: vec!["web.example.com".into()],
        ip_addresses: vec!["192.0.2.1".parse().expect("ip")],
        validity_days: Some(30),
        ..uploaded(name, target, "")
    }
}

async fn create(store: &dyn Store, new: NewCert) -> Result<ItemChange<CertRecord>, StoreError> {
    store.create_cert(new, &|_| audit_entry("cert.create")).await
}

fn ca(serial: &str) -> NewCa {
    NewCa {
        serial: serial.into(),
        cert_pem: format!("CA {serial}"),
        key_sealed: vec![9],
        not_after: T0 + 3650 * DAY,
        now: T0,
    }
}

async fn cert_signals(store: &dyn Store, agent: AgentId) -> Vec<(String, Value)> {
    store
        .read_signals(agent, 0, 1000)
        .await
        .expect("signals")
        .into_iter()
        .filter(|(_, s)| s.kind.starts_with("cert."))
        .map(|(_, s)| (s.kind, s.reference))
        .collect()
}

fn web() -> TargetSpec {
    TargetSpec::Labels(labels(&[("role", "web")]))
}

async fn an_uploaded_certificate_is_told_replaced_and_revoked(h: &Harness) {
    let (w, db) = (enroll(h.store(), &[("role", "web")]).await, enroll(h.store(), &[("role", "db")]).await);
    let cert = create(h.store(), uploaded("www", web(), "01")).await.expect("create");
    assert_eq!((cert.agents_told, cert.item.version, cert.item.source), (1, 1, CertSource::Uploaded));
    assert_eq!(cert.item.key_sealed.as_deref(), Some(&[1u8, 2, 3][..]));
    let id = cert.item.id;
    assert_eq!(h.store().agent_certs(w).await.expect("certs").len(), 1);
    assert!(h.store().agent_certs(db).await.expect("certs").is_empty());

    let replaced = h.store().replace_cert(id, material("02", T0 + 200 * DAY), T0 + 1, audit_entry("cert.replace"));
    let replaced = replaced.await.expect("replace");
    assert_eq!((replaced.item.version, replaced.item.serial.as_deref()), (2, Some("02")));
    assert_eq!(replaced.item.not_after, Some(T0 + 200 * DAY));
    let revoked = h.store().revoke_cert(id, T0 + 2, audit_entry("cert.revoke")).await.expect("revoke");
    assert_eq!((revoked.agents_told, revoked.item.revoked_at), (1, Some(T0 + 2)));

    let signals = cert_signals(h.store(), w).await;
    let seen: Vec<(&str, Option<&str>)> = signals.iter().map(|(k, r)| (k.as_str(), r["serial"].as_str())).collect();
    assert_eq!(seen, vec![(CERT_RENEWED, Some("01")), (CERT_RENEWED, Some("02")), (CERT_REVOKED, None)]);
    assert!(cert_signals(h.store(), db).await.is_empty());
    assert!(h.store().agent_certs(w).await.expect("certs").is_empty());
    let again = h.store().replace_cert(id, material("03", T0 + DAY), T0 + 3, audit_entry("cert.replace")).await;
    assert!(matches!(again, Err(StoreError::NotFound(Entity::Cert))), "a revoked certificate stays revoked");
    assert!(h.store().list_certs(T0 + 10).await.expect("list").is_empty());
    assert_eq!(h.store().list_certs(T0).await.expect("list with revoked").len(), 1);
}

async fn names_are_unique_among_active_certificates(h: &Harness) {
    let first = create(h.store(), uploaded("www", TargetSpec::All, "01")).await.expect("first").item;
    let dup = create(h.store(), issued("www", TargetSpec::All)).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    h.store().revoke_cert(first.id, T0, audit_entry("cert.revoke")).await.expect("revoke");
    create(h.store(), issued("www", TargetSpec::All)).await.expect("the name is free again");
}

async fn one_ca_is_active_and_a_rotation_reissues_every_issued_certificate(h: &Harness) {
    let agent = enroll(h.store(), &[("role", "web")]).await;
    let first = h.store().ensure_ca(ca("a1")).await.expect("ca");
    assert_eq!(h.store().ensure_ca(ca("a2")).await.expect("again"), first, "the first one stays");
    let cert = create(h.store(), issued("api", web())).await.expect("issued").item;
    assert_eq!((cert.source, cert.serial.clone(), cert.validity_days), (CertSource::Issued, None, Some(30)));
    let record = IssuedRecord {
        serial: "s1".into(),
        cert_id: cert.id,
        agent_id: agent,
        ca_id: first.id,
        version: 1,
        not_after: T0 + 30 * DAY,
        now: T0,
    };
    h.store().record_issued(record, audit_entry("cert.issue")).await.expect("issued");

    let (second, heads) = h.store().activate_ca(ca("b1"), audit_entry("ca.rotate")).await.expect("rotate");
    assert!(second.active && second.id != first.id);
    assert_eq!(heads.len(), 1, "the agent holding the issued certificate is told");
    assert_eq!(h.store().get_cert(cert.id).await.expect("get").expect("cert").version, 2);
    let cas = h.store().list_cas().await.expect("cas");
    assert_eq!(
        cas.iter().map(|c| (c.serial.as_str(), c.active)).collect::<Vec<_>>(),
        vec![("b1", true), ("a1", false)]
    );

    let (retired, heads) = h.store().retire_cas(T0 + 1, audit_entry("ca.retire")).await.expect("retire");
    assert_eq!((retired, heads.len()), (1, 1));
    assert_eq!(h.store().list_cas().await.expect("cas").len(), 1);
    assert_eq!(h.store().get_cert(cert.id).await.expect("get").expect("cert").version, 3);
    let (none, heads) = h.store().retire_cas(T0 + 2, audit_entry("ca.retire")).await.expect("nothing to retire");
    assert_eq!((none, heads.len()), (0, 0));
}

async fn two_servers_starting_at_once_agree_on_one_ca(h: &Harness) {
    let stores: [Arc<dyn Store>; 2] = [h.store.clone(), h.another_server().await];
    let (a, b) = futures::join!(stores[0].ensure_ca(ca("x")), stores[1].ensure_ca(ca("y")));
    assert_eq!(a.expect("a"), b.expect("b"));
    assert_eq!(h.store().list_cas().await.expect("cas").len(), 1);
}

async fn expiring_certificates_are_announced_once(h: &Harness) {
    let agent = enroll(h.store(), &[]).await;
    let soon = NewCert { material: Some(material("up-1", T0 + 5 * DAY)), ..uploaded("soon", TargetSpec::All, "") };
    create(h.store(), soon).await.expect("soon");
    create(h.store(), uploaded("later", TargetSpec::All, "up-2")).await.expect("later");
    let issued = create(h.store(), issued("api", TargetSpec::All)).await.expect("issued").item;
    let mut report = ItemReport::applied(1);
    report.serial = Some("is-1".into());
    report.not_after = Some(time::OffsetDateTime::from_unix_timestamp((T0 + 3 * DAY) / 1000).expect("time"));
    h.store().report_item(agent, ItemKind::Cert, issued.id, report, T0).await.expect("report");

    let mut expiring = h.store().expiring_certs(T0 + 14 * DAY).await.expect("expiring");
    expiring.sort_by(|a, b| a.serial.cmp(&b.serial));
    let seen: Vec<(&str, &str, Option<AgentId>)> =
        expiring.iter().map(|e| (e.name.as_str(), e.serial.as_str(), e.agent_id)).collect();
    assert_eq!(seen, vec![("api", "is-1", Some(agent)), ("soon", "up-1", None)]);
    let listed = h.store().list_certs(T0).await.expect("list");
    let api = listed.iter().find(|c| c.name == "api").expect("api");
    assert_eq!(api.not_after, Some(T0 + 3 * DAY), "an issued certificate's expiry is the soonest reported");

    for e in &expiring {
        h.store().announce_expiring(&e.serial, T0, audit_entry("cert.expiring")).await.expect("announce");
    }
    h.store().announce_expiring("up-1", T0, audit_entry("cert.expiring")).await.expect("twice is harmless");
    assert!(h.store().expiring_certs(T0 + 14 * DAY).await.expect("expiring").is_empty());
}

async fn a_relabel_gains_and_loses_certificates(h: &Harness) {
    let agent = enroll(h.store(), &[("role", "web")]).await;
    let web_cert = create(h.store(), uploaded("web", web(), "01")).await.expect("web").item;
    let db_cert =
        create(h.store(), issued("db", TargetSpec::Labels(labels(&[("role", "db")])))).await.expect("db").item;
    let update = AgentUpdate { labels: Some(labels(&[("role", "db")])), name: None };
    h.store().update_agent(agent, update, T0 + 1, audit_entry("agent.update")).await.expect("relabel");
    let seen: Vec<(String, i64)> = cert_signals(h.store(), agent)
        .await
        .into_iter()
        .map(|(k, r)| (k, r["cert_id"].as_i64().expect("id")))
        .collect();
    assert_eq!(
        seen,
        vec![
            (CERT_RENEWED.to_owned(), web_cert.id),
            (CERT_REVOKED.to_owned(), web_cert.id),
            (CERT_RENEWED.to_owned(), db_cert.id)
        ]
    );
    let held: Vec<i64> = h.store().agent_certs(agent).await.expect("certs").iter().map(|c| c.id).collect();
    assert_eq!(held, vec![db_cert.id]);
}
