//! The optional TLS listener: loading the certificate chain and key from PEM
//! files into a rustls acceptor that offers HTTP/2 and HTTP/1.1 via ALPN.
//!
//! Plain connections stay HTTP/1.1 only (see docs/decisions.md); over TLS the
//! protocol is negotiated in the handshake, and the accept loop serves
//! exactly the one ALPN chose (HTTP/1.1 when the client offered none), so
//! nothing waits on the client's first bytes to pick it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Where the server's certificate chain and private key are (both PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The leaf certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Pairs `--tls-cert` with `--tls-key`; one without the other is an error
    /// rather than a silent fallback to plain HTTP.
    pub fn from_pair(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<Self>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err(TlsError::Incomplete("a TLS certificate needs its key: --tls-key (tls_key in --config)"))
            }
            (None, Some(_)) => {
                Err(TlsError::Incomplete("a TLS key needs its certificate: --tls-cert (tls_cert in --config)"))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Incomplete(&'static str),
    #[error("reading {what} {}: {source}", path.display())]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {}: {message}", path.display())]
    Invalid { what: &'static str, path: PathBuf, message: String },
    #[error("TLS key {} does not fit certificate {}: {source}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf, source: rustls::Error },
}

/// ALPN ids in order of preference: HTTP/2 first, HTTP/1.1 for older clients.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads the files and builds the acceptor; every error names the file at fault.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    // The provider is chosen explicitly so that another crate enabling a
    // second rustls provider cannot make the process-wide default ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid { what: "TLS certificate", path: files.cert.clone(), message: e.to_string() })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Mismatch { cert: files.cert.clone(), key: files.key.clone(), source })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    const WHAT: &str = "TLS certificate";
    let pem = read(WHAT, path)?;
    let invalid = |message: String| TlsError::Invalid { what: WHAT, path: path.to_owned(), message };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a valid PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "TLS key";
    let pem = read(WHAT, path)?;
    // The parse error may quote the input; it is key material, so it is not repeated.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        what: WHAT,
        path: path.to_owned(),
        message: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block found".into(),
            _ => "not a valid PEM private key".into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("self-signed certificate");
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        std::fs::write(&files.cert, cert).expect("write cert");
        std::fs::write(&files.key, key).expect("write key");
        files
    }

    /// The error of a load that must fail (the acceptor has no `Debug`).
    fn load_error(files: &TlsFiles) -> TlsError {
        match acceptor(files) {
            Ok(_) => panic!("loading {files:?} must fail"),
            Err(e) => e,
        }
    }

    #[test]
    fn cert_and_key_must_come_together() {
        let p = || Some(PathBuf::from("x.pem"));
        assert_eq!(TlsFiles::from_pair(None, None).expect("plain"), None);
        assert!(TlsFiles::from_pair(p(), p()).expect("both").is_some());
        let err = TlsFiles::from_pair(p(), None).expect_err("cert alone");
        assert!(err.to_string().contains("--tls-key"), "{err}");
        let err = TlsFiles::from_pair(None, p()).expect_err("key alone");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }

    #[test]
    fn a_valid_pair_offers_h2_then_http11() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed();
        let acceptor = acceptor(&files(dir.path(), &cert, &key)).expect("valid pair loads");
        assert_eq!(acceptor.config().alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn errors_name_the_file_at_fault() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed();

        let missing = TlsFiles { cert: dir.path().join("absent.pem"), key: dir.path().join("key.pem") };
        let err = load_error(&missing);
        assert!(err.to_string().starts_with("reading TLS certificate ") && err.to_string().contains("absent.pem"));

        let err = load_error(&files(dir.path(), "not pem", &key));
        assert!(err.to_string().contains("cert.pem: no CERTIFICATE block"), "{err}");

        let err = load_error(&files(dir.path(), &cert, &cert));
        assert!(err.to_string().contains("key.pem: no PRIVATE KEY block"), "{err}");

        let (_, other_key) = self_signed();
        let err = load_error(&files(dir.path(), &cert, &other_key));
        assert!(err.to_string().contains("does not fit certificate"), "{err}");
        assert!(!err.to_string().contains("PRIVATE KEY-----"), "key material must not appear: {err}");
    }
}
