//! HTTP/2 subscribers as a browser has them: one TLS connection (ALPN h2) carrying several
//! event streams (`--http2 --streams-per-connection N`). hyper's client does the framing and
//! the flow control; each stream's data goes through the same [`Reader`] as an HTTP/1.1
//! subscriber's body, so loss, duplicates and latency are counted alike.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::load::{self, Counts, Plan, Reader, SubscriberEnd, ANSWER_TIMEOUT};
use super::wire::BodyKind;

/// The flow-control window of a connection whose streams never read (`--slow`): small, as a
/// small receive buffer is for an HTTP/1.1 one, so the server soon finds them stuck.
const SLOW_WINDOW: u32 = 4096;

/// One connection carrying the subscribers `first..first + streams` (all reading, or all
/// `slow`): connect (bounded by `gate`), open every stream, then read them all until `stop`.
/// Returns how each subscriber ended, in order.
pub async fn connection(
    first: usize,
    streams: usize,
    slow: bool,
    plan: Arc<Plan>,
    counts: Arc<Counts>,
    gate: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) -> Vec<SubscriberEnd> {
    let topics = plan.topic_names.len();
    let mut ends: Vec<SubscriberEnd> = (first..first + streams)
        .map(|i| SubscriberEnd {
            topic: i % topics,
            slow,
            ..SubscriberEnd::default()
        })
        .collect();
    let permit = gate.acquire().await;
    let handshake = async {
        let addr = plan.node(first, plan.sub_addr);
        let tls = plan.sub_tls.as_deref().context("HTTP/2 needs TLS")?;
        let io = load::open(addr, first, plan.source_ips, None, Some(tls), true).await?;
        let agreed = match &io {
            Either::Right(tls) => tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
            Either::Left(_) => None,
        };
        if agreed.as_deref() != Some(b"h2") {
            let agreed = agreed.map(|p| String::from_utf8_lossy(&p).into_owned());
            anyhow::bail!("the server did not agree to HTTP/2 by ALPN (it chose {agreed:?})");
        }
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        if slow {
            builder
                .adaptive_window(false)
                .initial_stream_window_size(SLOW_WINDOW)
                .initial_connection_window_size(SLOW_WINDOW * streams as u32);
        }
        let (sender, conn) = builder.handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        anyhow::Ok(sender)
    };
    let sender = match bounded(handshake, &stop).await {
        Ok(sender) => sender,
        Err(e) => {
            drop(permit);
            counts
                .connect_failed
                .fetch_add(streams as u64, Ordering::Relaxed);
            counts.error(format!("subscribe (HTTP/2): {e:#}"));
            return ends;
        }
    };
    counts.connections.fetch_add(1, Ordering::Relaxed);
    // Every stream asked for at once, as a page that opens several EventSources does, and
    // each bounded alone: a server that allows fewer concurrent streams than asked for leaves
    // the rest waiting for a slot that never frees, and the streams it took still count.
    let answers = join_all(ends.iter().enumerate().map(|(k, end)| {
        let mut sender = sender.clone();
        let request = request(plan.sub_request(first + k, end.topic));
        let stop = &stop;
        async move {
            let asked = async {
                let response = sender.send_request(request?).await?;
                if response.status() != 200 {
                    anyhow::bail!("a subscriber got HTTP status {}", response.status());
                }
                anyhow::Ok(response.into_body())
            };
            bounded(asked, stop).await.map_err(|e| {
                if e.is::<tokio::time::error::Elapsed>() {
                    e.context(format!(
                        "the server may allow fewer concurrent streams on a connection than \
                         --streams-per-connection {streams} (it says how many in its SETTINGS; \
                         nginx allows 128 by default, ssehub 256)"
                    ))
                } else {
                    e
                }
            })
        }
    }))
    .await;
    drop(permit);
    let mut bodies = Vec::with_capacity(streams);
    for (end, answer) in ends.iter_mut().zip(answers) {
        match answer {
            Ok(body) => {
                end.connected = true;
                counts.connected.fetch_add(1, Ordering::Relaxed);
                if !slow {
                    counts.readers_per_topic[end.topic].fetch_add(1, Ordering::Relaxed);
                }
                bodies.push(Some(body));
            }
            Err(e) => {
                counts.connect_failed.fetch_add(1, Ordering::Relaxed);
                counts.error(format!("subscribe (HTTP/2): {e:#}"));
                bodies.push(None);
            }
        }
    }

    if slow {
        stop.cancelled().await;
        let drained = join_all(bodies.into_iter().map(|b| async move {
            match b {
                Some(mut body) => drained_to_end(&mut body).await,
                None => false,
            }
        }))
        .await;
        for (end, closed) in ends.iter_mut().zip(drained) {
            end.closed_by_server = closed;
        }
        return ends;
    }

    let received = join_all(bodies.into_iter().map(|b| {
        let (plan, counts, stop) = (&plan, &counts, &stop);
        async move {
            match b {
                Some(body) => read_stream(body, plan, counts, stop).await,
                None => 0,
            }
        }
    }))
    .await;
    for (end, received) in ends.iter_mut().zip(received) {
        end.received = received;
    }
    ends
}

/// `step` bounded by [`ANSWER_TIMEOUT`] and by the end of the run: a server that never
/// answers must not hang it.
async fn bounded<T>(
    step: impl std::future::Future<Output = anyhow::Result<T>>,
    stop: &CancellationToken,
) -> anyhow::Result<T> {
    tokio::select! {
        r = tokio::time::timeout(ANSWER_TIMEOUT, step) => r.unwrap_or_else(|elapsed| {
            Err(anyhow::Error::new(elapsed).context(format!("no answer within {ANSWER_TIMEOUT:?}")))
        }),
        _ = stop.cancelled() => Err(anyhow::anyhow!("the run ended before the streams opened")),
    }
}

/// Reads one stream's events until `stop` or its end; returns the distinct updates received.
async fn read_stream(
    mut body: Incoming,
    plan: &Plan,
    counts: &Counts,
    stop: &CancellationToken,
) -> u64 {
    // An HTTP/2 body has no transfer-coding: the data frames are the event stream.
    let mut reader = Reader::new(BodyKind::UntilClose);
    loop {
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            f = body.frame() => f,
        };
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if reader.feed(&data, plan.updates, counts) {
                        counts.disconnected.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            Some(Err(e)) => {
                counts.disconnected.fetch_add(1, Ordering::Relaxed);
                counts.reset.fetch_add(1, Ordering::Relaxed);
                counts.error(format!("an HTTP/2 stream broke: {e}"));
                break;
            }
            None => {
                counts.disconnected.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    reader.received
}

/// Reads what a never-reading stream had left; true if the server had ended or reset it (it
/// dropped a slow subscriber, as it should).
async fn drained_to_end(body: &mut Incoming) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) | Ok(Some(Err(_))) => return true,
            Ok(Some(Ok(_))) => continue,
            Err(_) => return false,
        }
    }
}

/// The subscribe request, prepared once as HTTP/1.1 bytes for the other subscribers, said
/// again in HTTP/2's terms: its path, its `Host` as the authority, its other fields as they are.
fn request(prepared: &[u8]) -> anyhow::Result<http::Request<Empty<Bytes>>> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    parsed
        .parse(prepared)
        .context("the prepared subscribe request is not HTTP")?;
    let path = parsed.path.unwrap_or("/");
    let mut authority = "";
    let mut builder = http::Request::builder().method(http::Method::GET);
    for f in parsed.headers.iter() {
        if f.name.eq_ignore_ascii_case("host") {
            authority = std::str::from_utf8(f.value).context("Host is not text")?;
        } else {
            builder = builder.header(f.name, f.value);
        }
    }
    let uri = format!("https://{authority}{path}");
    builder
        .uri(uri)
        .body(Empty::new())
        .context("the subscribe URL is not one HTTP/2 can send")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepared_request_becomes_an_http2_one() {
        let r = request(
            b"GET /.well-known/mercure?topic=bench-0 HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n\
              Accept: text/event-stream\r\nAuthorization: Bearer x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            r.uri().to_string(),
            "https://127.0.0.1:8443/.well-known/mercure?topic=bench-0"
        );
        assert_eq!(r.headers()["accept"], "text/event-stream");
        assert_eq!(r.headers()["authorization"], "Bearer x");
        assert!(!r.headers().contains_key("host"));
    }
}
