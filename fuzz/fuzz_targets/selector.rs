//! Topic selectors: compiling any string and matching any topic never panics; a selector
//! always matches itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssehub::hub::Selector;

fuzz_target!(|input: (&str, &str)| {
    let (selector, topic) = input;
    let s = Selector::compile(selector);
    let _ = s.matches(topic);
    assert!(s.matches(selector), "{selector:?} does not match itself");
});
