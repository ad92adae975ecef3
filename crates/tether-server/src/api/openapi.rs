//! The OpenAPI 3.1 document of this API (`GET /api/openapi.json`), built
//! from the `#[utoipa::path]` annotations on the handlers, and Swagger UI
//! (`/docs`), served from the copy compiled into the binary: nothing is
//! fetched from elsewhere, at build or at run time. `docs/openapi.json` in
//! the repository is this document; a test keeps the two equal.

use std::sync::{Arc, OnceLock};

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::error::ApiError;

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api/openapi.json";

/// `{"data": …}` for responses whose payload has no schema of its own yet.
#[derive(Debug, utoipa::ToSchema)]
pub struct DataAny {
    /// The payload; see protocol.md for its fields.
    pub data: serde_json::Value,
}

/// `{"data": […], "next_cursor": …}` with untyped items.
#[derive(Debug, utoipa::ToSchema)]
pub struct PageAny {
    pub data: Vec<serde_json::Value>,
    /// `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tether",
        description = "The tether fleet control plane API (docs/protocol.md). Success bodies are `{\"data\": …}` \
                       or `{\"data\": […], \"next_cursor\": …}`; every error is the envelope \
                       `{\"error\": {code, key, what, params, request_id}}`, except the RFC 6749 bodies of `/oauth/*`."
    ),
    paths(
        super::agents::list,
        super::agents::get,
        super::agents::update,
        super::agents::revoke,
        super::agents::delete,
        super::agents::create_enroll_token,
        super::agents::list_enroll_tokens,
        super::agents::revoke_enroll_token,
        super::audit::list,
        super::audit::verify,
        super::audit::agent_append,
        super::certs::upload,
        super::certs::issue,
        super::certs::replace,
        super::certs::revoke,
        super::certs::list,
        super::certs::get,
        super::certs::status,
        super::certs::list_cas,
        super::certs::rotate_ca,
        super::certs::import_ca,
        super::certs::retire_cas,
        super::certs::own,
        super::certs::material,
        super::certs::sign,
        super::certs::report_status,
        super::certs::request_renewal,
        super::commands::create,
        super::commands::list,
        super::commands::list_for_agent,
        super::commands::get,
        super::commands::cancel,
        super::commands::get_batch,
        super::commands::cancel_batch,
        super::commands::report_status,
        super::commands::report_result,
        super::configs::list,
        super::configs::get,
        super::configs::put,
        super::configs::history,
        super::configs::rollback,
        super::configs::status,
        super::configs::agent_config,
        super::configs::own,
        super::device::authorization,
        super::device::approve,
        super::device::deny,
        super::device::page_get,
        super::device::page_post,
        super::enroll::enroll,
        super::enroll::refresh,
        super::enroll::oauth_token,
        super::files::upload,
        super::files::assign,
        super::files::list,
        super::files::get,
        super::files::unassign,
        super::files::status,
        super::files::own,
        super::files::download,
        super::files::report_status,
        super::health::healthz,
        super::health::readyz,
        super::heartbeat::heartbeat,
        super::metrics::get,
        super::prometheus::get,
        super::session::login,
        super::session::logout,
        super::session::current,
        super::telemetry::ingest,
        super::telemetry::change_inventory,
        super::telemetry::replace_inventory,
        super::telemetry::query,
        super::telemetry::inventory,
        super::stream::updates,
        super::stream::next_command,
        super::ws::connect,
        super::events::stream,
        super::tokens::create,
        super::tokens::list,
        super::tokens::revoke,
        super::users::list,
        super::users::create,
        super::users::update,
        super::users::delete,
        document,
        docs_redirect,
        docs_index,
        docs_file,
    ),
    components(schemas(DataAny, PageAny, tether_proto::ErrorEnvelope, tether_proto::ErrorBody)),
    modifiers(&SecuritySchemes),
)]
struct ApiDoc;

/// The credentials the API takes (protocol.md §3).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |format: &str, what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format(format).description(Some(what)).build(),
            )
        };
        components.add_security_scheme("agent_token", bearer("JWT", "An agent access token (EdDSA JWT)."));
        components.add_security_scheme("bearer", bearer("opaque", "An operator API token (`tether_pat_…`)."));
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some("An operator's username and password."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::auth::SESSION_COOKIE,
                "The dashboard session cookie set by `POST /api/v1/auth/login`.",
            ))),
        );
        components.add_security_scheme(
            "csrf",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                crate::auth::CSRF_HEADER,
                "The session's CSRF token (from the login response), required with the session cookie on mutating requests.",
            ))),
        );
    }
}

/// The document, as built from the annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The document pretty-printed, as `docs/openapi.json` holds it (with a trailing newline).
pub fn openapi_json() -> String {
    let mut text = openapi().to_pretty_json().expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

fn cached_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(openapi_json)
}

/// `GET /api/openapi.json`
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value))
)]
pub async fn document() -> Response {
    let mut res = cached_json().into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `GET /docs`: to `/docs/`, so the page's relative asset links resolve.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "meta",
    responses((status = 308, description = "Redirect to `/docs/`"))
)]
pub async fn docs_redirect() -> Redirect {
    Redirect::permanent("/docs/")
}

/// `GET /docs/`: Swagger UI.
#[utoipa::path(
    get,
    path = "/docs/",
    tag = "meta",
    responses(
        (status = 200, description = "Swagger UI", content_type = "text/html", body = String),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn docs_index() -> Response {
    swagger_file("index.html")
}

/// `GET /docs/{file}`: Swagger UI's scripts and styles.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    tag = "meta",
    params(("file" = String, Path, description = "A Swagger UI asset")),
    responses(
        (status = 200, description = "A Swagger UI asset (script, style sheet, image)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = "default", description = "Error envelope (protocol.md §2)", body = tether_proto::ErrorEnvelope),
    )
)]
pub async fn docs_file(Path(file): Path<String>) -> Response {
    swagger_file(&file)
}

fn swagger_file(file: &str) -> Response {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| Arc::new(utoipa_swagger_ui::Config::new([DOCUMENT_PATH])));
    match utoipa_swagger_ui::serve(file, config.clone()) {
        Ok(Some(found)) => {
            let ctype = HeaderValue::from_str(&found.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
            (StatusCode::OK, [(header::CONTENT_TYPE, ctype)], found.bytes.into_owned()).into_response()
        }
        Ok(None) => ApiError::not_found("file").into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document_paths() -> Vec<(String, String)> {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).expect("the document is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .flat_map(|(path, item)| {
                item.as_object().expect("path item").keys().map(move |method| (method.clone(), path.clone()))
            })
            .collect()
    }

    #[test]
    fn every_route_of_the_table_is_in_the_document() {
        let documented = document_paths();
        let missing: Vec<String> = super::super::ROUTES
            .iter()
            .filter(|r| !documented.contains(&(r.method.to_ascii_lowercase(), r.path.to_owned())))
            .map(|r| format!("{} {}", r.method.to_ascii_uppercase(), r.path))
            .collect();
        assert!(
            missing.is_empty(),
            "routes without #[utoipa::path] (or not listed in api/openapi.rs `paths(…)`): {missing:#?}"
        );
    }

    #[test]
    fn every_documented_operation_is_a_route() {
        for (method, path) in document_paths() {
            assert!(
                super::super::ROUTES.iter().any(|r| r.path == path && r.method.eq_ignore_ascii_case(&method)),
                "{method} {path} is documented but is not in the route table"
            );
        }
    }

    #[test]
    fn the_committed_document_is_current() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = openapi_json();
        if std::env::var_os("UPDATE_OPENAPI").is_some_and(|v| v == "1") {
            std::fs::write(&file, &generated).expect("writing docs/openapi.json");
            return;
        }
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is not the generated document; regenerate it with\n  \
             UPDATE_OPENAPI=1 cargo nextest run -p tether-server -E 'test(the_committed_document_is_current)'"
        );
    }

    #[test]
    fn swagger_ui_is_served_from_the_binary_and_points_at_the_document() {
        let index = swagger_file("index.html");
        assert_eq!(index.status(), StatusCode::OK);
        let init = utoipa_swagger_ui::serve(
            "swagger-initializer.js",
            Arc::new(utoipa_swagger_ui::Config::new([DOCUMENT_PATH])),
        )
        .expect("serves")
        .expect("the initializer is embedded");
        assert!(String::from_utf8_lossy(&init.bytes).contains(DOCUMENT_PATH));
        assert_eq!(swagger_file("no-such-file.js").status(), StatusCode::NOT_FOUND);
    }
}
