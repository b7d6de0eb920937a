//! The status page: `GET /ui` and its assets, embedded in the binary (`host/ui/`), so the
//! host needs nothing at run time to serve it. The page is static; its data comes from
//! the JSON API with the admin token the operator enters, so these routes are open.
//!
//! The vendored chart library (uPlot) and its licence live in `host/ui/vendor/uplot/`,
//! with the version and how to update it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiPath};

const INDEX: &str = include_str!("../../ui/index.html");

/// Each asset: its name under `/ui/`, media type and bytes.
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/vendor/uplot/uPlot.min.css"),
    ),
];

/// Scripts only from this host, no inline code, data only from this host's API.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui`.
pub(super) async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{asset}`.
pub(super) async fn asset(ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(asset, _, _)| *asset == name)
        .map(|(_, content_type, body)| page(content_type, body))
        .ok_or_else(|| ApiError::not_found(format!("page asset `{name}`")))
}
