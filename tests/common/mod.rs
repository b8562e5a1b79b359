//! Starts a hub on 127.0.0.1 and talks to it over TCP: in this process (`TestHub::start`),
//! on a listener bound to port 0 and a runtime of its own, or as the built binary
//! (`TestHub::start_process`) for what only a process has: signals, exit codes, resource
//! limits, its memory, being killed, and what it prints.
#![allow(dead_code)]

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser as _;
use http::{HeaderMap, HeaderValue, StatusCode};
use ssehub::auth::Key;
use ssehub::client::{Connection, EventStream, Target};
use ssehub::config::LogFormat;
use ssehub::sse::Event;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-for-ssehub";

/// How long an in-process hub may take to stop once told to: its graceful shutdown gives
/// connections 4 s to finish, and the runtime one more.
const STOP_WITHIN: Duration = Duration::from_secs(10);

pub struct TestHub {
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: String,
    /// A certificate the test's clients trust (a TLS hub's self-signed one).
    pub trust: Option<rustls::pki_types::CertificateDer<'static>>,
    running: Running,
    logs: Arc<Mutex<Vec<String>>>,
    /// The data directory made for this hub (removed with it), when the test gave none.
    own_data_dir: Option<std::path::PathBuf>,
    pub key: Key,
}

/// Where the hub runs.
enum Running {
    /// `ssehub::run` on a thread of its own; stopped by `stop`, which says how it ended on
    /// `ended`.
    InProcess {
        stop: CancellationToken,
        ended: Receiver<Result<(), String>>,
        thread: Option<std::thread::JoinHandle<()>>,
        /// Its `--data-dir`, whose store it lets go of after it stops.
        data_dir: Option<std::path::PathBuf>,
    },
    /// The built `ssehub` binary.
    Process(Child),
}

impl TestHub {
    /// Starts the hub in this process with `args`, adding a free port, a known key and no
    /// clock unless given. Unless `--data-dir` is given, the hub keeps its history in a
    /// directory of its own. Connections may be made at once: the listener is bound before
    /// this returns (the kernel queues them until the hub accepts).
    pub fn start(args: &[&str]) -> TestHub {
        let (argv, own_data_dir) = serve_args(args);
        let cli = ssehub::cli::Cli::try_parse_from(
            std::iter::once("ssehub".to_owned()).chain(argv.iter().cloned()),
        )
        .unwrap_or_else(|e| panic!("the hub's arguments {argv:?}: {e}"));
        let Some(ssehub::cli::Command::Serve(serve)) = cli.command else {
            unreachable!("the arguments start with `serve`")
        };
        // As the binary does before it checks its settings: the default --max-connections
        // follows the open-file limit.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let config = serve
            .validate()
            .unwrap_or_else(|e| panic!("the hub's arguments {argv:?}: {e}"));
        let listener = std::net::TcpListener::bind(config.listen)
            .unwrap_or_else(|e| panic!("listen on {}: {e}", config.listen));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let data_dir = config.data_dir.clone();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let dispatch = log_dispatch(&logs, serve.log_format);
        let stop = CancellationToken::new();
        let (ended_tx, ended) = std::sync::mpsc::channel();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ssehub-test-hub".into())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .on_thread_start(move || {
                        let guard = tracing::dispatcher::set_default(&dispatch);
                        HUB_LOG.with(|g| *g.borrow_mut() = Some(guard));
                    })
                    .on_thread_stop(|| HUB_LOG.with(|g| drop(g.borrow_mut().take())))
                    .build()
                    .expect("the hub's runtime");
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    ssehub::run(listener, config, stopped).await
                });
                // As the binary does: streams left to clients that stopped reading must
                // not hold the hub.
                runtime.shutdown_timeout(Duration::from_secs(1));
                let _ = ended_tx.send(result.map_err(|e| format!("{e:#}")));
            })
            .expect("start the hub's thread");
        // Ready once it says it listens (its keys made, its store open, its cluster joined),
        // as the binary's tests were: a test may look at what start-up did (a lock taken, a
        // position in the cluster's stream) without a request first. Failing to start fails
        // here, with the hub's reason.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("listening on"))
        {
            match ended.try_recv() {
                Ok(Err(e)) => panic!("the hub did not start: {e}"),
                Ok(Ok(())) => panic!("the hub stopped as it started"),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    panic!("the hub's thread panicked as it started")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        TestHub {
            addr,
            scheme: scheme.to_owned(),
            trust: None,
            running: Running::InProcess {
                stop,
                ended,
                thread: Some(thread),
                data_dir,
            },
            logs,
            own_data_dir,
            key: Key::secret(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes()),
        }
    }

    /// Starts a TLS hub in this process whose self-signed certificate the test's clients
    /// trust.
    pub fn start_tls(args: &[&str], trust: rustls::pki_types::CertificateDer<'static>) -> TestHub {
        let mut hub = TestHub::start(args);
        hub.trust = Some(trust);
        hub
    }

    /// Starts the built `ssehub` binary with `args` (completed as [`TestHub::start`] does),
    /// for tests of what only a process has: its pid, memory, signals and exit.
    pub fn start_process(args: &[&str]) -> TestHub {
        TestHub::spawn(args, &[])
    }

    /// Starts the binary as [`TestHub::start_process`] does, serving TLS with a certificate
    /// the test's clients trust.
    pub fn start_process_tls(
        args: &[&str],
        trust: rustls::pki_types::CertificateDer<'static>,
    ) -> TestHub {
        let mut hub = TestHub::start_process(args);
        hub.trust = Some(trust);
        hub
    }

    /// Starts the binary as [`TestHub::start_process`] does, with the soft limit on the size
    /// of the files it writes (RLIMIT_FSIZE) at `bytes` (the hard limit unlimited, so that
    /// `prlimit --pid` can raise it again).
    pub fn start_with_file_size(args: &[&str], bytes: u64) -> TestHub {
        TestHub::spawn(args, &[(rlimit::Resource::FSIZE, bytes, rlimit::INFINITY)])
    }

    /// Starts the binary as [`TestHub::start_process`] does, with its open-file limit (soft
    /// and hard: the hub raises its soft limit to the hard one) at `open_files`.
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
        let (argv, own_data_dir) = serve_args(args);
        cmd.args(&argv)
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
            running: Running::Process(child),
            logs,
            own_data_dir,
            key: Key::secret(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes()),
        }
    }

    /// The process, for the methods that act on it; an in-process hub has none of its own.
    fn child(&self, what: &str) -> &Child {
        match &self.running {
            Running::Process(child) => child,
            Running::InProcess { .. } => panic!(
                "{what} needs the hub's own process, and this hub runs in the test's: \
                 start it with TestHub::start_process"
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child("pid()").id()
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
        let pid = self.child("rss_kib()").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
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
        let pid = self.child(&format!("signal({name:?})")).id();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits for the process to exit; `None` if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.child("wait_exit()");
        let Running::Process(child) = &mut self.running else {
            unreachable!()
        };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait().unwrap() {
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
        let failure = match &mut self.running {
            Running::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
            Running::InProcess {
                stop,
                ended,
                thread,
                data_dir,
            } => {
                stop.cancel();
                match ended.recv_timeout(STOP_WITHIN) {
                    Ok(Ok(())) => {
                        let _ = thread.take().map(std::thread::JoinHandle::join);
                        data_dir.as_deref().and_then(store_still_held)
                    }
                    Ok(Err(e)) => Some(format!("the hub failed: {e}")),
                    Err(RecvTimeoutError::Timeout) => Some(format!(
                        "the hub did not stop within {STOP_WITHIN:?} of being told to"
                    )),
                    Err(RecvTimeoutError::Disconnected) => {
                        Some("the hub's thread panicked".to_owned())
                    }
                }
            }
        };
        if let Some(dir) = &self.own_data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(failure) = failure {
            // A test already failing says why itself; the hub's own failure goes beside it.
            if std::thread::panicking() {
                eprintln!("{failure}");
            } else {
                panic!("{failure}\nits log:\n{}", self.logs().join("\n"));
            }
        }
    }
}

/// Waits for the store in `dir` to be let go of: its writer thread ends on its own after the
/// hub has stopped, and the next hub on the directory (or the binary) must find it unlocked,
/// as it would after a process exits. `None` once it is, or a failure.
fn store_still_held(dir: &std::path::Path) -> Option<String> {
    use std::os::fd::AsRawFd as _;
    let deadline = Instant::now() + STOP_WITHIN;
    loop {
        let Ok(file) = std::fs::File::open(dir.join(ssehub::hub::store::FILE)) else {
            return None;
        };
        // redb locks ranges of its file with open-file-description locks (flock where
        // those are missing): ask, on a descriptor of one's own, whether any is held.
        // SAFETY: fcntl and flock on a descriptor this function owns, with a lock
        // description it owns.
        let free = unsafe {
            let mut held: libc::flock = std::mem::zeroed();
            held.l_type = libc::F_WRLCK as _;
            held.l_whence = libc::SEEK_SET as _;
            libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &raw mut held) == 0
                && i32::from(held.l_type) == libc::F_UNLCK
                && libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0
        };
        if free {
            return None;
        }
        if Instant::now() > deadline {
            return Some(format!(
                "the hub still held its store in {} {STOP_WITHIN:?} after stopping",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The arguments of `ssehub serve` for a test hub: the test's `args`, with a free port, the
/// test key, no clock and a data directory of its own (returned, to be removed) unless given.
fn serve_args(args: &[&str]) -> (Vec<String>, Option<std::path::PathBuf>) {
    let has = |flag: &str| args.iter().any(|a| a.starts_with(flag));
    let mut argv = vec!["serve".to_owned()];
    let own_data_dir = (!has("--data-dir")).then(temp_dir);
    if let Some(dir) = &own_data_dir {
        argv.push("--data-dir".to_owned());
        argv.push(dir.display().to_string());
    }
    for (flag, default) in [
        ("--listen", "127.0.0.1:0"),
        ("--publisher-jwt-key", SECRET),
        ("--clock-interval", "0"),
    ] {
        if !has(flag) {
            argv.push(flag.to_owned());
            argv.push(default.to_owned());
        }
    }
    argv.extend(args.iter().map(|&a| a.to_owned()));
    (argv, own_data_dir)
}

thread_local! {
    /// An in-process hub's log, set as the default on each of its runtime's threads for the
    /// thread's life: the log of several hubs in one test binary stays apart.
    static HUB_LOG: RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// What the binary's logging does (src/main.rs `init_logging`, with RUST_LOG=info and no
/// colours), writing each line into `logs` instead of stderr.
fn log_dispatch(logs: &Arc<Mutex<Vec<String>>>, format: LogFormat) -> tracing::Dispatch {
    let logs = logs.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(move || LogLines(logs.clone()))
        .with_target(false)
        .with_ansi(false);
    match format {
        LogFormat::Text => tracing::Dispatch::new(builder.finish()),
        LogFormat::Json => tracing::Dispatch::new(builder.json().finish()),
    }
}

/// Appends what it is given to a hub's log, a line at a time (the formatter writes each
/// event whole).
struct LogLines(Arc<Mutex<Vec<String>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0
            .lock()
            .unwrap()
            .extend(text.lines().map(str::to_owned));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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

/// Follows one stream across `nodes` (its address on each node of a cluster), starting on
/// `start`, moving to the next node with `Last-Event-ID` whenever a stream breaks, until `n`
/// updates arrived.
pub async fn follow_across(nodes: Vec<Target>, start: usize, n: usize) -> Vec<Event> {
    let mut got: Vec<Event> = Vec::new();
    let mut at = start;
    let deadline = Instant::now() + Duration::from_secs(90);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} updates",
            got.len()
        );
        let mut h = HeaderMap::new();
        if let Some(last) = got.last() {
            h.insert("last-event-id", HeaderValue::from_str(&last.id).unwrap());
        }
        let Ok(mut s) = EventStream::open(&nodes[at], &h).await else {
            at = (at + 1) % nodes.len();
            continue;
        };
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), s.next()).await {
                Ok(Ok(Some(e))) => got.push(e),
                _ => {
                    at = (at + 1) % nodes.len();
                    break;
                }
            }
        }
    }
    got
}

/// Publishes `data` on topic `t`, retrying on refusals until `within`; the id once stored.
/// Every attempt carries the same id, so that one stored though not answered `200` (a timeout
/// during a failover) and its retry are one update where the engine keeps ids apart (NATS).
pub async fn publish_until_ok(hub: &TestHub, data: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let id = format!("urn:ssehub-test:{data}");
    loop {
        if let Ok(mut c) = Connection::open(&hub.target("/.well-known/mercure")).await {
            let token = hub.publisher_token();
            let fields = [("topic", "t"), ("data", data), ("id", &id)];
            if let Ok((StatusCode::OK, id)) = c.publish(Some(&token), &fields).await {
                return id;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no publish of {data:?} succeeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster of three nodes (processes) loses one (`kill -9`) a third of the way through `n`
/// updates published through the other two in turn: six subscribers, two per node, each
/// receive every update once, in order, those of the killed node resuming on another with
/// `Last-Event-ID`. The same for every engine.
pub async fn node_kill_scenario(nodes: &[TestHub], n: usize) {
    assert_eq!(nodes.len(), 3);
    let addrs: Vec<Target> = nodes
        .iter()
        .map(|n| n.target("/.well-known/mercure?topic=t"))
        .collect();
    let mut followers = Vec::new();
    for i in 0..6 {
        followers.push(tokio::spawn(follow_across(addrs.clone(), i % 3, n)));
    }
    // Let every follower connect before the first update.
    for node in nodes {
        node.wait_metric(
            "ssehub_subscribers_connected",
            |v| v >= 2.0,
            Duration::from_secs(10),
        )
        .await;
    }
    for i in 0..n {
        if i == n / 3 {
            nodes[2].signal("KILL");
        }
        publish_until_ok(&nodes[i % 2], &i.to_string(), Duration::from_secs(20)).await;
    }
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    for f in followers {
        let got: Vec<String> = f.await.unwrap().into_iter().map(|e| e.data).collect();
        assert_eq!(got, want, "every update once, in order");
    }
}

/// The program `name` on PATH, or in /usr/sbin where Debian puts servers (nginx,
/// nats-server). When it is missing: a loud SKIP and `None`, or, under `SSEHUB_REQUIRE_ALL=1`
/// (which `.ci/run` sets after installing them), a failure.
pub fn require_program(name: &str, apt_package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|p| p.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        // libtest names each test's thread after the test.
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        if std::env::var("SSEHUB_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!(
                "{test}: {name} not found, and SSEHUB_REQUIRE_ALL=1 requires it (apt-get install \
                 {apt_package})"
            );
        }
        // Straight to the process's stderr: the test harness would swallow `eprintln!`.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!! SKIP {test}: {name} not found (apt-get install {apt_package}) !!!!!\n"
        );
    }
    found
}

/// A port of 127.0.0.1 that was free a moment ago, for a server the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// An HTTP/2 client on `io` whose streams get no flow-control window at all (the hub can send
/// them their response's head and nothing else); its connection's task runs on, answering
/// PINGs.
pub async fn zero_window_h2<IO>(io: IO) -> h2::client::SendRequest<bytes::Bytes>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .max_concurrent_reset_streams(1000)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.unwrap()
}

/// Waits (at most 20 s) for the hub to reset an HTTP/2 stream that has no window (nothing may
/// arrive on it), and checks the reset is a CANCEL.
pub async fn h2_reset(mut body: h2::RecvStream) {
    let next = tokio::time::timeout(Duration::from_secs(20), body.data()).await;
    match next {
        Err(_) => panic!("the stalled stream was not reset within 20 s"),
        Ok(Some(Err(e))) => assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}"),
        Ok(other) => panic!("expected a reset, got {other:?}"),
    }
}

/// The status of a GET of `url` on an HTTP/2 connection, answered within 5 s.
pub async fn h2_status(
    client: &h2::client::SendRequest<bytes::Bytes>,
    url: String,
) -> http::StatusCode {
    let req = http::Request::get(url).body(()).unwrap();
    let mut ready = client.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(req, true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("the connection answers")
        .unwrap()
        .status()
}

/// A HEADERS frame (END_STREAM | END_HEADERS) of a GET of `path` on HTTP/2 stream `stream`,
/// coded by hand as a raw client does: the method and scheme (GET, http) by HPACK's static
/// table, `:path`, `:authority` and `extra` as literals without indexing.
pub fn h2_get_frame(stream: u32, path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    // An integer with an n-bit prefix (RFC 7541 §5.1), the prefix byte's other bits `flags`.
    fn integer(out: &mut Vec<u8>, bits: u32, flags: u8, mut v: usize) {
        let max = (1usize << bits) - 1;
        if v < max {
            out.push(flags | v as u8);
            return;
        }
        out.push(flags | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }
    let mut block = vec![0x82, 0x86];
    let headers = [(":path", path), (":authority", authority)];
    for (name, value) in headers.iter().chain(extra) {
        // A literal without indexing, its name new (§6.2.2).
        block.push(0);
        integer(&mut block, 7, 0, name.len());
        block.extend_from_slice(name.as_bytes());
        integer(&mut block, 7, 0, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    let len = (block.len() as u32).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], 0x1, 0x5];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}
