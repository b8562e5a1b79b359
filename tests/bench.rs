//! `ssehub bench` end to end against a real hub: a tiny run must report every update delivered
//! exactly once, and a tiny soak must sample and churn, so the tool itself cannot rot. No
//! timing is asserted.

mod common;

use std::process::Command;

use common::{TestHub, SECRET};

/// A fixed run: publish the updates, wait for their deliveries.
fn run_bench(hub: &TestHub, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--timeout", "20s", "--settle", "0"];
    args.extend_from_slice(extra);
    bench(hub, &args)
}

fn bench(hub: &TestHub, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["bench", "--target", "ssehub", "--json"])
        .args(["--hub", &hub.url("/.well-known/mercure")])
        .args(["--jwt-key", SECRET])
        .args(["--pid", &hub.pid().to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ssehub bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bench printed JSON")
}

#[test]
fn every_update_reaches_every_subscriber_once() {
    let hub = TestHub::start_process(&[]);
    let r = run_bench(
        &hub,
        &["--subscribers", "20", "--updates", "50", "--rate", "500"],
    );
    assert_eq!(r["connected"], 20, "{r:#}");
    assert_eq!(r["published"], 50, "{r:#}");
    assert_eq!(r["expected"], 20 * 50, "{r:#}");
    assert_eq!(r["delivered"], r["expected"], "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
    assert!(r["server"]["rss_connected_kib"].as_u64().unwrap() > 0);
    // Every publish was answered, so its answer time is counted (at least a microsecond).
    let answered = &r["publish_answer_ms"];
    assert!(answered["p50"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(
        answered["max"].as_f64().unwrap() >= answered["p50"].as_f64().unwrap(),
        "{r:#}"
    );
}

#[test]
fn topics_split_the_expected_deliveries() {
    let hub = TestHub::start_process(&[]);
    let r = run_bench(
        &hub,
        &[
            "--subscribers",
            "30",
            "--topics",
            "7",
            "--updates",
            "60",
            "--rate",
            "500",
        ],
    );
    assert!(r["expected"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["expected"].as_u64().unwrap() < 30 * 60, "{r:#}");
    assert_eq!(r["delivered"], r["expected"], "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
    assert_eq!(r["foreign_events"], 0, "{r:#}");
}

#[test]
fn subscribers_by_template_get_their_topic_and_nothing_else() {
    // Half the subscribers subscribe through `bench-N{?sub}`: a template that did not match
    // its topic would lose their share, one that matched others would deliver more than
    // expected.
    let hub = TestHub::start_process(&[]);
    let r = run_bench(
        &hub,
        &[
            "--subscribers",
            "40",
            "--topics",
            "5",
            "--updates",
            "60",
            "--rate",
            "500",
            "--template-share",
            "50",
        ],
    );
    assert!(r["expected"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["delivered"], r["expected"], "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
    assert_eq!(r["foreign_events"], 0, "{r:#}");
}

#[test]
fn a_short_soak_samples_churns_and_loses_nothing() {
    let hub = TestHub::start_process(&[]);
    let r = bench(
        &hub,
        &[
            "--soak",
            "6s",
            "--sample",
            "1s",
            "--subscribers",
            "40",
            "--lifetime",
            "500ms..2s",
            "--resume",
            "0.5",
            "--topics",
            "3",
            "--rate",
            "50",
            "--slow",
            "1",
            "--bad-rate",
            "2",
        ],
    );
    let samples = r["samples"].as_array().unwrap();
    let phase = |p: &'static str| samples.iter().filter(move |s| s["phase"] == p);
    assert!(phase("run").count() >= 3, "{r:#}");
    assert_eq!(phase("idle").count(), 1, "{r:#}");
    assert_eq!(phase("after").count(), 1, "{r:#}");
    for s in samples {
        assert!(s["rss_kib"].as_u64().unwrap() > 0, "{s:#}");
        assert!(s["fds"].as_u64().unwrap() > 0, "{s:#}");
    }
    assert!(phase("run").any(|s| s["hub_subscribers"].as_u64().unwrap() > 0));

    let m = &r["summary"];
    for figure in ["rss_kib", "fds"] {
        for at in ["idle", "first", "min", "max", "last", "after"] {
            assert!(m[figure][at].as_u64().unwrap() > 0, "{figure} {at}: {m:#}");
        }
    }
    // Subscribers came and went: more connections than the population.
    assert!(m["connects"].as_u64().unwrap() > 40, "{m:#}");
    assert!(m["disconnects"].as_u64().unwrap() > 0, "{m:#}");
    // Some came back with Last-Event-ID, and got every update they missed, once.
    assert!(m["resumed"].as_u64().unwrap() > 0, "{m:#}");
    assert_eq!(m["resumed_lost"], 0, "{m:#}");
    assert_eq!(m["resumed_duplicates"], 0, "{m:#}");
    assert_eq!(m["lost"], 0, "{m:#}");
    assert_eq!(m["duplicates"], 0, "{m:#}");
    assert!(m["sessions_checked"].as_u64().unwrap() > 0, "{m:#}");
    assert!(m["published"].as_u64().unwrap() > 0, "{m:#}");
    assert!(m["bad_as_expected"].as_u64().unwrap() > 0, "{m:#}");
    assert_eq!(m["bad_unexpected"], 0, "{m:#}");
    assert_eq!(m["errors"], 0, "{m:#}");
}

/// A server that stops answering ends the run with what it has (it must not hang), and one
/// that dies gets no figures at all (its CPU and memory would drop out of the sums).
#[test]
fn a_server_that_stops_or_dies_ends_the_run_with_a_reason() {
    for (signal, needle) in [("STOP", "no answer"), ("KILL", "exited during the run")] {
        let hub = TestHub::start_process(&[]);
        let child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
            .args(["bench", "--target", "ssehub", "--json", "--settle", "0"])
            .args(["--hub", &hub.url("/.well-known/mercure")])
            .args(["--jwt-key", SECRET])
            .args(["--pid", &hub.pid().to_string()])
            .args(["--subscribers", "10", "--updates", "400", "--rate", "100"])
            .args(["--timeout", "2s"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        hub.signal(signal);
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(needle), "kill -{signal}: {text}");
        if signal == "STOP" {
            hub.signal("CONT");
        }
    }
}

/// A run whose publishes the hub refuses measured nothing: it fails, with the hub's reason,
/// rather than report "lost 0" and exit 0.
#[test]
fn refused_publishes_fail_the_run_with_the_hubs_reason() {
    let hub = TestHub::start_process(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["bench", "--target", "ssehub"])
        .args(["--hub", &hub.url("/.well-known/mercure")])
        .args(["--jwt-key", "not the hub's key"])
        .args(["--subscribers", "2", "--updates", "5", "--rate", "100"])
        .args(["--timeout", "1s", "--settle", "0"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ssehub bench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    // The report still comes, then the error says why: the status and the hub's own words.
    assert!(stdout.contains("0 of 5 (5 failed)"), "{stdout}");
    assert!(
        stderr.contains("5 of 5 publishes failed; the first: a publish got HTTP status 401: "),
        "{stderr}"
    );
    assert!(stderr.contains("signature"), "the hub's reason: {stderr}");
}

/// A hub serving TLS with a fresh self-signed certificate, and the PEM file that trusts it.
fn tls_hub(extra: &[&str]) -> (TestHub, String) {
    let dir = common::temp_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let c =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    (
        TestHub::start_process_tls(&args, c.cert.der().clone()),
        cert,
    )
}

/// A fixed run over HTTP/2 against a fresh [`tls_hub`] started with `serve`; `flags` as on a
/// command line (a `--timeout` there replaces the 20 s default). Every stream must have
/// opened, readers and slow ones on connections of their own, `--streams-per-connection` to
/// each.
fn run_bench_h2(serve: &[&str], flags: &str) -> serde_json::Value {
    let (hub, ca) = tls_hub(serve);
    let mut args = vec!["--settle", "0", "--ca", &ca, "--http2"];
    if !flags.contains("--timeout") {
        args.extend(["--timeout", "20s"]);
    }
    args.extend(flags.split_whitespace());
    let r = bench(&hub, &args);
    let flag = |name: &str| -> u64 {
        let mut words = flags.split_whitespace();
        words.find(|w| *w == name);
        words.next().map_or(0, |v| v.parse().unwrap())
    };
    let (readers, slow, n) = (
        flag("--subscribers"),
        flag("--slow"),
        flag("--streams-per-connection"),
    );
    assert_eq!(r["connected"], readers + slow, "{r:#}");
    assert_eq!(
        r["connections"],
        readers.div_ceil(n) + slow.div_ceil(n),
        "{r:#}"
    );
    r
}

#[test]
fn over_tls_every_update_reaches_every_subscriber_once() {
    let (hub, ca) = tls_hub(&[]);
    assert!(hub.url("/").starts_with("https://"));
    let r = run_bench(
        &hub,
        &[
            "--ca",
            &ca,
            "--subscribers",
            "20",
            "--updates",
            "50",
            "--rate",
            "500",
        ],
    );
    assert_eq!(r["protocol"], "https/1.1", "{r:#}");
    assert_eq!(
        (&r["connected"], &r["connections"]),
        (&20.into(), &20.into())
    );
    assert_eq!(r["published"], 50, "{r:#}");
    assert_eq!(r["expected"], 20 * 50, "{r:#}");
    assert_eq!(r["delivered"], 20 * 50, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
}

/// Several streams on each HTTP/2 connection (the last one short) must each be counted as a
/// subscriber: a count per connection, or a stream read twice, would miss the exact total.
#[test]
fn over_http2_every_stream_gets_every_update_once() {
    let r = run_bench_h2(
        &[],
        "--streams-per-connection 7 --subscribers 30 --topics 3 --updates 60 --rate 500",
    );
    assert_eq!(r["protocol"], "h2", "{r:#}");
    // 30 streams, 7 to a connection: 5 connections, checked by run_bench_h2.
    assert_eq!(r["published"], 60, "{r:#}");
    // Every update reaches the ten subscribers of its topic.
    assert_eq!(r["expected"], 10 * 60, "{r:#}");
    assert_eq!(r["delivered"], 10 * 60, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
    assert_eq!(r["foreign_events"], 0, "{r:#}");
    assert_eq!(r["disconnected"], 0, "{r:#}");
}

/// Streams the hub ends in the middle of the run (`--max-stream-lifetime`) are reported as
/// disconnected, and what they missed as lost: the accounting over HTTP/2 sees a stream end
/// while its connection lives on.
#[test]
fn over_http2_streams_ended_mid_run_are_reported_with_their_loss() {
    let r = run_bench_h2(
        &["--max-stream-lifetime", "1s"],
        "--streams-per-connection 4 --subscribers 8 --updates 300 --rate 100 --timeout 1s",
    );
    assert_eq!(r["disconnected"], 8, "{r:#}");
    let (expected, delivered) = (
        r["expected"].as_u64().unwrap(),
        r["delivered"].as_u64().unwrap(),
    );
    assert_eq!(expected, 8 * 300, "{r:#}");
    assert!(delivered > 0 && delivered < expected, "{r:#}");
    assert_eq!(r["lost"].as_u64().unwrap(), expected - delivered, "{r:#}");
    assert_eq!(r["duplicates"], 0, "{r:#}");
}

/// Never-reading HTTP/2 streams (on connections of their own, with a small window) are dropped
/// by a hub with a short queue, and the reading streams lose nothing meanwhile.
#[test]
fn over_http2_slow_streams_are_dropped_and_readers_lose_nothing() {
    let r = run_bench_h2(
        &["--subscriber-queue", "8"],
        "--streams-per-connection 3 --subscribers 6 --slow 3 --size 4096 --updates 200 --rate 400",
    );
    assert_eq!(r["slow_dropped"], 3, "{r:#}");
    assert_eq!(r["delivered"], 6 * 200, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
}

#[test]
fn http2_without_tls_is_refused_with_what_to_do() {
    let hub = TestHub::start_process(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["bench", "--target", "ssehub", "--http2"])
        .args(["--hub", &hub.url("/.well-known/mercure")])
        .args(["--jwt-key", SECRET])
        .output()
        .expect("run ssehub bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--http2 needs TLS"), "{stderr}");
}

/// A connection that breaks under its streams (the hub killed mid-run; no `--pid`, so the
/// run still reports) shows as streams reset, every one of them, with what they missed lost.
#[test]
fn over_http2_streams_broken_mid_run_are_reported_as_reset() {
    let (hub, ca) = tls_hub(&[]);
    let child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["bench", "--target", "ssehub", "--json", "--settle", "0"])
        .args(["--hub", &hub.url("/.well-known/mercure"), "--ca", &ca])
        .args(["--jwt-key", SECRET])
        .args("--http2 --streams-per-connection 3 --subscribers 6".split(' '))
        .args("--updates 400 --rate 100 --timeout 1s".split(' '))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // As in the test above: a second into the four-second run, the streams are open.
    std::thread::sleep(std::time::Duration::from_secs(1));
    hub.signal("KILL");
    let out = child.wait_with_output().unwrap();
    // The failed publishes fail the run, after the report.
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the report");
    assert_eq!((&r["connected"], &r["connections"]), (&6.into(), &2.into()));
    assert_eq!(r["disconnected"], 6, "{r:#}");
    assert_eq!(r["reset"], 6, "{r:#}");
    let (expected, delivered) = (
        r["expected"].as_u64().unwrap(),
        r["delivered"].as_u64().unwrap(),
    );
    assert!(delivered > 0, "{r:#}");
    // An update fanned out just before the kill, whose answer never came, is delivered but
    // not expected: it is no loss, nor does it make up for another stream's (lost is counted
    // per stream, so at least the shortfall in all).
    assert!(
        r["lost"].as_u64().unwrap() >= expected.saturating_sub(delivered),
        "{r:#}"
    );
    assert_eq!(r["duplicates"], 0, "{r:#}");
}

/// More streams per connection than the hub lets one connection carry (it advertises 256
/// concurrent streams): the streams it took are subscribers like any other, read to the end
/// and counted; only the ones it never answered are failures, with the likely reason. A
/// connection is not written off whole for its last few streams.
#[test]
fn over_http2_streams_beyond_the_servers_limit_fail_alone() {
    let (hub, ca) = tls_hub(&[]);
    let r = bench(
        &hub,
        &[
            "--settle",
            "0",
            "--timeout",
            "20s",
            "--ca",
            &ca,
            "--http2",
            "--streams-per-connection",
            "260",
            "--subscribers",
            "260",
            "--updates",
            "20",
            "--rate",
            "200",
        ],
    );
    assert_eq!(r["connections"], 1, "{r:#}");
    assert_eq!(r["connected"], 256, "{r:#}");
    assert_eq!(r["connect_failed"], 4, "{r:#}");
    assert_eq!(r["expected"], 256 * 20, "{r:#}");
    assert_eq!(r["delivered"], 256 * 20, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    let why = r["first_error"].as_str().unwrap_or_default();
    assert!(why.contains("concurrent streams"), "{r:#}");
}
