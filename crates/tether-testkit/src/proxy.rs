//! A TCP proxy in front of a real service that a test can cut (every open
//! connection is closed and new ones are closed at once) and restore, to
//! play the service going away and coming back without stopping it for
//! everyone else on the machine.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

#[derive(Debug, Default)]
struct Shared {
    up: AtomicBool,
    links: Mutex<Vec<AbortHandle>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared { up: AtomicBool::new(true), links: Mutex::default() });
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !shared.up.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    shared.links.lock().expect("links").push(link.abort_handle());
                }
            }
        })
        .abort_handle();
        Self { addr, shared, accept }
    }

    /// Proxies the host and port of `url` (`scheme://[user@]host:port/…`)
    /// and returns the same URL pointing at the proxy.
    pub async fn for_url(url: &str) -> (Self, String) {
        let mut parsed = url::Url::parse(url).expect("a URL");
        let host = parsed.host_str().expect("a host").to_owned();
        let port = parsed.port_or_known_default().expect("a port");
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .expect("resolve the service")
            .next()
            .expect("an address");
        let proxy = Self::start(target).await;
        parsed.set_host(Some("127.0.0.1")).expect("set host");
        parsed.set_port(Some(proxy.addr.port())).expect("set port");
        (proxy, parsed.to_string())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service "goes away": open connections are closed, new ones refused.
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        for link in self.shared.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    /// The service is back.
    pub fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
