//! Managed files (protocol.md §7): content-addressed uploads, assignments
//! to targets and the fleet's view of them for operators; the files an
//! agent must hold, their content and its reports for agents.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_proto::files::{AgentFile, AssignFile, FileAssigned, FileAssignment, ItemReport, StoredBlob, is_sha256_hex};
use tether_proto::{Data, ErrorKey, Page};
use tether_store::{FileAssignmentRecord, ItemChange, ItemKind, NewFileAssignment};
use tokio::io::AsyncWriteExt;

use crate::auth::{AgentCaller, Operator};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use crate::state::{AppState, AuditContext, AuditEvent};
use crate::stream::StreamEvent;

fn too_large(max: u64) -> ApiError {
    ApiError::new(ErrorKey::PayloadTooLarge, format!("the file is larger than this server accepts ({max} bytes)"))
        .with("max_bytes", max)
}

/// `POST /api/v1/files` (the raw bytes as the body): stores the content
/// once under its sha256, streamed through a private temp file so that
/// neither memory nor the store ever holds a partial or unhashed file.
/// 201 when new, 200 when the content was stored already.
#[utoipa::path(
    post,
    path = "/api/v1/files",
    tag = "files",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn upload(State(state): State<AppState>, _: Operator, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let max = state.config.max_file_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let dir = state.config.data_dir.join("uploads");
    crate::fsutil::ensure_private_dir(&dir).map_err(ApiError::internal)?;
    let temp = tempfile::NamedTempFile::new_in(&dir).map_err(ApiError::internal)?;
    let mut file = tokio::fs::File::from_std(temp.reopen().map_err(ApiError::internal)?);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("body", format!("the upload was cut short: {e}")))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(too_large(max));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    if size == 0 {
        return Err(ApiError::bad_request("body", "the body is the file's content; it is empty"));
    }
    file.flush().await.map_err(ApiError::internal)?;
    let sha256 = hex::encode(hasher.finalize());
    let mut source = tokio::fs::File::from_std(temp.reopen().map_err(ApiError::internal)?);
    let new = state.store.put_blob(&sha256, size, &mut source, state.clock.now_ms()).await?;
    tracing::info!(%sha256, size, new, "File content stored");
    let status = if new { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(Data { data: StoredBlob { sha256, size } })).into_response())
}

fn assignment_view(a: FileAssignmentRecord) -> FileAssignment {
    FileAssignment {
        id: a.id,
        path: a.path,
        sha256: a.sha256,
        size: a.size,
        mode: a.mode,
        owner: a.owner,
        group: a.group,
        hook: a.hook,
        target: a.target.to_target(),
        version: a.version,
        updated_by: a.updated_by,
        updated_at: rfc3339(a.updated_at),
    }
}

/// Publishes the change's heads and answers with it.
fn changed(state: &AppState, change: ItemChange<FileAssignmentRecord>, status: StatusCode) -> Response {
    state.notifier.publish(StreamEvent::Heads(change.heads));
    let body = FileAssigned { assignment: assignment_view(change.item), agents_told: change.agents_told };
    (status, axum::Json(Data { data: body })).into_response()
}

/// `POST /api/v1/files/assignments`: 201 for a new assignment, 200 when it
/// updated the active assignment of the same path to the same target.
#[utoipa::path(
    post,
    path = "/api/v1/files/assignments",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "files",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn assign(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<AssignFile>,
) -> ApiResult<Response> {
    req.check().map_err(|(field, what)| ApiError::bad_request(field, what))?;
    let target = req.target.check().map_err(|e| ApiError::bad_request("target", format!("invalid target: {e}")))?;
    let audit = |a: &FileAssignmentRecord| {
        state.audit_entry(
            &ctx,
            AuditEvent::by_user(
                op.name(),
                "file.assign",
                a.id.to_string(),
                json!({"path": a.path, "sha256": a.sha256, "mode": format!("{:o}", a.mode), "version": a.version,
                       "target": req.target}),
            ),
        )
    };
    let new = NewFileAssignment {
        sha256: req.sha256.clone(),
        path: req.path.clone(),
        mode: req.mode,
        owner: req.owner.clone(),
        group: req.group.clone(),
        hook: req.hook.clone(),
        target,
        by: op.name().to_owned(),
        now: state.clock.now_ms(),
    };
    let change = state.store.assign_file(new, &audit).await.map_err(|e| match e {
        tether_store::StoreError::NotFound(tether_store::Entity::Blob) => ApiError::bad_request(
            "sha256",
            format!("no content with sha256 {} was uploaded; upload it first (POST /api/v1/files)", req.sha256),
        ),
        other => other.into(),
    })?;
    let status = if change.item.version == 1 { StatusCode::CREATED } else { StatusCode::OK };
    tracing::info!(id = change.item.id, path = %change.item.path, agents = change.agents_told, "File assigned");
    Ok(changed(&state, change, status))
}

/// `GET /api/v1/files/assignments`: the active assignments, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/files/assignments",
    tag = "files",
    description = "Requires the viewer role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let data = state.store.list_file_assignments().await?.into_iter().map(assignment_view).collect();
    Ok(axum::Json(Page::<FileAssignment> { data, next_cursor: None }).into_response())
}

/// `GET /api/v1/files/assignments/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/files/assignments/{id}",
    tag = "files",
    description = "Requires the viewer role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get(State(state): State<AppState>, _: Operator, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    let a = state.store.get_file_assignment(id).await?.ok_or_else(|| ApiError::not_found("file assignment"))?;
    Ok(axum::Json(Data { data: assignment_view(a) }).into_response())
}

/// `DELETE /api/v1/files/assignments/{id}`: the agents remove the file.
#[utoipa::path(
    delete,
    path = "/api/v1/files/assignments/{id}",
    tag = "files",
    description = "Requires the operator role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn unassign(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "file.unassign", id.to_string(), json!({})));
    let change = state.store.unassign_file(id, state.clock.now_ms(), audit).await?;
    tracing::info!(id, agents = change.agents_told, "File unassigned");
    Ok(changed(&state, change, StatusCode::OK))
}

/// `GET /api/v1/files/assignments/{id}/status`
#[utoipa::path(
    get,
    path = "/api/v1/files/assignments/{id}/status",
    tag = "files",
    description = "Requires the viewer role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn status(State(state): State<AppState>, _: Operator, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    Ok(axum::Json(Data { data: state.store.item_status(ItemKind::File, id).await? }).into_response())
}

/// `GET /api/v1/agents/self/files`: the files the caller must hold now.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/files",
    tag = "files",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn own(State(state): State<AppState>, agent: AgentCaller) -> ApiResult<Response> {
    let data: Vec<AgentFile> = state
        .store
        .agent_files(agent.id)
        .await?
        .into_iter()
        .map(|a| AgentFile {
            file_id: a.id,
            path: a.path,
            sha256: a.sha256,
            size: a.size,
            mode: a.mode,
            owner: a.owner,
            group: a.group,
            hook: a.hook,
            version: a.version,
        })
        .collect();
    Ok(axum::Json(Data { data }).into_response())
}

/// `GET /api/v1/agents/self/files/{sha256}`: content assigned to the
/// caller, streamed chunk by chunk from the store. Content not assigned to
/// the caller is 404, whether or not it exists.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/files/{sha256}",
    tag = "files",
    params(("sha256" = String, Path)),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "The file content", content_type = "application/octet-stream", body = Vec<u8>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn download(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiPath(sha256): ApiPath<String>,
) -> ApiResult<Response> {
    if !is_sha256_hex(&sha256) {
        return Err(ApiError::bad_request("sha256", "sha256 must be 64 lowercase hex digits"));
    }
    let assigned = state.store.agent_files(agent.id).await?.into_iter().any(|a| a.sha256 == sha256);
    let size = match assigned {
        true => state.store.blob_size(&sha256).await?,
        false => None,
    };
    let size = size.ok_or_else(|| ApiError::not_found("file content"))?;
    let store = state.store.clone();
    let chunks = futures::stream::unfold(Some(0u64), move |next| {
        let store = store.clone();
        let sha256 = sha256.clone();
        async move {
            let index = next?;
            match store.blob_chunk(&sha256, index).await {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(index + 1))),
                Ok(None) => None,
                // Cuts the response short: the agent's hash check fails.
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let mut res = Body::from_stream(chunks).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
    res.headers_mut().insert(header::CONTENT_LENGTH, size.into());
    Ok(res)
}

/// Keeps an agent's report on a file or certificate.
pub(super) async fn report(
    state: &AppState,
    agent: &AgentCaller,
    kind: ItemKind,
    id: i64,
    report: ItemReport,
) -> ApiResult<Response> {
    report.check().map_err(|e| ApiError::bad_request("report", e))?;
    state.store.report_item(agent.id, kind, id, report, state.clock.now_ms()).await?;
    Ok(axum::Json(Data { data: json!({"recorded": true}) }).into_response())
}

/// `POST /api/v1/agents/self/files/{id}/status`
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/files/{id}/status",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "files",
    params(("id" = i64, Path)),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn report_status(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ItemReport>,
) -> ApiResult<Response> {
    report(&state, &agent, ItemKind::File, id, body).await
}
