//! Drives Debian's Chromium through chromedriver (WebDriver, via fantoccini) for the browser
//! tests, plus the small servers those tests put around the hub: a proxy whose connections can
//! be cut, and a page server on another origin.
//!
//! Without Chromium the tests skip loudly, unless `SSEHUB_REQUIRE_ALL=1`: then they fail.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One browser at a time: the machine is small, and Chromium is the heaviest thing here.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The flags Chromium needs on a machine without a display, a sandbox or an outside network.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1500",
];

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

pub struct Browser {
    client: Option<Client>,
    driver: Child,
    profile: PathBuf,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Browser {
    /// Starts chromedriver and a fresh headless Chromium. `None` (after a loud message) when
    /// they are not installed and `SSEHUB_REQUIRE_ALL` is not `1`.
    pub async fn start(test: &str) -> Option<Browser> {
        Browser::start_with(test, &[]).await
    }

    /// Like [`Browser::start`], trusting `cert` (a TLS hub's self-signed certificate) besides.
    pub async fn start_trusting(test: &str, cert: &SelfSigned) -> Option<Browser> {
        Browser::start_with(test, &[cert.chromium_flag()]).await
    }

    /// Like [`Browser::start`], with more command-line flags for Chromium.
    pub async fn start_with(test: &str, extra_flags: &[String]) -> Option<Browser> {
        let (Some(chromium), Some(chromedriver)) = (on_path("chromium"), on_path("chromedriver"))
        else {
            let why = "chromium and chromedriver are not both on PATH \
                       (install them: apt-get install chromium chromium-driver)";
            if std::env::var("SSEHUB_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!("{test}: {why}, and SSEHUB_REQUIRE_ALL=1 requires them");
            }
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("\n!!!!! SKIP {test}: {why} !!!!!\n").as_bytes(),
            );
            return None;
        };
        let turn = ONE_AT_A_TIME.lock().await;

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port for chromedriver")
            .port();
        let mut cmd = Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so that Chromium goes with it if the test panics.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd.spawn().expect("start chromedriver");

        let profile = std::env::temp_dir().join(format!(
            "ssehub-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let mut browser = Browser {
            client: None,
            driver,
            profile,
            _turn: turn,
        };

        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.display()));
        args.extend(extra_flags.iter().cloned());
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let caps = caps.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{port}");
        let mut last = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => {
                    browser.client = Some(c);
                    return Some(browser);
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("chromedriver on {url} did not start a Chromium session: {last:?}");
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` (a function body: use `return`) in the page.
    pub async fn js(&self, script: &str) -> Value {
        self.client()
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something truthy, and returns that; fails with `what`
    /// and the page's text when `within` passes first.
    pub async fn wait_for(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.js(script).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self.js("return document.body.innerText").await;
                panic!("timed out waiting for {what}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn screenshot(&self, path: &Path) {
        let png = self.client().screenshot().await.expect("screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (Chromium quits), then chromedriver.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The process group chromedriver leads: chromedriver and the Chromium it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, with its key, written as PEM files.
pub struct SelfSigned {
    dir: PathBuf,
    pub der: rustls::pki_types::CertificateDer<'static>,
    spki: Vec<u8>,
}

impl SelfSigned {
    pub fn generate(name: &str) -> SelfSigned {
        let dir =
            std::env::temp_dir().join(format!("ssehub-browser-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
        use rcgen::PublicKeyData;
        SelfSigned {
            dir,
            der: c.cert.der().clone(),
            spki: c.signing_key.subject_public_key_info(),
        }
    }

    pub fn cert_path(&self) -> String {
        self.dir.join("cert.pem").display().to_string()
    }

    pub fn key_path(&self) -> String {
        self.dir.join("key.pem").display().to_string()
    }

    /// Chromium's flag to accept this certificate, and no other that fails to validate: it
    /// names the certificate's public key (base64 of the SHA-256 of its SubjectPublicKeyInfo),
    /// rather than `--ignore-certificate-errors`, which would accept any certificate at all.
    pub fn chromium_flag(&self) -> String {
        use base64::Engine;
        use sha2::Digest;
        let pin =
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&self.spki));
        format!("--ignore-certificate-errors-spki-list={pin}")
    }
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of the hub whose connections the test can cut, as a flaky network
/// would, while the hub keeps running. It keeps the head of every request it forwarded.
pub struct CutProxy {
    pub addr: SocketAddr,
    live: Arc<Mutex<Vec<JoinHandle<()>>>>,
    heads: Arc<Mutex<Vec<String>>>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (l, h) = (live.clone(), heads.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let heads = h.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut hub) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    // Read the request head first, to keep it for the test.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    heads
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    if hub.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut hub).await;
                });
                l.lock().unwrap().push(task);
            }
        });
        CutProxy {
            addr,
            live,
            heads,
            accept,
        }
    }

    /// Closes every connection open through the proxy; new ones are still accepted.
    pub fn cut(&self) -> usize {
        let conns: Vec<_> = self.live.lock().unwrap().drain(..).collect();
        let open = conns.iter().filter(|t| !t.is_finished()).count();
        for t in conns {
            t.abort();
        }
        open
    }

    /// The heads of the requests forwarded so far.
    pub fn request_heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Serves one HTML page at every path, from its own port: another origin than the hub's.
pub struct PageServer {
    pub addr: SocketAddr,
    html: Arc<Mutex<String>>,
    accept: JoinHandle<()>,
}

impl PageServer {
    pub async fn start() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let html: Arc<Mutex<String>> = Arc::default();
        let page = html.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let body = page.lock().unwrap().clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncache-control: no-store\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        PageServer { addr, html, accept }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_page(&self, html: &str) {
        *self.html.lock().unwrap() = html.to_owned();
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
