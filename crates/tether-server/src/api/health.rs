//! `/healthz` (the process serves) and `/readyz` (it can do useful work:
//! the store answers with the schema this build expects, and the server is
//! not draining), for load balancers and orchestrators.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, STORE_RETRY_AFTER_S};
use crate::state::AppState;

/// How long one store check is trusted: however often `/readyz` is asked,
/// the database sees at most one check a second from each server.
const CHECK_TTL: Duration = Duration::from_secs(1);
/// A store that does not answer within this is not ready.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The last store check and when it ran.
#[derive(Debug, Default)]
pub struct Readiness(tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>);

impl Readiness {
    async fn store_ready(&self, state: &AppState) -> Result<(), String> {
        // Held while checking: concurrent probes wait for one check.
        let mut last = self.0.lock().await;
        if let Some((at, result)) = &*last
            && at.elapsed() < CHECK_TTL
        {
            return result.clone();
        }
        let result = match tokio::time::timeout(CHECK_TIMEOUT, state.store.check_ready()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("the store did not answer within {} s", CHECK_TIMEOUT.as_secs())),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// `GET /healthz`: the process is up and serving.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "Plain text", content_type = "text/plain", body = String),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: 200 `ready`, or 503 with the reason and `Retry-After`.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Plain text", content_type = "text/plain", body = String),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return ApiError::unavailable("the server is shutting down", STORE_RETRY_AFTER_S).into_response();
    }
    match state.readiness.store_ready(&state).await {
        Ok(()) => "ready".into_response(),
        Err(why) => {
            tracing::warn!(reason = %why, "Not ready");
            ApiError::unavailable(format!("not ready: {why}"), STORE_RETRY_AFTER_S).into_response()
        }
    }
}
