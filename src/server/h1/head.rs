//! Reading HTTP/1.1 request heads, for both of the server's own paths (event streams and
//! publishes): how far a head has come, whether it is one those paths can take, and how large
//! it is by the rule every path applies.

use bytes::BytesMut;
use http::{header, Method, Request, Version};
use tokio::io::AsyncRead;
use tokio::time::Instant;

use crate::http::MERCURE_PATH;

/// Most header lines in a request head this writer takes; hyper gets the rest.
const MAX_HEADERS: usize = 64;

/// Reads a request head, until its blank line, `limit` bytes, the end of input or `deadline`,
/// continuing from `buf`, which may already hold its start (the first bytes of a connection,
/// read to tell its protocol, or what a client sent right after its previous request). Returns
/// what was read, or `None` when nothing usable came in time.
///
/// Only the bytes new since the last read are searched for the blank line that ends the head
/// (as hyper does): a client trickling a long head a byte at a time costs work in proportion
/// to the head, not to its square.
pub async fn read_more_head<S: AsyncRead + Unpin>(
    io: &mut S,
    mut buf: BytesMut,
    deadline: Instant,
    limit: usize,
) -> Option<BytesMut> {
    use tokio::io::AsyncReadExt as _;
    let mut scan = HeadScan::default();
    loop {
        if buf.len() >= limit || scan.complete(&buf) {
            return Some(buf);
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(buf.capacity().max(1024).min(limit));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return (!buf.is_empty()).then_some(buf),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// How far a request head being read has been looked at.
#[derive(Default)]
struct HeadScan {
    /// Whether httparse has had its one look at the start of the head.
    parsed: bool,
    /// Bytes already searched for the head's end.
    scanned: usize,
    /// Where the request line starts, once a byte other than the empty lines httparse skips
    /// before it has come.
    start: Option<usize>,
}

impl HeadScan {
    /// Has the head ended (or gone wrong, which hyper then answers)? httparse decides on the
    /// first bytes, so that garbage is answered at once; after that only the new bytes are
    /// searched for a blank line, a bare LF one included (httparse takes both, as for hyper).
    /// More header lines than this writer takes do not end the head: hyper reads the rest
    /// within the same deadline, not a fresh one of its own.
    fn complete(&mut self, buf: &[u8]) -> bool {
        if buf.is_empty() {
            return false;
        }
        let ended = self.blank_line(buf);
        if std::mem::replace(&mut self.parsed, true) {
            return ended;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        ended
            || !matches!(
                httparse::Request::new(&mut headers).parse(buf),
                Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders)
            )
    }

    /// Is there a blank line (`\n\n` or `\n\r\n`) after the request line's start, among
    /// the bytes since the last call and the two before them?
    fn blank_line(&mut self, buf: &[u8]) -> bool {
        let from = self.scanned;
        self.scanned = buf.len();
        let start = match self.start {
            Some(s) => s,
            None => match buf[from..].iter().position(|b| !matches!(b, b'\r' | b'\n')) {
                Some(i) => *self.start.insert(from + i),
                None => return false,
            },
        };
        let bytes = &buf[from.saturating_sub(2).max(start)..];
        bytes.iter().enumerate().any(|(i, &b)| {
            b == b'\n' && matches!(&bytes[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..])
        })
    }
}

/// Why a request head that has ended is not one HTTP/1.1 can read, in a line for the client
/// (hyper answers such a head `400` with an empty body), or `None` when it parses (or has not
/// ended: hyper reads the rest, or refuses it as too large).
pub fn malformed_head(buf: &[u8]) -> Option<&'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => None,
        Ok(httparse::Status::Complete(_)) => {
            let target = parsed.path.unwrap_or_default();
            target.parse::<http::Uri>().is_err().then_some(
                "the request target is not a valid URL: encode spaces and other special \
                 characters in it (a space as %20)",
            )
        }
        Err(httparse::Error::Token | httparse::Error::Version) => Some(
            "malformed request line: send METHOD TARGET HTTP/1.1, with any space in the \
             target encoded as %20",
        ),
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            Some("malformed header line: send each header as Name: value, on a line of its own")
        }
        Err(_) => Some("malformed request head: send an HTTP/1.1 request"),
    }
}

/// Is this head a plain `GET` of an event stream that the lean writer can serve? Returns the
/// request to route and whether the client asked for the connection to be closed after it, or
/// `None` to leave the connection to hyper.
pub fn stream_request(buf: &[u8], max_head: usize) -> Option<(Request<axum::body::Body>, bool)> {
    let head = plain_head(buf, max_head, Method::GET, |path| {
        matches!(path, MERCURE_PATH | "/events" | "/events/")
    })?;
    // A body is unusual for an event stream; hyper knows what to do with one.
    if head.content_length.is_some_and(|n| n > 0) {
        return None;
    }
    let request = head.request.body(axum::body::Body::empty()).ok()?;
    Some((request, head.close))
}

/// A request head's size as the hub limits it, whichever path reads it: the target's length,
/// plus each header's name and value and 4 bytes (`": "` and CRLF). Counted on the parsed
/// head, so that it does not depend on the line endings or spaces a client chose, nor on
/// whether the head came with its body.
pub fn head_size<'a>(uri: &http::Uri, headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> usize {
    /// Counts what `Display` writes, without keeping it.
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut uri_len = Count(0);
    let _ = std::fmt::Write::write_fmt(&mut uri_len, format_args!("{uri}"));
    uri_len.0 + headers.map(|(k, v)| k.len() + v.len() + 4).sum::<usize>()
}

/// A request head the server's own paths (streams, publishes) may serve, parsed.
pub struct PlainHead {
    /// The request, headers included, without its body.
    pub request: http::request::Builder,
    /// The head's length in bytes, blank line included.
    pub len: usize,
    /// Its `Content-Length`, if it has one.
    pub content_length: Option<usize>,
    /// Whether the client asked for the connection to be closed after the answer.
    pub close: bool,
}

/// Parses an HTTP/1.1 head for `method` on a path `path_ok` accepts, or returns `None` for
/// anything hyper should answer instead: another method, path or version, a partial or
/// malformed head, a chunked body, an upgrade, an expectation, a doubtful `Content-Length`, a
/// head over `max_head` by [`head_size`] (refused by the server's `oversized_head`, as it would
/// be had it come in pieces) or by its length in bytes.
pub fn plain_head(
    buf: &[u8],
    max_head: usize,
    method: Method,
    path_ok: impl Fn(&str) -> bool,
) -> Option<PlainHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    if len > max_head || parsed.method != Some(method.as_str()) || parsed.version != Some(1) {
        return None;
    }
    let target = parsed.path?;
    if !path_ok(target.split('?').next().unwrap_or("")) {
        return None;
    }
    // httparse takes some bytes in a target that `http::Uri` refuses: hyper answers those.
    let uri: http::Uri = target.parse().ok()?;
    let headers = parsed.headers.iter().map(|h| (h.name, h.value));
    if head_size(&uri, headers) > max_head {
        return None;
    }
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .version(Version::HTTP_11);
    let (mut content_length, mut close) = (None, false);
    for h in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        if name == header::CONTENT_LENGTH {
            // Only plain digits, given once: anything else is hyper's to refuse.
            let digits = h.value.len() <= 18 && h.value.iter().all(u8::is_ascii_digit);
            if content_length.is_some() || h.value.is_empty() || !digits {
                return None;
            }
            content_length = std::str::from_utf8(h.value).ok()?.parse().ok();
        }
        if name == header::CONNECTION {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        request = request.header(name, http::HeaderValue::from_bytes(h.value).ok()?);
    }
    Some(PlainHead {
        request,
        len,
        content_length,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `head` to a scan in pieces of `step` bytes; the piece count at which it ended.
    fn ends_after(head: &[u8], step: usize) -> Option<usize> {
        let mut scan = HeadScan::default();
        let mut pieces = 0;
        for end in (step..head.len() + step).step_by(step) {
            pieces += 1;
            if scan.complete(&head[..end.min(head.len())]) {
                return Some(pieces);
            }
        }
        None
    }

    #[test]
    fn a_head_ends_at_its_blank_line_however_it_is_cut() {
        for head in [
            &b"GET /events/ HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /events/ HTTP/1.1\nHost: x\n\n",
            b"GET /events/ HTTP/1.1\nHost: x\n\r\n",
            b"\r\n\nGET /events/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(head);
            // In two pieces, cut anywhere (the blank line included): ends with the second.
            for cut in 1..head.len() {
                let mut scan = HeadScan::default();
                assert!(!scan.complete(&head[..cut]), "{text:?} cut at {cut}");
                assert!(scan.complete(head), "{text:?} cut at {cut}");
            }
            for step in [1, 2, 3, 5] {
                let pieces = head.len().div_ceil(step);
                assert_eq!(ends_after(head, step), Some(pieces), "{text:?} by {step}");
            }
        }
        // Only empty lines so far: not a head yet.
        assert_eq!(ends_after(b"\r\n\r\n\n\n\r\n", 1), None);
    }

    #[test]
    fn garbage_first_ends_the_head_and_extra_header_lines_do_not() {
        assert_eq!(ends_after(b"\x00\x01garbage", 20), Some(1));
        // 70 header lines, more than httparse is given room for: the head goes on to its end.
        let mut head = b"GET /healthz HTTP/1.1\r\n".to_vec();
        for i in 0..70 {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let lines = head.len();
        head.extend_from_slice(b"\r\n");
        assert!(!HeadScan::default().complete(&head[..lines]));
        assert_eq!(ends_after(&head, lines), Some(2));
    }

    #[test]
    fn only_plain_stream_gets_are_taken() {
        let ok = b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(stream_request(ok, 65536).is_some());
        assert!(stream_request(b"GET /events/ HTTP/1.1\r\n\r\n", 65536).is_some());
        for other in [
            &b"POST /.well-known/mercure HTTP/1.1\r\n\r\n"[..],
            b"GET /.well-known/mercure?topic=a HTTP/1.0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET /.well-known/mercure/subscriptions HTTP/1.1\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nX: \xff\x00\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\n",
            b"\x00\x01garbage\r\n\r\n",
        ] {
            assert!(
                stream_request(other, 65536).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        assert!(stream_request(ok, 10).is_none(), "head over the limit");
        let close = b"GET /events/ HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n";
        assert!(stream_request(close, 65536).unwrap().1);
        assert!(!stream_request(ok, 65536).unwrap().1);
    }

    #[test]
    fn the_head_size_limit_counts_the_parsed_head() {
        // Bare LF and no space after the colons: 60 lines of 1,000 bytes, 2 more each as
        // counted, and the request line's target only.
        let mut head = b"GET /events/ HTTP/1.1\n".to_vec();
        for i in 0..60 {
            head.extend_from_slice(format!("X-{i:02}:{}\n", "v".repeat(994)).as_bytes());
        }
        head.push(b'\n');
        let counted = "/events/".len() + 60 * 1002;
        assert_eq!(head.len(), 22 + 60 * 1000 + 1);
        assert!(stream_request(&head, counted).is_some());
        assert!(stream_request(&head, counted - 1).is_none());
    }
}
