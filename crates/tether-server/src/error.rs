//! The one place where failures become HTTP responses: [`ApiError`] carries
//! a protocol.md §2 error key, and the `envelope` middleware renders every error
//! response (from handlers, extractors, the router or body limits) as the
//! JSON envelope with the request id.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header};
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

/// How long clients are asked to wait when the database is unavailable.
pub const STORE_RETRY_AFTER_S: u64 = 5;

impl ApiError {
    pub fn new(key: ErrorKey, what: impl Into<String>) -> Self {
        Self { key, what: what.into(), params: Map::new() }
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

    /// 503 with `Retry-After` (protocol.md §2): nothing was done, try again later.
    pub fn unavailable(what: impl Into<String>, retry_after_s: u64) -> Self {
        Self::new(ErrorKey::ServiceUnavailable, what).with("retry_after", retry_after_s)
    }

    /// The `error` object of the envelope (also sent in WebSocket replies).
    pub fn into_body(self, request_id: String) -> ErrorBody {
        let mut params = self.params;
        if self.key == ErrorKey::ServerError {
            params.insert("request_id".into(), json!(request_id));
        }
        ErrorBody { code: self.key.code(), key: self.key.as_str().to_owned(), what: self.what, params, request_id }
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
            StoreError::NotFound(entity) => Self::not_found(entity.name()),
            StoreError::Conflict(what) => Self::conflict(what),
            StoreError::PreconditionRequired(what) => Self::new(ErrorKey::PreconditionRequired, what),
            StoreError::Invalid { field, message } => Self::bad_request(field, format!("invalid {field}: {message}")),
            StoreError::Unavailable(e) => {
                // Nothing was written; the client may retry (protocol.md §2: 503 + Retry-After).
                tracing::warn!(error = %e, "Store unavailable");
                Self::unavailable("the database is unavailable; try again shortly", STORE_RETRY_AFTER_S)
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
        let status = StatusCode::from_u16(self.key.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = status.into_response();
        if let Some(retry) = self.params.get("retry_after").and_then(Value::as_u64) {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry));
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
    (8..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Outermost layer: assigns the request id and turns every error response
/// into the protocol.md §2 envelope. A plain `Service` (not `from_fn`) so a parked
/// long-poll carries no extra boxed future (see docs/benchmarks.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvelopeLayer;

impl<S> tower::Layer<S> for EnvelopeLayer {
    type Service = Envelope<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Envelope { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Envelope<S> {
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for Envelope<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = EnvelopeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| well_formed_request_id(v))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("req_{}", uuid::Uuid::now_v7().simple()));
        req.extensions_mut().insert(RequestId(id.clone()));
        EnvelopeFuture { inner: self.inner.call(req), id: Some(id) }
    }
}

pin_project_lite::pin_project! {
    /// Finishes a response: envelope for errors, `X-Request-Id` always.
    pub struct EnvelopeFuture<F> {
        #[pin]
        inner: F,
        id: Option<String>,
    }
}

impl<F, E> std::future::Future for EnvelopeFuture<F>
where
    F: std::future::Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        std::task::Poll::Ready(Ok(finish(res, this.id.take())))
    }
}

fn finish(mut res: Response, id: Option<String>) -> Response {
    let status = res.status();
    let pending = res.extensions_mut().remove::<PendingError>();
    let own_format = res.extensions().get::<OwnErrorFormat>().is_some();
    if (status.is_client_error() || status.is_server_error()) && !own_format {
        // Errors raised below the handlers (router 404/405, body limits,
        // panics) arrive bare: give them the generic envelope.
        let err = pending.map(|p| p.0).unwrap_or_else(|| {
            let key = ErrorKey::from_status(status.as_u16());
            ApiError::new(key, status.canonical_reason().unwrap_or("error").to_lowercase())
        });
        let body = ErrorEnvelope { error: err.into_body(id.clone().unwrap_or_default()) };
        let headers = std::mem::take(res.headers_mut());
        res = (status, axum::Json(body)).into_response();
        for (name, value) in headers.iter() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                res.headers_mut().insert(name.clone(), value.clone());
            }
        }
    }
    if let Some(v) = id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Decodes a JSON request body: checks the media type, undoes
/// `Content-Encoding: gzip` under the same size cap as plain bodies, and
/// names the offending field on errors.
pub fn decode_json<T: serde::de::DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: &[u8],
    limit: usize,
) -> Result<T, ApiError> {
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let mime = ctype.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json")) {
        return Err(ApiError::new(ErrorKey::UnsupportedMediaType, "expected Content-Type: application/json"));
    }
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let inflated;
    let bytes = match encoding.trim().to_ascii_lowercase().as_str() {
        "identity" | "" => body,
        "gzip" | "x-gzip" => {
            use std::io::Read;
            let mut out = Vec::new();
            // Read one byte past the cap to tell "at the cap" from "over it".
            flate2::read::GzDecoder::new(body)
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| ApiError::new(ErrorKey::BadRequest, "body is not valid gzip"))?;
            if out.len() > limit {
                return Err(too_large(limit));
            }
            inflated = out;
            &inflated
        }
        other => {
            return Err(ApiError::new(
                ErrorKey::UnsupportedMediaType,
                format!("unsupported Content-Encoding {other:?}"),
            ));
        }
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    T::deserialize(&mut de).and_then(|v| de.end().map(|()| v)).map_err(invalid_json)
}

/// A body that does not decode: 400 naming the unknown or missing field.
pub fn invalid_json(e: serde_json::Error) -> ApiError {
    let what = e.to_string();
    let mut err = ApiError::new(ErrorKey::BadRequest, format!("invalid JSON body: {what}"));
    if let Some(field) = what.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
        err = err.with("field", field);
    } else if let Some(field) = what.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
        err = err.with("field", field);
    }
    err
}

pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorKey::PayloadTooLarge, "request body is too large").with("limit", limit)
}

/// Body limit for ordinary JSON requests, after decompression (protocol.md §2).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Body limit for batch endpoints (metrics, inventory), after decompression.
pub const BATCH_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// A JSON body of at most `LIMIT` bytes once decompressed, decoded by
/// [`decode_json`]; rejections are envelope errors (400/413/415).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T, const LIMIT: usize = DEFAULT_BODY_LIMIT>(pub T);

impl<T, S, const LIMIT: usize> FromRequest<S> for ApiJson<T, LIMIT>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let body = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(DEFAULT_BODY_LIMIT)
            } else {
                ApiError::new(ErrorKey::BadRequest, "could not read the request body")
            }
        })?;
        decode_json(&headers, &body, LIMIT).map(Self)
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

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
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

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|e| ApiError::bad_request("path", e.body_text()))
    }
}
