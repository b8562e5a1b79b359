//! The client side: publish an update, follow a stream. Used by the `publish` and `subscribe`
//! commands, the benchmark and the tests, so that there is one implementation of the wire.
//!
//! Built directly on hyper's client connection (one TCP connection per publisher or stream)
//! rather than on a full HTTP client: the hub is one known endpoint, and the tests and the
//! benchmark need to see exactly what one connection does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::sse::{Event, Parser};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{0:?} is not a usable hub URL: give one like http://127.0.0.1:8000/.well-known/mercure"
    )]
    BadUrl(String),
    // `cause`, not `source`: the message already says it, and a source would be said again
    // by every `{:#}` that prints the chain.
    #[error("cannot connect to {addr}: {cause}{}", connect_hint(cause))]
    Connect { addr: String, cause: std::io::Error },
    #[error("TLS with {addr} failed: {cause}{}", tls_hint(cause))]
    Tls { addr: String, cause: std::io::Error },
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error("HTTP error talking to the hub: {0}")]
    Http(#[from] hyper::Error),
    #[error("the hub answered {status}: {reason}")]
    Refused { status: StatusCode, reason: String },
    /// An answer no Mercure hub gives at its endpoint: the URL names something else (most
    /// often the hub's root, with `/.well-known/mercure` forgotten).
    #[error("{url} answered {answer}, not {expected}: {}", url_hint(url))]
    NotAHub {
        url: String,
        /// The status, or the content type of a 200.
        answer: String,
        /// What a hub would have answered.
        expected: &'static str,
    },
    #[error("the stream sent an event-stream line longer than the limit")]
    LineTooLong,
}

fn connect_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ". Is the hub running there?",
        _ => "",
    }
}

/// What to do about the certificate errors rustls reports by name only.
fn tls_hint(e: &std::io::Error) -> &'static str {
    let said = e.to_string();
    if said.contains("UnknownIssuer") {
        ". The hub's certificate is not signed by an authority this machine trusts: to trust \
         it, name its CA's certificate (or the hub's self-signed one) in SSL_CERT_FILE, e.g. \
         SSL_CERT_FILE=ca.pem ssehub subscribe …"
    } else if said.contains("CaUsedAsEndEntity") {
        ". The hub's certificate is a CA certificate (basicConstraints CA:TRUE), which a \
         server cannot use: make the hub a certificate with CA:FALSE (a self-signed one with \
         openssl req -x509 … -addext basicConstraints=critical,CA:FALSE)"
    } else if said.contains("NotValidForName") {
        ". The certificate does not name this host: use a host name it was issued for in the \
         hub URL"
    } else if said.contains("Expired") {
        ". The hub's certificate has expired (or this machine's clock is wrong)"
    } else if said.contains("InvalidContentType") || said.contains("corrupt message") {
        ". Is the hub serving HTTPS there? Use http:// for a plain port"
    } else {
        ""
    }
}

/// Where a hub's endpoint is, for a URL that turned out to name something else.
fn url_hint(url: &str) -> &'static str {
    if url.contains(crate::hub::update::RESERVED_PATH) {
        "is this a Mercure hub's URL?"
    } else {
        "is the hub URL missing /.well-known/mercure? (e.g. \
         http://127.0.0.1:8000/.well-known/mercure)"
    }
}

/// Where to reach a hub: host:port, the request target, and TLS settings for `https`.
#[derive(Clone)]
pub struct Target {
    pub authority: String,
    pub host: String,
    pub path_and_query: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path_and_query)
    }
}

impl Target {
    /// Parses an `http://` or `https://` URL. For `https`, the server's certificate must chain
    /// to the system's roots (`/etc/ssl/certs/ca-certificates.crt`) or to a certificate in the
    /// file named by `SSL_CERT_FILE`.
    pub fn parse(url: &str) -> Result<Target, ClientError> {
        Target::parse_trusting(url, &[])
    }

    /// Like [`Target::parse`], also trusting `extra` certificates (e.g. a self-signed one).
    pub fn parse_trusting(
        url: &str,
        extra: &[CertificateDer<'static>],
    ) -> Result<Target, ClientError> {
        let bad = || ClientError::BadUrl(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let (tls, default_port) = match uri.scheme_str() {
            Some("http") => (None, 80),
            Some("https") => (Some(Arc::new(tls_config(extra))), 443),
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        let port = authority.port_u16().unwrap_or(default_port);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Target {
            authority: format!("{}:{port}", authority.host()),
            host: host.to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned()),
            tls,
        })
    }

    /// The URL without its query, for messages (the query is the caller's topics).
    pub fn url_without_query(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let path = self.path_and_query.split('?').next().unwrap_or("/");
        format!("{scheme}://{}{path}", self.authority)
    }

    /// The same hub, another path and query.
    pub fn with_path(&self, path_and_query: impl Into<String>) -> Target {
        Target {
            path_and_query: path_and_query.into(),
            ..self.clone()
        }
    }
}

/// Roots: the system bundle, `SSL_CERT_FILE`, and `extra`. HTTP/1.1 by ALPN.
fn tls_config(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(certs) = CertificateDer::pem_file_iter("/etc/ssl/certs/ca-certificates.crt") {
        for c in certs.flatten() {
            let _ = roots.add(c);
        }
    }
    // Named on purpose, so say when it gives nothing (the system store alone would then
    // refuse the hub's certificate with a less helpful message).
    if let Ok(file) = std::env::var("SSL_CERT_FILE") {
        match CertificateDer::pem_file_iter(&file) {
            Ok(certs) => {
                if certs
                    .flatten()
                    .filter(|c| roots.add(c.clone()).is_ok())
                    .count()
                    == 0
                {
                    tracing::warn!("SSL_CERT_FILE={file}: no certificate taken from it");
                }
            }
            Err(e) => tracing::warn!("SSL_CERT_FILE={file}: cannot read it: {e}"),
        }
    }
    for c in extra {
        let _ = roots.add(c.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// One keep-alive HTTP/1.1 connection to the hub.
pub struct Connection {
    target: Target,
    sender: SendRequest<Full<Bytes>>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/1.1 on an open connection, plain or TLS; the connection is driven on its own task.
async fn http1<IO>(io: IO) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

impl Connection {
    pub async fn open(target: &Target) -> Result<Connection, ClientError> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&target.authority),
        )
        .await
        .map_err(|_| ClientError::Timeout(target.authority.clone()))?
        .map_err(|cause| ClientError::Connect {
            addr: target.authority.clone(),
            cause,
        })?;
        let _ = tcp.set_nodelay(true);
        let sender = match &target.tls {
            None => http1(tcp).await?,
            Some(config) => {
                let name = ServerName::try_from(target.host.clone())
                    .map_err(|_| ClientError::BadUrl(target.host.clone()))?;
                let tls = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
                )
                .await
                .map_err(|_| ClientError::Timeout(target.authority.clone()))?
                .map_err(|cause| ClientError::Tls {
                    addr: target.authority.clone(),
                    cause,
                })?;
                http1(tls).await?
            }
        };
        Ok(Connection {
            target: target.clone(),
            sender,
        })
    }

    /// Sends one request and returns the response with its body unread.
    pub async fn send(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, &self.target.authority)
            .body(Full::new(body))
            .map_err(|_| ClientError::BadUrl(path_and_query.to_owned()))?;
        for (k, v) in headers {
            req.headers_mut().append(k, v.clone());
        }
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }

    /// Publishes one update (form fields as given) and returns the status and body text.
    pub async fn publish(
        &mut self,
        token: Option<&str>,
        fields: &[(&str, &str)],
    ) -> Result<(StatusCode, String), ClientError> {
        let (status, _, body) = self.post_form(token, fields).await?;
        Ok((status, body))
    }

    /// Posts the form to the hub URL: the status, the answer's media type and its text.
    async fn post_form(
        &mut self,
        token: Option<&str>,
        fields: &[(&str, &str)],
    ) -> Result<(StatusCode, String, String), ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        if let Some(t) = token {
            headers.insert(header::AUTHORIZATION, bearer(t)?);
        }
        let path = self.target.path_and_query.clone();
        let resp = self
            .send(
                Method::POST,
                &path,
                &headers,
                Bytes::from(encode_form(fields)),
            )
            .await?;
        let (status, content_type) = (resp.status(), media_type(resp.headers()));
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }
}

fn bearer(token: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ClientError::BadUrl("the token has characters a header cannot carry".into()))
}

/// `application/x-www-form-urlencoded` for the given fields.
pub fn encode_form(fields: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in fields {
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(utf8_percent_encode(k, NON_ALPHANUMERIC));
        out.push('=');
        out.extend(utf8_percent_encode(v, NON_ALPHANUMERIC));
    }
    out
}

/// Publishes once, on a connection of its own, and returns the id; a refusal is an error.
pub async fn publish(
    hub: &Target,
    token: Option<&str>,
    fields: &[(&str, &str)],
) -> Result<String, ClientError> {
    let mut conn = Connection::open(hub).await?;
    let (status, content_type, body) = conn.post_form(token, fields).await?;
    if let Some(answer) = not_a_hub(status, &content_type, "text/plain") {
        return Err(ClientError::NotAHub {
            url: hub.url_without_query(),
            answer,
            expected: "a hub's answer to a publish",
        });
    }
    if status != StatusCode::OK {
        return Err(ClientError::Refused {
            status,
            reason: body.trim().to_owned(),
        });
    }
    Ok(body)
}

/// The media type of an answer (`text/html` of `text/html; charset=utf-8`), lower case.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// What is wrong with an answer no hub gives at its endpoint, or `None` for one it may give.
/// A hub answers its endpoint's GET and POST, so `404` and `405` mean another URL; every
/// refusal of a hub is a line of text, so an HTML page means another server or page; and a
/// `200` must be of the content type asked for (`success_type`).
fn not_a_hub(status: StatusCode, content_type: &str, success_type: &str) -> Option<String> {
    let shown = if content_type.is_empty() {
        "no content type"
    } else {
        content_type
    };
    if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
        Some(status.to_string())
    } else if content_type == "text/html" && status != StatusCode::OK {
        Some(format!("{status} with an HTML page"))
    } else if status == StatusCode::OK && content_type != success_type {
        Some(shown.to_owned())
    } else {
        None
    }
}

/// An open event stream.
pub struct EventStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    parser: Parser,
    ready: VecDeque<Event>,
    scratch: Vec<Event>,
}

impl EventStream {
    /// Opens `target` (a stream URL) with the given extra headers. A non-200 answer is an
    /// error carrying the hub's reason.
    pub async fn open(target: &Target, headers: &HeaderMap) -> Result<EventStream, ClientError> {
        let mut conn = Connection::open(target).await?;
        let mut h = headers.clone();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let resp = conn
            .send(Method::GET, &target.path_and_query, &h, Bytes::new())
            .await?;
        let status = resp.status();
        if let Some(answer) = not_a_hub(status, &media_type(resp.headers()), "text/event-stream") {
            return Err(ClientError::NotAHub {
                url: target.url_without_query(),
                answer,
                expected: "an event stream",
            });
        }
        if status != StatusCode::OK {
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(ClientError::Refused {
                status,
                reason: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        let (parts, body) = resp.into_parts();
        Ok(EventStream {
            status,
            headers: parts.headers,
            body,
            parser: Parser::with_max_line(16 << 20),
            ready: VecDeque::new(),
            scratch: Vec::new(),
        })
    }

    /// The next event; `Ok(None)` when the hub ended the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(Some(e));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.parser
                            .feed(&data, &mut self.scratch)
                            .map_err(|_| ClientError::LineTooLong)?;
                        self.ready.extend(self.scratch.drain(..));
                    }
                }
            }
        }
    }

    /// Comment lines (heartbeats and the opening comment) seen so far.
    pub fn comments(&self) -> u64 {
        self.parser.comments
    }

    /// The id of the last event received, as a browser would resume with.
    pub fn last_event_id(&self) -> &str {
        self.parser.last_event_id()
    }
}
