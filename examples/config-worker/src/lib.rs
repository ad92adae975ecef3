//! A small service configured by tether, the way the config-controller
//! design's worker is (protocol.md §16.3; port 8082 by default). The
//! agent's `post_url` sink sends it every new configuration:
//!
//! - `POST /config` stores the JSON object it is sent (in memory);
//! - `GET /config` shows what it has;
//! - `GET /hit` fetches the configured `url` (30 s timeout) and answers with
//!   what came back; 503 until a configuration with a `url` has arrived.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;
use tokio::sync::RwLock;

/// How long `/hit` waits for the configured URL.
pub const HIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Worker {
    config: Arc<RwLock<Value>>,
    http: reqwest::Client,
}

/// The worker's routes, with an empty configuration.
pub fn app() -> anyhow::Result<axum::Router> {
    let worker = Worker {
        config: Arc::new(RwLock::new(Value::Object(Default::default()))),
        http: reqwest::Client::builder().timeout(HIT_TIMEOUT).build()?,
    };
    Ok(axum::Router::new()
        .route("/config", get(show_config).post(set_config))
        .route("/hit", get(hit))
        .with_state(worker))
}

async fn set_config(State(w): State<Worker>, Json(config): Json<Value>) -> Response {
    if !config.is_object() {
        return (StatusCode::BAD_REQUEST, "a configuration is a JSON object\n").into_response();
    }
    tracing::info!(config = %config, "Configuration received");
    *w.config.write().await = config;
    StatusCode::NO_CONTENT.into_response()
}

async fn show_config(State(w): State<Worker>) -> Json<Value> {
    Json(w.config.read().await.clone())
}

async fn hit(State(w): State<Worker>) -> Response {
    let Some(url) = w.config.read().await.get("url").and_then(Value::as_str).map(str::to_owned) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no url configured yet\n").into_response();
    };
    match w.http.get(&url).send().await {
        Ok(res) => {
            let status = StatusCode::from_u16(res.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            match res.text().await {
                Ok(body) => (status, body).into_response(),
                Err(e) => (StatusCode::BAD_GATEWAY, format!("reading {url}: {e}\n")).into_response(),
            }
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("fetching {url}: {e}\n")).into_response(),
    }
}
