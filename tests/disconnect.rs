//! A client that disconnects frees everything: its timers, tasks and buffers. Streams are
//! dropped mid-event, mid-replay, mid-heartbeat and while attached to a fan-out subscription;
//! afterwards the runtime's live tasks and the heap's live bytes (counted by a global allocator)
//! are back where they were.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::{Body, Frame};
use http_body_util::channel::Channel;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_sse::replay::MemoryStore;
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::{
    CommentMetadataLayer, FanoutLayer, HeartbeatLayer, LifetimeLayer, PassthroughLayer,
    ReconnectDelayLayer, ReplayLayer, SseHeadersLayer,
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SECOND: Duration = Duration::from_secs(1);

/// The body senders of the upstream streams opened so far.
type Upstreams = tokio::sync::mpsc::UnboundedReceiver<http_body_util::channel::Sender<Bytes>>;
const STREAMS: usize = 100;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Opens `STREAMS` streams of every kind, reads a little of each, and drops them all.
async fn round<S, B>(service: &S, upstreams: &mut Upstreams) -> (isize, usize)
where
    S: tower::Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut bodies = Vec::new();
    for n in 0..STREAMS {
        // Mid-event: half an event sent. Mid-heartbeat: idle, timers armed. Mid-replay: a
        // resume with a burst waiting. Fan-out: attached to a shared subscription.
        let requests = [
            Request::get(format!("/mid-event/{n}")).body(()).unwrap(),
            Request::get(format!("/idle/{n}")).body(()).unwrap(),
            Request::get("/replayed")
                .header("last-event-id", "1")
                .body(())
                .unwrap(),
            Request::get("/shared").body(()).unwrap(),
        ];
        for request in requests {
            let response = service.clone().oneshot(request).await.unwrap();
            let mut body = Box::pin(response.into_body());
            // Take what is ready now (the first comment, replayed events), then stop reading.
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let _ = body.as_mut().poll_frame(&mut cx);
            bodies.push(body);
        }
    }
    let mut senders = Vec::new();
    while let Ok(sender) = upstreams.try_recv() {
        senders.push(sender);
    }
    for sender in &mut senders {
        let _ = sender.try_send(Frame::data(Bytes::from_static(b"data: hal")));
    }
    tokio::time::advance(20 * SECOND).await;
    let held = (LIVE.load(Ordering::Relaxed), alive_tasks());
    drop(bodies);
    drop(senders);
    // Let spawned tasks (the hub's) see the clients go and their linger run out.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::advance(5 * SECOND).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    held
}

#[tokio::test(start_paused = true)]
async fn disconnects_free_timers_tasks_and_buffers() {
    let (senders_tx, mut senders_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = service_fn(move |request: Request<()>| {
        let senders_tx = senders_tx.clone();
        async move {
            let path = request.uri().path().to_owned();
            let body = if path == "/replayed" {
                let (mut sender, body) = Channel::<Bytes>::new(64);
                let events: String = (1..=50)
                    .map(|n| format!("id: {n}\ndata: {n}\n\n"))
                    .collect();
                let _ = sender.try_send(Frame::data(Bytes::from(events)));
                let _ = senders_tx.send(sender);
                body
            } else {
                let (sender, body) = Channel::<Bytes>::new(64);
                let _ = senders_tx.send(sender);
                body
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        .layer(SseHeadersLayer::new())
        .layer(PassthroughLayer::new().initial_comment("ok"))
        .layer(ReconnectDelayLayer::new(2 * SECOND))
        .layer(CommentMetadataLayer::new().metadata_as_comment(true))
        .layer(HeartbeatLayer::new(5 * SECOND))
        .layer(LifetimeLayer::new().max_lifetime(600 * SECOND))
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(FanoutLayer::new().record_into(store).linger(SECOND))
        .layer(IdleTimeoutLayer::new(60 * SECOND))
        .layer(ResponseTimeoutLayer::new(10 * SECOND))
        .service(upstream);
    // A first round fills the store and the lazily made statics.
    round(&service, &mut senders_rx).await;
    let tasks_before = alive_tasks();
    let heap_before = LIVE.load(Ordering::Relaxed);

    let mut held = (0, 0);
    for _ in 0..3 {
        held = round(&service, &mut senders_rx).await;
    }
    let tasks_after = alive_tasks();
    let heap_after = LIVE.load(Ordering::Relaxed);
    eprintln!(
        "{} streams open: {} tasks, live heap {} bytes; after 3 rounds of opening and dropping \
         them: tasks {tasks_before} -> {tasks_after}, live heap {heap_before} -> {heap_after} \
         bytes ({:+})",
        4 * STREAMS,
        held.1,
        held.0,
        heap_after - heap_before
    );
    assert!(
        held.0 - heap_before > 100_000,
        "the streams held memory while open"
    );
    assert_eq!(tasks_after, tasks_before, "no task outlives its clients");
    // Nothing per stream stays: 1,200 streams leaving even 100 bytes each would be 120 KB.
    assert!(
        (heap_after - heap_before).abs() < 16 * 1024,
        "live heap grew by {} bytes",
        heap_after - heap_before
    );
}
