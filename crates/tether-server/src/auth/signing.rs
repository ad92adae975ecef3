//! Verification of signed agent requests (protocol.md §3; format in
//! [`tether_proto::signing`]).
//!
//! Two halves, because the signature covers the body but the agent
//! extractor runs before the body is read:
//! - [`BodyDigestLayer`], a route layer on the agent rows of the route table,
//!   buffers the body of a request that carries `X-Tether-Signature` (under
//!   the same 1 MiB cap as [`crate::error::ApiJson`]), records its SHA-256 as
//!   a [`BodyDigest`] extension and hands the same bytes on. Unsigned and
//!   body-less requests pass straight through with no allocation, so a
//!   parked long-poll costs nothing extra.
//! - [`verify`], called by the `AgentCaller` extractor once the token is
//!   checked: clock window, Ed25519 `verify_strict` against the agent's key
//!   (held in memory with its stream: no store read), then the nonce.
//!
//! Nonces are remembered per process in [`NonceCache`] and, when several
//! servers share a database, in the database as well.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{OriginalUri, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use futures::future::{BoxFuture, Either};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tether_proto::signing::{NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WINDOW_S, signing_input, valid_nonce};
use tether_proto::{AgentId, ErrorKey};

use crate::api::Access;
use crate::error::{ApiError, DEFAULT_BODY_LIMIT};
use crate::state::AppState;

/// SHA-256 of the body of a signed request, exactly as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct BodyDigest(pub [u8; 32]);

/// SHA-256 of the empty body.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41,
    0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Puts [`BodyDigestLayer`] on the routes agents call; the route table calls
/// this for every row, so no agent route can miss it.
pub fn for_access(state: &AppState, access: Access, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    if access == Access::Agent { route.route_layer(BodyDigestLayer { state: state.clone() }) } else { route }
}

#[derive(Debug, Clone)]
pub struct BodyDigestLayer {
    state: AppState,
}

impl<S> tower::Layer<S> for BodyDigestLayer {
    type Service = BodyDigestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyDigestService { inner, state: self.state.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct BodyDigestService<S> {
    inner: S,
    /// For the access-token check done before a body is buffered.
    state: AppState,
}

impl<S> tower::Service<Request> for BodyDigestService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        if !req.headers().contains_key(SIGNATURE_HEADER) {
            return Either::Left(self.inner.call(req));
        }
        // Buffering costs up to 1 MiB: only for a caller whose access token
        // or agent key verifies. Anyone else goes on unbuffered and the
        // extractor refuses it from the headers alone, as for an unsigned request.
        let bearer = super::bearer_token(req.headers());
        let by_token = bearer.is_some_and(|t| self.state.tokens.verify(t).is_ok());
        // An agent key is looked up (memory, else the store) before buffering.
        let key = bearer.filter(|t| !by_token && super::agent_key::looks_like_key(t)).map(str::to_owned);
        if !by_token && key.is_none() {
            return Either::Left(self.inner.call(req));
        }
        if axum::body::HttpBody::is_end_stream(req.body()) {
            // GETs (the long-poll): nothing to buffer, keep the future unboxed.
            req.extensions_mut().insert(BodyDigest(EMPTY_SHA256));
            return Either::Left(self.inner.call(req));
        }
        // The clone that was not polled ready stays behind (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Either::Right(Box::pin(async move {
            if let Some(key) = key
                && !matches!(state.agent_keys.agent_of(state.store.as_ref(), &key).await, Ok(Some(_)))
            {
                return inner.call(req).await;
            }
            let (mut parts, body) = req.into_parts();
            let bytes = match http_body_util::Limited::new(body, DEFAULT_BODY_LIMIT).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(crate::error::too_large(DEFAULT_BODY_LIMIT).into_response());
                }
                Err(_) => {
                    return Ok(ApiError::new(ErrorKey::BadRequest, "could not read the request body").into_response());
                }
            };
            parts.extensions.insert(BodyDigest(Sha256::digest(&bytes).into()));
            inner.call(Request::from_parts(parts, Body::from(bytes))).await
        }))
    }
}

/// Why a signed request was refused.
fn rejected(what: &str) -> ApiError {
    ApiError::new(ErrorKey::Unauthenticated, what)
}

/// The three headers of a signed request, parsed.
#[derive(Debug)]
struct SignatureHeaders<'a> {
    timestamp: u64,
    nonce: &'a str,
    signature: ed25519_dalek::Signature,
}

/// `None` when the request carries none of the headers; an error when it
/// carries some but not all, or malformed ones.
fn read_headers(headers: &axum::http::HeaderMap) -> Result<Option<SignatureHeaders<'_>>, ApiError> {
    let one = |name: &str| -> Result<Option<&str>, ApiError> {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => v.to_str().map(Some).map_err(|_| rejected("malformed request signature headers")),
            (Some(_), Some(_)) => Err(rejected("repeated request signature header")),
        }
    };
    match (one(TIMESTAMP_HEADER)?, one(NONCE_HEADER)?, one(SIGNATURE_HEADER)?) {
        (None, None, None) => Ok(None),
        (Some(ts), Some(nonce), Some(sig)) => {
            let timestamp = (!ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit()))
                .then(|| ts.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| rejected("X-Tether-Timestamp must be Unix seconds"))?;
            if !valid_nonce(nonce) {
                return Err(rejected("X-Tether-Nonce must be 16-64 base64url characters"));
            }
            let signature = URL_SAFE_NO_PAD
                .decode(sig)
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
                .ok_or_else(|| rejected("X-Tether-Signature must be a base64url Ed25519 signature"))?;
            Ok(Some(SignatureHeaders { timestamp, nonce, signature }))
        }
        _ => Err(rejected("a signed request needs X-Tether-Timestamp, X-Tether-Nonce and X-Tether-Signature")),
    }
}

/// Whether a request signed at `timestamp` may be accepted at `now` (both Unix seconds).
pub fn within_window(timestamp: u64, now: u64) -> bool {
    timestamp.abs_diff(now) <= WINDOW_S
}

/// Checks the signature of an agent request, if it has one; refuses an
/// unsigned one when the server requires signatures. `public_key` is the
/// agent's enrolled key (raw, from memory). With several servers on one
/// database, a nonce this server has not seen is also checked against the
/// ones every server remembers there, so a replay to another replica is
/// refused too.
pub async fn verify(
    parts: &Parts,
    state: &AppState,
    agent: AgentId,
    public_key: Option<&[u8; 32]>,
) -> Result<(), ApiError> {
    let Some(signed) = read_headers(&parts.headers)? else {
        if state.config.require_signed_requests {
            return Err(rejected("this server requires signed agent requests"));
        }
        return Ok(());
    };
    let now = state.clock.now_s();
    // Cheap checks first: a stale request costs no signature verification.
    if !within_window(signed.timestamp, now) {
        return Err(
            rejected("request timestamp is more than 300 s away from the server's clock").with("server_time", now)
        );
    }
    let Some(BodyDigest(digest)) = parts.extensions.get::<BodyDigest>().copied() else {
        // Fail closed: an agent route without the digest layer is a server bug.
        return Err(ApiError::internal("signed request reached the agent extractor without a body digest"));
    };
    let key = public_key
        .and_then(|raw| ed25519_dalek::VerifyingKey::from_bytes(raw).ok())
        .ok_or_else(|| rejected("this agent has no usable public key to verify signatures with"))?;
    // Behind a router that rewrote the URI, the signature covers what the client sent.
    let uri = parts.extensions.get::<OriginalUri>().map_or(&parts.uri, |o| &o.0);
    let target = uri.path_and_query().map_or_else(|| uri.path(), |pq| pq.as_str());
    let input = signing_input(parts.method.as_str(), target, signed.timestamp, signed.nonce, &hex::encode(digest));
    key.verify_strict(input.as_bytes(), &signed.signature)
        .map_err(|_| rejected("request signature does not verify with this agent's key"))?;
    // Only after the signature verified: strangers cannot fill the cache.
    // Locally first: the per-agent quota applies, and a replay to this
    // server costs no database round trip.
    state.nonces.remember(agent, signed.nonce, signed.timestamp, now)?;
    if state.store.kind().shared() {
        let until = (signed.timestamp + WINDOW_S) as i64;
        if !state.store.remember_nonce(agent, signed.nonce, until).await? {
            return Err(rejected("request nonce was already used (replay)"));
        }
    }
    Ok(())
}

/// Key of a remembered nonce: its SHA-256 cut to 128 bits keeps entries a
/// fixed, small size whatever the nonce's length (a collision needs a
/// second preimage of SHA-256).
type NonceKey = (AgentId, [u8; 16]);

/// Nonces of accepted signed requests, each kept until its request's
/// timestamp leaves the window (after which the request is refused on its
/// timestamp anyway). Bounded twice, and neither bound ever forgets a live
/// nonce (that would reopen the replay it guards against): each agent may
/// hold `per_agent` nonces, beyond which only that agent gets 429; at
/// `capacity` in all it first drops expired entries and then refuses new
/// signed requests with 503.
#[derive(Debug)]
pub struct NonceCache {
    /// Nonce → last second (Unix) at which its request could still be accepted.
    seen: DashMap<NonceKey, u64>,
    /// Entries of `seen` per agent, charged before an entry is added.
    held: DashMap<AgentId, usize>,
    /// Tracked apart from the map: `DashMap::len` locks every shard.
    len: AtomicUsize,
    capacity: usize,
    per_agent: usize,
    /// The second of the last prune forced by a full cache or a full quota.
    last_full_prune: AtomicU64,
}

impl NonceCache {
    pub fn new(capacity: usize, per_agent: usize) -> Self {
        Self {
            seen: DashMap::new(),
            held: DashMap::new(),
            len: AtomicUsize::new(0),
            capacity,
            per_agent,
            last_full_prune: AtomicU64::new(0),
        }
    }

    /// A full scan at most once a second, however many requests find the
    /// cache or a quota full: entries expire by the second anyway.
    fn prune_at_most_once_a_second(&self, now: u64) {
        let last = self.last_full_prune.load(Ordering::Relaxed);
        if last != now && self.last_full_prune.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.prune(now);
        }
    }

    fn held_by(&self, agent: AgentId) -> usize {
        self.held.get(&agent).map_or(0, |n| *n)
    }

    fn over_quota(&self) -> ApiError {
        crate::limits::rate_limited(5, format!("{} signed requests per agent in 600 s", self.per_agent))
    }

    /// Records `nonce` for `agent`; 401 if it is already remembered, 429
    /// when the agent's quota is used up, 503 when the cache is full.
    pub fn remember(&self, agent: AgentId, nonce: &str, timestamp: u64, now: u64) -> Result<(), ApiError> {
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&Sha256::digest(nonce.as_bytes())[..16]);
        let key = (agent, hash);
        // A replay is a replay even when the cache is full.
        if let Some(until) = self.seen.get(&key)
            && *until >= now
        {
            return Err(rejected("request nonce was already used (replay)"));
        }
        if self.held_by(agent) >= self.per_agent {
            self.prune_at_most_once_a_second(now);
            if self.held_by(agent) >= self.per_agent {
                tracing::warn!(agent_id = %agent, quota = self.per_agent, "Agent used up its nonce quota");
                return Err(self.over_quota());
            }
        }
        if self.len.load(Ordering::Relaxed) >= self.capacity {
            self.prune_at_most_once_a_second(now);
            if self.len.load(Ordering::Relaxed) >= self.capacity {
                tracing::warn!(
                    capacity = self.capacity,
                    "Nonce cache full: refusing signed requests until nonces expire"
                );
                return Err(ApiError::new(
                    ErrorKey::ServiceUnavailable,
                    "too many signed requests in flight; retry later",
                )
                .with("retry_after", 5));
            }
        }
        let until = timestamp + WINDOW_S;
        match self.seen.entry(key) {
            dashmap::Entry::Occupied(mut e) => {
                if *e.get() >= now {
                    return Err(rejected("request nonce was already used (replay)"));
                }
                // Expired but not yet pruned: the old request can no longer be replayed.
                e.insert(until);
            }
            dashmap::Entry::Vacant(e) => {
                // Charged before the entry exists (lock order: `seen`, then
                // `held`, as in `prune`), so concurrent requests cannot overshoot.
                let mut held = self.held.entry(agent).or_insert(0);
                if *held >= self.per_agent {
                    return Err(self.over_quota());
                }
                *held += 1;
                drop(held);
                e.insert(until);
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Drops nonces whose requests are out of the window at `now`.
    pub fn prune(&self, now: u64) {
        self.seen.retain(|(agent, _), until| {
            let keep = *until >= now;
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
                if let Some(mut held) = self.held.get_mut(agent) {
                    *held = held.saturating_sub(1);
                }
            }
            keep
        });
        self.held.retain(|_, held| *held > 0);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_300_seconds_either_way_inclusive() {
        let now = 1_700_000_000;
        assert!(within_window(now, now));
        assert!(within_window(now - 300, now));
        assert!(within_window(now + 300, now));
        assert!(!within_window(now - 301, now));
        assert!(!within_window(now + 301, now));
        assert!(!within_window(0, now));
        assert!(!within_window(u64::MAX, now));
    }

    #[test]
    fn a_nonce_is_refused_again_until_its_request_leaves_the_window() {
        let cache = NonceCache::new(100, 100);
        let (a, b) = (AgentId::new(), AgentId::new());
        let nonce = "00112233445566778899aabbccddeeff";
        cache.remember(a, nonce, 1000, 1000).expect("first use");
        let err = cache.remember(a, nonce, 1000, 1200).expect_err("replay");
        assert_eq!(err.key, ErrorKey::Unauthenticated);
        cache.remember(b, nonce, 1000, 1000).expect("nonces are per agent");
        assert!(cache.remember(a, nonce, 1000, 1300).is_err(), "still inside the window at ts + 300");
        cache.remember(a, nonce, 1301, 1301).expect("the old entry expired");
        cache.prune(1301);
        assert_eq!(cache.len(), 1, "b's entry expired, a's was renewed");
    }

    #[test]
    fn a_full_cache_drops_expired_nonces_then_refuses_rather_than_forgets() {
        let cache = NonceCache::new(2, 10);
        let agent = AgentId::new();
        cache.remember(agent, "aaaaaaaaaaaaaaaa", 1000, 1000).expect("1");
        cache.remember(agent, "bbbbbbbbbbbbbbbb", 1100, 1100).expect("2");
        let err = cache.remember(agent, "cccccccccccccccc", 1100, 1100).expect_err("full");
        assert_eq!(err.key, ErrorKey::ServiceUnavailable);
        let again = cache.remember(agent, "aaaaaaaaaaaaaaaa", 1000, 1100).expect_err("nothing was forgotten");
        assert_eq!(again.key, ErrorKey::Unauthenticated, "a replay stays a replay when full");
        // At 1301 the first nonce's request is out of the window: room again.
        cache.remember(agent, "cccccccccccccccc", 1301, 1301).expect("room after pruning");
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn an_agent_over_its_quota_gets_429_and_others_go_on() {
        let cache = NonceCache::new(100, 2);
        let (a, b) = (AgentId::new(), AgentId::new());
        cache.remember(a, "aaaaaaaaaaaaaaaa", 1000, 1000).expect("1");
        cache.remember(a, "bbbbbbbbbbbbbbbb", 1000, 1000).expect("2");
        let err = cache.remember(a, "cccccccccccccccc", 1000, 1000).expect_err("over quota");
        assert_eq!(err.key, ErrorKey::RateLimited);
        assert_eq!(cache.len(), 2, "a refused nonce is not remembered");
        cache.remember(b, "cccccccccccccccc", 1000, 1000).expect("another agent has its own quota");
        let replay = cache.remember(a, "aaaaaaaaaaaaaaaa", 1000, 1000).expect_err("replay");
        assert_eq!(replay.key, ErrorKey::Unauthenticated, "a replay stays a replay over quota");
        // Once a's nonces leave the window its quota is free again.
        cache.remember(a, "cccccccccccccccc", 1301, 1301).expect("quota freed by expiry");
        cache.prune(1602);
        assert!(cache.is_empty(), "every nonce left the window by 1602");
        assert!(cache.held.is_empty(), "no per-agent counters left behind");
    }

    #[test]
    fn empty_digest_constant_is_sha256_of_nothing() {
        assert_eq!(EMPTY_SHA256, <[u8; 32]>::from(Sha256::digest(b"")));
    }
}
