//! Hostile URI templates: many distinct ones from anonymous clients (memory), many held ones
//! against publishes (the hub's lock), and hubs that keep templates for token holders. Each case
//! runs against a real hub with a well-behaved subscriber connected throughout, which must
//! receive every update published to it, once, in order.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{read_until, take, TestHub};
use ssehub::client::{encode_form, ClientError, EventStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A subscriber that must see every update published to its topic during the case.
struct Witness {
    stream: EventStream,
    expected: usize,
}

impl Witness {
    async fn new(hub: &TestHub) -> Witness {
        Witness {
            stream: hub.subscribe("topic=witness", &[]).await,
            expected: 0,
        }
    }

    /// Publishes one update to the witness and checks it arrives.
    async fn check(&mut self, hub: &TestHub, label: &str) {
        let data = self.next_data(label);
        hub.publisher()
            .await
            .ok(&[("topic", "witness"), ("data", &data)])
            .await;
        self.received(&[data]).await;
    }

    /// The data of the next update to publish to the witness.
    fn next_data(&mut self, label: &str) -> String {
        self.expected += 1;
        format!("{label} {}", self.expected)
    }

    /// Checks that exactly `data` arrives next, in this order.
    async fn received(&mut self, data: &[String]) {
        let got = take(&mut self.stream, data.len(), Duration::from_secs(30)).await;
        let got: Vec<_> = got.into_iter().map(|e| e.data).collect();
        assert_eq!(got, data);
    }
}

/// `u<i>{?p0}{?p1}…{?p63}`: 64 expressions (the most a subscription may hold), about 1 KB.
fn template64(i: usize) -> String {
    let query: String = (0..64).map(|p| format!("{{?p{p}}}")).collect();
    format!("u{i}{query}")
}

fn topic_query(selector: &str) -> String {
    encode_form(&[("topic", selector)])
}

/// A subscribe request on a connection of its own: the status, the response head (with the
/// body, for a refusal) and the connection, which an accepted stream keeps for as long as it
/// is held.
async fn raw_subscribe(hub: &TestHub, query: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    let request = format!("GET /.well-known/mercure?{query} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    read_until(&mut s, &mut raw, "\r\n\r\n").await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        // The refusal's one line, whatever its framing.
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
        {
            raw.extend_from_slice(&buf[..n]);
        }
    }
    (status, String::from_utf8_lossy(&raw).into_owned(), s)
}

/// 400 anonymous GETs, each with a 64-expression template of its own and closed once the
/// response head came (about 180 KB each before the budget: 72 MB): the hub's memory grows by
/// no more than `--template-memory` and some slack. Then held subscribers past the budget are
/// refused with 503, Retry-After and the reason, until others close.
#[tokio::test(flavor = "multi_thread")]
async fn distinct_anonymous_templates_stay_within_template_memory() {
    const LIMIT_MIB: u64 = 8;
    let hub = TestHub::start_process(&["--template-memory", "8MiB"]);
    let mut w = Witness::new(&hub).await;
    let rss_before = hub.rss_kib();

    let mut accepted = 0;
    for i in 0..400 {
        let (status, head, conn) = raw_subscribe(&hub, &topic_query(&template64(i))).await;
        drop(conn);
        // Those a little ahead of the hub noticing the previous ones closed may find the
        // budget full: refused, as they should be.
        assert!(matches!(status, 200 | 503), "{head}");
        accepted += usize::from(status == 200);
        if i % 100 == 0 {
            w.check(&hub, "while templates come and go").await;
        }
    }
    let growth_mib = hub.rss_kib().saturating_sub(rss_before) / 1024;
    // The slack is for what the allocator keeps per thread and what connections cost.
    assert!(
        growth_mib < LIMIT_MIB + 24,
        "RSS grew by {growth_mib} MiB with --template-memory {LIMIT_MIB}MiB"
    );
    println!("{accepted} of 400 accepted; RSS grew by {growth_mib} MiB");
    assert!(accepted >= 100, "only {accepted} of 400 accepted");
    let used = hub.metric("ssehub_template_memory_bytes").await;
    assert!(used <= (LIMIT_MIB << 20) as f64, "{used} bytes charged");
    assert_eq!(
        hub.metric("ssehub_template_memory_limit_bytes").await,
        (LIMIT_MIB << 20) as f64
    );
    assert!(hub.metric("ssehub_templates_compiled_total").await >= 400.0);
    w.check(&hub, "after the closed subscriptions").await;

    // Held, they fill the budget, and the next is refused; exact topics are still served.
    let mut held = Vec::new();
    let mut refusal = None;
    for i in 1000..1300 {
        let (status, head, conn) = raw_subscribe(&hub, &topic_query(&template64(i))).await;
        match status {
            200 => held.push(conn),
            503 => {
                refusal = Some(head);
                break;
            }
            _ => panic!("{head}"),
        }
    }
    let refusal = refusal.expect("a held template subscriber past --template-memory is refused");
    println!("{} held before the refusal", held.len());
    assert!(held.len() >= 10, "only {} held", held.len());
    assert!(
        refusal.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{refusal}"
    );
    assert!(
        refusal.contains(
            "the hub's template memory (--template-memory 8MiB) is full; try again later"
        ),
        "{refusal}"
    );
    assert!(
        hub.metric("ssehub_template_subscriptions_refused_total{reason=\"memory\"}")
            .await
            >= 1.0
    );
    let _exact = hub.subscribe("topic=u1", &[]).await;
    w.check(&hub, "with the template memory full").await;

    // Closed, their templates are evicted for new ones.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 2000.. {
        let (status, head, _conn) = raw_subscribe(&hub, &topic_query(&template64(i))).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {head}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.check(&hub, "after the held ones closed").await;
    let used = hub.metric("ssehub_template_memory_bytes").await;
    assert!(used <= (LIMIT_MIB << 20) as f64, "{used} bytes charged");
}

/// The median of some durations.
fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

/// Publishes updates to the witness one at a time, every 2 ms or so (a publisher with a pace
/// of its own: one publishing back to back slips its requests into the gaps between another's
/// and sees them stall only now and then), at least `n` and until `enough` holds (or 10,000),
/// checking in batches that the witness gets them; returns how long each took.
async fn timed_publishes(
    hub: &TestHub,
    w: &mut Witness,
    n: usize,
    enough: impl Fn() -> bool,
    label: &str,
) -> Vec<Duration> {
    let mut p = hub.publisher().await;
    let mut took = Vec::new();
    while took.len() < n || !enough() && took.len() < 10_000 {
        let mut sent = Vec::with_capacity(100);
        for _ in 0..100 {
            let data = w.next_data(label);
            let start = Instant::now();
            p.ok(&[("topic", "witness"), ("data", &data)]).await;
            took.push(start.elapsed());
            sent.push(data);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        w.received(&sent).await;
    }
    took
}

/// 1,000 anonymous subscribers hold templates that every topic under `a/` must be tested
/// against, and a publisher keeps publishing ten 2,000-byte topics there (20 MB of matching a
/// publish, all refused by the templates): another publisher's latency, on a topic no template
/// can match, stays within a small factor of what it is without them (medians, as a ratio, for
/// a shared machine). Tested under the hub's lock, the matching held every publish up. A
/// publish of 250 topics of 4,000 bytes against them is refused with 413 and the reason.
#[tokio::test(flavor = "multi_thread")]
async fn template_matching_does_not_hold_up_other_publishes() {
    let hub = TestHub::start(&[]);
    let mut w = Witness::new(&hub).await;
    let before = median(timed_publishes(&hub, &mut w, 200, || true, "alone").await);

    let mut attackers = Vec::new();
    for i in 0..1000 {
        let (status, head, conn) =
            raw_subscribe(&hub, &topic_query(&format!("a/{{v{i}}}{{?q}}"))).await;
        assert_eq!(status, 200, "{head}");
        attackers.push(conn);
    }
    w.check(&hub, "with the templates held").await;

    let stop = Arc::new(AtomicBool::new(false));
    let heavy_done = Arc::new(AtomicUsize::new(0));
    let heavy = tokio::spawn({
        let mut p = hub.publisher().await;
        let (stop, done) = (stop.clone(), heavy_done.clone());
        async move {
            let topics: Vec<String> = (0..10)
                .map(|i| format!("a/{}{i}!", "x".repeat(2000)))
                .collect();
            let mut fields: Vec<(&str, &str)> =
                topics.iter().map(|t| ("topic", t.as_str())).collect();
            fields.push(("data", "heavy"));
            while !stop.load(Relaxed) {
                p.ok(&fields).await;
                done.fetch_add(1, Relaxed);
            }
        }
    });
    while heavy_done.load(Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Measured for as long as ten heavy publishes take at least.
    let heavy_before = heavy_done.load(Relaxed);
    let ten_more = || heavy_done.load(Relaxed) >= heavy_before + 10;
    let during = timed_publishes(&hub, &mut w, 200, ten_more, "beside heavy matching").await;
    let (publishes, slowest) = (during.len(), during.iter().max().copied());
    let during = median(during);
    stop.store(true, Relaxed);
    heavy.await.unwrap();
    let heavy_publishes = heavy_done.load(Relaxed) - heavy_before;
    let after = median(timed_publishes(&hub, &mut w, 200, || true, "after").await);
    let baseline = before.max(after);
    let ratio = during.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "median publish: {before:?} alone, {during:?} for {publishes} beside {heavy_publishes} \
         heavy publishes (slowest {slowest:?}), {after:?} after: {ratio:.1}x"
    );
    assert!(
        ratio < 10.0,
        "publishes slowed {ratio:.1}x by template matching elsewhere ({during:?} against {baseline:?})"
    );

    // Too much matching for one publish: refused before anything is tested.
    let topics: Vec<String> = (0..250)
        .map(|i| format!("a/{}{i}", "y".repeat(4000)))
        .collect();
    let mut fields: Vec<(&str, &str)> = topics.iter().map(|t| ("topic", t.as_str())).collect();
    fields.push(("data", "huge"));
    let started = Instant::now();
    let (status, reason) = hub.publisher().await.publish(&fields).await;
    assert_eq!(status, 413, "{reason}");
    assert!(
        reason.contains(
            "would be tested against too many URI templates (250 topics × 1000 templates)"
        ),
        "{reason}"
    );
    println!("refused in {:?}", started.elapsed());
    w.check(&hub, "after the refused publish").await;
    drop(attackers);
}

/// `--anonymous-templates false`: an anonymous template subscription is refused with 403 and
/// the reason; exact topics stay open to anonymous subscribers, and a token opens templates.
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_templates_can_be_turned_off() {
    let hub = TestHub::start(&["--anonymous-templates", "false"]);
    let mut w = Witness::new(&hub).await;
    let query = topic_query("https://example.com/books/{id}");
    match hub.try_subscribe(&query, &[]).await {
        Err(ClientError::Refused { status, reason }) => {
            assert_eq!(status, 403);
            assert!(
                reason.contains("anonymous subscribers")
                    && reason.contains("--anonymous-templates false"),
                "{reason}"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an anonymous template subscription was accepted"),
    }
    assert_eq!(
        hub.metric("ssehub_template_subscriptions_refused_total{reason=\"anonymous\"}")
            .await,
        1.0
    );
    w.check(&hub, "after the refusal").await;

    let token = hub
        .key
        .mint(
            None,
            Some(&["https://example.com/books/{id}".to_owned()]),
            None,
        )
        .unwrap();
    let bearer = format!("Bearer {token}");
    let mut books = hub
        .subscribe(&query, &[("authorization", bearer.as_str())])
        .await;
    hub.publisher()
        .await
        .ok(&[("topic", "https://example.com/books/1"), ("data", "book 1")])
        .await;
    assert_eq!(
        take(&mut books, 1, Duration::from_secs(10)).await[0].data,
        "book 1"
    );
    w.check(&hub, "with a token holder's template").await;
}
