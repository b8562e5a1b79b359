//! The seed's demo, kept: the page, the `/events/` stream of the clock, the log lines, and
//! none of the seed's defects.

mod common;

use std::time::Duration;

use common::{get, request, take, TestHub};
use http::{Method, StatusCode};
use ssehub::client::EventStream;

#[tokio::test(flavor = "multi_thread")]
async fn page_has_the_seed_text_and_appends_text_nodes() {
    let hub = TestHub::start(&[]);
    let ((status, body), headers) = request(&hub, Method::GET, "/", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(body.contains("Yo friend, here are some fascinating messages about the current time:"));
    assert!(body.contains("new EventSource(") && body.contains("\"/events/\""));
    assert!(
        body.contains("\"/events/?lastEventID=\" + encodeURIComponent("),
        "a reopened page resumes from the last id it showed"
    );
    // Never framed by another site, never sniffed.
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["content-security-policy"], "frame-ancestors 'none'");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(body.contains("textContent"), "updates are appended as text");
    assert!(!body.contains("innerHTML"), "never parsed as HTML");
    assert!(hub.wait_for_log("Finished HTTP request at /", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn events_stream_the_clock_with_ids_and_seed_log_lines() {
    let hub = TestHub::start(&["--clock-interval", "100ms"]);
    for path in ["/events/", "/events"] {
        let mut s = EventStream::open(&hub.target(path), &Default::default())
            .await
            .unwrap();
        assert_eq!(s.headers["content-type"], "text/event-stream");
        assert!(s.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("no-cache"));
        assert_eq!(s.headers["x-accel-buffering"], "no");
        let events = take(&mut s, 3, Duration::from_secs(10)).await;
        assert_eq!(s.comments(), 1, "the opening comment came first");
        let mut last_n = None;
        for e in &events {
            assert!(
                e.id.starts_with("urn:uuid:"),
                "every update has an id: {e:?}"
            );
            let rest = e.data.strip_prefix("Message: ").expect("seed text");
            let (n, time) = rest.split_once(" - the time is ").expect("seed text");
            let n: u64 = n.parse().unwrap();
            if let Some(prev) = last_n {
                assert_eq!(n, prev + 1, "consecutive ticks");
            }
            last_n = Some(n);
            // "2026-11-25 08:50:36.271066 +0000": date, microseconds, offset.
            assert_eq!(
                time.len(),
                "2026-11-25 08:50:36.271066 +0000".len(),
                "{time}"
            );
            assert_eq!(&time[19..20], ".");
        }
    }
    for line in [
        "Added new client",
        "Sent message 0",
        "Broadcast message to 1 clients",
    ] {
        assert!(
            hub.wait_for_log(line, Duration::from_secs(5)),
            "log line {line:?} missing: {:#?}",
            hub.logs()
        );
    }
    // The first stream was dropped above: the hub says so.
    assert!(hub.wait_for_log("Removed client", Duration::from_secs(5)));
    assert!(hub.wait_for_log("Finished HTTP request at /events/", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_and_opening_comment_come_at_once() {
    // A clock so slow that a client waiting for the first tick would time out.
    let hub = TestHub::start(&["--clock-interval", "1h"]);
    assert!(hub.wait_for_log("Sent message 0", Duration::from_secs(5)));
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        EventStream::open(&hub.target("/events/"), &Default::default()),
    )
    .await
    .expect("headers at once")
    .unwrap();
    // Message 0 went out at start; the stream carries nothing until the next tick, but the
    // opening comment has arrived.
    let r = tokio::time::timeout(Duration::from_millis(500), s.next()).await;
    assert!(r.is_err(), "no event expected");
    assert_eq!(s.comments(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn head_wrong_methods_and_unknown_paths() {
    let hub = TestHub::start(&[]);
    for path in ["/events/", "/.well-known/mercure?topic=x"] {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            request(&hub, Method::HEAD, path, &[], ""),
        )
        .await
        .expect("HEAD answered at once");
        let ((status, body), headers) = r;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["content-type"], "text/event-stream");
        assert!(body.is_empty());
    }
    let ((status, body), headers) = request(&hub, Method::POST, "/events/", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET,HEAD");
    assert_eq!(
        body, "method not allowed here; use GET,HEAD\n",
        "405 says why"
    );
    let ((status, _), headers) =
        request(&hub, Method::DELETE, "/.well-known/mercure", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(headers["allow"].to_str().unwrap().contains("POST"));
    for path in ["/nope", "/events/extra", "/.well-known/mercure/x/y/z/w"] {
        assert_eq!(
            get(&hub, path, &[]).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        get(&hub, "/healthz", &[]).await,
        (StatusCode::OK, "ok\n".into())
    );
    assert_eq!(get(&hub, "/readyz", &[]).await.0, StatusCode::OK);
}

#[test]
fn busy_port_is_a_clear_error_with_exit_code_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["--listen", &addr, "--clock-interval", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("--listen"), "says what to do: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_take_a_token_when_the_hub_requires_them() {
    // `--anonymous false` leaves no anonymous way in: the topic `time` may carry an
    // application's updates too.
    let hub = TestHub::start(&["--anonymous", "false"]);
    for method in [Method::GET, Method::HEAD] {
        for path in ["/events/", "/events"] {
            let ((status, body), h) = request(&hub, method.clone(), path, &[], "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
            // The RFC 6750 challenge for a missing token: no `error`, the metadata's URL.
            assert_eq!(
                h["www-authenticate"],
                format!(
                    "Bearer resource_metadata=\"{}\"",
                    hub.url("/.well-known/oauth-protected-resource/.well-known/mercure")
                )
                .as_str()
            );
        }
    }
    let token = hub.publisher_token();
    let cookie = format!("mercureAuthorization={token}");
    let mut headers = http::HeaderMap::new();
    headers.insert("cookie", cookie.parse().unwrap());
    let mut s = EventStream::open(&hub.target("/events/"), &headers)
        .await
        .unwrap();
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "time"), ("data", "app update")]).await;
    let e = &take(&mut s, 1, Duration::from_secs(5)).await[0];
    assert_eq!(e.data, "app update");
}

#[test]
fn bad_flags_are_clear_errors() {
    let file = env!("CARGO_MANIFEST_PATH");
    for (args, needle) in [
        (vec!["--listen", "nowhere"], "not an address"),
        (vec!["--max-body", "lots"], "not a size"),
        (vec!["--heartbeat", "soon"], "not a duration"),
        (vec!["--jwt-algorithm", "none"], "never accepted"),
        (vec!["--write-budget", "10"], "not in 1000..=10000000"),
        (vec!["--publisher-jwt-key", ""], "is empty"),
        (vec!["--subscriber-jwt-key", " "], "is empty"),
        (vec!["--max-connections", "0"], "at least 1"),
        // Flags other servers have: pointed to the one ssehub has.
        (vec!["--port", "8000"], "use --listen 127.0.0.1:PORT"),
        (vec!["serve", "--port=8000"], "use --listen 127.0.0.1:PORT"),
        (vec!["--cors-origins", ","], "no origin"),
        (
            vec!["--cors-origins", "*,https://a.example"],
            "give it alone",
        ),
        (
            vec!["--subscriptions", "--anonymous", "maybe"],
            "invalid value",
        ),
        // A key file without --jwt-algorithm must not become the HMAC secret (its path or
        // its public text, which anyone could sign with).
        (
            vec!["--listen", "127.0.0.1:0", "--publisher-jwt-key", file],
            "names a file",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--subscriber-jwt-key=-----BEGIN PUBLIC KEY-----\nMFkw",
            ],
            "--subscriber-jwt-key: this is a PEM key",
        ),
        // A secret given with an RSA algorithm is not repeated in the error.
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--jwt-algorithm",
                "RS256",
                "--publisher-jwt-key",
                "Sup3rS3cretHMAC",
            ],
            "--publisher-jwt-key: cannot read the key file",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"))
            .args(&args)
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("Sup3rS3cret"), "{args:?}: {err}");
    }
}

#[test]
fn a_generated_key_comes_with_a_ready_publish_command() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--clock-interval",
            "0",
            "--data-dir",
            "none",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut saw = false;
    for line in stderr.lines().take(10) {
        let line = line.unwrap();
        if line.contains("ssehub publish --hub http://127.0.0.1:") && line.contains("--token ey") {
            saw = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(saw, "no publish command printed");
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().1;
    if hard <= 256 {
        return;
    }
    // Started with a low soft limit, as systemd starts services (1,024 there).
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} --listen 127.0.0.1:0 --clock-interval 0 --publisher-jwt-key k --data-dir none",
            env!("CARGO_BIN_EXE_ssehub")
        ))
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find(|l| l.contains("connections at once"))
        .expect("the hub says how many connections it takes");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(soft, hard, "{limits}");
    assert!(line.contains(&format!("open-file limit {hard}")), "{line}");
}
