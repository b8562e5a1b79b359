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
