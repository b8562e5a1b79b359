//! Topic selectors: `*`, exact strings and URI templates (RFC 6570), as Mercure defines them.
//!
//! A template is compiled once into an automaton that runs in linear time (no hostile selector
//! can make matching blow up) and shared through [`SelectorCache`], which keeps the compiled
//! templates within a byte budget (`--template-memory`): a compiled template is the hub's
//! costliest per-subscriber object, and anonymous clients choose them. Exact selectors are not
//! matched at all: the hub indexes them by topic.
//!
//! What a template costs, measured (`tests/template_memory.rs`): its text before the first `{`
//! is compared as a string, so only the rest is compiled, into a Thompson NFA without captures
//! (about 1 KiB per `{?x}` expression, a few hundred bytes for `{x}`) and a lazy DFA whose cache
//! grows as topics are matched, up to a capacity fixed at compile time and charged in full.
//! The `regex` crate, used before, also built a reverse NFA, a one-pass DFA and a lazy DFA cache
//! of up to 2 MiB in each direction for every thread that matched.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::nfa::thompson::pikevm::PikeVM;
use regex_automata::nfa::thompson::{WhichCaptures, NFA};
use regex_automata::{Anchored, Input};

use crate::metrics::Metrics;

/// The longest selector or topic the hub accepts, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// The most URI template expressions (`{…}`) one subscription may hold across its topics.
/// Compiled templates cost memory (see the module's doc: a template of 64 `{?x}` expressions
/// is charged about 230 KiB, one `{x}` about 10 KiB) and a publish may test every one of them, so an anonymous request must not bring
/// thousands; real subscriptions use a few. The token's selectors are not counted here, but
/// they are compiled within `--template-memory` like the others.
pub const MAX_TEMPLATE_EXPRESSIONS: usize = 64;

/// The largest NFA a template compiles to; a larger one is taken as an exact selector.
const NFA_SIZE_LIMIT: usize = 1 << 20;

/// How a matcher's text is read: the parameter or grant it came from decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchType {
    /// Mercure 0.x `topic=` and `mercure` claims: `*`, else an RFC 6570 URI template when the
    /// text is one, else the exact string.
    Topic,
    /// Mercure 1.0 `exact`: `*`, else the exact string (braces are only characters).
    Exact,
    /// Mercure 1.0 `urlpattern`: `*`, else a WHATWG URL Pattern, read against the hub's URL.
    UrlPattern,
}

impl MatchType {
    /// The canonical (lowercase) name of a Mercure 1.0 matcher type, as subscription event
    /// topics and documents spell it; `topic` for the 0.x selector, which has no 1.0 name.
    pub fn name(self) -> &'static str {
        match self {
            MatchType::Topic => "topic",
            MatchType::Exact => "exact",
            MatchType::UrlPattern => "urlpattern",
        }
    }
}

/// The URL relative URL patterns and topics are read against when the hub is given no
/// `--resource-identifier`: only its path matters (the hub's own), so relative patterns match
/// relative topics, absolute ones absolute topics.
pub const DEFAULT_BASE: &str = "https://mercure.invalid/.well-known/mercure";

pub(super) static DEFAULT_BASE_URL: std::sync::LazyLock<url::Url> =
    std::sync::LazyLock::new(|| url::Url::parse(DEFAULT_BASE).expect("a valid URL"));

/// A topic matcher as a subscriber or a token wrote it: its type and its text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Matcher {
    pub kind: MatchType,
    pub pattern: String,
}

impl Matcher {
    /// A 0.x selector (`topic=`, `mercure.subscribe`).
    pub fn topic(pattern: impl Into<String>) -> Matcher {
        Matcher {
            kind: MatchType::Topic,
            pattern: pattern.into(),
        }
    }

    /// A 1.0 `urlpattern` matcher.
    pub fn url_pattern(pattern: impl Into<String>) -> Matcher {
        Matcher {
            kind: MatchType::UrlPattern,
            pattern: pattern.into(),
        }
    }

    /// A 1.0 `exact` matcher.
    pub fn exact(pattern: impl Into<String>) -> Matcher {
        Matcher {
            kind: MatchType::Exact,
            pattern: pattern.into(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn len(&self) -> usize {
        self.pattern.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pattern.is_empty()
    }
}

/// The template expressions `matchers` would compile, counted before compiling anything
/// (every `{` of a 0.x selector counts: a string with braces that is no valid template counts
/// too).
pub fn template_expressions(matchers: &[Matcher]) -> usize {
    matchers
        .iter()
        .filter(|m| m.kind == MatchType::Topic)
        .map(|m| m.pattern.bytes().filter(|&b| b == b'{').count())
        .sum()
}

/// True when `m` is a URI template (checked without compiling it): what
/// `--anonymous-templates false` refuses.
pub fn is_template(m: &Matcher) -> bool {
    m.kind == MatchType::Topic
        && m.pattern
            .find('{')
            .is_some_and(|open| template_pattern(&m.pattern[open..]).is_some())
}

/// True when `m` is a URL pattern other than `*` (what `--anonymous-templates false` refuses
/// with templates: it costs compiled memory as they do).
pub fn is_url_pattern(m: &Matcher) -> bool {
    m.kind == MatchType::UrlPattern && m.pattern != "*"
}

/// One compiled topic selector.
#[derive(Debug)]
pub enum Selector {
    /// `*`: every topic.
    Any,
    /// A string that matches only itself.
    Exact(String),
    /// A URI template; it matches itself as a string too.
    Template(Box<Template>),
    /// A WHATWG URL Pattern.
    UrlPattern(Box<UrlPatternSelector>),
    /// A matcher that cannot match anything: a URL pattern that does not compile, met in a
    /// token (a request's own patterns are checked before they get here).
    Never(String),
}

impl Selector {
    /// Compiles a matcher, URL patterns against [`DEFAULT_BASE`]. 0.x strings that are not
    /// valid URI templates are exact selectors, as in the reference hub.
    pub fn compile(m: &Matcher) -> Selector {
        Selector::compile_with_base(m, &DEFAULT_BASE_URL)
    }

    /// Compiles a matcher, URL patterns against `base` (the hub's URL).
    pub fn compile_with_base(m: &Matcher, base: &url::Url) -> Selector {
        let s = m.pattern.as_str();
        if s == "*" {
            return Selector::Any;
        }
        match m.kind {
            MatchType::Topic => match Template::compile(s) {
                Some(t) => Selector::Template(Box::new(t)),
                None => Selector::Exact(s.to_owned()),
            },
            MatchType::Exact => Selector::Exact(s.to_owned()),
            MatchType::UrlPattern => match UrlPatternSelector::compile(s, base) {
                Some(p) => Selector::UrlPattern(Box::new(p)),
                None => Selector::Never(s.to_owned()),
            },
        }
    }

    /// A 0.x selector, compiled (for tests and tools).
    pub fn topic(s: &str) -> Selector {
        Selector::compile(&Matcher::topic(s))
    }

    /// The selector as the subscriber wrote it.
    pub fn as_str(&self) -> &str {
        match self {
            Selector::Any => "*",
            Selector::Exact(s) => s,
            Selector::Template(t) => &t.source,
            Selector::UrlPattern(p) => &p.source,
            Selector::Never(s) => s,
        }
    }

    /// Where the hub's index finds a compiled selector: a template by its text before the
    /// first `{` (every topic it matches starts with it), a URL pattern by what it fixes of
    /// the topic read as a URL. `None` for the others, which are not tested one by one.
    pub fn index_key(&self) -> Option<IndexKey<'_>> {
        match self {
            Selector::Template(t) => Some(IndexKey::Prefix(t.prefix())),
            Selector::UrlPattern(p) => Some(IndexKey::Url {
                origin: p.origin.as_ref(),
                path_prefix: &p.path_prefix,
            }),
            _ => None,
        }
    }

    pub fn is_template(&self) -> bool {
        matches!(self, Selector::Template(_))
    }

    /// Templates and URL patterns: compiled, kept in the [`SelectorCache`] and charged
    /// against `--template-memory`.
    pub fn is_compiled(&self) -> bool {
        matches!(self, Selector::Template(_) | Selector::UrlPattern(_))
    }

    /// How the matcher it was compiled from is read, for the compiled kinds (URI templates
    /// are 0.x's `topic`): a template and a URL pattern of the same text differ.
    pub fn kind(&self) -> Option<MatchType> {
        match self {
            Selector::Template(_) => Some(MatchType::Topic),
            Selector::UrlPattern(_) => Some(MatchType::UrlPattern),
            _ => None,
        }
    }

    /// The bytes this selector holds against `--template-memory`: nothing but for templates
    /// and URL patterns.
    pub fn cost(&self) -> usize {
        match self {
            Selector::Template(t) => t.cost,
            Selector::UrlPattern(p) => p.cost,
            _ => 0,
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Selector::Any => true,
            Selector::Exact(s) => s == topic,
            Selector::Template(t) => *t.source == *topic || t.is_match(topic),
            Selector::UrlPattern(p) => p.is_match(topic),
            Selector::Never(_) => false,
        }
    }

    /// True when any of `topics` matches.
    pub fn matches_any<S: AsRef<str>>(&self, topics: &[S]) -> bool {
        topics.iter().any(|t| self.matches(t.as_ref()))
    }
}

/// Where a compiled selector is indexed (see [`Selector::index_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKey<'a> {
    /// A URI template: the text every topic it matches starts with.
    Prefix(&'a str),
    /// A URL pattern: the protocol, hostname and port it fixes (`None` when it leaves one of
    /// them open), and the text every pathname it matches starts with, topics read as URLs.
    Url {
        origin: Option<&'a Origin>,
        path_prefix: &'a str,
    },
}

/// The protocol, hostname and port of a URL, as URL patterns compare them: the scheme, the
/// host as the URL parser wrote it (lowercase, punycode), the port or `""` for the scheme's
/// default.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub protocol: Box<str>,
    pub hostname: Box<str>,
    pub port: Box<str>,
}

/// A topic read as a URL against the hub's URL, cut in the components URL patterns match:
/// parsed once per publish, however many patterns it is tested against.
#[derive(Clone, Debug)]
pub struct TopicUrl {
    pub origin: Origin,
    username: Box<str>,
    password: Box<str>,
    pub pathname: Box<str>,
    search: Box<str>,
    hash: Box<str>,
}

impl TopicUrl {
    /// `None` when `topic` is no URL reference: no URL pattern matches it. The components are
    /// those the urlpattern crate takes from a URL it is given (its `parse_match_input`).
    pub fn parse(topic: &str, base: &url::Url) -> Option<TopicUrl> {
        let url = url::Url::options().base_url(Some(base)).parse(topic).ok()?;
        Some(TopicUrl {
            origin: Origin {
                protocol: url.scheme().into(),
                hostname: url.host_str().unwrap_or_default().into(),
                port: url::quirks::port(&url).into(),
            },
            username: url.username().into(),
            password: url.password().unwrap_or_default().into(),
            pathname: url::quirks::pathname(&url).into(),
            search: url.query().unwrap_or_default().into(),
            hash: url.fragment().unwrap_or_default().into(),
        })
    }

    /// Its length in bytes, all components together: what testing a pattern against it reads
    /// at most.
    pub fn len(&self) -> usize {
        let o = &self.origin;
        o.protocol.len()
            + o.hostname.len()
            + o.port.len()
            + self.username.len()
            + self.password.len()
            + self.pathname.len()
            + self.search.len()
            + self.hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True when one of `selectors` matches one of `topics`.
pub fn any_matches<S: AsRef<str>>(selectors: &[Arc<Selector>], topics: &[S]) -> bool {
    selectors.iter().any(|s| s.matches_any(topics))
}

/// A compiled WHATWG URL Pattern (Mercure 1.0 `urlpattern`). Its components' regular
/// expressions run on [`BoundedRegex`]: linear time, and memory known and capped, as for
/// templates (on the `regex` crate, the urlpattern crate's default, one pattern of 200 `(\w)`
/// groups took 22 MB compiled and 840 MB once matched, `tests/template_memory.rs`).
pub struct UrlPatternSelector {
    source: String,
    pattern: urlpattern::UrlPattern<BoundedRegex>,
    /// The hub's URL, that topics are read against.
    base: url::Url,
    /// The protocol, hostname and port every URL it matches has, when it fixes all three.
    origin: Option<Origin>,
    /// The text every pathname it matches starts with.
    path_prefix: String,
    /// What it is charged against `--template-memory`: its regexes, their caches at full
    /// size, and its text.
    cost: usize,
}

/// The largest NFA one component of a URL pattern compiles to; larger is no valid pattern
/// (a request's is refused with 400). A pattern has at most eight components, each compiled
/// twice by the urlpattern crate.
const URL_PATTERN_NFA_LIMIT: usize = 128 << 10;

/// A regular expression for the urlpattern crate, as a template is compiled: an NFA without
/// captures within [`URL_PATTERN_NFA_LIMIT`], a lazy DFA with a cache of fixed capacity, and
/// the PikeVM for the searches the DFA gives up on. Matching answers whether the component
/// matches, not what its groups captured (the hub tests patterns, it never reads groups):
/// every group is reported as not participating.
pub struct BoundedRegex {
    source: String,
    groups: usize,
    automaton: Automaton,
    /// The heap it may take, its cache at full capacity included.
    heap: usize,
}

impl urlpattern::regexp::RegExp for BoundedRegex {
    fn syntax() -> urlpattern::RegexSyntax {
        urlpattern::RegexSyntax::Rust
    }

    fn parse(pattern: &str, _flags: &str, _force_eval: bool) -> Result<Self, ()> {
        BoundedRegex::compile(pattern).ok_or(())
    }

    fn matches<'a>(&self, text: &'a str) -> Option<Vec<Option<&'a str>>> {
        self.is_match(text).then(|| vec![None; self.groups])
    }

    fn pattern_string(&self) -> &str {
        &self.source
    }
}

impl BoundedRegex {
    fn compile(pattern: &str) -> Option<BoundedRegex> {
        let mut ast = regex_syntax::ast::parse::Parser::new()
            .parse(pattern)
            .ok()?;
        js_classes(&mut ast);
        let hir = regex_syntax::hir::translate::Translator::new()
            .translate(pattern, &ast)
            .ok()?;
        let groups = hir.properties().explicit_captures_len();
        let nfa = NFA::compiler()
            .configure(
                NFA::config()
                    .which_captures(WhichCaptures::None)
                    .nfa_size_limit(Some(URL_PATTERN_NFA_LIMIT)),
            )
            .build_from_hir(&hir)
            .ok()?;
        let automaton = Automaton::build(nfa)?;
        Some(BoundedRegex {
            source: pattern.to_owned(),
            groups,
            heap: std::mem::size_of::<BoundedRegex>() + 2 * pattern.len() + automaton.heap,
            automaton,
        })
    }

    fn is_match(&self, text: &str) -> bool {
        self.automaton
            .is_match(Input::new(text).anchored(Anchored::Yes))
    }
}

/// Gives `\w`, `\d` and `\s` (and their negations) their JavaScript meaning, as browsers match
/// URL patterns: `\w` and `\d` are ASCII there, and `\s` is JavaScript's whitespace (close to
/// Unicode's, with U+FEFF and without U+0085). Unicode's `\w` is some 800 ranges of code
/// points: `(\w{20})` alone would pass the NFA bound, and it would match what no browser does.
fn js_classes(ast: &mut regex_syntax::ast::Ast) {
    use regex_syntax::ast::{Ast, ClassBracketed, ClassSet};
    match ast {
        Ast::ClassPerl(p) => {
            let item = js_class(p);
            *ast = Ast::ClassBracketed(Box::new(ClassBracketed {
                span: p.span,
                negated: false,
                kind: ClassSet::Item(item),
            }));
        }
        Ast::ClassBracketed(c) => js_class_set(&mut c.kind),
        Ast::Repetition(r) => js_classes(&mut r.ast),
        Ast::Group(g) => js_classes(&mut g.ast),
        Ast::Alternation(a) => a.asts.iter_mut().for_each(js_classes),
        Ast::Concat(c) => c.asts.iter_mut().for_each(js_classes),
        _ => {}
    }
}

fn js_class_set(set: &mut regex_syntax::ast::ClassSet) {
    use regex_syntax::ast::ClassSet;
    match set {
        ClassSet::Item(item) => js_class_item(item),
        ClassSet::BinaryOp(op) => {
            js_class_set(&mut op.lhs);
            js_class_set(&mut op.rhs);
        }
    }
}

fn js_class_item(item: &mut regex_syntax::ast::ClassSetItem) {
    use regex_syntax::ast::ClassSetItem;
    match item {
        ClassSetItem::Perl(p) => *item = js_class(p),
        ClassSetItem::Bracketed(b) => js_class_set(&mut b.kind),
        ClassSetItem::Union(u) => u.items.iter_mut().for_each(js_class_item),
        _ => {}
    }
}

/// A Perl class as JavaScript reads it, as an item of a bracketed class: the ASCII classes
/// (`[[:word:]]` is ASCII even in Unicode mode, and its negation everything else), and
/// JavaScript's whitespace.
fn js_class(p: &regex_syntax::ast::ClassPerl) -> regex_syntax::ast::ClassSetItem {
    use regex_syntax::ast::{
        ClassAscii, ClassAsciiKind, ClassBracketed, ClassPerlKind, ClassSet, ClassSetItem,
        ClassSetRange, ClassSetUnion, Literal, LiteralKind,
    };
    let span = p.span;
    let ascii = |kind| {
        ClassSetItem::Ascii(ClassAscii {
            span,
            kind,
            negated: p.negated,
        })
    };
    match p.kind {
        ClassPerlKind::Digit => ascii(ClassAsciiKind::Digit),
        ClassPerlKind::Word => ascii(ClassAsciiKind::Word),
        ClassPerlKind::Space => {
            const JS_SPACE: [(char, char); 10] = [
                ('\t', '\r'),
                (' ', ' '),
                ('\u{a0}', '\u{a0}'),
                ('\u{1680}', '\u{1680}'),
                ('\u{2000}', '\u{200a}'),
                ('\u{2028}', '\u{2029}'),
                ('\u{202f}', '\u{202f}'),
                ('\u{205f}', '\u{205f}'),
                ('\u{3000}', '\u{3000}'),
                ('\u{feff}', '\u{feff}'),
            ];
            let c = |c| Literal {
                span,
                kind: LiteralKind::Verbatim,
                c,
            };
            let space = ClassSetItem::Union(ClassSetUnion {
                span,
                items: JS_SPACE
                    .iter()
                    .map(|&(start, end)| {
                        ClassSetItem::Range(ClassSetRange {
                            span,
                            start: c(start),
                            end: c(end),
                        })
                    })
                    .collect(),
            });
            if p.negated {
                ClassSetItem::Bracketed(Box::new(ClassBracketed {
                    span,
                    negated: true,
                    kind: ClassSet::Item(space),
                }))
            } else {
                space
            }
        }
    }
}

impl std::fmt::Debug for BoundedRegex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BoundedRegex").field(&self.source).finish()
    }
}

/// What a compiled URL pattern is charged: every regex of its eight components (each
/// component holds one, and its matcher a second unless the part is a plain string or one
/// group), the URL pattern's own strings, and its text.
fn url_pattern_cost(source: &str, p: &urlpattern::UrlPattern<BoundedRegex>) -> usize {
    let components = [
        &p.protocol,
        &p.username,
        &p.password,
        &p.hostname,
        &p.port,
        &p.pathname,
        &p.search,
        &p.hash,
    ];
    let regexes: usize = components
        .iter()
        .map(|c| {
            let own = c.regexp.as_ref().map_or(0, |r| r.heap);
            let matcher = match &c.matcher.inner {
                urlpattern::matcher::InnerMatcher::RegExp { regexp } => {
                    regexp.as_ref().map_or(0, |r| r.heap)
                }
                _ => 0,
            };
            own + matcher
                + 2 * c.pattern_string.len()
                + c.group_name_list
                    .iter()
                    .map(|g| g.len() + 24)
                    .sum::<usize>()
                + 256
        })
        .sum();
    std::mem::size_of::<UrlPatternSelector>() + 2 * source.len() + 1024 + regexes
}

impl std::fmt::Debug for UrlPatternSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UrlPatternSelector")
            .field(&self.source)
            .finish()
    }
}

impl UrlPatternSelector {
    /// `None` when `source` is no valid URL pattern (ignoring case is never on: only the host
    /// is case-insensitive, through the URL parser).
    pub fn compile(source: &str, base: &url::Url) -> Option<UrlPatternSelector> {
        let init = urlpattern::UrlPatternInit::parse_constructor_string::<BoundedRegex>(
            source,
            Some(base.clone()),
        )
        .ok()?;
        let pattern =
            urlpattern::UrlPattern::<BoundedRegex>::parse(init, Default::default()).ok()?;
        let fixed = |c: &urlpattern::component::Component<BoundedRegex>| literal(c).map(Box::from);
        let origin = match (
            fixed(&pattern.protocol),
            fixed(&pattern.hostname),
            fixed(&pattern.port),
        ) {
            (Some(protocol), Some(hostname), Some(port)) => Some(Origin {
                protocol,
                hostname,
                port,
            }),
            _ => None,
        };
        let path_prefix = literal_prefix(&pattern.pathname);
        Some(UrlPatternSelector {
            cost: url_pattern_cost(source, &pattern) + path_prefix.len() + 3 * 24,
            source: source.to_owned(),
            pattern,
            base: base.clone(),
            origin,
            path_prefix,
        })
    }

    /// The compiled pattern, for tests that compare [`Self::matches_url`] with the crate's own
    /// test.
    #[cfg(test)]
    pub fn pattern_for_tests(&self) -> &urlpattern::UrlPattern<BoundedRegex> {
        &self.pattern
    }

    /// True when `topic`, read as a URL against the hub's URL, matches. A topic that is no URL
    /// reference matches nothing.
    pub fn is_match(&self, topic: &str) -> bool {
        TopicUrl::parse(topic, &self.base).is_some_and(|u| self.matches_url(&u))
    }

    /// True when a topic already read as a URL (against the same base) matches: every
    /// component matches, as the urlpattern crate tests them (its groups are never read).
    pub fn matches_url(&self, u: &TopicUrl) -> bool {
        let p = &self.pattern;
        let ok = |c: &urlpattern::component::Component<BoundedRegex>, text: &str| {
            c.matcher.matches(text).is_some()
        };
        ok(&p.pathname, &u.pathname)
            && ok(&p.hostname, &u.origin.hostname)
            && ok(&p.protocol, &u.origin.protocol)
            && ok(&p.port, &u.origin.port)
            && ok(&p.username, &u.username)
            && ok(&p.password, &u.password)
            && ok(&p.search, &u.search)
            && ok(&p.hash, &u.hash)
    }
}

/// The one string a URL pattern component matches, when it matches one only.
fn literal(c: &urlpattern::component::Component<BoundedRegex>) -> Option<&str> {
    let m = &c.matcher;
    match &m.inner {
        urlpattern::matcher::InnerMatcher::Literal { literal }
            if !m.ignore_case && m.prefix.is_empty() && m.suffix.is_empty() =>
        {
            Some(literal)
        }
        _ => None,
    }
}

/// The text every string a URL pattern component matches starts with: the matcher compares
/// it before anything else (its fixed first part, or the whole of a literal).
fn literal_prefix(c: &urlpattern::component::Component<BoundedRegex>) -> String {
    let m = &c.matcher;
    if m.ignore_case {
        return String::new();
    }
    match &m.inner {
        urlpattern::matcher::InnerMatcher::Literal { literal } => format!("{}{literal}", m.prefix),
        _ => m.prefix.clone(),
    }
}

/// A compiled URI template: its literal prefix, compared as a string, then an anchored lazy
/// DFA for the rest, with a cache of bounded size.
pub struct Template {
    source: Box<str>,
    /// The length of the text before the first `{`.
    prefix: usize,
    automaton: Automaton,
    /// What it is charged against `--template-memory`.
    cost: usize,
}

/// An NFA without captures run as a lazy DFA whose cache has a fixed capacity, for templates
/// and URL patterns alike: linear time, and memory known when it is built.
struct Automaton {
    dfa: DFA,
    /// The lazy DFA's states, built as topics are matched, up to the capacity it was built
    /// with. One per automaton: a thread that finds it taken uses a cache of its own for that
    /// one search (a moment's memory, not kept), rather than queueing behind another.
    cache: Mutex<Cache>,
    /// For the rare search the lazy DFA gives up on (its cache cleared again and again): the
    /// same NFA simulated directly, slower but in bounded memory and still linear time.
    pikevm: PikeVM,
    /// The heap its NFA, DFA and cache (at full capacity) may take.
    heap: usize,
}

impl Automaton {
    fn build(nfa: NFA) -> Option<Automaton> {
        let config = DFA::config()
            .minimum_cache_clear_count(Some(3))
            .minimum_bytes_per_state(Some(10));
        let capacity = cache_capacity(config.get_minimum_cache_capacity(&nfa).ok()?);
        let dfa = DFA::builder()
            .configure(config.cache_capacity(capacity))
            .build_from_nfa(nfa.clone())
            .ok()?;
        let pikevm = PikeVM::builder().build_from_nfa(nfa.clone()).ok()?;
        let cache = Mutex::new(dfa.create_cache());
        let heap = nfa.memory_usage() + dfa.memory_usage() + cache_heap(capacity);
        Some(Automaton {
            dfa,
            cache,
            pikevm,
            heap,
        })
    }

    fn is_match(&self, input: Input<'_>) -> bool {
        let found = match self.cache.try_lock() {
            Some(mut cache) => self.dfa.try_search_fwd(&mut cache, &input),
            None => self
                .dfa
                .try_search_fwd(&mut self.dfa.create_cache(), &input),
        };
        match found {
            Ok(m) => m.is_some(),
            Err(_) => self.pikevm.is_match(&mut self.pikevm.create_cache(), input),
        }
    }
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("source", &self.source)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

/// Room in a template's lazy DFA cache beyond the least it can work with (which holds two
/// states of the largest size possible besides its scratch space): enough for the few states
/// ordinary topics go through, so that matching them never clears the cache.
fn cache_capacity(minimum: usize) -> usize {
    minimum + minimum / 2 + 1024
}

/// The heap a lazy DFA cache of a given capacity may take: the capacity counts the length of
/// its tables and states, not the room their vectors and maps grew into (up to twice), nor the
/// counts of its reference-counted states. `tests/template_memory.rs` checks that no template
/// outgrows its charge.
fn cache_heap(capacity: usize) -> usize {
    2 * capacity + 2048
}

impl Template {
    /// `None` when `source` is no valid template, or too large to compile.
    fn compile(source: &str) -> Option<Template> {
        let prefix = source.find('{')?;
        let pattern = template_pattern(&source[prefix..])?;
        let nfa = NFA::compiler()
            .configure(
                NFA::config()
                    .which_captures(WhichCaptures::None)
                    .nfa_size_limit(Some(NFA_SIZE_LIMIT)),
            )
            .build(&pattern)
            .ok()?;
        let automaton = Automaton::build(nfa)?;
        let cost = std::mem::size_of::<Selector>()
            + std::mem::size_of::<Template>()
            + source.len()
            + automaton.heap;
        Some(Template {
            source: source.into(),
            prefix,
            automaton,
            cost,
        })
    }

    fn prefix(&self) -> &str {
        &self.source[..self.prefix]
    }

    /// Whether `topic` is an expansion of the template (see [`template_pattern`]).
    fn is_match(&self, topic: &str) -> bool {
        let Some(rest) = topic.strip_prefix(self.prefix()) else {
            return false;
        };
        self.automaton
            .is_match(Input::new(rest).anchored(Anchored::Yes).earliest(true))
    }
}

/// Compiled selectors, shared: a template used by ten thousand subscribers is compiled once.
///
/// Compiled templates are kept within a byte budget (`--template-memory`), each charged its
/// [`Selector::cost`]. A template is held while anything beyond this cache refers to it (a
/// subscriber, or a request checking a token): held templates are never evicted; the others
/// are, least recently used first, when room is needed. So the sum of the charges is all the
/// memory compiled templates take (a template that did not fit, compiled for one request
/// alone, aside), and a subscription whose templates would take it past the budget is
/// refused. Exact selectors and `*` cost nothing and are not kept.
pub struct SelectorCache {
    state: Mutex<Cached>,
    limit: usize,
    /// The hub's URL, that URL patterns are compiled against.
    base: url::Url,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Cached {
    /// Keyed by type and text: a 0.x template and a URL pattern may be written alike.
    templates: HashMap<Arc<Matcher>, Slot>,
    /// Every kept template by when it was last asked for: the eviction order.
    by_use: BTreeMap<u64, Arc<Matcher>>,
    clock: u64,
    /// The sum of the kept templates' charges.
    used: usize,
}

struct Slot {
    key: Arc<Matcher>,
    selector: Arc<Selector>,
    last_use: u64,
    charge: usize,
}

/// What keeping one template costs besides the template: its key (shared by the map and the
/// eviction order) and the entries that point to it.
const SLOT_OVERHEAD: usize = 160;

/// A subscription's templates do not fit in `--template-memory`, even with every template no
/// subscriber holds evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateMemoryFull;

impl SelectorCache {
    /// A cache that keeps compiled templates and URL patterns within `limit` bytes, URL
    /// patterns compiled against `base` (`None`: [`DEFAULT_BASE`]).
    pub fn new(limit: usize, base: Option<url::Url>, metrics: Arc<Metrics>) -> SelectorCache {
        metrics.template_memory_limit.store(limit as u64, Relaxed);
        SelectorCache {
            state: Mutex::new(Cached::default()),
            limit,
            base: base.unwrap_or_else(|| DEFAULT_BASE_URL.clone()),
            metrics,
        }
    }

    /// The URL relative URL patterns and topics are read against.
    pub fn base(&self) -> &url::Url {
        &self.base
    }

    /// The selector `s`, for a use that does not outlast a request (a token's selectors checked
    /// once): shared with other users when compiled already; a template that does not fit in
    /// the budget is compiled for this use alone.
    pub fn get(&self, m: &Matcher) -> Arc<Selector> {
        match self.lookup(m) {
            Ok(sel) => sel,
            Err(compiled) => self.keep(m, compiled).unwrap_or_else(|c| c),
        }
    }

    /// The selector `s` for a subscriber to hold: a template must fit in the budget.
    pub fn hold(&self, m: &Matcher) -> Result<Arc<Selector>, TemplateMemoryFull> {
        match self.lookup(m) {
            Ok(sel) => Ok(sel),
            Err(compiled) => self.keep(m, compiled).map_err(|_| TemplateMemoryFull),
        }
    }

    /// The bytes the kept templates are charged.
    pub fn used(&self) -> usize {
        self.state.lock().used
    }

    /// A kept template, or else `s` compiled (outside the lock: a large template must not
    /// stall other subscribers).
    fn lookup(&self, m: &Matcher) -> Result<Arc<Selector>, Arc<Selector>> {
        let s = m.pattern.as_str();
        let may_be_kept = match m.kind {
            MatchType::Topic => s.contains('{'),
            MatchType::UrlPattern => s != "*",
            MatchType::Exact => false,
        };
        if may_be_kept {
            let mut st = self.state.lock();
            let st = &mut *st;
            if let Some(slot) = st.templates.get_mut(m) {
                st.by_use.remove(&slot.last_use);
                st.clock += 1;
                slot.last_use = st.clock;
                st.by_use.insert(st.clock, slot.key.clone());
                return Ok(slot.selector.clone());
            }
        }
        let sel = Arc::new(Selector::compile_with_base(m, &self.base));
        if sel.is_compiled() {
            self.metrics.templates_compiled.fetch_add(1, Relaxed);
        }
        Err(sel)
    }

    /// Keeps a freshly compiled selector, evicting unheld templates to make room: the kept
    /// one (another thread's if it was quicker), or `Err` with the selector when it does not
    /// fit.
    fn keep(&self, m: &Matcher, sel: Arc<Selector>) -> Result<Arc<Selector>, Arc<Selector>> {
        if !sel.is_compiled() {
            return Ok(sel);
        }
        let charge = sel.cost() + SLOT_OVERHEAD + m.len();
        let mut st = self.state.lock();
        if let Some(slot) = st.templates.get(m) {
            return Ok(slot.selector.clone());
        }
        let over = (st.used + charge).saturating_sub(self.limit);
        if over > 0 {
            st.evict(over);
        }
        let kept = if st.used + charge > self.limit {
            Err(sel)
        } else {
            let key = Arc::new(m.clone());
            st.clock += 1;
            let last_use = st.clock;
            st.by_use.insert(last_use, key.clone());
            st.templates.insert(
                key.clone(),
                Slot {
                    key,
                    selector: sel.clone(),
                    last_use,
                    charge,
                },
            );
            st.used += charge;
            Ok(sel)
        };
        self.metrics.template_memory.store(st.used as u64, Relaxed);
        self.metrics
            .templates
            .store(st.templates.len() as u64, Relaxed);
        kept
    }
}

impl Cached {
    /// Frees at least `needed` bytes if it can, evicting unheld templates least recently used
    /// first. A held template met on the way is marked used now: it is, and the next eviction
    /// then starts with the templates after it.
    fn evict(&mut self, needed: usize) {
        let mut freed = 0;
        let end = self.clock + 1;
        while freed < needed {
            let Some((&stamp, _)) = self.by_use.range(..end).next() else {
                break;
            };
            let key = self.by_use.remove(&stamp).expect("just found");
            let slot = self.templates.get_mut(&key).expect("kept with its stamp");
            // Only this cache refers to it, and only through the cache can anyone get it:
            // no one can take it while the lock is held.
            if Arc::strong_count(&slot.selector) == 1 {
                freed += slot.charge;
                self.used -= slot.charge;
                self.templates.remove(&key);
            } else {
                self.clock += 1;
                slot.last_use = self.clock;
                self.by_use.insert(self.clock, key);
            }
        }
    }
}

/// Text of templates, as regular expressions. A value is unreserved characters, commas (lists)
/// and percent-encoded bytes, in one class; names are those of variables or of exploded keys.
const VALUE: &str = r"(?:[A-Za-z0-9\-._~,]|%[0-9A-Fa-f]{2})*";
const RESERVED: &str = r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})";
const NAME: &str = r"(?:[A-Za-z0-9_.]|%[0-9A-Fa-f]{2})+";

/// Translates an RFC 6570 template, from its first `{` on (the literal text before is compared
/// as a string), into a regular expression to run anchored at the start, or `None` when the
/// string is not a valid template. Every expression may expand to nothing (an undefined
/// variable), and list values are comma-separated, as the expansion rules allow.
fn template_pattern(t: &str) -> Option<String> {
    let mut re = String::with_capacity(t.len() * 4 + 2);
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
    Some(re)
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
    let (v, r) = (VALUE, RESERVED);
    Some(match op {
        None => v.to_owned(),
        Some('+') => format!("{r}*"),
        Some('#') => format!("(?:#{r}*)?"),
        Some('.') => format!(r"(?:\.{v})*"),
        Some('/') => format!("(?:/{v})*"),
        Some(';') => format!("(?:;{NAME}(?:={v})?)*"),
        Some('?') => format!(r"(?:\?{NAME}={v}(?:&{NAME}={v})*)?"),
        Some('&') => format!("(?:&{NAME}={v})*"),
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
        assert!(matches!(Selector::topic("*"), Selector::Any));
        assert!(matches!(Selector::topic("a/b"), Selector::Exact(_)));
        assert!(matches!(Selector::topic("a/{b"), Selector::Exact(_)));
        assert!(matches!(Selector::topic("a/{!b}"), Selector::Exact(_)));
        assert!(matches!(Selector::topic("a/{b}"), Selector::Template(_)));
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
            let sel = Selector::topic(selector);
            assert_eq!(sel.matches(topic), *expected, "{selector} vs {topic}");
        }
    }

    /// What keeping `s` is charged.
    fn charge(s: &str) -> usize {
        Selector::topic(s).cost() + SLOT_OVERHEAD + s.len()
    }

    fn kept(cache: &SelectorCache, s: &str) -> bool {
        cache
            .state
            .lock()
            .templates
            .contains_key(&Matcher::topic(s))
    }

    /// Templates of the same size: `/t0/{x}`, `/t1/{x}`…
    fn same_size(n: usize) -> (Vec<String>, usize) {
        let names: Vec<String> = (0..n).map(|i| format!("/t{i}/{{x}}")).collect();
        let one = charge(&names[0]);
        assert!(names.iter().all(|s| charge(s) == one));
        (names, one)
    }

    #[test]
    fn held_templates_are_never_evicted_and_a_full_budget_refuses() {
        let (t, one) = same_size(5);
        let metrics = Arc::new(Metrics::default());
        let cache = SelectorCache::new(3 * one, None, metrics.clone());
        let a = cache.hold(&Matcher::topic(&t[0])).unwrap();
        let b = cache.hold(&Matcher::topic(&t[1])).unwrap();
        drop(cache.get(&Matcher::topic(&t[2])));
        assert_eq!(cache.used(), 3 * one);
        assert!(
            Arc::ptr_eq(&a, &cache.hold(&Matcher::topic(&t[0])).unwrap()),
            "shared"
        );

        // Full: the one no one holds makes room.
        let c = cache.hold(&Matcher::topic(&t[3])).unwrap();
        assert!(!kept(&cache, &t[2]));
        assert_eq!(cache.used(), 3 * one);
        // Full of held templates: a subscriber is refused, and a passing use gets a template
        // of its own that is not kept.
        assert_eq!(
            cache.hold(&Matcher::topic(&t[4])).unwrap_err(),
            TemplateMemoryFull
        );
        let passing = cache.get(&Matcher::topic(&t[4]));
        assert!(passing.is_template() && passing.matches("/t4/y"));
        assert!(!kept(&cache, &t[4]));
        assert_eq!(cache.used(), 3 * one);
        assert_eq!(metrics.template_memory.load(Relaxed), 3 * one as u64);
        assert_eq!(metrics.templates.load(Relaxed), 3);

        // Let go, a template stays kept until room is needed.
        drop(b);
        assert!(kept(&cache, &t[1]));
        let d = cache.hold(&Matcher::topic(&t[4])).unwrap();
        assert!(!kept(&cache, &t[1]));
        assert!(cache.used() <= 3 * one);
        drop((a, c, d));
    }

    #[test]
    fn unheld_templates_go_least_recently_used_first() {
        let (t, one) = same_size(5);
        let cache = SelectorCache::new(3 * one, None, Arc::new(Metrics::default()));
        for s in &t[..3] {
            drop(cache.get(&Matcher::topic(s)));
        }
        drop(cache.get(&Matcher::topic(&t[0])));
        // Used in the order 1, 2, 0: 1 goes first, then 2.
        let held = cache.hold(&Matcher::topic(&t[3])).unwrap();
        assert!(!kept(&cache, &t[1]) && kept(&cache, &t[2]) && kept(&cache, &t[0]));
        drop(cache.get(&Matcher::topic(&t[4])));
        assert!(!kept(&cache, &t[2]) && kept(&cache, &t[0]) && kept(&cache, &t[4]));
        assert_eq!(cache.used(), 3 * one);
        drop(held);
    }

    #[test]
    fn exact_selectors_and_any_cost_nothing() {
        let cache = SelectorCache::new(0, None, Arc::new(Metrics::default()));
        for s in ["*", "https://example.com/books/1", "a/{b", "a/{!b}"] {
            let sel = cache.hold(&Matcher::topic(s)).unwrap();
            assert!(!sel.is_template() && sel.cost() == 0, "{s}");
        }
        assert_eq!(cache.used(), 0);
        assert_eq!(
            cache.hold(&Matcher::topic("a/{b}")).unwrap_err(),
            TemplateMemoryFull
        );
    }

    #[test]
    fn is_template_agrees_with_compile() {
        for s in [
            "*", "a", "a/{b", "a/{!b}", "a/{b}", "{x}", "a}{b}", "{?a,b*}",
        ] {
            assert_eq!(
                is_template(&Matcher::topic(s)),
                Selector::topic(s).is_template(),
                "{s}"
            );
        }
    }

    #[test]
    fn hostile_templates_stay_linear() {
        // Many expressions against a long topic: the regex engine does not backtrack, so this
        // ends at once; a template too large to compile falls back to an exact selector.
        let sel = Selector::topic(&"{a}{+b}{/c*}".repeat(50));
        let topic = "a/".repeat(2000) + "!";
        let _ = sel.matches(&topic);
        let huge = Selector::topic(&"{x}".repeat(10_000));
        assert!(!huge.matches("y"));
    }

    #[test]
    fn url_patterns_read_topics_as_urls_against_the_hub() {
        let p = |s: &str| Selector::compile(&Matcher::url_pattern(s));
        let books = p("https://example.com/books/:id");
        assert!(books.matches("https://example.com/books/1"));
        assert!(books.matches("https://EXAMPLE.com:443/books/1?x=y#f"));
        assert!(!books.matches("https://example.com/books/1/2"));
        assert!(!books.matches("http://example.com/books/1"));
        assert!(!books.matches("https://example.com/Books/1"));
        // Relative patterns and topics are read against the hub's URL.
        let relative = p("/books/:id");
        assert!(relative.matches("/books/1"));
        assert!(!relative.matches("https://example.com/books/1"));
        assert!(p("/.well-known/*").matches("chat-room-1234"));
        assert!(matches!(p("*"), Selector::Any));
        // No URL reference: no match, never an error.
        assert!(!books.matches("http://[::1"));
        // Not a pattern: matches nothing (a request's own patterns are refused before).
        assert!(matches!(p("https://example.com/(a"), Selector::Never(_)));
        // Linear time: a pattern that backtracks exponentially elsewhere answers at once.
        let evil = p("https://example.com/(a+)+b");
        assert!(!evil.matches(&format!("https://example.com/{}c", "a".repeat(5_000))));
        assert!(evil.matches("https://example.com/aaab"));
        // Groups of a custom regex are matched as written, whole.
        let digits = p("/users/:id(\\d+)");
        assert!(digits.matches("/users/42") && !digits.matches("/users/42x"));
        // Too large a regex is no pattern (a request's is refused): its NFA alone would pass
        // the bound.
        assert!(matches!(p("/(\\d{20000})"), Selector::Never(_)));
    }

    #[test]
    fn url_pattern_classes_mean_what_they_mean_in_javascript() {
        let p = |s: &str| Selector::compile(&Matcher::url_pattern(s));
        // `\w` and `\d` are ASCII, as in browsers: twenty word characters fit the NFA bound.
        let word = p("/t/:id(\\w{20})");
        assert!(matches!(word, Selector::UrlPattern(_)), "{word:?}");
        assert!(word.matches(&format!("/t/{}", "aZ9_".repeat(5))));
        assert!(!word.matches(&format!("/t/{}", "a".repeat(19))));
        // A non-ASCII letter is no word character (`é` would be read percent-encoded anyway:
        // the pathname keeps it as `%C3%A9`, which `\w` does not match either).
        assert!(!word.matches(&format!("/t/{}é", "a".repeat(19))));
        let eight: String = (0..8).map(|i| format!("/:a{i}(\\w+)")).collect();
        let eight = p(&eight);
        assert!(matches!(eight, Selector::UrlPattern(_)), "{eight:?}");
        assert!(eight.matches("/a/b/c/d/e/f/g/h") && !eight.matches("/a/b/c/d/e/f/g/-"));
        let digits = p("/n/:n(\\d+)");
        assert!(digits.matches("/n/0123456789"));
        // Inside brackets and negated, the same.
        let bracket = p("/b/([\\w-]+)");
        assert!(bracket.matches("/b/a-b_c") && !bracket.matches("/b/a.b"));
        let not_word = p("/w/(\\W)");
        assert!(not_word.matches("/w/-") && !not_word.matches("/w/a"));
        // The search component is not percent-encoded the same way: JavaScript's whitespace
        // there (a space arrives encoded, a no-break space as `%C2%A0`).
        let space = p("/s?q=(\\S+)");
        assert!(space.matches("/s?q=abc"));
        // Charged as any pattern: its regexes are counted.
        let cache = SelectorCache::new(1 << 20, None, Arc::new(Metrics::default()));
        let held = cache
            .hold(&Matcher::url_pattern("/t/:id(\\w{20})"))
            .unwrap();
        let Selector::UrlPattern(u) = &*held else {
            panic!("{held:?}")
        };
        let regexes: usize = [&u.pattern.pathname]
            .iter()
            .map(|c| c.regexp.as_ref().map_or(0, |r| r.heap))
            .sum();
        assert!(regexes > 0 && held.cost() > regexes, "{}", held.cost());
        assert!(cache.used() >= held.cost());
        let small = SelectorCache::new(held.cost() / 2, None, Arc::new(Metrics::default()));
        assert_eq!(
            small
                .hold(&Matcher::url_pattern("/t/:id(\\w{20})"))
                .unwrap_err(),
            TemplateMemoryFull
        );
    }

    #[test]
    fn js_classes_rewrite_only_perl_classes() {
        let hir = |s: &str| {
            let mut ast = regex_syntax::ast::parse::Parser::new().parse(s).unwrap();
            js_classes(&mut ast);
            regex_syntax::hir::translate::Translator::new()
                .translate(s, &ast)
                .unwrap()
        };
        let plain = |s: &str| regex_syntax::parse(s).unwrap();
        assert_eq!(hir("\\w"), plain("[0-9A-Za-z_]"));
        assert_eq!(hir("\\d+"), plain("[0-9]+"));
        assert_eq!(hir("[^\\d.]"), plain("[^0-9.]"));
        assert_eq!(hir("a|(b\\W)"), plain("a|(b[^0-9A-Za-z_])"));
        assert_eq!(
            hir("\\s"),
            plain("[\\t-\\r \\u{a0}\\u{1680}\\u{2000}-\\u{200a}\\u{2028}\\u{2029}\\u{202f}\\u{205f}\\u{3000}\\u{feff}]")
        );
        // Everything else as written.
        for s in ["abc", "[a-z]+", "(?:x)*y?", "\\.", "é."] {
            assert_eq!(hir(s), plain(s), "{s}");
        }
    }

    #[test]
    fn url_patterns_are_kept_apart_from_templates_and_charged() {
        let cache = SelectorCache::new(1 << 20, None, Arc::new(Metrics::default()));
        let t = cache.hold(&Matcher::topic("/a/{b}")).unwrap();
        let p = cache.hold(&Matcher::url_pattern("/a/{b}")).unwrap();
        assert!(t.is_template() && matches!(*p, Selector::UrlPattern(_)));
        assert!(t.matches("/a/x") && t.matches("/a/b"));
        assert!(p.matches("/a/b") && !p.matches("/a/x"));
        assert!(Arc::ptr_eq(
            &p,
            &cache.hold(&Matcher::url_pattern("/a/{b}")).unwrap()
        ));
        assert_eq!(
            cache.used(),
            charge("/a/{b}") + p.cost() + SLOT_OVERHEAD + 6
        );
        assert!(p.cost() > 0);
        // `*` is every topic, compiled or not.
        let any = cache.hold(&Matcher::url_pattern("*")).unwrap();
        assert!(matches!(*any, Selector::Any));
        // A budget too small refuses URL patterns as it refuses templates.
        let small = SelectorCache::new(1024, None, Arc::new(Metrics::default()));
        assert_eq!(
            small.hold(&Matcher::url_pattern("/x/:y")).unwrap_err(),
            TemplateMemoryFull
        );
    }

    #[test]
    fn url_patterns_read_relative_topics_against_the_configured_base() {
        let base = url::Url::parse("https://hub.example.com/.well-known/mercure").unwrap();
        let cache = SelectorCache::new(1 << 20, Some(base), Arc::new(Metrics::default()));
        let p = cache.get(&Matcher::url_pattern("/books/:id"));
        assert!(p.matches("/books/1"));
        assert!(p.matches("https://hub.example.com/books/1"));
        assert!(!p.matches("https://mercure.invalid/books/1"));
    }

    #[test]
    fn an_exact_matcher_never_reads_braces_as_a_template() {
        assert!(matches!(
            Selector::compile(&Matcher::exact("a/{b}")),
            Selector::Exact(_)
        ));
        assert!(!is_template(&Matcher::exact("a/{b}")));
        assert!(matches!(
            Selector::compile(&Matcher::exact("*")),
            Selector::Any
        ));
    }
}
