//! Cluster mode on NATS JetStream: real `ssehub` nodes and real `nats-server` processes (one,
//! or a cluster of three), started by the tests on free ports of 127.0.0.1. Without
//! `nats-server` the tests skip loudly, unless `SSEHUB_REQUIRE_ALL=1`.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{get, take, TestHub};
use http::{HeaderMap, HeaderValue, StatusCode};
use ssehub::client::{Connection, EventStream};
use ssehub::sse::Event;

/// One `nats-server` with JetStream, its data in a directory of its own.
struct Server {
    child: Option<Child>,
    args: Vec<String>,
    binary: PathBuf,
    port: u16,
    monitor: u16,
    name: String,
    dir: PathBuf,
}

/// One server, or a cluster of three.
struct Nats {
    servers: Vec<Server>,
}

impl Nats {
    fn start(n: usize) -> Option<Nats> {
        Nats::start_with(n, true)
    }

    /// `n` servers, with JetStream or (`jetstream` false) without it.
    fn start_with(n: usize, jetstream: bool) -> Option<Nats> {
        let binary = common::require_program("nats-server", "nats-server")?;
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| {
                (
                    common::free_port(),
                    common::free_port(),
                    common::free_port(),
                )
            })
            .collect();
        let mut servers = Vec::new();
        for (i, &(port, route, monitor)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let dir = std::env::temp_dir().join(format!(
                "ssehub-nats-{}-{}-{name}",
                std::process::id(),
                port
            ));
            let mut args: Vec<String> = [
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor.to_string(),
                "--server_name",
                &name,
                "--store_dir",
                dir.to_str().unwrap(),
            ]
            .map(str::to_owned)
            .to_vec();
            if !jetstream {
                args.remove(0);
            }
            if n > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{}", p.1))
                    .collect();
                args.extend([
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".to_owned(),
                    routes.join(","),
                    "--cluster_name".to_owned(),
                    "x".to_owned(),
                ]);
            }
            let mut s = Server {
                child: None,
                args,
                binary: binary.clone(),
                port,
                monitor,
                name,
                dir,
            };
            s.spawn();
            servers.push(s);
        }
        let nats = Nats { servers };
        nats.wait_ready();
        Some(nats)
    }

    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Until every running server answers and JetStream has a meta leader (in a cluster).
    /// Bounded generously: once, after all three were killed at once on a loaded machine, the
    /// election took longer than 30 s.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for s in self.servers.iter().filter(|s| s.child.is_some()) {
            loop {
                let jsz = monitor(s.monitor, "/jsz");
                let ready = jsz.as_ref().is_some_and(|j| {
                    self.servers.len() == 1
                        || j["meta_cluster"]["leader"]
                            .as_str()
                            .is_some_and(|l| !l.is_empty())
                });
                if ready {
                    break;
                }
                if Instant::now() >= deadline {
                    // Why, for the failure's diagnosis (the harness shows stdout): seen once
                    // under load at the first start of a cluster, with nothing else to go on.
                    let meta = jsz.map(|j| j["meta_cluster"].clone());
                    println!("nats-server {}'s meta cluster: {meta:?}", s.name);
                    for t in &self.servers {
                        println!("nats-server {}'s log:\n{}", t.name, t.log_tail(60));
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server {} not ready",
                    s.name
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The index of the server leading the update stream, as the servers report it.
    fn stream_leader(&self) -> Option<usize> {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .find_map(|s| {
                s.update_stream()?["cluster"]["leader"]
                    .as_str()
                    .map(str::to_owned)
            })
            .and_then(|leader| self.servers.iter().position(|s| s.name == leader))
    }

    /// The update stream's last sequence, as its leader holds it.
    fn last_sequence(&self) -> Option<u64> {
        self.local_last_sequence(self.stream_leader()?)
    }

    /// The last sequence of server `i`'s own copy of the update stream.
    fn local_last_sequence(&self, i: usize) -> Option<u64> {
        self.servers[i].update_stream()?["state"]["last_seq"].as_u64()
    }
}

impl Server {
    /// What this server's monitoring port says of the update stream (its own copy).
    fn update_stream(&self) -> Option<serde_json::Value> {
        let jsz = monitor(self.monitor, "/jsz?accounts=true&streams=true")?;
        let accounts = jsz["account_details"].as_array()?;
        accounts
            .iter()
            .filter_map(|a| a["stream_detail"].as_array())
            .flatten()
            .find(|s| s["name"] == "ssehub-updates")
            .cloned()
    }

    fn spawn(&mut self) {
        // Its log, kept across restarts, for the diagnosis of a server that never got ready.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("nats-server's log file");
        self.child = Some(
            Command::new(&self.binary)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("nats-server's log file"))
                .stderr(log)
                .spawn()
                .expect("start nats-server"),
        );
    }

    fn log(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    /// The last `n` lines of its log.
    fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends a signal (by name: STOP, CONT, TERM, KILL) without waiting for anything.
    fn send(&self, name: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &c.id().to_string()])
                .status();
        }
    }

    /// Sends a signal that ends the process, and waits until it exited.
    fn signal(&mut self, name: &str) {
        self.send(name);
        self.wait_exit();
    }

    /// Until the process exited (after a signal that ends it).
    fn wait_exit(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.log());
    }
}

/// A monitoring endpoint's JSON, or `None` while the server does not answer.
fn monitor(port: u16, path: &str) -> Option<serde_json::Value> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    c.read_to_string(&mut body).ok()?;
    let (_, json) = body.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
}

fn node(nats: &Nats, replicas: usize) -> TestHub {
    TestHub::start(&[
        "--nats",
        &nats.urls(),
        "--nats-replicas",
        &replicas.to_string(),
        "--heartbeat",
        "500ms",
        // A stream long enough for what the publishers (flat out) publish while a node cannot
        // read yet after an outage (seen: ~13 s before NATS let it make its consumer again,
        // ~10,000 updates), or the node rightly reports a gap.
        "--history-size",
        "100000",
    ])
}

/// `servers` NATS servers (the stream on all of them), two nodes on them, and a subscriber
/// to topic `t` on each node; `None` without nats-server.
async fn two_nodes_on(servers: usize) -> Option<(Nats, [TestHub; 2], Vec<EventStream>)> {
    let nats = Nats::start(servers)?;
    let nodes = [node(&nats, servers), node(&nats, servers)];
    let mut subs = Vec::new();
    for n in &nodes {
        subs.push(n.subscribe("topic=t", &[]).await);
    }
    Some((nats, nodes, subs))
}

/// A node as its own process, for the tests that kill one.
fn node_process(nats: &Nats, replicas: usize, extra: &[&str]) -> TestHub {
    let (urls, replicas) = (nats.urls(), replicas.to_string());
    let mut args = vec![
        "--nats",
        &urls,
        "--nats-replicas",
        &replicas,
        "--heartbeat",
        "500ms",
    ];
    args.extend_from_slice(extra);
    TestHub::start_process(&args)
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

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

fn numbers(n: std::ops::Range<usize>) -> Vec<String> {
    n.map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_on_one_server_deliver_in_one_order_and_replay() {
    let Some(nats) = Nats::start(1) else {
        return;
    };
    let a = node(&nats, 1);
    let b = node(&nats, 1);
    let mut on_a = a.subscribe("topic=t", &[]).await;
    let mut on_b = b.subscribe("topic=t", &[]).await;
    let mut p = a.publisher().await;
    for i in 0..50 {
        p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
    }
    let got_a = take(&mut on_a, 50, Duration::from_secs(30)).await;
    let got_b = take(&mut on_b, 50, Duration::from_secs(30)).await;
    assert_eq!(data(&got_a), numbers(0..50));
    assert_eq!(
        ids(&got_a),
        ids(&got_b),
        "the same updates, same ids, same order"
    );

    // Last-Event-ID on the other node.
    let mut h = HeaderMap::new();
    h.insert(
        "last-event-id",
        HeaderValue::from_str(&got_a[9].id).unwrap(),
    );
    let mut again = EventStream::open(&b.target("/.well-known/mercure?topic=t"), &h)
        .await
        .unwrap();
    let rest = take(&mut again, 40, Duration::from_secs(10)).await;
    assert_eq!(data(&rest), numbers(10..50));

    // A node started later loads the history from the stream before it accepts anyone.
    let c = node(&nats, 1);
    let mut h = HeaderMap::new();
    h.insert(
        "last-event-id",
        HeaderValue::from_str(&got_a[39].id).unwrap(),
    );
    let mut late = EventStream::open(&c.target("/.well-known/mercure?topic=t"), &h)
        .await
        .unwrap();
    assert_eq!(
        data(&take(&mut late, 10, Duration::from_secs(10)).await),
        numbers(40..50)
    );
    common::assert_quiet(&mut late, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_retried_with_its_id_is_delivered_once() {
    let Some(nats) = Nats::start(1) else {
        return;
    };
    let a = node(&nats, 1);
    let b = node(&nats, 1);
    let mut s = b.subscribe("topic=t", &[]).await;
    let fields = [("topic", "t"), ("data", "once"), ("id", "urn:retry:1")];
    // The same update through one node, then (as after a timeout) through the other.
    assert_eq!(a.publisher().await.ok(&fields).await, "urn:retry:1");
    assert_eq!(b.publisher().await.ok(&fields).await, "urn:retry:1");
    a.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "after")])
        .await;
    let got = take(&mut s, 2, Duration::from_secs(10)).await;
    assert_eq!(data(&got), ["once", "after"]);
    assert_eq!(got[0].id, "urn:retry:1");
    common::assert_quiet(&mut s, Duration::from_millis(300)).await;
}

/// A stream's events as they arrive, and the task that reads them.
type Collected = (Arc<Mutex<Vec<Event>>>, tokio::task::JoinHandle<()>);

/// Collects every event of `s` until dropped.
fn collect(mut s: EventStream) -> Collected {
    let got = Arc::new(Mutex::new(Vec::new()));
    let into = got.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(e)) = s.next().await {
            into.lock().unwrap().push(e);
        }
    });
    (got, task)
}

/// Publishers, one per node, at a steady pace through a failure: which updates were answered
/// `200` is recorded. The test moves `phase` on as it breaks and mends things; each publisher
/// stops after `last_oks` updates answered `200` in phase `last`.
struct Steady {
    oks: Arc<Mutex<Vec<String>>>,
    /// Publishes answered `503`, every publisher together.
    refused: Arc<AtomicUsize>,
    phase: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Steady {
    fn start(nodes: &[TestHub], last: usize, last_oks: usize) -> Steady {
        let oks = Arc::new(Mutex::new(Vec::<String>::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let phase = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (k, n) in nodes.iter().enumerate() {
            let target = n.target("/.well-known/mercure");
            let token = n.publisher_token();
            let (oks, refused, phase) = (oks.clone(), refused.clone(), phase.clone());
            tasks.push(tokio::spawn(async move {
                let mut at_last = 0;
                let deadline = Instant::now() + Duration::from_secs(90);
                for i in 0.. {
                    assert!(Instant::now() < deadline, "publishing did not resume");
                    let data = format!("{k}-{i}");
                    let Ok(mut c) = Connection::open(&target).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    match c
                        .publish(Some(&token), &[("topic", "t"), ("data", &data)])
                        .await
                    {
                        Ok((StatusCode::OK, _)) => {
                            oks.lock().unwrap().push(data);
                            if phase.load(SeqCst) == last {
                                at_last += 1;
                                if at_last == last_oks {
                                    return;
                                }
                            }
                        }
                        Ok((StatusCode::SERVICE_UNAVAILABLE, reason)) => {
                            assert!(reason.contains("NATS"), "{reason}");
                            refused.fetch_add(1, SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Ok(other) => panic!("unexpected answer {other:?}"),
                        // The connection broke: the answer is unknown; try the next one.
                        Err(_) => {}
                    }
                }
            }));
        }
        Steady {
            oks,
            refused,
            phase,
            tasks,
        }
    }

    /// Until `n` updates were answered `200`.
    async fn wait_oks(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.oks.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "no steady publishing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until `n` more publishes were answered `503` than `since`.
    async fn wait_refused(&self, since: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.refused.load(SeqCst) < since + n {
            assert!(Instant::now() < deadline, "no publish was refused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn enter(&self, phase: usize) {
        self.phase.store(phase, SeqCst);
    }

    /// Once every publisher stopped: the data of the updates answered `200`.
    async fn finish(self) -> Vec<String> {
        for t in self.tasks {
            t.await.unwrap();
        }
        let oks = self.oks.lock().unwrap().clone();
        oks
    }
}

/// Every update of `oks` arrives on every node's stream of `seen`, each once, in one order
/// on all of them, and no node counts a gap.
async fn assert_each_once_in_one_order(oks: &[String], seen: Vec<Collected>, nodes: &[TestHub]) {
    let orders = assert_each_once(oks, seen, nodes).await;
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "one order on every node");
    }
    for n in nodes {
        assert_eq!(n.metric("ssehub_cluster_gaps_total").await, 0.0);
    }
}

/// Every update of `oks` arrives on every node's stream of `seen`, and each update there
/// arrives once. Returns the ids each node delivered, in its order.
async fn assert_each_once(
    oks: &[String],
    seen: Vec<Collected>,
    nodes: &[TestHub],
) -> Vec<Vec<String>> {
    let want: HashSet<&String> = oks.iter().collect();
    let mut orders = Vec::new();
    let all: Vec<_> = seen.iter().map(|(got, _)| got.clone()).collect();
    for (got, task) in seen {
        // Every acknowledged update arrives; then a quiet moment for any late extra.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let have: HashSet<String> =
                got.lock().unwrap().iter().map(|e| e.data.clone()).collect();
            if want.iter().all(|d| have.contains(*d)) {
                break;
            }
            if Instant::now() >= deadline {
                // What the nodes said, for the failure's diagnosis (the harness shows stdout).
                for (k, n) in nodes.iter().enumerate() {
                    println!("node {k}'s log:\n{}", n.logs().join("\n"));
                }
                for d in want.iter().filter(|d| !have.contains(**d)) {
                    let on: Vec<bool> = all
                        .iter()
                        .map(|g| g.lock().unwrap().iter().any(|e| &e.data == *d))
                        .collect();
                    let at = oks.iter().position(|o| o == *d);
                    println!(
                        "missing {d} (answered 200 as {at:?} of {}), on each node: {on:?}",
                        oks.len()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} acknowledged updates arrived",
                want.iter().filter(|d| have.contains(**d)).count(),
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut len = got.lock().unwrap().len();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = got.lock().unwrap().len();
            if now == len {
                break;
            }
            len = now;
        }
        task.abort();
        let events = got.lock().unwrap().clone();
        let unique: HashSet<&String> = events.iter().map(|e| &e.id).collect();
        if unique.len() != events.len() {
            for (k, n) in nodes.iter().enumerate() {
                println!("DIAG node {k}'s log:\n{}", n.logs().join("\n"));
            }
        }
        assert_eq!(unique.len(), events.len(), "each update once");
        orders.push(ids(&events));
    }
    orders
}

/// Whether a node lacks an update of the stream; when `print`, each such update (for a
/// failure's diagnosis), with the stream around it and what the node delivered around its
/// place, and false.
fn diagnose(
    contents: &[(String, String)],
    got: &[Arc<Mutex<Vec<Event>>>],
    oks: &[String],
    print: bool,
) -> bool {
    let mut lacking = false;
    for (k, g) in got.iter().enumerate() {
        let events = g.lock().unwrap().clone();
        let delivered: Vec<&String> = events.iter().map(|e| &e.data).collect();
        for (i, (_, d)) in contents.iter().enumerate() {
            if delivered.contains(&d) {
                continue;
            }
            lacking = true;
            if !print {
                continue;
            }
            let around = |v: &[&String], at: usize| -> Vec<String> {
                v[at.saturating_sub(4)..(at + 4).min(v.len())]
                    .iter()
                    .map(|d| format!("{d}{}", if oks.contains(d) { "" } else { "(not 200)" }))
                    .collect()
            };
            let stream: Vec<&String> = contents.iter().map(|(_, d)| d).collect();
            let before = i.checked_sub(1).map(|b| &contents[b].1);
            let at = before
                .and_then(|b| delivered.iter().position(|x| *x == b))
                .map_or(0, |p| p + 1);
            println!(
                "node {k} lacks {d} (stream index {i} of {}): stream {:?}; node {k} {:?}",
                contents.len(),
                around(&stream, i),
                around(&delivered, at)
            );
        }
    }
    lacking && !print
}

/// The update stream's messages, in sequence, as (id, data).
async fn stream_contents(nats: &Nats) -> Vec<(String, String)> {
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.servers[0].port))
        .await
        .expect("connect to NATS");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("ssehub-updates")
        .await
        .expect("the update stream");
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        match stream.info().await {
            Ok(info) => break info.state.clone(),
            Err(e) => {
                assert!(Instant::now() < deadline, "the stream's state: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut contents = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        // Just after its servers came back, JetStream can answer 503 for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        let m = loop {
            match stream.get_raw_message(sequence).await {
                Ok(m) => break m,
                Err(e) => {
                    assert!(Instant::now() < deadline, "message {sequence}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let fields: std::collections::HashMap<String, String> =
            serde_json::from_slice(&m.payload).expect("written by ssehub");
        contents.push((fields["id"].clone(), fields["data"].clone()));
    }
    contents
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_leader_killed_loses_no_acknowledged_update() {
    let Some((mut nats, nodes, subs)) = two_nodes_on(3).await else {
        return;
    };
    let seen: Vec<Collected> = subs.into_iter().map(collect).collect();
    let leader = nats.stream_leader().expect("the stream has a leader");

    // Steady publishing through both nodes; some updates first, then the leader's server dies,
    // and each publisher carries on until 100 more were answered 200.
    let steady = Steady::start(&nodes, 1, 100);
    steady.wait_oks(100).await;
    nats.servers[leader].signal("KILL");
    steady.enter(1);
    let oks = steady.finish().await;
    assert_each_once_in_one_order(&oks, seen, &nodes).await;

    // The killed server comes back and its copy of the stream catches up with the stream.
    let last = nats.last_sequence().expect("the stream answers");
    nats.servers[leader].spawn();
    nats.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let copy = nats.local_last_sequence(leader);
        if copy == Some(last) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted server's copy is at {copy:?}, the stream at {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How every NATS server goes away for a while.
#[derive(Clone, Copy)]
enum Outage {
    /// SIGSTOP, then SIGCONT: frozen, their connections open.
    Frozen,
    /// `kill -9`, then started again on their data.
    Killed,
    /// SIGTERM (they shut down cleanly and exit), then started again on their data.
    Stopped,
}

/// Three servers, two nodes publishing steadily; every server goes away at once and comes back:
/// `/readyz` says so, and once they are back the nodes publish and deliver again by themselves,
/// every update answered `200` on both nodes once, in one order.
async fn all_nats_servers_away_and_back(outage: Outage) {
    let Some((mut nats, nodes, subs)) = two_nodes_on(3).await else {
        return;
    };
    let seen: Vec<Collected> = subs.into_iter().map(collect).collect();
    // Phase 0: all up; 1: all away; 2: all back, until 50 more answered 200 per node.
    let steady = Steady::start(&nodes, 2, 50);
    steady.wait_oks(50).await;
    // Every signal sent before any process is waited for: all go away at once.
    let signal = match outage {
        Outage::Frozen => "STOP",
        Outage::Killed => "KILL",
        Outage::Stopped => "TERM",
    };
    for s in &nats.servers {
        s.send(signal);
    }
    if !matches!(outage, Outage::Frozen) {
        for s in &mut nats.servers {
            s.wait_exit();
        }
    }
    steady.enter(1);
    for n in &nodes {
        wait_status(
            n,
            "/readyz",
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        )
        .await;
    }
    // Away for a while: both publishers are refused (with the servers frozen each refusal
    // takes the 3 s command timeout, so a few of them are all the wait's 30 s allow).
    steady
        .wait_refused(steady.refused.load(SeqCst), 2 * 2)
        .await;
    let during = steady.oks.lock().unwrap().len();
    for s in &mut nats.servers {
        match outage {
            Outage::Frozen => s.send("CONT"),
            Outage::Killed | Outage::Stopped => s.spawn(),
        }
    }
    nats.wait_ready();
    steady.enter(2);
    let oks = steady.finish().await;
    assert!(oks.len() > during, "publishing resumed");
    for n in &nodes {
        wait_status(n, "/readyz", StatusCode::OK, Duration::from_secs(30)).await;
    }
    // Every node delivers what the stream holds; if one does not, it says where it differs.
    let contents = stream_contents(&nats).await;
    let got: Vec<_> = seen.iter().map(|(g, _)| g.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while diagnose(&contents, &got, &oks, Instant::now() >= deadline) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Frozen or stopped, the servers keep every update they acknowledged; killed at once they
    // may lose some (kept in the process, not yet on disk). Either way what the stream holds
    // afterwards is what every node delivers, each once, in the stream's order, except on a
    // node that had to read again (it counts a gap): it delivered an update no majority held
    // (refused 503, or never answered), which the stream then dropped and gave its sequence to
    // a later one, delivered late. Frozen servers can leave that too: seen 2 runs in 18 under
    // load, once a node read the old leader's tail before the others led.
    let held: HashSet<&String> = contents.iter().map(|(_, d)| d).collect();
    let lost = oks.iter().filter(|d| !held.contains(d)).count();
    if matches!(outage, Outage::Frozen | Outage::Stopped) {
        assert_eq!(lost, 0, "the servers kept every update answered 200");
    }
    let in_stream: Vec<String> = contents.iter().map(|(_, d)| d.clone()).collect();
    let orders = assert_each_once(&in_stream, seen, &nodes).await;
    let order: Vec<&String> = contents.iter().map(|(id, _)| id).collect();
    let kept: HashSet<&String> = order.iter().copied().collect();
    let mut gaps = Vec::new();
    for (o, n) in orders.iter().zip(&nodes) {
        let gap = n.metric("ssehub_cluster_gaps_total").await;
        gaps.push(gap);
        if gap == 0.0 {
            // A node may also have delivered updates the stream lost after it read them.
            let delivered: Vec<&String> = o.iter().filter(|id| kept.contains(id)).collect();
            assert_eq!(delivered, order, "the stream's order on every node");
        }
    }
    println!(
        "NATS lost {lost} of {} updates answered 200; gaps counted by each node: {gaps:?}",
        oks.len()
    );
    // What each node did about the outage (checks, what its watch found, reading again), shown
    // with the test's output (`--show-output`): which paths a passing run took.
    for (k, n) in nodes.iter().enumerate() {
        for line in n.logs().iter().filter(|l| l.contains("NATS JetStream")) {
            println!("node {k}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn all_nats_servers_frozen_and_resumed_lose_no_acknowledged_update() {
    all_nats_servers_away_and_back(Outage::Frozen).await;
}

/// Failed 2 runs of 14 on nats-server 2.9.10 before the watch (see src/cluster/applied.rs):
/// just after the restart the stream served an update no majority held and then gave its
/// sequence to a later one, which a node that had read on never delivered.
#[tokio::test(flavor = "multi_thread")]
async fn all_nats_servers_stopped_and_started_again_lose_no_acknowledged_update() {
    all_nats_servers_away_and_back(Outage::Stopped).await;
}

/// Killed at once, the servers may also lose updates they acknowledged (the test prints how
/// many); what the stream kept, every node delivers. Failed 1 run in 16 with the watch's first
/// version (a node lacking an update the stream held after the restart; its log was lost, so
/// never explained). With the watch keeping everything from its oldest watched message on and
/// a check when the probe is answered again, it passed 64 runs of 64 of this whole binary
/// beside two busy loops on 2 cores (2026-12-07): NATS lost no acknowledged update in any, and
/// in 5 a node read the stream again (its watch found the old leader's tail dropped).
#[tokio::test(flavor = "multi_thread")]
async fn all_nats_servers_killed_and_restarted_deliver_what_the_stream_kept() {
    all_nats_servers_away_and_back(Outage::Killed).await;
}

/// Updates 0..10 published through the first node, and received by every subscriber of `subs`.
async fn publish_ten_seen_by_all(nodes: &[TestHub], subs: &mut [EventStream]) {
    let mut p = nodes[0].publisher().await;
    for i in 0..10 {
        p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
    }
    for s in subs {
        assert_eq!(
            data(&take(s, 10, Duration::from_secs(20)).await),
            numbers(0..10)
        );
    }
}

/// A message the stream stops holding a moment after a node's check on reconnecting found it
/// (as nats-server 2.9 can just after its servers come back; here the message is deleted): the
/// node's watch notices within its comparisons, reads the stream again from there, counts a
/// gap, and goes on delivering each later update once.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_dropped_after_a_nodes_check_is_noticed_by_its_watch() {
    let Some((mut nats, nodes, mut subs)) = two_nodes_on(1).await else {
        return;
    };
    publish_ten_seen_by_all(&nodes, &mut subs).await;
    // The server restarts: each node checks what it applied, finds it held, and watches.
    let server = &mut nats.servers[0];
    server.signal("TERM");
    server.wait_exit();
    server.spawn();
    nats.wait_ready();
    for n in &nodes {
        assert!(
            n.wait_for_log(
                "reading the update stream in NATS JetStream again",
                Duration::from_secs(30)
            ),
            "the node read on after the restart"
        );
    }
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.servers[0].port))
        .await
        .expect("connect to NATS");
    let stream = async_nats::jetstream::new(client)
        .get_stream("ssehub-updates")
        .await
        .expect("the update stream");
    assert!(stream.delete_message(10).await.expect("deleted"));
    for n in &nodes {
        assert!(
            n.wait_for_log("another message at sequence 10", Duration::from_secs(10)),
            "the watch noticed"
        );
        n.wait_metric(
            "ssehub_cluster_gaps_total",
            |g| g == 1.0,
            Duration::from_secs(10),
        )
        .await;
    }
    for (k, i) in (10..15).enumerate() {
        common::publish_until_ok(&nodes[k % 2], &i.to_string(), Duration::from_secs(20)).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 5, Duration::from_secs(20)).await),
            numbers(10..15)
        );
        common::assert_quiet(s, Duration::from_millis(300)).await;
    }
}

/// NATS losing updates it acknowledged, and giving their sequences to later updates (as
/// nats-server 2.9 can when all its servers are killed at once), made certain: the server's
/// data is put back as it was before some updates. Every node then delivers the updates that
/// take those sequences again (none skipped as applied already), counts the loss as a gap,
/// and delivers nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn updates_nats_lost_and_whose_sequences_it_gave_again_are_delivered() {
    let Some((mut nats, nodes, mut subs)) = two_nodes_on(1).await else {
        return;
    };
    publish_ten_seen_by_all(&nodes, &mut subs).await;
    // A copy of the server's data now, put back after ten more updates.
    let server = &mut nats.servers[0];
    let copy = server.dir.with_extension("copy");
    server.signal("TERM");
    copy_dir(&server.dir, &copy);
    server.spawn();
    nats.wait_ready();
    for n in &nodes {
        wait_status(n, "/readyz", StatusCode::OK, Duration::from_secs(30)).await;
    }
    for (k, i) in (10..20).enumerate() {
        common::publish_until_ok(&nodes[k % 2], &i.to_string(), Duration::from_secs(20)).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 10, Duration::from_secs(20)).await),
            numbers(10..20)
        );
    }
    let server = &mut nats.servers[0];
    server.signal("TERM");
    std::fs::remove_dir_all(&server.dir).unwrap();
    copy_dir(&copy, &server.dir);
    std::fs::remove_dir_all(&copy).unwrap();
    server.spawn();
    nats.wait_ready();
    for n in &nodes {
        wait_status(n, "/readyz", StatusCode::OK, Duration::from_secs(30)).await;
    }
    // These take the sequences of 10..20, which every node applied.
    for (k, i) in (20..30).enumerate() {
        common::publish_until_ok(&nodes[k % 2], &i.to_string(), Duration::from_secs(20)).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 10, Duration::from_secs(20)).await),
            numbers(20..30)
        );
        common::assert_quiet(s, Duration::from_millis(300)).await;
    }
    for n in &nodes {
        n.wait_metric(
            "ssehub_cluster_gaps_total",
            |g| g == 1.0,
            Duration::from_secs(10),
        )
        .await;
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "copy {from:?} to {to:?}");
}

/// The message number of a clock update.
fn message_number(e: &Event) -> u64 {
    e.data
        .strip_prefix("Message: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a clock message: {:?}", e.data))
}

/// The message numbers a node says it sent.
fn sent(hub: &TestHub) -> Vec<u64> {
    hub.logs()
        .iter()
        .filter_map(|l| l.split("Sent message ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_clock_for_the_cluster_and_it_moves_when_its_node_dies() {
    let Some(nats) = Nats::start(1) else {
        return;
    };
    let nodes: Vec<TestHub> = (0..3)
        .map(|_| node_process(&nats, 1, &["--clock-interval", "200ms"]))
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let watcher = (holder + 1) % 3;
    let mut s = EventStream::open(&nodes[watcher].target("/events/"), &HeaderMap::new())
        .await
        .unwrap();
    let got = take(&mut s, 10, Duration::from_secs(20)).await;
    let n: Vec<u64> = got.iter().map(message_number).collect();
    assert!(
        n.windows(2).all(|w| w[1] == w[0] + 1),
        "one sequence: {n:?}"
    );
    assert_eq!(nodes.iter().filter(|n| holds(n)).count(), 1, "one holder");

    nodes[holder].signal("KILL");
    // The sequence carries on from another node within a few lease times (3 s).
    let after = take(&mut s, 10, Duration::from_secs(20)).await;
    let m: Vec<u64> = after.iter().map(message_number).collect();
    assert!(m[0] > *n.last().unwrap(), "{n:?} then {m:?}");
    assert!(m.windows(2).all(|w| w[1] > w[0]), "{m:?}");
    // One survivor took the clock (the messages above may all have left before the kill, when
    // the watcher's node is behind on a loaded machine: wait for the log line), and no number
    // went out twice.
    let others: Vec<&TestHub> = (0..3).filter(|&i| i != holder).map(|i| &nodes[i]).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let taker = loop {
        if let Some(n) = others.iter().find(|n| holds(n) && sent(n).len() >= 3) {
            break *n;
        }
        assert!(
            Instant::now() < deadline,
            "no survivor took the clock and sent from it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // It carried the numbering on past the killed holder's last.
    let before = sent(&nodes[holder]).into_iter().max().unwrap_or(0);
    let from = sent(taker).into_iter().min().unwrap();
    assert!(
        from > before,
        "the taker began at {from}, the holder had sent {before}"
    );
    assert_eq!(
        others.iter().filter(|n| holds(n)).count(),
        1,
        "one node took the clock"
    );
    let mut numbers: Vec<u64> = nodes.iter().flat_map(sent).collect();
    let all = numbers.len();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), all, "a number sent twice: {numbers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_subscribers_resume_elsewhere_and_miss_nothing() {
    let Some(nats) = Nats::start(3) else {
        return;
    };
    let nodes: Vec<TestHub> = (0..3).map(|_| node_process(&nats, 3, &[])).collect();
    common::node_kill_scenario(&nodes, 300).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_above_nats_max_payload_is_refused_413_with_the_reason() {
    let Some(nats) = Nats::start(1) else {
        return;
    };
    let urls = nats.urls();
    let hub = TestHub::start(&[
        "--nats",
        &urls,
        "--nats-replicas",
        "1",
        "--max-body",
        "4MiB",
    ]);
    let mut s = hub.subscribe("topic=t", &[]).await;
    let mut p = hub.publisher().await;
    // Within --max-body, above the server's 1 MB.
    let big = "x".repeat(1_200_000);
    let (status, reason) = p.publish(&[("topic", "t"), ("data", &big)]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reason}");
    assert!(reason.contains("max_payload"), "{reason}");
    // The node carries on: the next update goes through.
    p.ok(&[("topic", "t"), ("data", "small")]).await;
    assert_eq!(
        data(&take(&mut s, 1, Duration::from_secs(10)).await),
        ["small"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_stopped_publishes_503_and_nodes_recover_by_themselves() {
    let Some((mut nats, nodes, mut subs)) = two_nodes_on(1).await else {
        return;
    };
    let mut p = nodes[0].publisher().await;
    for i in 0..20 {
        p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 20, Duration::from_secs(20)).await),
            numbers(0..20)
        );
    }

    nats.servers[0].signal("TERM");
    for n in &nodes {
        wait_status(
            n,
            "/readyz",
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        )
        .await;
        let mut p = n.publisher().await;
        let (status, reason) = p.publish(&[("topic", "t"), ("data", "lost")]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason}");
        assert!(reason.contains("NATS"), "{reason}");
    }
    // Streams stay open, with their heartbeats.
    let before: Vec<u64> = subs.iter().map(|s| s.comments()).collect();
    let quiet = Instant::now();
    while subs.iter().zip(&before).any(|(s, b)| s.comments() <= *b) {
        assert!(quiet.elapsed() < Duration::from_secs(10), "no heartbeat");
        for s in &mut subs {
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.next()).await {
                panic!("no update may arrive during the outage, got {r:?}");
            }
        }
    }

    nats.servers[0].spawn();
    nats.wait_ready();
    for n in &nodes {
        wait_status(n, "/readyz", StatusCode::OK, Duration::from_secs(30)).await;
    }
    for (k, i) in (20..40).enumerate() {
        common::publish_until_ok(&nodes[k % 2], &i.to_string(), Duration::from_secs(20)).await;
    }
    for s in &mut subs {
        assert_eq!(
            data(&take(s, 20, Duration::from_secs(30)).await),
            numbers(20..40)
        );
        common::assert_quiet(s, Duration::from_millis(300)).await;
    }
    for n in &nodes {
        assert_eq!(n.metric("ssehub_cluster_gaps_total").await, 0.0);
    }
}

#[test]
fn redis_and_nats_together_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--clock-interval", "0"])
        .args(["--publisher-jwt-key", common::SECRET])
        .args(["--redis", "redis://127.0.0.1:1"])
        .args(["--nats", "nats://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--redis and --nats are both given"), "{err}");
}

/// A node whose NATS has no JetStream (or a cluster still electing its leader) keeps trying to
/// make its stream for a while, saying why once, and a stop signal ends the wait at once
/// rather than after it (a service manager gives a stopping unit a few seconds).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_waiting_for_its_stream_says_why_and_stops_when_told() {
    let Some(nats) = Nats::start_with(1, false) else {
        return;
    };
    let data = tempfile_dir();
    let mut node = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--publisher-jwt-key",
            "a-test-key-of-at-least-32-bytes-long!",
            "--nats",
            &nats.urls(),
            "--nats-replicas",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ssehub");
    let stderr = node.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let waiting = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("no word of the wait: {seen:?}"));
        if line.contains("cannot be made or found yet") {
            break line;
        }
        seen.push(line);
    };
    assert!(waiting.contains("trying again"), "{waiting}");
    // Still waiting a few seconds later, and it said so once, not once a second.
    std::thread::sleep(Duration::from_secs(3));
    assert!(node.try_wait().unwrap().is_none(), "it gave up early");
    let again: Vec<String> = rx.try_iter().collect();
    assert!(
        again
            .iter()
            .all(|l| !l.contains("cannot be made or found yet")),
        "the same error logged again: {again:?}"
    );
    // SAFETY: kill(2) on the child's own pid.
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    let stopped = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < stopped,
            "the stop signal did not end the wait"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(!status.success(), "{status:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("stopped while waiting for the stream")),
        "{rest:?}"
    );
    drop(nats);
    let _ = std::fs::remove_dir_all(data);
}

/// A fresh directory for a node's data that the test removes.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ssehub-nats-wait-{}-{}",
        std::process::id(),
        common::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
