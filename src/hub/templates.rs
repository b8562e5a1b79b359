//! Template selectors in use, grouped by template and found through their literal prefix.
//!
//! Every topic a URI template matches starts with the template's text before its first `{`
//! (it is compared as a string before the rest is matched; a topic equal to the template
//! itself starts with it too). So a publish only tests the templates whose prefix its topic starts
//! with, each once however many subscribers share it, instead of every template of every
//! subscriber: with one template per user (`/users/42/{resource}`), a publish to one user's
//! topic tests that user's templates alone.
//!
//! Testing templates is the costly part of a publish, so it is done outside the hub's lock:
//! [`TemplateIndex::collect`] takes the candidates under it (and refuses a publish that would
//! test too many), [`Candidates::test`] tests them after it, and [`Matches::each`], in the
//! fan-out under the lock again, offers the update to the subscribers of those that matched,
//! testing there only templates that came in between.

use std::collections::{btree_map, BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::selector::{MatchType, Selector};
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

#[derive(Default)]
pub(super) struct TemplateIndex {
    /// Literal prefix → template source → its subscribers.
    by_prefix: HashMap<Box<str>, PrefixGroups>,
    /// How many prefixes of each length are in `by_prefix`: the lengths a topic is cut at.
    lengths: BTreeMap<usize, usize>,
    /// Distinct templates held.
    templates: usize,
    /// Counts the templates added: `Candidates` taken at one generation cover every template
    /// present at a later one with the same count.
    generation: u64,
}

/// The most work one publish may ask of the hub's URI templates, in units of about a byte
/// compared or hashed (a nanosecond or so): 2^26, some 67 million. A publish of ten topics of
/// 300 bytes tested against 10,000 templates is about 36 million; 250 topics of 4,000 bytes
/// against 2,000 templates, 2 billion.
pub const MAX_MATCHING_WORK: u64 = 1 << 26;
/// The work of one test of a topic against a template, beside the topic's bytes.
const TEST_WORK: u64 = 64;
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

/// The templates an update's topics could match, taken under the hub's lock, to test after it.
pub(super) struct Candidates {
    generation: u64,
    /// The estimated work of testing them (see [`MAX_MATCHING_WORK`]).
    pub work: u64,
    /// The templates of each literal prefix found, with the topics (by index) starting with it.
    groups: Vec<(Vec<Arc<Selector>>, Vec<usize>)>,
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
}

// SAFETY: the pointers are only compared, as map keys, never read through; the selectors
// they point to are held by `tested` (`Arc<Selector>` is `Send`). A publish's matches travel
// with it to the durable history's writer thread.
unsafe impl Send for Matches {}

impl TemplateIndex {
    /// Adds `sub` under the template `sel` (a no-op for other selectors).
    pub fn insert(&mut self, sel: &Arc<Selector>, sub: &Arc<Subscriber>) {
        let Some(prefix) = sel.literal_prefix() else {
            return;
        };
        let key = group_key(sel);
        if !self
            .by_prefix
            .get(prefix)
            .is_some_and(|g| g.contains_key(&key))
        {
            self.templates += 1;
            self.generation += 1;
        }
        let groups = match self.by_prefix.get_mut(prefix) {
            Some(groups) => groups,
            None => {
                *self.lengths.entry(prefix.len()).or_default() += 1;
                self.by_prefix.entry(prefix.into()).or_default()
            }
        };
        groups
            .entry(key)
            .or_insert_with(|| TemplateGroup {
                selector: sel.clone(),
                subs: HashMap::new(),
            })
            .subs
            .insert(sub.id, sub.clone());
    }

    /// Removes subscriber `id` from the template `sel`, and the template when it was the last.
    pub fn remove(&mut self, sel: &Selector, id: u64) {
        let Some(prefix) = sel.literal_prefix() else {
            return;
        };
        let Some(groups) = self.by_prefix.get_mut(prefix) else {
            return;
        };
        let key = group_key(sel);
        if let Some(group) = groups.get_mut(&key) {
            group.subs.remove(&id);
            if group.subs.is_empty() {
                groups.remove(&key);
                self.templates -= 1;
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
    }

    /// Calls `f` with every template whose literal prefix `topic` starts with: the only ones
    /// that can match it (`f` still tests the template). One hash lookup per distinct prefix
    /// length up to the topic's.
    pub fn candidates(&self, topic: &str, mut f: impl FnMut(&TemplateGroup)) {
        self.prefix_groups(topic, |groups| groups.values().for_each(&mut f));
    }

    /// Calls `f` with the templates of each literal prefix `topic` starts with.
    fn prefix_groups<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a PrefixGroups)) {
        for &len in self.lengths.range(..=topic.len()).map(|(len, _)| len) {
            // `get` is `None` where `len` would cut a character: no prefix ends there.
            if let Some(groups) = topic.get(..len).and_then(|p| self.by_prefix.get(p)) {
                f(groups);
            }
        }
    }

    /// The group of the template `sel`, if held.
    fn group(&self, sel: &Selector) -> Option<&TemplateGroup> {
        self.by_prefix
            .get(sel.literal_prefix()?)?
            .get(&group_key(sel))
    }

    /// The templates `topics` could match, to be tested outside the lock with
    /// [`Candidates::test`]. With a `bound`, refuses topics that would ask more work than
    /// that, before taking any (this runs under the hub's lock): first for looking their
    /// prefixes up, then for testing them.
    pub fn collect(
        &self,
        topics: &[String],
        bound: Option<u64>,
    ) -> Result<Candidates, TooMuchMatching> {
        let mut candidates = Candidates {
            generation: self.generation,
            work: 0,
            groups: Vec::new(),
        };
        if self.is_empty() {
            return Ok(candidates);
        }
        let too_much = |templates| TooMuchMatching {
            topics: topics.len(),
            templates,
        };
        let lookups = bound.map_or(0, |_| self.lookup_work(topics));
        if bound.is_some_and(|bound| lookups > bound) {
            return Err(too_much(self.templates));
        }
        let mut work = 0;
        let mut found: Vec<(&PrefixGroups, Vec<usize>)> = Vec::new();
        let mut seen: HashMap<*const PrefixGroups, usize> = HashMap::new();
        for (i, topic) in topics.iter().enumerate() {
            self.prefix_groups(topic, |groups| {
                work += groups.len() as u64 * (topic.len() as u64 + TEST_WORK);
                let at = *seen.entry(groups).or_insert_with(|| {
                    found.push((groups, Vec::new()));
                    found.len() - 1
                });
                found[at].1.push(i);
            });
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

    /// The work of looking up the literal prefixes of `topics`: each topic is cut at every
    /// prefix length up to its own, and each cut hashed. Counted from the lengths alone, in
    /// one pass over them with the topics by length.
    fn lookup_work(&self, topics: &[String]) -> u64 {
        let mut lens: Vec<usize> = topics.iter().map(String::len).collect();
        lens.sort_unstable();
        let mut prefixes = self.lengths.keys().peekable();
        let (mut per_topic, mut total) = (0u64, 0u64);
        for len in lens {
            while let Some(&&p) = prefixes.peek().filter(|&&&p| p <= len) {
                per_topic += p as u64 + LOOKUP_WORK;
                prefixes.next();
            }
            total += per_topic;
        }
        total
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Distinct templates held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        debug_assert_eq!(
            self.templates,
            self.by_prefix.values().map(HashMap::len).sum::<usize>()
        );
        self.templates
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
                let hit = at.iter().any(|&i| sel.matches(&topics[i]));
                matches.results.insert(Arc::as_ptr(&sel), hit);
                matches.tested.push((sel, hit));
            }
        }
        matches
    }
}

impl Matches {
    /// Calls `f` once with each group of `index` (as it is now, under the hub's lock) whose
    /// template matches one of `topics`. Templates tested outside the lock are taken at their
    /// result; when templates came in since the candidates were taken, the new ones are tested
    /// here (each once per topic it could match, and no more once it has).
    pub fn each(
        &self,
        index: &TemplateIndex,
        topics: &[String],
        mut f: impl FnMut(&TemplateGroup),
    ) {
        if index.is_empty() {
            return;
        }
        if self.generation == Some(index.generation) {
            // Every template held was there when the candidates were taken (some may have
            // gone since): only those that matched are looked up.
            for (sel, _) in self.tested.iter().filter(|(_, hit)| *hit) {
                if let Some(group) = index.group(sel) {
                    f(group);
                }
            }
            return;
        }
        let mut offered: HashSet<*const TemplateGroup> = HashSet::new();
        for topic in topics {
            index.candidates(topic, |group| {
                if offered.contains(&(group as *const TemplateGroup)) {
                    return;
                }
                let hit = match self.results.get(&Arc::as_ptr(&group.selector)) {
                    Some(&hit) => hit,
                    None => group.selector.matches(topic),
                };
                if hit {
                    offered.insert(group);
                    f(group);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: u64, selectors: &[&Arc<Selector>]) -> Arc<Subscriber> {
        let selectors = selectors.iter().map(|s| (*s).clone()).collect();
        Arc::new(Subscriber::new(id, selectors, None, None, None))
    }

    fn template(s: &str) -> Arc<Selector> {
        let sel = Arc::new(Selector::topic(s));
        assert!(sel.is_template(), "{s}");
        sel
    }

    /// The templates `candidates` offers for `topic`, and which of them match, sorted.
    fn offered(index: &TemplateIndex, topic: &str) -> (Vec<String>, Vec<String>) {
        let (mut seen, mut matching) = (Vec::new(), Vec::new());
        index.candidates(topic, |g| {
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
        assert!(index.lengths.is_empty(), "{:?}", index.lengths);
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
                    .lengths
                    .keys()
                    .filter(|&&len| len <= t.len())
                    .map(|&len| len as u64 + LOOKUP_WORK)
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(index.lookup_work(&topics), by_hand);
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
        let c = index.collect(&few, Some(MAX_MATCHING_WORK)).unwrap();
        assert_eq!(c.groups.len(), 1, "one prefix, taken once");
        assert_eq!(c.groups[0].0.len(), 300);
        assert_eq!(c.groups[0].1.len(), 10);
        // 250 topics of 4,000 bytes against 300 templates: 250 × 300 × 4,064 units.
        let many: Vec<String> = (0..250)
            .map(|i| format!("/t/{}{i}", "x".repeat(4000)))
            .collect();
        assert_eq!(
            index.collect(&many, Some(MAX_MATCHING_WORK)).err(),
            Some(TooMuchMatching {
                topics: 250,
                templates: 300
            })
        );
        // Without a bound (cluster mode), nothing is refused.
        assert!(index.collect(&many, None).is_ok());
        // A topic as long as topics go, against a prefix of every length up to it: refused
        // for the lookups alone.
        let mut index = TemplateIndex::default();
        for len in 0..4000 {
            let sel = template(&format!("{}{{x}}", "p".repeat(len)));
            index.insert(&sel, &sub(len as u64, &[&sel]));
        }
        let long: Vec<String> = (0..10).map(|_| "p".repeat(4096)).collect();
        assert_eq!(
            index.collect(&long, Some(MAX_MATCHING_WORK)).err(),
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
        let matches = index.collect(&topics, None).unwrap().test(&topics);
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
}
