//! `GET /api/v1/metrics`: process counters an administrator (or the bench)
//! reads to see what the server is spending, per replica.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tether_proto::Data;

use crate::auth::Operator;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/api/v1/metrics",
    tag = "metrics",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get(State(state): State<AppState>, _: Operator) -> Response {
    let p = &state.passwords;
    let peers = state.notifier.counters();
    axum::Json(Data {
        data: json!({
            "password_verifications": p.verifications(),
            "password_cache_hits": p.cache_hits(),
            "password_checks_refused_busy": p.refused_busy(),
            "login_limiter_keys": state.limits.login_keys_held(),
            "store_calls": state.store_calls.get(),
            "parked_polls": state.streams.parked(),
            "loaded_streams": state.streams.loaded(),
            "peers_connected": state.notifier.connected(),
            "events_from_peers": peers.received,
            "events_not_published": peers.dropped,
        }),
    })
    .into_response()
}
