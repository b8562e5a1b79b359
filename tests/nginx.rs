//! `deploy/nginx.conf`, as shipped, in front of a real hub: Debian's nginx runs as the current
//! user from a directory of its own, with the site's upstream and listen lines pointed at free
//! ports of 127.0.0.1. Without nginx the test skips loudly, unless `SSEHUB_REQUIRE_ALL=1`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_quiet, take, TestHub};
use http::{HeaderMap, HeaderValue, StatusCode};
use ssehub::client::{Connection, EventStream, Target};

/// The site file users install.
const SITE: &str = include_str!("../deploy/nginx.conf");

/// `text` with `from` replaced by `to`, which must occur exactly once: the test runs the
/// shipped file, so a change of its shape must show here rather than go untested.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "deploy/nginx.conf should contain {from:?} exactly once"
    );
    text.replacen(from, to, 1)
}

/// An nginx of our own serving `deploy/nginx.conf` on `port`, proxying to `upstream`.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn start(binary: &std::path::Path, upstream: std::net::SocketAddr) -> Nginx {
        let port = common::free_port();
        let dir = std::env::temp_dir().join(format!("ssehub-nginx-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let site = replace_once(
            SITE,
            "server 127.0.0.1:8000;",
            &format!("server {upstream};"),
        );
        let site = replace_once(&site, "listen 80;", &format!("listen 127.0.0.1:{port};"));
        let site = replace_once(&site, "listen [::]:80;", "");
        std::fs::write(dir.join("site.conf"), site).unwrap();

        let d = dir.display();
        // As root, nginx would hand its worker to `nobody`; as anyone else it stays itself.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let main = format!(
            "daemon off;\n\
             master_process off;\n\
             {user}\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               access_log {d}/access.log;\n\
               client_body_temp_path {d}/client_body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();

        let mut child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read as _;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {err}\n{log}");
            }
            assert!(Instant::now() < deadline, "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, dir, port }
    }

    fn target(&self, path: &str) -> Target {
        Target::parse(&format!("http://127.0.0.1:{}{path}", self.port)).unwrap()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_nginx_site_passes_events_heartbeats_and_replay() {
    let Some(binary) = common::require_program("nginx", "nginx") else {
        return;
    };
    let hub = TestHub::start(&["--heartbeat", "1s"]);
    let nginx = Nginx::start(&binary, hub.addr);
    let stream_url = nginx.target("/.well-known/mercure?topic=news");
    let mut publisher = Connection::open(&nginx.target("/.well-known/mercure"))
        .await
        .unwrap();
    let token = hub.publisher_token();
    let mut publish = async |data: &str| -> String {
        let (status, body) = publisher
            .publish(Some(&token), &[("topic", "news"), ("data", data)])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "publish through nginx: {body}");
        body
    };

    // An event published after subscribing comes at once: a buffering proxy would hold it
    // until kilobytes had gathered, or until the stream ended.
    let mut stream = EventStream::open(&stream_url, &HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(
        stream.headers["content-type"], "text/event-stream",
        "{:?}",
        stream.headers
    );
    let first = publish("first").await;
    let got = take(&mut stream, 1, Duration::from_secs(5)).await;
    assert_eq!(
        (got[0].id.as_str(), got[0].data.as_str()),
        (first.as_str(), "first")
    );

    // Idle, the stream carries the hub's heartbeats (one a second here) through nginx.
    let before = stream.comments();
    assert_quiet(&mut stream, Duration::from_millis(3500)).await;
    assert!(
        stream.comments() >= before + 2,
        "heartbeats through nginx: {} comment lines, {before} before the wait",
        stream.comments()
    );

    // The subscriber goes away; what is published meanwhile is replayed when it comes back
    // with Last-Event-ID, through nginx, once each, then live updates follow.
    drop(stream);
    let missed = [publish("second").await, publish("third").await];
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", HeaderValue::from_str(&first).unwrap());
    let mut stream = EventStream::open(&stream_url, &headers).await.unwrap();
    assert_eq!(stream.headers["last-event-id"], first.as_str());
    let live = publish("fourth").await;
    let got = take(&mut stream, 3, Duration::from_secs(5)).await;
    let got: Vec<(&str, &str)> = got
        .iter()
        .map(|e| (e.id.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (missed[0].as_str(), "second"),
            (missed[1].as_str(), "third"),
            (live.as_str(), "fourth")
        ]
    );
    assert_quiet(&mut stream, Duration::from_millis(500)).await;
}

/// What the test cannot wait for: the read timeout must leave an idle stream (one heartbeat
/// every 15 s by default) open for far longer than nginx's default of 60 s.
#[test]
fn the_shipped_nginx_site_does_not_time_idle_streams_out() {
    let timeout = SITE
        .lines()
        .find_map(|l| l.trim().strip_prefix("proxy_read_timeout "))
        .expect("deploy/nginx.conf sets proxy_read_timeout")
        .trim_end_matches(';');
    let secs = match timeout.split_at(timeout.len() - 1) {
        (n, "h") => n.parse::<u64>().unwrap() * 3600,
        (n, "m") => n.parse::<u64>().unwrap() * 60,
        (n, "s") => n.parse::<u64>().unwrap(),
        _ => timeout.parse().unwrap(),
    };
    assert!(secs >= 600, "proxy_read_timeout {timeout} is too short");
    for line in [
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_http_version 1.1;",
    ] {
        assert!(SITE.contains(line), "deploy/nginx.conf lacks {line}");
    }
}
