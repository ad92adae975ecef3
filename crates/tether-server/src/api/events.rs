//! `GET /api/v1/events`: the dashboard's live feed as Server-Sent Events
//! (protocol.md §9). The feed is the audit log read forward: every change
//! worth showing (agents going online or offline, commands created,
//! cancelled and finished, configuration and certificate changes,
//! expiring certificates) already writes an audit row in the transaction
//! that makes it, so the feed is durable, ordered, the same on every
//! replica, and resumable from any row id with `Last-Event-ID`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tether_proto::user::AuditRow;
use tether_store::{AuditFilter, Role};
use tokio::sync::OwnedSemaphorePermit;

use crate::api::audit::row;
use crate::auth::Operator;
use crate::error::{ApiError, ApiQuery, ApiResult};
use crate::state::AppState;

/// Feeds open at once on one server; each reads the audit log once a second.
pub const MAX_EVENT_STREAMS: usize = 256;
/// How often a feed looks for new rows: an agent going offline shows on an
/// open dashboard well within 5 s.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A feed ends after this long and the browser reconnects at once (with
/// `Last-Event-ID`), so a logged-out session or a revoked token stops
/// receiving events within it.
const MAX_STREAM_LIFETIME: Duration = Duration::from_secs(300);
const ROWS_PER_READ: u32 = 200;
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What users other than admins see: the fleet's state, which they can read
/// through the API anyway. User, token and server events are for admins.
const FLEET_EVENTS: &[&str] = &["agent.", "command.", "batch.", "config.", "cert.", "file."];

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Resume after this event id (the `Last-Event-ID` header wins).
    after: Option<i64>,
}

/// `GET /api/v1/events`: `id` is the audit row id, `event` its action,
/// `data` the row as `GET /api/v1/audit` shows it. Without `Last-Event-ID`
/// (or `?after=`) the feed starts with the next event.
/// One event of the feed as an SSE client reads it: documents the wire
/// form for the OpenAPI document; the stream itself is written by axum's
/// `Event`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "a schema only, never built")]
pub struct FeedEvent {
    /// The audit row's id: `Last-Event-ID` resumes after it.
    id: String,
    /// The audit action, e.g. `agent.offline`.
    event: String,
    /// The audit row as JSON.
    data: String,
}

#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "audit",
    description = "Requires the viewer role. Admins see every event; other users the fleet's (agents, commands, batches, configs, certificates, files), without client addresses.",
    params(EventsQuery),
    security(("bearer" = []), ("basic" = []), ("session" = [], "csrf" = [])),
    responses(
        (status = 200, description = "text/event-stream of audit rows", content_type = "text/event-stream", body = FeedEvent),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn stream(
    State(state): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Response> {
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID", "Last-Event-ID must be an event id"))?,
        ),
        None => q.after,
    };
    let permit = state.event_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable("too many event streams are open; try again shortly", crate::error::STORE_RETRY_AFTER_S)
    })?;
    let after = match resume {
        Some(id) => id,
        None => newest_event(&state).await?,
    };
    let feed = Feed {
        state,
        after,
        admin: op.user.role == Role::Admin,
        pending: VecDeque::new(),
        ends: tokio::time::Instant::now() + MAX_STREAM_LIFETIME,
        _permit: permit,
    };
    // The first message tells the browser to reconnect after 1 s when the feed ends.
    let hello =
        futures::stream::once(async { Ok::<_, Infallible>(Event::default().retry(POLL_INTERVAL).comment("hello")) });
    let events = futures::stream::unfold(feed, |mut feed| async move {
        let row = feed.next().await?;
        let event = Event::default().id(row.id.to_string()).event(row.action.clone()).json_data(&row);
        Some((event.map_err(|e| tracing::error!(error = %e, "Encoding an event failed")), feed))
    });
    let events = futures::StreamExt::filter_map(events, |e| async move { e.ok().map(Ok::<_, Infallible>) });
    let body = futures::StreamExt::chain(hello, events);
    Ok(Sse::new(body).keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive")).into_response())
}

/// The id of the newest audit row, 0 when there is none.
async fn newest_event(state: &AppState) -> ApiResult<i64> {
    let newest = state.store.query_audit(&AuditFilter { limit: 1, ..AuditFilter::default() }).await?;
    Ok(newest.first().map_or(0, |r| r.id))
}

/// One open feed: where it is in the audit log and what it may show.
struct Feed {
    state: AppState,
    after: i64,
    admin: bool,
    pending: VecDeque<AuditRow>,
    ends: tokio::time::Instant,
    _permit: OwnedSemaphorePermit,
}

impl Feed {
    /// The next event this user may see; `None` ends the feed.
    async fn next(&mut self) -> Option<AuditRow> {
        loop {
            if let Some(row) = self.pending.pop_front() {
                return Some(row);
            }
            if self.state.shutdown.is_cancelled() || tokio::time::Instant::now() >= self.ends {
                return None;
            }
            match self.state.store.list_audit(self.after, ROWS_PER_READ).await {
                Ok(rows) => {
                    let full = rows.len() == ROWS_PER_READ as usize;
                    if let Some(last) = rows.last() {
                        self.after = last.id;
                    }
                    self.pending.extend(rows.into_iter().map(row).filter_map(|r| visible(r, self.admin)));
                    if full || !self.pending.is_empty() {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Reading the event feed failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                () = self.state.shutdown.cancelled() => return None,
            }
        }
    }
}

/// The row as this user may see it, or `None`.
fn visible(mut row: AuditRow, admin: bool) -> Option<AuditRow> {
    if admin {
        return Some(row);
    }
    if !FLEET_EVENTS.iter().any(|prefix| row.action.starts_with(prefix)) {
        return None;
    }
    row.ip = None;
    row.request_id = None;
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit_row(action: &str) -> AuditRow {
        AuditRow {
            id: 1,
            ts: time::OffsetDateTime::UNIX_EPOCH,
            actor: "alice".into(),
            actor_kind: "user".into(),
            action: action.into(),
            target: "x".into(),
            outcome: "ok".into(),
            ip: Some("192.0.2.1".into()),
            request_id: Some("req_1".into()),
            details: serde_json::json!({}),
            hash: String::new(),
        }
    }

    #[test]
    fn other_users_see_fleet_events_without_client_addresses() {
        let shown = visible(audit_row("agent.offline"), false).expect("fleet event");
        assert_eq!((shown.ip, shown.request_id), (None, None));
        assert!(visible(audit_row("command.result"), false).is_some());
        assert!(visible(audit_row("user.create"), false).is_none());
        assert!(visible(audit_row("token.create"), false).is_none());
    }

    #[test]
    fn admins_see_every_event_whole() {
        let shown = visible(audit_row("user.create"), true).expect("admin");
        assert_eq!(shown.ip.as_deref(), Some("192.0.2.1"));
    }
}
