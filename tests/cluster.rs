//! Cluster mode: several real `ssehub` processes and a real `redis-server`, started by the
//! tests on free ports of 127.0.0.1. Without `redis-server` on PATH the tests skip loudly,
//! unless `SSEHUB_REQUIRE_ALL=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{get, take, TestHub};
use http::{HeaderMap, HeaderValue, StatusCode};
use ssehub::client::EventStream;
use ssehub::sse::Event;

/// A `redis-server` of our own, without persistence unless given a directory.
struct Redis {
    child: Child,
    port: u16,
    binary: PathBuf,
    dir: Option<PathBuf>,
}

impl Redis {
    /// Starts a Redis on a free port; with `dir`, its data is kept there (append-only file).
    fn start(dir: Option<&Path>) -> Option<Redis> {
        let binary = common::require_program("redis-server", "redis-server")?;
        let port = common::free_port();
        let r = Redis {
            child: spawn_redis(&binary, port, dir),
            port,
            binary,
            dir: dir.map(Path::to_path_buf),
        };
        r.wait_up();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain connection, to write to the stream behind the nodes' backs.
    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = redis::Client::open(self.url()).unwrap();
        while Instant::now() < deadline {
            if let Ok(mut c) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not come up on port {}", self.port);
    }

    /// Stops Redis the way an operator would (SIGTERM: it writes what it keeps, then exits).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, with the same data directory if any.
    fn restart(&mut self) {
        self.child = spawn_redis(&self.binary, self.port, self.dir.as_deref());
        self.wait_up();
    }
}

fn spawn_redis(binary: &Path, port: u16, dir: Option<&Path>) -> Child {
    let mut cmd = Command::new(binary);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    match dir {
        Some(d) => {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(d);
        }
        None => {
            cmd.args(["--appendonly", "no"]);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server")
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(redis: &Redis, extra: &[&str]) -> TestHub {
    TestHub::start(
        &node_args(redis, extra)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
}

/// A node as its own process, for the tests that kill one.
fn node_process(redis: &Redis, extra: &[&str]) -> TestHub {
    TestHub::start_process(
        &node_args(redis, extra)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
}

fn node_args(redis: &Redis, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--redis".to_owned(), redis.url()];
    args.extend(extra.iter().map(|&a| a.to_owned()));
    args
}

/// Appends an entry with `fields` to the update stream, as something other than a node would.
fn xadd(c: &mut redis::Connection, fields: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg("ssehub:updates").arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(c).unwrap()
}

fn kill9(hub: &TestHub) {
    hub.signal("KILL");
}

async fn subscribe_from(hub: &TestHub, path: &str, last: Option<&str>) -> EventStream {
    let mut h = HeaderMap::new();
    if let Some(id) = last {
        h.insert("last-event-id", HeaderValue::from_str(id).unwrap());
    }
    EventStream::open(&hub.target(path), &h).await.unwrap()
}

async fn wait_status(hub: &TestHub, path: &str, want: StatusCode, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, _) = get(hub, path, &[]).await;
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "{path} did not become {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn data(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.data.clone()).collect()
}

fn numbers(n: std::ops::Range<usize>) -> Vec<String> {
    n.map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_deliver_every_update_once_in_one_order() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let nodes: Vec<TestHub> = (0..3).map(|_| node(&redis, &[])).collect();
    let mut subs = Vec::new();
    for i in 0..6 {
        subs.push(nodes[i % 3].subscribe("topic=t", &[]).await);
    }
    // Three publishers at once, one per node: the global order is Redis's, not ours.
    let mut publishers = Vec::new();
    for (k, hub) in nodes.iter().enumerate() {
        let mut p = hub.publisher().await;
        publishers.push(tokio::spawn(async move {
            for i in (k..1000).step_by(3) {
                p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let mut orders = Vec::new();
    for s in &mut subs {
        let got = take(s, 1000, Duration::from_secs(60)).await;
        common::assert_quiet(s, Duration::from_millis(300)).await;
        let mut sorted: Vec<usize> = got.iter().map(|e| e.data.parse().unwrap()).collect();
        orders.push(got);
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..1000).collect::<Vec<_>>(),
            "each update exactly once"
        );
    }
    let first: Vec<_> = orders[0].iter().map(|e| e.id.clone()).collect();
    for o in &orders[1..] {
        let ids: Vec<_> = o.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, first, "the same order on every node");
    }
    // Each publisher's own updates keep their order within the global one.
    for k in 0..3 {
        let mine: Vec<usize> = orders[0]
            .iter()
            .map(|e| e.data.parse().unwrap())
            .filter(|i: &usize| i % 3 == k)
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_subscribers_resume_elsewhere_and_miss_nothing() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let nodes: Vec<TestHub> = (0..3).map(|_| node_process(&redis, &[])).collect();
    common::node_kill_scenario(&nodes, 600).await;
}

/// Publishes 50, stops Redis for about 5 s, checks the outage, restarts it, publishes 50 more:
/// every subscriber gets all 100 exactly once, on the streams it had all along.
async fn survive_redis_restart(mut redis: Redis) {
    let nodes: Vec<TestHub> = (0..2)
        .map(|_| node(&redis, &["--heartbeat", "500ms"]))
        .collect();
    let mut subs = Vec::new();
    for n in &nodes {
        subs.push(n.subscribe("topic=t", &[]).await);
        subs.push(n.subscribe("topic=t", &[]).await);
    }
    let mut p = nodes[0].publisher().await;
    for i in 0..50 {
        p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 50, Duration::from_secs(30)).await),
            numbers(0..50)
        );
    }

    redis.stop();
    let outage = Instant::now();
    for n in &nodes {
        wait_status(
            n,
            "/readyz",
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        )
        .await;
        assert!(n.wait_for_log("lost Redis", Duration::from_secs(5)));
    }
    for n in &nodes {
        let mut p = n.publisher().await;
        let (status, reason) = p.publish(&[("topic", "t"), ("data", "lost")]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason}");
        assert!(reason.contains("Redis"), "{reason}");
    }
    let comments_before: Vec<u64> = subs.iter().map(|s| s.comments()).collect();
    // Streams stay open and keep receiving heartbeats (read them off the wire meanwhile).
    while outage.elapsed() < Duration::from_secs(5) {
        for s in &mut subs {
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.next()).await {
                panic!("no update may arrive during the outage, got {r:?}");
            }
        }
    }
    for (s, before) in subs.iter().zip(comments_before) {
        assert!(s.comments() > before, "heartbeats kept coming");
    }

    redis.restart();
    for n in &nodes {
        wait_status(n, "/readyz", StatusCode::OK, Duration::from_secs(20)).await;
        assert!(n.wait_for_log("Redis is back", Duration::from_secs(5)));
    }
    for (k, i) in (50..100).enumerate() {
        common::publish_until_ok(&nodes[k % 2], &i.to_string(), Duration::from_secs(20)).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 50, Duration::from_secs(30)).await),
            numbers(50..100)
        );
        common::assert_quiet(s, Duration::from_millis(300)).await;
    }
    // A logged transition, not one line per retry; and no gap, as none was.
    for n in &nodes {
        let lost = n.logs().iter().filter(|l| l.contains("lost Redis")).count();
        assert_eq!(lost, 1, "{:#?}", n.logs());
        assert_eq!(n.metric("ssehub_cluster_gaps_total").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restarted_empty_and_written_before_a_node_reconnects_is_no_gap() {
    let Some(mut redis) = Redis::start(None) else {
        return;
    };
    let hub = node(&redis, &[]);
    let mut s = subscribe_from(&hub, "/.well-known/mercure?topic=a", None).await;
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "a"), ("data", "before")]).await;
    assert_eq!(
        take(&mut s, 1, Duration::from_secs(10)).await[0].data,
        "before"
    );
    redis.stop();
    assert!(hub.wait_for_log("lost Redis", Duration::from_secs(10)));
    // Long enough for the reader's backoff to grow past the time the test needs below.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    // Written into the new, empty stream before the node reads it again: its ids are above
    // everything the node read, and nothing was trimmed.
    let mut c = redis.connection();
    xadd(
        &mut c,
        &[("id", "after"), ("topics", r#"["a"]"#), ("data", "after")],
    );
    assert_eq!(
        take(&mut s, 1, Duration::from_secs(20)).await[0].data,
        "after"
    );
    assert_eq!(hub.metric("ssehub_cluster_gaps_total").await, 0.0);
    assert!(!hub
        .logs()
        .iter()
        .any(|l| l.contains("were removed from Redis")));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_without_its_data() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    survive_redis_restart(redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_with_its_data_kept() {
    let dir = std::env::temp_dir().join(format!("ssehub-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some(redis) = Redis::start(Some(&dir)) else {
        return;
    };
    survive_redis_restart(redis).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_node_replays_from_the_stream() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let first = node(&redis, &[]);
    let mut p = first.publisher().await;
    let mut ids = Vec::new();
    for i in 0..500 {
        ids.push(p.ok(&[("topic", "t"), ("data", &i.to_string())]).await);
    }
    let late = node(&redis, &[]);
    let mut s = subscribe_from(&late, "/.well-known/mercure?topic=t", Some(&ids[99])).await;
    assert_eq!(s.headers["last-event-id"], ids[99].as_str());
    let got = take(&mut s, 400, Duration::from_secs(30)).await;
    assert_eq!(data(&got), numbers(100..500));
    assert_eq!(got.last().unwrap().id, ids[499]);
    // And then live updates, from the other node.
    p.ok(&[("topic", "t"), ("data", "500")]).await;
    assert_eq!(
        take(&mut s, 1, Duration::from_secs(10)).await[0].data,
        "500"
    );
}

/// Waits until `hub`'s `ssehub_write_budget` is `want`.
async fn wait_budget(hub: &TestHub, want: f64, within: Duration) {
    hub.wait_metric("ssehub_write_budget", |v| v == want, within)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_on_one_machine_share_its_write_budget() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    // 30,000 divides by 2 and 3 exactly, so the shares are exact whatever the core count.
    let first = node_process(&redis, &["--write-budget", "30000"]);
    let whole = first.metric("ssehub_write_budget").await;
    assert!(whole >= 30_000.0 && whole % 30_000.0 == 0.0, "{whole}");
    let second = node_process(&redis, &["--write-budget", "30000"]);
    let mut third = node_process(&redis, &["--write-budget", "30000"]);
    for hub in [&first, &second, &third] {
        wait_budget(hub, whole / 3.0, Duration::from_secs(15)).await;
    }
    assert!(first.wait_for_log(
        "3 ssehub node(s) of this cluster run on this machine",
        Duration::from_secs(5)
    ));
    // One leaves at shutdown, saying so before it exits; the others take their larger share
    // at their next count.
    third.terminate();
    assert!(third.wait_exit(Duration::from_secs(10)).is_some());
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left: u64 = redis::cmd("ZCARD")
        .arg(format!("ssehub:machine:{}", boot.trim()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 2, "the node that stopped removed itself");
    for hub in [&first, &second] {
        wait_budget(hub, whole / 2.0, Duration::from_secs(15)).await;
    }
    // One killed says nothing: it is forgotten after a few seconds.
    kill9(&second);
    wait_budget(&first, whole, Duration::from_secs(20)).await;
}

fn message_number(e: &Event) -> u64 {
    e.data
        .strip_prefix("Message: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a clock message: {:?}", e.data))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_clock_for_the_cluster_and_it_moves_when_its_node_dies() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let nodes: Vec<TestHub> = (0..3)
        .map(|_| node_process(&redis, &["--clock-interval", "200ms"]))
        .collect();
    let holds = |n: &TestHub| {
        n.logs()
            .iter()
            .any(|l| l.contains("this node now runs the cluster's clock"))
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let holder = loop {
        if let Some(i) = nodes.iter().position(holds) {
            break i;
        }
        assert!(Instant::now() < deadline, "no node took the clock");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(nodes.iter().filter(|n| holds(n)).count(), 1, "one holder");
    let watcher = (holder + 1) % 3;
    let mut s = subscribe_from(&nodes[watcher], "/events/", None).await;
    let got = take(&mut s, 10, Duration::from_secs(20)).await;
    let n: Vec<u64> = got.iter().map(message_number).collect();
    assert!(
        n.windows(2).all(|w| w[1] == w[0] + 1),
        "one sequence: {n:?}"
    );

    kill9(&nodes[holder]);
    // The sequence carries on from another node within a few seconds (the lease is 3 s).
    let after = take(&mut s, 10, Duration::from_secs(20)).await;
    let m: Vec<u64> = after.iter().map(message_number).collect();
    assert!(m[0] > *n.last().unwrap(), "{n:?} then {m:?}");
    assert!(m.windows(2).all(|w| w[1] > w[0]), "{m:?}");
    let others: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    assert!(
        others.iter().any(|&i| holds(&nodes[i])),
        "another node took the clock"
    );
}

#[test]
fn rediss_is_refused_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis",
            "rediss://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not supported yet"), "{err}");
}

/// Every node must accept the same tokens: a node started without a key would make one of
/// its own. Refused before anything connects, so no Redis is needed (none listens there).
#[test]
fn a_node_without_a_key_is_refused_before_it_joins() {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--clock-interval", "0"])
        .args(["--redis", "redis://127.0.0.1:1"])
        .env_remove("SSEHUB_PUBLISHER_JWT_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("every node of a cluster needs the same keys")
            && err.contains("--publisher-jwt-key"),
        "{err}"
    );
    assert!(
        !err.contains("Redis at"),
        "refused before connecting: {err}"
    );
    assert!(!err.contains("--token"), "no token printed: {err}");
}

/// A Redis error gives its cause as its text and as its source: said once.
#[test]
fn a_node_that_cannot_reach_redis_says_why_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--clock-interval", "0"])
        .args(["--publisher-jwt-key", common::SECRET])
        .args(["--redis", "redis://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach Redis at redis://127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.matches("refused").count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_spreads_over_the_nodes_and_loses_nothing() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    let hubs = format!(
        "{},{}",
        a.url("/.well-known/mercure"),
        b.url("/.well-known/mercure")
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ssehub"))
            .args(["bench", "--target", "ssehub", "--json", "--timeout", "20s"])
            .args(["--settle", "0", "--hub", &hubs, "--jwt-key", common::SECRET])
            .args(["--subscribers", "20", "--updates", "60", "--rate", "300"])
            .args(["--publishers", "4"])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run ssehub bench")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["delivered"], 20 * 60, "{r:#}");
    assert_eq!(
        (r["lost"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(0))
    );
    // Both nodes really served: each holds half of the subscribers.
    for hub in [&a, &b] {
        assert_eq!(hub.metric("ssehub_subscribers_connected").await, 0.0);
        assert_eq!(hub.metric("ssehub_subscribers_total").await, 10.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_entries_get_the_checks_of_a_publish() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let hub = node(&redis, &[]);
    let mut s = subscribe_from(&hub, "/.well-known/mercure?topic=a", None).await;
    // Anything with access to Redis can append to the stream: an id or a type with a line
    // break would write fields of its own into every subscriber's stream.
    let mut c = redis.connection();
    let topics = r#"["a"]"#;
    xadd(
        &mut c,
        &[
            ("id", "x\ndata: injected"),
            ("topics", topics),
            ("data", "1"),
        ],
    );
    xadd(
        &mut c,
        &[
            ("id", "y"),
            ("topics", topics),
            ("data", "2"),
            ("type", "t\n\nid: 9"),
        ],
    );
    xadd(&mut c, &[("id", "z"), ("topics", "[]"), ("data", "3")]);
    xadd(
        &mut c,
        &[("id", "good"), ("topics", topics), ("data", "ok")],
    );
    let e = &take(&mut s, 1, Duration::from_secs(10)).await[0];
    assert_eq!((e.id.as_str(), e.data.as_str()), ("good", "ok"));
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;
    assert!(hub.wait_for_log("skipped a stream entry", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_trimmed_before_a_node_read_them_are_reported() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let hub = node(&redis, &[]);
    let mut s = subscribe_from(&hub, "/.well-known/mercure?topic=a", None).await;
    let mut c = redis.connection();
    // The node has read up to an entry (a node that has read nothing reads from the start, and
    // cannot tell what it missed).
    hub.publisher()
        .await
        .ok(&[("topic", "a"), ("data", "first")])
        .await;
    assert_eq!(
        take(&mut s, 1, Duration::from_secs(10)).await[0].data,
        "first"
    );
    // Wait for the node's reader to block in XREAD, then cut it off.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reader = loop {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
        let id = list
            .lines()
            .find(|l| l.contains("cmd=xread"))
            .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
            .map(str::to_owned);
        if let Some(id) = id {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the node's reader never blocked in XREAD"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&reader)
        .query::<i64>(&mut c)
        .unwrap();
    // While it waits to reconnect (100 ms), more entries come than the stream keeps.
    let mut pipe = redis::pipe();
    for i in 0..1500 {
        pipe.cmd("XADD")
            .arg("ssehub:updates")
            .arg("MAXLEN")
            .arg(1000)
            .arg("*")
            .arg("id")
            .arg(format!("n{i}"))
            .arg("topics")
            .arg(r#"["a"]"#)
            .arg("data")
            .arg(i.to_string())
            .ignore();
    }
    pipe.query::<()>(&mut c).unwrap();
    // The node says so, counts it, and goes on with what is left.
    let got = take(&mut s, 1000, Duration::from_secs(20)).await;
    assert_eq!(got[0].data, "500", "the oldest entry left");
    assert!(hub.wait_for_log(
        "were removed from Redis before this node read",
        Duration::from_secs(5)
    ));
    assert_eq!(hub.metric("ssehub_cluster_gaps_total").await, 1.0);
}
