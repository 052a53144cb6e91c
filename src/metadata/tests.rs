use super::*;
use crate::test_util::{Script, ScriptedBody};
use crate::wire::Parser;
use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use proptest::prelude::*;
use std::convert::Infallible;
use tower::{service_fn, ServiceExt};

fn upstream(
    headers: &'static [(&'static str, &'static str)],
    chunks: Vec<Bytes>,
) -> impl Service<
    Request<()>,
    Response = Response<ScriptedBody>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<ScriptedBody>, Infallible>>,
> + Clone {
    service_fn(move |_req: Request<()>| {
        let mut response = Response::builder().header(CONTENT_TYPE, "text/event-stream");
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        std::future::ready(Ok(response
            .body(Script::new().chunks(&chunks).into_body())
            .unwrap()))
    })
}

async fn through(
    layer: &CommentMetadataLayer,
    headers: &'static [(&'static str, &'static str)],
    chunks: Vec<Bytes>,
) -> Bytes {
    let response = layer
        .layer(upstream(headers, chunks))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

fn one(bytes: &'static [u8]) -> Vec<Bytes> {
    vec![Bytes::from_static(bytes)]
}

#[tokio::test]
async fn headers_as_comment_with_every_value_and_no_secrets() {
    let headers: &[(&str, &str)] = &[
        ("x-request-id", "7f3a"),
        ("x-tag", "a"),
        ("x-tag", "b"),
        ("authorization", "Bearer secret"),
        ("set-cookie", "s=1"),
    ];
    let layer = CommentMetadataLayer::new().headers_as_comment([
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("x-tag"),
        HeaderName::from_static("authorization"),
        HeaderName::from_static("set-cookie"),
        HeaderName::from_static("x-absent"),
    ]);
    let body = through(&layer, headers, one(b"data: 1\n\n")).await;
    assert_eq!(
        body,
        ":x-request-id=7f3a\n:x-tag=a\n:x-tag=b\n\ndata: 1\n\n"
    );

    let allowed = layer.allow_sensitive_header(HeaderName::from_static("authorization"));
    let body = through(&allowed, headers, one(b"data: 1\n\n")).await;
    assert!(body
        .starts_with(b":x-request-id=7f3a\n:x-tag=a\n:x-tag=b\n:authorization=Bearer secret\n\n"));
    assert!(!body.windows(10).any(|w| w == b"set-cookie"));
}

#[tokio::test]
async fn metadata_becomes_comments_inside_the_event() {
    let event = Event::builder()
        .comment("note")
        .metadata("trace", "abc")
        .metadata("tenant", "t 1")
        .field("x-other", "kept")
        .id("5")
        .data("hi")
        .build()
        .unwrap();
    let layer = CommentMetadataLayer::new().metadata_as_comment(true);
    let body = through(&layer, &[], vec![event.encode()]).await;
    assert_eq!(
        body,
        ":note\n:trace=abc\n:tenant=t 1\nid: 5\nx-other: kept\ndata: hi\n\n"
    );
}

#[tokio::test]
async fn metadata_is_stripped_by_default_and_kept_on_request() {
    let upstream_bytes: &'static [u8] = b"meta-trace: abc\ndata: hi\n\n";
    let body = through(&CommentMetadataLayer::new(), &[], one(upstream_bytes)).await;
    assert_eq!(body, "data: hi\n\n");
    let keep = CommentMetadataLayer::new().keep_metadata_fields();
    let body = through(&keep, &[], one(upstream_bytes)).await;
    assert_eq!(body, upstream_bytes);
}

#[tokio::test]
async fn a_custom_prefix_marks_metadata() {
    let layer = CommentMetadataLayer::new()
        .metadata_prefix("x-md-")
        .metadata_as_comment(true);
    let body = through(&layer, &[], one(b"x-md-k: v\nmeta-k: other\ndata: 1\n\n")).await;
    assert_eq!(body, ":k=v\nmeta-k: other\ndata: 1\n\n");
}

#[tokio::test]
async fn unsafe_metadata_is_dropped_not_rendered() {
    let layer = CommentMetadataLayer::new()
        .metadata_as_comment(true)
        .max_comment_len(16);
    let upstream_bytes: &'static [u8] =
        b"meta-a=b: x\nmeta-: empty\nmeta-nul: a\0b\nmeta-long: 0123456789abcdef\nmeta-ok: 1\ndata: d\n\n";
    let body = through(&layer, &[], one(upstream_bytes)).await;
    assert_eq!(body, ":ok=1\ndata: d\n\n");
}

#[tokio::test]
async fn metadata_lines_split_across_frames() {
    let layer = CommentMetadataLayer::new().metadata_as_comment(true);
    let stream = b"\xEF\xBB\xBFmeta-trace: abc\r\nid: 1\r\ndata: x\r\n\r\nmeta-k: v\ndata: y\n\n";
    let bytes: Vec<Bytes> = stream.chunks(1).map(Bytes::copy_from_slice).collect();
    let body = through(&layer, &[], bytes).await;
    assert_eq!(body, ":trace=abc\nid: 1\ndata: x\n\n:k=v\ndata: y\n\n");
}

#[tokio::test]
async fn the_header_block_drops_a_leading_upstream_bom() {
    let layer = CommentMetadataLayer::new()
        .headers_as_comment([HeaderName::from_static("x-id")])
        .keep_metadata_fields();
    let body = through(&layer, &[("x-id", "1")], one(b"\xEF\xBB\xBFdata: 1\n\n")).await;
    assert_eq!(body, ":x-id=1\n\ndata: 1\n\n");
}

#[tokio::test]
async fn non_streams_are_untouched() {
    let json = service_fn(|_req: Request<()>| async {
        let response = Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .header("x-id", "1")
            .body(Script::new().chunks([b"meta-a: 1\n\n"]).into_body())
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let layer = CommentMetadataLayer::new()
        .headers_as_comment([HeaderName::from_static("x-id")])
        .metadata_as_comment(true);
    let response = layer.layer(json).oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.body().size_hint().exact(), Some(11));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "meta-a: 1\n\n");
}

#[test]
fn the_builder_rejects_metadata_that_could_inject() {
    use crate::wire::{EventError, Field};
    let build = |k: &str, v: &str| Event::builder().metadata(k, v).build().map(|_| ());
    assert_eq!(build("a=b", "x"), Err(EventError::InvalidFieldName));
    assert_eq!(build("a:b", "x"), Err(EventError::InvalidFieldName));
    assert_eq!(build("a\nb", "x"), Err(EventError::InvalidFieldName));
    assert_eq!(
        build("k", "a\r\nid: 9"),
        Err(EventError::LineBreak(Field::Extension))
    );
    assert_eq!(build("k", "a\0"), Err(EventError::Nul(Field::Extension)));
    assert!(Event::builder().field("data", "x").build().is_err());
    assert!(Event::builder().field("", "x").build().is_err());
    assert_eq!(build("k", "any text: even colons"), Ok(()));
}

/// A fired message as a browser sees it: type, data, and the cursor after it.
type Seen = (Option<Vec<u8>>, String, Vec<u8>);

/// What a browser sees: every fired message, and the reconnection time.
fn visible(stream: &[u8]) -> (Vec<Seen>, Option<std::time::Duration>) {
    let mut parser = Parser::with_limits(crate::wire::Limits::unbounded());
    parser.push(Bytes::copy_from_slice(stream));
    let mut seen = Vec::new();
    while let Some(event) = parser.next_event() {
        let event = event.unwrap();
        if event.is_message() {
            seen.push((
                event.event_type().map(<[u8]>::to_vec),
                event.data().unwrap().into_owned(),
                parser.last_event_id().to_vec(),
            ));
        }
    }
    let retry = parser.reconnection_time();
    (seen, retry)
}

fn arbitrary_stream() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        "[ -~]{0,10}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..6),
        Just(b"=".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
    ];
    let line = prop_oneof![
        (text.clone(), text.clone()).prop_map(|(k, v)| [&b"meta-"[..], &k, b": ", &v].concat()),
        text.clone().prop_map(|v| [&b"data: "[..], &v].concat()),
        text.clone().prop_map(|v| [&b"id: "[..], &v].concat()),
        text.clone().prop_map(|v| [&b"event: "[..], &v].concat()),
        text.clone().prop_map(|v| [&b":"[..], &v].concat()),
        Just(b"retry: 1500".to_vec()),
        Just(Vec::new()),
    ];
    prop::collection::vec(line, 0..30).prop_map(|lines| {
        let mut out = Vec::new();
        for line in lines {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        out.push(b'\n');
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any keys, values and chunking, the events a client sees are the upstream's, and
    /// every comment the layer writes stays on its own line.
    #[test]
    fn framing_never_changes_what_clients_see(
        stream in arbitrary_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        as_comment in any::<bool>(),
    ) {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            chunks.push(Bytes::copy_from_slice(&stream[start..cut]));
            start = cut;
        }
        let layer = CommentMetadataLayer::new().metadata_as_comment(as_comment);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let out = runtime.block_on(through(&layer, &[], chunks));
        prop_assert_eq!(visible(&out), visible(&stream));
        let mut parser = Parser::with_limits(crate::wire::Limits::unbounded());
        parser.push(out);
        while let Some(event) = parser.next_event() {
            let event = event.unwrap();
            prop_assert!(event.unknown_fields().iter().all(|(n, _)| !n.starts_with(b"meta-")));
        }
    }
}

/// Framing sends whole blocks only, spliced into the upstream's frame where they changed: for
/// every way to cut the stream in three, each frame the client gets is whole blocks, and the
/// events are those of the stream sent whole.
#[tokio::test]
async fn framed_output_is_whole_blocks_however_the_stream_is_cut() {
    let layer = CommentMetadataLayer::new().metadata_as_comment(true);
    let stream: &[u8] =
        b"id: 1\ndata: a\n\nmeta-k: v\ndata: b\n\n: note\n\n\xEF\xBB\xBFx: 1\ndata: c\n\nmeta-z: 2\r\ndata: d\r\n\r\n";
    let events = |bytes: &[u8]| {
        let mut parser = Parser::new();
        parser.push(Bytes::copy_from_slice(b"\n"));
        parser.push(Bytes::copy_from_slice(bytes));
        let mut out = Vec::new();
        while let Some(event) = parser.next_event() {
            out.push(event.unwrap());
        }
        out
    };
    let whole = through(&layer, &[], one(stream)).await;
    let expected = events(&whole);
    assert_eq!(expected.len(), 5);
    assert_eq!(expected[1].comments()[0], "k=v".as_bytes());
    for a in 0..=stream.len() {
        for b in (a..=stream.len()).step_by(3) {
            let chunks = vec![
                Bytes::copy_from_slice(&stream[..a]),
                Bytes::copy_from_slice(&stream[a..b]),
                Bytes::copy_from_slice(&stream[b..]),
            ];
            let response = layer
                .layer(upstream(&[], chunks))
                .oneshot(Request::new(()))
                .await
                .unwrap();
            let frames = crate::test_util::frames(response.into_body()).await;
            let mut scanner = crate::wire::Scanner::new();
            for frame in &frames {
                scanner.scan(frame).unwrap();
                assert!(scanner.is_at_boundary(), "cut at {a}, {b}: {frame:?}");
            }
            assert_eq!(events(&frames.concat()), expected, "cut at {a}, {b}");
        }
    }
}
