//! Seed 003, the certificate agent (docs/compat.md): its update poll, token
//! refresh and install-config fetch over the native stream (protocol.md §4),
//! refresh (§3) and effective configuration (§6). The presentation differs:
//! `config.updated` is shown as the seed's `install.updated`, the poll's
//! `ETag` is the bare cursor, and the refresh answer has the seed's field
//! names. So does one rule: as the seed says, its refresh does not rotate
//! the refresh token.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use serde_json::json;
use tether_proto::agent::RefreshRequest;
use tether_proto::config::ConfigUpdated;
use tether_proto::signal::{CONFIG_UPDATED, Signal, Updates};
use tether_proto::{AgentId, Data};

use crate::api::configs;
use crate::api::enroll::{no_store, refresh_agent_keeping_token};
use crate::api::etag::IfNoneMatch;
use crate::api::stream::{Polled, UpdatesQuery, poll};
use crate::auth::AgentCaller;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::state::{AppState, AuditContext, PublicCaller};

// The poll's path is also `api::SEED_UPDATES_PATH`, which gives it the
// native poll's rate-limit rule.
route_table! {
    Agent  get  "/apiv1/devices/self/updates" => updates,
    Public post "/auth/token/refresh" => refresh,
    Agent  get  "/apiv1/users/{user_id}/devices/{device_id}/install-config" => install_config,
}

/// The seed's name for a change of the device's configuration.
const INSTALL_UPDATED: &str = "install.updated";

/// The configuration hash (hex SHA-256) as the seed's `installs_hash_b64`:
/// the same 32 bytes in standard base64.
fn hash_b64(hex_hash: &str) -> Option<String> {
    hex::decode(hex_hash).ok().map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `config.updated {config_id, version, hash}` as `install.updated
/// {config_id, version, installs_hash_b64}`: the same scope and version,
/// the same hash in base64. Every other signal passes unchanged; the seed's
/// agent ignores types it does not know.
fn present(signal: Signal) -> Signal {
    if signal.kind != CONFIG_UPDATED {
        return signal;
    }
    let Ok(updated) = serde_json::from_value::<ConfigUpdated>(signal.reference.clone()) else { return signal };
    let Some(installs_hash_b64) = hash_b64(&updated.hash) else { return signal };
    Signal {
        kind: INSTALL_UPDATED.to_owned(),
        ts_ms: signal.ts_ms,
        reference: json!({
            "config_id": updated.config_id,
            "version": updated.version,
            "installs_hash_b64": installs_hash_b64,
        }),
    }
}

/// `GET /apiv1/devices/self/updates?cursor=&limit=&wait=`: the native poll;
/// `ETag` is the bare cursor (`1736900123-42`), as the seed shows it.
async fn updates(
    State(state): State<AppState>,
    agent: AgentCaller,
    IfNoneMatch(if_none_match): IfNoneMatch,
    ApiQuery(q): ApiQuery<UpdatesQuery>,
) -> ApiResult<Response> {
    let (cursor, mut res) = match poll(&state, &agent, if_none_match, q).await? {
        Polled::Idle(cursor) => (cursor, StatusCode::NO_CONTENT.into_response()),
        Polled::Signals(cursor, body) => {
            let body = Updates { cursor: body.cursor, signals: body.signals.into_iter().map(present).collect() };
            (cursor, axum::Json(Data { data: body }).into_response())
        }
    };
    if let Ok(tag) = HeaderValue::from_str(&cursor.to_string()) {
        res.headers_mut().insert(header::ETAG, tag);
    }
    Ok(no_store(res))
}

/// The seed's refresh answer, plus the refresh token to present next time:
/// the one presented, which stays valid (the seed's agent never replaces
/// it), unless the native rule rotated a token a native refresh had used.
#[derive(Serialize)]
struct Refreshed {
    access_token: String,
    expires_in: u64,
    token_type: &'static str,
    refresh_token: String,
}

/// `POST /auth/token/refresh {refresh_token, device_public_id}` →
/// `{data:{access_token, expires_in, token_type, refresh_token}}`, without
/// rotating a current refresh token (the seed's "NOT rotated … unless
/// explicitly revoked"; docs/compat.md).
async fn refresh(
    State(state): State<AppState>,
    _: PublicCaller,
    ctx: AuditContext,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Response> {
    let pair = refresh_agent_keeping_token(&state, &ctx, &req).await?;
    let data = Refreshed {
        access_token: pair.access_token,
        expires_in: pair.expires_in,
        token_type: "Bearer",
        refresh_token: pair.refresh_token,
    };
    Ok(no_store(axum::Json(Data { data }).into_response()))
}

/// The install configuration: the effective document as `installs`, its
/// hash as the signal carries it, and in hex as native routes show it.
#[derive(Serialize)]
struct InstallConfig {
    installs: tether_proto::config::Doc,
    installs_hash_b64: Option<String>,
    hash: String,
}

/// `GET /apiv1/users/{user_id}/devices/{device_id}/install-config`: the
/// caller's effective configuration (304 on `If-None-Match` with its hash,
/// as natively). The seed's agent builds the path from its token's `sub`
/// and `device_id` claims, which are both the agent id in tether; any other
/// pair names nothing it may see and is 404, whether it exists or not.
async fn install_config(
    State(state): State<AppState>,
    agent: AgentCaller,
    if_none_match: IfNoneMatch,
    ApiPath((user_id, device_id)): ApiPath<(AgentId, AgentId)>,
) -> ApiResult<Response> {
    if user_id != agent.id || device_id != agent.id {
        return Err(ApiError::not_found("device"));
    }
    configs::own_config(&state, &agent, &if_none_match, |effective| {
        let data = InstallConfig {
            installs_hash_b64: hash_b64(&effective.hash),
            installs: effective.doc,
            hash: effective.hash,
        };
        axum::Json(Data { data }).into_response()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(kind: &str, reference: serde_json::Value) -> Signal {
        Signal { kind: kind.to_owned(), ts_ms: 1_736_900_123_421, reference }
    }

    #[test]
    fn config_updated_is_presented_as_install_updated() {
        let hash = "5bbbb9".repeat(10) + "abcd";
        let shown = present(signal(CONFIG_UPDATED, json!({"config_id": "global", "version": 6, "hash": hash})));
        assert_eq!(shown.kind, INSTALL_UPDATED);
        assert_eq!(shown.ts_ms, 1_736_900_123_421);
        let expected = base64::engine::general_purpose::STANDARD.encode(hex::decode(&hash).expect("hex"));
        assert_eq!(shown.reference, json!({"config_id": "global", "version": 6, "installs_hash_b64": expected}));
        assert!(expected.starts_with("W7u5"), "{expected}");
    }

    #[test]
    fn other_signals_pass_unchanged() {
        let renewed = signal("cert.renewed", json!({"cert_id": "c1", "serial": "04:ab"}));
        assert_eq!(present(renewed.clone()), renewed);
        let odd = signal(CONFIG_UPDATED, json!({"config_id": "global", "version": 1, "hash": "not hex"}));
        assert_eq!(present(odd.clone()), odd);
    }

    #[test]
    fn the_poll_route_is_the_one_exempt_from_the_agent_bucket() {
        // auth::AgentCaller exempts the polls in `api::SEED_UPDATES_PATH`
        // from the agent bucket: it must be this table's poll route.
        assert!(ROUTES.iter().any(|r| r.path == crate::api::SEED_UPDATES_PATH && r.method == "get"));
    }
}
