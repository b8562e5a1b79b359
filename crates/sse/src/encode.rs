//! Turns one update into the bytes every subscriber receives.

use bytes::{BufMut, Bytes, BytesMut};

/// The comment sent as soon as a stream opens, so that headers flush and `onopen` fires.
pub const OPENING: &[u8] = b":\n";

/// The comment sent on idle streams to keep proxies from timing them out.
pub const HEARTBEAT: &[u8] = b":\n";

/// Encodes one event in the field order the Mercure reference hub uses:
/// `event:`, `retry:`, `id:`, then one `data:` line per line of `data`. A retry of 0 is no
/// retry field (the protocol sends one only when it is not 0).
///
/// `id` and `event_type` must already be free of CR, LF and NUL (the publish path rejects them);
/// `data` may contain any line breaks: CRLF, CR and LF each start a new `data:` line, which is
/// how a browser will join them back (with LF).
pub fn encode_event(id: &str, event_type: Option<&str>, retry: Option<u64>, data: &str) -> Bytes {
    debug_assert!(!id.contains(['\r', '\n', '\0']));
    let mut out = BytesMut::with_capacity(data.len() + id.len() + 32);
    if let Some(t) = event_type {
        out.put_slice(b"event: ");
        out.put_slice(t.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(ms) = retry.filter(|&ms| ms != 0) {
        out.put_slice(b"retry: ");
        out.put_slice(ms.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"id: ");
    out.put_slice(id.as_bytes());
    out.put_u8(b'\n');
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                put_data_line(&mut out, &bytes[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                put_data_line(&mut out, &bytes[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    put_data_line(&mut out, &bytes[start..]);
    out.put_u8(b'\n');
    out.freeze()
}

fn put_data_line(out: &mut BytesMut, line: &[u8]) {
    out.put_slice(b"data: ");
    out.put_slice(line);
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_order_and_line_splitting() {
        let b = encode_event("urn:x", Some("ping"), Some(3000), "a\r\nb\rc\nd");
        assert_eq!(
            &b[..],
            b"event: ping\nretry: 3000\nid: urn:x\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn a_retry_of_zero_is_not_sent() {
        assert_eq!(
            &encode_event("u", None, Some(0), "x")[..],
            b"id: u\ndata: x\n\n"
        );
    }

    #[test]
    fn empty_data_is_one_empty_line() {
        assert_eq!(&encode_event("1", None, None, "")[..], b"id: 1\ndata: \n\n");
    }

    #[test]
    fn trailing_newline_gives_trailing_empty_line() {
        assert_eq!(
            &encode_event("1", None, None, "x\n")[..],
            b"id: 1\ndata: x\ndata: \n\n"
        );
    }
}
