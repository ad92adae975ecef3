//! The WebSocket's own connection: TCP, then for `wss` rustls with the
//! aws-lc-rs provider and the roots the HTTP client trusts (the private CA
//! alone when one is given, else the platform verifier, as reqwest does).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What the WebSocket needs to know about the HTTP client it goes with;
/// shared by every clone of a [`crate::Client`].
pub(crate) struct Settings {
    pub(crate) user_agent: String,
    ca_pem: Option<Vec<u8>>,
    /// Built on the first `wss` connection: the CLI never needs it, and the
    /// platform verifier reads the system's roots.
    config: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("user_agent", &self.user_agent)
            .field("private_ca", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub(crate) fn new(user_agent: String, ca_pem: Option<Vec<u8>>) -> Self {
        Self { user_agent, ca_pem, config: OnceLock::new() }
    }

    pub(crate) fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.config.get_or_init(|| client_config(self.ca_pem.as_deref()).map(Arc::new)).clone()
    }
}

/// rustls for the WebSocket: aws-lc-rs chosen explicitly (never a process
/// default another crate installed), ALPN `http/1.1` because the upgrade is
/// an HTTP/1.1 request and the server would otherwise pick `h2`.
fn client_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls versions: {e}"))?;
    let mut config = match ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("reading the CA: {e}"))?;
                roots.add(cert).map_err(|e| format!("the CA certificate is not usable: {e}"))?;
            }
            if roots.is_empty() {
                return Err("no CERTIFICATE block found".into());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| format!("loading the system's trusted roots: {e}"))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The byte stream under the WebSocket: plain TCP or TLS over it.
#[derive(Debug)]
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Opens TCP to `host:port` and, when `tls` is given, runs the TLS handshake.
/// Errors keep their cause (refused, unknown issuer …) for the log.
pub(crate) async fn connect(
    host: &url::Host<&str>,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Io, (Stage, io::Error)> {
    let tcp = match host {
        url::Host::Domain(name) => TcpStream::connect((*name, port)).await,
        url::Host::Ipv4(ip) => TcpStream::connect((*ip, port)).await,
        url::Host::Ipv6(ip) => TcpStream::connect((*ip, port)).await,
    }
    .map_err(|e| (Stage::Connect, e))?;
    // Frames are small and answered one by one: no Nagle delay.
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else { return Ok(Io::Plain(tcp)) };
    let name = match host {
        url::Host::Domain(name) => ServerName::try_from(name.to_string())
            .map_err(|e| (Stage::Tls, io::Error::new(io::ErrorKind::InvalidInput, e)))?,
        url::Host::Ipv4(ip) => ServerName::IpAddress(std::net::IpAddr::V4(*ip).into()),
        url::Host::Ipv6(ip) => ServerName::IpAddress(std::net::IpAddr::V6(*ip).into()),
    };
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| (Stage::Tls, e))?;
    Ok(Io::Tls(Box::new(stream)))
}

/// Where a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Connect,
    Tls,
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
