//! An incremental parser for `text/event-stream`, as the WHATWG HTML standard describes it.
//!
//! Written here rather than taken from a crate because the client, the benchmark and the tests
//! all need one that accepts bytes in arbitrary pieces (a CR at the end of one read and its LF at
//! the start of the next is one line break), keeps no more than one partial line, and reports
//! the last event id exactly as a browser would. It is checked against `eventsource-stream`.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field, empty when none was given (a browser then says `message`).
    pub event_type: String,
    /// The data lines joined with LF.
    pub data: String,
    /// The last event id in force when this event was dispatched.
    pub id: String,
    /// A `retry:` field seen since the previous event, in milliseconds.
    pub retry: Option<u64>,
}

/// Feed it bytes with [`Parser::feed`]; it returns whole events as they complete.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The previous chunk ended in CR: an LF at the start of the next one belongs to it.
    after_cr: bool,
    started: bool,
    data: String,
    has_data: bool,
    event_type: String,
    last_id: String,
    retry: Option<u64>,
    /// Comment lines seen, counted for heartbeat checks.
    pub comments: u64,
    max_line: usize,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that refuses to hold a partial line longer than `max` bytes.
    pub fn with_max_line(max: usize) -> Self {
        Parser {
            max_line: max,
            ..Self::default()
        }
    }

    /// The last event id as a browser would send it in `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_id
    }

    /// Parses `chunk`, appending complete events to `out`.
    /// Errors only when a line is longer than the limit set with [`Parser::with_max_line`].
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<Event>) -> Result<(), LineTooLong> {
        // A CR that ended the previous chunk may be the first half of a CRLF: the next byte
        // decides, so an empty chunk leaves the question open.
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(chunk);
                    if self.max_line > 0 && self.line.len() > self.max_line {
                        return Err(LineTooLong);
                    }
                    return Ok(());
                }
                Some(i) => {
                    self.line.extend_from_slice(&chunk[..i]);
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, out);
                    self.line = line;
                    self.line.clear();
                    if chunk[i] == b'\r' {
                        if i + 1 == chunk.len() {
                            self.after_cr = true;
                            chunk = &[];
                        } else if chunk[i + 1] == b'\n' {
                            chunk = &chunk[i + 2..];
                        } else {
                            chunk = &chunk[i + 1..];
                        }
                    } else {
                        chunk = &chunk[i + 1..];
                    }
                }
            }
        }
        Ok(())
    }

    fn process_line(&mut self, mut line: &[u8], out: &mut Vec<Event>) {
        if !self.started {
            self.started = true;
            if let Some(rest) = line.strip_prefix("\u{feff}".as_bytes()) {
                line = rest;
            }
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match name {
            b"event" => self.event_type = value.into_owned(),
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
                self.has_data = true;
            }
            b"id" if !value.contains('\0') => self.last_id = value.into_owned(),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        if !self.has_data {
            self.event_type.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        self.has_data = false;
        out.push(Event {
            event_type: std::mem::take(&mut self.event_type),
            data,
            id: self.last_id.clone(),
            retry: self.retry.take(),
        });
    }
}

/// A line exceeded the parser's limit.
#[derive(Debug, thiserror::Error)]
#[error("an event-stream line is longer than the limit")]
pub struct LineTooLong;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<Event> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in input.chunks(piece.max(1)) {
            p.feed(c, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn an_empty_read_between_cr_and_lf_keeps_them_one_line_break() {
        // Found by the property test against the oracle (tests/sse_roundtrip.rs).
        let mut p = Parser::new();
        let mut out = Vec::new();
        for chunk in [&b"data: a\r"[..], b"", b"\ndata: b\n\n"] {
            p.feed(chunk, &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, "a\nb");
    }

    #[test]
    fn crlf_split_across_reads() {
        let input = b"id: 1\r\ndata: a\r\ndata: b\r\n\r\n:hb\r\nid: 2\rdata: c\r\r";
        for n in 1..input.len() {
            let ev = parse_in_pieces(input, n);
            assert_eq!(ev.len(), 2, "piece size {n}");
            assert_eq!(ev[0].data, "a\nb");
            assert_eq!(ev[0].id, "1");
            assert_eq!(ev[1].data, "c");
            assert_eq!(ev[1].id, "2");
        }
    }

    #[test]
    fn fields_and_bom() {
        let ev = parse_in_pieces("\u{feff}event: x\nretry: 50\ndata\n\n".as_bytes(), 3);
        assert_eq!(
            ev,
            vec![Event {
                event_type: "x".into(),
                data: "".into(),
                id: "".into(),
                retry: Some(50)
            }]
        );
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        assert!(parse_in_pieces(b"event: x\n\n", 100).is_empty());
    }
}
