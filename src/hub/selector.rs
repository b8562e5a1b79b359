//! Topic selectors: `*`, exact strings and URI templates (RFC 6570), as Mercure defines them.
//!
//! A template is compiled once into a `regex` (linear time, so no hostile selector can make
//! matching blow up) and shared through [`SelectorCache`]. Exact selectors are not matched at
//! all: the hub indexes them by topic.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use regex::Regex;

/// The longest selector or topic the hub accepts, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// The most URI template expressions (`{…}`) one subscription may hold across its topics.
/// Compiled templates cost memory (≈ 1 KiB an expression) and every publish tests them one by
/// one, so an anonymous request must not bring thousands; real subscriptions use a few.
pub const MAX_TEMPLATE_EXPRESSIONS: usize = 64;

/// The template expressions `selectors` would compile, counted before compiling anything
/// (every `{` counts: a string with braces that is no valid template counts too).
pub fn template_expressions<S: AsRef<str>>(selectors: &[S]) -> usize {
    selectors
        .iter()
        .map(|s| s.as_ref().bytes().filter(|&b| b == b'{').count())
        .sum()
}

/// One compiled topic selector.
#[derive(Debug, Clone)]
pub enum Selector {
    /// `*`: every topic.
    Any,
    /// A string that matches only itself.
    Exact(String),
    /// A URI template; it matches itself as a string too.
    Template { source: String, regex: Regex },
}

impl Selector {
    /// Compiles a selector. Strings that are not valid URI templates are exact selectors,
    /// as in the reference hub.
    pub fn compile(s: &str) -> Selector {
        if s == "*" {
            return Selector::Any;
        }
        if s.contains('{') {
            if let Some(regex) = template_regex(s) {
                return Selector::Template {
                    source: s.to_owned(),
                    regex,
                };
            }
        }
        Selector::Exact(s.to_owned())
    }

    /// The selector as the subscriber wrote it.
    pub fn as_str(&self) -> &str {
        match self {
            Selector::Any => "*",
            Selector::Exact(s) => s,
            Selector::Template { source, .. } => source,
        }
    }

    /// For a template, its text before the first `{`: every topic it matches starts with it.
    pub fn literal_prefix(&self) -> Option<&str> {
        match self {
            Selector::Template { source, .. } => source.split('{').next(),
            _ => None,
        }
    }

    pub fn is_template(&self) -> bool {
        matches!(self, Selector::Template { .. })
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Selector::Any => true,
            Selector::Exact(s) => s == topic,
            Selector::Template { source, regex } => source == topic || regex.is_match(topic),
        }
    }

    /// True when any of `topics` matches.
    pub fn matches_any<S: AsRef<str>>(&self, topics: &[S]) -> bool {
        topics.iter().any(|t| self.matches(t.as_ref()))
    }
}

/// True when one of `selectors` matches one of `topics`.
pub fn any_matches<S: AsRef<str>>(selectors: &[Arc<Selector>], topics: &[S]) -> bool {
    selectors.iter().any(|s| s.matches_any(topics))
}

/// Compiled selectors, shared: a template used by ten thousand subscribers is compiled once.
/// Bounded: when full it starts over, which costs only recompilation.
#[derive(Default)]
pub struct SelectorCache {
    map: Mutex<HashMap<String, Arc<Selector>>>,
}

const CACHE_CAPACITY: usize = 10_000;

impl SelectorCache {
    pub fn get(&self, s: &str) -> Arc<Selector> {
        // Only templates are worth sharing: an exact selector costs its string either way, and
        // caching it would keep every topic ever subscribed to after its subscribers left.
        if !s.contains('{') {
            return Arc::new(Selector::compile(s));
        }
        if let Some(sel) = self.map.lock().get(s) {
            return sel.clone();
        }
        // Compile outside the lock: a large template must not stall other subscribers.
        let sel = Arc::new(Selector::compile(s));
        let mut map = self.map.lock();
        if map.len() >= CACHE_CAPACITY {
            map.clear();
        }
        map.entry(s.to_owned()).or_insert(sel).clone()
    }
}

const UNRESERVED: &str = r"(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})";
const RESERVED: &str = r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})";
const NAME: &str = r"(?:[A-Za-z0-9_.]|%[0-9A-Fa-f]{2})+";

/// Translates an RFC 6570 template into an anchored regular expression, or `None` when the
/// string is not a valid template. Every expression may expand to nothing (an undefined
/// variable), and list values are comma-separated, as the expansion rules allow.
fn template_regex(t: &str) -> Option<Regex> {
    let mut re = String::with_capacity(t.len() * 4 + 2);
    re.push('^');
    let mut rest = t;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return None;
        }
        re.push_str(&regex::escape(&rest[..open]));
        let close = rest[open..].find('}')? + open;
        let expr = &rest[open + 1..close];
        re.push_str(&expression_regex(expr)?);
        rest = &rest[close + 1..];
    }
    re.push_str(&regex::escape(rest));
    re.push('$');
    regex::RegexBuilder::new(&re)
        .size_limit(1 << 20)
        .build()
        .ok()
}

fn expression_regex(expr: &str) -> Option<String> {
    let (op, vars) = match expr.chars().next()? {
        c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&') => (Some(c), &expr[1..]),
        '=' | ',' | '!' | '@' | '|' => return None,
        _ => (None, expr),
    };
    if vars.is_empty() {
        return None;
    }
    for var in vars.split(',') {
        let name = var.strip_suffix('*').unwrap_or(var);
        let name = match name.split_once(':') {
            Some((n, len)) => {
                if len.is_empty() || len.len() > 4 || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                n
            }
            None => name,
        };
        if name.is_empty() || !valid_varname(name) {
            return None;
        }
    }
    let u = UNRESERVED;
    let r = RESERVED;
    Some(match op {
        None => format!("(?:{u}|,)*"),
        Some('+') => format!("{r}*"),
        Some('#') => format!("(?:#{r}*)?"),
        Some('.') => format!(r"(?:\.(?:{u}|,)*)*"),
        Some('/') => format!("(?:/(?:{u}|,)*)*"),
        Some(';') => format!("(?:;{NAME}(?:=(?:{u}|,)*)?)*"),
        Some('?') => format!(r"(?:\?{NAME}=(?:{u}|,)*(?:&{NAME}=(?:{u}|,)*)*)?"),
        Some('&') => format!("(?:&{NAME}=(?:{u}|,)*)*"),
        Some(_) => return None,
    })
}

fn valid_varname(name: &str) -> bool {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' => i += 1,
            b'%' if b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit) =>
            {
                i += 3
            }
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert!(matches!(Selector::compile("*"), Selector::Any));
        assert!(matches!(Selector::compile("a/b"), Selector::Exact(_)));
        assert!(matches!(Selector::compile("a/{b"), Selector::Exact(_)));
        assert!(matches!(Selector::compile("a/{!b}"), Selector::Exact(_)));
        assert!(matches!(
            Selector::compile("a/{b}"),
            Selector::Template { .. }
        ));
    }

    #[test]
    fn matching_table() {
        #[rustfmt::skip]
        let table: &[(&str, &str, bool)] = &[
            ("*", "anything at all", true),
            ("*", "", true),
            ("https://example.com/books/1", "https://example.com/books/1", true),
            ("https://example.com/books/1", "https://example.com/books/12", false),
            ("https://example.com/books/1", "https://example.com/books/1/", false),
            ("https://example.com/books/{id}", "https://example.com/books/1", true),
            ("https://example.com/books/{id}", "https://example.com/books/abc-._~", true),
            ("https://example.com/books/{id}", "https://example.com/books/caf%C3%A9", true),
            ("https://example.com/books/{id}", "https://example.com/books/1/reviews", false),
            ("https://example.com/books/{id}", "https://example.com/books/a%2Fb", true),
            ("https://example.com/books/{id}", "https://example.com/books/a?b", false),
            ("https://example.com/books/{id}", "https://example.com/books/{id}", true),
            ("https://example.com/books/{id}", "https://example.org/books/1", false),
            ("https://example.com/books/{id}", "http://example.com/books/1", false),
            ("https://example.com/books/{id}/reviews/{rid}", "https://example.com/books/1/reviews/2", true),
            ("https://example.com/books/{id}/reviews/{rid}", "https://example.com/books/1/reviews", false),
            ("https://example.com/{+path}", "https://example.com/books/1/reviews", true),
            ("https://example.com/{+path}", "https://example.com/a?b=c#d", true),
            ("https://example.com/books{/id}", "https://example.com/books/1", true),
            ("https://example.com/books{/id}", "https://example.com/books", true),
            ("https://example.com/books{/id*}", "https://example.com/books/1/2/3", true),
            ("https://example.com/books{?page}", "https://example.com/books?page=2", true),
            ("https://example.com/books{?page}", "https://example.com/books", true),
            ("https://example.com/books{?page,size}", "https://example.com/books?page=2&size=10", true),
            ("https://example.com/books{?page}", "https://example.com/books?page=2/3", false),
            ("https://example.com/books{?page}{&size}", "https://example.com/books?page=2&size=3", true),
            ("https://example.com/books{#frag}", "https://example.com/books#top", true),
            ("https://example.com/books{#frag}", "https://example.com/booksx", false),
            ("https://example.com/{a,b}", "https://example.com/1,2", true),
            ("https://example.com/x{.ext}", "https://example.com/x.json", true),
            ("https://example.com/x{;p}", "https://example.com/x;p=1", true),
            ("https://example.com/{id:3}", "https://example.com/abc", true),
            ("a.b{id}", "aXb1", false),
            ("https://example.com/{unclosed", "https://example.com/{unclosed", true),
            ("https://example.com/{unclosed", "https://example.com/x", false),
            ("https://example.com/{!bad}", "https://example.com/x", false),
            ("https://example.com/{!bad}", "https://example.com/{!bad}", true),
            ("{x}", "", true),
        ];
        assert!(table.len() >= 30);
        for (selector, topic, expected) in table {
            let sel = Selector::compile(selector);
            assert_eq!(sel.matches(topic), *expected, "{selector} vs {topic}");
        }
    }

    #[test]
    fn hostile_templates_stay_linear() {
        // Many expressions against a long topic: the regex engine does not backtrack, so this
        // ends at once; a template too large to compile falls back to an exact selector.
        let sel = Selector::compile(&"{a}{+b}{/c*}".repeat(50));
        let topic = "a/".repeat(2000) + "!";
        let _ = sel.matches(&topic);
        let huge = Selector::compile(&"{x}".repeat(10_000));
        assert!(!huge.matches("y"));
    }
}
