//! The web dashboard (protocol.md §14): plain HTML, CSS and JavaScript
//! modules from `web/` at the repository root, compiled into the binary in
//! every profile (rust-embed's `debug-embed`), so nothing is read from disk
//! or fetched from elsewhere at run time and a debug binary works from any
//! working directory.
//!
//! `/` and `/ui` redirect to `/ui/`, which serves `index.html`; `/ui/{*path}`
//! serves the assets. The dashboard routes to pages with the URL fragment
//! (`/ui/#/agents/…`), so the server needs no fallback route.
//!
//! These are static files, not API endpoints: they are merged beside the
//! route table (`api::routes`) rather than listed in it, so they stay out of
//! the OpenAPI document and the access table, and need no credentials.
//!
//! A file added under `web/` is picked up when this crate is next compiled;
//! edits to files already embedded rebuild it by themselves.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::error::ApiError;

#[derive(rust_embed::RustEmbed)]
#[folder = "../../web/"]
struct Assets;

/// Where the dashboard lives; `tether up` prints it.
pub const UI_PATH: &str = "/ui/";

/// Every dashboard response carries this policy: scripts, styles, fonts and
/// connections only from this origin, no inline code or styles, no `eval`,
/// no plugins, never framed. Data shown by the dashboard comes from agents
/// (hostnames, facts, command output) and must be treated as hostile: even a
/// slip that put it into markup could not run it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// The dashboard's routes, merged into the server's router by `api::routes`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(to_dashboard))
        .route("/ui", get(to_dashboard))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(asset))
}

/// `GET /` and `GET /ui`: to the dashboard. Temporary, so that a later
/// landing page can take `/` back without browsers remembering this.
async fn to_dashboard() -> Response {
    hardened(Redirect::to(UI_PATH).into_response())
}

/// `GET /ui/`: the dashboard's one HTML page.
async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /ui/{*path}`: a script, style sheet or image of the dashboard.
async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    // Only embedded files exist here: `..` or an absolute path names nothing.
    let Some(file) = Assets::get(path) else {
        return hardened(ApiError::not_found("file").into_response());
    };
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let mut res = if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim().trim_start_matches("W/") == etag))
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut res = file.data.into_owned().into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
        res
    };
    let h = res.headers_mut();
    if let Ok(tag) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, tag);
    }
    // Revalidate every time (a 304 is cheap): after an upgrade the browser
    // must not mix old modules with a new page.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    hardened(res)
}

/// The headers of every dashboard response, errors and redirects included.
fn hardened(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // For browsers that predate `frame-ancestors`.
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// The type of an embedded file, by its extension; `nosniff` makes
/// browsers hold scripts and style sheets to it.
fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        router::<()>().oneshot(req.body(Body::empty()).expect("request")).await.expect("infallible")
    }

    fn header_of(res: &Response, name: header::HeaderName) -> &str {
        res.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    #[tokio::test]
    async fn every_answer_carries_the_strict_headers() {
        for (path, status) in [
            ("/", StatusCode::SEE_OTHER),
            ("/ui", StatusCode::SEE_OTHER),
            ("/ui/", StatusCode::OK),
            ("/ui/js/app.js", StatusCode::OK),
            ("/ui/css/app.css", StatusCode::OK),
            ("/ui/no-such-file.js", StatusCode::NOT_FOUND),
            ("/ui/../Cargo.toml", StatusCode::NOT_FOUND),
        ] {
            let res = get(path, None).await;
            assert_eq!(res.status(), status, "{path}");
            assert_eq!(header_of(&res, header::CONTENT_SECURITY_POLICY), CONTENT_SECURITY_POLICY, "{path}");
            assert_eq!(header_of(&res, header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
            assert_eq!(header_of(&res, header::REFERRER_POLICY), "no-referrer", "{path}");
        }
        assert_eq!(header_of(&get("/", None).await, header::LOCATION), "/ui/");
    }

    #[tokio::test]
    async fn assets_have_their_types_and_revalidate_by_etag() {
        let index = get("/ui/", None).await;
        assert_eq!(header_of(&index, header::CONTENT_TYPE), "text/html; charset=utf-8");
        assert_eq!(
            header_of(&get("/ui/js/app.js", None).await, header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(header_of(&get("/ui/css/app.css", None).await, header::CONTENT_TYPE), "text/css; charset=utf-8");
        let etag = header_of(&index, header::ETAG).to_owned();
        assert!(etag.starts_with('"'), "{etag}");
        let again = get("/ui/", Some(&etag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header_of(&again, header::CONTENT_SECURITY_POLICY), CONTENT_SECURITY_POLICY);
    }

    /// Whether `html` has an attribute like ` onclick=`.
    fn inline_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(at, _)| {
            let rest = &html[at + 3..];
            let name = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name > 0 && rest[name..].starts_with('=')
        })
    }

    /// The policy forbids inline code and styles; these would be the ways
    /// around building the DOM from text nodes (agents' data is hostile).
    #[test]
    fn no_asset_writes_markup_from_strings_or_evaluates_code() {
        let forbidden = [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "setAttribute('style'",
        ];
        for path in Assets::iter() {
            let file = Assets::get(&path).expect("listed files exist");
            let text = String::from_utf8_lossy(&file.data);
            for word in forbidden {
                assert!(!text.contains(word), "web/{path} uses {word}");
            }
            if path.ends_with(".html") {
                assert!(!text.contains("style="), "web/{path} has an inline style");
                assert!(!text.contains("<style"), "web/{path} has an inline style sheet");
                for script in text.split("<script").skip(1) {
                    assert!(
                        script.split('>').next().is_some_and(|tag| tag.contains("src=")),
                        "web/{path}: inline script"
                    );
                }
                assert!(!inline_handler(&text), "web/{path} has an inline event handler");
            }
        }
    }
}
