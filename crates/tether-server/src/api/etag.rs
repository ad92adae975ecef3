//! Entity tags (protocol.md §2): quoted on the way out, quoted or bare on
//! the way in, for conditional reads (`If-None-Match`) and writes (`If-Match`).

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};

use crate::error::{ApiError, ApiResult};

/// The `If-None-Match` value, extracted alone: a parked poll should not hold
/// a copy of every request header.
#[derive(Debug)]
pub struct IfNoneMatch(pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_owned)))
    }
}

/// The tag inside `"…"` (or `W/"…"`), or the bare value.
pub fn unquote(value: &str) -> &str {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

/// `"tag"`, for an `ETag` header.
pub fn quoted(tag: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{tag}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

impl IfNoneMatch {
    /// Whether the client already has `tag`.
    pub fn matches(&self, tag: &str) -> bool {
        self.0.as_deref().is_some_and(|v| v.split(',').any(|t| unquote(t) == tag || t.trim() == "*"))
    }
}

/// The version an `If-Match` header names (quoted or bare), if any.
pub fn if_match_version(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().map_err(|_| ApiError::bad_request("If-Match", "If-Match must be text"))?;
    unquote(text)
        .parse()
        .map(Some)
        .map_err(|_| ApiError::bad_request("If-Match", "If-Match names the version replaced, e.g. \"3\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_read_quoted_or_bare() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("W/\"abc\""), "abc");
        assert_eq!(unquote(" abc "), "abc");
        let sent = IfNoneMatch(Some("\"x\", \"abc\"".into()));
        assert!(sent.matches("abc") && !sent.matches("y"));
        let mut headers = HeaderMap::new();
        assert_eq!(if_match_version(&headers).expect("none"), None);
        headers.insert(header::IF_MATCH, HeaderValue::from_static("\"3\""));
        assert_eq!(if_match_version(&headers).expect("quoted"), Some(3));
        headers.insert(header::IF_MATCH, HeaderValue::from_static("three"));
        assert!(if_match_version(&headers).is_err());
    }
}
