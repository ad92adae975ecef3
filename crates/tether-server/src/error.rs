//! The one place where failures become HTTP responses: [`ApiError`] carries
//! a SPEC §2 error key, and the `envelope` middleware renders every error
//! response (from handlers, extractors, the router or body limits) as the
//! JSON envelope with the request id.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tether_proto::{ErrorBody, ErrorEnvelope, ErrorKey};
use tether_store::StoreError;

/// A failure answered with the error envelope.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub key: ErrorKey,
    pub what: String,
    pub params: Map<String, Value>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(key: ErrorKey, what: impl Into<String>) -> Self {
        Self {
            key,
            what: what.into(),
            params: Map::new(),
        }
    }

    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.params.insert(name.to_owned(), value.into());
        self
    }

    pub fn bad_request(field: &str, what: impl Into<String>) -> Self {
        Self::new(ErrorKey::BadRequest, what).with("field", field)
    }

    pub fn unauthenticated() -> Self {
        Self::new(ErrorKey::Unauthenticated, "missing or invalid credentials")
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorKey::NotFound, format!("{what} not found"))
    }

    pub fn forbidden() -> Self {
        Self::new(ErrorKey::Forbidden, "your role does not allow this")
    }

    pub fn conflict(what: impl Into<String>) -> Self {
        Self::new(ErrorKey::Conflict, what)
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        // Details stay in the server log; the client gets the request id.
        tracing::error!(error = %err, "Request failed");
        Self::new(ErrorKey::ServerError, "internal server error")
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => Self::new(ErrorKey::NotFound, "not found"),
            StoreError::Conflict(what) => Self::conflict(what),
            StoreError::Invalid { field, message } => {
                Self::bad_request(field, format!("invalid {field}: {message}"))
            }
            other => Self::internal(other),
        }
    }
}

/// Marker left on a response by [`ApiError`] so the middleware can render it.
#[derive(Debug, Clone)]
struct PendingError(ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.key.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = status.into_response();
        if let Some(retry) = self.params.get("retry_after").and_then(Value::as_u64) {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        }
        res.extensions_mut().insert(PendingError(self));
        res
    }
}

/// Marks an error response that already has its own standard body (the
/// RFC 6749 errors of `/oauth/*`), which the envelope must leave alone.
#[derive(Debug, Clone, Copy)]
pub struct OwnErrorFormat;

/// The request id of the current request (echoed or generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn well_formed_request_id(v: &str) -> bool {
    (8..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Outermost middleware: assigns the request id, and turns every error
/// response into the SPEC §2 envelope.
pub async fn envelope(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| well_formed_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::now_v7().simple()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut res = tracing::Instrument::instrument(next.run(req), span).await;
    let status = res.status();
    let pending = res.extensions_mut().remove::<PendingError>();
    let own_format = res.extensions().get::<OwnErrorFormat>().is_some();
    if (status.is_client_error() || status.is_server_error()) && !own_format {
        // Errors raised below the handlers (router 404/405, body limits,
        // decompression, panics) arrive bare: give them the generic envelope.
        let err = pending.map(|p| p.0).unwrap_or_else(|| {
            let key = ErrorKey::from_status(status.as_u16());
            ApiError::new(
                key,
                status.canonical_reason().unwrap_or("error").to_lowercase(),
            )
        });
        let mut params = err.params;
        if err.key == ErrorKey::ServerError {
            params.insert("request_id".into(), json!(id));
        }
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: err.key.code(),
                key: err.key.as_str().to_owned(),
                what: err.what,
                params,
                request_id: id.clone(),
            },
        };
        let headers = std::mem::take(res.headers_mut());
        res = (status, axum::Json(body)).into_response();
        for (name, value) in headers.iter() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                res.headers_mut().insert(name.clone(), value.clone());
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// `Json` whose rejections become envelope errors (400/413/415).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorKey::UnsupportedMediaType,
            "expected Content-Type: application/json",
        ),
        JsonRejection::JsonDataError(e) => ApiError::new(ErrorKey::BadRequest, e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(ErrorKey::BadRequest, e.body_text()),
        other => {
            let status = other.status();
            let key = ErrorKey::from_status(status.as_u16());
            let mut err = ApiError::new(key, other.body_text().to_lowercase());
            if key == ErrorKey::PayloadTooLarge {
                err.what = "request body is too large".into();
            }
            err
        }
    }
}

/// `Query` whose rejections become 400 envelopes naming the problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::new(ErrorKey::BadRequest, e.body_text()))
            }
            Err(other) => Err(ApiError::new(ErrorKey::BadRequest, other.body_text())),
        }
    }
}

/// A path id parsed with its type's checked parser; malformed ids are 400.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|e| ApiError::bad_request("path", e.body_text()))
    }
}
