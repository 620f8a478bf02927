//! The playground: one page, compiled into the binary, that draws, asks,
//! rates what it shows (posting feedback), and for admin keys lists versions
//! and jobs with their gate numbers and curves. It calls the public API with
//! the key typed into it; the key stays in the page's memory.

use axum::http::header;
use axum::response::{Html, IntoResponse};

const PAGE: &str = include_str!("playground/index.html");

/// Nothing outside this server: scripts and styles are the page's own,
/// images are data and blob URLs of what the API returned.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The playground page.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The playground (HTML)", content_type = "text/html", body = String)))]
pub async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)],
        Html(PAGE),
    )
}
