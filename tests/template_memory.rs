//! What a compiled URI template costs on the heap, measured with a counting allocator: the
//! charge `--template-memory` counts for each template must cover what it takes, even once
//! matching has grown its lazy DFA cache as far as it goes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use ssehub::hub::Selector;

/// The global allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The allocation count is the whole process's: one measurement at a time.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: every call is passed on to `System` as it came.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A small deterministic random number generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

/// Expansions of `template` (each expression left out or expanded with a few values, some
/// percent-encoded), of every length up to 4 KiB, some spoiled by a stray character: they
/// drive its lazy DFA into as many states as ordinary and hostile topics can.
fn topics(template: &str) -> Vec<String> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let values = ["a", "Z9", "-._~", "%41", "1,2", "x"];
    let names = ["p", "q1", "a.b"];
    let mut out = Vec::new();
    for i in 0..2000 {
        let mut topic = String::new();
        let mut rest = template;
        let repeat = [1, 1, 3, 20][i % 4];
        while let Some(open) = rest.find('{') {
            topic.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').unwrap();
            let op = rest.as_bytes()[open + 1];
            rest = &rest[close + 1..];
            if rng.below(3) == 0 {
                continue;
            }
            for k in 0..1 + rng.below(repeat) {
                let v = rng.pick(&values);
                let n = rng.pick(&names);
                let piece = match op {
                    b'+' => format!("{v}/{v}?{n}"),
                    b'#' if k == 0 => format!("#{v}"),
                    b'#' => format!("/{v}"),
                    b'.' | b'/' => format!("{}{v}", op as char),
                    b';' => format!(";{n}={v}"),
                    b'?' if k == 0 => format!("?{n}={v}"),
                    b'?' | b'&' => format!("&{n}={v}"),
                    _ if k == 0 => v.to_owned(),
                    _ => format!(",{v}"),
                };
                topic.push_str(&piece);
            }
        }
        topic.push_str(rest);
        if rng.below(4) == 0 {
            let at = rng.below(topic.len() + 1);
            if topic.is_char_boundary(at) {
                topic.insert_str(at, rng.pick(&["!", "?", "%", "é", "{"]));
            }
        }
        topic.truncate(4096);
        while !topic.is_char_boundary(topic.len()) {
            topic.pop();
        }
        out.push(topic);
    }
    out
}

/// Heap bytes a compiled selector takes once compiled, and once matched against `topics`.
fn heap(template: &str, topics: &[String]) -> (Selector, isize, isize) {
    let before = LIVE.load(Relaxed);
    let sel = Selector::topic(template);
    let compiled = LIVE.load(Relaxed) - before;
    for t in topics {
        let _ = sel.matches(t);
    }
    let matched = LIVE.load(Relaxed) - before;
    (sel, compiled, matched)
}

#[test]
fn every_template_is_charged_at_least_what_it_takes() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let query: String = (0..64).map(|i| format!("{{?p{i}}}")).collect();
    let cases = [
        "https://example.com/books/{id}".to_owned(),
        "https://example.com/users/{uid}/orders{?page,size}".to_owned(),
        "/{a}/{b}/{c}".to_owned(),
        "{+path}".to_owned(),
        "x{.a}{/b}{;c}{?d}{&e}{#f}".to_owned(),
        "https://example.com/{+p}/{id:3}{?q*}".to_owned(),
        format!("u1{query}"),
        format!("{{+x}}{query}"),
        "{a}{+b}{/c*}{?d,e}{&f}{#g}".repeat(10),
        "{a}x{b}y{.c}z{;d}".repeat(16),
    ];
    for template in &cases {
        let topics = topics(template);
        let (sel, compiled, matched) = heap(template, &topics);
        let hits = topics.iter().filter(|t| sel.matches(t)).count();
        let cost = sel.cost() as isize;
        println!(
            "{:>44.44}: {compiled:>7} B compiled, {matched:>7} B after matching, charged {cost:>7} B ({hits} of {} topics matched)",
            template, topics.len()
        );
        assert!(sel.is_template(), "{template}");
        assert!(
            matched <= cost,
            "{template}: takes {matched} B, charged {cost} B"
        );
    }
}

/// URL patterns (Mercure 1.0 `match_urlpattern`): each compiles eight regexes with the `regex`
/// crate, which grows per-thread caches as it matches. Matched from two threads with topics
/// of every shape, a pattern must still take no more than it is charged.
#[test]
fn every_url_pattern_is_charged_at_least_what_it_takes() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    use ssehub::hub::Matcher;
    let cases = [
        "https://example.com/books/:id".to_owned(),
        "/rooms/:room/messages/:msg".to_owned(),
        "https://:sub.example.com/*".to_owned(),
        "https://example.com/users/:id(\\d+)/orders{/:oid}?".to_owned(),
        "https://example.com/(a+)+b".to_owned(),
        "/:a/:b/:c/:d/:e/:f/:g/:h?x=:y#:z".to_owned(),
        format!("/{}", "(x|y)*z".repeat(40)),
        "/.well-known/*".to_owned(),
        format!("/{}", "(\\w)".repeat(4)),
        // JavaScript's ASCII `\w` and `\d`: patterns Unicode classes made too large.
        "/t/:id(\\w{20})".to_owned(),
        (0..8).map(|i| format!("/:a{i}(\\w+)")).collect(),
        "/s/([\\d\\s]+)(\\S*)".to_owned(),
        format!("/{}", "([a-z]+)".repeat(40)),
    ];
    let shapes = [
        "https://example.com/books/1",
        "/rooms/1/messages/2",
        "https://a.example.com/x/y?z#w",
        "https://example.com/users/123/orders/9",
        "chat-room-1234",
        "/a/b/c/d/e/f/g/h?x=1#2",
    ];
    for pattern in &cases {
        let mut topics: Vec<String> = Vec::new();
        for (i, s) in shapes.iter().enumerate() {
            for n in [1, 10, 100, 1000] {
                topics.push(format!("{s}{}", "xyza/%41é"[..(i % 4) + 1].repeat(n)));
                topics.push(format!("{}{s}", "/b".repeat(n)));
            }
        }
        let before = LIVE.load(Relaxed);
        let sel = Selector::compile(&Matcher::url_pattern(pattern.as_str()));
        let compiled = LIVE.load(Relaxed) - before;
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for t in &topics {
                        let _ = sel.matches(t);
                    }
                });
            }
        });
        let matched = LIVE.load(Relaxed) - before;
        let cost = sel.cost() as isize;
        println!(
            "{:>44.44}: {compiled:>7} B compiled, {matched:>7} B after matching, charged {cost:>7} B",
            pattern
        );
        assert!(cost > 0, "{pattern} compiles");
        assert!(
            matched <= cost,
            "{pattern}: takes {matched} B, charged {cost} B"
        );
    }
}
