//! Seed 004, the printer-fleet server (docs/compat.md, protocol.md §16.5):
//! an agent registers once with an enrollment token and gets a long-lived
//! agent key (`tta_…`) that it sends as `Authorization: Bearer` from then
//! on; it posts heartbeats, device and metric batches and audit events, and
//! operators list the agents. Thin adapters over enrollment, the heartbeat,
//! the inventory upsert (kind `device`), metric batches, the agent audit
//! append and the agent list; every answer is a 200, as the seed's server
//! gives.
//!
//! The `agent_id` an agent chooses for itself (its `[server] agent_id`)
//! becomes the agent's name; `register` answers tether's own id as
//! `agent_id`. A body that carries an `agent_id` must name the caller: by
//! tether id, name or hostname. Empty strings and `null`s count as absent
//! (the zero values a Go agent sends for fields it has not set).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tether_proto::agent::{Agent, AgentStatus};
use tether_proto::telemetry::{
    BatchProblem, InventoryChange, InventoryItem, MAX_INVENTORY_ITEMS, MAX_METRIC_POINTS, MetricBatch, MetricPoint,
};
use tether_proto::user::AgentAuditEvent;
use tether_proto::{AgentId, ErrorKey, Labels, MAX_PAGE_LIMIT};
use tether_store::{AgentFilter, AuditEntry, NewAgentKey};

use crate::api::enroll::{Enrollment, enroll_agent, hostname_ok, no_store, parse_public_key};
use crate::api::page::parse_time;
use crate::api::{agents, audit, heartbeat, telemetry};
use crate::auth::secret::{AGENT_KEY_PREFIX, hash_token, new_token};
use crate::auth::{AgentCaller, Operator};
use crate::error::{ApiError, ApiJson, ApiResult, BATCH_BODY_LIMIT};
use crate::state::{AppState, AuditContext, AuditEvent, PublicCaller};
use crate::stream::StreamEvent;

route_table! {
    Public post "/api/v1/agents/register" => register,
    Agent  post "/api/v1/agents/heartbeat" => heartbeat,
    Agent  post "/api/v1/devices/batch" => devices,
    Agent  post "/api/v1/metrics/batch" => metrics,
    Agent  post "/api/v1/audit/log" => audit_log,
    Viewer get  "/api/v1/agents/list" => list,
}

/// The inventory kind devices are kept under.
const DEVICE_KIND: &str = "device";

/// A string field the seed may leave empty or `null`: `None` then.
fn given(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Refuses a body whose `agent_id` names anyone but the caller (by tether
/// id, name or hostname); says nothing about any other agent.
async fn check_agent_id(state: &AppState, agent: &AgentCaller, named: Option<&Value>) -> ApiResult<()> {
    let named = match named {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(s)) if s.is_empty() => return Ok(()),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::bad_request("agent_id", "agent_id must be a string")),
    };
    if named.parse::<AgentId>().is_ok_and(|id| id == agent.id) {
        return Ok(());
    }
    let rec = state.store.get_agent(agent.id).await?.ok_or_else(ApiError::unauthenticated)?;
    if rec.name == *named || rec.hostname == *named {
        return Ok(());
    }
    Err(ApiError::new(ErrorKey::Forbidden, "agent_id does not name this agent"))
}

/// `POST /api/v1/agents/register`. Fields beyond these (`agent_version`,
/// `platform`, `ip`, …) are kept as the agent's facts.
#[derive(Debug, Deserialize)]
pub struct RegisterRequest {
    enroll_token: String,
    hostname: String,
    /// The agent's own id, kept as its name.
    #[serde(default)]
    agent_id: Option<String>,
    /// Asked-for labels; the enrollment token's win (protocol.md §3).
    #[serde(default)]
    labels: Option<Labels>,
    /// Optional: an agent with an Ed25519 key may sign its requests.
    #[serde(default)]
    public_key: Option<String>,
    #[serde(flatten)]
    facts: Map<String, Value>,
}

/// `POST /api/v1/agents/register` (public): enrolls the agent and answers
/// `{agent_id, token}`, `token` being its new agent key.
///
/// Enrollment and the key are two transactions (enrollment is the native
/// service's, reused whole). If storing the key fails, the agent just
/// enrolled is deleted again, audited, before the error is answered: no
/// agent is left that nobody holds a credential for. The enrollment token's
/// use stays spent (a retry needs a token with uses left). Should the
/// delete fail too (the database is gone), the agent stays, never seen,
/// for an operator to delete; the error log names it. The steps run on a
/// task of their own, so a client that goes away midway cannot stop them
/// between enrollment and key.
pub async fn register(
    State(state): State<AppState>,
    _: PublicCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> ApiResult<Response> {
    let name = given(req.agent_id);
    if name.as_deref().is_some_and(|n| !hostname_ok(n)) {
        return Err(ApiError::bad_request("agent_id", "agent_id must be 1-253 printable chars"));
    }
    let public_key = match given(req.public_key) {
        Some(key) => parse_public_key(&key)?,
        None => Vec::new(),
    };
    let enrollment = Enrollment {
        enroll_token: req.enroll_token,
        hostname: req.hostname,
        labels: req.labels.unwrap_or_default(),
        facts: Value::Object(req.facts),
        public_key,
    };
    let steps = tokio::spawn(enroll_with_key(state, ctx, enrollment, name));
    let (agent_id, key) = steps.await.map_err(ApiError::internal)??;
    Ok(no_store(axum::Json(json!({"agent_id": agent_id, "token": key})).into_response()))
}

/// Enrolls the agent, then stores its new key, or deletes it again.
async fn enroll_with_key(
    state: AppState,
    ctx: AuditContext,
    enrollment: Enrollment,
    name: Option<String>,
) -> ApiResult<(AgentId, String)> {
    let agent_id = enroll_agent(&state, &ctx, enrollment).await?.agent_id;
    let key = new_token(AGENT_KEY_PREFIX);
    if let Err(e) = store_key(&state, &ctx, agent_id, &key, name).await {
        undo_enrollment(&state, &ctx, agent_id).await;
        return Err(e);
    }
    Ok((agent_id, key))
}

/// Stores the agent's key (its hash) and gives the agent its chosen name, audited.
async fn store_key(
    state: &AppState,
    ctx: &AuditContext,
    agent_id: AgentId,
    key: &str,
    name: Option<String>,
) -> ApiResult<()> {
    let id = uuid::Uuid::now_v7().to_string();
    let last4 = key[key.len() - 4..].to_owned();
    let actor = agent_id.to_string();
    let details = json!({"key_id": id, "last4": last4, "name": name});
    let audit = state.audit_entry(
        ctx,
        AuditEvent {
            actor: &actor,
            actor_kind: "agent",
            action: "agent_key.create",
            target: actor.clone(),
            outcome: "ok",
            details,
        },
    );
    let new = NewAgentKey { id, agent_id, key_hash: hash_token(key), last4, agent_name: name };
    state.store.create_agent_key(new, state.clock.now_ms(), audit).await?;
    Ok(())
}

/// Deletes an agent whose registration could not be finished.
async fn undo_enrollment(state: &AppState, ctx: &AuditContext, agent_id: AgentId) {
    let reason = "registration failed before the agent's key was stored";
    let audit = AuditEntry {
        ip: ctx.ip.clone(),
        request_id: ctx.request_id.clone(),
        ..AuditEntry::system(
            "server",
            "agent.delete",
            agent_id.to_string(),
            json!({"reason": reason}),
            state.clock.now_ms(),
        )
    };
    match state.store.delete_agent(agent_id, audit).await {
        Ok(_) => {
            let event = StreamEvent::Revoked { agent_id, at: state.clock.now_ms(), reason: reason.to_owned() };
            state.notifier.publish(event);
        }
        Err(e) => tracing::error!(
            agent_id = %agent_id,
            error = %e,
            "A failed registration left an agent without a key; delete it"
        ),
    }
}

/// `POST /api/v1/agents/heartbeat` (agent): the seed's body (`agent_id`,
/// `status`, `uptime_seconds`, `devices_count`, `last_scan`, `memory_mb`,
/// `cpu_percent`, …) kept as the agent's latest heartbeat.
pub async fn heartbeat(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    check_agent_id(&state, &agent, body.get("agent_id")).await?;
    heartbeat::record(&state, agent.id, body).await?;
    Ok(axum::Json(json!({"success": true})).into_response())
}

/// `POST /api/v1/devices/batch`: devices are JSON objects, checked after
/// the count (so an oversized batch is 413 whatever it holds).
#[derive(Debug, Deserialize)]
pub struct DevicesRequest {
    #[serde(default)]
    agent_id: Option<Value>,
    devices: Vec<Value>,
}

/// A device's inventory key: its `serial`, else its `id` (text or number).
fn device_key(device: &Value) -> Option<String> {
    ["serial", "id"].iter().find_map(|field| match device.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// `POST /api/v1/devices/batch {devices:[{serial|id, …}]}` (agent): at most
/// 1,000 devices, upserted whole as inventory of kind `device` keyed by
/// serial (or id), with the device object as its attributes; a batch over
/// the limit or with any bad device changes nothing.
pub async fn devices(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(req): ApiJson<DevicesRequest, BATCH_BODY_LIMIT>,
) -> ApiResult<Response> {
    if req.devices.len() > MAX_INVENTORY_ITEMS {
        return Err(telemetry::problem(BatchProblem::TooMany { limit: MAX_INVENTORY_ITEMS }));
    }
    check_agent_id(&state, &agent, req.agent_id.as_ref()).await?;
    let mut upsert = Vec::with_capacity(req.devices.len());
    for (i, device) in req.devices.into_iter().enumerate() {
        if !device.is_object() {
            return Err(ApiError::bad_request("devices", format!("devices[{i}] must be an object")));
        }
        let key = device_key(&device)
            .ok_or_else(|| ApiError::bad_request("serial", format!("devices[{i}] has neither serial nor id")))?;
        upsert.push(InventoryItem { kind: DEVICE_KIND.to_owned(), key, attrs: device });
    }
    let received = upsert.len();
    let change = InventoryChange { upsert, remove: Vec::new() };
    telemetry::apply_inventory(&state, agent.id, &change).await.map_err(|e| seed_field(e, "key", "serial"))?;
    Ok(axum::Json(json!({"success": true, "received": received, "stored": received})).into_response())
}

/// Names a native field of an error as the seed calls it.
fn seed_field(mut err: ApiError, native: &str, seed: &str) -> ApiError {
    if err.params.get("field").and_then(Value::as_str) == Some(native) {
        err.params.insert("field".into(), seed.into());
    }
    err
}

/// `POST /api/v1/metrics/batch`: metrics are checked after the count.
#[derive(Debug, Deserialize)]
pub struct MetricsRequest {
    #[serde(default)]
    agent_id: Option<Value>,
    /// When the batch was taken: the time of metrics without their own.
    #[serde(default)]
    timestamp: Option<Value>,
    metrics: Vec<Value>,
}

/// One metric of the seed's batch.
#[derive(Debug, Deserialize)]
struct SeedMetric {
    name: String,
    value: f64,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    labels: Option<Labels>,
}

/// A time as the seed sends it (RFC 3339, or epoch ms as a number or text);
/// `None` when absent.
fn seed_time(field: &'static str, value: Option<&Value>) -> ApiResult<Option<i64>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| ApiError::bad_request(field, format!("{field} must be epoch ms")))
        }
        Some(Value::String(s)) => parse_time(field, Some(s)),
        Some(_) => Err(ApiError::bad_request(field, format!("{field} must be an RFC 3339 time or epoch ms"))),
    }
}

/// `POST /api/v1/metrics/batch {metrics:[{name, value, timestamp?, labels?}]}`
/// (agent): at most 5,000 points, checked whole and stored as one native
/// batch (protocol.md §8). Its `batch_id` is the hash of its points, so the
/// same batch sent again (a retry after a lost answer) is stored once.
pub async fn metrics(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiJson(req): ApiJson<MetricsRequest, BATCH_BODY_LIMIT>,
) -> ApiResult<Response> {
    if req.metrics.len() > MAX_METRIC_POINTS {
        return Err(telemetry::problem(BatchProblem::TooMany { limit: MAX_METRIC_POINTS }));
    }
    check_agent_id(&state, &agent, req.agent_id.as_ref()).await?;
    let taken = seed_time("timestamp", req.timestamp.as_ref())?.unwrap_or_else(|| state.clock.now_ms());
    let mut points = Vec::with_capacity(req.metrics.len());
    for (i, metric) in req.metrics.into_iter().enumerate() {
        let metric: SeedMetric = serde_json::from_value(metric)
            .map_err(|e| ApiError::bad_request("metrics", format!("metrics[{i}]: {e}")))?;
        let ts_ms = seed_time("timestamp", metric.timestamp.as_ref())?.unwrap_or(taken);
        let labels = metric.labels.unwrap_or_default();
        points.push(MetricPoint { name: metric.name, ts_ms, value: metric.value, labels });
    }
    let digest = Sha256::digest(serde_json::to_vec(&points).map_err(ApiError::internal)?);
    let batch = MetricBatch { batch_id: format!("seed004-{}", hex::encode(digest)), points };
    let accepted =
        telemetry::store_batch(&state, agent.id, &batch).await.map_err(|e| seed_field(e, "ts_ms", "timestamp"))?;
    let body = json!({"success": true, "received": batch.points.len(), "stored": accepted.stored});
    Ok(axum::Json(body).into_response())
}

/// `POST /api/v1/audit/log`
#[derive(Debug, Deserialize)]
pub struct AuditLogRequest {
    #[serde(default)]
    agent_id: Option<Value>,
    action: String,
    #[serde(default)]
    resource_type: Option<String>,
    #[serde(default)]
    resource_id: Option<String>,
    #[serde(default)]
    details: Value,
}

/// `POST /api/v1/audit/log {action, resource_type, resource_id, details}`
/// (agent): appended as the native agent event `agent.<action>` with the
/// target `resource_type:resource_id` (either alone when the other is absent).
pub async fn audit_log(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<AuditLogRequest>,
) -> ApiResult<Response> {
    check_agent_id(&state, &agent, req.agent_id.as_ref()).await?;
    let target = match (given(req.resource_type), given(req.resource_id)) {
        (Some(kind), Some(id)) => format!("{kind}:{id}"),
        (kind, id) => kind.or(id).unwrap_or_default(),
    };
    let event = AgentAuditEvent { action: req.action, target, details: req.details };
    audit::agent_event(&state, &ctx, agent.id, event).await?;
    Ok(axum::Json(json!({"success": true})).into_response())
}

/// An agent in the seed's words: `status` is `active`, `offline` or
/// (revoked) `inactive`; what it said about itself at registration is in
/// `facts` (its `ip`, `platform` and `agent_version` also on their own).
fn seed_agent(agent: Agent) -> Value {
    let status = match agent.status {
        AgentStatus::Online => "active",
        AgentStatus::Offline => "offline",
        AgentStatus::Revoked => "inactive",
    };
    // The native view's own encoding (RFC 3339 times), renamed where the seed's differ.
    let native = serde_json::to_value(&agent).unwrap_or_default();
    let field = |name: &str| native.get(name).cloned().unwrap_or(Value::Null);
    let fact = |name: &str| agent.facts.get(name).cloned().unwrap_or(Value::Null);
    json!({
        "agent_id": agent.id,
        "name": agent.name,
        "hostname": agent.hostname,
        "ip": fact("ip"),
        "platform": fact("platform"),
        "version": agent.version.as_deref().map_or_else(|| fact("agent_version"), Value::from),
        "status": status,
        "last_seen": field("last_seen"),
        "registered_at": field("created_at"),
        "revoked_at": field("revoked_at"),
        "labels": field("labels"),
        "facts": field("facts"),
        "heartbeat": field("heartbeat"),
    })
}

/// `GET /api/v1/agents/list` (viewer, as the native list): every agent, as
/// a JSON array, read page by page through the native list.
pub async fn list(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let mut filter = AgentFilter { limit: MAX_PAGE_LIMIT, ..AgentFilter::default() };
    let mut out = Vec::new();
    loop {
        let page = agents::page(&state, &filter).await?;
        out.extend(page.data.into_iter().map(seed_agent));
        match page.next_cursor.and_then(|c| c.parse().ok()) {
            Some(after) => filter.after = Some(after),
            None => break,
        }
    }
    Ok(axum::Json(Value::Array(out)).into_response())
}
