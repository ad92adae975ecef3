//! Optional agent request signing (protocol.md §3): the header names, the clock
//! window and the exact bytes an agent signs with its Ed25519 key. Shared by
//! the client (which signs) and the server (which verifies) so the two can
//! never disagree on the format.
//!
//! Encodings, exactly:
//! - `X-Tether-Timestamp`: Unix time in whole seconds, ASCII decimal digits.
//! - `X-Tether-Nonce`: 16–64 characters of the base64url alphabet
//!   (`A-Z a-z 0-9 - _`); tether agents send 128 random bits as 32 lowercase
//!   hex characters.
//! - `X-Tether-Signature`: base64url without padding of the 64-byte Ed25519
//!   signature over [`signing_input`].
//! - The body digest is lowercase hex SHA-256 of the body bytes exactly as
//!   sent on the wire (after any `Content-Encoding`); an empty body hashes to
//!   `e3b0c442…b855`.

/// Header carrying the signing time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-tether-timestamp";
/// Header carrying the single-use nonce.
pub const NONCE_HEADER: &str = "x-tether-nonce";
/// Header carrying the Ed25519 signature (base64url, no padding).
pub const SIGNATURE_HEADER: &str = "x-tether-signature";

/// A signed request is accepted while the server's clock is within this many
/// seconds of its timestamp, either way; its nonce is remembered as long.
pub const WINDOW_S: u64 = 300;

/// Requests whose path starts with this are agent routes, the ones a signing
/// agent signs (enrollment and token refresh happen before or outside the
/// agent's identity and are never signed).
pub const AGENT_ROUTES_PREFIX: &str = "/api/v1/agents/self/";

pub const NONCE_MIN_LEN: usize = 16;
pub const NONCE_MAX_LEN: usize = 64;

/// Whether `nonce` has the shape the server accepts.
pub fn valid_nonce(nonce: &str) -> bool {
    (NONCE_MIN_LEN..=NONCE_MAX_LEN).contains(&nonce.len())
        && nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The bytes that are signed:
/// `METHOD\npath?query\ntimestamp\nnonce\nsha256(body) hex`, no trailing
/// newline. `path_and_query` is the request target exactly as sent (the `?`
/// only when the URL has one), so any rewrite of path or query breaks it.
pub fn signing_input(method: &str, path_and_query: &str, timestamp: u64, nonce: &str, body_sha256_hex: &str) -> String {
    format!("{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body_sha256_hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_input_is_the_five_lines_of_spec_3() {
        let input =
            signing_input("POST", "/api/v1/agents/self/heartbeat?x=1", 1_700_000_000, "n0nce-n0nce-n0nce", "ab12");
        assert_eq!(input, "POST\n/api/v1/agents/self/heartbeat?x=1\n1700000000\nn0nce-n0nce-n0nce\nab12");
    }

    #[test]
    fn nonces_must_be_16_to_64_base64url_chars() {
        assert!(valid_nonce(&"a".repeat(16)));
        assert!(valid_nonce(&"Z9-_".repeat(16)));
        assert!(!valid_nonce(&"a".repeat(15)));
        assert!(!valid_nonce(&"a".repeat(65)));
        assert!(!valid_nonce("aaaaaaaaaaaaaaa\n"));
        assert!(!valid_nonce("aaaaaaaaaaaaaa=="));
    }
}
