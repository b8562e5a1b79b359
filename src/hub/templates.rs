//! Template selectors in use, grouped by template and found through their literal prefix.
//!
//! Every topic a URI template matches starts with the template's text before its first `{`
//! (it is compared as a string before the rest is matched; a topic equal to the template
//! itself starts with it too). So a publish only tests the templates whose prefix its topic starts
//! with, each once however many subscribers share it, instead of every template of every
//! subscriber: with one template per user (`/users/42/{resource}`), a publish to one user's
//! topic tests that user's templates alone.

use std::collections::{btree_map, BTreeMap, HashMap};
use std::sync::Arc;

use super::selector::Selector;
use super::subscriber::Subscriber;

/// The subscribers that hold one template.
pub(super) struct TemplateGroup {
    pub selector: Arc<Selector>,
    pub subs: HashMap<u64, Arc<Subscriber>>,
}

#[derive(Default)]
pub(super) struct TemplateIndex {
    /// Literal prefix → template source → its subscribers.
    by_prefix: HashMap<Box<str>, HashMap<Box<str>, TemplateGroup>>,
    /// How many prefixes of each length are in `by_prefix`: the lengths a topic is cut at.
    lengths: BTreeMap<usize, usize>,
}

impl TemplateIndex {
    /// Adds `sub` under the template `sel` (a no-op for other selectors).
    pub fn insert(&mut self, sel: &Arc<Selector>, sub: &Arc<Subscriber>) {
        let Some(prefix) = sel.literal_prefix() else {
            return;
        };
        let groups = match self.by_prefix.get_mut(prefix) {
            Some(groups) => groups,
            None => {
                *self.lengths.entry(prefix.len()).or_default() += 1;
                self.by_prefix.entry(prefix.into()).or_default()
            }
        };
        groups
            .entry(sel.as_str().into())
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
        if let Some(group) = groups.get_mut(sel.as_str()) {
            group.subs.remove(&id);
            if group.subs.is_empty() {
                groups.remove(sel.as_str());
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
        for &len in self.lengths.range(..=topic.len()).map(|(len, _)| len) {
            // `get` is `None` where `len` would cut a character: no prefix ends there.
            let Some(groups) = topic.get(..len).and_then(|p| self.by_prefix.get(p)) else {
                continue;
            };
            for group in groups.values() {
                f(group);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Distinct templates held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_prefix.values().map(HashMap::len).sum()
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
        let sel = Arc::new(Selector::compile(s));
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
}
