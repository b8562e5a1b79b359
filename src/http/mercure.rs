//! The Mercure hub endpoint: `GET` subscribes, `POST` publishes.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use super::{form, reject, stream_reply, stream_response, AppState, Connection, MERCURE_PATH};
use crate::auth::{find_token, keep_query_token, query_token, AuthError, Rights, TokenSource};
use crate::cluster::PublishError;
use crate::hub::{Draft, Invalid, Matcher, Selector, SubscribeError, SubscribeRequest, MAX_TOPICS};

/// How long a publisher may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Parameters beyond the topics that a request may carry.
const MAX_OTHER_PARAMS: usize = 32;

/// What a subscribe request asks for, parsed from its query string.
struct SubscribeQuery {
    topics: Vec<Matcher>,
    last_event_id: Option<String>,
    authorization: Option<String>,
}

fn parse_subscribe_query(req: &Request) -> Result<SubscribeQuery, Response> {
    let raw = req.uri().query().unwrap_or("");
    let pairs = form::parse(raw.as_bytes(), MAX_TOPICS + MAX_OTHER_PARAMS)
        .map_err(|e| reject(StatusCode::BAD_REQUEST, e))?;
    let mut q = SubscribeQuery {
        topics: Vec::new(),
        last_event_id: None,
        authorization: None,
    };
    for (name, value) in pairs {
        match name.as_str() {
            "topic" => q.topics.push(Matcher::topic(value)),
            // `Last-Event-ID` is the 0.x compatibility spelling.
            // An empty value is no id, as an empty header is.
            "lastEventID" | "Last-Event-ID" if !value.is_empty() => {
                q.last_event_id.get_or_insert(value);
            }
            "authorization" => {
                keep_query_token(&mut q.authorization, value).map_err(auth_error)?;
            }
            _ => {}
        }
    }
    Ok(q)
}

/// The id a reconnecting client last saw, from the `Last-Event-ID` header if it has one: that
/// wins over the `lastEventID` query parameter. Browsers send the id as UTF-8 (ids are IRIs),
/// so any UTF-8 is accepted, not only the visible ASCII of `HeaderValue::to_str`. An empty
/// header is no id (a browser sends none while its last id is empty), so the query's stands.
fn header_last_event_id(req: &Request) -> Result<Option<String>, Response> {
    let Some(v) = req.headers().get("last-event-id") else {
        return Ok(None);
    };
    match std::str::from_utf8(v.as_bytes()) {
        Ok("") => Ok(None),
        Ok(s) => Ok(Some(s.to_owned())),
        Err(_) => Err(reject(
            StatusCode::BAD_REQUEST,
            "the Last-Event-ID header is not UTF-8",
        )),
    }
}

/// The id a reconnecting client last saw, from the header or else the query.
pub(super) fn last_event_id(req: &Request) -> Result<Option<String>, Response> {
    match header_last_event_id(req)? {
        Some(id) => Ok(Some(id)),
        None => Ok(parse_subscribe_query(req)?.last_event_id),
    }
}

/// A refusal for want of a (good) token, with its RFC 6750 challenge: 401 with no `error`
/// when none was presented, 401 `invalid_token`, 403 `insufficient_scope`, or 400
/// `invalid_request` for a token presented wrongly. The body keeps the one-line reason; the
/// challenge says no more than its `error` (see [`super::discovery::challenge`], which writes
/// it with the request's metadata URL).
pub(super) fn auth_error(e: AuthError) -> Response {
    use super::discovery::Challenge;
    let (status, error) = match &e {
        AuthError::Missing => (StatusCode::UNAUTHORIZED, None),
        AuthError::Invalid(_) => (StatusCode::UNAUTHORIZED, Some("invalid_token")),
        AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, Some("insufficient_scope")),
        AuthError::BadRequest(_) => (StatusCode::BAD_REQUEST, Some("invalid_request")),
    };
    let mut r = reject(status, e);
    r.extensions_mut().insert(Challenge(error));
    r
}

pub(super) fn subscribe_error(e: SubscribeError) -> Response {
    match e {
        SubscribeError::AnonymousTemplates => reject(StatusCode::FORBIDDEN, e),
        SubscribeError::Full
        | SubscribeError::ShuttingDown
        | SubscribeError::TemplateMemoryFull(_) => {
            let mut r = reject(StatusCode::SERVICE_UNAVAILABLE, e);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        _ => reject(StatusCode::BAD_REQUEST, e),
    }
}

/// Checks a subscriber's request: topics, token. Returns what to subscribe with.
fn check_subscriber(
    app: &AppState,
    req: &Request,
) -> Result<(SubscribeQuery, Option<Rights>), Response> {
    let q = parse_subscribe_query(req)?;
    if q.topics.is_empty() {
        return Err(subscribe_error(SubscribeError::NoTopic));
    }
    if q.topics.len() > MAX_TOPICS {
        return Err(subscribe_error(SubscribeError::TooManyTopics));
    }
    let rights = subscriber_rights(app, req, q.authorization.as_deref())?;
    Ok((q, rights))
}

/// A subscriber's rights from its token (header, `query_token`, cookie), or `None` for an
/// anonymous subscriber where the hub takes them. The clock leeway lets a token a few seconds
/// past its `exp` through verification (for skew between clocks); a stream must still not
/// open after `exp`, where it would receive its replay before being closed.
pub(super) fn subscriber_rights(
    app: &AppState,
    req: &Request,
    query_token: Option<&str>,
) -> Result<Option<Rights>, Response> {
    match find_token(req.headers(), query_token, &app.tokens.cookie_name).map_err(auth_error)? {
        Some((token, _)) => subscriber_token_rights(app, req, token).map(Some),
        None if app.anonymous => Ok(None),
        None => Err(auth_error(AuthError::Missing)),
    }
}

/// The rights a subscriber's token grants, refused once past its `exp` (see
/// [`Rights::unexpired`]). A 1.0 token must name the hub as `req` reaches it in its `aud`.
pub(super) fn subscriber_token_rights(
    app: &AppState,
    req: &Request,
    token: &str,
) -> Result<Rights, Response> {
    let resource = app.tokens.resource(req);
    app.subscriber_key
        .verify(token, &app.tokens.expected(&resource))
        .and_then(Rights::unexpired)
        .map_err(auth_error)
}

/// What the hub needs to register a subscriber with these rights.
pub(super) fn subscribe_request(
    topics: Vec<Matcher>,
    rights: Option<Rights>,
    last_event_id: Option<String>,
    kill: Option<tokio_util::sync::CancellationToken>,
) -> SubscribeRequest {
    let (subscribe, expires_at, payload) = match rights {
        // A token without `mercure.subscribe` still identifies the subscriber: it receives
        // public updates and no private ones. The subscriber has one payload: that of its
        // first matcher a grant gives one to (a 0.x token's is the same for all).
        Some(r) => (
            Some(r.subscribe.clone().unwrap_or_default()),
            r.expires_at,
            topics.iter().find_map(|m| r.payload_for(m)),
        ),
        None => (None, None, None),
    };
    SubscribeRequest {
        topics,
        rights: subscribe,
        last_event_id,
        expires_at,
        kill,
        payload,
    }
}

/// `GET /.well-known/mercure?topic=…`
pub async fn subscribe(State(app): State<AppState>, req: Request) -> Response {
    if let Err(r) = super::room_for_stream(&app) {
        return r;
    }
    let (q, rights) = match check_subscriber(&app, &req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let header_id = match header_last_event_id(&req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let conn = req.extensions().get::<Connection>();
    let kill = super::stream_kill(conn, &req);
    let sub = app.hub.subscribe(subscribe_request(
        q.topics,
        rights,
        header_id.or(q.last_event_id),
        kill,
    ));
    match sub {
        Ok(s) => stream_reply(conn, s.stream, MERCURE_PATH, s.last_event_id.as_deref()),
        Err(e) => subscribe_error(e),
    }
}

/// `HEAD /.well-known/mercure?topic=…`: the same checks and headers as `GET`, no stream.
pub async fn subscribe_head(State(app): State<AppState>, req: Request) -> Response {
    if let Err(r) = super::room_for_stream(&app) {
        return r;
    }
    let (q, rights) = match check_subscriber(&app, &req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(e) = app.hub.admit(&q.topics, rights.is_none()) {
        return subscribe_error(e);
    }
    let resume = match header_last_event_id(&req) {
        Ok(v) => v.or(q.last_event_id),
        Err(r) => return r,
    };
    let rights = rights.map(|r| r.subscribe.unwrap_or_default());
    let answer = resume.map(|id| app.hub.resume_answer(&id, rights.as_deref()));
    stream_response(axum::body::Body::empty(), answer.as_deref())
}

/// Why a publish was refused, for the debug log and the response.
fn refuse(status: StatusCode, reason: impl std::fmt::Display, app: &AppState) -> Response {
    app.hub
        .metrics()
        .updates_rejected
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(status = status.as_u16(), %reason, "publish rejected");
    reject(status, reason)
}

/// A publish refused for its token, counted and logged as [`refuse`] does, with the
/// challenge of [`auth_error`].
fn refuse_auth(e: AuthError, app: &AppState) -> Response {
    app.hub
        .metrics()
        .updates_rejected
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(reason = %e, "publish rejected");
    auth_error(e)
}

/// `POST /.well-known/mercure`
pub async fn publish(State(app): State<AppState>, req: Request) -> Response {
    let query_token = match req.uri().query() {
        Some(q) => match form::parse(q.as_bytes(), MAX_OTHER_PARAMS) {
            Ok(pairs) => match query_token(pairs) {
                Ok(t) => t,
                Err(e) => return refuse_auth(e, &app),
            },
            Err(e) => return refuse(StatusCode::BAD_REQUEST, e, &app),
        },
        None => None,
    };
    let found = find_token(
        req.headers(),
        query_token.as_deref(),
        &app.tokens.cookie_name,
    );
    let rights = match found {
        Ok(Some((t, source))) => {
            if source == TokenSource::Cookie {
                if let Err(reason) = csrf_check(&app, req.headers()) {
                    return refuse(StatusCode::FORBIDDEN, reason, &app);
                }
            }
            let resource = app.tokens.resource(&req);
            match app
                .publisher_key
                .verify_publisher(t, &app.tokens.expected(&resource))
            {
                Ok(r) => r,
                Err(e) => return refuse_auth(e, &app),
            }
        }
        Ok(None) => return refuse_auth(AuthError::Missing, &app),
        Err(e) => return refuse_auth(e, &app),
    };
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ok = ct
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !ok {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be application/x-www-form-urlencoded",
                &app,
            );
        }
    }
    let body = http_body_util::Limited::new(req.into_body(), app.max_body);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
                &app,
            )
        }
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the body is larger than --max-body ({} bytes)",
                        app.max_body
                    ),
                    &app,
                );
            }
            return refuse(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
                &app,
            );
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let draft = match draft_from_form(&bytes) {
        Ok(d) => d,
        Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason, &app),
    };
    if let Err(e) = draft.validate() {
        return refuse(StatusCode::BAD_REQUEST, e, &app);
    }
    if let Some(t) = draft.topics.iter().find(|t| t.contains(MERCURE_PATH)) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("topic {t:?} is reserved for the hub"),
            &app,
        );
    }
    if let Err(reason) = may_publish(&app, &rights, &draft.topics) {
        return refuse_auth(AuthError::Forbidden(reason), &app);
    }
    let published = match &app.cluster {
        Some(cluster) => match app.hub.check_matching(&draft.topics) {
            Ok(()) => cluster.publish(draft).await,
            Err(e) => Err(e.into()),
        },
        None => app
            .hub
            .publish(draft)
            .await
            .map(|p| p.id)
            .map_err(Into::into),
    };
    match published {
        Ok(id) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], id).into_response(),
        Err(PublishError::Invalid(e @ Invalid::TooMuchMatching { .. })) => {
            refuse(StatusCode::PAYLOAD_TOO_LARGE, e, &app)
        }
        Err(PublishError::Invalid(e)) => refuse(StatusCode::BAD_REQUEST, e, &app),
        Err(e @ (PublishError::Unavailable(_) | PublishError::NotStored(_))) => {
            let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, e, &app);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// A publish authenticated by cookie must come from an allowed origin, or any page the user
/// visits could publish in their name (CSRF). `Origin` is used, else `Referer`'s origin.
fn csrf_check(app: &AppState, headers: &http::HeaderMap) -> Result<(), String> {
    let origin = match headers.get(header::ORIGIN) {
        Some(o) => o.to_str().unwrap_or("").to_owned(),
        None => match headers.get(header::REFERER).and_then(|r| r.to_str().ok()) {
            Some(r) => origin_of(r).unwrap_or_default(),
            None => {
                return Err(
                    "a publish authenticated by cookie needs an Origin or Referer header (CSRF protection)"
                        .into(),
                )
            }
        },
    };
    if app.publish_origins.allows(&origin) {
        Ok(())
    } else {
        Err(format!(
            "origin {origin:?} may not publish with a cookie token: add it to --publish-origins"
        ))
    }
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    Some(format!("{scheme}://{host}"))
}

/// Every topic must match one of the token's `mercure.publish` selectors.
fn may_publish(app: &AppState, rights: &Rights, topics: &[String]) -> Result<(), String> {
    let Some(allowed) = rights.publish.as_deref().filter(|a| !a.is_empty()) else {
        return Err("the token has no \"mercure.publish\" claim: it may not publish".into());
    };
    let selectors: Vec<std::sync::Arc<Selector>> =
        allowed.iter().map(|s| app.hub.selector(s)).collect();
    match topics
        .iter()
        .find(|t| !selectors.iter().any(|s| s.matches(t)))
    {
        Some(t) => Err(format!("the token may not publish to topic {t:?}")),
        None => Ok(()),
    }
}

fn draft_from_form(body: &[u8]) -> Result<Draft, String> {
    let pairs = form::parse(body, MAX_TOPICS + MAX_OTHER_PARAMS).map_err(|e| match e {
        form::FormError::TooMany(_) => Invalid::TooManyTopics.to_string(),
        e => e.to_string(),
    })?;
    let mut d = Draft::default();
    let mut data = None;
    for (name, value) in pairs {
        // An empty id, type or retry is as if absent (an empty id asks the hub for one).
        if value.is_empty() && matches!(name.as_str(), "id" | "type" | "retry") {
            continue;
        }
        match name.as_str() {
            "topic" => d.topics.push(value),
            "data" => {
                data.get_or_insert(value);
            }
            "id" => {
                d.id.get_or_insert(value);
            }
            "type" => {
                d.event_type.get_or_insert(value);
            }
            "retry" if d.retry.is_none() => {
                d.retry = Some(value.parse::<u64>().map_err(|_| {
                    format!("\"retry\" must be a whole number of milliseconds, not {value:?}")
                })?);
            }
            "private" => d.private = true,
            _ => {}
        }
    }
    d.data = data.unwrap_or_default();
    Ok(d)
}
