//! The presence webhook (protocol.md §8): an optional URL told when an
//! agent goes offline or comes back.
//!
//! The URL comes from the server's configuration, but whatever it names
//! the server will connect to, so it is held to the rules an SSRF filter
//! would apply: no loopback, link-local (cloud metadata), private, shared
//! or otherwise non-public address unless the operator allows private
//! targets. Names are checked again at every connection (a resolver that
//! refuses such addresses), so a DNS answer that changes after start-up
//! cannot point the server at itself; redirects are never followed.
//!
//! Deliveries never slow the API: the presence job only queues them
//! (bounded; beyond it an alert is dropped and counted), and one worker
//! sends them in order, each attempt capped in time and retried with
//! backoff.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tether_proto::Labels;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Alerts waiting to be sent; beyond this a new one is dropped.
const QUEUE: usize = 1_000;
/// One attempt: connect, send, read the status.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per alert, with the wait before each retry doubling from 1 s.
const ATTEMPTS: u32 = 5;

/// A checked webhook URL.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    url: reqwest::Url,
    allow_private: bool,
}

impl WebhookTarget {
    /// Checks `url`: http(s), a host, and (unless `allow_private`) a host
    /// that is not a non-public IP literal nor a name known to be one.
    pub fn parse(url: &str, allow_private: bool) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{url} must be http:// or https://"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{url} must not carry credentials"));
        }
        let host = url.host().ok_or_else(|| format!("{url} has no host"))?;
        if !allow_private {
            let literal = match host {
                url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
                url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
                url::Host::Domain(name) => {
                    let name = name.trim_end_matches('.').to_ascii_lowercase();
                    if name == "localhost" || name.ends_with(".localhost") || name == "metadata.google.internal" {
                        return Err(format!(
                            "{url} names this machine or a metadata service (allow_private_targets to permit)"
                        ));
                    }
                    None
                }
            };
            if let Some(ip) = literal.filter(|ip| !is_public(*ip)) {
                return Err(format!("{url} points at {ip}, a non-public address (allow_private_targets to permit)"));
            }
        }
        Ok(Self { url, allow_private })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }
}

/// Whether `ip` is an ordinary public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

/// Only global unicast (`2000::/3`) minus its special blocks: everything
/// else (loopback, unique-local, link-local, IPv4-compatible, NAT64, …) is
/// not an ordinary public address.
fn is_public_v6(ip: Ipv6Addr) -> bool {
    let [a, b, ..] = ip.segments();
    (a & 0xe000) == 0x2000
        && !(a == 0x2001 && b < 0x0200) // IETF protocol assignments, Teredo included (2001::/23)
        && !(a == 0x2001 && b == 0x0db8) // documentation
        && a != 0x2002 // 6to4: may carry a private IPv4 address
}

/// Resolves names for the webhook client and refuses any answer holding a
/// non-public address, so the check cannot be bypassed by DNS.
#[derive(Debug)]
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                let msg = format!("{host} resolves to {}, a non-public address", bad.ip());
                return Err(msg.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// What the webhook receives (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct PresenceAlert {
    /// Unique per alert: a receiver can drop a retried duplicate.
    pub id: String,
    /// `agent.online` or `agent.offline`.
    pub event: &'static str,
    pub agent_id: String,
    pub name: String,
    pub hostname: String,
    pub labels: Labels,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
}

/// The sending side: queue an alert without waiting.
#[derive(Debug, Clone)]
pub struct Alerts(Option<mpsc::Sender<PresenceAlert>>);

impl Alerts {
    /// No webhook configured: alerts go nowhere.
    pub fn none() -> Self {
        Self(None)
    }

    /// Queues `alert`; never waits. A full queue drops it (counted).
    pub fn send(&self, alert: PresenceAlert) {
        let Some(tx) = &self.0 else { return };
        if tx.try_send(alert).is_err() {
            metrics::counter!("tether_webhook_dropped_total").increment(1);
            tracing::warn!("Alert webhook queue is full; an alert was dropped");
        }
    }
}

/// The worker's side, consumed by [`deliver`].
#[derive(Debug)]
pub struct AlertQueue(mpsc::Receiver<PresenceAlert>);

pub fn channel() -> (Alerts, AlertQueue) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Alerts(Some(tx)), AlertQueue(rx))
}

/// Sends queued alerts to `target` one after another until `stop` fires.
pub async fn deliver(target: WebhookTarget, mut queue: AlertQueue, stop: CancellationToken) {
    // No proxy from the environment: a proxy would resolve the name itself,
    // out of reach of the resolver that enforces the rules above.
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(ATTEMPT_TIMEOUT)
        .user_agent(concat!("tether-server/", env!("CARGO_PKG_VERSION")));
    if !target.allow_private {
        builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "Could not build the webhook client; alerts are off");
            return;
        }
    };
    loop {
        let alert = tokio::select! {
            _ = stop.cancelled() => return,
            next = queue.0.recv() => match next {
                Some(alert) => alert,
                None => return,
            },
        };
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            let why = match client.post(target.url.clone()).json(&alert).send().await {
                Ok(resp) if resp.status().is_success() => {
                    metrics::counter!("tether_webhook_deliveries_total", "outcome" => "ok").increment(1);
                    break;
                }
                Ok(resp) => format!("answered {}", resp.status()),
                Err(e) => e.to_string(),
            };
            if attempt == ATTEMPTS {
                metrics::counter!("tether_webhook_deliveries_total", "outcome" => "failed").increment(1);
                tracing::warn!(event = alert.event, agent_id = %alert.agent_id, reason = %why,
                               "Alert webhook failed; giving up on this alert");
                break;
            }
            tracing::debug!(attempt, reason = %why, "Alert webhook failed; retrying");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_public_targets_unless_allowed() {
        for bad in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1/hook",
            "http://[::1]/hook",
            "http://10.1.2.3/hook",
            "http://192.168.0.10/hook",
            "http://172.16.0.1/hook",
            "http://100.64.0.1/hook",
            "http://0.0.0.0/hook",
            "http://[fe80::1]/hook",
            "http://[fd00::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://[::127.0.0.1]/hook",
            "http://[::169.254.169.254]/hook",
            "http://[2002:7f00:1::1]/hook",
            "http://[2001:0:4136:e378::1]/hook",
            "http://[64:ff9b::a9fe:a9fe]/hook",
            "http://2130706433/hook",
            "http://0x7f.1/hook",
            "http://localhost:8080/hook",
            "http://metadata.google.internal/computeMetadata/v1/",
        ] {
            assert!(WebhookTarget::parse(bad, false).is_err(), "{bad} must be refused");
            assert!(WebhookTarget::parse(bad, true).is_ok(), "{bad} is allowed with allow_private");
        }
        for bad in ["ftp://example.com/x", "not a url", "http://user:pw@example.com/x", "file:///etc/passwd"] {
            assert!(WebhookTarget::parse(bad, true).is_err(), "{bad}");
        }
        for ok in ["https://hooks.example.com/tether", "http://8.8.8.8/x", "http://[2606:4700::1111]/x"] {
            assert!(WebhookTarget::parse(ok, false).is_ok(), "{ok}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = PublicOnlyResolver.resolve(name).await.err().expect("localhost is refused");
        assert!(err.to_string().contains("non-public"), "{err}");
    }
}
