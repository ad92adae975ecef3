//! Certificates on the agent (protocol.md §7), installed into
//! `<[certs] dir>/<name>/` (0755): `cert.pem` and `chain.pem` (uploaded) or
//! `ca.pem` (issued: the CAs to trust) 0644, `key.pem` 0600, or 0640 with
//! the assignment's group so a service in it can read the key.
//!
//! Uploaded certificates come with their key from the server. For issued
//! ones the agent makes a fresh ECDSA P-256 key and a CSR for exactly the
//! assigned names; the server's CA signs it, so the private key never
//! leaves the machine. Issued certificates are renewed two thirds into
//! their lifetime (plus a per-agent jitter). A revoked or unassigned
//! certificate's files are removed. The manifest `state/certs.json` lists
//! what is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tether_proto::certs::{AgentCert, CertSource, check_name};
use tether_proto::files::ItemReport;
use tether_proto::{AgentId, Timestamp};
use tokio::sync::oneshot;

use crate::executor;
use crate::managed::{Ctx, Item, Reports, group_id};
use crate::session::Failure;
use crate::state::{self, StateDir, off_thread};

/// The manifest under `state/`.
pub const MANIFEST: &str = "certs.json";
/// The renewal timer looks again at least this often (a suspended machine,
/// a clock that moved).
pub const RECHECK: Duration = Duration::from_secs(3600);
/// ... and at most this often, so a certificate the server issues already
/// due (a skewed clock) is not re-issued in a tight loop.
const MIN_RECHECK: Duration = Duration::from_secs(60);

const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";

/// The third file beside the certificate and key.
fn bundle_file(source: CertSource) -> &'static str {
    match source {
        CertSource::Uploaded => "chain.pem",
        CertSource::Issued => "ca.pem",
    }
}

/// A certificate this agent installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub cert_id: i64,
    pub name: String,
    pub source: CertSource,
    pub version: u64,
    pub serial: String,
    /// Known for issued certificates, whose renewal it times.
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: Timestamp,
    /// Installed, but its hook has not succeeded since.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hook_pending: bool,
}

/// One row of `list-certs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub name: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    pub source: CertSource,
}

/// What the control socket's `list-certs` answers: the manifest.
pub fn list(state: &StateDir) -> Vec<Listing> {
    let installed: Vec<Installed> = state.read_json(MANIFEST).unwrap_or_default();
    installed
        .into_iter()
        .map(|i| Listing { name: i.name, serial: i.serial, not_after: rfc3339(i.not_after), source: i.source })
        .collect()
}

/// Certificate signals received since the last pass.
#[derive(Debug, Default)]
pub struct Events {
    /// `cert.renewed`: fetch (uploaded) or re-issue (issued) these.
    pub renewed: BTreeSet<i64>,
    /// `cert.revoked`: remove these, even before the server is asked.
    pub revoked: BTreeSet<i64>,
}

/// `renew NAME` from the control socket, answered by the certificate loop.
#[derive(Debug)]
pub struct RenewCommand {
    pub name: String,
    pub reply: oneshot::Sender<Result<Value, String>>,
}

/// The certificates' loop state.
#[derive(Debug)]
pub struct ManagedCerts {
    installed: BTreeMap<i64, Installed>,
    reports: Reports,
    agent_id: AgentId,
    /// Renew these on the next pass, whatever their versions say.
    renew: BTreeSet<i64>,
    /// Never installed again (a certificate id is not reused).
    revoked: BTreeSet<i64>,
}

fn rfc3339(t: Timestamp) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn ms(t: Timestamp) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// When an issued certificate is renewed: two thirds into its lifetime,
/// plus a jitter in `[0, lifetime / 15)` derived from `jitter_seed`, so a
/// fleet whose certificates were issued together does not renew at once,
/// and each machine always picks the same moment for the same certificate.
pub fn renew_at(not_before_ms: i64, not_after_ms: i64, jitter_seed: &[u8]) -> i64 {
    let lifetime = not_after_ms.saturating_sub(not_before_ms).max(0);
    let window = u64::try_from(lifetime / 15).unwrap_or(0);
    let digest = Sha256::digest(jitter_seed);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let jitter = u64::from_be_bytes(first).checked_rem(window).unwrap_or(0);
    not_before_ms + lifetime / 3 * 2 + jitter as i64
}

pub fn renewal_due(now_ms: i64, not_before_ms: i64, not_after_ms: i64, jitter_seed: &[u8]) -> bool {
    now_ms >= renew_at(not_before_ms, not_after_ms, jitter_seed)
}

/// A CSR for exactly the assigned DNS names and IP addresses, with the
/// certificate's name as CN, signed by `key`.
fn csr_pem(cert: &AgentCert, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cert.name.as_str());
    params.distinguished_name = dn;
    let dns = cert.dns_names.iter().map(|n| n.as_str().try_into().map(SanType::DnsName));
    let ips = cert.ip_addresses.iter().map(|ip| Ok(SanType::IpAddress(*ip)));
    params.subject_alt_names = dns.chain(ips).collect::<Result<_, rcgen::Error>>()?;
    params.serialize_request(key)?.pem()
}

/// A certificate's files as written.
#[derive(Debug)]
struct Pems {
    cert: String,
    key: String,
    /// `chain.pem` (uploaded) or `ca.pem` (issued).
    bundle: String,
}

/// `<root>/<name>/`, created 0755 where missing; never through a symbolic link.
fn cert_dir(root: &Path, name: &str) -> std::io::Result<PathBuf> {
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(root)?;
    let dir = root.join(name);
    match dir.symlink_metadata() {
        Ok(m) if !m.is_dir() => {
            return Err(std::io::Error::other(format!(
                "{} is not a directory (a symbolic link?); the agent does not write through one",
                dir.display()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new().mode(0o755).create(&dir)?,
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Writes one file atomically with `mode`, and group `gid` when given.
fn write_file(path: &Path, text: &str, mode: u32, gid: Option<u32>) -> std::io::Result<()> {
    let mut tmp = state::temp_beside(path, mode)?;
    tmp.write_all(text.as_bytes())?;
    state::commit(tmp, path, None, gid)
}

/// Installs a certificate's files: the bundle, then the key, then the
/// certificate, each atomically; all before any hook runs.
fn install(root: &Path, name: &str, source: CertSource, pems: &Pems, gid: Option<u32>) -> std::io::Result<()> {
    let dir = cert_dir(root, name)?;
    write_file(&dir.join(bundle_file(source)), &pems.bundle, 0o644, None)?;
    let key_mode = if gid.is_some() { 0o640 } else { 0o600 };
    write_file(&dir.join(KEY), &pems.key, key_mode, gid)?;
    write_file(&dir.join(CERT), &pems.cert, 0o644, None)
}

/// Removes the files the agent wrote for `installed`, and its directory
/// when nothing else is left in it.
fn uninstall(root: &Path, installed: &Installed) -> std::io::Result<()> {
    let dir = root.join(&installed.name);
    for file in [CERT, KEY, bundle_file(installed.source)] {
        match std::fs::remove_file(dir.join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    // Fails, and is meant to, while something else is in it.
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}

fn applied(installed: &Installed) -> ItemReport {
    ItemReport {
        serial: Some(installed.serial.clone()),
        not_after: Some(installed.not_after),
        ..ItemReport::applied(installed.version)
    }
}

impl ManagedCerts {
    pub fn load(state: &StateDir, agent_id: AgentId) -> Self {
        let listed: Vec<Installed> = state.read_json(MANIFEST).unwrap_or_default();
        Self {
            installed: listed.into_iter().map(|i| (i.cert_id, i)).collect(),
            reports: Reports::new(Item::Cert),
            agent_id,
            renew: BTreeSet::new(),
            revoked: BTreeSet::new(),
        }
    }

    /// Takes the signals received since the last pass.
    pub fn note(&mut self, events: Events) {
        self.renew.extend(events.renewed);
        self.revoked.extend(events.revoked);
    }

    fn record(&mut self, state: &StateDir, cert_id: i64, installed: Option<Installed>) {
        match installed {
            Some(i) => self.installed.insert(cert_id, i),
            None => self.installed.remove(&cert_id),
        };
        let listed: Vec<&Installed> = self.installed.values().collect();
        if let Err(e) = state.write_json(MANIFEST, &listed) {
            tracing::error!(error = %e, "Could not save the certificates manifest");
        }
    }

    /// When `installed` is due for renewal (issued certificates only).
    fn renew_at(&self, installed: &Installed) -> Option<i64> {
        let not_before = installed.not_before.filter(|_| installed.source == CertSource::Issued)?;
        let seed = format!("{}/{}", self.agent_id, installed.name);
        Some(renew_at(ms(not_before), ms(installed.not_after), seed.as_bytes()))
    }

    /// How long the renewal timer sleeps; `None` without issued certificates.
    pub fn next_renewal(&self, now_ms: i64) -> Option<Duration> {
        let at = self.installed.values().filter_map(|i| self.renew_at(i)).min()?;
        let wait = Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0));
        Some(wait.clamp(MIN_RECHECK, RECHECK))
    }

    /// One full pass: revoked certificates removed (without the server),
    /// every assigned one installed and current (renewed when due), every
    /// one no longer assigned removed. `Ok(false)` when something failed and
    /// the pass should be retried; `Err` when the server could not say what
    /// is assigned.
    pub async fn reconcile(&mut self, ctx: Ctx<'_>, now_ms: i64) -> Result<bool, Failure> {
        let mut ok = true;
        for id in self.revoked.clone() {
            ok &= self.remove(ctx, id).await;
        }
        let desired = ctx.session.call(|c| async move { c.own_certs().await }).await?;
        for cert in &desired {
            if self.revoked.contains(&cert.cert_id) {
                continue;
            }
            let force = self.renew.contains(&cert.cert_id);
            let (outcome, reported) = self.apply(ctx, cert, force, now_ms).await;
            ok &= outcome.is_ok() && reported;
        }
        let assigned: BTreeSet<i64> = desired.iter().map(|c| c.cert_id).collect();
        let unassigned: Vec<i64> = self.installed.keys().filter(|id| !assigned.contains(id)).copied().collect();
        for id in unassigned {
            ok &= self.remove(ctx, id).await;
        }
        Ok(ok)
    }

    /// `renew NAME`: re-issues an issued certificate now (answering its new
    /// serial), or asks the operators to renew an uploaded one.
    pub async fn renew(&mut self, ctx: Ctx<'_>, name: &str, now_ms: i64) -> Result<Value, String> {
        let desired = ctx
            .session
            .call(|c| async move { c.own_certs().await })
            .await
            .map_err(|e| format!("asking the server for this agent's certificates: {e}"))?;
        let cert = desired
            .into_iter()
            .find(|c| c.name == name && !self.revoked.contains(&c.cert_id))
            .ok_or_else(|| format!("no certificate named {name:?} is assigned to this agent"))?;
        match cert.source {
            CertSource::Uploaded => {
                let id = cert.cert_id;
                ctx.session
                    .call(|c| async move { c.request_renewal(id, "requested on the agent").await })
                    .await
                    .map_err(|e| format!("requesting the renewal: {e}"))?;
                Ok(json!({"name": name, "source": "uploaded", "requested": true}))
            }
            CertSource::Issued => {
                let installed = self.apply(ctx, &cert, true, now_ms).await.0?;
                Ok(json!({
                    "name": name,
                    "source": "issued",
                    "serial": installed.serial,
                    "not_after": rfc3339(installed.not_after),
                }))
            }
        }
    }

    /// Converges one certificate and reports the outcome; also whether the
    /// report reached the server.
    async fn apply(
        &mut self,
        ctx: Ctx<'_>,
        cert: &AgentCert,
        force: bool,
        now_ms: i64,
    ) -> (Result<Installed, String>, bool) {
        let outcome = self.converge(ctx, cert, force, now_ms).await;
        let report = match &outcome {
            Ok(installed) => {
                self.renew.remove(&cert.cert_id);
                applied(installed)
            }
            Err(e) => {
                tracing::warn!(cert = %cert.name, error = %e, "Certificate not applied");
                ItemReport::failed(cert.version, e.clone())
            }
        };
        let reported = self.reports.send(ctx.session, cert.cert_id, report).await;
        (outcome, reported)
    }

    /// Brings one certificate to what the server assigns: nothing when it
    /// is current, else new material (and the hook).
    async fn converge(
        &mut self,
        ctx: Ctx<'_>,
        cert: &AgentCert,
        force: bool,
        now_ms: i64,
    ) -> Result<Installed, String> {
        check_name(&cert.name)?;
        let gid = cert.group.as_deref().map(group_id).transpose()?;
        let root = ctx.cfg.certs_dir.clone();
        let dir = root.join(&cert.name);
        let env = BTreeMap::from([
            ("TETHER_CERT_NAME".to_owned(), cert.name.clone()),
            ("TETHER_CERT_DIR".to_owned(), dir.display().to_string()),
        ]);
        let hook = cert.hook.as_deref().map(|name| executor::hook(ctx.cfg, name, &env)).transpose()?;
        let previous = self.installed.get(&cert.cert_id).cloned();
        let current = previous.filter(|p| {
            let files = dir.join(CERT).is_file() && dir.join(KEY).is_file();
            let fresh = match cert.source {
                CertSource::Uploaded => cert.serial.as_ref().is_none_or(|s| *s == p.serial),
                CertSource::Issued => self.renew_at(p).is_some_and(|at| now_ms < at),
            };
            !force && files && fresh && p.name == cert.name && p.source == cert.source && p.version == cert.version
        });
        let installed = match current {
            Some(p) if !p.hook_pending => return Ok(p),
            // Current, but its hook has yet to succeed.
            Some(p) => p,
            None => self.fetch(ctx, cert, &root, gid).await?,
        };
        let installed = Installed { hook_pending: hook.is_some(), ..installed };
        self.record(ctx.state, cert.cert_id, Some(installed.clone()));
        let Some(spec) = hook else { return Ok(installed) };
        let label = format!("hook {:?}", cert.hook.as_deref().unwrap_or_default());
        executor::run_hook(&spec, &label, ctx.stop).await?;
        let done = Installed { hook_pending: false, ..installed };
        self.record(ctx.state, cert.cert_id, Some(done.clone()));
        Ok(done)
    }

    /// New material: the uploaded certificate and key from the server, or a
    /// fresh key and the certificate the server's CA signs for its CSR.
    async fn fetch(&self, ctx: Ctx<'_>, cert: &AgentCert, root: &Path, gid: Option<u32>) -> Result<Installed, String> {
        let id = cert.cert_id;
        let (pems, installed) = match cert.source {
            CertSource::Uploaded => {
                let m = ctx
                    .session
                    .call(|c| async move { c.cert_material(id).await })
                    .await
                    .map_err(|e| format!("fetching the certificate: {e}"))?;
                let installed = Installed {
                    cert_id: id,
                    name: cert.name.clone(),
                    source: cert.source,
                    version: m.version,
                    serial: m.serial,
                    not_before: None,
                    not_after: m.not_after,
                    hook_pending: false,
                };
                (Pems { cert: m.cert_pem, key: m.key_pem, bundle: m.chain_pem }, installed)
            }
            CertSource::Issued => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| format!("generating a key: {e}"))?;
                let csr = csr_pem(cert, &key).map_err(|e| format!("making the CSR: {e}"))?;
                let csr = csr.as_str();
                let issued = ctx
                    .session
                    .call(|c| async move { c.sign_csr(id, csr).await })
                    .await
                    .map_err(|e| format!("having the CSR signed: {e}"))?;
                let installed = Installed {
                    cert_id: id,
                    name: cert.name.clone(),
                    source: cert.source,
                    version: issued.version,
                    serial: issued.serial,
                    not_before: Some(issued.not_before),
                    not_after: issued.not_after,
                    hook_pending: false,
                };
                (Pems { cert: issued.cert_pem, key: key.serialize_pem(), bundle: issued.ca_pem }, installed)
            }
        };
        let (at, name, source) = (root.to_owned(), cert.name.clone(), cert.source);
        off_thread(move || install(&at, &name, source, &pems, gid))
            .await
            .and_then(|r| r)
            .map_err(|e| format!("installing into {}: {e}", root.join(&cert.name).display()))?;
        Ok(installed)
    }

    /// Removes an installed certificate's files and forgets it; false when
    /// that failed (tried again on the next pass).
    async fn remove(&mut self, ctx: Ctx<'_>, cert_id: i64) -> bool {
        let Some(installed) = self.installed.get(&cert_id).cloned() else { return true };
        let (root, gone) = (ctx.cfg.certs_dir.clone(), installed.clone());
        match off_thread(move || uninstall(&root, &gone)).await.and_then(|r| r) {
            Ok(()) => {
                tracing::info!(cert = %installed.name, "Removed a certificate no longer assigned to this agent");
                self.record(ctx.state, cert_id, None);
                true
            }
            Err(e) => {
                tracing::warn!(cert = %installed.name, error = %e, "Could not remove a certificate");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::os::unix::fs::MetadataExt;

    use rcgen::PublicKeyData;

    use super::*;

    const DAY_MS: i64 = 86_400_000;
    const NOT_BEFORE: i64 = 1_700_000_000_000;
    const LIFETIME: i64 = 90 * DAY_MS;
    const NOT_AFTER: i64 = NOT_BEFORE + LIFETIME;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    fn pems() -> Pems {
        Pems { cert: "CERT".into(), key: "KEY".into(), bundle: "CA".into() }
    }

    fn at_ms(ms: i64) -> Timestamp {
        Timestamp::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("timestamp")
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime_plus_a_bounded_deterministic_jitter() {
        let two_thirds = NOT_BEFORE + LIFETIME * 2 / 3;
        let max_jitter = LIFETIME / 15;
        let seed = b"0190c3e0-agent/web";
        let at = renew_at(NOT_BEFORE, NOT_AFTER, seed);
        assert!((two_thirds..two_thirds + max_jitter).contains(&at), "{at} outside the jitter window");
        assert_eq!(renew_at(NOT_BEFORE, NOT_AFTER, seed), at, "the same seed picks the same moment");

        assert!(!renewal_due(NOT_BEFORE, NOT_BEFORE, NOT_AFTER, seed), "not due when issued");
        assert!(!renewal_due(two_thirds - 1, NOT_BEFORE, NOT_AFTER, seed), "not due before two thirds");
        assert!(!renewal_due(at - 1, NOT_BEFORE, NOT_AFTER, seed));
        assert!(renewal_due(at, NOT_BEFORE, NOT_AFTER, seed));
        assert!(renewal_due(two_thirds + max_jitter, NOT_BEFORE, NOT_AFTER, seed), "due after the largest jitter");
        assert!(renewal_due(NOT_AFTER, NOT_BEFORE, NOT_AFTER, seed));

        let moments: BTreeSet<i64> =
            (0..100).map(|i| renew_at(NOT_BEFORE, NOT_AFTER, format!("agent-{i}/web").as_bytes())).collect();
        assert!(moments.iter().all(|m| (two_thirds..two_thirds + max_jitter).contains(m)));
        assert!(moments.len() > 90, "different seeds spread out: {} distinct of 100", moments.len());
        assert_ne!(renew_at(NOT_BEFORE, NOT_AFTER, b"agent-1/web"), renew_at(NOT_BEFORE, NOT_AFTER, b"agent-2/web"));

        // A certificate with no lifetime left is due at once.
        assert_eq!(renew_at(NOT_BEFORE, NOT_BEFORE, seed), NOT_BEFORE);
        assert!(renewal_due(NOT_BEFORE, NOT_BEFORE, NOT_BEFORE - 1, seed), "nor with an expiry before the start");
    }

    #[test]
    fn the_renewal_timer_wakes_for_the_earliest_issued_certificate_within_bounds() {
        let agent_id: AgentId = "0190c3e0-0000-7000-8000-000000000001".parse().expect("agent id");
        let mut certs = ManagedCerts {
            installed: BTreeMap::new(),
            reports: Reports::new(Item::Cert),
            agent_id,
            renew: BTreeSet::new(),
            revoked: BTreeSet::new(),
        };
        assert_eq!(certs.next_renewal(NOT_BEFORE), None, "nothing issued, no timer");
        let issued = Installed {
            cert_id: 1,
            name: "web".into(),
            source: CertSource::Issued,
            version: 1,
            serial: "01".into(),
            not_before: Some(at_ms(NOT_BEFORE)),
            not_after: at_ms(NOT_AFTER),
            hook_pending: false,
        };
        let uploaded = Installed { cert_id: 2, source: CertSource::Uploaded, not_before: None, ..issued.clone() };
        certs.installed.insert(2, uploaded);
        assert_eq!(certs.next_renewal(NOT_BEFORE), None, "uploaded certificates are renewed by operators");
        certs.installed.insert(1, issued.clone());
        let at = certs.renew_at(&issued).expect("issued");
        assert_eq!(at, renew_at(NOT_BEFORE, NOT_AFTER, format!("{agent_id}/web").as_bytes()));
        assert_eq!(certs.next_renewal(NOT_BEFORE), Some(RECHECK), "far away: look again in an hour");
        assert_eq!(certs.next_renewal(at - 120_000), Some(Duration::from_secs(120)));
        assert_eq!(certs.next_renewal(at + 1), Some(MIN_RECHECK), "overdue: never a tight loop");
    }

    #[test]
    fn the_key_is_0600_or_0640_with_the_group_and_the_rest_0644() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("certs");
        install(&root, "web", CertSource::Issued, &pems(), None).expect("install");
        let dir = root.join("web");
        assert_eq!(mode(&dir), 0o755);
        assert_eq!((mode(&dir.join(CERT)), mode(&dir.join("ca.pem")), mode(&dir.join(KEY))), (0o644, 0o644, 0o600));
        assert_eq!(std::fs::read_to_string(dir.join(KEY)).expect("key"), "KEY");

        // Our own group is one a test may give a file to.
        let gid = std::fs::metadata(tmp.path()).expect("meta").gid();
        install(&root, "api", CertSource::Uploaded, &pems(), Some(gid)).expect("install");
        let key = root.join("api").join(KEY);
        assert_eq!((mode(&key), std::fs::metadata(&key).expect("meta").gid()), (0o640, gid));
        assert_eq!(mode(&root.join("api/chain.pem")), 0o644);
    }

    #[test]
    fn a_certificate_dir_that_is_a_symlink_is_refused_and_uninstall_keeps_foreign_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("certs");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, root.join("web")).expect("symlink");
        assert!(install(&root, "web", CertSource::Issued, &pems(), None).is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).expect("ls").count(), 0, "nothing written through the link");

        install(&root, "api", CertSource::Issued, &pems(), None).expect("install");
        let installed = Installed {
            cert_id: 1,
            name: "api".into(),
            source: CertSource::Issued,
            version: 1,
            serial: "01".into(),
            not_before: None,
            not_after: at_ms(NOT_AFTER),
            hook_pending: false,
        };
        std::fs::write(root.join("api/notes.txt"), "mine").expect("write");
        uninstall(&root, &installed).expect("uninstall");
        let left: Vec<_> =
            std::fs::read_dir(root.join("api")).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, ["notes.txt"]);
        std::fs::remove_file(root.join("api/notes.txt")).expect("rm");
        uninstall(&root, &installed).expect("again");
        assert!(!root.join("api").exists(), "the empty directory goes too");
    }

    #[test]
    fn the_csr_names_exactly_the_assigned_names_for_the_local_key() {
        let cert = AgentCert {
            cert_id: 1,
            name: "web".into(),
            source: CertSource::Issued,
            version: 1,
            serial: None,
            dns_names: vec!["web.example.com".into(), "*.web.example.com".into()],
            ip_addresses: vec!["10.0.0.5".parse::<IpAddr>().expect("ip")],
            group: None,
            hook: None,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let pem = csr_pem(&cert, &key).expect("csr");
        assert!(!pem.contains("PRIVATE KEY"));
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).expect("a valid CSR");
        assert_eq!(csr.public_key.der_bytes(), key.der_bytes());
        assert_eq!(
            csr.params.subject_alt_names,
            [
                SanType::DnsName("web.example.com".try_into().expect("ia5")),
                SanType::DnsName("*.web.example.com".try_into().expect("ia5")),
                SanType::IpAddress("10.0.0.5".parse().expect("ip")),
            ]
        );
        let cn = csr.params.distinguished_name.get(&DnType::CommonName).expect("CN");
        assert_eq!(cn, &rcgen::DnValue::Utf8String("web".into()));
    }

    #[test]
    fn the_manifest_lists_for_list_certs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(tmp.path()).expect("state");
        let agent_id: AgentId = "0190c3e0-0000-7000-8000-000000000001".parse().expect("agent id");
        let mut certs = ManagedCerts::load(&state, agent_id);
        let installed = Installed {
            cert_id: 3,
            name: "web".into(),
            source: CertSource::Uploaded,
            version: 2,
            serial: "0a1b".into(),
            not_before: None,
            not_after: at_ms(NOT_AFTER),
            hook_pending: false,
        };
        certs.record(&state, 3, Some(installed.clone()));
        assert_eq!(mode(&tmp.path().join("state").join(MANIFEST)), 0o600);
        assert_eq!(ManagedCerts::load(&state, agent_id).installed.get(&3), Some(&installed));
        let listed = list(&state);
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].name.as_str(), listed[0].serial.as_str()), ("web", "0a1b"));
        assert_eq!(listed[0].not_after, "2024-02-12T22:13:20Z");
        assert_eq!(listed[0].source, CertSource::Uploaded);
    }
}
