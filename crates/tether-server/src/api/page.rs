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

/// An optional time parameter: RFC 3339 or milliseconds since the epoch;
/// 400 naming it when malformed.
pub fn parse_time(field: &'static str, value: Option<&str>) -> ApiResult<Option<i64>> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .or_else(|| {
                    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                        .ok()
                        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                })
                .ok_or_else(|| ApiError::bad_request(field, format!("{field} must be an RFC 3339 time or epoch ms")))
        })
        .transpose()
}
