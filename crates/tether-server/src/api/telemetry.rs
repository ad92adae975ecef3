//! Metrics and inventory (protocol.md §8): agents ship batches, operators
//! query them. A batch is checked whole before the store sees it, so one
//! over a limit is refused with nothing written.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use tether_proto::telemetry::{
    BatchProblem, InventoryChange, InventoryEntry, InventoryReplace, MetricBatch, MetricBatchAccepted,
    MetricQueryResult, Resolution,
};
use tether_proto::{AgentId, Data, ErrorKey, Page};
use tether_store::{MetricQuery, MetricsOutcome, Millis, NewMetrics};

use crate::api::page::{page_limit, parse_time};
use crate::auth::{AgentCaller, Operator};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, BATCH_BODY_LIMIT};
use crate::state::AppState;

/// Most points one metric query answers with.
const MAX_QUERY_POINTS: u32 = 10_000;
/// The end of the year 9999: later times are refused, so range arithmetic cannot overflow.
const LATEST_MS: Millis = 253_402_300_799_999;
/// The default query range.
const DEFAULT_RANGE_MS: Millis = 3_600_000;
/// Raw points answer ranges up to this long…
const RAW_UP_TO_MS: Millis = 2 * 86_400_000;
/// …hourly rollups up to this long; longer ranges get daily ones.
const HOURLY_UP_TO_MS: Millis = 62 * 86_400_000;

/// A batch refused before the store saw it: 413 over the limit, 400 naming the field.
pub(crate) fn problem(p: BatchProblem) -> ApiError {
    match p {
        BatchProblem::TooMany { limit } => {
            ApiError::new(ErrorKey::PayloadTooLarge, format!("a batch holds at most {limit} items"))
                .with("limit", limit)
        }
        BatchProblem::Invalid { field, message } => ApiError::bad_request(field, message),
    }
}

/// `POST /api/v1/agents/self/metrics`: a batch of up to 5,000 points,
/// stored once per `batch_id`.
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/metrics",
    request_body = tether_proto::telemetry::MetricBatch,
    tag = "telemetry",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Stored, or already stored under this batch id", body = tether_proto::Data<tether_proto::telemetry::MetricBatchAccepted>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(batch): ApiJson<MetricBatch, BATCH_BODY_LIMIT>,
) -> ApiResult<Response> {
    let accepted = store_batch(&state, agent.id, &batch).await?;
    Ok(axum::Json(Data { data: accepted }).into_response())
}

/// Checks a metric batch whole, then stores it once per `batch_id`.
pub(crate) async fn store_batch(
    state: &AppState,
    agent_id: AgentId,
    batch: &MetricBatch,
) -> ApiResult<MetricBatchAccepted> {
    let now = state.clock.now_ms();
    let oldest = now - state.config.telemetry.retention.raw_metrics.as_millis() as Millis;
    batch.check(now, oldest).map_err(problem)?;
    let new = NewMetrics {
        agent_id,
        batch_id: &batch.batch_id,
        points: &batch.points,
        max_series: state.config.telemetry.max_series_per_agent,
        now,
    };
    Ok(match state.store.store_metrics(new).await? {
        MetricsOutcome::Stored { points } => {
            metrics::counter!("tether_metric_points_stored_total").increment(points);
            MetricBatchAccepted { stored: points, duplicate: false }
        }
        MetricsOutcome::Duplicate => MetricBatchAccepted { stored: 0, duplicate: true },
    })
}

/// `POST /api/v1/agents/self/inventory {upsert, remove}`
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/inventory",
    request_body = tether_proto::telemetry::InventoryChange,
    tag = "telemetry",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn change_inventory(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(change): ApiJson<InventoryChange, BATCH_BODY_LIMIT>,
) -> ApiResult<Response> {
    apply_inventory(&state, agent.id, &change).await?;
    Ok(axum::Json(Data { data: serde_json::json!({}) }).into_response())
}

/// Checks an inventory change whole, then applies it as one.
pub(crate) async fn apply_inventory(state: &AppState, agent_id: AgentId, change: &InventoryChange) -> ApiResult<()> {
    change.check().map_err(problem)?;
    state.store.change_inventory(agent_id, &change.upsert, &change.remove, state.clock.now_ms()).await?;
    Ok(())
}

/// `PUT /api/v1/agents/self/inventory {items}`: the whole inventory.
#[utoipa::path(
    put,
    path = "/api/v1/agents/self/inventory",
    request_body = tether_proto::telemetry::InventoryReplace,
    tag = "telemetry",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn replace_inventory(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(replace): ApiJson<InventoryReplace, BATCH_BODY_LIMIT>,
) -> ApiResult<Response> {
    replace.check().map_err(problem)?;
    state.store.replace_inventory(agent.id, &replace.items, state.clock.now_ms()).await?;
    Ok(axum::Json(Data { data: serde_json::json!({}) }).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// The metric name (required).
    name: Option<String>,
    /// RFC 3339 or epoch ms; default `to` − 1 h.
    from: Option<String>,
    /// RFC 3339 or epoch ms; default now.
    to: Option<String>,
}

/// The stored form that answers `[from, to)` asked at `now`: the finest one
/// that still holds the whole range and keeps the answer small.
fn resolution_for(state: &AppState, from: Millis, to: Millis, now: Millis) -> Resolution {
    let kept = &state.config.telemetry.retention;
    let range = to - from;
    if range <= RAW_UP_TO_MS && from >= now - kept.raw_metrics.as_millis() as Millis {
        Resolution::Raw
    } else if range <= HOURLY_UP_TO_MS && from >= now - kept.hourly_rollups.as_millis() as Millis {
        Resolution::Hour
    } else {
        Resolution::Day
    }
}

/// `GET /api/v1/agents/{id}/metrics?name=&from=&to=` (default: the last hour).
#[utoipa::path(
    get,
    path = "/api/v1/agents/{id}/metrics",
    tag = "telemetry",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid), MetricsQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Data<tether_proto::telemetry::MetricQueryResult>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn query(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(id): ApiPath<AgentId>,
    ApiQuery(q): ApiQuery<MetricsQuery>,
) -> ApiResult<Response> {
    let name = q.name.filter(|n| !n.is_empty()).ok_or_else(|| ApiError::bad_request("name", "name is required"))?;
    if !tether_proto::telemetry::metric_name_ok(&name) {
        return Err(ApiError::bad_request("name", "name is not a metric name"));
    }
    let now = state.clock.now_ms();
    let to = parse_time("to", q.to.as_deref())?.unwrap_or(now);
    if !(0..=LATEST_MS).contains(&to) {
        return Err(ApiError::bad_request("to", "to must be between 1970 and 9999"));
    }
    let from = parse_time("from", q.from.as_deref())?.unwrap_or(to.saturating_sub(DEFAULT_RANGE_MS).max(0));
    if !(0..=LATEST_MS).contains(&from) {
        return Err(ApiError::bad_request("from", "from must be between 1970 and 9999"));
    }
    if from >= to {
        return Err(ApiError::bad_request("from", "from must be before to"));
    }
    state.store.get_agent(id).await?.ok_or_else(|| ApiError::not_found("agent"))?;
    let resolution = resolution_for(&state, from, to, now);
    // A bucket is answered whole when the range starts inside it.
    let from = match resolution {
        Resolution::Raw => from,
        Resolution::Hour => from - from.rem_euclid(3_600_000),
        Resolution::Day => from - from.rem_euclid(86_400_000),
    };
    let query = MetricQuery { agent_id: id, name: name.clone(), from, to, resolution, max_points: MAX_QUERY_POINTS };
    let (series, truncated) = state.store.query_metrics(&query).await?;
    let data = MetricQueryResult { name, resolution, from_ms: from, to_ms: to, series, truncated };
    Ok(axum::Json(Data { data }).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InventoryQuery {
    kind: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

/// The page cursor of an inventory listing: the last `(kind, key)`, as
/// base64url JSON so any characters survive a query string.
fn encode_cursor(kind: &str, key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::json!([kind, key]).to_string())
}

fn decode_cursor(cursor: &str) -> ApiResult<(String, String)> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| ApiError::bad_request("cursor", "cursor is malformed"))
}

/// `GET /api/v1/agents/{id}/inventory?kind=&cursor=&limit=`
#[utoipa::path(
    get,
    path = "/api/v1/agents/{id}/inventory",
    tag = "telemetry",
    description = "Requires the viewer role.",
    params(("id" = String, Path, format = Uuid), InventoryQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = tether_proto::Page<tether_proto::telemetry::InventoryEntry>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn inventory(
    State(state): State<AppState>,
    _: Operator,
    ApiPath(id): ApiPath<AgentId>,
    ApiQuery(q): ApiQuery<InventoryQuery>,
) -> ApiResult<Response> {
    let limit = page_limit(q.limit)?;
    let after = q.cursor.as_deref().filter(|c| !c.is_empty()).map(decode_cursor).transpose()?;
    state.store.get_agent(id).await?.ok_or_else(|| ApiError::not_found("agent"))?;
    let kind = q.kind.as_deref().filter(|k| !k.is_empty());
    let records = state.store.list_inventory(id, kind, after, limit).await?;
    let next_cursor =
        (records.len() == limit as usize).then(|| records.last().map(|r| encode_cursor(&r.kind, &r.key))).flatten();
    let data = records
        .into_iter()
        .map(|r| InventoryEntry { kind: r.kind, key: r.key, attrs: r.attrs, updated_at: rfc3339(r.updated_at) })
        .collect();
    Ok(axum::Json(Page { data, next_cursor }).into_response())
}
