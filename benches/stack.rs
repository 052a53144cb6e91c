//! What each layer costs per event, and the full recommended stack against a bare passthrough
//! body, measured in one run.
//!
//! ```text
//! cargo bench --bench stack
//! ```
//!
//! The upstream body has a 1 KiB event ready at every poll (each with a new id, so recording
//! layers record). A frame is polled straight through the layer's body, with a no-op waker, as
//! a server would. First the bench prints the heap allocations per forwarded frame for every
//! path, counted by a global allocator. The passthrough path must not allocate: its chunks are
//! the upstream's `Bytes`, zero-copy. Then criterion measures:
//! - `layer/<name>`: one layer over the busy body; `layer/subscribe` is the subscriptions
//!   layer reading a provisioned subscription (`GET /subscriptions/{id}/subscribe`, created
//!   beforehand in the in-memory store): every event parsed to move its cursor in the store;
//! - `stack/builder`: the recommended stack built with `SseStack` (headers, passthrough, retry,
//!   comment metadata, heartbeat, lifetime, replay recording, idle and response timeouts: one
//!   engine, one scan), against `stack/passthrough` (the bare passthrough layer: the baseline a
//!   full stack is held to);
//! - `stack/full`: the same layers stacked by hand with `ServiceBuilder`, each its own engine
//!   (what a stack cost before the builder, and still costs when built by hand).
//!
//! A profile of the full stack: build with `cargo bench --bench stack --no-run`, then run the
//! bench binary as `PROFILE=200000 [PROFILE_PATH=stack/full] valgrind --tool=callgrind target/release/deps/stack-<hash>`
//! and read it with `callgrind_annotate`.

#[path = "support/alloc.rs"]
mod alloc;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{header, Request, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_layer::Layer;
use tower_sse::compression::SseCompressionLayer;
use tower_sse::subscriptions::{Caps, Created, Subscription, SubscriptionStore, Subscriptions};
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::{
    CommentMetadataLayer, HeartbeatLayer, LifetimeLayer, PassthroughLayer, ReconnectDelayLayer,
    ReplayLayer, SseHeadersLayer,
};

/// 4,096 distinct 1 KiB events, served in a cycle, one per poll.
#[derive(Clone)]
struct Busy {
    frames: std::sync::Arc<Vec<Bytes>>,
    next: usize,
}

impl Busy {
    fn new() -> Self {
        let frames = (0..4096)
            .map(|n| {
                let mut event = format!("id: {n}\nevent: tick\ndata: ").into_bytes();
                event.resize(1022, b'x');
                event.extend_from_slice(b"\n\n");
                Bytes::from(event)
            })
            .collect();
        Self {
            frames: std::sync::Arc::new(frames),
            next: 0,
        }
    }
}

impl Body for Busy {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = self.frames[self.next].clone();
        self.next = (self.next + 1) % self.frames.len();
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

fn upstream() -> impl tower::Service<
    Request<()>,
    Response = Response<Busy>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Busy>, Infallible>>,
> + Clone {
    let busy = Busy::new();
    service_fn(move |_request: Request<()>| {
        let busy = busy.clone();
        async move {
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(busy)
                .unwrap())
        }
    })
}

type Polled = Box<dyn FnMut() -> usize>;

/// A body behind `service`, ready to be polled frame by frame: returns a closure that polls
/// one frame and says how many bytes it carried.
fn poller<S, R, B>(runtime: &tokio::runtime::Runtime, service: S, request: Request<R>) -> Polled
where
    S: tower::Service<Request<R>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes> + 'static,
    B::Error: std::fmt::Debug,
{
    let response = runtime.block_on(service.oneshot(request)).unwrap();
    let mut body = Box::pin(response.into_body());
    let guard = runtime.enter();
    // Timers of the layers were made inside the runtime; polling only needs its context.
    std::mem::forget(guard);
    Box::new(move || {
        let mut cx = Context::from_waker(Waker::noop());
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.data_ref().map_or(0, Bytes::len),
            other => panic!(
                "the stream stopped: {:?}",
                other.map(|f| f.map(|f| f.map(|_| ())))
            ),
        }
    })
}

fn get() -> Request<()> {
    Request::get("/events").body(()).unwrap()
}

fn gzip() -> Request<()> {
    Request::get("/events")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(())
        .unwrap()
}

/// The subscriptions layer over the busy upstream, polled through a subscription provisioned
/// beforehand in its in-memory store (`GET /subscriptions/{id}/subscribe`).
fn subscribe(runtime: &tokio::runtime::Runtime) -> Polled {
    let subscriptions = Subscriptions::in_memory();
    let subscription = Subscription::new("news");
    let request = Request::get(format!("/subscriptions/{}/subscribe", subscription.id))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let created = runtime
        .block_on(subscriptions.store().create(
            subscription,
            Caps {
                per_topic: 10_000,
                total: 100_000,
            },
        ))
        .unwrap();
    assert_eq!(created, Created::Stored);
    // The upstream answers any path; it takes no request body.
    let upstream = upstream().map_request(|request: Request<Empty<Bytes>>| request.map(|_| ()));
    poller(runtime, subscriptions.layer().layer(upstream), request)
}

/// Every path the bench measures, by name.
fn paths(runtime: &tokio::runtime::Runtime) -> Vec<(&'static str, Polled)> {
    let minute = Duration::from_secs(60);
    vec![
        ("bare body", poller(runtime, upstream(), get())),
        (
            "layer/passthrough",
            poller(runtime, PassthroughLayer::new().layer(upstream()), get()),
        ),
        (
            "layer/retry",
            poller(
                runtime,
                ReconnectDelayLayer::new(minute).layer(upstream()),
                get(),
            ),
        ),
        (
            "layer/comment metadata",
            poller(
                runtime,
                CommentMetadataLayer::new()
                    .metadata_as_comment(true)
                    .layer(upstream()),
                get(),
            ),
        ),
        (
            "layer/heartbeat",
            poller(
                runtime,
                HeartbeatLayer::new(minute).layer(upstream()),
                get(),
            ),
        ),
        (
            "layer/lifetime",
            poller(
                runtime,
                LifetimeLayer::new().max_lifetime(minute).layer(upstream()),
                get(),
            ),
        ),
        (
            "layer/replay (recording)",
            poller(runtime, ReplayLayer::new().layer(upstream()), get()),
        ),
        ("layer/subscribe", subscribe(runtime)),
        (
            "layer/idle timeout",
            poller(
                runtime,
                IdleTimeoutLayer::new(minute).layer(upstream()),
                get(),
            ),
        ),
        (
            "layer/compression (gzip)",
            poller(
                runtime,
                SseCompressionLayer::new().layer(upstream()),
                gzip(),
            ),
        ),
        (
            "stack/passthrough",
            poller(runtime, PassthroughLayer::new().layer(upstream()), get()),
        ),
        (
            "stack/builder",
            poller(
                runtime,
                tower_sse::SseStack::new()
                    .initial_comment("ok")
                    .reconnect_delay(Duration::from_secs(2))
                    .metadata(CommentMetadataLayer::new().metadata_as_comment(true))
                    .heartbeat(Duration::from_secs(15))
                    .lifetime(LifetimeLayer::new().max_lifetime(Duration::from_secs(600)))
                    .replay(ReplayLayer::new())
                    .idle_timeout(minute)
                    .response_timeout(Duration::from_secs(10))
                    .layer(upstream()),
                get(),
            ),
        ),
        (
            "stack/full",
            poller(
                runtime,
                ServiceBuilder::new()
                    .layer(SseHeadersLayer::new())
                    .layer(PassthroughLayer::new().initial_comment("ok"))
                    .layer(ReconnectDelayLayer::new(Duration::from_secs(2)))
                    .layer(CommentMetadataLayer::new().metadata_as_comment(true))
                    .layer(HeartbeatLayer::new(Duration::from_secs(15)))
                    .layer(LifetimeLayer::new().max_lifetime(Duration::from_secs(600)))
                    .layer(ReplayLayer::new())
                    .layer(IdleTimeoutLayer::new(minute))
                    .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
                    .service(upstream()),
                get(),
            ),
        ),
    ]
}

fn allocations_per_frame(paths: &mut [(&'static str, Polled)]) {
    println!("heap allocations per forwarded 1 KiB frame (after 1,000 frames of warm-up):");
    for (name, poll) in paths.iter_mut() {
        for _ in 0..1_000 {
            poll();
        }
        let before = alloc::ALLOCATIONS.load(Ordering::Relaxed);
        const FRAMES: usize = 10_000;
        for _ in 0..FRAMES {
            std::hint::black_box(poll());
        }
        let allocations = alloc::ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!("  {name:<28} {:.2}", allocations as f64 / FRAMES as f64);
        if *name == "stack/passthrough" || *name == "layer/passthrough" {
            assert_eq!(
                allocations, 0,
                "{name} must forward chunks without allocating"
            );
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let mut paths = paths(&runtime);
    // `PROFILE=N`: poll the built stack (or the path named by `PROFILE_PATH`) N times and stop,
    // for a profiler such as `valgrind --tool=callgrind` (criterion's own work would drown it).
    if let Some(frames) = std::env::var("PROFILE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let path = std::env::var("PROFILE_PATH").unwrap_or_else(|_| "stack/builder".into());
        let (_, poll) = paths
            .iter_mut()
            .find(|(name, _)| *name == path)
            .expect("PROFILE_PATH names a measured path");
        let bytes: usize = (0..frames).map(|_| poll()).sum();
        println!("polled {frames} frames, {bytes} bytes through {path}");
        return;
    }
    allocations_per_frame(&mut paths);
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("per_event");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    for (name, poll) in paths.iter_mut() {
        group.bench_function(*name, |b| b.iter(&mut *poll));
    }
    group.finish();
    criterion.final_summary();
}
