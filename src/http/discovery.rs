//! What a client needs to know to get a token the hub accepts: the resource identifier
//! tokens must name in `aud`, the RFC 9728 protected resource metadata that advertises it,
//! and the RFC 6750 `WWW-Authenticate` challenges that point at that metadata.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::json;

use std::sync::Arc;
use std::time::Duration;

use super::{reject, AppState, MERCURE_PATH};
use crate::auth::jwks::Jwks;
use crate::auth::{Expected, DETAIL_TYPE};

/// Where the metadata of the hub's default resource is served (RFC 9728 §3.1: the well-known
/// name inserted between the host and the resource's path).
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource/.well-known/mercure";

/// The token settings of `serve`, as the handlers use them.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// `--issuer`; `None` trusts any `iss` signed by the keys.
    pub issuer: Option<String>,
    /// `--resource-identifier`; `None`: derived from each request.
    pub resource_identifier: Option<url::Url>,
    /// `--cookie-name`.
    pub cookie_name: String,
    /// `--authorization-server`.
    pub authorization_server: Option<String>,
    /// The hub serves HTTPS: a derived resource identifier is `https://…`.
    pub tls: bool,
    /// A key was configured (not a random one for the run): the metadata is served and the
    /// challenges point at it.
    pub metadata: bool,
    /// `--jwks-url`: the issuer's key set.
    pub jwks: Option<Arc<Jwks>>,
}

impl TokenSettings {
    /// The hub's resource identifier for this request: the configured one, else the
    /// request's scheme and host with the hub's path. A request without a usable host gets
    /// one no token can name (`aud` then matches nothing).
    pub fn resource(&self, req: &Request) -> String {
        self.resource_for(req.headers(), req.uri())
    }

    fn resource_for(&self, headers: &http::HeaderMap, uri: &http::Uri) -> String {
        if let Some(r) = &self.resource_identifier {
            return r.as_str().to_owned();
        }
        let scheme = if self.tls { "https" } else { "http" };
        // HTTP/2 carries the host in `:authority`, HTTP/1.1 in `Host`.
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .filter(|h| {
                h.parse::<http::uri::Authority>()
                    .is_ok_and(|a| a.as_str() == *h)
            })
            .filter(|h| !h.contains('@'));
        // Through the URL parser: the host lower-cased, a default port dropped, as an issuer
        // writing the hub's URL would.
        host.and_then(|h| url::Url::parse(&format!("{scheme}://{h}{MERCURE_PATH}")).ok())
            .map(|u| u.as_str().to_owned())
            .unwrap_or_default()
    }

    /// What a token presented with `req` must have been issued for.
    pub fn expected<'a>(&'a self, resource: &'a str) -> Expected<'a> {
        Expected {
            issuer: self.issuer.as_deref(),
            audience: resource,
            audience_configured: self.resource_identifier.is_some(),
        }
    }

    /// The absolute URL of the metadata of `resource`, when the hub serves it.
    fn metadata_url(&self, resource: &str) -> Option<String> {
        if !self.metadata {
            return None;
        }
        let mut url = url::Url::parse(resource).ok()?;
        let path = format!(
            "/.well-known/oauth-protected-resource{}",
            url.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url.set_query(None);
        Some(url.into())
    }
}

/// Put on a response by `auth_error`: the RFC 6750 `error` of its Bearer challenge (`None`
/// when no token was presented). [`challenge`] writes the header, where the request's host is
/// known.
#[derive(Debug, Clone, Copy)]
pub struct Challenge(pub Option<&'static str>);

/// Writes the `WWW-Authenticate` header of responses that carry a [`Challenge`].
pub async fn challenge(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(jwks) = &app.tokens.jwks {
        fetch_unknown_key(jwks, req.headers(), &app.tokens).await;
    }
    let host = req.headers().get(header::HOST).cloned();
    let uri = req.uri().clone();
    let mut response = next.run(req).await;
    let Some(Challenge(error)) = response.extensions_mut().remove::<Challenge>() else {
        return response;
    };
    let mut headers = http::HeaderMap::new();
    if let Some(h) = host {
        headers.insert(header::HOST, h);
    }
    let resource = app.tokens.resource_for(&headers, &uri);
    let mut value = String::from("Bearer");
    let mut sep = " ";
    if let Some(e) = error {
        value.push_str(&format!("{sep}error=\"{e}\""));
        sep = ", ";
    }
    if let Some(url) = app.tokens.metadata_url(&resource) {
        value.push_str(&format!("{sep}resource_metadata=\"{url}\""));
    }
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}

/// How long a request waits for a fetch of the key set its token asked for; the fetch goes
/// on without it (the next request finds the keys).
const KEY_FETCH_WAIT: Duration = Duration::from_secs(3);

/// Before a request's token is verified (which cannot wait): when it is a 1.0 token from the
/// configured issuer, not expired, naming a key id the issuer's set lacks (or none while the
/// set is empty), the set is fetched again first, so that a token signed with a key the
/// provider has just rotated in is accepted at once. Rate-limited by the set (one such fetch
/// per 5 minutes); the unverified `iss` and `exp` are read first so that junk tokens do not
/// spend that budget. A request waits at most [`KEY_FETCH_WAIT`].
async fn fetch_unknown_key(jwks: &Arc<Jwks>, headers: &http::HeaderMap, tokens: &TokenSettings) {
    // Only the header and the cookie: a 1.0 token is never read from the query string.
    let Ok(Some((token, _))) = crate::auth::find_token(headers, None, &tokens.cookie_name) else {
        return;
    };
    if !crate::auth::is_access_token(token) {
        return;
    }
    let Ok(header) = jsonwebtoken::decode_header(token) else {
        return;
    };
    if !from_issuer_unexpired(token, tokens.issuer.as_deref()) {
        return;
    }
    let kid = header.kid;
    let unknown = match &kid {
        Some(kid) => !jwks.has_kid(kid),
        None => jwks.is_empty(),
    };
    if unknown {
        let jwks = jwks.clone();
        let fetch = tokio::spawn(async move { jwks.refresh_for_unknown(kid.as_deref()).await });
        let _ = tokio::time::timeout(KEY_FETCH_WAIT, fetch).await;
    }
}

/// Whether the token's claims, read without verifying them, name `issuer` and an `exp` still
/// ahead (within the leeway). Only decides whether a key fetch is worth it.
fn from_issuer_unexpired(token: &str, issuer: Option<&str>) -> bool {
    use base64::Engine as _;
    let Some(claims) = token.split('.').nth(1) else {
        return false;
    };
    let Some(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let iss_ok = claims.get("iss").and_then(|v| v.as_str()) == issuer;
    let exp_ok = claims
        .get("exp")
        .and_then(|v| v.as_u64())
        .is_some_and(|exp| exp.saturating_add(crate::auth::LEEWAY_SECS) >= now);
    iss_ok && exp_ok
}

/// `GET`/`HEAD /.well-known/oauth-protected-resource/.well-known/mercure`: the RFC 9728
/// metadata of the hub, served when it verifies tokens with configured keys.
pub async fn metadata(State(app): State<AppState>, req: Request) -> Response {
    let t = &app.tokens;
    if !t.metadata {
        return reject(
            StatusCode::NOT_FOUND,
            "no protected resource metadata: the hub has no configured key \
             (--publisher-jwt-key)",
        );
    }
    let resource = t.resource(&req);
    let mut doc = json!({
        "resource": resource,
        "bearer_methods_supported": ["header"],
        "authorization_details_types_supported": [DETAIL_TYPE],
        "mercure_cookie": t.cookie_name,
    });
    if app.subscriptions {
        doc["mercure_subscriptions"] = true.into();
    }
    if let Some(server) = &t.authorization_server {
        doc["authorization_servers"] = json!([server]);
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tls: bool, configured: Option<&str>) -> TokenSettings {
        TokenSettings {
            issuer: None,
            resource_identifier: configured.map(|c| url::Url::parse(c).unwrap()),
            cookie_name: crate::auth::DEFAULT_COOKIE_NAME.into(),
            authorization_server: None,
            tls,
            metadata: true,
            jwks: None,
        }
    }

    fn resource(s: &TokenSettings, host: &str) -> String {
        let mut h = http::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        s.resource_for(&h, &"/.well-known/mercure".parse().unwrap())
    }

    #[test]
    fn the_resource_comes_from_the_flag_or_the_request() {
        let plain = settings(false, None);
        assert_eq!(
            resource(&plain, "Hub.Example:8000"),
            "http://hub.example:8000/.well-known/mercure"
        );
        assert_eq!(
            resource(&settings(true, None), "hub.example:443"),
            "https://hub.example/.well-known/mercure"
        );
        assert_eq!(resource(&plain, "a@b"), "", "no user info in a host");
        assert_eq!(resource(&plain, "a/b"), "");
        let fixed = settings(false, Some("https://hub.example/x/.well-known/mercure"));
        assert_eq!(
            resource(&fixed, "other"),
            "https://hub.example/x/.well-known/mercure"
        );
        assert_eq!(
            fixed.metadata_url("https://hub.example/x/.well-known/mercure"),
            Some(
                "https://hub.example/.well-known/oauth-protected-resource/x/.well-known/mercure"
                    .into()
            )
        );
    }
}
