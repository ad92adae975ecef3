//! Agent access tokens: HS256 JWTs with a fixed algorithm allow-list and
//! every registered claim checked (protocol.md §3).

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tether_proto::AgentId;

pub const ISSUER: &str = "tether";
pub const AUDIENCE: &str = "tether-agent";
pub const ACCESS_TOKEN_TTL_S: u64 = 15 * 60;
const LEEWAY_S: u64 = 60;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: AgentId,
    /// Same as `sub` (certificate-agent clients call the agent a device, protocol.md §16.4).
    pub device_id: AgentId,
    pub typ: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    Expired { expired_at: u64 },
    Invalid,
}

/// Most verified tokens remembered at once (about 100 bytes each): past
/// it, expired entries are swept, and while none can go, new tokens are
/// verified without being remembered.
const MAX_REMEMBERED: usize = 200_000;

/// Signs and verifies agent access tokens with the server's HS256 key.
///
/// Every agent request carries its access token, and decoding one (base64,
/// an HMAC, JSON claims, the registered-claim checks) costs more than the
/// rest of an idle poll: a token that verified once is remembered until it
/// expires, keyed by its SHA-256, so an agent's later requests skip the
/// decoding. The cache holds only what the token itself proves (agent,
/// issue and expiry time); revocation is checked on every request apart
/// from it (`AgentCaller`), which also drops a token of a revoked or deleted
/// agent ([`AccessTokens::forget`]) the first time it is refused.
pub struct AccessTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    verified: dashmap::DashMap<[u8; 32], Verified>,
}

/// What a verified token proved.
#[derive(Debug, Clone, Copy)]
struct Verified {
    agent: AgentId,
    issued_at: u64,
    expires_at: u64,
}

impl std::fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessTokens(<key redacted>)")
    }
}

impl AccessTokens {
    pub fn new(secret: &[u8; 32]) -> Self {
        // Only HS256: a token naming any other `alg` (including `none`) fails.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "iat"]);
        validation.leeway = LEEWAY_S;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            verified: Default::default(),
        }
    }

    pub fn issue(&self, agent_id: AgentId, now_s: u64) -> String {
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: agent_id,
            device_id: agent_id,
            typ: "agent".into(),
            exp: now_s + ACCESS_TOKEN_TTL_S,
            iat: now_s,
            jti: uuid::Uuid::now_v7().simple().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<AgentId, TokenError> {
        self.verify_issued(token).map(|(id, _)| id)
    }

    /// The agent and the token's `iat` (seconds), for the per-agent
    /// `tokens_valid_after` check.
    pub fn verify_issued(&self, token: &str) -> Result<(AgentId, u64), TokenError> {
        let key = Self::key(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(v) = self.verified.get(&key).map(|v| *v) {
            // The same bound as the full check: valid until `exp` + leeway.
            if now <= v.expires_at.saturating_add(LEEWAY_S) {
                return Ok((v.agent, v.issued_at));
            }
            self.verified.remove(&key);
        }
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) if data.claims.typ == "agent" && data.claims.device_id == data.claims.sub => {
                let claims = data.claims;
                self.remember(key, Verified { agent: claims.sub, issued_at: claims.iat, expires_at: claims.exp }, now);
                Ok((claims.sub, claims.iat))
            }
            Ok(_) => Err(TokenError::Invalid),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                // The signature was checked before expiry, so the claims are genuine.
                let exp = jsonwebtoken::dangerous::insecure_decode::<Claims>(token).map(|d| d.claims.exp).unwrap_or(0);
                Err(TokenError::Expired { expired_at: exp })
            }
            Err(_) => Err(TokenError::Invalid),
        }
    }

    fn remember(&self, key: [u8; 32], verified: Verified, now: u64) {
        if self.verified.len() >= MAX_REMEMBERED {
            self.verified.retain(|_, v| now <= v.expires_at.saturating_add(LEEWAY_S));
            if self.verified.len() >= MAX_REMEMBERED {
                return;
            }
        }
        self.verified.insert(key, verified);
    }

    /// Forgets `token` (its agent was revoked or deleted).
    pub fn forget(&self, token: &str) {
        self.verified.remove(&Self::key(token));
    }

    /// The cache key: a token's SHA-256 (a digest compares in no time that
    /// depends on the secret).
    fn key(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    /// Tokens remembered now.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.verified.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn issued_tokens_verify_and_foreign_ones_do_not() {
        let tokens = AccessTokens::new(&[7; 32]);
        let id = AgentId::new();
        assert_eq!(tokens.verify(&tokens.issue(id, now())), Ok(id));
        let other = AccessTokens::new(&[8; 32]);
        assert_eq!(other.verify(&tokens.issue(id, now())), Err(TokenError::Invalid));
        assert_eq!(tokens.verify("not.a.jwt"), Err(TokenError::Invalid));
    }

    #[test]
    fn expiry_is_reported_after_the_leeway() {
        let tokens = AccessTokens::new(&[7; 32]);
        let issued = now() - ACCESS_TOKEN_TTL_S - LEEWAY_S - 5;
        let err = tokens.verify(&tokens.issue(AgentId::new(), issued));
        assert_eq!(err, Err(TokenError::Expired { expired_at: issued + ACCESS_TOKEN_TTL_S }));
        let within_leeway = now() - ACCESS_TOKEN_TTL_S - 10;
        assert!(tokens.verify(&tokens.issue(AgentId::new(), within_leeway)).is_ok());
    }

    #[test]
    fn a_verified_token_is_remembered_until_forgotten() {
        let tokens = AccessTokens::new(&[7; 32]);
        let (a, b) = (AgentId::new(), AgentId::new());
        let (ta, tb) = (tokens.issue(a, now()), tokens.issue(b, now()));
        assert_eq!(tokens.verify(&ta), Ok(a));
        assert_eq!(tokens.verify(&tb), Ok(b));
        assert_eq!(tokens.remembered(), 2);
        // Answered from memory: the same agent and issue time.
        assert_eq!(tokens.verify_issued(&ta).map(|(id, _)| id), Ok(a));
        // A forged token reusing a remembered one's signature is decoded, and refused.
        let (_, sig) = ta.rsplit_once('.').unwrap();
        let (head, _) = tb.rsplit_once('.').unwrap();
        assert_eq!(tokens.verify(&format!("{head}.{sig}")), Err(TokenError::Invalid));
        tokens.forget(&ta);
        assert_eq!(tokens.remembered(), 1);
        assert_eq!(tokens.verify(&ta), Ok(a));
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let tokens = AccessTokens::new(&[7; 32]);
        let id = AgentId::new();
        let issued = now() - ACCESS_TOKEN_TTL_S - LEEWAY_S - 5;
        let token = tokens.issue(id, issued);
        // As if it had been verified while fresh.
        let key = AccessTokens::key(&token);
        let expires_at = issued + ACCESS_TOKEN_TTL_S;
        tokens.verified.insert(key, Verified { agent: id, issued_at: issued, expires_at });
        assert_eq!(tokens.verify(&token), Err(TokenError::Expired { expired_at: expires_at }));
        assert_eq!(tokens.remembered(), 0);
    }
}
