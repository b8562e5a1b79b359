//! The publish form and query parser: never panics, and what it accepts survives a round trip
//! through the client's encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssehub::client::encode_form;
use ssehub::http::form::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = parse(data, 2000) {
        let borrowed: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let again = parse(encode_form(&borrowed).as_bytes(), 2000).expect("re-encoded form parses");
        assert_eq!(again, pairs);
    }
});
