//! The operator console at `/console`: a page, a script and a style sheet,
//! embedded in the binary (no CDN, no build step), that drive the admin API
//! from the browser.
//!
//! The page itself holds nothing: no user, tool or figure is in it. The
//! admin key is typed into it, kept in the tab's `sessionStorage`, and sent
//! as `Authorization: Bearer` with each API request, so the API's checks are
//! the console's (a user's key is answered 403 there, a bad one 401), and no
//! cookie exists for another site to ride on. A strict content security
//! policy allows only these three files and requests to this server.

use std::sync::LazyLock;

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::audit::Kind;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

/// The page, with the audit record kinds the filter offers.
static PAGE_WITH_KINDS: LazyLock<String> = LazyLock::new(|| {
    let options: String = Kind::ALL.iter().map(|k| format!("<option value=\"{0}\">{0}</option>", k.as_str())).collect();
    PAGE.replace("<!--kinds-->", &options)
});

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' \
                      data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        // A new binary serves new assets: never a stale script beside a new page.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body).into_response()
}

/// `/console/` → `/console` (relative, so it holds behind a path prefix): the
/// page's links are relative to where it is.
pub async fn slash() -> axum::response::Redirect {
    axum::response::Redirect::permanent("../console")
}

pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE_WITH_KINDS.as_str())
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_offers_every_audit_kind_and_loads_nothing_from_elsewhere() {
        for kind in Kind::ALL {
            assert!(PAGE_WITH_KINDS.contains(&format!("value=\"{}\"", kind.as_str())), "{kind:?}");
        }
        for text in [PAGE, SCRIPT, STYLE] {
            // SVG's namespace is a name, not a request.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "an outside URL in an asset");
        }
        assert!(!PAGE.contains("<script>") && !PAGE.contains("style="), "inline code the policy would block");
    }
}
