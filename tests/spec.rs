//! Every edge case of the event-stream format, each fed whole, split at every byte position and
//! one byte at a time: the parser must produce the same events, ids and leftovers every time.

use bytes::Bytes;
use tower_sse::wire::{Event, Limits, Parser, Scanner};

/// What a client would observe from a whole stream.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// `(type, data, last_event_id after dispatch)` per fired message.
    messages: Vec<(String, String, Vec<u8>)>,
    /// Every dispatched block, fired or not.
    blocks: Vec<Event>,
    last_event_id: Vec<u8>,
    retry_ms: Option<u128>,
    discarded_at_end: bool,
}

fn run(chunks: &[&[u8]], limits: Limits) -> Outcome {
    let mut parser = Parser::with_limits(limits);
    let mut messages = Vec::new();
    let mut blocks = Vec::new();
    for chunk in chunks {
        parser.push(Bytes::copy_from_slice(chunk));
        while let Some(event) = parser.next_event() {
            let event = event.expect("no limit error");
            if event.is_message() {
                let kind = event
                    .event_type()
                    .map_or("message".to_owned(), |t| String::from_utf8_lossy(t).into());
                messages.push((
                    kind,
                    event.data().unwrap().into_owned(),
                    parser.last_event_id().to_vec(),
                ));
            }
            blocks.push(event);
        }
    }
    let last_event_id = parser.last_event_id().to_vec();
    let retry_ms = parser.reconnection_time().map(|d| d.as_millis());
    let discarded_at_end = parser.finish();
    Outcome {
        messages,
        blocks,
        last_event_id,
        retry_ms,
        discarded_at_end,
    }
}

/// Parses `stream` whole, split in two at every position, and byte by byte; all must agree.
fn parse_every_way(stream: &[u8]) -> Outcome {
    parse_every_way_with(stream, Limits::default())
}

fn parse_every_way_with(stream: &[u8], limits: Limits) -> Outcome {
    let whole = run(&[stream], limits);
    for split in 0..=stream.len() {
        let (a, b) = stream.split_at(split);
        assert_eq!(run(&[a, b], limits), whole, "split at {split}");
    }
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run(&bytes, limits), whole, "one byte at a time");
    // The scanner must agree with the parser on where events end.
    assert_eq!(dispatch_count(&[stream]), dispatch_count(&bytes));
    whole
}

fn dispatch_count(chunks: &[&[u8]]) -> usize {
    let mut scanner = Scanner::new();
    let mut count = 0;
    for chunk in chunks {
        for piece in scanner.pieces(chunk) {
            if let tower_sse::wire::Piece::Dispatch { .. } = piece.unwrap() {
                count += 1;
            }
        }
    }
    count
}

fn datas(outcome: &Outcome) -> Vec<&str> {
    outcome.messages.iter().map(|m| m.1.as_str()).collect()
}

#[test]
fn cr_lf_crlf_split_across_chunks() {
    let chunks: [&[u8]; 4] = [b"data: a\r", b"\ndata: b\r", b"\n", b"\r\n"];
    let outcome = run(&chunks, Limits::default());
    assert_eq!(datas(&outcome), ["a\nb"]);
    assert_eq!(outcome, parse_every_way(&chunks.concat()));
}

#[test]
fn mixed_line_endings_and_valueless_data() {
    let outcome = parse_every_way(b"data:test\r\ndata\ndata:test\r\n\r\n");
    assert_eq!(datas(&outcome), ["test\n\ntest"]);
}

#[test]
fn only_one_leading_space_is_stripped_and_tabs_stay() {
    let outcome = parse_every_way(b"data:\ttest\rdata: \ndata:test\n\n");
    assert_eq!(datas(&outcome), ["\ttest\n\ntest"]);
    let outcome = parse_every_way(b"data:  two\n\n");
    assert_eq!(datas(&outcome), [" two"]);
}

#[test]
fn one_leading_bom_is_dropped_a_second_spoils_the_first_line() {
    let outcome = parse_every_way(b"\xEF\xBB\xBF\xEF\xBB\xBFdata:1\n\ndata:2\n\n");
    assert_eq!(datas(&outcome), ["2"]);
    let outcome = parse_every_way(b"\xEF\xBB\xBFdata:1\n\ndata:2\n\n");
    assert_eq!(datas(&outcome), ["1", "2"]);
    // A BOM later in the stream is an ordinary character.
    let outcome = parse_every_way(b"data:1\n\n\xEF\xBB\xBFdata:2\n\n");
    assert_eq!(datas(&outcome), ["1"]);
    // A BOM and then a blank line: nothing to dispatch.
    let outcome = parse_every_way(b"\xEF\xBB\xBF\ndata:x\n\n");
    assert_eq!(datas(&outcome), ["x"]);
    // Only part of a BOM is not a BOM.
    let outcome = parse_every_way(b"\xEF\xBBdata:x\n\ndata:y\n\n");
    assert_eq!(datas(&outcome), ["y"]);
}

#[test]
fn empty_data_lines_and_incomplete_last_event() {
    let outcome = parse_every_way(b"data\n\ndata\ndata\n\ndata:");
    assert_eq!(datas(&outcome), ["", "\n"]);
    assert!(outcome.discarded_at_end);
}

#[test]
fn events_without_id_keep_the_previous_id() {
    let outcome = parse_every_way(b"id: 1\ndata: 1\n\ndata: 2\n\nid: 2\ndata:3\n\n");
    let ids: Vec<&[u8]> = outcome.messages.iter().map(|m| &m.2[..]).collect();
    assert_eq!(ids, [b"1", b"1", b"2"]);
}

#[test]
fn ids_with_nul_are_ignored() {
    for id in [&b"\0\0"[..], b"x\0", b"\0x"] {
        let stream = [b"id: keep\ndata: a\n\nid: ", id, b"\ndata: b\n\n"].concat();
        let outcome = parse_every_way(&stream);
        assert_eq!(outcome.last_event_id, b"keep", "{id:?}");
        assert_eq!(outcome.messages[1].2, b"keep");
    }
}

#[test]
fn valueless_id_resets_the_cursor() {
    let outcome = parse_every_way(b"id: 5\ndata: a\n\nid\n\n");
    assert_eq!(outcome.last_event_id, b"");
    // The id-only block fires nothing, but it is a block.
    assert_eq!(outcome.messages.len(), 1);
    assert_eq!(outcome.blocks.len(), 2);
    assert_eq!(outcome.blocks[1].id(), Some(&b""[..]));
}

#[test]
fn id_only_block_moves_the_cursor() {
    let outcome = parse_every_way(b"id: 9\n\n");
    assert!(outcome.messages.is_empty());
    assert_eq!(outcome.last_event_id, b"9");
}

#[test]
fn id_in_an_incomplete_event_is_not_applied() {
    let outcome = parse_every_way(b"id: 1\ndata: a\n\nid: 2\ndata: b\n");
    assert_eq!(outcome.last_event_id, b"1");
    assert!(outcome.discarded_at_end);
}

#[test]
fn retry_takes_digits_only() {
    let outcome = parse_every_way(b"retry:03000\n\n");
    assert_eq!(outcome.retry_ms, Some(3000));
    for bad in [&b"1000x"[..], b"+5", b"5 ", b"", b"  5", b"-1", b"1e3"] {
        let stream = [b"retry: 7\n\nretry:", bad, b"\n\n"].concat();
        assert_eq!(parse_every_way(&stream).retry_ms, Some(7), "{bad:?}");
    }
    // A retry line applies when read, even if its event never completes.
    let outcome = parse_every_way(b"retry: 10\n");
    assert_eq!(outcome.retry_ms, Some(10));
}

#[test]
fn event_types() {
    let outcome = parse_every_way(b"event: add\ndata: 1\n\nevent:\ndata: 2\n\ndata: 3\n\n");
    let kinds: Vec<&str> = outcome.messages.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(kinds, ["add", "message", "message"]);
}

#[test]
fn field_names_are_exact() {
    let outcome = parse_every_way(b"Data: a\ndata : b\ndata_5: c\nDATA: d\n\n");
    assert!(outcome.messages.is_empty());
    let names: Vec<&[u8]> = outcome.blocks[0]
        .unknown_fields()
        .iter()
        .map(|(n, _)| &n[..])
        .collect();
    assert_eq!(names, [&b"Data"[..], b"data ", b"data_5", b"DATA"]);
}

#[test]
fn only_cr_and_lf_end_lines() {
    let stream = "data: a\u{2028}b\u{2029}c\u{85}d\x0be\x0cf\n\n";
    let outcome = parse_every_way(stream.as_bytes());
    assert_eq!(datas(&outcome), ["a\u{2028}b\u{2029}c\u{85}d\x0be\x0cf"]);
}

#[test]
fn comments_long_colons_and_non_ascii() {
    let long = vec![b'c'; 5000];
    let stream = [
        b":",
        &long[..],
        b"\n::::\n: \xE2\x80\xA6 caf\xC3\xA9\ndata: x\n:\n\n",
    ]
    .concat();
    let outcome = parse_every_way(&stream);
    assert_eq!(datas(&outcome), ["x"]);
    let comments: Vec<&[u8]> = outcome.blocks[0]
        .comments()
        .iter()
        .map(|c| &c[..])
        .collect();
    assert_eq!(
        comments,
        [&long[..], b":::", " \u{2026} caf\u{e9}".as_bytes(), b""]
    );
    // A comment-only block fires nothing.
    let outcome = parse_every_way(b": keep-alive\n\n");
    assert!(outcome.messages.is_empty());
    assert_eq!(outcome.blocks.len(), 1);
}

#[test]
fn multi_megabyte_data_field() {
    let payload = vec![b'x'; 3 * 1024 * 1024];
    let stream = [b"data: ", &payload[..], b"\n\n"].concat();
    let limits = Limits::default()
        .max_line_len(4 * 1024 * 1024)
        .max_event_len(4 * 1024 * 1024);
    let whole = run(&[&stream], limits);
    assert_eq!(whole.messages[0].1.len(), payload.len());
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(run(&bytes, limits), whole);
    // With the default limits a 3 MiB line is too long: a typed error, not unbounded memory.
    let mut parser = Parser::new();
    parser.push(Bytes::from(stream));
    let error = parser.next_event().unwrap().unwrap_err();
    assert!(error.to_string().contains("1048576"), "{error}");
}

#[test]
fn non_ascii_id_round_trips() {
    let outcome = parse_every_way("id: \u{2026}\ndata: x\n\n".as_bytes());
    assert_eq!(outcome.last_event_id, "\u{2026}".as_bytes());
    let header = http::HeaderValue::from_bytes(&outcome.last_event_id).unwrap();
    assert!(
        header.to_str().is_err(),
        "to_str() rejects it: use the bytes"
    );
    assert_eq!(header.as_bytes(), "\u{2026}".as_bytes());
}

#[test]
fn invalid_utf8_is_forwarded_as_bytes_and_decoded_lossily() {
    let outcome = parse_every_way(b"data: \xFF\xE2\x82\n\n");
    assert_eq!(datas(&outcome), ["\u{FFFD}\u{FFFD}"]);
    assert_eq!(
        outcome.blocks[0].data_bytes().unwrap(),
        &b"\xFF\xE2\x82"[..]
    );
}

#[test]
fn blank_lines_alone_dispatch_nothing() {
    let outcome = parse_every_way(b"\n\n\r\n\r\r\n");
    assert!(outcome.blocks.is_empty());
    assert!(!outcome.discarded_at_end);
}

#[test]
fn limits_with_every_chunking() {
    let stream = b"data: 0123456789\n\n";
    for limits in [
        Limits::default().max_line_len(15),
        // The event's bytes are its line and line ending; the dispatching blank line is not.
        Limits::default().max_event_len(16),
    ] {
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let mut parser = Parser::with_limits(limits);
            parser.push(Bytes::copy_from_slice(a));
            parser.push(Bytes::copy_from_slice(b));
            assert!(
                parser.next_event().unwrap().is_err(),
                "{limits:?} split {split}"
            );
        }
    }
    // Exactly at the limits is fine.
    let at = Limits::default().max_line_len(16).max_event_len(17);
    assert_eq!(datas(&parse_every_way_with(stream, at)), ["0123456789"]);
}

/// Found by Chromium through the fan-out hub: a re-encoded stream must never start with the
/// bytes of a BOM that was not one, or the next layer (or the client) strips it and revives the
/// spoiled first line.
#[test]
fn a_field_spoiled_by_a_second_bom_stays_ignored_when_re_encoded() {
    let mut parser = Parser::new();
    parser.push(Bytes::from_static(
        b"\xEF\xBB\xBF\xEF\xBB\xBFdata:1\n\ndata:2\n\n",
    ));
    let mut encoded = bytes::BytesMut::new();
    while let Some(event) = parser.next_event() {
        let event = event.unwrap();
        assert_eq!(event.encoded_len(), event.encode().len());
        event.encode_into(&mut encoded);
    }
    assert!(!encoded.starts_with(b"\xEF\xBB\xBF"), "{encoded:?}");
    // Read again, even by a reader that strips a leading BOM, only `2` is an event.
    let mut again = Parser::new();
    again.push(encoded.freeze());
    let mut datas = Vec::new();
    while let Some(event) = again.next_event() {
        if let Some(data) = event.unwrap().data() {
            datas.push(data.into_owned());
        }
    }
    assert_eq!(datas, ["2"]);
}
