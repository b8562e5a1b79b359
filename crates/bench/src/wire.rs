//! Just enough HTTP/1.1 for the load generator: a response head (read with `httparse`) and the
//! chunked transfer-coding, decoded by hand so that a subscriber costs the bench one socket, one small
//! buffer and one parser, and the figures measure the server rather than an HTTP client.

use ssehub_sse::{Event, Parser};

/// The longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the server closed the connection before a whole response head")]
    Closed,
    #[error("the response head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("the response head is not HTTP/1.x: {0}")]
    BadHead(String),
    #[error("bad chunked encoding")]
    BadChunk,
    #[error("the server closed the connection in the middle of a response body")]
    ClosedMidBody,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Chunked,
    Length(u64),
    UntilClose,
}

#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub body: BodyKind,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Header fields read without an allocation; a head with more is read again with room for
/// as many fields as it has lines.
const MAX_HEADERS: usize = 64;

/// Parses the response head at the start of `buf`: `None` while it is incomplete, otherwise
/// the head and its length (the index just past the blank line).
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, WireError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => {
            // Rare (a head is at most `MAX_HEAD` bytes): a field per line at the most.
            let lines = buf.iter().filter(|&&b| b == b'\n').count();
            let mut headers = vec![httparse::EMPTY_HEADER; lines];
            let mut response = httparse::Response::new(&mut headers);
            let parsed = response.parse(buf);
            read_head_fields(buf, &response, parsed)
        }
        parsed => read_head_fields(buf, &response, parsed),
    }
}

/// What httparse made of the head at the start of `buf`, as the bench needs it.
fn read_head_fields(
    buf: &[u8],
    response: &httparse::Response<'_, '_>,
    parsed: httparse::Result<usize>,
) -> Result<Option<(Head, usize)>, WireError> {
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            let first = buf
                .split(|&b| b == b'\r' || b == b'\n')
                .next()
                .unwrap_or_default();
            let first: String = String::from_utf8_lossy(first).chars().take(80).collect();
            return Err(WireError::BadHead(format!("{e}: {first:?}")));
        }
    };
    let status = response.code.unwrap_or_default();
    let mut body = BodyKind::UntilClose;
    let mut close = response.version == Some(0);
    for h in response.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("transfer-encoding") && value.ends_with("chunked") {
            body = BodyKind::Chunked;
        } else if h.name.eq_ignore_ascii_case("content-length") && body != BodyKind::Chunked {
            let n = value.parse().map_err(|_| {
                WireError::BadHead(format!("Content-Length is not a number: {value:?}"))
            })?;
            body = BodyKind::Length(n);
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.contains("close");
        }
    }
    if status == 204 || status == 304 {
        body = BodyKind::Length(0);
    }
    let head = Head {
        status,
        body,
        close,
    };
    Ok(Some((head, len)))
}

/// Reads from `read` into `buf` until a whole head is there; returns the head and leaves the
/// bytes after it at the front of `buf`.
pub async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Head, WireError> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some((head, len)) = parse_head(buf)? {
            buf.drain(..len);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD {
            return Err(WireError::HeadTooLong);
        }
        let mut chunk = [0u8; 4096];
        let n = read.read(&mut chunk).await?;
        if n == 0 {
            return Err(WireError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads the body that follows `head` and returns it, leaving any bytes after it in `buf` (the
/// start of the next response on a kept-alive connection). A body delimited by the end of the
/// connection is read to that end.
pub async fn read_body<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut Vec<u8>,
    kind: BodyKind,
) -> Result<Vec<u8>, WireError> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let mut body = Vec::new();
    match kind {
        BodyKind::Length(n) => {
            let n = usize::try_from(n).map_err(|_| WireError::ClosedMidBody)?;
            while buf.len() < n {
                let r = read.read(&mut chunk).await?;
                if r == 0 {
                    return Err(WireError::ClosedMidBody);
                }
                buf.extend_from_slice(&chunk[..r]);
            }
            body.extend(buf.drain(..n));
        }
        BodyKind::Chunked => {
            let mut decoder = Chunked::default();
            loop {
                let (used, ended) = decoder.decode(buf, &mut body)?;
                buf.drain(..used);
                if ended {
                    break;
                }
                let r = read.read(&mut chunk).await?;
                if r == 0 {
                    return Err(WireError::ClosedMidBody);
                }
                buf.extend_from_slice(&chunk[..r]);
            }
        }
        BodyKind::UntilClose => {
            body.append(buf);
            loop {
                let r = read.read(&mut chunk).await?;
                if r == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..r]);
            }
        }
    }
    Ok(body)
}

/// A subscriber's response body as events: undoes the chunked transfer-coding when the server
/// used it, then parses the event stream.
#[derive(Debug)]
pub struct EventBody {
    chunked: Option<Chunked>,
    parser: Parser,
    /// The event-stream bytes of the latest read, kept to reuse the allocation.
    plain: Vec<u8>,
}

impl EventBody {
    pub fn new(kind: BodyKind) -> EventBody {
        EventBody {
            chunked: (kind == BodyKind::Chunked).then(Chunked::default),
            parser: Parser::new(),
            plain: Vec::with_capacity(4096),
        }
    }

    /// Feeds bytes as read from the connection and appends the events they complete to
    /// `events`. Returns true when the body has ended (the last chunk was seen).
    pub fn feed(&mut self, bytes: &[u8], events: &mut Vec<Event>) -> Result<bool, WireError> {
        self.plain.clear();
        let ended = match &mut self.chunked {
            Some(d) => d.decode(bytes, &mut self.plain)?.1,
            None => {
                self.plain.extend_from_slice(bytes);
                false
            }
        };
        // A parser made without a line limit never refuses input.
        let _ = self.parser.feed(&self.plain, events);
        Ok(ended)
    }
}

/// An incremental decoder for `Transfer-Encoding: chunked`.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeValue(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// The last chunk was seen; trailers and the final CRLF are skipped.
    Done,
}

impl Chunked {
    /// Decodes `input`, appending payload bytes to `out`. Returns how many bytes of `input`
    /// were consumed (all of them unless the body ended) and whether the body ended.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), WireError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Size | ChunkState::SizeValue(_) => {
                    let acc = match self.state {
                        ChunkState::SizeValue(v) => Some(v),
                        _ => None,
                    };
                    match (b as char).to_digit(16) {
                        Some(d) => {
                            let v = acc.unwrap_or(0);
                            if v > u64::MAX >> 8 {
                                return Err(WireError::BadChunk);
                            }
                            ChunkState::SizeValue(v * 16 + u64::from(d))
                        }
                        None => match (acc, b) {
                            (Some(v), b';' | b' ' | b'\t') => ChunkState::Extension(v),
                            (Some(v), b'\r') => ChunkState::SizeLf(v),
                            _ => return Err(WireError::BadChunk),
                        },
                    }
                }
                ChunkState::Extension(v) => match b {
                    b'\r' => ChunkState::SizeLf(v),
                    _ => ChunkState::Extension(v),
                },
                ChunkState::SizeLf(v) => match (b, v) {
                    (b'\n', 0) => ChunkState::Done,
                    (b'\n', v) => ChunkState::Data(v),
                    _ => return Err(WireError::BadChunk),
                },
                ChunkState::Data(rem) => {
                    let take = rem.min((input.len() - i) as u64) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    let rem = rem - take as u64;
                    self.state = if rem == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(rem)
                    };
                    continue;
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => ChunkState::Size,
                ChunkState::DataCr | ChunkState::DataLf => return Err(WireError::BadChunk),
                ChunkState::Done => return Ok((i, true)),
            };
            i += 1;
        }
        Ok((i, self.state == ChunkState::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_in_every_split() {
        let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for piece in 1..input.len() {
            let mut d = Chunked::default();
            let mut out = Vec::new();
            let mut ended = false;
            for c in input.chunks(piece) {
                let (_, e) = d.decode(c, &mut out).unwrap();
                ended |= e;
            }
            assert_eq!(out, b"hello, world", "piece {piece}");
            assert!(ended);
        }
    }

    #[test]
    fn head() {
        let complete = |bytes: &[u8]| parse_head(bytes).unwrap().unwrap();
        let (h, len) = complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nbody");
        assert_eq!((h.status, h.body, h.close), (200, BodyKind::Chunked, false));
        assert_eq!(len, 47);
        let (h, _) =
            complete(b"HTTP/1.1 202 Accepted\r\ncontent-length: 12\r\nConnection: close\r\n\r\n");
        assert_eq!(
            (h.status, h.body, h.close),
            (202, BodyKind::Length(12), true)
        );
        let (h, _) = complete(b"HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!((h.body, h.close), (BodyKind::UntilClose, true));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }

    /// A head is read whatever the number of its fields, as long as it fits in `MAX_HEAD` (as
    /// before the bench used httparse): a server or a proxy in front of it may send many, and
    /// the bench must not take such a response as malformed.
    #[test]
    fn a_head_with_many_fields_is_read() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..100 {
            head.extend_from_slice(format!("X-Field-{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        let (h, len) = parse_head(&head).unwrap().expect("a whole head");
        assert_eq!(
            (h.status, h.body, len),
            (200, BodyKind::Chunked, head.len())
        );
        assert!(
            parse_head(&head[..head.len() - 30]).unwrap().is_none(),
            "not yet whole"
        );
    }

    #[tokio::test]
    async fn bodies_of_every_kind() {
        let mut buf = b"hel".to_vec();
        let mut rest: &[u8] = b"lo, world\r\nHTTP/1.1";
        let body = read_body(&mut rest, &mut buf, BodyKind::Length(12)).await;
        assert_eq!(body.unwrap(), b"hello, world");
        assert_eq!(buf, b"\r\nHTTP/1.1");

        let mut buf = Vec::new();
        let mut rest: &[u8] = b"5\r\nhello\r\n0\r\n\r\nnext";
        let body = read_body(&mut rest, &mut buf, BodyKind::Chunked).await;
        assert_eq!(body.unwrap(), b"hello");

        let mut buf = b"a".to_vec();
        let mut rest: &[u8] = b"ll of it";
        let body = read_body(&mut rest, &mut buf, BodyKind::UntilClose).await;
        assert_eq!(body.unwrap(), b"all of it");

        let mut rest: &[u8] = b"short";
        let body = read_body(&mut rest, &mut Vec::new(), BodyKind::Length(10)).await;
        assert!(matches!(body, Err(WireError::ClosedMidBody)));
    }

    #[test]
    fn events_through_chunks() {
        let mut body = EventBody::new(BodyKind::Chunked);
        let mut events = Vec::new();
        assert!(!body.feed(b"d\r\nid: 1\ndata: a\r\n", &mut events).unwrap());
        assert!(events.is_empty());
        assert!(!body.feed(b"2\r\n\n\n\r\n", &mut events).unwrap());
        assert_eq!((events[0].id.as_str(), events[0].data.as_str()), ("1", "a"));
        assert!(body.feed(b"0\r\n\r\n", &mut events).unwrap());
    }
}
