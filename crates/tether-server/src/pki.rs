//! Certificate material (protocol.md §7): checking what operators upload,
//! sealing private keys before they reach the store, the server's CA, and
//! signing the CSRs agents make.
//!
//! Parsing and checks use `x509-parser`; generating and signing use `rcgen`;
//! sealing uses XChaCha20-Poly1305 from RustCrypto. Nothing here is
//! hand-rolled cryptography.

use std::collections::BTreeSet;
use std::net::IpAddr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tether_store::{CaRecord, CertRecord, Millis, NewCa, SealedMaterial};
use x509_parser::certificate::X509Certificate;
use x509_parser::pem::Pem;

use crate::auth::secret::random_bytes;

/// The server key that seals certificate and CA private keys.
pub const MATERIAL_KEY: &str = "material";

const NONCE_LEN: usize = 24;
/// How long a CA the server creates lives.
const CA_VALIDITY_DAYS: i64 = 10 * 365;
/// Issued certificates start a little in the past, for agents whose clocks lag.
const BACKDATE_MS: i64 = 5 * 60 * 1000;
const DAY_MS: i64 = 86_400_000;

/// A problem with what a caller sent: the field and what is wrong, for a 400.
pub type Problem = (&'static str, String);

/// Seals private keys with the server's material key. The associated data
/// names what a sealed value belongs to, so it cannot be moved to another
/// certificate or CA in the database.
#[derive(Clone)]
pub struct Sealer(XChaCha20Poly1305);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self(XChaCha20Poly1305::new(key.into()))
    }

    fn seal(&self, aad: &str, plain: &[u8]) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = self
            .0
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: aad.as_bytes() })
            .expect("sealing a key cannot fail");
        [&nonce[..], &sealed].concat()
    }

    fn open(&self, aad: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (nonce, body) =
            sealed.split_at_checked(NONCE_LEN).ok_or_else(|| anyhow::anyhow!("sealed key of {aad} is cut short"))?;
        self.0
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad: aad.as_bytes() })
            .map_err(|_| anyhow::anyhow!("the server's material key does not open the key of {aad}"))
    }

    /// The private key of an uploaded certificate, in PEM.
    pub fn open_cert_key(&self, cert: &CertRecord) -> anyhow::Result<String> {
        let (Some(serial), Some(sealed)) = (&cert.serial, &cert.key_sealed) else {
            anyhow::bail!("certificate {} has no stored key", cert.id);
        };
        let pem = self.open(&cert_aad(&cert.name, serial), sealed)?;
        Ok(String::from_utf8(pem)?)
    }
}

fn cert_aad(name: &str, serial: &str) -> String {
    format!("cert:{name}:{serial}")
}

fn ca_aad(serial: &str) -> String {
    format!("ca:{serial}")
}

/// Facts of a parsed certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// Lowercase hex of the serial's bytes, as agents report it.
    pub serial: String,
    pub not_before: Millis,
    pub not_after: Millis,
}

fn facts(cert: &X509Certificate<'_>) -> CertFacts {
    let validity = cert.validity();
    CertFacts {
        serial: hex::encode(cert.raw_serial()),
        not_before: validity.not_before.timestamp().saturating_mul(1000),
        not_after: validity.not_after.timestamp().saturating_mul(1000),
    }
}

/// Every PEM block of `text`, each of which must be a certificate.
fn pem_certs(field: &'static str, text: &str) -> Result<Vec<Pem>, Problem> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(text.as_bytes()) {
        let pem = block.map_err(|e| (field, format!("{field} is not valid PEM: {e}")))?;
        if pem.label != "CERTIFICATE" {
            return Err((field, format!("{field} holds a {:?} block where a CERTIFICATE belongs", pem.label)));
        }
        pem.parse_x509().map_err(|e| (field, format!("{field} holds a certificate that does not parse: {e}")))?;
        out.push(pem);
    }
    Ok(out)
}

/// The one certificate of `text`.
fn one_cert(field: &'static str, text: &str) -> Result<Pem, Problem> {
    let mut certs = pem_certs(field, text)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        0 => Err((field, format!("{field} holds no PEM certificate"))),
        n => Err((field, format!("{field} holds {n} certificates; put the intermediates in chain_pem"))),
    }
}

fn key_pair(field: &'static str, pem: &str) -> Result<KeyPair, Problem> {
    KeyPair::from_pem(pem).map_err(|_| {
        (field, format!("{field} is not a PEM private key this server reads (PKCS#8, SEC1 or PKCS#1; unencrypted)"))
    })
}

/// Checks that `key` is the private half of `cert`'s public key.
fn check_matches(cert: &X509Certificate<'_>, key: &KeyPair) -> Result<(), Problem> {
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(("key_pem", "key_pem does not match the certificate's public key".into()));
    }
    Ok(())
}

fn check_not_expired(field: &'static str, facts: &CertFacts, now: Millis) -> Result<(), Problem> {
    if facts.not_after <= now {
        let when = iso(facts.not_after);
        return Err((field, format!("the certificate in {field} expired at {when}")));
    }
    Ok(())
}

/// Checks an uploaded certificate, key and chain, and seals the key.
pub fn check_uploaded(
    sealer: &Sealer,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
    chain_pem: &str,
    now: Millis,
) -> Result<SealedMaterial, Problem> {
    let pem = one_cert("cert_pem", cert_pem)?;
    let cert = pem.parse_x509().map_err(|e| ("cert_pem", e.to_string()))?;
    let facts = facts(&cert);
    check_not_expired("cert_pem", &facts, now)?;
    check_matches(&cert, &key_pair("key_pem", key_pem)?)?;
    pem_certs("chain_pem", chain_pem)?;
    Ok(SealedMaterial {
        key_sealed: sealer.seal(&cert_aad(name, &facts.serial), key_pem.as_bytes()),
        serial: facts.serial,
        not_after: facts.not_after,
        cert_pem: cert_pem.to_owned(),
        chain_pem: chain_pem.to_owned(),
    })
}

/// A random serial: 16 bytes, positive, without a leading zero byte, so its
/// hex is the same as the parsed certificate's.
fn new_serial() -> Vec<u8> {
    let mut bytes = random_bytes::<16>().to_vec();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    bytes
}

fn odt(ms: Millis) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn iso(ms: Millis) -> String {
    odt(ms).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn rcgen_problem(field: &'static str, e: rcgen::Error) -> Problem {
    (field, format!("{field}: {e}"))
}

/// A new CA for the server (first start, or a rotation): ECDSA P-256, ten years.
pub fn new_ca(sealer: &Sealer, now: Millis) -> anyhow::Result<NewCa> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("tether fleet CA {}", &iso(now)[..10]));
    dn.push(DnType::OrganizationName, "tether");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = odt(now - BACKDATE_MS);
    params.not_after = odt(now + CA_VALIDITY_DAYS * DAY_MS);
    let serial = new_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key)?;
    let serial = hex::encode(serial);
    Ok(NewCa {
        key_sealed: sealer.seal(&ca_aad(&serial), key.serialize_pem().as_bytes()),
        serial,
        cert_pem: cert.pem(),
        not_after: now + CA_VALIDITY_DAYS * DAY_MS,
        now,
    })
}

/// Checks an operator's CA certificate and key for import.
pub fn check_ca_import(sealer: &Sealer, cert_pem: &str, key_pem: &str, now: Millis) -> Result<NewCa, Problem> {
    let pem = one_cert("cert_pem", cert_pem)?;
    let cert = pem.parse_x509().map_err(|e| ("cert_pem", e.to_string()))?;
    if !cert.is_ca() {
        return Err(("cert_pem", "cert_pem is not a CA certificate (basicConstraints CA:TRUE)".into()));
    }
    let facts = facts(&cert);
    check_not_expired("cert_pem", &facts, now)?;
    let key = key_pair("key_pem", key_pem)?;
    check_matches(&cert, &key)?;
    // What rcgen needs to sign with it later.
    Issuer::from_ca_cert_pem(cert_pem, &key).map_err(|e| rcgen_problem("cert_pem", e))?;
    Ok(NewCa {
        key_sealed: sealer.seal(&ca_aad(&facts.serial), key_pem.as_bytes()),
        serial: facts.serial,
        cert_pem: cert_pem.to_owned(),
        not_after: facts.not_after,
        now,
    })
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignRefusal {
    /// It does not parse or its signature does not verify.
    #[error("{0}")]
    BadCsr(String),
    /// It asks for names the assignment does not give (audited).
    #[error("the CSR asks for names the certificate does not assign: {}", .0.join(", "))]
    NamesOutside(Vec<String>),
}

/// What the CA signed.
#[derive(Debug, Clone)]
pub struct Signed {
    pub cert_pem: String,
    pub facts: CertFacts,
}

/// Signs an agent's CSR for issued certificate `cert` with `ca`. The
/// certificate carries the names the CSR asks for, which must all be
/// assigned (none asked: all assigned); its subject is the certificate's
/// name and its lifetime the assignment's.
pub fn sign_csr(
    sealer: &Sealer,
    ca: &CaRecord,
    cert: &CertRecord,
    csr_pem: &str,
    now: Millis,
) -> anyhow::Result<Result<Signed, SignRefusal>> {
    let csr = match CertificateSigningRequestParams::from_pem(csr_pem) {
        Ok(csr) => csr,
        Err(e) => return Ok(Err(SignRefusal::BadCsr(format!("csr_pem is not a CSR this server signs: {e}")))),
    };
    let assigned: BTreeSet<String> = cert
        .dns_names
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .chain(cert.ip_addresses.iter().map(IpAddr::to_string))
        .collect();
    let mut outside = Vec::new();
    for san in &csr.params.subject_alt_names {
        let name = match san {
            SanType::DnsName(d) => d.as_str().to_ascii_lowercase(),
            SanType::IpAddress(ip) => ip.to_string(),
            other => format!("{other:?}"),
        };
        if !assigned.contains(&name) {
            outside.push(name);
        }
    }
    if !outside.is_empty() {
        return Ok(Err(SignRefusal::NamesOutside(outside)));
    }
    let sans = if csr.params.subject_alt_names.is_empty() {
        let dns = cert.dns_names.iter().map(|d| d.clone().try_into().map(SanType::DnsName));
        let ips = cert.ip_addresses.iter().map(|ip| Ok(SanType::IpAddress(*ip)));
        dns.chain(ips).collect::<Result<Vec<_>, rcgen::Error>>()?
    } else {
        csr.params.subject_alt_names.clone()
    };

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cert.name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let lifetime = i64::from(cert.validity_days.unwrap_or(90)) * DAY_MS;
    let not_before = now - BACKDATE_MS;
    let not_after = now + lifetime;
    params.not_before = odt(not_before);
    params.not_after = odt(not_after);
    let serial = new_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));

    let ca_key = KeyPair::from_pem(&String::from_utf8(sealer.open(&ca_aad(&ca.serial), &ca.key_sealed)?)?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let signed = CertificateSigningRequestParams { params, public_key: csr.public_key }.signed_by(&issuer)?;
    Ok(Ok(Signed {
        cert_pem: signed.pem(),
        // The validity as encoded: whole seconds.
        facts: CertFacts {
            serial: hex::encode(serial),
            not_before: not_before / 1000 * 1000,
            not_after: not_after / 1000 * 1000,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;

    fn sealer() -> Sealer {
        Sealer::new(&[7; 32])
    }

    /// A certificate and key signed by a throwaway CA, valid around `NOW`.
    fn leaf(not_after: Millis) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["web.example.com".to_owned()]).expect("params");
        params.not_before = odt(NOW - DAY_MS);
        params.not_after = odt(not_after);
        (params.self_signed(&key).expect("signs").pem(), key.serialize_pem())
    }

    fn problem<T: std::fmt::Debug>(r: Result<T, Problem>) -> (&'static str, String) {
        r.expect_err("refused")
    }

    #[test]
    fn an_uploaded_certificate_is_checked_and_its_key_sealed() {
        let (cert, key) = leaf(NOW + 30 * DAY_MS);
        let sealed = check_uploaded(&sealer(), "web", &cert, &key, "", NOW).expect("accepted");
        assert_eq!(sealed.not_after, NOW + 30 * DAY_MS);
        assert!(!String::from_utf8_lossy(&sealed.key_sealed).contains("PRIVATE KEY"));
        let record = CertRecord {
            id: 1,
            name: "web".into(),
            source: tether_proto::certs::CertSource::Uploaded,
            target: tether_proto::command::TargetSpec::All,
            group: None,
            hook: None,
            version: 1,
            serial: Some(sealed.serial.clone()),
            not_after: Some(sealed.not_after),
            cert_pem: Some(cert),
            chain_pem: Some(String::new()),
            key_sealed: Some(sealed.key_sealed.clone()),
            dns_names: vec![],
            ip_addresses: vec![],
            validity_days: None,
            created_by: "admin".into(),
            created_at: NOW,
            revoked_at: None,
        };
        assert_eq!(sealer().open_cert_key(&record).expect("opens"), key);
        let moved = CertRecord { name: "other".into(), ..record };
        assert!(sealer().open_cert_key(&moved).is_err(), "bound to its name");
    }

    #[test]
    fn bad_uploads_name_their_problem() {
        let (cert, key) = leaf(NOW + DAY_MS);
        let (_, other_key) = leaf(NOW + DAY_MS);
        let s = sealer();
        assert_eq!(problem(check_uploaded(&s, "w", "not pem", &key, "", NOW)).0, "cert_pem");
        assert_eq!(problem(check_uploaded(&s, "w", &cert, "garbage", "", NOW)).0, "key_pem");
        let (field, what) = problem(check_uploaded(&s, "w", &cert, &other_key, "", NOW));
        assert_eq!(field, "key_pem");
        assert!(what.contains("does not match"), "{what}");
        let (field, what) = problem(check_uploaded(&s, "w", &cert, &key, "", NOW + 2 * DAY_MS));
        assert_eq!(field, "cert_pem");
        assert!(what.contains("expired"), "{what}");
        assert_eq!(problem(check_uploaded(&s, "w", &cert, &key, &key, NOW)).0, "chain_pem");
        let two = format!("{cert}{cert}");
        assert_eq!(problem(check_uploaded(&s, "w", &two, &key, "", NOW)).0, "cert_pem");
    }

    fn issued(dns: &[&str]) -> CertRecord {
        CertRecord {
            id: 2,
            name: "api".into(),
            source: tether_proto::certs::CertSource::Issued,
            target: tether_proto::command::TargetSpec::All,
            group: None,
            hook: None,
            version: 1,
            serial: None,
            not_after: None,
            cert_pem: None,
            chain_pem: None,
            key_sealed: None,
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addresses: vec!["10.0.0.1".parse().expect("ip")],
            validity_days: Some(30),
            created_by: "admin".into(),
            created_at: NOW,
            revoked_at: None,
        }
    }

    fn csr(names: &[&str]) -> String {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.serialize_request(&key).expect("csr").pem().expect("pem")
    }

    fn ca_record(new: NewCa) -> CaRecord {
        CaRecord {
            id: 1,
            serial: new.serial,
            cert_pem: new.cert_pem,
            key_sealed: new.key_sealed,
            not_after: new.not_after,
            active: true,
            created_at: new.now,
        }
    }

    #[test]
    fn the_ca_signs_only_assigned_names() {
        let s = sealer();
        let ca = ca_record(new_ca(&s, NOW).expect("ca"));
        let cert = issued(&["api.example.com"]);
        let signed =
            sign_csr(&s, &ca, &cert, &csr(&["api.example.com", "10.0.0.1"]), NOW).expect("runs").expect("signed");
        let pem = one_cert("cert_pem", &signed.cert_pem).expect("parses");
        let x509 = pem.parse_x509().expect("x509");
        assert_eq!(facts(&x509), signed.facts);
        assert_eq!(signed.facts.not_after, NOW + 30 * DAY_MS);
        let ca_pem = one_cert("ca", &ca.cert_pem).expect("ca parses");
        let ca_x509 = ca_pem.parse_x509().expect("ca x509");
        x509.verify_signature(Some(ca_x509.public_key())).expect("signed by the CA");

        let refused = sign_csr(&s, &ca, &cert, &csr(&["api.example.com", "evil.example.com"]), NOW).expect("runs");
        assert_eq!(refused.expect_err("refused"), SignRefusal::NamesOutside(vec!["evil.example.com".into()]));
        let bad = sign_csr(
            &s,
            &ca,
            &cert,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            NOW,
        );
        assert!(matches!(bad.expect("runs"), Err(SignRefusal::BadCsr(_))));
    }

    #[test]
    fn an_imported_ca_must_be_a_ca_with_its_key() {
        let s = sealer();
        let generated = new_ca(&s, NOW).expect("ca");
        let (leaf_cert, leaf_key) = leaf(NOW + DAY_MS);
        assert_eq!(problem(check_ca_import(&s, &leaf_cert, &leaf_key, NOW)).0, "cert_pem");
        assert_eq!(problem(check_ca_import(&s, &generated.cert_pem, &leaf_key, NOW)).0, "key_pem");
    }
}
