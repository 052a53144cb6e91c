//! Properties of the wire core: chunking never changes the result, and encoding round-trips.

use bytes::Bytes;
use proptest::prelude::*;
use tower_sse::wire::{Event, Limits, Parser, Scanner};

fn parse(chunks: &[Bytes]) -> (Vec<Event>, Vec<u8>, bool) {
    let mut parser = Parser::with_limits(Limits::unbounded());
    let mut events = Vec::new();
    for chunk in chunks {
        parser.push(chunk.clone());
        while let Some(event) = parser.next_event() {
            events.push(event.unwrap());
        }
    }
    let id = parser.last_event_id().to_vec();
    (events, id, parser.finish())
}

fn chunk_at(stream: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([stream.len()]) {
        chunks.push(Bytes::copy_from_slice(&stream[start..cut]));
        start = cut;
    }
    chunks
}

/// Streams made of the bytes that matter to the format, so edge cases come up often.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b":".to_vec()),
        Just(b" ".to_vec()),
        Just(b"data".to_vec()),
        Just(b"id".to_vec()),
        Just(b"event".to_vec()),
        Just(b"retry".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just("\u{2026}".as_bytes().to_vec()),
        "[0-9a-z]{1,4}".prop_map(String::into_bytes),
    ];
    prop::collection::vec(token, 0..60).prop_map(|tokens| tokens.concat())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,12}",
        "\\PC{0,8}",
        Just(" leading".to_owned()),
        Just(String::new()),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(prop::collection::vec(text(), 1..4).prop_map(|lines| lines.join("\n"))),
        prop::option::of(0u64..100_000),
        prop::collection::vec(text(), 0..2),
    )
        .prop_map(|(id, event, data, retry, comments)| {
            let mut builder = Event::builder();
            if let Some(id) = id {
                builder = builder.id(id);
            }
            if let Some(event) = event {
                builder = builder.event(event);
            }
            if let Some(data) = data {
                builder = builder.data(data);
            }
            if let Some(retry) = retry {
                builder = builder.retry(std::time::Duration::from_millis(retry));
            }
            for comment in comments {
                builder = builder.comment(comment);
            }
            builder
                .build()
                .expect("printable text without line breaks is valid")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_chunking_gives_the_same_events(
        stream in stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = parse(&[Bytes::from(stream.clone())]);
        prop_assert_eq!(parse(&chunk_at(&stream, &cuts)), whole);
    }

    #[test]
    fn scanner_boundaries_agree_with_parser(
        stream in stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut scanner = Scanner::new();
        let mut parser = Parser::with_limits(Limits::unbounded());
        for chunk in chunk_at(&stream, &cuts) {
            scanner.scan(&chunk).unwrap();
            parser.push(chunk);
            while parser.next_event().is_some() {}
            prop_assert_eq!(scanner.is_at_boundary(), !parser.is_mid_event());
        }
    }

    #[test]
    fn encode_then_parse_round_trips(events in prop::collection::vec(event(), 1..6)) {
        let mut wire = Vec::new();
        for event in &events {
            wire.extend_from_slice(&event.encode());
        }
        let (parsed, _, discarded) = parse(&[Bytes::from(wire)]);
        prop_assert!(!discarded);
        // Blocks with no line at all encode to a bare blank line, which dispatches nothing.
        let expected: Vec<&Event> = events.iter().filter(|e| e.encoded_len() > 1).collect();
        prop_assert_eq!(parsed.len(), expected.len());
        for (parsed, built) in parsed.iter().zip(expected) {
            prop_assert_eq!(parsed.id(), built.id());
            prop_assert_eq!(parsed.event_type(), built.event_type().filter(|t| !t.is_empty()));
            prop_assert_eq!(parsed.data(), built.data());
            prop_assert_eq!(parsed.retry(), built.retry());
            prop_assert_eq!(parsed.comments(), built.comments());
        }
    }

    #[test]
    fn parsing_never_panics_and_stays_bounded(
        stream in prop::collection::vec(any::<u8>(), 0..400),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut parser = Parser::with_limits(Limits::default().max_line_len(32).max_event_len(64));
        for chunk in chunk_at(&stream, &cuts) {
            parser.push(chunk);
            while let Some(event) = parser.next_event() {
                if let Ok(event) = event {
                    prop_assert!(event.encoded_len() <= 64 * 3);
                }
            }
        }
    }
}

/// Durations as configuration might hold them: zero, tiny, typical, and the extremes that
/// overflow `Instant` arithmetic.
fn duration() -> impl Strategy<Value = std::time::Duration> {
    use std::time::Duration;
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::MAX),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::from_secs(86_400 * 365 * 1000)),
        (0u64..120_000).prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_secs),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

/// Drives one request through `service` on a paused clock: the response, then frames until the
/// body ends or forty of them came, each awaited up to a century of (auto-advanced) time, so
/// every timer the layer set fires.
fn drive<S, B>(service: S)
where
    S: tower::Service<http::Request<()>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let century = std::time::Duration::from_secs(86_400 * 365 * 100);
        let request = http::Request::get("/events")
            .header("accept-encoding", "gzip, br, zstd, deflate")
            .body(())
            .unwrap();
        let Ok(Ok(response)) = tokio::time::timeout(century, service.oneshot(request)).await else {
            return;
        };
        let mut body = std::pin::pin!(response.into_body());
        for _ in 0..40 {
            match tokio::time::timeout(century, body.frame()).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    });
}

/// An upstream that sends an event and then hangs, at an event boundary (`mid_event` false) or
/// in the middle of the next event (`mid_event` true, for the lifetime's grace period).
///
/// Heartbeats are driven at a boundary only: in the middle of an event a heartbeat layer checks
/// again every interval, and with a 1 ns interval a century of paused time is 3 * 10^12 checks.
fn upstream(mid_event: bool) -> tower_sse::testing::ScriptedService {
    use tower_sse::testing::{Script, ScriptedService};
    let script = Script::new().chunk("data: 1\n\n");
    let script = if mid_event {
        script.chunk("data: 2")
    } else {
        script
    };
    ScriptedService::event_stream(script.hang())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// No duration a setter accepts makes a request panic, in any layer: a duration too long
    /// for the clock means never, jitter saturates.
    #[test]
    fn no_configured_duration_makes_a_request_panic(
        heartbeat in duration().prop_filter("zero is rejected at build time", |d| !d.is_zero()),
        idle in duration(),
        response in duration(),
        lifetime in duration(),
        lifetime_jitter in duration(),
        grace in duration(),
        farewell in duration(),
        farewell_jitter in duration(),
        retry in duration(),
        retry_jitter in duration(),
        level in any::<u32>(),
    ) {
        use tower::ServiceBuilder;
        use tower_layer::Layer;
        use tower_sse::compression::{Encoding, SseCompressionLayer};
        use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
        use tower_sse::{HeartbeatLayer, LifetimeLayer, PassthroughLayer, ReconnectDelayLayer};

        let lifetime_layer = LifetimeLayer::new()
            .max_lifetime(lifetime)
            .jitter(lifetime_jitter)
            .grace(grace)
            .retry_on_end(farewell)
            .retry_jitter(farewell_jitter);
        let retry_layer = ReconnectDelayLayer::new(retry).jitter(retry_jitter);
        let compression = [Encoding::Gzip, Encoding::Deflate, Encoding::Brotli, Encoding::Zstd]
            .into_iter()
            .fold(SseCompressionLayer::new(), |layer, e| layer.level(e, level));

        drive(HeartbeatLayer::new(heartbeat).layer(upstream(false)));
        drive(IdleTimeoutLayer::new(idle).layer(upstream(true)));
        drive(ResponseTimeoutLayer::new(response).layer(upstream(true)));
        drive(lifetime_layer.clone().layer(upstream(true)));
        drive(retry_layer.layer(upstream(true)));
        drive(compression.layer(upstream(true)));
        drive(
            ServiceBuilder::new()
                .layer(PassthroughLayer::new().initial_comment("ok"))
                .layer(compression)
                .layer(retry_layer)
                .layer(HeartbeatLayer::new(heartbeat))
                .layer(lifetime_layer)
                .layer(ResponseTimeoutLayer::new(response))
                .layer(IdleTimeoutLayer::new(idle))
                .service(upstream(false)),
        );
    }
}
