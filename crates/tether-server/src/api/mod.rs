//! The route table: every endpoint of the server, in one place (the seed
//! designs' routes in [`seed`], one table per seed).

/// Declares every route once: the router and the access table are both
/// generated from this list, so no route can exist without an access rule.
/// Used here for the native routes and in [`seed`] for each seed's.
macro_rules! route_table {
    ($( $access:ident $method:ident $path:literal => $handler:path ),* $(,)?) => {
        /// Every route of this table with the callers it admits (protocol.md §15).
        pub const ROUTES: &[$crate::api::RouteSpec] = &[
            $( $crate::api::RouteSpec { method: stringify!($method), path: $path, access: $crate::api::Access::$access } ),*
        ];

        pub fn router(state: &$crate::state::AppState) -> axum::Router<$crate::state::AppState> {
            axum::Router::new() $( .route($path, $crate::auth::signing::for_access(state, $crate::api::Access::$access, axum::routing::$method($handler))) )*
        }
    };
}

mod agents;
mod audit;
mod certs;
mod commands;
mod configs;
pub mod device;
pub mod enroll;
mod etag;
mod events;
mod files;
pub mod health;
mod heartbeat;
mod metrics;
pub mod openapi;
mod page;
pub mod prometheus;
mod seed;
mod session;
mod stream;
mod telemetry;
mod tokens;
mod users;
mod ws;

use axum::Router;
use axum::extract::DefaultBodyLimit;

use crate::state::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (health, enrollment, token endpoints).
    Public,
    /// An agent access token; the agent sees only its own resources.
    Agent,
    /// Any signed-in user, acting on their own resources.
    AnyUser,
    Viewer,
    Operator,
    Admin,
}

/// One row of the route table.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

route_table! {
    Public   get    "/healthz" => health::healthz,
    Public   get    "/readyz" => health::readyz,
    // Agent identity.
    Public   post   "/api/v1/agents/enroll" => enroll::enroll,
    Public   post   "/api/v1/auth/token/refresh" => enroll::refresh,
    Public   post   "/oauth/token" => enroll::oauth_token,
    Public   post   "/oauth/device_authorization" => device::authorization,
    Public   get    "/device" => device::page_get,
    Public   post   "/device" => device::page_post,
    Operator post   "/api/v1/device/approve" => device::approve,
    Operator post   "/api/v1/device/deny" => device::deny,
    // The agent's own stream and reports.
    Agent    get    "/api/v1/agents/self/updates" => stream::updates,
    Agent    get    "/api/v1/agents/self/commands/next" => stream::next_command,
    Agent    get    "/api/v1/agents/self/ws" => ws::connect,
    Agent    get    "/api/v1/agents/self/config" => configs::own,
    Agent    post   "/api/v1/agents/self/commands/{id}/status" => commands::report_status,
    Agent    post   "/api/v1/agents/self/commands/{id}/result" => commands::report_result,
    Agent    post   "/api/v1/agents/self/heartbeat" => heartbeat::heartbeat,
    Agent    post   "/api/v1/agents/self/metrics" => telemetry::ingest,
    Agent    post   "/api/v1/agents/self/inventory" => telemetry::change_inventory,
    Agent    put    "/api/v1/agents/self/inventory" => telemetry::replace_inventory,
    Agent    post   "/api/v1/agents/self/audit" => audit::agent_append,
    Agent    get    "/api/v1/agents/self/files" => files::own,
    Agent    get    "/api/v1/agents/self/files/{sha256}" => files::download,
    Agent    post   "/api/v1/agents/self/files/{id}/status" => files::report_status,
    Agent    get    "/api/v1/agents/self/certs" => certs::own,
    Agent    get    "/api/v1/agents/self/certs/{id}" => certs::material,
    Agent    post   "/api/v1/agents/self/certs/{id}/csr" => certs::sign,
    Agent    post   "/api/v1/agents/self/certs/{id}/status" => certs::report_status,
    Agent    post   "/api/v1/agents/self/certs/{id}/renew" => certs::request_renewal,
    // Operators.
    Public   post   "/api/v1/auth/login" => session::login,
    AnyUser  post   "/api/v1/auth/logout" => session::logout,
    AnyUser  get    "/api/v1/auth/session" => session::current,
    AnyUser  post   "/api/v1/tokens" => tokens::create,
    AnyUser  get    "/api/v1/tokens" => tokens::list,
    AnyUser  delete "/api/v1/tokens/{id}" => tokens::revoke,
    Admin    get    "/api/v1/users" => users::list,
    Admin    post   "/api/v1/users" => users::create,
    Admin    patch  "/api/v1/users/{id}" => users::update,
    Admin    delete "/api/v1/users/{id}" => users::delete,
    Viewer   get    "/api/v1/agents" => agents::list,
    Viewer   get    "/api/v1/agents/{id}" => agents::get,
    Operator patch  "/api/v1/agents/{id}" => agents::update,
    Operator delete "/api/v1/agents/{id}" => agents::delete,
    Viewer   get    "/api/v1/agents/{id}/metrics" => telemetry::query,
    Viewer   get    "/api/v1/agents/{id}/inventory" => telemetry::inventory,
    Viewer   get    "/api/v1/agents/{id}/config" => configs::agent_config,
    Operator post   "/api/v1/agents/{id}/revoke" => agents::revoke,
    Viewer   get    "/api/v1/agents/{id}/commands" => commands::list_for_agent,
    Operator post   "/api/v1/enroll-tokens" => agents::create_enroll_token,
    Operator get    "/api/v1/enroll-tokens" => agents::list_enroll_tokens,
    Operator delete "/api/v1/enroll-tokens/{id}" => agents::revoke_enroll_token,
    Operator post   "/api/v1/commands" => commands::create,
    Viewer   get    "/api/v1/commands" => commands::list,
    Viewer   get    "/api/v1/commands/{id}" => commands::get,
    Operator post   "/api/v1/commands/{id}/cancel" => commands::cancel,
    Viewer   get    "/api/v1/batches/{id}" => commands::get_batch,
    Operator post   "/api/v1/batches/{id}/cancel" => commands::cancel_batch,
    Viewer   get    "/api/v1/configs" => configs::list,
    Viewer   get    "/api/v1/configs/{scope}" => configs::get,
    Operator put    "/api/v1/configs/{scope}" => configs::put,
    Viewer   get    "/api/v1/configs/{scope}/history" => configs::history,
    Operator post   "/api/v1/configs/{scope}/rollback" => configs::rollback,
    Viewer   get    "/api/v1/configs/{scope}/status" => configs::status,
    Operator post   "/api/v1/files" => files::upload,
    Operator post   "/api/v1/files/assignments" => files::assign,
    Viewer   get    "/api/v1/files/assignments" => files::list,
    Viewer   get    "/api/v1/files/assignments/{id}" => files::get,
    Operator delete "/api/v1/files/assignments/{id}" => files::unassign,
    Viewer   get    "/api/v1/files/assignments/{id}/status" => files::status,
    Operator post   "/api/v1/certs" => certs::upload,
    Viewer   get    "/api/v1/certs" => certs::list,
    Operator post   "/api/v1/certs/issued" => certs::issue,
    Viewer   get    "/api/v1/certs/ca" => certs::list_cas,
    Admin    post   "/api/v1/certs/ca/rotate" => certs::rotate_ca,
    Admin    post   "/api/v1/certs/ca/import" => certs::import_ca,
    Admin    post   "/api/v1/certs/ca/retire" => certs::retire_cas,
    Viewer   get    "/api/v1/certs/{id}" => certs::get,
    Operator post   "/api/v1/certs/{id}/replace" => certs::replace,
    Operator post   "/api/v1/certs/{id}/revoke" => certs::revoke,
    Viewer   get    "/api/v1/certs/{id}/status" => certs::status,
    AnyUser  get    "/api/v1/audit" => audit::list,
    Viewer   get    "/api/v1/events" => events::stream,
    Admin    get    "/api/v1/audit/verify" => audit::verify,
    Admin    get    "/api/v1/metrics" => metrics::get,
    Public   get    "/metrics" => prometheus::get,
    Public   get    "/api/openapi.json" => openapi::document,
    Public   get    "/docs" => openapi::docs_redirect,
    Public   get    "/docs/" => openapi::docs_index,
    Public   get    "/docs/{file}" => openapi::docs_file,
}

/// The stream long-poll route, rate-limited by its own rule (protocol.md §4).
pub const UPDATES_PATH: &str = "/api/v1/agents/self/updates";

/// Seed 003's alias of [`UPDATES_PATH`] (`seed/s003.rs`), under the same rule.
pub const SEED_UPDATES_PATH: &str = "/apiv1/devices/self/updates";

pub use events::MAX_EVENT_STREAMS;

/// The access rule of the route that matched `method` and `path` (a route template).
pub fn access_of(method: &axum::http::Method, path: &str) -> Option<Access> {
    std::iter::once(ROUTES)
        .chain(seed::TABLES.iter().copied())
        .flatten()
        .find(|r| r.path == path && r.method.eq_ignore_ascii_case(method.as_str()))
        .map(|r| r.access)
}

pub fn routes(state: AppState) -> Router {
    let seeds = if state.config.seed_routes { seed::router(&state) } else { seed::unmounted() };
    router(&state)
        .merge(seeds)
        .merge(crate::web::router())
        .layer(prometheus::HttpMetricsLayer)
        .layer(DefaultBodyLimit::max(crate::error::DEFAULT_BODY_LIMIT))
        .with_state(state)
}
