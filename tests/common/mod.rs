//! Starts a real `ssehub` process on 127.0.0.1 and talks to it over TCP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, StatusCode};
use ssehub::auth::Key;
use ssehub::client::{Connection, EventStream, Target};
use ssehub::sse::Event;

pub const SECRET: &str = "test-secret-for-ssehub";

pub struct TestHub {
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: String,
    /// A certificate the test's clients trust (a TLS hub's self-signed one).
    pub trust: Option<rustls::pki_types::CertificateDer<'static>>,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// The data directory made for this hub (removed with it), when the test gave none.
    own_data_dir: Option<std::path::PathBuf>,
    pub key: Key,
}

impl TestHub {
    /// Starts the hub with `args`, adding a free port, a known key and no clock unless given.
    /// Unless `--data-dir` is given, the hub keeps its history in a directory of its own.
    pub fn start(args: &[&str]) -> TestHub {
        TestHub::spawn(args, &[])
    }

    /// Starts the hub as [`TestHub::start`] does, with the soft limit on the size of the
    /// files it writes (RLIMIT_FSIZE) at `bytes` (the hard limit unlimited, so that
    /// `prlimit --pid` can raise it again).
    pub fn start_with_file_size(args: &[&str], bytes: u64) -> TestHub {
        TestHub::spawn(args, &[(rlimit::Resource::FSIZE, bytes, rlimit::INFINITY)])
    }

    /// Starts the hub as [`TestHub::start`] does, with its open-file limit (soft and hard:
    /// the hub raises its soft limit to the hard one) at `open_files`.
    pub fn start_with_open_files(args: &[&str], open_files: u64) -> TestHub {
        TestHub::spawn(args, &[(rlimit::Resource::NOFILE, open_files, open_files)])
    }

    fn spawn(args: &[&str], limits: &[(rlimit::Resource, u64, u64)]) -> TestHub {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ssehub"));
        for &(resource, soft, hard) in limits {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe and the closure allocates nothing.
            unsafe {
                cmd.pre_exec(move || rlimit::setrlimit(resource, soft, hard));
            }
        }
        let has = |flag: &str| args.iter().any(|a| a.starts_with(flag));
        let own_data_dir = (!has("--data-dir")).then(temp_dir);
        if let Some(dir) = &own_data_dir {
            cmd.arg("serve").arg("--data-dir").arg(dir);
        } else {
            cmd.arg("serve");
        }
        if !has("--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !has("--publisher-jwt-key") {
            cmd.args(["--publisher-jwt-key", SECRET]);
        }
        if !has("--clock-interval") {
            cmd.args(["--clock-interval", "0"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("SSEHUB_LISTEN")
            .env_remove("SSEHUB_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start ssehub");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|r| r.split("://").nth(1));
                if let Some(rest) = addr {
                    if let Some(tx) = tx.take() {
                        let scheme = line.split("listening on ").nth(1).unwrap_or("");
                        let scheme = scheme.split("://").next().unwrap_or("http").to_owned();
                        let _ = tx.send((scheme, rest.trim().to_owned()));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (scheme, addr) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the hub printed its address");
        TestHub {
            addr: addr.parse().unwrap(),
            scheme,
            trust: None,
            child,
            logs,
            own_data_dir,
            key: Key::secret(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a TLS hub whose self-signed certificate the test's clients trust.
    pub fn start_tls(args: &[&str], trust: rustls::pki_types::CertificateDer<'static>) -> TestHub {
        let mut hub = TestHub::start(args);
        hub.trust = Some(trust);
        hub
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn target(&self, path: &str) -> Target {
        let trust: Vec<_> = self.trust.iter().cloned().collect();
        Target::parse_trusting(&self.url(path), &trust).unwrap()
    }

    /// A token that may publish to every topic.
    pub fn publisher_token(&self) -> String {
        self.key.mint(Some(&["*".to_owned()]), None, None).unwrap()
    }

    /// A Mercure 1.0 access token (RFC 9068: `typ: at+jwt`, `iss`, `aud`, `exp`) signed with
    /// the hub's key, valid for an hour. `aud` is the hub's URL as the client reaches it (the
    /// hub checks it against the request's host); `publish` and `subscribe` are the topics of
    /// one `authorization_details` entry each, as `(match_type, match)` (`exact` or
    /// `urlpattern`); an empty list leaves the action out.
    pub fn access_token(
        &self,
        aud: &str,
        publish: &[(&str, &str)],
        subscribe: &[(&str, &str)],
    ) -> String {
        const DETAIL: &str = "https://mercure.rocks/authorization-detail";
        let topics = |list: &[(&str, &str)]| -> Vec<serde_json::Value> {
            list.iter()
                .map(|(t, m)| serde_json::json!({"match": m, "match_type": t}))
                .collect()
        };
        let mut details = Vec::new();
        for (action, list) in [("publish", publish), ("subscribe", subscribe)] {
            if !list.is_empty() {
                details.push(serde_json::json!({
                    "type": DETAIL, "actions": [action], "topics": topics(list),
                }));
            }
        }
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let claims = serde_json::json!({
            "iss": "ssehub-tests",
            "aud": aud,
            "exp": exp,
            "authorization_details": details,
        });
        self.key.sign("at+jwt", &claims).unwrap()
    }

    /// A Mercure 1.0 publisher: its access token may publish to every topic.
    pub async fn publisher_v1(&self) -> Publisher {
        Publisher {
            conn: Connection::open(&self.target("/.well-known/mercure"))
                .await
                .unwrap(),
            token: self.access_token(&self.url("/.well-known/mercure"), &[("exact", "*")], &[]),
        }
    }

    pub async fn publisher(&self) -> Publisher {
        Publisher {
            conn: Connection::open(&self.target("/.well-known/mercure"))
                .await
                .unwrap(),
            token: self.publisher_token(),
        }
    }

    /// Opens a Mercure subscription to `query` (e.g. `topic=a&topic=b`).
    pub async fn subscribe(&self, query: &str, headers: &[(&str, &str)]) -> EventStream {
        self.try_subscribe(query, headers).await.unwrap()
    }

    pub async fn try_subscribe(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<EventStream, ssehub::client::ClientError> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                // Bytes, not `from_str`: tests send UTF-8 values as browsers do.
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        EventStream::open(&self.target(&format!("/.well-known/mercure?{query}")), &h).await
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.logs().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The hub's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `HUP`…).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits for the process to exit; `None` if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A metric's value from `/metrics` (the whole line's name and labels, e.g.
    /// `ssehub_subscribers_dropped_total{reason="slow"}`).
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, body) = get(self, "/metrics", &[]).await;
        assert_eq!(status, StatusCode::OK);
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Polls a metric until `want` holds for it, failing after `within`; its last value.
    pub async fn wait_metric(
        &self,
        name: &str,
        want: impl Fn(f64) -> bool,
        within: Duration,
    ) -> f64 {
        let deadline = std::time::Instant::now() + within;
        loop {
            let v = self.metric(name).await;
            if want(v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} still {v} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.own_data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A new, empty directory under the system's temporary one, for a hub's data.
pub fn temp_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "ssehub-test-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Publisher {
    pub conn: Connection,
    pub token: String,
}

impl Publisher {
    pub async fn publish(&mut self, fields: &[(&str, &str)]) -> (StatusCode, String) {
        let token = self.token.clone();
        self.conn.publish(Some(&token), fields).await.unwrap()
    }

    /// Publishes and asserts success; returns the id.
    pub async fn ok(&mut self, fields: &[(&str, &str)]) -> String {
        let (status, body) = self.publish(fields).await;
        assert_eq!(status, StatusCode::OK, "publish refused: {body}");
        body
    }
}

/// A plain GET (or other method) on its own connection: status and body text.
pub async fn get(hub: &TestHub, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    request(hub, http::Method::GET, path, headers, "").await.0
}

pub async fn request(
    hub: &TestHub,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> ((StatusCode, String), HeaderMap) {
    use http_body_util::BodyExt;
    let mut conn = Connection::open(&hub.target(path)).await.unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            // Bytes, not `from_str`: tests send UTF-8 values as browsers do.
            HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    let resp = conn
        .send(method, path, &h, bytes::Bytes::from(body.to_owned()))
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        (status, String::from_utf8_lossy(&body).into_owned()),
        headers,
    )
}

/// The data of the next `n` events, failing if they do not come within 10 s.
pub async fn take_data(stream: &mut EventStream, n: usize) -> Vec<String> {
    take(stream, n, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|e| e.data)
        .collect()
}

/// Reads `n` events, failing if they do not come within `within`.
pub async fn take(stream: &mut EventStream, n: usize, within: Duration) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Ok(Some(e))) => out.push(e),
            Ok(Ok(None)) => panic!("stream ended after {} of {n} events", out.len()),
            Ok(Err(e)) => panic!("stream failed after {} of {n} events: {e}", out.len()),
            Err(_) => panic!("timed out after {} of {n} events", out.len()),
        }
    }
    out
}

/// Asserts that no event arrives within `wait`.
pub async fn assert_quiet(stream: &mut EventStream, wait: Duration) {
    if let Ok(r) = tokio::time::timeout(wait, stream.next()).await {
        panic!("expected no event, got {r:?}");
    }
}

/// Reads until `needle` has arrived (in the raw bytes), returning everything read.
pub async fn read_until(conn: &mut tokio::net::TcpStream, raw: &mut Vec<u8>, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(raw).contains(needle) {
        let n = tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(conn, &mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {needle:?}; got {:?}",
                    String::from_utf8_lossy(raw)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "connection closed before {needle:?}; got {:?}",
            String::from_utf8_lossy(raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
}
