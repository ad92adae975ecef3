//! The route table: every endpoint of the server, in one place.

mod agents;
mod commands;
pub mod enroll;
mod heartbeat;
mod stream;
mod tokens;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};

use crate::state::AppState;

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        // Agent identity.
        .route("/api/v1/agents/enroll", post(enroll::enroll))
        .route("/api/v1/auth/token/refresh", post(enroll::refresh))
        .route("/oauth/token", post(enroll::oauth_token))
        // The agent's own stream and reports.
        .route("/api/v1/agents/self/updates", get(stream::updates))
        .route("/api/v1/agents/self/commands/next", get(stream::next_command))
        .route("/api/v1/agents/self/commands/{id}/status", post(commands::report_status))
        .route("/api/v1/agents/self/commands/{id}/result", post(commands::report_result))
        .route("/api/v1/agents/self/heartbeat", post(heartbeat::heartbeat))
        // Operators.
        .route("/api/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/api/v1/tokens/{id}", delete(tokens::revoke))
        .route("/api/v1/agents", get(agents::list))
        .route("/api/v1/agents/{id}", get(agents::get))
        .route("/api/v1/agents/{id}/revoke", post(agents::revoke))
        .route("/api/v1/agents/{id}/commands", get(commands::list_for_agent))
        .route("/api/v1/enroll-tokens", post(agents::create_enroll_token).get(agents::list_enroll_tokens))
        .route("/api/v1/enroll-tokens/{id}", delete(agents::revoke_enroll_token))
        .route("/api/v1/commands", post(commands::create).get(commands::list))
        .route("/api/v1/commands/{id}", get(commands::get))
        .route("/api/v1/commands/{id}/cancel", post(commands::cancel))
        .route("/api/v1/batches/{id}", get(commands::get_batch))
        .route("/api/v1/batches/{id}/cancel", post(commands::cancel_batch))
        .layer(DefaultBodyLimit::max(crate::error::DEFAULT_BODY_LIMIT))
        .with_state(state)
}

/// `GET /healthz`: the process is up and serving.
async fn healthz() -> &'static str {
    "ok"
}
