//! The client commands, `publish` and `subscribe`, on top of [`crate::client`].

use std::io::{Read, Write};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::cli::{PublishArgs, SubscribeArgs};
use crate::client::{self, ClientError, EventStream, Target};

/// Standard output's reader has gone (`ssehub subscribe … | head -1`): the command is done,
/// and that is success, as for any Unix filter (ripgrep's rule).
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Writes `text` to standard output at once; a reader that has gone is [`StdoutClosed`].
pub fn print_out(out: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::anyhow!("cannot write to standard output: {e}")),
    }
}

/// Publishes one update and prints its id.
pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.hub)?;
    let data = if args.data == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| anyhow::anyhow!("cannot read the data from standard input: {e}"))?;
        s
    } else {
        args.data
    };
    let token = match (args.token, args.jwt_key) {
        (Some(t), _) => Some(t),
        (None, Some(key)) => Some(
            crate::auth::Key::secret(jsonwebtoken::Algorithm::HS256, key.as_bytes())
                .mint(Some(&args.topic), None, Some(Duration::from_secs(60)))
                .map_err(anyhow::Error::msg)?,
        ),
        (None, None) => None,
    };
    let retry = args.retry.map(|r| r.to_string());
    let mut fields: Vec<(&str, &str)> = args.topic.iter().map(|t| ("topic", t.as_str())).collect();
    fields.push(("data", &data));
    if let Some(id) = &args.id {
        fields.push(("id", id));
    }
    if let Some(t) = &args.event_type {
        fields.push(("type", t));
    }
    if let Some(r) = &retry {
        fields.push(("retry", r));
    }
    if args.private {
        fields.push(("private", "on"));
    }
    let id = client::publish(&target, token.as_deref(), &fields).await?;
    print_out(&mut std::io::stdout().lock(), &format!("{id}\n"))
}

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Prints updates as they come; reconnects with `Last-Event-ID` and backoff when the stream
/// ends or the hub is unreachable, honouring the hub's `retry:`. A refusal (4xx) ends it.
pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let base = Target::parse(&args.hub)?;
    let matchers: Vec<(&str, &str)> = args
        .topic
        .iter()
        .map(|t| ("topic", t.as_str()))
        .chain(args.match_.iter().map(|m| ("match", m.as_str())))
        .chain(
            args.match_urlpattern
                .iter()
                .map(|m| ("match_urlpattern", m.as_str())),
        )
        .collect();
    let mut query = client::encode_form(&matchers);
    let sep = if base.path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    query.insert(0, sep);
    let target = base.with_path(format!("{}{query}", base.path_and_query));
    let mut last_id = args.last_event_id.clone();
    let mut retry = Duration::from_secs(1);
    let mut backoff = retry;
    let mut connected_once = false;
    let mut received: u64 = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let mut headers = HeaderMap::new();
        if let Some(t) = &args.token {
            headers.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}"))?,
            );
        }
        if let Some(id) = &last_id {
            headers.insert("last-event-id", HeaderValue::from_str(id)?);
        }
        match EventStream::open(&target, &headers).await {
            Ok(mut stream) => {
                connected_once = true;
                backoff = retry;
                loop {
                    match stream.next().await {
                        Ok(Some(ev)) => {
                            if let Some(r) = ev.retry {
                                retry = Duration::from_millis(r);
                                backoff = retry;
                            }
                            last_id = Some(ev.id.clone());
                            let line = if args.json {
                                serde_json::json!({
                                    "id": ev.id,
                                    "type": if ev.event_type.is_empty() { "message" } else { &ev.event_type },
                                    "data": ev.data,
                                    "retry": ev.retry,
                                })
                                .to_string()
                            } else {
                                ev.data
                            };
                            print_out(&mut out, &format!("{line}\n"))?;
                            received += 1;
                            if args.count.is_some_and(|c| received >= c) {
                                return Ok(());
                            }
                        }
                        Ok(None) => {
                            eprintln!("ssehub: the hub ended the stream; reconnecting");
                            break;
                        }
                        Err(e) => {
                            eprintln!("ssehub: the stream broke ({e}); reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(ClientError::Refused { status, reason }) if !status.is_server_error() => {
                anyhow::bail!("the hub refused the subscription ({status}): {reason}");
            }
            // Not a hub at all (the URL names its demo page, say): waiting would not mend it.
            Err(e @ ClientError::NotAHub { .. }) => return Err(e.into()),
            // Before the first connection only a hub not up yet is waited for (as a browser
            // would); a wrong certificate, scheme or host name would never mend itself.
            Err(e) if !connected_once && !hub_not_up_yet(&e) => return Err(e.into()),
            // Afterwards anything short of a refusal is: the hub may come back.
            Err(e) => {
                let what = if connected_once {
                    "reconnect"
                } else {
                    "connect"
                };
                eprintln!("ssehub: cannot {what} yet ({e}); trying again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Errors a hub that is starting (or restarting) gives: nothing listening yet, no answer yet,
/// or a 5xx.
fn hub_not_up_yet(e: &ClientError) -> bool {
    use std::io::ErrorKind::*;
    match e {
        ClientError::Connect { cause, .. } => matches!(
            cause.kind(),
            ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut
        ),
        ClientError::Timeout(_) => true,
        ClientError::Refused { status, .. } => status.is_server_error(),
        _ => false,
    }
}
