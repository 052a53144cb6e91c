//! Hostile input through the full recommended stack, each with its documented outcome, and the
//! stack over HTTP/2 with several streams multiplexed on one connection.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_sse::replay::{MemoryLimits, MemoryStore};
use tower_sse::testing::{Script, ScriptedService, TestStream};
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::wire::EventReader;
use tower_sse::{
    CommentMetadataLayer, FanoutLayer, HeartbeatLayer, LifetimeLayer, PassthroughLayer,
    ReconnectDelayLayer, ReplayLayer, SseHeadersLayer,
};

const SECOND: Duration = Duration::from_secs(1);

/// The crate docs' order in front of `inner`, with `store` for replay and the hub.
macro_rules! full_stack {
    ($inner:expr, $store:expr) => {{
        let store = $store;
        ServiceBuilder::new()
            .layer(SseHeadersLayer::new())
            .layer(PassthroughLayer::new().initial_comment("ok"))
            .layer(ReconnectDelayLayer::new(2 * SECOND))
            .layer(CommentMetadataLayer::new().metadata_as_comment(true))
            .layer(HeartbeatLayer::new(15 * SECOND))
            .layer(LifetimeLayer::new().max_lifetime(600 * SECOND))
            .layer(ReplayLayer::with_store(store.clone()))
            .layer(FanoutLayer::new().record_into(store).linger(SECOND))
            .layer(IdleTimeoutLayer::new(60 * SECOND))
            .layer(ResponseTimeoutLayer::new(10 * SECOND))
            .service($inner)
    }};
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

#[tokio::test]
async fn garbage_last_event_ids_never_reach_the_store_or_the_upstream() {
    let upstream = ScriptedService::event_stream(Script::new().chunk("id: 1\ndata: a\n\n"));
    let service = full_stack!(upstream.clone(), MemoryStore::new());
    let long = "x".repeat(64 * 1024);
    let requests = [
        // 64 KiB: over the id limit, treated as unknown, never echoed.
        Request::get("/s")
            .header("last-event-id", long.as_str())
            .body(())
            .unwrap(),
        // A NUL, CR and LF cannot be in a header; in the query they arrive percent-encoded.
        Request::get("/s?lastEventId=a%00b").body(()).unwrap(),
        Request::get("/s?lastEventId=a%0D%0Aid:%20evil")
            .body(())
            .unwrap(),
        Request::get("/s?lastEventId=%ZZ").body(()).unwrap(),
        // Not UTF-8: a valid opaque id, looked up as bytes.
        Request::get("/s")
            .header(
                "last-event-id",
                HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
            )
            .body(())
            .unwrap(),
    ];
    for request in requests {
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let resumed = response.headers()["sse-resumed-from"].clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!body.windows(4).any(|w| w == b"evil"), "{body:?}");
        assert!(body.len() < 1024, "nothing echoed: {} bytes", body.len());
        assert_ne!(resumed, "last-event-id");
    }
    for seen in upstream.requests() {
        let id = seen.headers().get("last-event-id");
        assert!(
            id.is_none_or(|id| id.len() <= 256 && !id.as_bytes().contains(&b'\n')),
            "{id:?}"
        );
    }
}

#[tokio::test]
async fn a_hundred_thousand_stream_keys_stay_within_the_store_bound() {
    let upstream = ScriptedService::event_stream(Script::new().chunk("id: 1\ndata: a\n\n"));
    let store = MemoryStore::with_limits(MemoryLimits::default().max_keys(1_000));
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .service(upstream);
    for n in 0..100_000 {
        let body = service
            .clone()
            .oneshot(get(&format!("/k/{n}")))
            .await
            .unwrap()
            .into_body();
        body.collect().await.unwrap();
    }
    assert_eq!(store.keys(), 1_000, "the oldest keys were evicted");
}

#[tokio::test]
async fn a_reconnect_flood_with_random_ids_replays_nothing_wrong() {
    // An upstream with 50 events that resumes after the id it is sent, as a real one would. (One
    // that ignores `Last-Event-ID` and starts over gets its older events through to a client
    // whose stream it restarts: the replay module docs say so.)
    let upstream = service_fn(|request: Request<()>| async move {
        let after: u64 = request
            .headers()
            .get("last-event-id")
            .and_then(|id| id.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let events: String = (after + 1..=50)
            .map(|n| format!("id: {n}\ndata: {n}\n\n"))
            .collect();
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Full::new(Bytes::from(events)))
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let service = full_stack!(upstream, MemoryStore::new());
    service
        .clone()
        .oneshot(get("/f"))
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..2_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let id = format!("{}", seed % 200);
        let request = Request::get("/f")
            .header("last-event-id", &id)
            .body(())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        let mut reader = EventReader::new(response.into_body());
        let mut ids = Vec::new();
        while let Some(event) = reader.next_event().await {
            let event = event.unwrap();
            if let Some(got) = event.id().filter(|_| event.is_message()) {
                ids.push(std::str::from_utf8(got).unwrap().parse::<u64>().unwrap());
            }
        }
        let sent: u64 = id.parse().unwrap();
        // A known id resumes right after it; an unknown one from the oldest. Never a duplicate.
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "in order, once: {ids:?}"
        );
        if (1..=50).contains(&sent) {
            assert_eq!(ids, (sent + 1..=50).collect::<Vec<_>>(), "after {id}");
        } else {
            assert_eq!(
                ids,
                (1..=50).collect::<Vec<_>>(),
                "unknown {id}: from the oldest"
            );
        }
    }
}

#[tokio::test]
async fn one_byte_chunks_a_line_that_never_ends_and_an_error_mid_event() {
    // One byte at a time: the same events arrive.
    let events = "id: 1\ndata: hello\n\nid: 2\ndata: world\n\n";
    let upstream = ScriptedService::event_stream(Script::new().byte_by_byte(events));
    let service = full_stack!(upstream, MemoryStore::new());
    let mut stream = TestStream::new(service.oneshot(get("/b")).await.unwrap());
    let datas: Vec<String> = stream
        .until_end()
        .await
        .iter()
        .map(|e| e.data().unwrap().into_owned())
        .collect();
    assert_eq!(datas, ["hello", "world"]);

    // A line that never ends: past the parser's limit, the stream ends cleanly, memory bounded.
    let endless = ScriptedService::event_stream(
        Script::new()
            .chunk("data: before\n\n")
            .chunks(std::iter::repeat_n("x".repeat(64 * 1024), 40)),
    );
    let service = full_stack!(endless, MemoryStore::new());
    let mut stream = TestStream::new(service.oneshot(get("/e")).await.unwrap());
    assert_eq!(stream.next_event().await.data().unwrap(), "before");
    stream.assert_ends().await;

    // An upstream error in the middle of an event: the client never sees half an event.
    let failing = ScriptedService::event_stream(
        Script::new()
            .chunk("data: whole\n\n")
            .chunk("data: half")
            .error("upstream reset"),
    );
    let service = full_stack!(failing, MemoryStore::new());
    let response = service.oneshot(get("/x")).await.unwrap();
    let mut reader = EventReader::new(response.into_body());
    let mut datas = Vec::new();
    while let Some(Ok(event)) = reader.next_event().await {
        if let Some(data) = event.data() {
            datas.push(data.into_owned());
        }
    }
    assert_eq!(datas, ["whole"]);
}

#[tokio::test]
async fn non_200_and_non_sse_responses_pass_through_untouched() {
    for (status, content_type, body) in [
        (StatusCode::NOT_FOUND, "text/plain", "missing"),
        (StatusCode::OK, "application/json", "{\"a\":1}"),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/event-stream",
            "data: oops\n\n",
        ),
    ] {
        let upstream = service_fn(move |_request: Request<()>| async move {
            let response = Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CONTENT_LENGTH, body.len())
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let service = full_stack!(upstream, MemoryStore::new());
        let response = service.oneshot(get("/n")).await.unwrap();
        assert_eq!(response.status(), status);
        let got = response.into_body().collect().await.unwrap().to_bytes();
        if content_type != "text/event-stream" {
            assert_eq!(got, body, "{status} {content_type} untouched");
        }
    }
}

/// The full stack served over HTTP/2 on an in-memory connection, with a paused clock: three
/// streams multiplexed on one connection each get their own heartbeats and their own replay.
#[tokio::test(start_paused = true)]
async fn http2_streams_on_one_connection_each_get_their_own_heartbeat_and_replay() {
    let upstream = ScriptedService::event_stream(
        Script::new()
            .chunk("id: 1\ndata: a\n\nid: 2\ndata: b\n\n")
            .hang(),
    );
    let service = full_stack!(upstream, MemoryStore::new());
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let service = hyper_util::service::TowerToHyperService::new(service);
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .http2_only()
            .serve_connection(TokioIo::new(server_io), service)
            .await;
    });
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = |path: &str, id: Option<&str>| {
        let mut request = Request::get(format!("http://gateway{path}")).version(Version::HTTP_2);
        if let Some(id) = id {
            request = request.header("last-event-id", id);
        }
        request.body(Empty::<Bytes>::new()).unwrap()
    };
    let mut streams = Vec::new();
    for (path, id) in [("/one", None), ("/two", None), ("/one", Some("1"))] {
        let mut sender = sender.clone();
        let response = sender.send_request(request(path, id)).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_2);
        assert!(response.headers().get(header::CONNECTION).is_none());
        streams.push(TestStream::new(response));
    }
    // The resumed stream got only what followed its id, the others everything.
    let resumed: Vec<String> = streams[2]
        .events(1)
        .await
        .iter()
        .map(|e| e.data().unwrap().into_owned())
        .collect();
    assert_eq!(resumed, ["b"]);
    for stream in &mut streams[..2] {
        let datas: Vec<String> = stream
            .events(2)
            .await
            .iter()
            .map(|e| e.data().unwrap().into_owned())
            .collect();
        assert_eq!(datas, ["a", "b"]);
    }
    // Each stream gets its own heartbeat once quiet.
    for stream in &mut streams {
        tokio::time::timeout(20 * SECOND, stream.next_comment())
            .await
            .expect("a heartbeat on every multiplexed stream");
    }
}
