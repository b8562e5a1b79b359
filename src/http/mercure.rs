//! The Mercure hub endpoint: `GET` subscribes, `POST` publishes.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use super::{form, reject, stream_reply, stream_response, AppState, Connection, MERCURE_PATH};
use crate::auth::{find_token, keep_query_token, query_token, AuthError, Rights, TokenSource};
use crate::cluster::PublishError;
use crate::config::Protocol;
use crate::hub::update::parse_retry;
use crate::hub::{Draft, Invalid, Matcher, Selector, SubscribeError, SubscribeRequest, MAX_TOPICS};

/// Parameters beyond the topics that a request may carry.
const MAX_OTHER_PARAMS: usize = 32;

/// Mercure 1.0's bounds on a subscription's matchers (beyond them: 400, not 413).
const MAX_MATCHERS: usize = 100;
const MAX_MATCHER_LEN: usize = 4096;

/// The largest `QUERY` body, in bytes (larger: 413).
const MAX_QUERY_BODY: usize = 1 << 20;

/// Which Mercure a subscribe request speaks, told by its parameters (`topic` is 0.x, `match*`
/// 1.0): it decides the response's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    V0,
    V1,
}

/// What a subscribe request asks for, parsed from its query string (and a `QUERY` body).
struct SubscribeQuery {
    topics: Vec<Matcher>,
    dialect: Dialect,
    /// The resume cursor from the parameters, by precedence: `last_event_id`, `lastEventID`
    /// (0.x), `Last-Event-ID` (0.x compatibility). `Some("")` when only empty ones came.
    last_event_id: Option<String>,
    /// The 0.x `authorization` parameter, kept on 0.x requests only.
    authorization: Option<String>,
    /// The request's URL patterns, compiled through the hub's cache to check them: held
    /// until the subscription holds them itself, so that it finds them there (not evicted in
    /// between) and no pattern is compiled twice.
    _compiled: Vec<std::sync::Arc<Selector>>,
}

/// The cursor parameters, each kept at its first value.
#[derive(Default)]
struct Cursors {
    last_event_id: Option<String>,
    last_event_id_0x: Option<String>,
    compat: Option<String>,
}

impl Cursors {
    /// The first non-empty cursor by precedence, else an empty one if any came.
    fn resolve(self) -> Option<String> {
        let all = [self.last_event_id, self.last_event_id_0x, self.compat];
        let present = all.iter().any(Option::is_some);
        all.into_iter()
            .flatten()
            .find(|v| !v.is_empty())
            .or_else(|| present.then(String::new))
    }
}

fn bad_request(reason: impl std::fmt::Display) -> Response {
    reject(StatusCode::BAD_REQUEST, reason)
}

/// Parses a subscribe request's parameters: `query` from its URL, `body` from a `QUERY`
/// request's body (the union of both is taken; the query's cursor wins over the body's).
fn parse_subscribe_params(
    app: &AppState,
    query: Vec<(String, String)>,
    body: Option<Vec<(String, String)>>,
) -> Result<SubscribeQuery, Response> {
    let is_query_method = body.is_some();
    let mut topics = Vec::new();
    let (mut zero, mut one) = (false, false);
    let mut cursors = Cursors::default();
    let mut authorization = None;
    let mut misspelt: Option<String> = None;
    let mut compiled = Vec::new();
    for (name, value) in query.into_iter().chain(body.into_iter().flatten()) {
        match name.as_str() {
            "topic" => {
                if is_query_method {
                    return Err(bad_request(
                        "\"topic\" is Mercure 0.x, which has no QUERY method: use match=",
                    ));
                }
                zero = true;
                topics.push(Matcher::topic(value));
            }
            "match" | "match_exact" | "match_urlpattern" => {
                one = true;
                if value.len() > MAX_MATCHER_LEN {
                    return Err(bad_request(format!(
                        "a matcher is longer than {MAX_MATCHER_LEN} bytes"
                    )));
                }
                if value.chars().any(crate::hub::update::is_control_or_format) {
                    return Err(bad_request("a matcher holds a control or format character"));
                }
                let m = if name == "match_urlpattern" {
                    let m = Matcher::url_pattern(value);
                    let sel = app.hub.selector(&m);
                    if matches!(*sel, Selector::Never(_)) {
                        return Err(bad_request("invalid match_urlpattern pattern"));
                    }
                    compiled.push(sel);
                    m
                } else {
                    Matcher::exact(value)
                };
                topics.push(m);
                if topics.len() > MAX_MATCHERS {
                    return Err(bad_request(format!(
                        "too many matchers (at most {MAX_MATCHERS})"
                    )));
                }
            }
            // The whole `match` prefix is Mercure 1.0's: a misspelt matcher must not pass
            // for an application's own parameter and quietly subscribe to less. (A 0.x
            // `topic=` request keeps its own parameters, as before 1.0.)
            n if n.len() >= 5 && n.as_bytes()[..5].eq_ignore_ascii_case(b"match") => {
                misspelt.get_or_insert_with(|| n.to_owned());
            }
            "last_event_id" => {
                cursors.last_event_id.get_or_insert(value);
            }
            "lastEventID" => {
                cursors.last_event_id_0x.get_or_insert(value);
            }
            "Last-Event-ID" => {
                cursors.compat.get_or_insert(value);
            }
            "authorization" => {
                keep_query_token(&mut authorization, value).map_err(auth_error)?;
            }
            _ => {}
        }
    }
    if zero && one {
        return Err(bad_request(
            "the request mixes \"topic\" (Mercure 0.x) and \"match\" (Mercure 1.0): use one",
        ));
    }
    if let Some(n) = misspelt.filter(|_| !zero) {
        return Err(bad_request(format!(
            "unknown matcher parameter {n:?}: use match, match_exact or match_urlpattern"
        )));
    }
    let dialect = if one { Dialect::V1 } else { Dialect::V0 };
    match (app.protocol, dialect) {
        (Protocol::V1, Dialect::V0) if zero => {
            return Err(bad_request("this hub serves Mercure 1.0 only: use match="))
        }
        (Protocol::V0, Dialect::V1) => {
            return Err(bad_request("this hub serves Mercure 0.x only: use topic="))
        }
        _ => {}
    }
    Ok(SubscribeQuery {
        topics,
        dialect,
        last_event_id: cursors.resolve(),
        // A token in the URL is 0.x's: it leaks into logs and histories, and 1.0 dropped it.
        authorization: authorization.filter(|_| dialect == Dialect::V0),
        _compiled: compiled,
    })
}

fn query_pairs(req: &Request) -> Result<Vec<(String, String)>, Response> {
    let raw = req.uri().query().unwrap_or("");
    form::parse(raw.as_bytes(), MAX_TOPICS + MAX_OTHER_PARAMS).map_err(bad_request)
}

fn parse_subscribe_query(app: &AppState, req: &Request) -> Result<SubscribeQuery, Response> {
    parse_subscribe_params(app, query_pairs(req)?, None)
}

/// The id a reconnecting client last saw, from the `Last-Event-ID` header if it has one: that
/// wins over the query's cursors. Browsers send the id as UTF-8 (ids are IRIs), so any UTF-8 is
/// accepted, not only the visible ASCII of `HeaderValue::to_str`. An empty header is no id (a
/// browser sends none while its last id is empty), so the query's stands; it still counts as a
/// cursor sent (`Some("")`).
fn header_last_event_id(req: &Request) -> Result<Option<String>, Response> {
    let Some(v) = req.headers().get("last-event-id") else {
        return Ok(None);
    };
    match std::str::from_utf8(v.as_bytes()) {
        Ok(s) => Ok(Some(s.to_owned())),
        Err(_) => Err(reject(
            StatusCode::BAD_REQUEST,
            "the Last-Event-ID header is not UTF-8",
        )),
    }
}

/// The cursor: the header's unless empty, else the parameters'. `Some("")` when only empty
/// ones came (a cursor was sent, but names no event).
fn resolve_cursor(header: Option<String>, param: Option<String>) -> Option<String> {
    match (header, param) {
        (Some(h), _) if !h.is_empty() => Some(h),
        (_, Some(p)) if !p.is_empty() => Some(p),
        (h, p) => h.or(p),
    }
}

/// The id a reconnecting client last saw, from the header or else the query.
pub(super) fn last_event_id(req: &Request) -> Result<Option<String>, Response> {
    let mut cursors = Cursors::default();
    for (name, value) in query_pairs(req)? {
        match name.as_str() {
            "last_event_id" => cursors.last_event_id.get_or_insert(value),
            "lastEventID" => cursors.last_event_id_0x.get_or_insert(value),
            "Last-Event-ID" => cursors.compat.get_or_insert(value),
            _ => continue,
        };
    }
    Ok(resolve_cursor(header_last_event_id(req)?, cursors.resolve()).filter(|v| !v.is_empty()))
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
        AuthError::Invalid(_) | AuthError::WrongKey(_) => {
            (StatusCode::UNAUTHORIZED, Some("invalid_token"))
        }
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
    q: SubscribeQuery,
) -> Result<(SubscribeQuery, Option<Rights>), Response> {
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
        .and_then(|r| served_dialect(app, r))
        .and_then(Rights::unexpired)
        .map_err(auth_error)
}

/// A hub serving one version of the protocol (`--protocol 1.0` or `0.x`) takes only that
/// version's tokens.
pub(super) fn served_dialect<R: std::borrow::Borrow<Rights>>(
    app: &AppState,
    rights: R,
) -> Result<R, AuthError> {
    use crate::auth::Dialect;
    match (app.protocol, rights.borrow().dialect) {
        (Protocol::V1, Dialect::Legacy) => Err(AuthError::Invalid(
            "this hub serves Mercure 1.0 only (--protocol 1.0): a token without typ at+jwt is \
             refused"
                .into(),
        )),
        (Protocol::V0, Dialect::V1) => Err(AuthError::Invalid(
            "this hub serves Mercure 0.x only (--protocol 0.x): an at+jwt access token is refused"
                .into(),
        )),
        _ => Ok(rights),
    }
}

/// What the hub needs to register a subscriber with these rights.
pub(super) fn subscribe_request(
    app: &AppState,
    topics: Vec<Matcher>,
    rights: Option<Rights>,
    last_event_id: Option<String>,
    teardown: Option<crate::hub::Teardown>,
) -> SubscribeRequest {
    let (subscribe, expires_at, payloads) = match rights {
        // A token without `mercure.subscribe` still identifies the subscriber: it receives
        // public updates and no private ones. Each subscription has its payload (a 0.x
        // token's is the same for all); only subscription events use them.
        Some(r) => (
            Some(r.subscribe.clone().unwrap_or_default()),
            r.expires_at,
            if app.subscriptions {
                r.payloads_for(&topics, &|m| app.hub.selector(m))
            } else {
                Vec::new()
            },
        ),
        None => (None, None, Vec::new()),
    };
    SubscribeRequest {
        topics,
        rights: subscribe,
        last_event_id,
        expires_at,
        teardown,
        payloads,
    }
}

/// `GET /.well-known/mercure?topic=…` (0.x) or `?match=…` (1.0).
pub async fn subscribe(State(app): State<AppState>, req: Request) -> Response {
    let q = match parse_subscribe_query(&app, &req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    open_stream(app, req, q)
}

/// `QUERY /.well-known/mercure` (Mercure 1.0): the parameters in the query string and in a
/// form body, both taken. Other methods the route does not know are refused here.
pub async fn subscribe_query(State(app): State<AppState>, req: Request) -> Response {
    if req.method().as_str() != "QUERY" {
        let mut r = reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed here; use GET,HEAD,POST,QUERY",
        );
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET,HEAD,POST,QUERY"),
        );
        return r;
    }
    let query = match query_pairs(&req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (parts, body) = req.into_parts();
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        if !is_form(ct) {
            return reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be application/x-www-form-urlencoded",
            );
        }
    }
    let body = http_body_util::Limited::new(body, MAX_QUERY_BODY);
    let bytes = match tokio::time::timeout(app.body_timeout, body.collect()).await {
        Err(_) => {
            return reject(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )
        }
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a QUERY body may hold at most {MAX_QUERY_BODY} bytes"),
            )
        }
        Ok(Err(_)) => return bad_request("the request body could not be read"),
        Ok(Ok(b)) => b.to_bytes(),
    };
    let body = match form::parse(&bytes, MAX_TOPICS + MAX_OTHER_PARAMS) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let q = match parse_subscribe_params(&app, query, Some(body)) {
        Ok(q) => q,
        Err(r) => return r,
    };
    open_stream(
        app,
        Request::from_parts(parts, axum::body::Body::empty()),
        q,
    )
}

fn is_form(ct: &HeaderValue) -> bool {
    ct.to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Subscribes with the parsed parameters and answers with the event stream.
fn open_stream(app: AppState, req: Request, q: SubscribeQuery) -> Response {
    if let Err(r) = super::room_for_stream(&app) {
        return r;
    }
    let (q, rights) = match check_subscriber(&app, &req, q) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let cursor = match header_last_event_id(&req) {
        Ok(h) => sent_cursor(resolve_cursor(h, q.last_event_id), q.dialect),
        Err(r) => return r,
    };
    // A cursor that names no event still asks for `Mercure-Last-Event-ID`: the newest event
    // the subscriber may read, taken before it registers (so nothing it misses comes after).
    let newest = cursor
        .as_deref()
        .filter(|c| c.is_empty())
        .map(|_| newest_visible(&app, rights.as_ref()));
    let conn = req.extensions().get::<Connection>();
    let teardown = super::stream_teardown(conn, &req);
    let sub = app.hub.subscribe(subscribe_request(
        &app,
        q.topics,
        rights,
        cursor.filter(|c| !c.is_empty()),
        teardown,
    ));
    match sub {
        Ok(s) => {
            let answer = s.last_event_id.or(newest);
            stream_reply(conn, s.stream, MERCURE_PATH, answer.as_deref(), q.dialect)
        }
        Err(e) => subscribe_error(e),
    }
}

/// An empty cursor is a cursor to 1.0 (it asks for `Mercure-Last-Event-ID`), and none to 0.x,
/// as it always was there (no replay, no response header).
fn sent_cursor(cursor: Option<String>, dialect: Dialect) -> Option<String> {
    match dialect {
        Dialect::V0 => cursor.filter(|c| !c.is_empty()),
        Dialect::V1 => cursor,
    }
}

/// The id of the newest update a subscriber with these rights may read, or `earliest`.
fn newest_visible(app: &AppState, rights: Option<&Rights>) -> String {
    let grants: Vec<_> = rights
        .and_then(|r| r.subscribe.as_deref())
        .into_iter()
        .flatten()
        .map(|m| app.hub.selector(m))
        .collect();
    app.hub
        .newest_with(|u| {
            (!u.private || crate::hub::any_matches(&grants, &u.topics)).then(|| u.id.clone())
        })
        .unwrap_or_else(|| "earliest".into())
}

/// `HEAD /.well-known/mercure?topic=…`: the same checks and headers as `GET`, no stream.
pub async fn subscribe_head(State(app): State<AppState>, req: Request) -> Response {
    if let Err(r) = super::room_for_stream(&app) {
        return r;
    }
    let q = match parse_subscribe_query(&app, &req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let (q, rights) = match check_subscriber(&app, &req, q) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(e) = app.hub.admit(&q.topics, rights.is_none()) {
        return subscribe_error(e);
    }
    let resume = match header_last_event_id(&req) {
        Ok(h) => sent_cursor(resolve_cursor(h, q.last_event_id), q.dialect),
        Err(r) => return r,
    };
    let answer = match resume.as_deref() {
        Some("") => Some(newest_visible(&app, rights.as_ref())),
        Some(id) => {
            let rights = rights.map(|r| r.subscribe.unwrap_or_default());
            Some(app.hub.resume_answer(id, rights.as_deref()))
        }
        None => None,
    };
    stream_response(axum::body::Body::empty(), answer.as_deref(), q.dialect)
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
                // A presentation the hub will not take, as RFC 6750 names it: 400
                // `invalid_request` with a challenge (mercure-1.0.md, the 1.0 error forms,
                // used for 0.x requests too).
                if let Err(reason) = csrf_check(&app, req.headers()) {
                    return refuse_auth(AuthError::BadRequest(reason), &app);
                }
            }
            let resource = app.tokens.resource(&req);
            match app
                .publisher_key
                .verify_publisher(t, &app.tokens.expected(&resource))
                .and_then(|r| served_dialect(&app, r))
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
    let bytes = match tokio::time::timeout(app.body_timeout, body.collect()).await {
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
        Err((status, reason)) => return refuse(status, reason, &app),
    };
    // After the token (401), before the scope (403): a topic that no token could make valid
    // (`*`, one in the hub's namespace) is refused as such whatever the token grants.
    if let Err(e) = draft.validate() {
        return refuse(invalid_status(&e), e, &app);
    }
    if let Err(reason) = may_publish(&app, &rights, &draft.topics) {
        return refuse_auth(AuthError::Forbidden(reason), &app);
    }
    match crate::cluster::publish_via(&app.hub, app.cluster.as_ref(), draft).await {
        Ok(id) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], id).into_response(),
        Err(PublishError::Invalid(e)) => refuse(invalid_status(&e), e, &app),
        Err(e @ PublishError::TooLarge(_)) => refuse(StatusCode::PAYLOAD_TOO_LARGE, e, &app),
        Err(
            e @ (PublishError::Unavailable(_)
            | PublishError::Unconfirmed(_)
            | PublishError::NotStored(_)),
        ) => {
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

/// A publish over one of the hub's limits is `413`; any other invalid one `400`.
fn invalid_status(e: &Invalid) -> StatusCode {
    match e {
        Invalid::TooManyTopics | Invalid::TopicTooLong | Invalid::TooMuchMatching { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        _ => StatusCode::BAD_REQUEST,
    }
}

fn draft_from_form(body: &[u8]) -> Result<Draft, (StatusCode, String)> {
    let pairs = form::parse(body, MAX_TOPICS + MAX_OTHER_PARAMS).map_err(|e| match e {
        form::FormError::TooMany(_) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Invalid::TooManyTopics.to_string(),
        ),
        e => (StatusCode::BAD_REQUEST, e.to_string()),
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
                d.retry = Some(
                    parse_retry(&value).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?,
                );
            }
            "private" => d.private = true,
            _ => {}
        }
    }
    d.data = data.unwrap_or_default();
    Ok(d)
}
