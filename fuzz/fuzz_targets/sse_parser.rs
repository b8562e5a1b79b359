//! The incremental SSE parser: never panics, and gives the same events however the input is
//! cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssehub::sse::Parser;

fuzz_target!(|input: (u16, &[u8])| {
    let (cut, data) = input;
    let mut whole = Vec::new();
    let mut p = Parser::new();
    p.feed(data, &mut whole).unwrap();

    let cut = usize::from(cut) % (data.len() + 1);
    let mut split = Vec::new();
    let mut q = Parser::new();
    q.feed(&data[..cut], &mut split).unwrap();
    q.feed(&data[cut..], &mut split).unwrap();
    assert_eq!(whole, split);
    assert_eq!(p.last_event_id(), q.last_event_id());
});
