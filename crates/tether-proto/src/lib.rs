//! Wire types shared by every tether component: requests, responses, signals,
//! error codes, cursors and ids. Pure data and parsing; no I/O.

pub mod agent;
pub mod certs;
pub mod command;
pub mod config;
pub mod cursor;
pub mod error;
pub mod files;
pub mod ids;
pub mod signal;
pub mod signing;
pub mod telemetry;
pub mod user;
pub mod ws;

pub use cursor::Cursor;
pub use error::{ErrorBody, ErrorEnvelope, ErrorKey};
pub use ids::{AgentId, BatchId, CommandId};
pub use signal::Signal;

use serde::{Deserialize, Serialize};

/// `{"data": …}`: every successful single-object response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Data<T> {
    pub data: T,
}

/// `{"data": […], "next_cursor": …}`: every list response (keyset pagination).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Default and maximum page sizes for operator lists (protocol.md §2).
pub const DEFAULT_PAGE_LIMIT: u32 = 50;
pub const MAX_PAGE_LIMIT: u32 = 500;

/// Cuts `s` to at most `max` bytes on a char boundary; true when it cut.
pub fn cap_utf8(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    s.truncate(s.floor_char_boundary(max));
    true
}

/// Label maps are ordered so hashes and listings are deterministic.
pub type Labels = std::collections::BTreeMap<String, String>;

/// RFC 3339 timestamps on the wire, `null` when not reached yet.
pub type Timestamp = time::OffsetDateTime;
