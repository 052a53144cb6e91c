//! What a retained event costs in memory, counted by a global allocator: with the fan-out hub
//! recording, within 1.5x of replay recording alone. (Before, the hub stored each event as a
//! slice of the upstream's whole frame, which the store counted by the slice: 4,684 bytes per
//! retained 15-byte event against 367 without the hub.)

#[path = "../benches/support/alloc.rs"]
mod alloc;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_sse::fanout::FanoutLayer;
use tower_sse::replay::{MemoryLimits, MemoryStore, ReplayLayer};
use tower_sse::testing::Script;

const EVENTS: usize = 10_000;

/// `EVENTS` events with 15 bytes of data each, in frames of at least `frame` bytes (16 KiB: as
/// a busy upstream writes them; 1: one event per frame, as a paced one does).
fn frames(frame_len: usize) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut frame = String::new();
    for n in 1..=EVENTS {
        frame.push_str(&format!("id: {n}\ndata: fifteen bytes!!\n\n"));
        if frame.len() >= frame_len {
            frames.push(Bytes::from(std::mem::take(&mut frame)));
        }
    }
    if !frame.is_empty() {
        frames.push(Bytes::from(frame));
    }
    frames
}

fn store() -> MemoryStore {
    MemoryStore::with_limits(MemoryLimits::default().events_per_key(EVENTS))
}

fn live() -> isize {
    alloc::LIVE.load(Ordering::Relaxed)
}

/// Heap bytes held per retained event after one client read the whole stream through
/// `hub`-or-not, everything else dropped.
async fn bytes_per_event(hub: bool, frame_len: usize) -> f64 {
    let frames = frames(frame_len);
    let upstream = service_fn(move |_request: Request<()>| {
        let body = Script::new().chunks(frames.clone()).into_body();
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    let store = store();
    let before = live();
    {
        if hub {
            let service = ServiceBuilder::new()
                .layer(ReplayLayer::with_store(store.clone()))
                .layer(
                    FanoutLayer::new()
                        .linger(Duration::ZERO)
                        // The one client reads after the pump ran ahead: not a slow client here.
                        .queue_capacity(EVENTS + 1)
                        .record_into(store.clone()),
                )
                .service(upstream);
            let response = service.oneshot(Request::get("/t").body(()).unwrap()).await;
            response.unwrap().into_body().collect().await.unwrap();
        } else {
            let service = ServiceBuilder::new()
                .layer(ReplayLayer::with_store(store.clone()))
                .service(upstream);
            let response = service.oneshot(Request::get("/t").body(()).unwrap()).await;
            response.unwrap().into_body().collect().await.unwrap();
        }
    }
    // The hub's task lets go of its subscription once the stream ended.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.len(b"/t"), EVENTS, "every event retained");
    (live() - before) as f64 / EVENTS as f64
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_retained_event_costs_about_the_same_with_the_hub() {
    for (frame_len, frames) in [(16 * 1024, "16 KiB frames"), (1, "one event per frame")] {
        let alone = bytes_per_event(false, frame_len).await;
        let hub = bytes_per_event(true, frame_len).await;
        eprintln!(
            "heap per retained 15-byte event, {frames}: {alone:.0} B replay alone, {hub:.0} B with the hub"
        );
        assert!(
            alone < 400.0,
            "{frames}: {alone:.0} B per event without the hub"
        );
        assert!(
            hub <= alone * 1.5,
            "{frames}: {hub:.0} B per event with the hub, {alone:.0} without"
        );
    }
}
