//! Query helpers every list handler shares: page sizes and optional,
//! parsed query parameters (protocol.md §2).

use tether_proto::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};

use crate::error::{ApiError, ApiResult};

/// The page size asked for, or the default; 400 outside 1..=500.
pub fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request("limit", format!("limit must be 1..={MAX_PAGE_LIMIT}")));
    }
    Ok(limit)
}

/// An optional query parameter, parsed; 400 naming it when malformed.
pub fn parse_param<T: std::str::FromStr>(field: &'static str, value: Option<&str>) -> ApiResult<Option<T>> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().map_err(|_| ApiError::bad_request(field, format!("{field} is malformed"))))
        .transpose()
}
