//! `POST /api/v1/agents/self/heartbeat`: liveness and agent-reported state.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tether_proto::Data;
use tether_proto::agent::MAX_HEARTBEAT_BYTES;

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
    state
        .store
        .record_heartbeat(agent.id, text("version"), text("applied_config_hash"), &body, state.clock.now_ms())
        .await?;
    Ok(axum::Json(Data { data: serde_json::json!({}) }).into_response())
}
