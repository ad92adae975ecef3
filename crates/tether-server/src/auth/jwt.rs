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

/// Signs and verifies agent access tokens with the server's HS256 key.
pub struct AccessTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
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
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) if data.claims.typ == "agent" && data.claims.device_id == data.claims.sub => {
                Ok((data.claims.sub, data.claims.iat))
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
}
