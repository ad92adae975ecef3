//! Request signing with the agent's Ed25519 key (protocol.md §3). The format lives
//! in [`tether_proto::signing`]; this module computes the three headers.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tether_proto::signing::signing_input;

/// The values of `X-Tether-Timestamp`, `X-Tether-Nonce` and `X-Tether-Signature`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
}

/// Lowercase hex SHA-256 of `body`, as the signing input carries it.
pub fn body_digest_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// 128 random bits as 32 lowercase hex characters: never repeats in practice,
/// so the server's replay check only ever catches real replays.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Signs one request. `path_and_query` must be the request target exactly as
/// it will be sent, `body` the body bytes exactly as sent.
pub fn sign(
    key: &SigningKey,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    timestamp: u64,
    nonce: &str,
) -> SignatureHeaders {
    let input = signing_input(method, path_and_query, timestamp, nonce, &body_digest_hex(body));
    let signature = key.sign(input.as_bytes());
    SignatureHeaders {
        timestamp: timestamp.to_string(),
        nonce: nonce.to_owned(),
        signature: URL_SAFE_NO_PAD.encode(signature.to_bytes()),
    }
}

/// The request target of `url` as reqwest sends it: path, then `?query` when
/// the URL has a query (even an empty one).
pub fn path_and_query(url: &url::Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

/// Adds the signature headers to a built request, signed now with a fresh nonce.
pub fn sign_request(key: &SigningKey, req: &mut reqwest::Request) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    // Agent bodies are serialized JSON, always buffered; a streaming body
    // cannot be hashed up front and is signed as empty (the server will refuse it).
    let body = req.body().and_then(reqwest::Body::as_bytes).unwrap_or_default();
    let headers = sign(key, req.method().as_str(), &path_and_query(req.url()), body, now, &new_nonce());
    let map = req.headers_mut();
    for (name, value) in [
        (tether_proto::signing::TIMESTAMP_HEADER, headers.timestamp),
        (tether_proto::signing::NONCE_HEADER, headers.nonce),
        (tether_proto::signing::SIGNATURE_HEADER, headers.signature),
    ] {
        map.insert(
            name,
            reqwest::header::HeaderValue::from_str(&value).expect("digits and base64url are valid header values"),
        );
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signature, Verifier};

    use super::*;

    #[test]
    fn signature_verifies_over_the_spec_input_and_nothing_else() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let h = sign(
            &key,
            "POST",
            "/api/v1/agents/self/heartbeat",
            b"{}",
            1_700_000_000,
            "00112233445566778899aabbccddeeff",
        );
        assert_eq!(h.timestamp, "1700000000");
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(&h.signature).expect("base64url")).expect("64 bytes");
        let digest = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        assert_eq!(body_digest_hex(b"{}"), digest);
        let input =
            format!("POST\n/api/v1/agents/self/heartbeat\n1700000000\n00112233445566778899aabbccddeeff\n{digest}");
        key.verifying_key().verify_strict(input.as_bytes(), &sig).expect("signed input");
        assert!(key.verifying_key().verify(input.replace("POST", "GET").as_bytes(), &sig).is_err());
    }

    #[test]
    fn nonces_are_128_bit_hex_and_the_target_keeps_the_query() {
        let n = new_nonce();
        assert_eq!(n.len(), 32);
        assert!(tether_proto::signing::valid_nonce(&n));
        assert_ne!(n, new_nonce());
        let url = url::Url::parse("http://h:1/api/v1/agents/self/updates?limit=20&wait=0").expect("url");
        assert_eq!(path_and_query(&url), "/api/v1/agents/self/updates?limit=20&wait=0");
        let url = url::Url::parse("http://h:1/api/v1/agents/self/heartbeat").expect("url");
        assert_eq!(path_and_query(&url), "/api/v1/agents/self/heartbeat");
    }
}
