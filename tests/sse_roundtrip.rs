//! The encoder and the parser against an independent parser (`eventsource-stream`).

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use proptest::prelude::*;
use ssehub::sse::{encode_event, Parser};

fn oracle(chunks: Vec<Bytes>) -> Vec<eventsource_stream::Event> {
    let stream =
        futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::convert::Infallible>));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(stream.eventsource().map(|e| e.unwrap()).collect())
}

fn normalize(data: &str) -> String {
    data.replace("\r\n", "\n").replace('\r', "\n")
}

fn id_strategy() -> impl Strategy<Value = String> {
    "[^\r\n\0]{0,20}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn encoding_parses_back_to_the_same_fields(
        id in id_strategy(),
        event_type in proptest::option::of("[^\r\n\0]{1,10}"),
        retry in proptest::option::of(0u64..1_000_000),
        data in "(\r\n|\r|\n|[a-zé€😀 ]|\\PC){0,40}",
    ) {
        let bytes = encode_event(&id, event_type.as_deref(), retry, &data);
        let events = oracle(vec![Bytes::from_static(b":\n"), bytes.clone()]);
        prop_assert_eq!(events.len(), 1);
        let e = &events[0];
        prop_assert_eq!(&e.data, &normalize(&data));
        prop_assert_eq!(&e.id, &id);
        prop_assert_eq!(&e.event, event_type.as_deref().unwrap_or("message"));
        prop_assert_eq!(e.retry, retry.map(std::time::Duration::from_millis));

        let mut ours = Parser::new();
        let mut out = Vec::new();
        ours.feed(b":\n", &mut out).unwrap();
        ours.feed(&bytes, &mut out).unwrap();
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(&out[0].data, &normalize(&data));
        prop_assert_eq!(&out[0].id, &id);
        prop_assert_eq!(out[0].retry, retry);
    }

    /// Arbitrary event-stream text, cut at arbitrary places: our parser agrees with the oracle.
    #[test]
    fn parser_agrees_with_the_oracle_on_any_split(
        lines in proptest::collection::vec(
            prop_oneof![
                "data(: ?[a-z\u{e9} ]{0,6})?",
                "id(: ?[a-z0-9]{0,4})?",
                "event: [a-z]{1,4}",
                ":[a-z ]{0,4}",
                Just(String::new()),
            ],
            0..20,
        ),
        breaks in proptest::collection::vec(prop_oneof![Just("\n"), Just("\r"), Just("\r\n")], 20),
        cuts in proptest::collection::vec(0usize..200, 0..6),
    ) {
        let mut text = String::new();
        for (i, l) in lines.iter().enumerate() {
            text.push_str(l);
            text.push_str(breaks[i % breaks.len()]);
        }
        text.push_str("\n\n");
        let bytes = text.as_bytes();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.sort();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain([bytes.len()]) {
            chunks.push(Bytes::copy_from_slice(&bytes[prev..c]));
            prev = c;
        }
        let expected = oracle(chunks.clone());
        let mut ours = Parser::new();
        let mut got = Vec::new();
        for c in &chunks {
            ours.feed(c, &mut got).unwrap();
        }
        prop_assert_eq!(got.len(), expected.len(), "text {:?}", text);
        for (g, e) in got.iter().zip(&expected) {
            prop_assert_eq!(&g.data, &e.data);
            prop_assert_eq!(&g.id, &e.id);
            let ty = if g.event_type.is_empty() { "message" } else { g.event_type.as_str() };
            prop_assert_eq!(ty, e.event.as_str());
        }
    }
}
