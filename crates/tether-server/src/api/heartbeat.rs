//! `POST /api/v1/agents/self/heartbeat`: liveness and agent-reported state
//! (protocol.md §8). Written in groups by [`crate::heartbeats`]; the 200
//! comes once this heartbeat's group is committed.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tether_proto::agent::MAX_HEARTBEAT_BYTES;
use tether_proto::config::{ApplyState, ConfigApply};
use tether_proto::{AgentId, Data};
use tether_store::HeartbeatRow;

use crate::auth::AgentCaller;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/api/v1/agents/self/heartbeat",
    request_body = serde_json::Value,
    tag = "heartbeat",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    record(&state, agent.id, body).await?;
    Ok(axum::Json(Data { data: serde_json::json!({}) }).into_response())
}

/// Checks a heartbeat and returns once its group is committed; shared by
/// the HTTP route and the agent WebSocket.
pub(crate) async fn record(state: &AppState, agent_id: AgentId, body: Value) -> ApiResult<()> {
    let Some(fields) = body.as_object() else {
        return Err(ApiError::bad_request("body", "heartbeat must be a JSON object"));
    };
    let json = body.to_string();
    if json.len() > MAX_HEARTBEAT_BYTES {
        return Err(ApiError::new(tether_proto::ErrorKey::PayloadTooLarge, "heartbeat is too large")
            .with("limit", MAX_HEARTBEAT_BYTES));
    }
    let text = |k: &str| fields.get(k).and_then(Value::as_str);
    // How the last configuration went (protocol.md §6); older agents send only
    // `applied_config_hash`.
    let config: Option<ConfigApply> = fields
        .get("config_status")
        .filter(|v| !v.is_null())
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(|e| ApiError::bad_request("config_status", format!("config_status: {e}")))?;
    // After a failure the agent still says what it runs, if anything.
    let applied = match &config {
        Some(c) if c.state == ApplyState::Applied => Some(c.hash.as_str()),
        _ => text("applied_config_hash"),
    };
    let failed = config
        .as_ref()
        .filter(|c| c.state == ApplyState::Failed)
        .map(|c| (c.hash.as_str(), c.error.as_deref().unwrap_or("the agent gave no reason")));
    // These go to columns of their own: short and printable (a NUL byte
    // cannot even be stored in PostgreSQL text).
    let printable = |field: &'static str, value: Option<&str>, max: usize| match value {
        Some(v) if v.len() > max || v.chars().any(char::is_control) => {
            Err(ApiError::bad_request(field, format!("{field} must be at most {max} printable characters")))
        }
        _ => Ok(()),
    };
    printable("version", text("version"), 64)?;
    printable("applied_config_hash", applied, 128)?;
    printable("config_status", failed.map(|(hash, _)| hash), 128)?;
    if failed.is_some_and(|(_, why)| why.len() > 4096 || why.contains('\0')) {
        return Err(ApiError::bad_request("config_status", "config_status.error must be at most 4 KiB, without NUL"));
    }
    let row = HeartbeatRow {
        agent_id,
        version: text("version").map(str::to_owned),
        applied_config_hash: applied.map(str::to_owned),
        failed_config: failed.map(|(hash, why)| (hash.to_owned(), why.to_owned())),
        at: state.clock.now_ms(),
        body: json,
    };
    match state.heartbeats.write(row).await {
        Ok(written) => written?,
        Err(crate::heartbeats::Stopped) => {
            return Err(ApiError::unavailable("the server is shutting down", crate::error::STORE_RETRY_AFTER_S));
        }
    }
    metrics::counter!("tether_heartbeats_received_total").increment(1);
    Ok(())
}
