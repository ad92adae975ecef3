//! The stream cursor `<epoch>-<seq>` (protocol.md §4). Opaque to agents; the server
//! parses it to decide between "nothing new", "signals after seq" and
//! CURSOR_EXPIRED.

use std::fmt;
use std::str::FromStr;

/// A position in one agent's signal stream: everything up to and including
/// `seq` of stream generation `epoch` has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor must look like <epoch>-<seq>")]
pub struct BadCursor;

impl Cursor {
    /// Parses a cursor from a query value or an `If-None-Match` header value
    /// (quoted or bare, optionally weak).
    pub fn parse_etag(value: &str) -> Result<Self, BadCursor> {
        let v = value.trim();
        let v = v.strip_prefix("W/").unwrap_or(v);
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        v.parse()
    }

    /// The quoted form used in `ETag` headers.
    pub fn etag(&self) -> String {
        format!("\"{self}\"")
    }
}

impl FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, seq) = s.split_once('-').ok_or(BadCursor)?;
        let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(epoch) || !digits(seq) {
            return Err(BadCursor);
        }
        Ok(Self { epoch: epoch.parse().map_err(|_| BadCursor)?, seq: seq.parse().map_err(|_| BadCursor)? })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bare_quoted_and_weak_forms() {
        let c = Cursor { epoch: 1736900000, seq: 5 };
        assert_eq!("1736900000-5".parse::<Cursor>(), Ok(c));
        assert_eq!(Cursor::parse_etag("\"1736900000-5\""), Ok(c));
        assert_eq!(Cursor::parse_etag("W/\"1736900000-5\""), Ok(c));
        assert_eq!(c.etag(), "\"1736900000-5\"");
    }

    #[test]
    fn rejects_malformed_cursors() {
        for bad in ["", "-", "1-", "-1", "a-1", "1-b", "1-2-3", "1 -2", "+1-2", "99999999999999999999999-1"] {
            assert_eq!(bad.parse::<Cursor>(), Err(BadCursor), "{bad:?}");
        }
    }
}
