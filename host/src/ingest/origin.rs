//! Requests a web page made behind its reader's back. A browser sends a page's requests
//! to any address, the host's included, and a host with no tokens takes them all:
//! without this guard, any site its operator visits could replay or delete dead letters
//! or pause plugins on a host listening on loopback (cross-site requests), or read its
//! API through a name of its own that resolves to 127.0.0.1 (DNS rebinding).
//!
//! Invariants:
//! - A request that changes something (any method but `GET`, `HEAD` and `OPTIONS`) is
//!   refused when a browser says it comes from another site (`Sec-Fetch-Site`), or when
//!   its `Origin` is not this host's own. Clients that are not browsers send neither
//!   header and are not affected.
//! - A host listening on loopback with no tokens answers only requests addressed to it
//!   by an IP address, `localhost` or the host of `ingest.public_url`: a rebinding page
//!   addresses it by the page's own name.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::error::{ApiError, code};
use crate::config::Config;

/// What the guard needs of the host's configuration.
pub(super) struct Exposure {
    /// Whether the host listens on loopback and takes requests without a token.
    open_on_loopback: bool,
    /// The host part of `ingest.public_url`, if set.
    public_host: Option<String>,
}

impl Exposure {
    pub(super) fn of(config: &Config) -> Self {
        Self {
            open_on_loopback: config.listen.ip().to_canonical().is_loopback()
                && config.auth.ingest_tokens.is_empty()
                && config.auth.admin_tokens.is_empty(),
            public_host: config
                .ingest
                .public_url
                .as_deref()
                .and_then(|url| reqwest::Url::parse(url).ok())
                .and_then(|url| url.host_str().map(str::to_owned)),
        }
    }
}

/// Refuses what [`refusal`] refuses, `403 forbidden` naming why.
pub(super) async fn guard(
    State(exposure): State<Arc<Exposure>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(why) = refusal(request.method(), request.headers(), &exposure) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, code::FORBIDDEN, why));
    }
    Ok(next.run(request).await)
}

/// Why a request is refused, if it is.
fn refusal(method: &Method, headers: &HeaderMap, exposure: &Exposure) -> Option<String> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST);
    if exposure.open_on_loopback {
        let name = host.map(host_name);
        if let Some(name) =
            name.filter(|name| !is_local_name(name, exposure.public_host.as_deref()))
        {
            return Some(format!(
                "this host takes requests without a token on loopback only when they address \
                 it as `localhost` or by its IP address, not as `{name}`; set \
                 `ingest.public_url` to the name it is reached by, or set tokens"
            ));
        }
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site"))
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!(
            "a {method} from a web page of another site (`Sec-Fetch-Site: {site}`) is refused"
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let own = host.is_some_and(|host| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
        });
        if !own {
            return Some(format!(
                "a {method} from a web page of another origin (`Origin: {origin}`) is refused"
            ));
        }
    }
    None
}

/// The name part of a `Host` header: without its port, and without the brackets of an
/// IPv6 address.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn is_local_name(name: &str, public_host: Option<&str>) -> bool {
    let name = name.trim_end_matches('.');
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || public_host.is_some_and(|public| {
            public
                .trim_start_matches('[')
                .trim_end_matches(']')
                .eq_ignore_ascii_case(name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    const OPEN: Exposure = Exposure {
        open_on_loopback: true,
        public_host: None,
    };
    const GUARDED: Exposure = Exposure {
        open_on_loopback: false,
        public_host: None,
    };

    #[test]
    fn a_page_of_another_site_cannot_change_anything() {
        let post = Method::POST;
        for refused in [
            headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]),
            headers(&[("host", "localhost:8080"), ("sec-fetch-site", "same-site")]),
            headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[("host", "127.0.0.1:8080"), ("origin", "null")]),
            headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:3000"),
            ]),
        ] {
            assert!(refusal(&post, &refused, &GUARDED).is_some(), "{refused:?}");
            assert!(refusal(&Method::DELETE, &refused, &OPEN).is_some());
        }
        for allowed in [
            headers(&[("host", "127.0.0.1:8080")]),
            headers(&[
                ("host", "127.0.0.1:8080"),
                ("sec-fetch-site", "same-origin"),
            ]),
            headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080"),
            ]),
            headers(&[
                ("host", "LOCALHOST:8080"),
                ("origin", "http://localhost:8080"),
            ]),
        ] {
            assert_eq!(refusal(&post, &allowed, &OPEN), None, "{allowed:?}");
        }
        // Reading is left to the browser's same-origin rule.
        let cross = headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(refusal(&Method::GET, &cross, &OPEN), None);
    }

    #[test]
    fn an_open_loopback_host_answers_only_its_own_names() {
        for name in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "localhost",
            "localhost.:8080",
            "app.localhost:8080",
            "Events.Example.com",
            "10.0.0.7:80",
        ] {
            let request = headers(&[("host", name)]);
            let public = Exposure {
                public_host: Some("events.example.com".into()),
                ..OPEN
            };
            assert_eq!(refusal(&Method::GET, &request, &public), None, "{name}");
        }
        let rebound = headers(&[("host", "attacker.example:8080")]);
        let why = refusal(&Method::GET, &rebound, &OPEN).unwrap();
        assert!(why.contains("`attacker.example`"), "{why}");
        // With tokens, or listening beyond loopback, any name reaches it.
        assert_eq!(refusal(&Method::GET, &rebound, &GUARDED), None);
    }
}
