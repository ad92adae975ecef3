//! Secrets: generation, hashing at rest and constant-time comparison.
//!
//! Every secret tether issues is 256 bits of randomness, so a single SHA-256
//! is a sufficient at-rest hash (no stretching needed, unlike passwords) and
//! lookups can be by hash.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of personal/admin API tokens (`Authorization: Bearer tth_…`).
pub const API_TOKEN_PREFIX: &str = "tth_";
/// Prefix of enrollment tokens.
pub const ENROLL_TOKEN_PREFIX: &str = "tte_";
/// Prefix of agent refresh tokens.
pub const REFRESH_TOKEN_PREFIX: &str = "ttr_";
/// Prefix of long-lived agent keys (printer-fleet agents, protocol.md §16.5).
pub const AGENT_KEY_PREFIX: &str = "tta_";

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// A new secret: prefix + base64url of 32 random bytes.
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A printable random password for bootstrap users.
pub fn new_password() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<18>())
}
