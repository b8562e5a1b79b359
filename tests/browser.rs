//! In a real browser: Debian's Chromium, driven through chromedriver, against the real `ssehub`
//! binary. What a person sees in a tab: the demo page, a tab that loses its connection and
//! catches up by itself, hostile data shown as text, a page on another origin, ten tabs over
//! HTTP/2, the dashboard.

#[path = "common/browser.rs"]
mod chromium;
mod common;

use std::time::Duration;

use chromium::{Browser, CutProxy, PageServer, SelfSigned};
use common::TestHub;

const GREETING: &str = "Yo friend, here are some fascinating messages about the current time:";
const WAIT: Duration = Duration::from_secs(20);

/// A JavaScript string literal for `s`.
fn js_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The demo page's lines, in order.
async fn demo_lines(b: &Browser) -> Vec<String> {
    let v = b
        .js("return [...document.querySelectorAll('#messages .message')].map(e => e.textContent)")
        .await;
    serde_json::from_value(v).unwrap()
}

/// N of each "Message: N - the time is …" line; fails on a line of another shape.
fn clock_numbers(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| {
            let rest = l
                .strip_prefix("Message: ")
                .unwrap_or_else(|| panic!("not a clock line: {l:?}"));
            let (n, time) = rest
                .split_once(" - the time is ")
                .unwrap_or_else(|| panic!("not a clock line: {l:?}"));
            assert!(!time.is_empty(), "no time in {l:?}");
            n.parse()
                .unwrap_or_else(|_| panic!("no message number in {l:?}"))
        })
        .collect()
}

fn assert_consecutive(numbers: &[u64]) {
    let first = numbers[0];
    let expected: Vec<u64> = (first..first + numbers.len() as u64).collect();
    assert_eq!(
        numbers, expected,
        "every clock line exactly once, in order, no gap"
    );
}

#[tokio::test]
async fn demo_page_shows_the_greeting_and_clock_lines() {
    let Some(b) = Browser::start("demo_page_shows_the_greeting_and_clock_lines").await else {
        return;
    };
    let hub = TestHub::start(&["--clock-interval", "200ms"]);
    b.goto(&hub.url("/")).await;
    b.wait_for(
        "the greeting",
        &format!(
            "return document.body.innerText.includes({})",
            js_str(GREETING)
        ),
        WAIT,
    )
    .await;
    b.wait_for(
        "three clock lines",
        "return document.querySelectorAll('#messages .message').length >= 3",
        WAIT,
    )
    .await;
    assert_consecutive(&clock_numbers(&demo_lines(&b).await));
    let status = b
        .js("return document.getElementById('status').textContent")
        .await;
    assert_eq!(status, "live");
    b.close().await;
}

#[tokio::test]
async fn a_cut_connection_catches_up_by_itself_without_gap_or_duplicate() {
    let Some(b) = Browser::start("a_cut_connection_catches_up_by_itself").await else {
        return;
    };
    let hub = TestHub::start(&["--clock-interval", "200ms"]);
    let proxy = CutProxy::start(hub.addr).await;
    b.goto(&format!("http://{}/", proxy.addr)).await;
    b.wait_for(
        "three clock lines",
        "return document.querySelectorAll('#messages .message').length >= 3",
        WAIT,
    )
    .await;

    for round in 1..=2 {
        let before = demo_lines(&b).await.len();
        assert!(
            proxy.cut() >= 1,
            "round {round}: the page's stream went through the proxy"
        );
        // Chromium waits about three seconds before it reconnects: fifteen clock ticks that
        // only a replay from Last-Event-ID can fill in.
        b.wait_for(
            "lines after the reconnection",
            &format!(
                "return document.querySelectorAll('#messages .message').length >= {}",
                before + 25
            ),
            WAIT,
        )
        .await;
    }

    let numbers = clock_numbers(&demo_lines(&b).await);
    assert_consecutive(&numbers);
    // The proxy sees the first request of each connection; after a cut, every connection
    // is new, so each reconnection is there.
    let (resumed, fresh): (Vec<String>, Vec<String>) = proxy
        .request_heads()
        .into_iter()
        .filter(|h| h.starts_with("GET /events/ "))
        .partition(|h| {
            h.to_ascii_lowercase()
                .contains("\r\nlast-event-id: urn:uuid:")
        });
    assert!(
        resumed.len() >= 2,
        "each reconnection sent Last-Event-ID: {resumed:?}"
    );
    assert!(
        fresh.len() <= 1,
        "only the first opening had no Last-Event-ID: {fresh:?}"
    );
    b.close().await;
}

/// The README's promise: close the tab, open the page again, and it shows what was published
/// meanwhile, once each (the page keeps the last id it showed and resumes from it).
#[tokio::test]
async fn a_reopened_tab_shows_what_it_missed_exactly_once() {
    let Some(b) = Browser::start("a_reopened_tab_shows_what_it_missed_exactly_once").await else {
        return;
    };
    let hub = TestHub::start(&[]);
    let mut publisher = hub.publisher().await;
    let lines_are = |want: &[&str]| {
        format!(
            "return JSON.stringify([...document.querySelectorAll('#messages .message')]\
             .map(e => e.textContent)) === {}",
            js_str(&serde_json::to_string(want).unwrap())
        )
    };
    // A first visit has no id to resume from: it shows what comes after it opened, as always.
    publisher
        .ok(&[("topic", "time"), ("data", "before the first visit")])
        .await;
    b.goto(&hub.url("/")).await;
    b.wait_for(
        "the stream to open",
        "return document.getElementById('status').textContent === 'live'",
        WAIT,
    )
    .await;
    publisher.ok(&[("topic", "time"), ("data", "seen")]).await;
    b.wait_for("the line published while open", &lines_are(&["seen"]), WAIT)
        .await;

    // Close the tab (another one keeps the browser open), and wait until its stream is gone.
    let c = b.client();
    let first = c.window().await.unwrap();
    let second = c.new_window(true).await.unwrap().handle;
    c.switch_to_window(first).await.unwrap();
    c.close_window().await.unwrap();
    c.switch_to_window(second).await.unwrap();
    hub.wait_metric("ssehub_subscribers_connected", |v| v == 0.0, WAIT)
        .await;

    publisher
        .ok(&[("topic", "time"), ("data", "missed 1")])
        .await;
    publisher
        .ok(&[("topic", "time"), ("data", "missed <b>2</b>")])
        .await;
    b.goto(&hub.url("/")).await;
    b.wait_for(
        "the missed lines in the reopened page",
        &lines_are(&["missed 1", "missed <b>2</b>"]),
        WAIT,
    )
    .await;
    publisher
        .ok(&[("topic", "time"), ("data", "live again")])
        .await;
    b.wait_for(
        "the next live line, after the missed ones",
        &lines_are(&["missed 1", "missed <b>2</b>", "live again"]),
        WAIT,
    )
    .await;
    // Nothing else comes late (a duplicate of a replayed line, say).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        demo_lines(&b).await,
        vec!["missed 1", "missed <b>2</b>", "live again"]
    );
    b.close().await;
}

#[tokio::test]
async fn markup_in_data_is_shown_as_text_and_runs_nothing() {
    let Some(b) = Browser::start("markup_in_data_is_shown_as_text_and_runs_nothing").await else {
        return;
    };
    let hub = TestHub::start(&[]);
    b.goto(&hub.url("/")).await;
    b.wait_for(
        "the stream to open",
        "return document.getElementById('status').textContent === 'live'",
        WAIT,
    )
    .await;

    let payload = "<script>window.ssehubScriptRan = true</script>\
                   <img src=x onerror=\"window.ssehubImgRan = true\">";
    let mut publisher = hub.publisher().await;
    publisher.ok(&[("topic", "time"), ("data", payload)]).await;
    publisher.ok(&[("topic", "time"), ("data", "after")]).await;
    b.wait_for(
        "both updates",
        "return document.querySelectorAll('#messages .message').length >= 2",
        WAIT,
    )
    .await;
    // Give a broken image time to fire `onerror`, had it been parsed.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(
        demo_lines(&b).await,
        vec![payload.to_owned(), "after".into()]
    );
    let elements = b
        .js("return document.querySelectorAll('#messages script, #messages img').length")
        .await;
    assert_eq!(elements, 0, "no element was made from the data");
    let ran = b
        .js("return [typeof window.ssehubScriptRan, typeof window.ssehubImgRan]")
        .await;
    assert_eq!(ran, serde_json::json!(["undefined", "undefined"]));

    // The check above can see a payload run: the same markup as HTML does set the global.
    b.js(&format!(
        "const d = document.createElement('div'); document.body.appendChild(d); d.innerHTML = {};",
        js_str(payload)
    ))
    .await;
    b.wait_for(
        "the control: the same markup parsed as HTML runs its onerror",
        "return window.ssehubImgRan === true",
        WAIT,
    )
    .await;
    b.close().await;
}

/// A page on another origin that subscribes to the hub with `withCredentials`.
fn cross_origin_page(hub: &str, topic: &str) -> String {
    format!(
        r#"<!DOCTYPE html><meta charset="utf-8"><title>another origin</title>
<ul id="got"></ul>
<script>
  window.opened = false;
  const es = new EventSource({hub} + "/.well-known/mercure?topic=" + encodeURIComponent({topic}),
                             {{ withCredentials: true }});
  es.onopen = () => {{ window.opened = true; }};
  es.onmessage = (e) => {{
    const li = document.createElement("li"); li.textContent = e.data;
    document.getElementById("got").appendChild(li);
  }};
</script>"#,
        hub = js_str(hub),
        topic = js_str(topic),
    )
}

#[tokio::test]
async fn another_origin_gets_private_updates_only_when_listed_in_cors_origins() {
    let Some(b) = Browser::start("another_origin_gets_private_updates").await else {
        return;
    };
    let topic = "https://example.com/private/1";
    let page = PageServer::start().await;
    let hubs = [
        (true, TestHub::start(&["--cors-origins", &page.origin()])),
        (
            false,
            TestHub::start(&["--cors-origins", "http://127.0.0.1:9"]),
        ),
    ];
    for (listed, hub) in &hubs {
        let token = hub.key.mint(None, Some(&[topic.to_owned()]), None).unwrap();
        // The cookie belongs to the hub's host; ports do not count for cookies, so the page
        // (same site, another origin) sends it with a credentialed request.
        b.goto(&hub.url("/healthz")).await;
        b.js(&format!(
            "document.cookie = 'mercureAuthorization={token}; path=/.well-known/mercure; SameSite=Lax'"
        ))
        .await;
        page.set_page(&cross_origin_page(&format!("http://{}", hub.addr), topic));
        // A URL of its own per hub, so that the browser cannot show the previous page.
        b.goto(&format!("{}/?hub={}", page.origin(), hub.addr.port()))
            .await;

        if *listed {
            b.wait_for("the stream to open", "return window.opened", WAIT)
                .await;
        } else {
            // Whatever Chromium reports on the source (it may even fire `open` before its
            // CORS check ends the stream), what must hold is that no update reaches the page:
            // give it time to connect, then publish and look below.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let data = format!("private news (origin listed: {listed})");
        let mut publisher = hub.publisher().await;
        publisher
            .ok(&[("topic", topic), ("data", &data), ("private", "on")])
            .await;
        if *listed {
            b.wait_for(
                "the private update",
                &format!(
                    "return document.getElementById('got').textContent === {}",
                    js_str(&data)
                ),
                WAIT,
            )
            .await;
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let got = b
                .js("return document.getElementById('got').textContent")
                .await;
            assert_eq!(got, "", "an origin not in --cors-origins received nothing");
        }
    }
    b.close().await;
}

/// Browsers open at most six HTTP/1.1 connections per site, so a seventh tab's `EventSource`
/// would hang; over HTTP/2 (which browsers speak only over TLS) every tab shares one.
#[tokio::test]
async fn ten_tabs_over_http2_all_receive_updates() {
    const TABS: usize = 10;
    let cert = SelfSigned::generate("ten-tabs");
    let Some(b) = Browser::start_trusting("ten_tabs_over_http2_all_receive_updates", &cert).await
    else {
        return;
    };
    let hub = TestHub::start_tls(
        &[
            "--clock-interval",
            "200ms",
            "--tls-cert",
            &cert.cert_path(),
            "--tls-key",
            &cert.key_path(),
        ],
        cert.der.clone(),
    );
    assert_eq!(hub.scheme, "https");
    let url = format!("https://127.0.0.1:{}/", hub.addr.port());

    let c = b.client();
    let mut tabs = vec![c.window().await.unwrap()];
    b.goto(&url).await;
    for _ in 1..TABS {
        let tab = c.new_window(true).await.unwrap().handle;
        c.switch_to_window(tab.clone()).await.unwrap();
        b.goto(&url).await;
        tabs.push(tab);
    }
    assert_eq!(c.windows().await.unwrap().len(), TABS);

    // After the tenth opened, every tab, the first to the last, shows clock lines over h2.
    let mut seen = Vec::new();
    for (i, tab) in tabs.iter().enumerate() {
        c.switch_to_window(tab.clone()).await.unwrap();
        let protocol = b
            .js("return performance.getEntriesByType('navigation')[0].nextHopProtocol")
            .await;
        assert_eq!(protocol, "h2", "tab {} was loaded over HTTP/2", i + 1);
        b.wait_for(
            &format!("two clock lines in tab {}", i + 1),
            "return document.querySelectorAll('#messages .message').length >= 2 \
             && document.getElementById('status').textContent === 'live'",
            WAIT,
        )
        .await;
        let lines = demo_lines(&b).await;
        assert_consecutive(&clock_numbers(&lines));
        seen.push(lines.len());
    }
    // And they keep coming, in every tab.
    for (i, tab) in tabs.iter().enumerate() {
        c.switch_to_window(tab.clone()).await.unwrap();
        b.wait_for(
            &format!("more clock lines in tab {}", i + 1),
            &format!(
                "return document.querySelectorAll('#messages .message').length > {}",
                seen[i]
            ),
            WAIT,
        )
        .await;
        assert_consecutive(&clock_numbers(&demo_lines(&b).await));
    }

    // The hub counts one subscriber per tab, all connected at once.
    let connected = hub.metric("ssehub_subscribers_connected").await;
    assert_eq!(connected, TABS as f64, "one stream per tab, all open");

    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    b.screenshot(&artifacts.join("ten-tabs.png")).await;
    b.close().await;
}

#[tokio::test]
async fn the_dashboard_shows_figures_and_publishes_into_its_live_log() {
    // Chromium's own record of every request it makes: the token must be in none of the URLs.
    let net_log =
        std::env::temp_dir().join(format!("ssehub-dashboard-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&net_log);
    let Some(b) = Browser::start_with(
        "the_dashboard_shows_figures_and_publishes",
        &[format!("--log-net-log={}", net_log.display())],
    )
    .await
    else {
        return;
    };
    let hub = TestHub::start(&["--clock-interval", "200ms"]);
    let everything = ["*".to_owned()];
    let token = hub
        .key
        .mint(Some(&everything), Some(&everything), None)
        .unwrap();

    // Without a token the page says so, and shows no figures.
    b.goto(&hub.url("/ui/")).await;
    b.wait_for(
        "the no-token notice",
        "const n = document.getElementById('notoken'); \
         return !n.hidden && n.innerText.includes('need a token')",
        WAIT,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let history = b
        .js("return document.getElementById('fig-history').textContent")
        .await;
    assert_eq!(history, "–", "no figures without a token");

    // With one, the figures come.
    b.goto(&hub.url(&format!("/ui/#token={token}"))).await;
    b.wait_for(
        "the figures to arrive",
        "return document.getElementById('notoken').hidden \
         && Number(document.getElementById('fig-history').textContent) > 0 \
         && Number(document.getElementById('fig-updates').textContent) > 0",
        WAIT,
    )
    .await;

    // Follow some topics; the dashboard's own subscription shows in the figures.
    b.js(
        "document.getElementById('topics').value = 'https://example.com/{name}'; \
          document.querySelector('#follow-form button[type=submit]').click();",
    )
    .await;
    b.wait_for(
        "the live log to follow",
        "return document.getElementById('log-status').dataset.state === 'live'",
        WAIT,
    )
    .await;
    b.wait_for(
        "a connected subscriber",
        "return Number(document.getElementById('fig-subscribers').textContent) >= 1",
        WAIT,
    )
    .await;

    // Publish through the form (typed into it, as a person would), and see it in the log.
    for data in [
        "first note from the dashboard",
        "hello from the dashboard test",
    ] {
        let topic = b
            .client()
            .find(fantoccini::Locator::Id("pub-topic"))
            .await
            .unwrap();
        topic.clear().await.unwrap();
        topic
            .send_keys("https://example.com/dashboard")
            .await
            .unwrap();
        let field = b
            .client()
            .find(fantoccini::Locator::Id("pub-data"))
            .await
            .unwrap();
        field.clear().await.unwrap();
        field.send_keys(data).await.unwrap();
        b.client()
            .find(fantoccini::Locator::Css(
                "#publish-form button[type=submit]",
            ))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait_for(
            "the publish to be accepted",
            "return document.getElementById('pub-result').textContent.startsWith('Published: urn:uuid:')",
            WAIT,
        )
        .await;
        b.wait_for(
            "the update in the live log",
            &format!(
                "return [...document.querySelectorAll('#log .data')].some(e => e.textContent === {})",
                js_str(data)
            ),
            WAIT,
        )
        .await;
    }

    // A few seconds of chart, then the picture the README shows.
    b.wait_for(
        "a few seconds of chart",
        "return document.getElementById('line-updates').points.length >= 8",
        WAIT,
    )
    .await;
    b.js("window.scrollTo(0, 0)").await;
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    b.screenshot(&artifacts.join("ui.png")).await;
    if std::env::var("SSEHUB_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        b.screenshot(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ui.png"))
            .await;
    }

    // A token the hub refuses: the figures stop, with the hub's reason.
    b.js("document.getElementById('token').value = 'not-a-jwt'; \
          document.querySelector('#token-form button[type=submit]').click();")
        .await;
    b.wait_for(
        "the refusal and its reason",
        "return document.getElementById('stats-status').dataset.state === 'closed' \
         && document.getElementById('stats-error').textContent.startsWith('401 invalid_token: invalid token')",
        WAIT,
    )
    .await;
    b.close().await;

    // The figures and the live log were streams with the token in a header, not in the URL
    // (where proxies' logs would keep it). Chromium writes its net log out as it quits.
    let mut log = String::new();
    for _ in 0..50 {
        log = std::fs::read_to_string(&net_log).unwrap_or_default();
        if log.contains("/ui/stats") && log.contains("/.well-known/mercure?topic=") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&net_log);
    assert!(
        log.contains("/ui/stats") && log.contains("/.well-known/mercure?topic="),
        "the net log does not show the dashboard's streams ({} bytes)",
        log.len()
    );
    assert!(!log.contains("authorization="), "a URL carries a token");
}

/// What the page's event sources received so far: `[data, lastEventId]` per event, by name.
async fn received(b: &Browser, name: &str) -> Vec<(String, String)> {
    let v = b
        .js(&format!(
            "return window.got[{}].map(e => [e.data, e.id])",
            js_str(name)
        ))
        .await;
    serde_json::from_value(v).unwrap()
}

/// The data of `received`, alone.
async fn received_data(b: &Browser, name: &str) -> Vec<String> {
    received(b, name)
        .await
        .into_iter()
        .map(|(d, _)| d)
        .collect()
}

/// Waits until the event source `name` has received an event whose data is `data`.
async fn wait_received(b: &Browser, name: &str, data: &str) {
    b.wait_for(
        &format!("{data:?} at the {name} source"),
        &format!(
            "return window.got[{}].some(e => e.data === {})",
            js_str(name),
            js_str(data)
        ),
        WAIT,
    )
    .await;
}

/// Mercure 1.0 with the browser's own `EventSource`: `match=` and `match_urlpattern=`, a
/// private update for the 1.0 access token in the hub's cookie (an `EventSource` cannot send
/// an `Authorization` header), none for a topic the token does not grant, and a cut connection
/// that resumes from `Last-Event-ID` with what it missed, private updates re-checked.
#[tokio::test]
async fn event_source_speaks_mercure_1_0_with_the_cookie_and_resumes() {
    let Some(b) = Browser::start("event_source_speaks_mercure_1_0").await else {
        return;
    };
    const NEWS: &str = "https://example.com/news";
    const BOOKS: &str = "https://example.com/books/:id";
    let hub = TestHub::start(&[]);
    // The page goes through a proxy whose connections the test cuts: the cheapest real
    // reconnection (a 1.0 token must have `exp`, so --max-stream-lifetime does not end its
    // stream, and restarting the hub would lose nothing the proxy does not show).
    let proxy = CutProxy::start(hub.addr).await;
    let origin = format!("http://{}", proxy.addr);
    // The token's audience is the hub as the browser reaches it: through the proxy.
    let token = hub.access_token(
        &format!("{origin}/.well-known/mercure"),
        &[],
        &[("exact", "https://example.com/books/1")],
    );
    let mut publisher = hub.publisher_v1().await;

    // The default cookie name. Chromium takes a `__Secure-` cookie on http://127.0.0.1 (as on
    // http://localhost): loopback counts as a secure context, where `Secure` cookies may be
    // set, and the prefix asks for no more than `Secure`. (Without `Secure`, it refuses it.)
    b.goto(&format!("{origin}/healthz")).await;
    b.js(&format!(
        "document.cookie = '__Secure-mercure_access_token={token}; Secure; \
         path=/.well-known/mercure; SameSite=Strict'"
    ))
    .await;
    b.js(&format!(
        "window.got = {{}}; window.opened = {{}}; window.sources = [];
         for (const [name, query] of [['exact', 'match=' + encodeURIComponent({news})],
                                      ['pattern', 'match_urlpattern=' + encodeURIComponent({books})]]) {{
           window.got[name] = []; window.opened[name] = 0;
           const es = new EventSource('/.well-known/mercure?' + query);
           es.onopen = () => {{ window.opened[name] += 1; }};
           es.onmessage = (e) => {{ window.got[name].push({{ data: e.data, id: e.lastEventId }}); }};
           window.sources.push(es);
         }}",
        news = js_str(NEWS),
        books = js_str(BOOKS),
    ))
    .await;
    b.wait_for(
        "both event sources to open",
        "return window.opened.exact === 1 && window.opened.pattern === 1",
        WAIT,
    )
    .await;

    let public = |topic: &'static str, data: &'static str| [("topic", topic), ("data", data)];
    let private = |topic: &'static str, data: &'static str| {
        [("topic", topic), ("data", data), ("private", "on")]
    };
    publisher.ok(&public(NEWS, "news")).await;
    // An exact matcher is no prefix.
    publisher
        .ok(&public("https://example.com/news/1", "not news"))
        .await;
    publisher
        .ok(&public("https://example.com/books/7", "book 7"))
        .await;
    // The token grants books/1 and nothing else: books/2 is matched, and private, so it is
    // held back; the public marker after it shows it had its chance to arrive (one stream
    // delivers in order).
    publisher
        .ok(&private("https://example.com/books/1", "private book 1"))
        .await;
    publisher
        .ok(&private("https://example.com/books/2", "private book 2"))
        .await;
    publisher
        .ok(&public("https://example.com/books/3", "book marker"))
        .await;
    publisher.ok(&public(NEWS, "news marker")).await;
    wait_received(&b, "pattern", "book marker").await;
    wait_received(&b, "exact", "news marker").await;
    assert_eq!(received_data(&b, "exact").await, ["news", "news marker"]);
    assert_eq!(
        received_data(&b, "pattern").await,
        ["book 7", "private book 1", "book marker"]
    );

    // The token went in the cookie, never in a URL. (The proxy keeps the first request of
    // each connection; the page's own, idle once it loaded, may carry one of the streams.)
    let heads = proxy.request_heads();
    let streams: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("GET /.well-known/mercure?"))
        .collect();
    assert!(!streams.is_empty(), "{heads:?}");
    for h in &streams {
        assert!(
            h.contains(&format!("__Secure-mercure_access_token={token}")),
            "{h}"
        );
        assert!(!h.to_ascii_lowercase().contains("authorization="), "{h}");
    }

    // Cut both streams; publish while the browser waits to reconnect (Chromium waits about
    // three seconds), so that only a replay from Last-Event-ID can bring these.
    let last_seen = |events: Vec<(String, String)>| events.last().unwrap().1.clone();
    let last_exact = last_seen(received(&b, "exact").await);
    let last_pattern = last_seen(received(&b, "pattern").await);
    let before = proxy.request_heads().len();
    assert_eq!(proxy.cut(), 2, "both streams went through the proxy");
    publisher.ok(&public(NEWS, "missed news")).await;
    publisher
        .ok(&private(
            "https://example.com/books/1",
            "missed private book 1",
        ))
        .await;
    publisher
        .ok(&private(
            "https://example.com/books/2",
            "missed private book 2",
        ))
        .await;
    publisher
        .ok(&public("https://example.com/books/4", "missed book 4"))
        .await;
    assert_eq!(
        proxy.request_heads().len(),
        before,
        "the browser had not reconnected yet when the missed updates were published"
    );
    wait_received(&b, "pattern", "missed book 4").await;
    wait_received(&b, "exact", "missed news").await;
    // And live ones after the replay, with no duplicate in between.
    publisher
        .ok(&public("https://example.com/books/5", "live book 5"))
        .await;
    publisher.ok(&public(NEWS, "live news")).await;
    wait_received(&b, "pattern", "live book 5").await;
    wait_received(&b, "exact", "live news").await;
    assert_eq!(
        received_data(&b, "exact").await,
        ["news", "news marker", "missed news", "live news"]
    );
    assert_eq!(
        received_data(&b, "pattern").await,
        [
            "book 7",
            "private book 1",
            "book marker",
            "missed private book 1",
            "missed book 4",
            "live book 5"
        ]
    );

    // Each reconnection named the last event its source had seen.
    let reconnections: Vec<String> = proxy.request_heads()[before..]
        .iter()
        .filter(|h| h.starts_with("GET /.well-known/mercure?"))
        .map(|h| h.to_ascii_lowercase())
        .collect();
    assert_eq!(reconnections.len(), 2, "{reconnections:?}");
    for (query, id) in [
        ("?match=", &last_exact),
        ("?match_urlpattern=", &last_pattern),
    ] {
        let want = format!("\r\nlast-event-id: {}\r\n", id.to_ascii_lowercase());
        assert!(
            reconnections
                .iter()
                .any(|h| h.contains(query) && h.contains(&want)),
            "a reconnection of {query} with {want:?}: {reconnections:?}"
        );
    }
    b.close().await;
}

/// The dashboard with a Mercure 1.0 access token, on a hub that serves 1.0 only (so that a
/// 0.x parameter or token would be refused): the figures, the live log on `match=*` and then on
/// a URL pattern, a private update published through the form, and the hub's RFC 6750
/// refusals shown with their error and reason.
#[tokio::test]
async fn the_dashboard_speaks_mercure_1_0_with_an_access_token() {
    let Some(b) = Browser::start("the_dashboard_speaks_mercure_1_0").await else {
        return;
    };
    let hub = TestHub::start(&["--protocol", "1.0", "--clock-interval", "200ms"]);
    let aud = hub.url("/.well-known/mercure");
    let token = hub.access_token(
        &aud,
        &[("urlpattern", "https://example.com/:name")],
        &[("exact", "*")],
    );
    b.goto(&hub.url(&format!("/ui/#token={token}"))).await;
    b.wait_for(
        "the figures to arrive",
        "return document.getElementById('notoken').hidden \
         && Number(document.getElementById('fig-history').textContent) > 0",
        WAIT,
    )
    .await;
    let hint = b
        .js("return document.getElementById('mint').textContent")
        .await;
    assert!(
        hint.as_str()
            .unwrap()
            .ends_with(&format!(" --audience {aud}")),
        "{hint}"
    );
    let dialect = b
        .js("return document.getElementById('dialect').textContent")
        .await;
    assert!(
        dialect.as_str().unwrap().starts_with("Mercure 1.0"),
        "{dialect}"
    );

    // `*` (the field's default) follows everything: the clock's lines come.
    b.js("document.querySelector('#follow-form button[type=submit]').click()")
        .await;
    b.wait_for(
        "the clock in the live log",
        "return [...document.querySelectorAll('#log .data')]\
         .some(e => e.textContent.startsWith('Message: '))",
        WAIT,
    )
    .await;

    // A URL pattern, and a private update published through the form.
    b.js(
        "document.getElementById('topics').value = 'https://example.com/:name'; \
         document.getElementById('match-type').value = 'urlpattern'; \
         document.querySelector('#follow-form button[type=submit]').click();",
    )
    .await;
    b.wait_for(
        "the live log to follow the pattern",
        "return document.getElementById('log-status').textContent \
         === 'following https://example.com/:name'",
        WAIT,
    )
    .await;
    let publish = |topic: &str, data: &str| {
        format!(
            "document.getElementById('pub-result').textContent = ''; \
             document.getElementById('pub-topic').value = {}; \
             document.getElementById('pub-data').value = {}; \
             document.getElementById('pub-private').checked = true; \
             document.querySelector('#publish-form button[type=submit]').click();",
            js_str(topic),
            js_str(data)
        )
    };
    b.js(&publish("https://example.com/dashboard", "private note"))
        .await;
    b.wait_for(
        "the publish to be accepted",
        "return document.getElementById('pub-result').textContent.startsWith('Published: urn:uuid:')",
        WAIT,
    )
    .await;
    b.wait_for(
        "the private update in the live log",
        "return [...document.querySelectorAll('#log .data')].some(e => e.textContent === 'private note')",
        WAIT,
    )
    .await;

    // A topic the token may not publish to: 403 insufficient_scope, and the hub's reason.
    b.js(&publish("https://example.com/a/b", "not allowed"))
        .await;
    let refused = b
        .wait_for(
            "the refusal of the publish",
            "return document.getElementById('pub-result').dataset.ok === 'false' \
             && document.getElementById('pub-result').textContent",
            WAIT,
        )
        .await;
    let refused = refused.as_str().unwrap();
    assert!(
        refused.starts_with("403 insufficient_scope: ") && refused.len() > 30,
        "{refused}"
    );

    // A 1.0 token for another hub: the figures stop, with the error and the hub's reason.
    let elsewhere = hub.access_token("https://elsewhere.example/.well-known/mercure", &[], &[]);
    b.js(&format!(
        "document.getElementById('token').value = {}; \
         document.querySelector('#token-form button[type=submit]').click();",
        js_str(&elsewhere)
    ))
    .await;
    let error = b
        .wait_for(
            "the refusal and its reason",
            "return document.getElementById('stats-status').dataset.state === 'closed' \
             && document.getElementById('stats-error').textContent",
            WAIT,
        )
        .await;
    let error = error.as_str().unwrap();
    assert!(
        error.starts_with("401 invalid_token: invalid token: ") && error.contains("aud"),
        "{error}"
    );
    b.close().await;
}

/// The dashboard's hint for minting a token names the audience the hub checks: its
/// `--resource-identifier` (read from the RFC 9728 metadata), not the URL the page came from.
#[tokio::test]
async fn the_dashboard_names_the_configured_resource_as_the_audience() {
    let Some(b) = Browser::start("the_dashboard_names_the_configured_resource").await else {
        return;
    };
    let resource = "https://hub.example.com/.well-known/mercure";
    let hub = TestHub::start(&["--resource-identifier", resource]);
    b.goto(&hub.url("/ui/")).await;
    let want = format!(" --audience {resource}");
    b.wait_for(
        "the hint to name the configured resource",
        &format!(
            "return document.getElementById('mint').textContent.endsWith({})",
            js_str(&want)
        ),
        Duration::from_secs(10),
    )
    .await;
    b.close().await;
}
