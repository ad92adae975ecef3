//! The routes of the five seed designs tether replaces (protocol.md §16,
//! docs/compat.md): thin adapters that parse a seed's shapes, call the same
//! service functions as the native routes and map the answers back. One
//! file per seed, each with its own route table; `--no-seed-routes`
//! (`ServerConfig::seed_routes`) leaves them all unmounted.

mod s000;
mod s001;
mod s002;
mod s003;
mod s004;

use crate::api::RouteSpec;
use crate::state::AppState;

/// The seed route tables, for the access rules (`api::access_of`).
pub const TABLES: &[&[RouteSpec]] = &[s000::ROUTES, s001::ROUTES, s002::ROUTES, s003::ROUTES, s004::ROUTES];

/// Without the seed routes (`--no-seed-routes`), their paths answer 404 as
/// unknown paths do, also where a native pattern would take them (seed
/// 004's `/api/v1/agents/register` under `/api/v1/agents/{id}` would be 405).
pub fn unmounted() -> axum::Router<AppState> {
    let native = |path: &str| crate::api::ROUTES.iter().any(|r| r.path == path);
    let paths: std::collections::BTreeSet<&str> =
        TABLES.iter().flat_map(|t| t.iter()).map(|r| r.path).filter(|p| !native(p)).collect();
    paths.into_iter().fold(axum::Router::new(), |router, path| {
        router.route(path, axum::routing::any(|| async { axum::http::StatusCode::NOT_FOUND }))
    })
}

/// Every seed route.
pub fn router(state: &AppState) -> axum::Router<AppState> {
    axum::Router::new()
        .merge(s000::router(state))
        .merge(s001::router(state))
        .merge(s002::router(state))
        .merge(s003::router(state))
        .merge(s004::router(state))
}
