use super::*;
use crate::test_util::{Script, ScriptedBody};
use crate::wire::Parser;
use http_body_util::BodyExt;
use std::convert::Infallible;
use std::sync::Mutex;
use tower::{service_fn, ServiceExt};

/// An upstream with events `1..=last` that resumes after a numeric `Last-Event-ID`; it notes the
/// id each request carried. Bodies are cut into `chunk`-byte frames.
#[derive(Clone)]
struct LogUpstream {
    last: u64,
    chunk: usize,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    content_type: &'static str,
}

impl LogUpstream {
    fn new(last: u64) -> Self {
        Self {
            last,
            chunk: 7,
            seen: Arc::default(),
            content_type: "text/event-stream",
        }
    }

    fn seen(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<()>,
        Response = Response<ScriptedBody>,
        Error = Infallible,
        Future = std::future::Ready<Result<Response<ScriptedBody>, Infallible>>,
    > + Clone {
        let this = self.clone();
        service_fn(move |request: Request<()>| {
            let header = request
                .headers()
                .get(LAST_EVENT_ID)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            this.seen.lock().unwrap().push(header.clone());
            let after: u64 = header.and_then(|h| h.parse().ok()).unwrap_or(0);
            let mut stream = Vec::new();
            for id in after + 1..=this.last {
                stream.extend_from_slice(format!("id: {id}\ndata: event {id}\n\n").as_bytes());
            }
            let chunks: Vec<&[u8]> = stream.chunks(this.chunk).collect();
            let response = Response::builder()
                .header(http::header::CONTENT_TYPE, this.content_type)
                .body(Script::new().chunks(&chunks).into_body())
                .unwrap();
            std::future::ready(Ok(response))
        })
    }
}

fn request(last_event_id: Option<&str>) -> Request<()> {
    let mut builder = Request::get("/feed?topic=a");
    if let Some(id) = last_event_id {
        builder = builder.header(LAST_EVENT_ID, id);
    }
    builder.body(()).unwrap()
}

/// Everything the client receives: `(resumed-from header, blocks)`.
async fn fetch<S, B>(service: S, request: Request<()>) -> (String, Vec<Event>)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: fmt::Debug,
{
    let response = service.oneshot(request).await.unwrap();
    let resumed = response
        .headers()
        .get(RESUMED_FROM)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let mut parser = Parser::new();
    parser.push(bytes);
    let mut blocks = Vec::new();
    while let Some(event) = parser.next_event() {
        blocks.push(event.unwrap());
    }
    (resumed, blocks)
}

fn ids(blocks: &[Event]) -> Vec<String> {
    blocks
        .iter()
        .filter(|b| b.is_message())
        .map(|b| String::from_utf8_lossy(b.id().unwrap_or(b"-")).into_owned())
        .collect()
}

#[tokio::test]
async fn a_new_client_records_and_gets_the_stream_untouched() {
    let upstream = LogUpstream::new(3);
    let layer = ReplayLayer::new();
    let service = layer.layer(upstream.service());
    let response = service.oneshot(request(None)).await.unwrap();
    assert_eq!(response.headers()[RESUMED_FROM], "new");
    let frames = crate::test_util::frames(response.into_body()).await;
    // Forwarded frame for frame, as the upstream cut them.
    assert!(frames.iter().all(|f| f.len() <= 7));
    assert_eq!(layer.store().len(b"/feed?topic=a"), 3);
}

#[tokio::test]
async fn a_known_id_replays_what_followed_and_resumes_the_upstream_after_it() {
    let layer = ReplayLayer::new().upstream_resumes(true);
    let recorder = LogUpstream::new(5);
    fetch(layer.layer(recorder.service()), request(None)).await;

    let upstream = LogUpstream::new(7);
    let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(Some("2"))).await;
    assert_eq!(resumed, "last-event-id");
    assert_eq!(ids(&blocks), ["3", "4", "5", "6", "7"]);
    assert_eq!(upstream.seen(), [Some("5".into())]);
}

/// A lone client that went away: nothing recorded the stream meanwhile. Replay sends what is
/// retained and asks the upstream to resume after it; unless the upstream is known to resume,
/// the client is told events may be missing, never a silent `last-event-id`.
#[tokio::test]
async fn a_client_is_told_when_nothing_recorded_while_it_was_away() {
    let layer = ReplayLayer::new().history_lost_event("history-lost");
    fetch(layer.layer(LogUpstream::new(5).service()), request(None)).await;
    let upstream = LogUpstream::new(7);
    let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(Some("2"))).await;
    assert_eq!(resumed, "partial");
    assert_eq!(blocks[0].event_type(), Some(&b"history-lost"[..]));
    assert_eq!(blocks[0].data().as_deref(), Some("partial"));
    assert_eq!(ids(&blocks[1..]), ["3", "4", "5", "6", "7"]);
    assert_eq!(
        upstream.seen(),
        [Some("5".into())],
        "asked to resume anyway"
    );

    // That reconnect did not know the upstream fills the gap after 5: it stays a gap.
    let (resumed, _) = fetch(
        layer.layer(LogUpstream::new(7).service()),
        request(Some("1")),
    )
    .await;
    assert_eq!(resumed, "partial");

    // Declared to resume, the upstream sends what is missing: nothing to tell, and the history
    // goes on without a gap.
    let trusting = ReplayLayer::new().upstream_resumes(true);
    fetch(trusting.layer(LogUpstream::new(5).service()), request(None)).await;
    for from in ["2", "5", "1"] {
        let (resumed, blocks) = fetch(
            trusting.layer(LogUpstream::new(7).service()),
            request(Some(from)),
        )
        .await;
        assert_eq!(resumed, "last-event-id", "from {from}");
        let first: usize = from.parse().unwrap();
        let expected: Vec<String> = (first + 1..=7).map(|n| n.to_string()).collect();
        assert_eq!(ids(&blocks), expected);
    }

    // While another connection records the stream, the history is whole.
    let layer = ReplayLayer::new().history_lost_event("history-lost");
    let key = Bytes::from_static(b"/feed?topic=a");
    layer.store().recorder_started(&key, None);
    fetch(layer.layer(LogUpstream::new(5).service()), request(None)).await;
    let (resumed, blocks) = fetch(
        layer.layer(LogUpstream::new(5).service()),
        request(Some("2")),
    )
    .await;
    assert_eq!(resumed, "last-event-id");
    assert_eq!(ids(&blocks), ["3", "4", "5"]);
    // Once it stops too, the gap after 5 is unknown again; a pause in the middle is never
    // one an upstream can fill.
    layer.store().recorder_stopped(&key);
    fetch(
        layer.layer(LogUpstream::new(6).service()),
        request(Some("5")),
    )
    .await;
    let trusting = layer.upstream_resumes(true);
    let (resumed, blocks) = fetch(
        trusting.layer(LogUpstream::new(6).service()),
        request(Some("2")),
    )
    .await;
    assert_eq!(resumed, "partial");
    assert_eq!(blocks[0].data().as_deref(), Some("partial"));
    assert_eq!(ids(&blocks[1..]), ["3", "4", "5", "6"]);
}

/// A store that fails every read.
#[derive(Clone)]
struct FailingStore;

impl ReplayStore for FailingStore {
    type Read = std::future::Ready<Result<Lookup, StoreError>>;

    fn read(&self, _key: &Bytes, _from: ReadFrom<'_>, _limit: usize) -> Self::Read {
        std::future::ready(Err(StoreError::new("down")))
    }

    fn append(&self, _key: &Bytes, _event: StoredEvent) {}

    fn next_id(&self, _key: &Bytes) -> Bytes {
        Bytes::from_static(b"0")
    }

    fn trim(&self, _key: &Bytes, _keep: usize) {}
}

/// The store failed and the id goes to the upstream: unless it is known to resume, the client
/// is told.
#[tokio::test]
async fn a_failed_store_is_told_unless_the_upstream_resumes() {
    let layer = ReplayLayer::with_store(FailingStore).history_lost_event("history-lost");
    let upstream = LogUpstream::new(3);
    let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(Some("1"))).await;
    assert_eq!(resumed, "upstream");
    assert_eq!(blocks[0].data().as_deref(), Some("upstream"));
    assert_eq!(upstream.seen(), [Some("1".into())]);
    let layer = layer.upstream_resumes(true);
    let (resumed, blocks) = fetch(
        layer.layer(LogUpstream::new(3).service()),
        request(Some("1")),
    )
    .await;
    assert_eq!(resumed, "upstream");
    assert!(blocks
        .iter()
        .all(|b| b.event_type() != Some(&b"history-lost"[..])));
}

#[tokio::test]
async fn live_events_the_client_already_has_are_dropped() {
    let layer = ReplayLayer::new();
    fetch(layer.layer(LogUpstream::new(4).service()), request(None)).await;
    // This upstream ignores Last-Event-ID and sends everything again.
    let mut forgetful = LogUpstream::new(6);
    forgetful.chunk = 1;
    let service = layer.layer(service_fn(move |_req: Request<()>| {
        let request = Request::new(());
        forgetful.service().oneshot(request)
    }));
    let (_, blocks) = fetch(service, request(Some("1"))).await;
    assert_eq!(ids(&blocks), ["2", "3", "4", "5", "6"]);
}

#[tokio::test]
async fn the_id_can_come_in_the_query_string_percent_encoded() {
    let layer = ReplayLayer::new();
    let store = layer.store().clone();
    let key = Bytes::from_static(b"/feed?topic=a");
    for id in ["\u{2026}1", "\u{2026}2"] {
        let bytes = Event::builder().id(id).data("x").build().unwrap().encode();
        store.append(
            &key,
            StoredEvent {
                id: Bytes::from(id.to_owned()),
                bytes,
            },
        );
    }
    let request = Request::get("/feed?topic=a&lastEventId=%E2%80%A61")
        .body(())
        .unwrap();
    let (resumed, blocks) = fetch(layer.layer(LogUpstream::new(0).service()), request).await;
    assert_eq!(resumed, "last-event-id");
    assert_eq!(ids(&blocks), ["\u{2026}2"]);

    // And as raw header bytes.
    let request = Request::get("/feed?topic=a")
        .header(
            LAST_EVENT_ID,
            HeaderValue::from_bytes("\u{2026}1".as_bytes()).unwrap(),
        )
        .body(())
        .unwrap();
    let (_, blocks) = fetch(layer.layer(LogUpstream::new(0).service()), request).await;
    assert_eq!(ids(&blocks), ["\u{2026}2"]);
}

#[tokio::test]
async fn unknown_ids_follow_the_policy() {
    let recorded = || async {
        let layer = ReplayLayer::new().history_lost_event("history-lost");
        fetch(layer.layer(LogUpstream::new(3).service()), request(None)).await;
        layer
    };

    let layer = recorded().await;
    let upstream = LogUpstream::new(0);
    let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(Some("99"))).await;
    assert_eq!(resumed, "earliest");
    assert_eq!(blocks[0].event_type(), Some(&b"history-lost"[..]));
    assert_eq!(blocks[0].data().as_deref(), Some("earliest"));
    assert_eq!(ids(&blocks[1..]), ["1", "2", "3"]);
    assert_eq!(
        upstream.seen(),
        [Some("99".into())],
        "the client's id goes on"
    );

    let layer = recorded().await.on_unknown_id(UnknownId::LiveOnly);
    let upstream = LogUpstream::new(0);
    let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(Some("99"))).await;
    assert_eq!(resumed, "live");
    assert_eq!(blocks[0].data().as_deref(), Some("live"));
    assert_eq!(ids(&blocks[1..]), Vec::<String>::new());
    assert_eq!(
        upstream.seen(),
        [None],
        "nothing old from the upstream either"
    );

    let layer = recorded()
        .await
        .on_unknown_id(UnknownId::PassUpstream)
        .upstream_resumes(true);
    let upstream = LogUpstream::new(5);
    let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(Some("3"))).await;
    assert_eq!(resumed, "last-event-id", "3 is known");
    assert_eq!(ids(&blocks), ["4", "5"]);
    let upstream = LogUpstream::new(0);
    let (resumed, _) = fetch(layer.layer(upstream.service()), request(Some("99"))).await;
    assert_eq!(resumed, "upstream");
    assert_eq!(upstream.seen(), [Some("99".into())]);
}

#[tokio::test]
async fn garbage_ids_are_never_looked_up_nor_passed_on() {
    let layer = ReplayLayer::new().on_unknown_id(UnknownId::PassUpstream);
    // Other control bytes cannot even make a header value; they come by the query string below.
    for garbage in ["x".repeat(300), "a\tb".to_owned()] {
        let upstream = LogUpstream::new(1);
        let request = Request::get("/feed")
            .header(LAST_EVENT_ID, HeaderValue::from_str(&garbage).unwrap())
            .body(())
            .unwrap();
        let (resumed, _) = fetch(layer.layer(upstream.service()), request).await;
        assert_eq!(resumed, "upstream");
        assert_eq!(upstream.seen(), [None], "{garbage:?}");
    }
    for query in [
        "lastEventId=%zz",
        "lastEventId=%0A",
        "lastEventId=%7F",
        "lastEventId=%01",
    ] {
        let upstream = LogUpstream::new(1);
        let request = Request::get(format!("/feed?{query}")).body(()).unwrap();
        let (resumed, _) = fetch(layer.layer(upstream.service()), request).await;
        assert_eq!(resumed, "upstream", "{query}");
        assert_eq!(upstream.seen(), [None], "{query}");
    }
    assert_eq!(percent_decode(b"%zz", 10), None);
    assert_eq!(percent_decode(b"abc", 2), None);
    assert_eq!(percent_decode(b"%41b", 10), Some(b"Ab".to_vec()));
}

#[tokio::test]
async fn qos_none_records_and_replays_nothing() {
    let layer = ReplayLayer::new().qos(Qos::None);
    let upstream = LogUpstream::new(3);
    let (resumed, _) = fetch(layer.layer(upstream.service()), request(Some("1"))).await;
    assert_eq!(resumed, "");
    assert_eq!(layer.store().keys(), 0);
    assert_eq!(upstream.seen(), [Some("1".into())]);
}

#[tokio::test]
async fn at_most_once_sends_nothing_old_for_an_unknown_id() {
    let layer = ReplayLayer::new().qos(Qos::AtMostOnce);
    fetch(layer.layer(LogUpstream::new(3).service()), request(None)).await;
    let (resumed, blocks) = fetch(
        layer.layer(LogUpstream::new(0).service()),
        request(Some("zz")),
    )
    .await;
    assert_eq!(resumed, "live");
    assert!(ids(&blocks).is_empty());
}

#[tokio::test]
async fn assigned_ids_are_monotonic_across_clones_and_recorded() {
    let layer = ReplayLayer::new().with_ids(Ids::AssignMissing);
    let anonymous = service_fn(|_req: Request<()>| async {
        let body = Script::new()
            .chunks([&b"data: a\n\nid: up\ndata: b\n\n"[..], b"data: c\n\n"])
            .into_body();
        let response = Response::builder()
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let (_, first) = fetch(layer.clone().layer(anonymous), request(None)).await;
    let (_, second) = fetch(layer.layer(anonymous), request(None)).await;
    let prefix = |e: &Event| String::from_utf8_lossy(e.id().unwrap()).into_owned();
    let first: Vec<String> = first.iter().map(prefix).collect();
    let second: Vec<String> = second.iter().map(prefix).collect();
    assert_eq!(first[1], "up");
    assert!(
        first[0].ends_with("-1") && first[2].ends_with("-2"),
        "{first:?}"
    );
    assert!(
        second[0].ends_with("-3") && second[2].ends_with("-4"),
        "{second:?}"
    );

    let always = ReplayLayer::new().with_ids(Ids::AssignAlways);
    let (_, blocks) = fetch(always.layer(anonymous), request(None)).await;
    assert!(blocks.iter().all(|b| !b.id().unwrap().starts_with(b"up")));
    assert_eq!(always.store().len(b"/feed?topic=a"), 3);
}

#[tokio::test]
async fn heartbeats_and_id_less_events_are_not_recorded() {
    let layer = ReplayLayer::new();
    let upstream = service_fn(|_req: Request<()>| async {
        let body = Script::new()
            .chunks([b":\n\ndata: no id\n\nid: 1\n\nretry: 5\n\nid: 2\ndata: x\n\n"])
            .into_body();
        let response = Response::builder()
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    fetch(layer.layer(upstream), request(None)).await;
    assert_eq!(layer.store().len(b"/feed?topic=a"), 1);
}

#[tokio::test]
async fn a_bom_after_replayed_events_is_dropped() {
    let layer = ReplayLayer::new();
    fetch(layer.layer(LogUpstream::new(2).service()), request(None)).await;
    let bom = service_fn(|_req: Request<()>| async {
        let body = Script::new()
            .chunks([&b"\xEF\xBB"[..], b"\xBFid: 3\ndata: x\n\n"])
            .into_body();
        let response = Response::builder()
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let (_, blocks) = fetch(layer.layer(bom), request(Some("1"))).await;
    assert_eq!(ids(&blocks), ["2", "3"]);
}

/// An event whose first line starts with a byte order mark (content there: the stream's own
/// came first) is replayed as the same event, even first in a response, where a client would
/// take the mark for the stream's and drop it; in one chunk or spread over many.
#[tokio::test]
async fn a_bom_inside_a_recorded_event_stays_content_when_replayed_first() {
    for chunk in [usize::MAX, 5, 1] {
        let layer = ReplayLayer::new();
        let upstream = service_fn(move |_req: Request<()>| async move {
            let stream: &[u8] = b"id: 1\ndata: a\n\n\xEF\xBB\xBFdata: hidden\ndata: b\nid: 2\n\n";
            let chunks: Vec<&[u8]> = stream.chunks(chunk.min(stream.len())).collect();
            let body = Script::new().chunks(&chunks).into_body();
            let response = Response::builder()
                .header(http::header::CONTENT_TYPE, "text/event-stream")
                .body(body)
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let (_, live) = fetch(layer.layer(upstream), request(None)).await;
        let hang = service_fn(|_req: Request<()>| async {
            let response = Response::builder()
                .header(http::header::CONTENT_TYPE, "text/event-stream")
                .body(Script::new().into_body())
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let (_, replayed) = fetch(layer.layer(hang), request(Some("1"))).await;
        assert_eq!(ids(&replayed), ["2"], "chunks of {chunk}");
        assert_eq!(
            replayed[0].data().as_deref(),
            Some("b"),
            "chunks of {chunk}"
        );
        assert_eq!(replayed[0], live[1], "chunks of {chunk}");
    }
}

/// Small events are copied for the store (a slice would keep their whole frame alive), all of a
/// frame's into one buffer of their own: one allocation per frame, holding only those events.
#[tokio::test]
async fn the_small_events_of_a_frame_are_copied_into_one_buffer() {
    let layer = ReplayLayer::new();
    let frame = Bytes::from(format!(
        "id: 1\ndata: a\n\nid: 2\ndata: b\n\n:{}\n\nid: 3\ndata: c\n\n",
        "x".repeat(500)
    ));
    let sent = frame.clone();
    let upstream = service_fn(move |_req: Request<()>| {
        let body = Script::new().chunk(sent.clone()).into_body();
        let response = Response::builder()
            .header(http::header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    fetch(layer.layer(upstream), request(None)).await;
    let key = Bytes::from_static(b"/feed?topic=a");
    let Lookup::Found(stored) = layer
        .store()
        .read(&key, ReadFrom::Oldest, 10)
        .await
        .unwrap()
    else {
        panic!("recorded");
    };
    let bytes: Vec<&[u8]> = stored.iter().map(|e| &e.bytes[..]).collect();
    assert_eq!(
        bytes,
        [
            &b"id: 1\ndata: a\n\n"[..],
            b"id: 2\ndata: b\n\n",
            b"id: 3\ndata: c\n\n"
        ]
    );
    let in_frame = frame.as_ptr_range();
    for pair in stored.windows(2) {
        let end = pair[0].bytes.as_ptr_range().end;
        assert_eq!(end, pair[1].bytes.as_ptr(), "one buffer, in order");
    }
    for event in &stored {
        assert!(
            !in_frame.contains(&event.bytes.as_ptr()),
            "a copy, not the frame"
        );
        assert!(event.bytes.as_ptr_range().contains(&event.id.as_ptr()));
    }
}

#[tokio::test]
async fn non_streams_and_unkeyed_requests_pass_untouched() {
    let layer = ReplayLayer::new();
    let mut json = LogUpstream::new(2);
    json.content_type = "application/json";
    let response = layer
        .layer(json.service())
        .oneshot(request(Some("1")))
        .await
        .unwrap();
    assert!(response.headers().get(RESUMED_FROM).is_none());

    let unkeyed = ReplayLayer::new().key(|_: &Request<()>| None::<Bytes>);
    let upstream = LogUpstream::new(2);
    let (resumed, _) = fetch(unkeyed.layer(upstream.service()), request(Some("1"))).await;
    assert_eq!(resumed, "");
    assert_eq!(unkeyed.store().keys(), 0);
}

#[test]
fn the_default_key_drops_only_last_event_id_from_the_query() {
    let key = |uri: &str| {
        PathAndQuery::new()
            .key(&Request::get(uri).body(()).unwrap())
            .unwrap()
    };
    assert_eq!(key("/a?x=1&lastEventId=5&y=2"), "/a?x=1&y=2");
    assert_eq!(key("/a?lastEventId=5"), "/a");
    assert_eq!(key("/a"), "/a");
    assert_eq!(key("/a?lastEventIdx=1"), "/a?lastEventIdx=1");
}

mod property {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::task::{Context, Poll, Waker};

    /// A live upstream with no history: each connection gets the events that start after it
    /// opened (a new subscriber joins at an event boundary, as real upstreams do).
    #[derive(Clone, Default)]
    struct Broadcast {
        inner: Arc<Mutex<BroadcastState>>,
    }

    #[derive(Default)]
    struct BroadcastState {
        /// Each feed, and whether it has reached its first event boundary.
        feeds: Vec<(Arc<Mutex<VecDeque<Bytes>>>, bool)>,
        scanner: crate::wire::Scanner,
    }

    struct Feed(Arc<Mutex<VecDeque<Bytes>>>);

    impl Body for Feed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            match self.0.lock().unwrap().pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(http_body::Frame::data(chunk)))),
                None => Poll::Pending,
            }
        }
    }

    impl Broadcast {
        fn send(&self, chunk: Bytes) {
            let mut state = self.inner.lock().unwrap();
            let mut first_boundary = None;
            for piece in state.scanner.pieces(&chunk) {
                if let crate::wire::Piece::Dispatch { end } = piece.unwrap() {
                    first_boundary.get_or_insert(end);
                }
            }
            for (feed, joined) in state.feeds.iter_mut() {
                if *joined {
                    feed.lock().unwrap().push_back(chunk.clone());
                } else if let Some(end) = first_boundary {
                    *joined = true;
                    if end < chunk.len() {
                        feed.lock().unwrap().push_back(chunk.slice(end..));
                    }
                }
            }
        }

        fn service(
            &self,
        ) -> impl Service<
            Request<()>,
            Response = Response<Feed>,
            Error = Infallible,
            Future = std::future::Ready<Result<Response<Feed>, Infallible>>,
        > + Clone {
            let inner = self.inner.clone();
            service_fn(move |_req: Request<()>| {
                let feed = Arc::new(Mutex::new(VecDeque::new()));
                let mut state = inner.lock().unwrap();
                let joined = state.scanner.is_at_boundary();
                state.feeds.push((feed.clone(), joined));
                let response = Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/event-stream")
                    .body(Feed(feed))
                    .unwrap();
                std::future::ready(Ok(response))
            })
        }
    }

    /// A connected client: its body, and a parser for what it received.
    struct Client {
        body: Pin<Box<ReplayBody<Feed, MemoryStore>>>,
        parser: Parser,
    }

    impl Client {
        async fn connect(
            layer: &ReplayLayer,
            upstream: &Broadcast,
            last_id: Option<&[u8]>,
        ) -> Self {
            let mut request = Request::get("/live").body(()).unwrap();
            if let Some(id) = last_id {
                request
                    .headers_mut()
                    .insert(LAST_EVENT_ID, HeaderValue::from_bytes(id).unwrap());
            }
            let response = layer
                .layer(upstream.service())
                .oneshot(request)
                .await
                .unwrap();
            Self {
                body: Box::pin(response.into_body()),
                parser: Parser::new(),
            }
        }

        /// Reads what is ready; returns the message ids completed.
        fn drain(&mut self) -> Vec<u64> {
            let mut cx = Context::from_waker(Waker::noop());
            let mut got = Vec::new();
            while let Poll::Ready(Some(frame)) = self.body.as_mut().poll_frame(&mut cx) {
                if let Ok(data) = frame.unwrap().into_data() {
                    self.parser.push(data);
                }
                while let Some(event) = self.parser.next_event() {
                    let event = event.unwrap();
                    if event.is_message() {
                        got.push(
                            std::str::from_utf8(event.id().unwrap())
                                .unwrap()
                                .parse()
                                .unwrap(),
                        );
                    }
                }
            }
            got
        }
    }

    fn run(qos: Qos, retained: usize, events: u64, cuts: &[usize], drops: &[bool]) -> Vec<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = MemoryStore::with_limits(MemoryLimits::default().events_per_key(retained));
            let layer = ReplayLayer::with_store(store).qos(qos);
            let upstream = Broadcast::default();
            // Another client keeps the history recorded.
            let mut recorder = Client::connect(&layer, &upstream, None).await;
            let mut client = Client::connect(&layer, &upstream, None).await;
            let mut received = Vec::new();
            let mut stream = Vec::new();
            for id in 1..=events {
                stream.extend_from_slice(format!("id: {id}\ndata: {id}\n\n").as_bytes());
            }
            let mut start = 0;
            for (i, cut) in cuts.iter().enumerate() {
                let end = (start + 1 + cut % 23).min(stream.len());
                upstream.send(Bytes::copy_from_slice(&stream[start..end]));
                recorder.drain();
                received.extend(client.drain());
                // Disconnect, and reconnect with the last id the client has. (A client with no id
                // yet reconnects as a new subscriber: no server can know what it missed.)
                let last = client.parser.last_event_id().to_vec();
                if drops.get(i).copied().unwrap_or(false) && !last.is_empty() {
                    client = Client::connect(&layer, &upstream, Some(&last)).await;
                    received.extend(client.drain());
                }
                start = end;
                if start == stream.len() {
                    break;
                }
            }
            if start < stream.len() {
                upstream.send(Bytes::copy_from_slice(&stream[start..]));
            }
            // An event in flight during a reconnect reaches the client just before the next
            // live one: the stream goes on after the sequence, as live streams do.
            upstream.send(Bytes::from(format!("id: {0}\ndata: {0}\n\n", events + 1)));
            // The recorder stays ahead of the client, as a hub's recorder is; a recorder that
            // lags can leave a gap (see the module docs).
            recorder.drain();
            received.extend(client.drain());
            received.retain(|id| *id <= events);
            received
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn within_the_window_every_event_arrives_exactly_once(
            cuts in prop::collection::vec(any::<usize>(), 1..60),
            drops in prop::collection::vec(any::<bool>(), 0..60),
            qos in prop_oneof![Just(Qos::Balanced), Just(Qos::AtLeastOnce), Just(Qos::AtMostOnce)],
        ) {
            let received = run(qos, 1_000, 20, &cuts, &drops);
            prop_assert_eq!(received, (1..=20).collect::<Vec<u64>>());
        }

        #[test]
        fn at_least_once_never_loses_what_is_retained(
            cuts in prop::collection::vec(any::<usize>(), 1..60),
            drops in prop::collection::vec(any::<bool>(), 0..60),
        ) {
            let received = run(Qos::AtLeastOnce, 1_000, 30, &cuts, &drops);
            for id in 1..=30 {
                prop_assert!(received.contains(&id), "lost {}: {:?}", id, received);
            }
        }

        #[test]
        fn at_most_once_never_duplicates_even_past_the_window(
            cuts in prop::collection::vec(any::<usize>(), 1..60),
            drops in prop::collection::vec(any::<bool>(), 0..60),
        ) {
            let received = run(Qos::AtMostOnce, 3, 30, &cuts, &drops);
            let mut sorted = received.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), received.len(), "duplicates: {:?}", received);
            prop_assert!(received.windows(2).all(|w| w[0] < w[1]), "out of order: {:?}", received);
        }
    }
}

#[tokio::test]
async fn a_new_client_gets_the_first_message_policy_then_the_live_stream() {
    // The store holds 1..=5; the upstream (7 events) resumes after the id it is sent.
    let cases = [
        (
            FirstMessage::LiveOnly,
            "new",
            vec!["1", "2", "3", "4", "5", "6", "7"],
            None,
        ),
        (
            FirstMessage::Newest,
            "snapshot",
            vec!["5", "6", "7"],
            Some("5"),
        ),
        (
            FirstMessage::Last(3),
            "snapshot",
            vec!["3", "4", "5", "6", "7"],
            Some("5"),
        ),
        (
            FirstMessage::AllRetained,
            "snapshot",
            vec!["1", "2", "3", "4", "5", "6", "7"],
            Some("5"),
        ),
    ];
    for (first, header, expected, upstream_id) in cases {
        let store = MemoryStore::new();
        let recorder = ReplayLayer::with_store(store.clone());
        fetch(recorder.layer(LogUpstream::new(5).service()), request(None)).await;
        let upstream = LogUpstream::new(7);
        let layer = ReplayLayer::with_store(store).first_message(first);
        let (resumed, blocks) = fetch(layer.layer(upstream.service()), request(None)).await;
        assert_eq!(resumed, header, "{first:?}");
        assert_eq!(ids(&blocks), expected, "{first:?}");
        assert_eq!(
            upstream.seen(),
            [upstream_id.map(str::to_owned)],
            "{first:?}"
        );
    }
    // An empty store: a new client simply starts live.
    let layer = ReplayLayer::new().first_message(FirstMessage::Last(10));
    let (resumed, blocks) = fetch(layer.layer(LogUpstream::new(2).service()), request(None)).await;
    assert_eq!(resumed, "new");
    assert_eq!(ids(&blocks), ["1", "2"]);
    // Chosen per key.
    let store = MemoryStore::new();
    let layer = ReplayLayer::with_store(store).first_message_by(|key| {
        if key.starts_with(b"/feed") {
            FirstMessage::Newest
        } else {
            FirstMessage::LiveOnly
        }
    });
    fetch(layer.layer(LogUpstream::new(5).service()), request(None)).await;
    let (resumed, _) = fetch(layer.layer(LogUpstream::new(5).service()), request(None)).await;
    assert_eq!(resumed, "snapshot");
    let elsewhere = Request::get("/other").body(()).unwrap();
    let (resumed, _) = fetch(layer.layer(LogUpstream::new(5).service()), elsewhere).await;
    assert_eq!(resumed, "new");
}
