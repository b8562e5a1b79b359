//! The client commands against a real hub: publish, subscribe (with replay), token.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestHub, SECRET};

fn ssehub(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `ssehub args`, killing it if it is still running after `within` (its status then
/// has no code).
fn ssehub_within(args: &[&str], within: Duration) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_then_subscribe_with_last_event_id() {
    let hub = TestHub::start(&[]);
    let url = hub.url("/.well-known/mercure");
    // A Mercure 1.0 token, for this hub's URL; and a 0.x one: both publish.
    let token = String::from_utf8(
        ssehub(&[
            "token",
            "--jwt-key",
            SECRET,
            "--publish",
            "*",
            "--audience",
            &url,
        ])
        .stdout,
    )
    .unwrap();
    let legacy = String::from_utf8(
        ssehub(&[
            "token",
            "--jwt-key",
            SECRET,
            "--publish",
            "*",
            "--protocol",
            "0.x",
        ])
        .stdout,
    )
    .unwrap();
    let out = ssehub(&[
        "publish",
        "--hub",
        &url,
        "--topic",
        "legacy",
        "--data",
        "x",
        "--token",
        legacy.trim(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = token.trim();
    let before = ssehub(&[
        "publish", "--hub", &url, "--topic", "books", "--data", "zero", "--token", token,
    ]);
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    let before_id = String::from_utf8(before.stdout).unwrap().trim().to_owned();
    assert!(before_id.starts_with("urn:uuid:"));

    // stdin data and a minted token.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args([
            "publish",
            "--hub",
            &url,
            "--topic",
            "books",
            "--data",
            "-",
            "--jwt-key",
            SECRET,
            "--id",
            "b-1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "b-1");

    let sub = ssehub(&[
        "subscribe",
        "--hub",
        &url,
        "--topic",
        "books",
        "--last-event-id",
        &before_id,
        "--json",
        "--count",
        "1",
    ]);
    assert!(
        sub.status.success(),
        "{}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&sub.stdout).unwrap();
    assert_eq!(line["id"], "b-1");
    assert_eq!(line["data"], "line one\nline two");
    assert_eq!(line["type"], "message");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_reconnects_by_itself() {
    let first = TestHub::start(&[]);
    let addr = first.addr.to_string();
    let url = first.url("/.well-known/mercure");
    let child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["subscribe", "--hub", &url, "--topic", "t", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    first
        .wait_metric(
            "ssehub_subscribers_connected",
            |v| v >= 1.0,
            Duration::from_secs(10),
        )
        .await;
    // retry: 100 ms, so that the client comes back quickly.
    first
        .publisher()
        .await
        .ok(&[("topic", "t"), ("data", "one"), ("retry", "100")])
        .await;
    // Stopped (its stream ended as at SIGTERM), and its port free again.
    drop(first);
    // A new hub on the same address: the client finds it by itself.
    let second = TestHub::start(&["--listen", &addr]);
    second
        .wait_metric(
            "ssehub_subscribers_connected",
            |v| v >= 1.0,
            Duration::from_secs(20),
        )
        .await;
    second
        .publisher()
        .await
        .ok(&[("topic", "t"), ("data", "two")])
        .await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "one\ntwo\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("reconnecting"));
}

#[test]
fn clear_errors_and_exit_code_1() {
    let hub = TestHub::start(&[]);
    let url = hub.url("/.well-known/mercure");
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "publish", "--hub", &url, "--topic", "a", "--data", "x", "--token", "bad",
            ],
            "401",
        ),
        (
            &[
                "publish",
                "--hub",
                &url,
                "--topic",
                "a",
                "--data",
                "x",
                "--jwt-key",
                "wrong key",
            ],
            "signature",
        ),
        (
            &[
                "publish",
                "--hub",
                "http://127.0.0.1:1/.well-known/mercure",
                "--topic",
                "a",
                "--data",
                "x",
                "--token",
                "x",
            ],
            "cannot connect",
        ),
        (
            &[
                "publish",
                "--hub",
                "not a url",
                "--topic",
                "a",
                "--data",
                "x",
                "--token",
                "x",
            ],
            "not a usable hub URL",
        ),
    ];
    for (args, needle) in cases {
        let out = ssehub(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = ssehub(&["subscribe", "--hub", &url, "--topic", "a", "--token", "bad"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    // What waiting would never mend ends `subscribe` at once: here TLS to a plain port.
    let tls = url.replacen("http://", "https://", 1);
    let out = ssehub(&["subscribe", "--hub", &tls, "--topic", "a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"));
    // The data is required (`--data ''` for none), as the contract writes the command.
    let out = ssehub(&["publish", "--hub", &url, "--topic", "a", "--token", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data"));
    // The cause is said once.
    let out = ssehub(&[
        "publish",
        "--hub",
        "http://127.0.0.1:1/.well-known/mercure",
        "--topic",
        "a",
        "--data",
        "x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("refused").count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_waits_for_a_hub_that_is_not_up_yet() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/.well-known/mercure");
    let child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["subscribe", "--hub", &url, "--topic", "t", "--count", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hub = TestHub::start(&["--listen", &format!("127.0.0.1:{port}")]);
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(30),
    )
    .await;
    hub.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "hello")])
        .await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect yet"), "{err}");
}

/// The commonest mistake: the hub's address without `/.well-known/mercure`. Its root is the
/// demo page (HTML), other paths are 404 or 405: each is named as the mistake it is, at once,
/// rather than read as an event stream that ends (and retried every second, forever).
#[test]
fn a_hub_url_without_the_mercure_path_is_named_as_the_mistake() {
    let hub = TestHub::start(&[]);
    let (root, healthz, nothing) = (hub.url(""), hub.url("/healthz"), hub.url("/nothing-here"));
    for (hub_url, answer) in [
        (&root, "answered text/html, not an event stream"),
        (&healthz, "answered text/plain, not an event stream"),
        (&nothing, "answered 404 Not Found"),
    ] {
        let out = ssehub_within(
            &["subscribe", "--hub", hub_url, "--topic", "x"],
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "subscribe {hub_url}: {err}");
        assert!(err.contains(answer), "subscribe {hub_url}: {err}");
        assert!(
            err.contains("is the hub URL missing /.well-known/mercure?"),
            "subscribe {hub_url}: {err}"
        );
        assert!(!err.contains("reconnecting"), "subscribe {hub_url}: {err}");
    }
    for (hub_url, answer) in [
        (&root, "answered 405 Method Not Allowed"),
        (&nothing, "answered 404 Not Found"),
    ] {
        let out = ssehub_within(
            &[
                "publish",
                "--hub",
                hub_url,
                "--topic",
                "x",
                "--data",
                "y",
                "--jwt-key",
                SECRET,
            ],
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "publish {hub_url}: {err}");
        assert!(err.contains(answer), "publish {hub_url}: {err}");
        assert!(
            err.contains("is the hub URL missing /.well-known/mercure?"),
            "publish {hub_url}: {err}"
        );
        // The hub's own answer to a wrong method would send the user to GET instead.
        assert!(!err.contains("use GET"), "publish {hub_url}: {err}");
    }
}

/// Starts `ssehub subscribe --topic t` on `hub` and waits until the hub counts it.
async fn subscriber_process(hub: &TestHub) -> std::process::Child {
    let url = hub.url("/.well-known/mercure");
    let child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["subscribe", "--hub", &url, "--topic", "t"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    child
}

/// Waits for `child` to exit (killing it after `within`) and returns its output.
async fn wait_output(mut child: std::process::Child, within: Duration) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + within;
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// The README says a HUP sent to every ssehub process is harmless (it reloads a TLS hub's
/// certificate): `ssehub subscribe` carries on through one.
#[tokio::test(flavor = "multi_thread")]
async fn subscribe_carries_on_through_a_sighup() {
    let hub = TestHub::start(&[]);
    let mut child = subscriber_process(&hub).await;
    let ok = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "ssehub subscribe died of SIGHUP"
    );
    hub.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "after the HUP")])
        .await;
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert_eq!(line, "after the HUP\n");
    let _ = child.kill();
    let _ = child.wait();
}

/// `ssehub subscribe … | head -1`, `ssehub publish … | true`: a reader that goes is the end
/// of the command, and success, silently (as ripgrep does).
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_standard_output_is_success() {
    let hub = TestHub::start(&[]);
    let mut child = subscriber_process(&hub).await;
    let mut publisher = hub.publisher().await;
    publisher.ok(&[("topic", "t"), ("data", "one")]).await;
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        line
        // The reader (and the pipe's read end) goes here, as `head -1` exits.
    })
    .await
    .unwrap();
    assert_eq!(line, "one\n");
    publisher.ok(&[("topic", "t"), ("data", "two")]).await;
    publisher.ok(&[("topic", "t"), ("data", "three")]).await;
    let out = wait_output(child, Duration::from_secs(10)).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err, "", "nothing to say about it");

    // publish: the update is published; printing its id to a reader that has gone is fine.
    let url = hub.url("/.well-known/mercure");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["publish", "--hub", &url, "--topic", "t", "--data", "four"])
        .args(["--jwt-key", SECRET])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = wait_output(child, Duration::from_secs(10)).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err, "");
}

/// `ssehub token` with neither `--publish` nor `--subscribe` would grant nothing: refused.
#[test]
fn a_token_without_rights_is_refused() {
    let out = ssehub(&["token", "--jwt-key", SECRET]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no token printed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--publish") && err.contains("--subscribe"),
        "{err}"
    );
    let out = ssehub(&["token", "--jwt-key", SECRET, "--subscribe", "*"]);
    assert_eq!(out.status.code(), Some(0));
    // A 1.0 token must expire; URL patterns are 1.0 only.
    let out = ssehub(&[
        "token",
        "--jwt-key",
        SECRET,
        "--subscribe",
        "*",
        "--ttl",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ttl"));
    let out = ssehub(&[
        "token",
        "--jwt-key",
        SECRET,
        "--protocol",
        "0.x",
        "--subscribe-urlpattern",
        "/a/:b",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = ssehub(&[
        "token",
        "--jwt-key",
        SECRET,
        "--subscribe",
        "*",
        "--payload",
        "{",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload"));
}

/// `publish` and `subscribe` reach the hub where `ssehub serve` listens by default, as
/// `bench` does, without `--hub`.
#[test]
fn the_client_commands_default_to_the_hubs_default_address() {
    for command in ["publish", "subscribe"] {
        let out = ssehub(&[command, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("[default: http://127.0.0.1:8000/.well-known/mercure]"),
            "{command}: {help}"
        );
    }
    // Without --hub: not a usage error (exit code 2) but an attempt on that address (exit
    // code 1 whatever is there: nothing, or a hub that refuses an update without a token).
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["publish", "--topic", "a", "--data", "x"])
        .env_remove("SSEHUB_HUB")
        .env_remove("SSEHUB_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("required"), "{err}");
}
