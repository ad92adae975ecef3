//! Password hashing with argon2id at the protocol.md §3 parameters, and the
//! rationing of verifications (protocol.md §3): a semaphore sized to the
//! cores and a short cache of successful HTTP Basic checks.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tether_proto::ErrorKey;

use crate::error::ApiError;

fn argon2() -> Argon2<'static> {
    let params = Params::new(19_456, 2, 1, None).expect("static argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&super::secret::random_bytes::<16>()).expect("16-byte salt encodes");
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing cannot fail with valid params")
        .to_string()
}

/// [`hash_password`] on a blocking thread: argon2 spends tens of milliseconds
/// of CPU, which must not stall the async workers.
pub async fn hash_off_thread(password: &str) -> Result<String, tokio::task::JoinError> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_password(&password)).await
}

/// Verifies against `stored`, or against a fixed dummy hash when the user
/// does not exist, so both paths cost the same (no user enumeration by timing).
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("tether-dummy-password"));
    let Ok(parsed) = PasswordHash::new(stored.unwrap_or(dummy)) else {
        return false;
    };
    let ok = argon2().verify_password(password.as_bytes(), &parsed).is_ok();
    ok && stored.is_some()
}

/// How long a successful Basic verification is remembered (protocol.md §3: ≤ 60 s).
pub const CACHE_TTL_MS: i64 = 60_000;
/// Most remembered verifications; only correct passwords are remembered,
/// so this is about one per active Basic user.
const MAX_CACHED: usize = 10_000;

/// A successful verification, remembered under a keyed hash of the credentials.
#[derive(Debug)]
struct Cached {
    username: String,
    /// The hash the password was checked against: a changed password
    /// (even by another process, such as `reset-admin`) misses the cache.
    password_hash: String,
    expires_at: i64,
}

/// Rations argon2: at most `permits` verifications run at once, each on the
/// blocking pool holding its permit until it is done, so a flood costs at
/// most `permits` × 19 MiB however many requests wait.
#[derive(Debug)]
pub struct PasswordChecks {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// How long a check waits for a permit before 503.
    wait: std::time::Duration,
    runs: std::sync::atomic::AtomicU64,
    cache_hits: std::sync::atomic::AtomicU64,
    busy: std::sync::atomic::AtomicU64,
    cache: dashmap::DashMap<[u8; 32], Cached>,
    /// Per-process key of the cache's hash: a memory dump of the cache is
    /// no offline oracle for the passwords.
    key: [u8; 32],
}

impl PasswordChecks {
    /// `permits` checks at once (0 = one per core), each waiting at most `wait` for its turn.
    pub fn new(permits: usize, wait: std::time::Duration) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let permits = if permits == 0 { cores } else { permits };
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(permits)),
            wait,
            runs: Default::default(),
            cache_hits: Default::default(),
            busy: Default::default(),
            cache: Default::default(),
            key: super::secret::random_bytes::<32>(),
        }
    }

    /// argon2 verifications run so far (each, including dummy-hash ones for unknown users).
    pub fn verifications(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests answered from the cache of successful verifications.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks refused with 503 because every permit stayed busy.
    pub fn refused_busy(&self) -> u64 {
        self.busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Verifies `password` against `stored` (or the dummy hash) under the
    /// semaphore; 503 + `Retry-After` when no permit frees up in time.
    pub async fn verify(&self, password: &str, stored: Option<&str>) -> Result<bool, ApiError> {
        let permit = match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                self.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ApiError::new(ErrorKey::ServiceUnavailable, "too many password checks at once; retry")
                    .with("retry_after", 1));
            }
        };
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let password = password.to_owned();
        let stored = stored.map(str::to_owned);
        // argon2 is deliberately slow: keep it off the async workers. The
        // permit moves into the task, so a caller that goes away does not
        // free it while the hash is still being computed.
        tokio::task::spawn_blocking(move || {
            let ok = verify_password(&password, stored.as_deref());
            drop(permit);
            ok
        })
        .await
        .map_err(ApiError::internal)
    }

    fn cache_key(&self, username: &str, password: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.key);
        h.update((username.len() as u64).to_le_bytes());
        h.update(username.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// The password hash a still-fresh successful check of exactly these
    /// credentials was made against, if any.
    pub fn cached(&self, username: &str, password: &str, now: i64) -> Option<String> {
        let key = self.cache_key(username, password);
        let hit = self.cache.get(&key).and_then(|c| (c.expires_at > now).then(|| c.password_hash.clone()));
        if hit.is_none() {
            self.cache.remove_if(&key, |_, c| c.expires_at <= now);
        }
        hit
    }

    /// Counts a request answered from the cache.
    pub fn hit(&self) {
        self.cache_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Remembers a successful check for [`CACHE_TTL_MS`].
    pub fn remember(&self, username: &str, password: &str, password_hash: &str, now: i64) {
        if self.cache.len() >= MAX_CACHED {
            self.cache.retain(|_, c| c.expires_at > now);
            if self.cache.len() >= MAX_CACHED {
                return;
            }
        }
        let entry = Cached {
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            expires_at: now + CACHE_TTL_MS,
        };
        self.cache.insert(self.cache_key(username, password), entry);
    }

    /// Forgets the remembered credentials of one user; called whenever a
    /// password changes, so the old one stops working at once.
    pub fn invalidate_user(&self, username: &str) {
        self.cache.retain(|_, c| c.username != username);
    }

    /// Forgets a cache entry that no longer matches the stored hash.
    pub fn forget(&self, username: &str, password: &str) {
        self.cache.remove(&self.cache_key(username, password));
    }

    /// Drops expired entries (the sweeper calls this with the limiter pruning).
    pub fn prune(&self, now: i64) {
        self.cache.retain(|_, c| c.expires_at > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_right_password_and_never_for_unknown_users() {
        let h = hash_password("s3cret");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password("s3cret", Some(&h)));
        assert!(!verify_password("wrong", Some(&h)));
        assert!(!verify_password("tether-dummy-password", None));
    }

    #[test]
    fn the_cache_answers_only_the_same_fresh_credentials_and_forgets_on_invalidate() {
        let checks = PasswordChecks::new(1, std::time::Duration::from_millis(100));
        checks.remember("alice", "right-password", "$hash", 0);
        assert_eq!(checks.cached("alice", "right-password", 1).as_deref(), Some("$hash"));
        assert_eq!(checks.cached("alice", "wrong-password", 1), None);
        assert_eq!(checks.cached("alic", "eright-password", 1), None, "the split between name and password counts");
        assert_eq!(checks.cached("alice", "right-password", CACHE_TTL_MS), None, "expired");
        checks.remember("alice", "right-password", "$hash", 0);
        checks.remember("bob", "bobs-password", "$hash2", 0);
        checks.invalidate_user("alice");
        assert_eq!(checks.cached("alice", "right-password", 1), None);
        assert_eq!(checks.cached("bob", "bobs-password", 1).as_deref(), Some("$hash2"));
    }

    #[tokio::test]
    async fn verifications_are_counted_and_wait_for_a_permit() {
        let checks = PasswordChecks::new(1, std::time::Duration::from_millis(100));
        let h = hash_password("s3cret");
        assert!(checks.verify("s3cret", Some(&h)).await.expect("verify"));
        assert!(!checks.verify("nope", None).await.expect("verify"));
        assert_eq!(checks.verifications(), 2);
        let held = checks.permits.clone().acquire_owned().await.expect("permit");
        let err = checks.verify("s3cret", Some(&h)).await.expect_err("no permit");
        assert_eq!(err.key, ErrorKey::ServiceUnavailable);
        assert_eq!(err.params["retry_after"], 1);
        assert_eq!(checks.verifications(), 2, "a refused check runs no argon2");
        drop(held);
    }
}
