//! `application/x-www-form-urlencoded`, as publish bodies and query strings use it.
//!
//! Strict where the common parsers are lenient: a malformed percent escape or bytes that are
//! not UTF-8 after decoding are errors, not silently replaced characters, because a hub that
//! quietly rewrites a publisher's data has lost it.

use std::borrow::Cow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    #[error("malformed form: bad percent escape")]
    BadEscape,
    #[error("malformed form: a name or value is not valid UTF-8")]
    NotUtf8,
    #[error("too many parameters (at most {0})")]
    TooMany(usize),
}

/// Decodes `input` into name/value pairs in order. At most `max_pairs` pairs.
pub fn parse(input: &[u8], max_pairs: usize) -> Result<Vec<(String, String)>, FormError> {
    let mut out = Vec::new();
    for part in input.split(|&b| b == b'&') {
        if part.is_empty() {
            continue;
        }
        if out.len() == max_pairs {
            return Err(FormError::TooMany(max_pairs));
        }
        let (name, value) = match part.iter().position(|&b| b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &b""[..]),
        };
        out.push((decode(name)?, decode(value)?));
    }
    Ok(out)
}

fn decode(raw: &[u8]) -> Result<String, FormError> {
    let mut bytes: Cow<[u8]> = Cow::Borrowed(raw);
    if raw.iter().any(|&b| b == b'+' || b == b'%') {
        let mut v = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'+' => {
                    v.push(b' ');
                    i += 1;
                }
                b'%' => {
                    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
                    match (hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
                        (Some(h), Some(l)) => v.push((h * 16 + l) as u8),
                        _ => return Err(FormError::BadEscape),
                    }
                    i += 3;
                }
                b => {
                    v.push(b);
                    i += 1;
                }
            }
        }
        bytes = Cow::Owned(v);
    }
    match bytes {
        Cow::Borrowed(b) => std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FormError::NotUtf8),
        Cow::Owned(v) => String::from_utf8(v).map_err(|_| FormError::NotUtf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes() {
        let p = parse(b"topic=a%2Fb&topic=c&data=x+y%0A&private", 10).unwrap();
        assert_eq!(
            p,
            vec![
                ("topic".into(), "a/b".into()),
                ("topic".into(), "c".into()),
                ("data".into(), "x y\n".into()),
                ("private".into(), "".into())
            ]
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(parse(b"a=%zz", 10), Err(FormError::BadEscape));
        assert_eq!(parse(b"a=%4", 10), Err(FormError::BadEscape));
        assert_eq!(parse(b"a=%ff", 10), Err(FormError::NotUtf8));
        assert_eq!(parse(b"a=\xff", 10), Err(FormError::NotUtf8));
        assert_eq!(parse(b"a&b&c", 2), Err(FormError::TooMany(2)));
    }
}
