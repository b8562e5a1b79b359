//! `ssehub bench` end to end against a real hub: a tiny run must report every update delivered
//! exactly once, so the tool itself cannot rot. No timing is asserted.

mod common;

use std::process::Command;

use common::{TestHub, SECRET};

fn run_bench(hub: &TestHub, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["bench", "--target", "ssehub", "--json", "--timeout", "20s"])
        .args(["--settle", "0"])
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
    let hub = TestHub::start(&[]);
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
}

#[test]
fn topics_split_the_expected_deliveries() {
    let hub = TestHub::start(&[]);
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
