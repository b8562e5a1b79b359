//! Template selectors in use, grouped by template and found through their literal prefix.
//!
//! Every topic a URI template matches starts with the template's text before its first `{`
//! (it is compared as a string before the rest is matched; a topic equal to the template
//! itself starts with it too). So a publish only tests the templates whose prefix its topic starts
//! with, each once however many subscribers share it, instead of every template of every
//! subscriber: with one template per user (`/users/42/{resource}`), a publish to one user's
//! topic tests that user's templates alone.
//!
//! URL patterns (Mercure 1.0 `urlpattern`) read a topic as a URL, not as a string: their
//! prefix is no prefix of the topic (`HTTPS://Example.COM/a` matches what `https://example.com/a`
//! does). They are found through what they fix of the topic read as a URL (against the hub's
//! URL, as they match): its protocol, hostname and port when the pattern fixes all three, and
//! the literal start of its pathname. A pattern that leaves the host open is found through its
//! pathname alone, and one that fixes neither is tested against every topic.
//!
//! Testing templates is the costly part of a publish, so it is done outside the hub's lock:
//! [`TemplateIndex::collect`] takes the candidates under it (and refuses a publish that would
//! test too many), [`Candidates::test`] tests them after it, and [`Matches::each`], in the
//! fan-out under the lock again, offers the update to the subscribers of those that matched,
//! testing there only templates that came in between.

use std::collections::{btree_map, BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::selector::{IndexKey, MatchType, Origin, Selector, TopicUrl, DEFAULT_BASE_URL};
use super::subscriber::Subscriber;

/// The subscribers that hold one template.
pub(super) struct TemplateGroup {
    pub selector: Arc<Selector>,
    pub subs: HashMap<u64, Arc<Subscriber>>,
}

/// The templates that share one literal prefix, by type and source (a 0.x template and a URL
/// pattern may be written alike).
type PrefixGroups = HashMap<GroupKey, TemplateGroup>;
type GroupKey = (MatchType, Box<str>);

/// `sel`'s key in its prefix's groups.
fn group_key(sel: &Selector) -> GroupKey {
    (sel.kind().unwrap_or(MatchType::Topic), sel.as_str().into())
}

/// Groups of templates found through a literal prefix of a text: the topic itself for URI
/// templates, the topic's pathname for URL patterns.
#[derive(Default)]
struct PrefixIndex {
    /// Literal prefix → template source → its subscribers.
    by_prefix: HashMap<Box<str>, PrefixGroups>,
    /// How many prefixes of each length are in `by_prefix`: the lengths a text is cut at.
    lengths: BTreeMap<usize, usize>,
}

impl PrefixIndex {
    /// Adds `sub` under `sel`, found through `prefix`; true when `sel` is new here.
    fn insert(&mut self, prefix: &str, sel: &Arc<Selector>, sub: &Arc<Subscriber>) -> bool {
        let key = group_key(sel);
        let groups = match self.by_prefix.get_mut(prefix) {
            Some(groups) => groups,
            None => {
                *self.lengths.entry(prefix.len()).or_default() += 1;
                self.by_prefix.entry(prefix.into()).or_default()
            }
        };
        let mut added = false;
        groups
            .entry(key)
            .or_insert_with(|| {
                added = true;
                TemplateGroup {
                    selector: sel.clone(),
                    subs: HashMap::new(),
                }
            })
            .subs
            .insert(sub.id, sub.clone());
        added
    }

    /// Removes subscriber `id` from `sel`; true when `sel` went with it (its last).
    fn remove(&mut self, prefix: &str, sel: &Selector, id: u64) -> bool {
        let Some(groups) = self.by_prefix.get_mut(prefix) else {
            return false;
        };
        let key = group_key(sel);
        let mut gone = false;
        if let Some(group) = groups.get_mut(&key) {
            group.subs.remove(&id);
            if group.subs.is_empty() {
                groups.remove(&key);
                gone = true;
            }
        }
        if groups.is_empty() {
            self.by_prefix.remove(prefix);
            if let btree_map::Entry::Occupied(mut n) = self.lengths.entry(prefix.len()) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                }
            }
        }
        gone
    }

    fn group(&self, prefix: &str, sel: &Selector) -> Option<&TemplateGroup> {
        self.by_prefix.get(prefix)?.get(&group_key(sel))
    }

    /// Calls `f` with the templates of each literal prefix `text` starts with.
    fn prefix_groups<'a>(&'a self, text: &str, mut f: impl FnMut(&'a PrefixGroups)) {
        for &len in self.lengths.range(..=text.len()).map(|(len, _)| len) {
            // `get` is `None` where `len` would cut a character: no prefix ends there.
            if let Some(groups) = text.get(..len).and_then(|p| self.by_prefix.get(p)) {
                f(groups);
            }
        }
    }

    /// The work of looking up the literal prefixes of texts of lengths `lens`: each text is
    /// cut at every prefix length up to its own, and each cut hashed. Counted from the lengths
    /// alone, in one pass over them with the texts by length.
    fn lookup_work(&self, lens: &mut [usize]) -> u64 {
        lens.sort_unstable();
        let mut prefixes = self.lengths.keys().peekable();
        let (mut per_text, mut total) = (0u64, 0u64);
        for &len in lens.iter() {
            while let Some(&&p) = prefixes.peek().filter(|&&&p| p <= len) {
                per_text += p as u64 + LOOKUP_WORK;
                prefixes.next();
            }
            total += per_text;
        }
        total
    }

    fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    #[cfg(test)]
    fn templates(&self) -> usize {
        self.by_prefix.values().map(HashMap::len).sum()
    }
}

pub(super) struct TemplateIndex {
    /// URI templates, by the literal start of the topics they match.
    templates: PrefixIndex,
    /// URL patterns that fix the protocol, hostname and port, by them, then by the literal
    /// start of the pathnames they match.
    by_origin: HashMap<Origin, PrefixIndex>,
    /// URL patterns that leave the origin open, by the literal start of their pathnames (the
    /// prefix `""` holds those tested against every topic).
    any_origin: PrefixIndex,
    /// Distinct templates held, and distinct URL patterns among them.
    count: usize,
    url_patterns: usize,
    /// Counts the templates added: `Candidates` taken at one generation cover every template
    /// present at a later one with the same count.
    generation: u64,
    /// The hub's URL, that topics are read against (as the URL patterns were compiled).
    base: url::Url,
}

impl Default for TemplateIndex {
    fn default() -> TemplateIndex {
        TemplateIndex::new(DEFAULT_BASE_URL.clone())
    }
}

/// The most work one publish may ask of the hub's URI templates and URL patterns, in units
/// of about a byte compared or hashed (a nanosecond or so): 2^26, some 67 million. A publish
/// of ten topics of 300 bytes tested against 10,000 templates is about 36 million; 250 topics
/// of 4,000 bytes against 2,000 templates, 2 billion.
pub const MAX_MATCHING_WORK: u64 = 1 << 26;
/// The work of one test of a topic against a template, beside the topic's bytes.
const TEST_WORK: u64 = 64;
/// The work of one test of a topic against a URL pattern, beside the URL's bytes: up to eight
/// components, each a matcher of its own.
const URL_TEST_WORK: u64 = 256;
/// The work of reading one topic as a URL, beside its bytes.
const PARSE_WORK: u64 = 256;
/// The work of looking up one literal prefix of a topic, beside its bytes.
const LOOKUP_WORK: u64 = 16;

/// A publish whose topics would ask more than [`MAX_MATCHING_WORK`] of the templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooMuchMatching {
    pub topics: usize,
    /// The templates the topics would be tested against (those held, if it was the lookup of
    /// their prefixes that was already too much).
    pub templates: usize,
}

/// An update's topics read as URLs, for its URL patterns: parsed before the hub's lock is
/// taken, and only when URL patterns are held (`None` for a topic that is no URL reference,
/// which no URL pattern matches).
pub(super) type TopicUrls = Vec<Option<TopicUrl>>;

/// The templates an update's topics could match, taken under the hub's lock, to test after it.
pub(super) struct Candidates {
    generation: u64,
    /// The estimated work of testing them (see [`MAX_MATCHING_WORK`]).
    pub work: u64,
    /// The templates of each literal prefix found, with the topics (by index) starting with it.
    groups: Vec<(Vec<Arc<Selector>>, Vec<usize>)>,
    urls: TopicUrls,
}

/// Which templates an update's topics matched, found outside the hub's lock; `default()` for
/// none found, which leaves every test to the fan-out.
#[derive(Default)]
pub(super) struct Matches {
    /// The index's generation the candidates were taken at.
    generation: Option<u64>,
    /// Each template tested, by address, and whether one of the topics matched it.
    results: HashMap<*const Selector, bool>,
    /// The templates tested and their results again, kept so that no other template can take
    /// one's address meanwhile.
    tested: Vec<(Arc<Selector>, bool)>,
    /// The topics read as URLs, if they were.
    urls: TopicUrls,
    /// Tests of a topic against a template or URL pattern made (for `/metrics`).
    pub tests: u64,
}

impl Matches {
    /// About the bytes it holds, for the durable history's queue budget: each result twice
    /// (map and list), each topic read as a URL with its parts.
    pub(super) fn weight(&self) -> usize {
        self.tested.len() * 64
            + self
                .urls
                .iter()
                .flatten()
                .map(|_| std::mem::size_of::<TopicUrl>() + 256)
                .sum::<usize>()
    }
}

// SAFETY: the pointers are only compared, as map keys, never read through; the selectors
// they point to are held by `tested` (`Arc<Selector>` is `Send`). A publish's matches travel
// with it to the durable history's writer thread.
unsafe impl Send for Matches {}

/// Tests `sel` against topic `i`, read as a URL (parsed once, in `urls`) for a URL pattern.
fn test_one(sel: &Selector, topics: &[String], urls: &TopicUrls, i: usize) -> bool {
    match sel {
        Selector::UrlPattern(p) => match urls.get(i) {
            Some(url) => url.as_ref().is_some_and(|u| p.matches_url(u)),
            None => p.is_match(&topics[i]),
        },
        _ => sel.matches(&topics[i]),
    }
}

impl TemplateIndex {
    /// An empty index, for URL patterns compiled against `base`.
    pub fn new(base: url::Url) -> TemplateIndex {
        TemplateIndex {
            templates: PrefixIndex::default(),
            by_origin: HashMap::new(),
            any_origin: PrefixIndex::default(),
            count: 0,
            url_patterns: 0,
            generation: 0,
            base,
        }
    }

    /// Adds `sub` under the template or URL pattern `sel` (a no-op for other selectors).
    pub fn insert(&mut self, sel: &Arc<Selector>, sub: &Arc<Subscriber>) {
        let added = match sel.index_key() {
            None => return,
            Some(IndexKey::Prefix(prefix)) => self.templates.insert(prefix, sel, sub),
            Some(IndexKey::Url {
                origin,
                path_prefix,
            }) => {
                let index = match origin {
                    Some(o) => self.by_origin.entry(o.clone()).or_default(),
                    None => &mut self.any_origin,
                };
                let added = index.insert(path_prefix, sel, sub);
                self.url_patterns += added as usize;
                added
            }
        };
        if added {
            self.count += 1;
            self.generation += 1;
        }
    }

    /// Removes subscriber `id` from the template `sel`, and the template when it was the last.
    pub fn remove(&mut self, sel: &Selector, id: u64) {
        let Some(key) = sel.index_key() else {
            return;
        };
        let gone = match key {
            IndexKey::Prefix(prefix) => self.templates.remove(prefix, sel, id),
            IndexKey::Url {
                origin: None,
                path_prefix,
            } => self.any_origin.remove(path_prefix, sel, id),
            IndexKey::Url {
                origin: Some(o),
                path_prefix,
            } => {
                let Some(index) = self.by_origin.get_mut(o) else {
                    return;
                };
                let gone = index.remove(path_prefix, sel, id);
                if index.is_empty() {
                    self.by_origin.remove(o);
                }
                gone
            }
        };
        if gone {
            self.count -= 1;
            if matches!(key, IndexKey::Url { .. }) {
                self.url_patterns -= 1;
            }
        }
    }

    /// The URL pattern indexes a topic read as `url` may find candidates in.
    fn url_indexes(&self, url: &TopicUrl) -> impl Iterator<Item = &PrefixIndex> {
        self.by_origin
            .get(&url.origin)
            .into_iter()
            .chain(Some(&self.any_origin).filter(|i| !i.is_empty()))
    }

    /// Calls `f` with every template whose literal prefix `topic` starts with, and every URL
    /// pattern whose fixed parts `url` (the topic read as a URL, if it is one) has: the only
    /// ones that can match it (`f` still tests them).
    pub fn candidates(
        &self,
        topic: &str,
        url: Option<&TopicUrl>,
        mut f: impl FnMut(&TemplateGroup),
    ) {
        self.templates
            .prefix_groups(topic, |groups| groups.values().for_each(&mut f));
        if let Some(url) = url {
            for index in self.url_indexes(url) {
                index.prefix_groups(&url.pathname, |groups| groups.values().for_each(&mut f));
            }
        }
    }

    /// The group of the template `sel`, if held.
    fn group(&self, sel: &Selector) -> Option<&TemplateGroup> {
        match sel.index_key()? {
            IndexKey::Prefix(prefix) => self.templates.group(prefix, sel),
            IndexKey::Url {
                origin: None,
                path_prefix,
            } => self.any_origin.group(path_prefix, sel),
            IndexKey::Url {
                origin: Some(o),
                path_prefix,
            } => self.by_origin.get(o)?.group(path_prefix, sel),
        }
    }

    /// True when URL patterns are held: a publish then reads its topics as URLs.
    pub fn has_url_patterns(&self) -> bool {
        self.url_patterns > 0
    }

    /// The templates `topics` could match, to be tested outside the lock with
    /// [`Candidates::test`]. `urls` are the topics read as URLs (empty when they were not,
    /// URL patterns then left to the fan-out). With a `bound`, refuses topics that would ask
    /// more work than that, before taking any (this runs under the hub's lock): first for
    /// reading them as URLs and looking their prefixes up, then for testing them.
    pub fn collect(
        &self,
        topics: &[String],
        urls: TopicUrls,
        bound: Option<u64>,
    ) -> Result<Candidates, TooMuchMatching> {
        if self.is_empty() {
            return Ok(Candidates {
                generation: self.generation,
                work: 0,
                groups: Vec::new(),
                urls,
            });
        }
        // URL patterns came in after the caller saw none: the candidates must cover them
        // (the fan-out trusts them for every template present now), so the topics are read
        // here, under the lock, this once.
        let urls = if urls.len() != topics.len() && self.has_url_patterns() {
            topics
                .iter()
                .map(|t| TopicUrl::parse(t, &self.base))
                .collect()
        } else {
            urls
        };
        let mut candidates = Candidates {
            generation: self.generation,
            work: 0,
            groups: Vec::new(),
            urls,
        };
        let urls = &candidates.urls;
        let too_much = |templates| TooMuchMatching {
            topics: topics.len(),
            templates,
        };
        let lookups = bound.map_or(0, |_| self.lookup_work(topics, urls));
        if bound.is_some_and(|bound| lookups > bound) {
            return Err(too_much(self.count));
        }
        // Each group found, with the topic that found it and the work of testing the one
        // against the other.
        let mut hits: Vec<(&PrefixGroups, usize, u64)> = Vec::new();
        for (i, topic) in topics.iter().enumerate() {
            self.templates.prefix_groups(topic, |groups| {
                hits.push((groups, i, topic.len() as u64 + TEST_WORK))
            });
            if let Some(Some(url)) = urls.get(i) {
                for index in self.url_indexes(url) {
                    index.prefix_groups(&url.pathname, |groups| {
                        hits.push((groups, i, url.len() as u64 + URL_TEST_WORK))
                    });
                }
            }
        }
        let mut work = 0;
        let mut found: Vec<(&PrefixGroups, Vec<usize>)> = Vec::new();
        let mut seen: HashMap<*const PrefixGroups, usize> = HashMap::new();
        for (groups, i, per_test) in hits {
            work += groups.len() as u64 * per_test;
            let at = *seen.entry(groups).or_insert_with(|| {
                found.push((groups, Vec::new()));
                found.len() - 1
            });
            found[at].1.push(i);
        }
        if bound.is_some_and(|bound| lookups + work > bound) {
            return Err(too_much(found.iter().map(|(g, _)| g.len()).sum()));
        }
        candidates.work = work;
        candidates.groups = found
            .into_iter()
            .map(|(groups, at)| (groups.values().map(|g| g.selector.clone()).collect(), at))
            .collect();
        Ok(candidates)
    }

    /// The work of looking up the candidates of `topics`: their literal prefixes for the
    /// templates, and for the URL patterns, reading them as URLs (done already, counted here)
    /// and the literal prefixes of their pathnames in each index they may find patterns in.
    fn lookup_work(&self, topics: &[String], urls: &TopicUrls) -> u64 {
        let mut lens: Vec<usize> = topics.iter().map(String::len).collect();
        let mut work = self.templates.lookup_work(&mut lens);
        if urls.is_empty() || !self.has_url_patterns() {
            return work;
        }
        work += topics
            .iter()
            .map(|t| t.len() as u64 + PARSE_WORK)
            .sum::<u64>();
        let mut by_index: HashMap<*const PrefixIndex, (&PrefixIndex, Vec<usize>)> = HashMap::new();
        for url in urls.iter().flatten() {
            for index in self.url_indexes(url) {
                by_index
                    .entry(index)
                    .or_insert_with(|| (index, Vec::new()))
                    .1
                    .push(url.pathname.len());
            }
        }
        for (index, mut lens) in by_index.into_values() {
            work += index.lookup_work(&mut lens);
        }
        work
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Distinct templates held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        debug_assert_eq!(
            self.count,
            self.templates.templates()
                + self.any_origin.templates()
                + self
                    .by_origin
                    .values()
                    .map(PrefixIndex::templates)
                    .sum::<usize>()
        );
        self.count
    }
}

impl Candidates {
    /// Tests every candidate against the topics that start with its prefix, until one matches.
    /// Runs outside the hub's lock.
    pub fn test(self, topics: &[String]) -> Matches {
        let mut matches = Matches {
            generation: Some(self.generation),
            ..Matches::default()
        };
        for (selectors, at) in self.groups {
            for sel in selectors {
                let mut hit = false;
                for &i in &at {
                    matches.tests += 1;
                    if test_one(&sel, topics, &self.urls, i) {
                        hit = true;
                        break;
                    }
                }
                matches.results.insert(Arc::as_ptr(&sel), hit);
                matches.tested.push((sel, hit));
            }
        }
        matches.urls = self.urls;
        matches
    }
}

impl Matches {
    /// Calls `f` once with each group of `index` (as it is now, under the hub's lock) whose
    /// template matches one of `topics`. Templates tested outside the lock are taken at their
    /// result; when templates came in since the candidates were taken, the new ones are tested
    /// here (each once per topic it could match, and no more once it has). Returns the tests
    /// made here.
    pub fn each(
        &self,
        index: &TemplateIndex,
        topics: &[String],
        mut f: impl FnMut(&TemplateGroup),
    ) -> u64 {
        if index.is_empty() {
            return 0;
        }
        if self.generation == Some(index.generation) {
            // Every template held was there when the candidates were taken (some may have
            // gone since): only those that matched are looked up.
            for (sel, _) in self.tested.iter().filter(|(_, hit)| *hit) {
                if let Some(group) = index.group(sel) {
                    f(group);
                }
            }
            return 0;
        }
        // URL patterns came in before the topics were read as URLs: read them now.
        let parsed;
        let urls = if self.urls.len() == topics.len() || !index.has_url_patterns() {
            &self.urls
        } else {
            parsed = topics
                .iter()
                .map(|t| TopicUrl::parse(t, &index.base))
                .collect::<TopicUrls>();
            &parsed
        };
        let mut tests = 0;
        let mut offered: HashSet<*const TemplateGroup> = HashSet::new();
        for (i, topic) in topics.iter().enumerate() {
            let url = urls.get(i).and_then(Option::as_ref);
            index.candidates(topic, url, |group| {
                if offered.contains(&(group as *const TemplateGroup)) {
                    return;
                }
                let hit = match self.results.get(&Arc::as_ptr(&group.selector)) {
                    Some(&hit) => hit,
                    None => {
                        tests += 1;
                        test_one(&group.selector, topics, urls, i)
                    }
                };
                if hit {
                    offered.insert(group);
                    f(group);
                }
            });
        }
        tests
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::selector::{Matcher, DEFAULT_BASE};

    static BASE: std::sync::LazyLock<url::Url> =
        std::sync::LazyLock::new(|| url::Url::parse(DEFAULT_BASE).unwrap());

    fn sub(id: u64, selectors: &[&Arc<Selector>]) -> Arc<Subscriber> {
        let selectors = selectors.iter().map(|s| (*s).clone()).collect();
        Arc::new(Subscriber::new(id, selectors, None, None, None, false))
    }

    fn template(s: &str) -> Arc<Selector> {
        let sel = Arc::new(Selector::topic(s));
        assert!(sel.is_template(), "{s}");
        sel
    }

    /// The templates `candidates` offers for `topic`, and which of them match, sorted.
    fn offered(index: &TemplateIndex, topic: &str) -> (Vec<String>, Vec<String>) {
        let (mut seen, mut matching) = (Vec::new(), Vec::new());
        let url = TopicUrl::parse(topic, &BASE);
        index.candidates(topic, url.as_ref(), |g| {
            seen.push(g.selector.as_str().to_owned());
            if g.selector.matches(topic) {
                matching.push(g.selector.as_str().to_owned());
            }
        });
        seen.sort();
        matching.sort();
        (seen, matching)
    }

    #[test]
    fn a_topic_is_offered_only_templates_whose_prefix_it_starts_with() {
        let mut index = TemplateIndex::default();
        let book = template("https://example.com/books/{id}");
        let user = template("https://example.com/users/42/{res}");
        let other = template("https://example.com/users/7/{res}");
        let all = template("{+anything}");
        let s1 = sub(1, &[&book, &user]);
        let s2 = sub(2, &[&book, &other, &all]);
        index.insert(&book, &s1);
        index.insert(&user, &s1);
        index.insert(&book, &s2);
        index.insert(&other, &s2);
        index.insert(&all, &s2);
        assert_eq!(index.len(), 4);

        let (seen, matching) = offered(&index, "https://example.com/users/42/cart");
        assert_eq!(seen, ["https://example.com/users/42/{res}", "{+anything}"]);
        assert_eq!(matching, seen);
        let (seen, _) = offered(&index, "https://example.com/books/1");
        assert_eq!(seen, ["https://example.com/books/{id}", "{+anything}"]);
        // A candidate is still tested: the prefix is necessary, not sufficient.
        let (seen, matching) = offered(&index, "https://example.com/books/1/2");
        assert_eq!(seen.len(), 2);
        assert_eq!(matching, ["{+anything}"]);
        // The template itself, as a topic, starts with its prefix and matches.
        let (_, matching) = offered(&index, "https://example.com/books/{id}");
        assert!(matching.contains(&"https://example.com/books/{id}".to_owned()));
    }

    #[test]
    fn a_cut_inside_a_character_is_skipped() {
        let mut index = TemplateIndex::default();
        // Prefix "é" is two bytes; "x" one: a topic starting with "€" (three bytes) is cut at
        // byte 1 and 2, inside its first character, and must not panic.
        let e = template("é{x}");
        let x = template("x{y}");
        index.insert(&e, &sub(1, &[&e]));
        index.insert(&x, &sub(2, &[&x]));
        assert_eq!(offered(&index, "€uro").0, Vec::<String>::new());
        assert_eq!(offered(&index, "éa").1, ["é{x}"]);
    }

    #[test]
    fn removing_the_last_subscriber_removes_the_template_and_its_prefix() {
        let mut index = TemplateIndex::default();
        let a = template("/a/{x}");
        let b = template("/a/{x}/{y}");
        let (s1, s2) = (sub(1, &[&a, &b]), sub(2, &[&a]));
        index.insert(&a, &s1);
        index.insert(&b, &s1);
        index.insert(&a, &s2);
        index.remove(&a, 1);
        assert_eq!(index.len(), 2);
        index.remove(&b, 1);
        assert_eq!(index.len(), 1);
        // Removing twice, or what was never there, changes nothing.
        index.remove(&b, 1);
        index.remove(&a, 9);
        assert_eq!(index.len(), 1);
        index.remove(&a, 2);
        assert!(index.is_empty());
        assert!(
            index.templates.lengths.is_empty(),
            "{:?}",
            index.templates.lengths
        );
    }

    #[test]
    fn the_lookup_work_is_counted_from_the_lengths() {
        let mut index = TemplateIndex::default();
        for (i, t) in ["{x}", "a{x}", "ab{x}", "abcd{x}", "b{x}", "é{x}"]
            .iter()
            .enumerate()
        {
            let sel = template(t);
            index.insert(&sel, &sub(i as u64, &[&sel]));
        }
        let topics: Vec<String> = ["", "a", "abc", "abcdef", "zz", "abcdef"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        let by_hand: u64 = topics
            .iter()
            .map(|t| {
                index
                    .templates
                    .lengths
                    .keys()
                    .filter(|&&len| len <= t.len())
                    .map(|&len| len as u64 + LOOKUP_WORK)
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(index.lookup_work(&topics, &Vec::new()), by_hand);
    }

    #[test]
    fn a_publish_that_asks_too_much_is_refused_before_anything_is_taken() {
        let mut index = TemplateIndex::default();
        for i in 0..300 {
            let sel = template(&format!("/t/{{x}}{i}"));
            index.insert(&sel, &sub(i, &[&sel]));
        }
        let other = template("/u/{x}");
        index.insert(&other, &sub(300, &[&other]));
        // A few short topics against all of them: well within the bound.
        let few: Vec<String> = (0..10).map(|i| format!("/t/{i}")).collect();
        let c = index
            .collect(&few, Vec::new(), Some(MAX_MATCHING_WORK))
            .unwrap();
        assert_eq!(c.groups.len(), 1, "one prefix, taken once");
        assert_eq!(c.groups[0].0.len(), 300);
        assert_eq!(c.groups[0].1.len(), 10);
        // 250 topics of 4,000 bytes against 300 templates: 250 × 300 × 4,064 units.
        let many: Vec<String> = (0..250)
            .map(|i| format!("/t/{}{i}", "x".repeat(4000)))
            .collect();
        assert_eq!(
            index
                .collect(&many, Vec::new(), Some(MAX_MATCHING_WORK))
                .err(),
            Some(TooMuchMatching {
                topics: 250,
                templates: 300
            })
        );
        // Without a bound (cluster mode), nothing is refused.
        assert!(index.collect(&many, Vec::new(), None).is_ok());
        // A topic as long as topics go, against a prefix of every length up to it: refused
        // for the lookups alone.
        let mut index = TemplateIndex::default();
        for len in 0..4000 {
            let sel = template(&format!("{}{{x}}", "p".repeat(len)));
            index.insert(&sel, &sub(len as u64, &[&sel]));
        }
        let long: Vec<String> = (0..10).map(|_| "p".repeat(4096)).collect();
        assert_eq!(
            index
                .collect(&long, Vec::new(), Some(MAX_MATCHING_WORK))
                .err(),
            Some(TooMuchMatching {
                topics: 10,
                templates: 4000
            })
        );
    }

    #[test]
    fn matches_taken_outside_the_lock_cover_what_came_in_meanwhile() {
        let mut index = TemplateIndex::default();
        let a = template("/a/{x}");
        let b = template("/b/{x}");
        index.insert(&a, &sub(1, &[&a]));
        index.insert(&b, &sub(2, &[&b]));
        let topics = vec!["/a/1".to_owned(), "/c/1".to_owned()];
        let offered = |matches: &Matches, index: &TemplateIndex| {
            let mut ids = Vec::new();
            matches.each(index, &topics, |g| ids.extend(g.subs.keys().copied()));
            ids.sort();
            ids
        };
        let matches = index
            .collect(&topics, Vec::new(), None)
            .unwrap()
            .test(&topics);
        assert_eq!(offered(&matches, &index), [1]);
        // A subscriber to a template already tested: taken at its result.
        index.insert(&a, &sub(3, &[&a]));
        assert_eq!(offered(&matches, &index), [1, 3]);
        // A template gone since: skipped.
        index.remove(&a, 1);
        index.remove(&a, 3);
        assert_eq!(offered(&matches, &index), Vec::<u64>::new());
        // New templates: tested here.
        let any = template("/{+p}");
        let c = template("/c/{x}");
        index.insert(&a, &sub(4, &[&a]));
        index.insert(&any, &sub(5, &[&any]));
        index.insert(&c, &sub(6, &[&c]));
        let d = template("/d/{x}");
        index.insert(&d, &sub(7, &[&d]));
        assert_eq!(offered(&matches, &index), [4, 5, 6]);
        // With nothing precomputed, everything is tested here.
        assert_eq!(offered(&Matches::default(), &index), [4, 5, 6]);
    }

    fn url_pattern(s: &str) -> Arc<Selector> {
        let sel = Arc::new(Selector::compile(&Matcher::url_pattern(s)));
        assert!(matches!(*sel, Selector::UrlPattern(_)), "{s}");
        sel
    }

    fn urls(topics: &[String]) -> TopicUrls {
        topics.iter().map(|t| TopicUrl::parse(t, &BASE)).collect()
    }

    #[test]
    fn url_patterns_are_found_through_what_they_fix_of_the_topic_as_a_url() {
        let mut index = TemplateIndex::default();
        let patterns = [
            "https://example.com/books/:id",
            "https://example.com/users/:id/cart",
            "https://example.org/books/:id",
            "http://example.com/books/:id",
            "https://example.com:8443/books/:id",
            "/books/:id",
            "https://*.example.com/books/:id",
            "https://*.example.com/*",
            "https://example.com/caf%C3%A9/:x",
        ];
        for (i, p) in patterns.iter().enumerate() {
            let sel = url_pattern(p);
            index.insert(&sel, &sub(i as u64, &[&sel]));
        }
        assert_eq!(index.len(), patterns.len());
        assert!(index.has_url_patterns());
        // The topic is compared as the URL parser reads it, not as written.
        for topic in [
            "https://example.com/books/1",
            "HTTPS://Example.COM/books/1",
            "https://example.com:443/books/./1",
            "https://example.com/x/../books/1?q#f",
        ] {
            let (seen, matching) = offered(&index, topic);
            assert_eq!(
                seen,
                [
                    "https://*.example.com/*",
                    "https://*.example.com/books/:id",
                    "https://example.com/books/:id"
                ],
                "{topic}"
            );
            assert_eq!(matching, ["https://example.com/books/:id"], "{topic}");
        }
        let (seen, matching) = offered(&index, "https://example.com/café/1");
        assert!(seen.contains(&"https://example.com/caf%C3%A9/:x".to_owned()));
        assert_eq!(matching, ["https://example.com/caf%C3%A9/:x"]);
        // Another host, port or scheme: only the patterns that leave the host open.
        for topic in [
            "https://example.net/books/1",
            "https://example.com:8080/books/1",
            "ftp://example.com/books/1",
        ] {
            let (seen, _) = offered(&index, topic);
            assert_eq!(
                seen,
                ["https://*.example.com/*", "https://*.example.com/books/:id"],
                "{topic}"
            );
        }
        // A relative topic and a relative pattern are read against the hub's URL.
        let (seen, matching) = offered(&index, "/books/7");
        assert_eq!(matching, ["/books/:id"]);
        assert!(seen.len() <= 3, "{seen:?}");
        // No URL reference: no URL pattern at all.
        assert_eq!(offered(&index, "http://[::1").0, Vec::<String>::new());
        // Removing them all leaves nothing behind.
        for (i, p) in patterns.iter().enumerate() {
            index.remove(&url_pattern(p), i as u64);
        }
        assert!(index.is_empty() && !index.has_url_patterns());
        assert!(index.by_origin.is_empty() && index.any_origin.is_empty());
    }

    #[test]
    fn url_patterns_of_other_hosts_are_not_tested_nor_counted() {
        let mut index = TemplateIndex::default();
        for i in 0..2000u64 {
            let sel = url_pattern(&format!("https://host{i}.example/items/:id"));
            index.insert(&sel, &sub(i, &[&sel]));
        }
        let mine = url_pattern("https://mine.example/items/:id");
        index.insert(&mine, &sub(9999, &[&mine]));
        let topics = vec!["https://MINE.example/items/1".to_owned()];
        let c = index
            .collect(&topics, urls(&topics), Some(MAX_MATCHING_WORK))
            .unwrap();
        assert!(c.work < 1000, "{}", c.work);
        let matches = c.test(&topics);
        assert_eq!(matches.tests, 1);
        let mut ids = Vec::new();
        matches.each(&index, &topics, |g| ids.extend(g.subs.keys().copied()));
        assert_eq!(ids, [9999]);
    }

    #[test]
    fn url_patterns_that_came_before_the_lock_but_after_the_topics_were_read_are_tested() {
        // The hub reads topics as URLs only when it saw URL patterns held; one may come in
        // between, and the candidates taken then must still cover it.
        let mut index = TemplateIndex::default();
        let sel = url_pattern("/books/:id");
        index.insert(&sel, &sub(1, &[&sel]));
        let topics = vec!["/books/1".to_owned()];
        let matches = index
            .collect(&topics, Vec::new(), None)
            .unwrap()
            .test(&topics);
        assert_eq!(matches.tests, 1);
        let mut ids = Vec::new();
        matches.each(&index, &topics, |g| ids.extend(g.subs.keys().copied()));
        assert_eq!(ids, [1]);
    }

    #[test]
    fn a_publish_that_asks_too_much_of_the_url_patterns_is_refused() {
        let mut index = TemplateIndex::default();
        for i in 0..300u64 {
            let sel = url_pattern(&format!("/t/:x/{i}"));
            index.insert(&sel, &sub(i, &[&sel]));
        }
        let many: Vec<String> = (0..250)
            .map(|i| format!("/t/{}{i}", "x".repeat(4000)))
            .collect();
        assert_eq!(
            index
                .collect(&many, urls(&many), Some(MAX_MATCHING_WORK))
                .err(),
            Some(TooMuchMatching {
                topics: 250,
                templates: 300
            })
        );
        let few: Vec<String> = (0..10).map(|i| format!("/t/{i}")).collect();
        assert!(index
            .collect(&few, urls(&few), Some(MAX_MATCHING_WORK))
            .is_ok());
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;

        /// Bits of URL patterns and topics that meet: hosts, ports and segments alike in both,
        /// written in different cases, encodings and spellings.
        fn scheme() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec!["https", "http", "HTTPS", "wss"])
        }
        fn host() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "example.com",
                "EXAMPLE.com",
                "a.example.com",
                "example.org",
                "xn--caf-dma.example",
                "café.example",
                "127.0.0.1",
                "[::1]",
            ])
        }
        fn port() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec!["", ":443", ":80", ":8443"])
        }
        fn segment() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "books",
                "Books",
                "1",
                "42",
                "café",
                "caf%C3%A9",
                ".",
                "..",
                "",
                "a b",
                "%2F",
            ])
        }
        fn pattern_segment() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "books",
                "Books",
                "1",
                ":id",
                ":id(\\d+)",
                "*",
                "caf%C3%A9",
                "café",
                "{:x}?",
                "(books|users)",
                "b*",
            ])
        }
        fn pattern_host() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "example.com",
                "EXAMPLE.com",
                "*.example.com",
                "*",
                ":sub.example.com",
                "example.org",
                "café.example",
                "127.0.0.1",
                "[::1]",
            ])
        }

        fn topic() -> impl Strategy<Value = String> {
            let absolute = (
                scheme(),
                host(),
                port(),
                prop::collection::vec(segment(), 0..4),
            )
                .prop_map(|(s, h, p, path)| format!("{s}://{h}{p}/{}", path.join("/")));
            let relative = prop::collection::vec(segment(), 0..4).prop_map(|path| path.join("/"));
            let rooted =
                prop::collection::vec(segment(), 0..4).prop_map(|p| format!("/{}", p.join("/")));
            (
                prop_oneof![absolute, relative, rooted],
                prop::sample::select(vec!["", "?q=1", "#f"]),
            )
                .prop_map(|(t, tail)| format!("{t}{tail}"))
        }

        fn pattern() -> impl Strategy<Value = String> {
            let scheme = prop::sample::select(vec!["https", "http", "*", "http{s}?"]);
            let absolute = (
                scheme,
                pattern_host(),
                port(),
                prop::collection::vec(pattern_segment(), 0..4),
            )
                .prop_map(|(s, h, p, path)| format!("{s}://{h}{p}/{}", path.join("/")));
            let rooted = prop::collection::vec(pattern_segment(), 0..4)
                .prop_map(|p| format!("/{}", p.join("/")));
            let relative = prop::collection::vec(pattern_segment(), 1..4).prop_map(|p| p.join("/"));
            prop_oneof![absolute, rooted, relative]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            /// Whatever the patterns and topics, the subscribers the index offers an update
            /// to are exactly those a test of every pattern against every topic finds.
            #[test]
            fn the_index_finds_every_match(
                patterns in prop::collection::vec(pattern(), 1..12),
                topics in prop::collection::vec(topic(), 1..4),
            ) {
                let mut index = TemplateIndex::default();
                let mut compiled = Vec::new();
                for (i, p) in patterns.iter().enumerate() {
                    let sel = Arc::new(Selector::compile(&Matcher::url_pattern(p)));
                    if matches!(*sel, Selector::UrlPattern(_)) {
                        index.insert(&sel, &sub(i as u64, &[&sel]));
                        compiled.push((i as u64, sel));
                    }
                }
                let expected: HashSet<u64> = compiled
                    .iter()
                    .filter(|(_, sel)| sel.matches_any(&topics))
                    .map(|(i, _)| *i)
                    .collect();
                let matches = index
                    .collect(&topics, urls(&topics), Some(MAX_MATCHING_WORK))
                    .unwrap()
                    .test(&topics);
                let mut found = HashSet::new();
                matches.each(&index, &topics, |g| found.extend(g.subs.keys().copied()));
                prop_assert_eq!(&found, &expected);
                // And through the fan-out's own tests, nothing taken before.
                let mut found = HashSet::new();
                Matches::default().each(&index, &topics, |g| {
                    found.extend(g.subs.keys().copied())
                });
                prop_assert_eq!(&found, &expected);
                // Matching a topic read once as a URL is matching it as written.
                for (_, sel) in &compiled {
                    let Selector::UrlPattern(p) = &**sel else { unreachable!() };
                    for t in &topics {
                        let url = url::Url::options().base_url(Some(&BASE)).parse(t);
                        let by_crate = url.is_ok_and(|u| {
                            p.pattern_for_tests()
                                .test(urlpattern::UrlPatternMatchInput::Url(u))
                                .unwrap_or(false)
                        });
                        prop_assert_eq!(sel.matches(t), by_crate, "{} vs {}", sel.as_str(), t);
                    }
                }
            }
        }
    }
}
