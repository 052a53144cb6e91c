//! The testing kit as users meet it: `oneshot` a request, read what a client would see.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_sse::testing::{reconnect, subscribe, Script, ScriptedService, TestStream};
use tower_sse::timeout::IdleTimeoutLayer;
use tower_sse::{HeartbeatLayer, LifetimeLayer, ReconnectDelayLayer, Shutdown, SseHeadersLayer};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn heartbeats_and_idle_end_in_virtual_time() {
    let upstream = ScriptedService::event_stream(Script::new().chunk("data: hello\n\n").hang());
    let service = ServiceBuilder::new()
        .layer(HeartbeatLayer::new(15 * SECOND))
        .layer(IdleTimeoutLayer::new(40 * SECOND))
        .service(upstream);
    let mut stream = TestStream::new(service.oneshot(subscribe::<()>("/")).await.unwrap());
    assert_eq!(stream.next_event().await.data().as_deref(), Some("hello"));
    stream.expect_nothing_for(14 * SECOND).await;
    assert_eq!(stream.next_comment().await, "");
    assert_eq!(stream.next_comment().await, "");
    stream.assert_ends().await;
}

#[tokio::test(start_paused = true)]
async fn a_scripted_upstream_with_pauses_chunks_and_trailers() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-done", "yes".parse().unwrap());
    let script = Script::new()
        .byte_by_byte("id: 1\r\ndata: split\r\n\r\n")
        .pause(30 * SECOND)
        .chunk(Bytes::from_static(b"id: 2\ndata: later\n\n"))
        .trailers(trailers);
    let upstream = ScriptedService::event_stream(script);
    let service = ServiceBuilder::new()
        .layer(SseHeadersLayer::new())
        .layer(ReconnectDelayLayer::new(2 * SECOND))
        .service(upstream.clone());
    let response = service
        .oneshot(reconnect::<()>("/feed", "0"))
        .await
        .unwrap();
    let mut stream = TestStream::new(response);
    assert_eq!(stream.status(), StatusCode::OK);
    stream.assert_header("cache-control", "no-cache");
    let first = stream.next_event().await;
    assert_eq!(
        (first.id(), first.data().as_deref()),
        (Some(&b"1"[..]), Some("split"))
    );
    stream.expect_nothing_for(29 * SECOND).await;
    let events = stream.until_end().await;
    assert_eq!(events.len(), 1);
    assert_eq!(stream.last_event_id(), b"2");
    assert_eq!(stream.trailers().unwrap()["x-done"], "yes");
    let seen = upstream.requests();
    assert_eq!(seen[0].headers()["accept"], "text/event-stream");
    assert_eq!(seen[0].headers()["last-event-id"], "0");
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_the_stream_with_its_retry_hint() {
    let shutdown = Shutdown::new();
    let upstream = ScriptedService::event_stream(Script::new().chunk("data: 1\n\n").hang());
    let service = LifetimeLayer::new()
        .shutdown(&shutdown)
        .retry_on_end(5 * SECOND)
        .layer(upstream);
    let mut stream = TestStream::new(service.oneshot(subscribe::<()>("/")).await.unwrap());
    stream.next_event().await;
    shutdown.trigger();
    let hint = stream.next_block().await.unwrap();
    assert_eq!(hint.retry(), Some(5 * SECOND));
    stream.assert_ends().await;
}

#[tokio::test]
async fn non_ascii_ids_reconnect_as_raw_bytes() {
    let request: Request<()> = reconnect("/", "\u{2026}7".as_bytes());
    assert_eq!(
        request.headers()["last-event-id"].as_bytes(),
        "\u{2026}7".as_bytes()
    );
    assert_eq!(request.headers()["cache-control"], "no-cache");
}

#[tokio::test]
#[should_panic(expected = "expected a comment, got Event { data: \"surprise\" }")]
async fn failures_say_what_arrived_instead() {
    let upstream = ScriptedService::event_stream(Script::new().chunk("data: surprise\n\n"));
    let mut stream = TestStream::new(upstream.oneshot(subscribe::<()>("/")).await.unwrap());
    stream.next_comment().await;
}

#[tokio::test]
#[should_panic(expected = "received last: \"data: first\\n\\ndata: incompl\"")]
async fn failures_show_the_raw_bytes() {
    let upstream =
        ScriptedService::event_stream(Script::new().chunk("data: first\n\ndata: incompl"));
    let mut stream = TestStream::new(upstream.oneshot(subscribe::<()>("/")).await.unwrap());
    stream.events(2).await;
}

#[tokio::test]
#[should_panic(expected = "the body failed: upstream reset")]
async fn body_errors_fail_the_test_with_their_message() {
    let upstream = ScriptedService::event_stream(Script::new().error("upstream reset"));
    let mut stream = TestStream::new(upstream.oneshot(subscribe::<()>("/")).await.unwrap());
    stream.next_block().await;
}

/// A stream the upstream already compressed is opaque: no layer may read or insert bytes.
#[tokio::test(start_paused = true)]
async fn encoded_upstream_streams_are_left_alone() {
    let upstream = ScriptedService::event_stream(Script::new().chunk(&b"\x1f\x8b\x08"[..]).hang());
    let encoded = tower::util::MapResponseLayer::new(|mut response: http::Response<_>| {
        response
            .headers_mut()
            .insert("content-encoding", "gzip".parse().unwrap());
        response
    });
    let service = ServiceBuilder::new()
        .layer(ReconnectDelayLayer::new(SECOND))
        .layer(HeartbeatLayer::new(SECOND))
        .layer(tower_sse::ReplayLayer::new())
        .layer(encoded)
        .service(upstream);
    let response = service.oneshot(reconnect::<()>("/", "1")).await.unwrap();
    assert!(response.headers().get("sse-resumed-from").is_none());
    let mut body = std::pin::pin!(response.into_body());
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), &b"\x1f\x8b\x08"[..]);
    let nothing =
        tokio::time::timeout(60 * SECOND, http_body_util::BodyExt::frame(&mut body)).await;
    assert!(nothing.is_err(), "no heartbeat inside a compressed body");
}

/// A heartbeat stream whose event never comes.
async fn quiet_stream(
) -> TestStream<impl http_body::Body<Data = Bytes, Error = impl std::fmt::Display>> {
    let upstream = ScriptedService::event_stream(Script::new().hang());
    let service = HeartbeatLayer::new(Duration::from_secs(15)).layer(upstream);
    TestStream::new(service.oneshot(subscribe::<()>("/")).await.unwrap())
}

/// Under a paused clock, a wait for an event that never comes fails after the deadline (60 s
/// of virtual time), saying what arrived (the heartbeats), instead of spinning forever.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "expected an event within 60s of tokio's clock, none came")]
async fn a_wait_whose_event_never_comes_fails_at_the_deadline() {
    let mut stream = quiet_stream().await;
    stream.next_event().await;
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "expected an event within 5s of tokio's clock, none came")]
async fn the_deadline_is_configurable_and_covers_a_whole_wait() {
    let upstream = ScriptedService::event_stream(
        Script::new()
            .chunk("data: 1\n\n")
            .pause(Duration::from_secs(4))
            .chunk("data: 2\n\n")
            .pause(Duration::from_secs(4))
            .chunk("data: 3\n\n"),
    );
    let response = upstream.oneshot(subscribe::<()>("/")).await.unwrap();
    let mut stream = TestStream::new(response).deadline(Duration::from_secs(5));
    // Each event comes within 5 s of the one before, but not all three within 5 s.
    stream.events(3).await;
}

#[tokio::test(start_paused = true)]
async fn collect_for_takes_what_arrives_in_time_and_never_fails() {
    let upstream = ScriptedService::event_stream(
        Script::new()
            .chunk("id: 1\ndata: a\n\n")
            .pause(Duration::from_secs(2))
            .chunk("id: 2\nevent: tick\ndata: b\n\n")
            .pause(Duration::from_secs(10))
            .chunk("id: 3\ndata: c\n\n"),
    );
    let response = upstream.oneshot(subscribe::<()>("/")).await.unwrap();
    let mut stream = TestStream::new(response);
    let events = stream.collect_for(Duration::from_secs(5)).await;
    let ids: Vec<_> = events.iter().map(|e| e.id_str()).collect();
    assert_eq!(ids, [Some("1"), Some("2")]);
    assert_eq!(events[1].event_type_str(), Some("tick"));
    // Nothing in time is no failure either; then the rest, to the end.
    assert!(stream.collect_for(Duration::from_secs(1)).await.is_empty());
    assert_eq!(stream.until_end().await[0].id_str(), Some("3"));
}

/// The future a server awaits for its graceful shutdown fires the shutdown signal too: open
/// streams end at their boundary, with no task spawned to bridge the two.
#[tokio::test(start_paused = true)]
async fn a_signal_future_fires_the_shutdown() {
    let shutdown = Shutdown::new();
    let upstream = ScriptedService::event_stream(Script::new().chunk("id: 1\ndata: a\n\n").hang());
    let service = LifetimeLayer::new().shutdown(&shutdown).layer(upstream);
    let mut stream = TestStream::new(service.oneshot(subscribe::<()>("/")).await.unwrap());
    assert_eq!(stream.next_event().await.id_str(), Some("1"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let graceful = shutdown.after(stopped);
    stop.send(()).unwrap();
    graceful.await;
    stream.assert_ends().await;
}
