//! Certificates (protocol.md §7): uploaded ones, whose key material the
//! server keeps encrypted, and issued ones, signed by the server's CA from
//! CSRs the agents make, so their private keys never leave the machine.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::command::Target;
use crate::files::is_hook_name;

/// Longest PEM text accepted for one field.
pub const MAX_PEM_BYTES: usize = 64 * 1024;
/// Longest lifetime of an issued certificate.
pub const MAX_VALIDITY_DAYS: u32 = 825;
/// Most names one issued certificate may carry.
pub const MAX_NAMES: usize = 100;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CertSource {
    Uploaded,
    Issued,
}

impl CertSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CertSource::Uploaded => "uploaded",
            CertSource::Issued => "issued",
        }
    }
}

/// `POST /api/v1/certs`: an uploaded certificate and its key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UploadCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    #[serde(default)]
    pub chain_pem: String,
    pub target: Target,
    /// Make `key.pem` 0640 with this group (so a web server can read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A named action of the agent's `agent.toml` run after new material is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

/// `POST /api/v1/certs/{id}/replace`: new material for an uploaded certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplaceCert {
    pub cert_pem: String,
    pub key_pem: String,
    #[serde(default)]
    pub chain_pem: String,
}

/// `POST /api/v1/certs/issued`: agents of `target` each get a certificate
/// for these names, signed by the server's CA from their own CSR.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssueCert {
    pub name: String,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub ip_addresses: Vec<IpAddr>,
    #[serde(default = "default_validity_days")]
    pub validity_days: u32,
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

fn default_validity_days() -> u32 {
    90
}

/// A certificate name: it is also the directory `certs/<name>/` on agents.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(format!("name {name:?} must be 1-64 chars of [A-Za-z0-9._-], not starting with '.'")) }
}

/// A DNS name as a certificate carries it (a leading `*.` allowed).
fn check_dns_name(name: &str) -> Result<(), String> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let ok = !bare.is_empty()
        && name.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok { Ok(()) } else { Err(format!("{name:?} is not a DNS name")) }
}

fn check_group_hook(group: Option<&str>, hook: Option<&str>) -> Result<(), (&'static str, String)> {
    if let Some(g) = group
        && (g.is_empty() || g.len() > 32 || !g.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(("group", format!("group {g:?} is not a group name")));
    }
    if let Some(h) = hook
        && !is_hook_name(h)
    {
        return Err(("hook", format!("hook {h:?} must name an action: 1-64 chars of [A-Za-z0-9._-]")));
    }
    Ok(())
}

impl UploadCert {
    /// Checks the fields' shapes; the PEM contents are checked by the server.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_name(&self.name).map_err(|e| ("name", e))?;
        check_pem_sizes(&self.cert_pem, &self.key_pem, &self.chain_pem)?;
        check_group_hook(self.group.as_deref(), self.hook.as_deref())
    }
}

impl ReplaceCert {
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_pem_sizes(&self.cert_pem, &self.key_pem, &self.chain_pem)
    }
}

fn check_pem_sizes(cert: &str, key: &str, chain: &str) -> Result<(), (&'static str, String)> {
    for (field, pem) in [("cert_pem", cert), ("key_pem", key), ("chain_pem", chain)] {
        if pem.len() > MAX_PEM_BYTES {
            return Err((field, format!("{field} is longer than {MAX_PEM_BYTES} bytes")));
        }
    }
    Ok(())
}

impl IssueCert {
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_name(&self.name).map_err(|e| ("name", e))?;
        if self.dns_names.is_empty() && self.ip_addresses.is_empty() {
            return Err(("dns_names", "an issued certificate needs at least one DNS name or IP address".into()));
        }
        if self.dns_names.len() + self.ip_addresses.len() > MAX_NAMES {
            return Err(("dns_names", format!("at most {MAX_NAMES} names")));
        }
        for name in &self.dns_names {
            check_dns_name(name).map_err(|e| ("dns_names", e))?;
        }
        if !(1..=MAX_VALIDITY_DAYS).contains(&self.validity_days) {
            return Err(("validity_days", format!("validity_days must be 1..={MAX_VALIDITY_DAYS}")));
        }
        check_group_hook(self.group.as_deref(), self.hook.as_deref())
    }
}

/// A certificate as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cert {
    pub id: i64,
    pub name: String,
    pub source: CertSource,
    pub target: Target,
    /// Goes up with every replacement (uploaded) or forced re-issue (issued).
    pub version: u64,
    /// The current serial (uploaded; issued certificates have one per agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When the current material expires (uploaded), or the soonest expiry
    /// an agent reported (issued).
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
    /// `not_after` is within the warning window (protocol.md §7).
    pub expiring: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
}

/// Answer of a certificate change: the certificate and how many agents were told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertChanged {
    pub cert: Cert,
    pub agents_told: u64,
}

/// One certificate an agent must hold (`GET /api/v1/agents/self/certs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentCert {
    pub cert_id: i64,
    pub name: String,
    pub source: CertSource,
    pub version: u64,
    /// Uploaded: the serial of the current material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

/// `GET /api/v1/agents/self/certs/{id}`: an uploaded certificate's material.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertMaterial {
    pub version: u64,
    pub serial: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: Timestamp,
}

/// `POST /api/v1/agents/self/certs/{id}/csr`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    pub csr_pem: String,
}

/// What the CA signed: the certificate, the CA certificates to trust (the
/// issuing one first, then any other the server still trusts during a CA
/// rotation), and the assignment's version it was issued for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedCert {
    pub version: u64,
    pub serial: String,
    pub cert_pem: String,
    pub ca_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: Timestamp,
}

/// `POST /api/v1/agents/self/certs/{id}/renew`: ask for renewal of an
/// uploaded certificate (an audited request someone fulfils).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    #[serde(default)]
    pub reason: String,
}

/// `ref` of `cert.renewed`: fetch (uploaded) or re-issue (issued) it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRenewed {
    pub cert_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// `ref` of `cert.revoked`: stop using it and remove it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRevoked {
    pub cert_id: i64,
}

/// A CA certificate of the server (`GET /api/v1/certs/ca`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaCert {
    pub id: i64,
    pub cert_pem: String,
    /// It signs new certificates (exactly one CA does).
    pub active: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: Timestamp,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: Timestamp,
}

/// `POST /api/v1/certs/ca/import`: an operator's CA certificate and key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportCa {
    pub cert_pem: String,
    pub key_pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(dns: &[&str]) -> IssueCert {
        IssueCert {
            name: "web".into(),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addresses: vec![],
            validity_days: 30,
            target: Target::all(),
            group: None,
            hook: None,
        }
    }

    #[test]
    fn names_are_directory_safe() {
        for good in ["web", "api.example.com", "a_b-c"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issued_certificates_need_valid_names_and_lifetimes() {
        assert!(issue(&["example.com", "*.example.com"]).check().is_ok());
        assert_eq!(issue(&[]).check().map_err(|e| e.0), Err("dns_names"));
        assert_eq!(issue(&["bad name"]).check().map_err(|e| e.0), Err("dns_names"));
        assert_eq!(issue(&["-x.com"]).check().map_err(|e| e.0), Err("dns_names"));
        let mut long = issue(&["a.com"]);
        long.validity_days = 5000;
        assert_eq!(long.check().map_err(|e| e.0), Err("validity_days"));
    }
}
