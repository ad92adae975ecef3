//! `POST /api/v1/agents/self/heartbeat`: liveness and agent-reported state.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tether_proto::Data;
use tether_proto::agent::MAX_HEARTBEAT_BYTES;
use tether_proto::config::{ApplyState, ConfigApply};
use tether_store::HeartbeatFacts;

use crate::auth::AgentCaller;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::state::AppState;

pub async fn heartbeat(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    let Some(fields) = body.as_object() else {
        return Err(ApiError::bad_request("body", "heartbeat must be a JSON object"));
    };
    if body.to_string().len() > MAX_HEARTBEAT_BYTES {
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
    let beat =
        HeartbeatFacts { version: text("version"), applied_config_hash: applied, failed_config: failed, body: &body };
    state.store.record_heartbeat(agent.id, beat, state.clock.now_ms()).await?;
    Ok(axum::Json(Data { data: serde_json::json!({}) }).into_response())
}
