//! The agent WebSocket (protocol.md §9): the frames each side sends, the
//! close codes and the limits. It carries what long-poll and the report
//! routes carry, in the same JSON, so both paths share one meaning.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::command::{ResultReport, StatusReport};
use crate::signal::Updates;
use crate::{CommandId, ErrorBody};

/// `GET` here with `Upgrade: websocket`, authenticated (and signed) like
/// `GET /api/v1/agents/self/updates`; `?cursor=<epoch>-<seq>` as there,
/// absent for "from the start of the retained stream".
pub const PATH: &str = "/api/v1/agents/self/ws";

/// Largest message (and frame) either side sends or accepts.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// The server pings this often.
pub const PING_INTERVAL_S: u64 = 20;

/// No frame at all (a ping included) for this long means the connection is
/// dead: three pings missed.
pub const IDLE_TIMEOUT_S: u64 = 60;

/// Server → agent text frames.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Exactly the body of an `updates` 200: the backlog after the cursor at
    /// once, then whatever is appended.
    Signals(Updates),
    /// The answer to the agent frame with the same id.
    Reply(Reply),
    /// A frame type this agent does not know yet: ignored, like unknown signals.
    #[serde(other)]
    Unknown,
}

/// `{"type":"reply","id":n,"error":null,"data":…}` or
/// `{"type":"reply","id":n,"error":{…}}`; `error` is the HTTP envelope's `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// The agent frame's id; `null` only when the server could not read one
    /// from the frame it answers.
    pub id: Option<u64>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Reply {
    pub fn ok(id: u64, data: Value) -> Self {
        Self { id: Some(id), error: None, data }
    }

    pub fn error(id: u64, error: ErrorBody) -> Self {
        Self { id: Some(id), error: Some(error), data: Value::Null }
    }

    /// The `data` of a success, or the error object.
    pub fn into_result(self) -> Result<Value, ErrorBody> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.data),
        }
    }
}

/// Agent → server text frames; each gets exactly one [`Reply`]. `id` is
/// chosen by the agent, unique per connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentFrame {
    /// The body of `POST /api/v1/agents/self/heartbeat`: free-form like
    /// there (protocol.md §2), so it stays a JSON object here.
    Heartbeat { id: u64, body: Value },
    /// The body of `POST /api/v1/agents/self/commands/{command_id}/status`.
    Status { id: u64, command_id: CommandId, body: StatusReport },
    /// The body of `POST /api/v1/agents/self/commands/{command_id}/result`.
    Result { id: u64, command_id: CommandId, body: ResultReport },
}

impl AgentFrame {
    pub fn id(&self) -> u64 {
        match self {
            Self::Heartbeat { id, .. } | Self::Status { id, .. } | Self::Result { id, .. } => *id,
        }
    }
}

/// Close codes the server ends a connection with.
pub mod close {
    use crate::ErrorKey;

    /// Normal closure: reconnect (with jitter).
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown, restart): reconnect with jitter.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame the server could not take (malformed, unknown type).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame over [`super::MAX_FRAME_BYTES`].
    pub const TOO_BIG: u16 = 1009;
    /// Overloaded: try again later.
    pub const TRY_LATER: u16 = 1013;
    /// The access token expired or is invalid: refresh it and reconnect.
    pub const TOKEN_EXPIRED: u16 = 4401;
    /// The agent was revoked: stop, like `DEVICE_REVOKED`.
    pub const REVOKED: u16 = 4403;
    /// The cursor is outside the retained stream: resync, like a 409 on `updates`.
    pub const CURSOR_EXPIRED: u16 = 4409;

    /// What a close code means in the terms of the HTTP error table
    /// (protocol.md §2), for the codes that mean more than "reconnect".
    pub fn error_key(code: u16) -> Option<ErrorKey> {
        Some(match code {
            POLICY_VIOLATION => ErrorKey::BadRequest,
            TOO_BIG => ErrorKey::PayloadTooLarge,
            TRY_LATER => ErrorKey::ServiceUnavailable,
            TOKEN_EXPIRED => ErrorKey::TokenExpired,
            REVOKED => ErrorKey::DeviceRevoked,
            CURSOR_EXPIRED => ErrorKey::CursorExpired,
            _ => return None,
        })
    }

    /// The close code for an error that ends a connection, if it has one.
    pub fn for_key(key: ErrorKey) -> Option<u16> {
        Some(match key {
            ErrorKey::BadRequest => POLICY_VIOLATION,
            ErrorKey::PayloadTooLarge => TOO_BIG,
            ErrorKey::ServiceUnavailable | ErrorKey::RateLimited => TRY_LATER,
            ErrorKey::TokenExpired | ErrorKey::Unauthenticated => TOKEN_EXPIRED,
            ErrorKey::DeviceRevoked => REVOKED,
            ErrorKey::CursorExpired => CURSOR_EXPIRED,
            _ => return None,
        })
    }
}

/// The HTTP status an error object stands for: by its key, else guessed
/// from its numeric code (`40901` → 409, `5003` → 500).
pub fn error_status(error: &ErrorBody) -> u16 {
    if let Some(key) = error.key() {
        return key.status();
    }
    let code = error.code;
    let status = if code >= 10_000 { code / 100 } else { code / 10 };
    u16::try_from(status).ok().filter(|s| (400..600).contains(s)).unwrap_or(500)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ErrorKey;
    use crate::command::CommandStatus;

    #[test]
    fn server_frames_parse_from_the_documented_json() {
        let signals: ServerFrame = serde_json::from_value(json!({
            "type": "signals", "cursor": "7-12",
            "signals": [{"type": "command.queued", "ts_ms": 5, "ref": {"command_id": "x"}}]
        }))
        .expect("signals");
        let ServerFrame::Signals(updates) = &signals else { panic!("{signals:?}") };
        assert_eq!((updates.cursor.as_str(), updates.signals.len()), ("7-12", 1));
        assert_eq!(updates.signals[0].kind, "command.queued");

        let ok: ServerFrame =
            serde_json::from_value(json!({"type": "reply", "id": 3, "error": null, "data": {"ok": true}})).expect("ok");
        assert_eq!(ok, ServerFrame::Reply(Reply::ok(3, json!({"ok": true}))));
        let err: ServerFrame = serde_json::from_value(json!({"type": "reply", "id": 4, "error": {
            "code": 40902, "key": "CONFLICT", "what": "command is finished", "params": {}, "request_id": "req_1"
        }}))
        .expect("error");
        let ServerFrame::Reply(reply) = err else { panic!() };
        let body = reply.into_result().expect_err("an error reply");
        assert_eq!((body.key(), error_status(&body)), (Some(ErrorKey::Conflict), 409));

        // A newer server's frame type is not an error.
        let unknown: ServerFrame = serde_json::from_value(json!({"type": "notice", "text": "hi"})).expect("unknown");
        assert_eq!(unknown, ServerFrame::Unknown);
        // Round trip of what a server would send.
        let text = serde_json::to_string(&ServerFrame::Reply(Reply::ok(9, Value::Null))).expect("json");
        assert_eq!(text, r#"{"type":"reply","id":9,"error":null}"#);
        // A reply to a frame without a readable id, with `data` spelled out.
        let anonymous: ServerFrame =
            serde_json::from_value(json!({"type": "reply", "id": null, "error": null, "data": null})).expect("null id");
        assert_eq!(anonymous, ServerFrame::Reply(Reply { id: None, error: None, data: Value::Null }));
    }

    #[test]
    fn agent_frames_serialize_to_the_documented_json_and_refuse_unknown_fields() {
        let id: CommandId = "0190a5b4-8d2e-7c3f-9a1b-2c3d4e5f6a7b".parse().expect("id");
        let frame = AgentFrame::Status { id: 2, command_id: id, body: StatusReport { state: CommandStatus::Running } };
        let value = serde_json::to_value(&frame).expect("json");
        assert_eq!(
            value,
            json!({"type": "status", "id": 2, "command_id": id.to_string(), "body": {"state": "running"}})
        );
        assert_eq!(serde_json::from_value::<AgentFrame>(value).expect("back"), frame);

        let beat = AgentFrame::Heartbeat { id: 1, body: json!({"uptime_s": 5, "extra": "kept"}) };
        assert_eq!(serde_json::to_value(&beat).expect("json")["body"]["extra"], "kept");
        let result = AgentFrame::Result { id: 7, command_id: id, body: ResultReport::new(CommandStatus::Succeeded) };
        let value = serde_json::to_value(&result).expect("json");
        assert_eq!((value["type"].as_str(), value["body"]["status"].as_str()), (Some("result"), Some("succeeded")));
        assert_eq!(result.id(), 7);

        let bad = json!({"type": "heartbeat", "id": 1, "body": {}, "sneaky": 1});
        assert!(serde_json::from_value::<AgentFrame>(bad).is_err());
        let bad_body =
            json!({"type": "status", "id": 1, "command_id": id.to_string(), "body": {"state": "running", "x": 1}});
        assert!(serde_json::from_value::<AgentFrame>(bad_body).is_err());
    }

    #[test]
    fn close_codes_and_error_keys_correspond() {
        for code in [
            close::POLICY_VIOLATION,
            close::TOO_BIG,
            close::TRY_LATER,
            close::TOKEN_EXPIRED,
            close::REVOKED,
            close::CURSOR_EXPIRED,
        ] {
            let key = close::error_key(code).expect("a meaning");
            assert_eq!(close::for_key(key), Some(code), "{key:?}");
        }
        assert_eq!(close::error_key(close::NORMAL), None);
        assert_eq!(close::error_key(close::GOING_AWAY), None);
        assert_eq!(close::for_key(ErrorKey::NotFound), None);
    }

    #[test]
    fn error_status_follows_the_key_then_the_code() {
        let body = |code: u32, key: &str| ErrorBody {
            code,
            key: key.into(),
            what: String::new(),
            params: Default::default(),
            request_id: String::new(),
        };
        assert_eq!(error_status(&body(4001, "TOKEN_EXPIRED")), 401);
        assert_eq!(error_status(&body(42201, "SOMETHING_NEW")), 422);
        assert_eq!(error_status(&body(4290, "SOMETHING_NEW")), 429);
        assert_eq!(error_status(&body(7, "SOMETHING_NEW")), 500);
    }
}
