//! The error envelope and status table of protocol.md §2, shared by server and clients.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Every error the API can answer with. The status, numeric code and key are
/// fixed by protocol.md §2; `ErrorKey::from_key` lets clients match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKey {
    BadRequest,
    Unauthenticated,
    TokenExpired,
    DeviceRevoked,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    CursorExpired,
    Conflict,
    PreconditionRequired,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    ServerError,
    ServiceUnavailable,
}

impl ErrorKey {
    const ALL: [ErrorKey; 15] = [
        Self::BadRequest,
        Self::Unauthenticated,
        Self::TokenExpired,
        Self::DeviceRevoked,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::CursorExpired,
        Self::Conflict,
        Self::PreconditionRequired,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::RateLimited,
        Self::ServerError,
        Self::ServiceUnavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthenticated | Self::TokenExpired => 401,
            Self::DeviceRevoked | Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::CursorExpired | Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::PreconditionRequired => 428,
            Self::RateLimited => 429,
            Self::ServerError => 500,
            Self::ServiceUnavailable => 503,
        }
    }

    pub fn code(self) -> u32 {
        match self {
            Self::BadRequest => 4000,
            Self::Unauthenticated => 4010,
            Self::TokenExpired => 4001,
            Self::DeviceRevoked => 4003,
            Self::Forbidden => 4030,
            Self::NotFound => 4040,
            Self::MethodNotAllowed => 4050,
            Self::CursorExpired => 40901,
            Self::Conflict => 40902,
            Self::PreconditionRequired => 4280,
            Self::PayloadTooLarge => 4130,
            Self::UnsupportedMediaType => 4150,
            Self::RateLimited => 4029,
            Self::ServerError => 5000,
            Self::ServiceUnavailable => 5003,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BAD_REQUEST",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::DeviceRevoked => "DEVICE_REVOKED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::CursorExpired => "CURSOR_EXPIRED",
            Self::Conflict => "CONFLICT",
            Self::PreconditionRequired => "PRECONDITION_REQUIRED",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::RateLimited => "RATE_LIMITED",
            Self::ServerError => "SERVER_ERROR",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == key)
    }

    /// The generic key for a bare HTTP status (used for errors raised below
    /// the handlers, e.g. by the router or body limits).
    pub fn from_status(status: u16) -> Self {
        match status {
            400 => Self::BadRequest,
            401 => Self::Unauthenticated,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::Conflict,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedMediaType,
            428 => Self::PreconditionRequired,
            429 => Self::RateLimited,
            503 => Self::ServiceUnavailable,
            s if (400..500).contains(&s) => Self::BadRequest,
            _ => Self::ServerError,
        }
    }
}

/// `{"error": {…}}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: u32,
    pub key: String,
    pub what: String,
    #[serde(default)]
    pub params: Map<String, Value>,
    #[serde(default)]
    pub request_id: String,
}

impl ErrorBody {
    pub fn key(&self) -> Option<ErrorKey> {
        ErrorKey::from_key(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips_and_matches_the_spec_table() {
        for key in ErrorKey::ALL {
            assert_eq!(ErrorKey::from_key(key.as_str()), Some(key));
        }
        assert_eq!((ErrorKey::TokenExpired.status(), ErrorKey::TokenExpired.code()), (401, 4001));
        assert_eq!((ErrorKey::CursorExpired.status(), ErrorKey::CursorExpired.code()), (409, 40901));
        assert_eq!((ErrorKey::RateLimited.status(), ErrorKey::RateLimited.code()), (429, 4029));
        assert_eq!(ErrorKey::from_status(413), ErrorKey::PayloadTooLarge);
    }
}
