//! Certificates (protocol.md §7): uploaded and issued certificates and the
//! server's CAs for operators; for agents, what they must hold, uploaded
//! material, CSR signing, reports and renewal requests.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tether_proto::certs::{
    AgentCert, CaCert, Cert, CertChanged, CertMaterial, CertSource, ImportCa, IssueCert, IssuedCert, RenewRequest,
    ReplaceCert, SignRequest, UploadCert,
};
use tether_proto::files::ItemReport;
use tether_proto::{Data, Page};
use tether_store::{CaRecord, CertRecord, IssuedRecord, ItemChange, ItemKind, NewCa, NewCert};

use crate::auth::{AgentCaller, Operator};
use crate::clock::rfc3339;
use crate::error::{ApiError, ApiJson, ApiPath, ApiResult};
use crate::pki::{self, Problem, SignRefusal};
use crate::state::{AppState, AuditContext, AuditEvent};
use crate::stream::StreamEvent;

/// Revoked certificates stay in the list this long.
const REVOKED_LISTED_MS: i64 = 86_400_000;
/// Longest reason an agent may give for a renewal request.
const MAX_REASON_BYTES: usize = 1024;

fn bad((field, what): Problem) -> ApiError {
    ApiError::bad_request(field, what)
}

fn cert_view(state: &AppState, c: CertRecord) -> Cert {
    let warn_before = state.clock.now_ms() + i64::from(state.config.cert_expiry_warning_days) * 86_400_000;
    Cert {
        id: c.id,
        name: c.name,
        source: c.source,
        target: c.target.to_target(),
        version: c.version,
        serial: c.serial,
        not_after: c.not_after.map(rfc3339),
        expiring: c.revoked_at.is_none() && c.not_after.is_some_and(|t| t < warn_before),
        dns_names: c.dns_names,
        ip_addresses: c.ip_addresses,
        validity_days: c.validity_days,
        group: c.group,
        hook: c.hook,
        created_by: c.created_by,
        created_at: rfc3339(c.created_at),
        revoked_at: c.revoked_at.map(rfc3339),
    }
}

fn changed(state: &AppState, change: ItemChange<CertRecord>, status: StatusCode) -> Response {
    state.notifier.publish(StreamEvent::Heads(change.heads));
    let body = CertChanged { cert: cert_view(state, change.item), agents_told: change.agents_told };
    (status, axum::Json(Data { data: body })).into_response()
}

/// `POST /api/v1/certs`: an uploaded certificate, its key sealed at rest.
#[utoipa::path(
    post,
    path = "/api/v1/certs",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<UploadCert>,
) -> ApiResult<Response> {
    req.check().map_err(bad)?;
    let target = req.target.check().map_err(|e| ApiError::bad_request("target", format!("invalid target: {e}")))?;
    let now = state.clock.now_ms();
    let material =
        pki::check_uploaded(&state.sealer, &req.name, &req.cert_pem, &req.key_pem, &req.chain_pem, now).map_err(bad)?;
    let audit = |c: &CertRecord| {
        let details = json!({"name": c.name, "serial": c.serial, "target": req.target});
        state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "cert.add", c.id.to_string(), details))
    };
    let new = NewCert {
        name: req.name.clone(),
        target,
        group: req.group.clone(),
        hook: req.hook.clone(),
        material: Some(material),
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
        validity_days: None,
        by: op.name().to_owned(),
        now,
    };
    let change = state.store.create_cert(new, &audit).await?;
    tracing::info!(id = change.item.id, name = %change.item.name, agents = change.agents_told, "Certificate added");
    Ok(changed(&state, change, StatusCode::CREATED))
}

/// `POST /api/v1/certs/issued`: each targeted agent gets a certificate for
/// these names from the server's CA, for a key it makes itself.
#[utoipa::path(
    post,
    path = "/api/v1/certs/issued",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
    description = "Requires the operator role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn issue(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<IssueCert>,
) -> ApiResult<Response> {
    req.check().map_err(bad)?;
    let target = req.target.check().map_err(|e| ApiError::bad_request("target", format!("invalid target: {e}")))?;
    let audit = |c: &CertRecord| {
        let details = json!({"name": c.name, "dns_names": c.dns_names, "ip_addresses": c.ip_addresses,
                             "validity_days": c.validity_days, "target": req.target});
        state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "cert.issue", c.id.to_string(), details))
    };
    let new = NewCert {
        name: req.name.clone(),
        target,
        group: req.group.clone(),
        hook: req.hook.clone(),
        material: None,
        dns_names: req.dns_names.iter().map(|d| d.to_ascii_lowercase()).collect(),
        ip_addresses: req.ip_addresses.clone(),
        validity_days: Some(req.validity_days),
        by: op.name().to_owned(),
        now: state.clock.now_ms(),
    };
    let change = state.store.create_cert(new, &audit).await?;
    tracing::info!(id = change.item.id, name = %change.item.name, agents = change.agents_told, "Certificate assigned for issue");
    Ok(changed(&state, change, StatusCode::CREATED))
}

async fn active_cert(state: &AppState, id: i64) -> ApiResult<CertRecord> {
    let cert = state.store.get_cert(id).await?.ok_or_else(|| ApiError::not_found("certificate"))?;
    if cert.revoked_at.is_some() {
        return Err(ApiError::conflict(format!("certificate {} was revoked", cert.name)));
    }
    Ok(cert)
}

/// `POST /api/v1/certs/{id}/replace`: new material for an uploaded
/// certificate; its holders are told (`cert.renewed`) with the new serial.
#[utoipa::path(
    post,
    path = "/api/v1/certs/{id}/replace",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
    description = "Requires the operator role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn replace(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<ReplaceCert>,
) -> ApiResult<Response> {
    req.check().map_err(bad)?;
    let cert = active_cert(&state, id).await?;
    if cert.source == CertSource::Issued {
        return Err(ApiError::conflict(format!(
            "certificate {} is issued by the server's CA: its agents renew it themselves (`tether agent renew {}`)",
            cert.name, cert.name
        )));
    }
    let now = state.clock.now_ms();
    let material = pki::check_uploaded(&state.sealer, &cert.name, &req.cert_pem, &req.key_pem, &req.chain_pem, now)
        .map_err(bad)?;
    let details = json!({"name": cert.name, "old_serial": cert.serial, "serial": material.serial});
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "cert.replace", id.to_string(), details));
    let change = state.store.replace_cert(id, material, now, audit).await?;
    tracing::info!(id, name = %change.item.name, agents = change.agents_told, "Certificate replaced");
    Ok(changed(&state, change, StatusCode::OK))
}

/// `POST /api/v1/certs/{id}/revoke`: its holders remove it (`cert.revoked`).
#[utoipa::path(
    post,
    path = "/api/v1/certs/{id}/revoke",
    tag = "certs",
    description = "Requires the operator role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "cert.revoke", id.to_string(), json!({})));
    let change = state.store.revoke_cert(id, state.clock.now_ms(), audit).await?;
    tracing::info!(id, name = %change.item.name, agents = change.agents_told, "Certificate revoked");
    Ok(changed(&state, change, StatusCode::OK))
}

/// `GET /api/v1/certs`: active certificates by name, then those revoked in
/// the last day; each says whether it expires within the warning window.
#[utoipa::path(
    get,
    path = "/api/v1/certs",
    tag = "certs",
    description = "Requires the viewer role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let since = state.clock.now_ms() - REVOKED_LISTED_MS;
    let data = state.store.list_certs(since).await?.into_iter().map(|c| cert_view(&state, c)).collect();
    Ok(axum::Json(Page::<Cert> { data, next_cursor: None }).into_response())
}

/// `GET /api/v1/certs/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/certs/{id}",
    tag = "certs",
    description = "Requires the viewer role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn get(State(state): State<AppState>, _: Operator, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    let cert = state.store.get_cert(id).await?.ok_or_else(|| ApiError::not_found("certificate"))?;
    Ok(axum::Json(Data { data: cert_view(&state, cert) }).into_response())
}

/// `GET /api/v1/certs/{id}/status`: holders current, behind or failed.
#[utoipa::path(
    get,
    path = "/api/v1/certs/{id}/status",
    tag = "certs",
    description = "Requires the viewer role.",
    params(("id" = i64, Path)),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn status(State(state): State<AppState>, _: Operator, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    Ok(axum::Json(Data { data: state.store.item_status(ItemKind::Cert, id).await? }).into_response())
}

fn ca_view(ca: CaRecord) -> CaCert {
    CaCert {
        id: ca.id,
        cert_pem: ca.cert_pem,
        active: ca.active,
        not_after: rfc3339(ca.not_after),
        created_at: rfc3339(ca.created_at),
    }
}

/// `GET /api/v1/certs/ca`: the CAs agents trust, the active one first.
#[utoipa::path(
    get,
    path = "/api/v1/certs/ca",
    tag = "certs",
    description = "Requires the viewer role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn list_cas(State(state): State<AppState>, _: Operator) -> ApiResult<Response> {
    let data = state.store.list_cas().await?.into_iter().map(ca_view).collect();
    Ok(axum::Json(Page::<CaCert> { data, next_cursor: None }).into_response())
}

async fn activate(state: &AppState, ca: NewCa, op: &Operator, ctx: &AuditContext, action: &str) -> ApiResult<Response> {
    let details = json!({"serial": ca.serial});
    let audit = state.audit_entry(ctx, AuditEvent::by_user(op.name(), action, ca.serial.clone(), details));
    let (record, heads) = state.store.activate_ca(ca, audit).await?;
    state.notifier.publish(StreamEvent::Heads(heads));
    tracing::info!(serial = %record.serial, "A new CA signs from now on; the previous one stays trusted until retired");
    Ok((StatusCode::CREATED, axum::Json(Data { data: ca_view(record) })).into_response())
}

/// `POST /api/v1/certs/ca/rotate`: a new CA signs from now on; agents get
/// new certificates from it and trust both until the old one is retired.
#[utoipa::path(
    post,
    path = "/api/v1/certs/ca/rotate",
    tag = "certs",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "The new signing CA", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn rotate_ca(State(state): State<AppState>, op: Operator, ctx: AuditContext) -> ApiResult<Response> {
    let ca = pki::new_ca(&state.sealer, state.clock.now_ms()).map_err(ApiError::internal)?;
    activate(&state, ca, &op, &ctx, "ca.rotate").await
}

/// `POST /api/v1/certs/ca/import`: an operator's CA signs from now on.
#[utoipa::path(
    post,
    path = "/api/v1/certs/ca/import",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 201, description = "The new signing CA", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn import_ca(
    State(state): State<AppState>,
    op: Operator,
    ctx: AuditContext,
    ApiJson(req): ApiJson<ImportCa>,
) -> ApiResult<Response> {
    let ca = pki::check_ca_import(&state.sealer, &req.cert_pem, &req.key_pem, state.clock.now_ms()).map_err(bad)?;
    activate(&state, ca, &op, &ctx, "ca.import").await
}

/// `POST /api/v1/certs/ca/retire`: stop trusting every CA but the active one.
#[utoipa::path(
    post,
    path = "/api/v1/certs/ca/retire",
    tag = "certs",
    description = "Requires the admin role.",
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn retire_cas(State(state): State<AppState>, op: Operator, ctx: AuditContext) -> ApiResult<Response> {
    let audit = state.audit_entry(&ctx, AuditEvent::by_user(op.name(), "ca.retire", "ca".into(), json!({})));
    let (retired, heads) = state.store.retire_cas(state.clock.now_ms(), audit).await?;
    state.notifier.publish(StreamEvent::Heads(heads));
    Ok(axum::Json(Data { data: json!({"retired": retired}) }).into_response())
}

/// One of the caller's certificates.
async fn own_cert(state: &AppState, agent: &AgentCaller, id: i64) -> ApiResult<CertRecord> {
    let certs = state.store.agent_certs(agent.id).await?;
    certs.into_iter().find(|c| c.id == id).ok_or_else(|| ApiError::not_found("certificate"))
}

/// `GET /api/v1/agents/self/certs`: the certificates the caller must hold.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/certs",
    tag = "certs",
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn own(State(state): State<AppState>, agent: AgentCaller) -> ApiResult<Response> {
    let data: Vec<AgentCert> = state
        .store
        .agent_certs(agent.id)
        .await?
        .into_iter()
        .map(|c| AgentCert {
            cert_id: c.id,
            name: c.name,
            source: c.source,
            version: c.version,
            serial: c.serial,
            dns_names: c.dns_names,
            ip_addresses: c.ip_addresses,
            group: c.group,
            hook: c.hook,
        })
        .collect();
    Ok(axum::Json(Data { data }).into_response())
}

/// `GET /api/v1/agents/self/certs/{id}`: an uploaded certificate's material,
/// its key unsealed for the holder.
#[utoipa::path(
    get,
    path = "/api/v1/agents/self/certs/{id}",
    tag = "certs",
    params(("id" = i64, Path)),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn material(
    State(state): State<AppState>,
    agent: AgentCaller,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let cert = own_cert(&state, &agent, id).await?;
    if cert.source != CertSource::Uploaded {
        return Err(ApiError::bad_request("id", "an issued certificate has no material here: send a CSR (…/csr)"));
    }
    let key_pem = state.sealer.open_cert_key(&cert).map_err(ApiError::internal)?;
    let (Some(serial), Some(not_after), Some(cert_pem)) = (cert.serial, cert.not_after, cert.cert_pem) else {
        return Err(ApiError::internal(format!("uploaded certificate {id} has no material")));
    };
    let body = CertMaterial {
        version: cert.version,
        serial,
        cert_pem,
        key_pem,
        chain_pem: cert.chain_pem.unwrap_or_default(),
        not_after: rfc3339(not_after),
    };
    Ok(axum::Json(Data { data: body }).into_response())
}

/// `POST /api/v1/agents/self/certs/{id}/csr`: the active CA signs the
/// caller's CSR for an issued certificate. Names outside the assignment are
/// refused and audited.
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/certs/{id}/csr",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
    params(("id" = i64, Path)),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn sign(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<SignRequest>,
) -> ApiResult<Response> {
    if req.csr_pem.len() > tether_proto::certs::MAX_PEM_BYTES {
        return Err(ApiError::bad_request("csr_pem", "csr_pem is too long"));
    }
    let cert = own_cert(&state, &agent, id).await?;
    if cert.source != CertSource::Issued {
        return Err(ApiError::bad_request("id", "an uploaded certificate is not signed here: fetch its material"));
    }
    let cas = state.store.list_cas().await?;
    let ca = cas.iter().find(|c| c.active).ok_or_else(|| ApiError::internal("no active CA"))?;
    let now = state.clock.now_ms();
    let actor = agent.id.to_string();
    let signed = match pki::sign_csr(&state.sealer, ca, &cert, &req.csr_pem, now).map_err(ApiError::internal)? {
        Ok(signed) => signed,
        Err(refusal) => {
            if let SignRefusal::NamesOutside(names) = &refusal {
                let event = AuditEvent {
                    actor: &actor,
                    actor_kind: "agent",
                    action: "cert.csr_refused",
                    target: id.to_string(),
                    outcome: "denied",
                    details: json!({"name": cert.name, "names_outside": names}),
                };
                state.audit(&ctx, event).await;
            }
            return Err(ApiError::bad_request("csr_pem", refusal.to_string()));
        }
    };
    let record = IssuedRecord {
        serial: signed.facts.serial.clone(),
        cert_id: id,
        agent_id: agent.id,
        ca_id: ca.id,
        version: cert.version,
        not_after: signed.facts.not_after,
        now,
    };
    let event = AuditEvent {
        actor: &actor,
        actor_kind: "agent",
        action: "cert.issued",
        target: id.to_string(),
        outcome: "ok",
        details: json!({"name": cert.name, "serial": signed.facts.serial, "ca": ca.serial}),
    };
    state.store.record_issued(record, state.audit_entry(&ctx, event)).await?;
    let ca_pem = cas.iter().map(|c| c.cert_pem.trim_end()).collect::<Vec<_>>().join("\n") + "\n";
    let body = IssuedCert {
        version: cert.version,
        serial: signed.facts.serial,
        cert_pem: signed.cert_pem,
        ca_pem,
        not_before: rfc3339(signed.facts.not_before),
        not_after: rfc3339(signed.facts.not_after),
    };
    Ok(axum::Json(Data { data: body }).into_response())
}

/// `POST /api/v1/agents/self/certs/{id}/status`
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/certs/{id}/status",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
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
    super::files::report(&state, &agent, ItemKind::Cert, id, body).await
}

/// `POST /api/v1/agents/self/certs/{id}/renew`: an agent asks for its
/// certificate to be renewed (audited, for an operator to act on).
#[utoipa::path(
    post,
    path = "/api/v1/agents/self/certs/{id}/renew",
    request_body(content = serde_json::Value, content_type = "application/json", description = "See protocol.md §15"),
    tag = "certs",
    params(("id" = i64, Path)),
    security(("agent_token" = [])),
    responses(
        (status = 202, description = "Success", body = crate::api::openapi::DataAny),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn request_renewal(
    State(state): State<AppState>,
    agent: AgentCaller,
    ctx: AuditContext,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> ApiResult<Response> {
    if req.reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::bad_request("reason", format!("reason is longer than {MAX_REASON_BYTES} bytes")));
    }
    let cert = own_cert(&state, &agent, id).await?;
    let actor = agent.id.to_string();
    let event = AuditEvent {
        actor: &actor,
        actor_kind: "agent",
        action: "cert.renewal_requested",
        target: id.to_string(),
        outcome: "reported",
        details: json!({"name": cert.name, "serial": cert.serial, "reason": req.reason}),
    };
    state.audit(&ctx, event).await;
    tracing::warn!(agent = %agent.id, cert = %cert.name, "An agent asks for its certificate to be renewed");
    Ok((StatusCode::ACCEPTED, axum::Json(Data { data: json!({"requested": true}) })).into_response())
}
