//! What an idle event stream with heartbeats costs: tower-sse's `HeartbeatLayer` next to axum's
//! `Sse::keep_alive`, measured the same way in the same run.
//!
//! ```text
//! cargo bench --bench liveness
//! ```
//!
//! First it prints the heap memory per idle stream: 10,000 streams are opened on one service
//! (built once, cloned per connection, as a server does), each body polled once (so its timer
//! is registered) and kept; live heap bytes are counted by a counting global allocator.
//! `LIVENESS_SIZES=1` also lists the allocations and frees of one stream. Then criterion measures the CPU time to produce one heartbeat on an idle stream
//! (tokio's clock is paused and advanced by one interval, then every stream is polled once), and
//! the time to forward a 1 KiB event frame through the layer against the bare body.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::response::sse::{Event as AxumEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{header, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;
use tower_sse::{HeartbeatLayer, PassthroughLayer};

#[path = "support/alloc.rs"]
mod alloc;

use alloc::LIVE;

const INTERVAL: Duration = Duration::from_secs(15);
const STREAMS: usize = 10_000;
/// The lifetime and timeouts of the stacks: far enough never to fire here.
const HOUR: Duration = Duration::from_secs(3600);

/// An upstream that never sends anything: the idle stream.
struct Silent;

impl Body for Silent {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Opens one idle stream.
type Open = fn() -> Pin<Box<dyn std::future::Future<Output = BoxedBody>>>;

type BoxedBody =
    Pin<Box<dyn Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Send>>;

fn boxed<B>(body: B) -> BoxedBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    Box::pin(body.map_err(Into::into))
}

/// An upstream whose event stream never sends anything.
fn silent_upstream() -> impl tower::Service<
    Request<()>,
    Response = Response<Silent>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Silent>, Infallible>>,
> + Clone {
    service_fn(|_req: Request<()>| async {
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Silent)
            .unwrap();
        Ok::<_, Infallible>(response)
    })
}

/// A service as a server holds it: built once, cloned for every connection. Its layers' shared
/// configuration is not the stream's; what a stream costs is what opening one adds.
type Shared = tower::util::BoxCloneService<Request<()>, Response<BoxedBody>, Infallible>;

fn shared<S, B>(service: S) -> Shared
where
    S: tower::Service<Request<()>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tower::util::BoxCloneService::new(service.map_response(|response| response.map(boxed)))
}

/// Opens a stream on the service `$build` makes, built once per thread (the bench's runtime is
/// single-threaded).
macro_rules! open_on_shared {
    ($build:expr) => {{
        thread_local! {
            static SERVICE: Shared = shared($build);
        }
        let service = SERVICE.with(Clone::clone);
        service.oneshot(Request::new(())).await.unwrap().into_body()
    }};
}

async fn tower_sse_stream() -> BoxedBody {
    open_on_shared!(HeartbeatLayer::new(INTERVAL).layer(silent_upstream()))
}

/// Each engine layer alone on an idle stream: what one layer costs.
async fn lifetime_stream() -> BoxedBody {
    open_on_shared!(tower_sse::LifetimeLayer::new()
        .max_lifetime(HOUR)
        .layer(silent_upstream()))
}

async fn idle_timeout_stream() -> BoxedBody {
    open_on_shared!(tower_sse::timeout::IdleTimeoutLayer::new(HOUR).layer(silent_upstream()))
}

async fn replay_stream() -> BoxedBody {
    open_on_shared!(tower_sse::ReplayLayer::with_store(shared_store()).layer(silent_upstream()))
}

/// The recommended stack on an idle stream, minus its one-off first frames (the initial comment
/// and `retry:` carry no state once sent): headers, passthrough, heartbeat, lifetime, replay,
/// idle and response timeouts.
async fn full_stack_stream() -> BoxedBody {
    open_on_shared!(tower::ServiceBuilder::new()
        .layer(tower_sse::SseHeadersLayer::new())
        .layer(PassthroughLayer::new())
        .layer(HeartbeatLayer::new(INTERVAL))
        .layer(tower_sse::LifetimeLayer::new().max_lifetime(HOUR))
        .layer(tower_sse::ReplayLayer::with_store(shared_store()))
        .layer(tower_sse::timeout::IdleTimeoutLayer::new(HOUR))
        .layer(tower_sse::timeout::ResponseTimeoutLayer::new(HOUR))
        .service(silent_upstream()))
}

/// One replay store for every stream, as a server has: a store per stream would count the
/// store's own bookkeeping as the stream's.
fn shared_store() -> tower_sse::replay::MemoryStore {
    static STORE: std::sync::OnceLock<tower_sse::replay::MemoryStore> = std::sync::OnceLock::new();
    STORE
        .get_or_init(tower_sse::replay::MemoryStore::new)
        .clone()
}

/// The same parts built together with `SseStack`: one engine, one timer.
async fn stack_builder_stream() -> BoxedBody {
    open_on_shared!(tower_sse::SseStack::new()
        .heartbeat(INTERVAL)
        .lifetime(tower_sse::LifetimeLayer::new().max_lifetime(HOUR))
        .replay(tower_sse::ReplayLayer::with_store(shared_store()))
        .idle_timeout(HOUR)
        .response_timeout(HOUR)
        .layer(silent_upstream()))
}

async fn axum_stream() -> BoxedBody {
    let events = futures_pending::<Result<AxumEvent, Infallible>>();
    let response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(INTERVAL))
        .into_response();
    boxed(response.into_body())
}

/// A stream that never yields, without pulling in a futures crate.
fn futures_pending<T>() -> tokio_stream::Pending<T> {
    tokio_stream::pending()
}

/// Polls every body once, so its timer is registered; returns how many produced a frame.
fn poll_all(bodies: &mut [BoxedBody]) -> usize {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut produced = 0;
    for body in bodies.iter_mut() {
        if let Poll::Ready(Some(Ok(_))) = body.as_mut().poll_frame(&mut cx) {
            produced += 1;
        }
    }
    produced
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn memory_per_idle_stream(name: &str, open: Open) {
    let runtime = paused_runtime();
    runtime.block_on(async {
        let before = LIVE.load(Ordering::Relaxed);
        let allocations_before = alloc::ALLOCATIONS.load(Ordering::Relaxed);
        let mut bodies = Vec::with_capacity(STREAMS);
        let vec_bytes = LIVE.load(Ordering::Relaxed) - before;
        for _ in 0..STREAMS {
            bodies.push(open().await);
        }
        assert_eq!(
            poll_all(&mut bodies),
            0,
            "idle streams send nothing before the interval"
        );
        let per_stream =
            (LIVE.load(Ordering::Relaxed) - before - vec_bytes) as f64 / STREAMS as f64;
        let allocations =
            (alloc::ALLOCATIONS.load(Ordering::Relaxed) - allocations_before) as f64 / STREAMS as f64;
        println!(
            "{name:<28} heap per idle stream (body, timer registered): {per_stream:>5.0} bytes, {allocations:.1} allocations made"
        );
        drop(bodies);
        if std::env::var_os("LIVENESS_SIZES").is_some() {
            // One more stream, its allocations and frees noted one by one.
            alloc::NOTED_LEN.store(0, Ordering::Relaxed);
            alloc::NOTING.store(true, Ordering::Relaxed);
            let mut one = vec![open().await];
            poll_all(&mut one);
            alloc::NOTING.store(false, Ordering::Relaxed);
            let noted = alloc::NOTED_LEN.load(Ordering::Relaxed).min(alloc::NOTED.len());
            let sizes: Vec<isize> = alloc::NOTED[..noted]
                .iter()
                .map(|size| size.load(Ordering::Relaxed))
                .collect();
            println!("{name:<28} allocations (+) and frees (-) of one stream: {sizes:?}");
        }
    });
}

fn heartbeat_cpu(c: &mut Criterion) {
    let mut group = c.benchmark_group("heartbeat_on_idle_stream");
    group.throughput(Throughput::Elements(1_000));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    let cases: [(&str, Open); 2] = [
        ("tower-sse HeartbeatLayer", || Box::pin(tower_sse_stream())),
        ("axum Sse::keep_alive", || Box::pin(axum_stream())),
    ];
    for (name, open) in cases {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            // Each idle stream lives in its own task, as under a server, awaiting its next frame.
            let runtime = paused_runtime();
            let beats = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            runtime.block_on(async {
                for _ in 0..1_000 {
                    let mut body = open().await;
                    let beats = beats.clone();
                    tokio::spawn(async move {
                        use http_body_util::BodyExt;
                        while let Some(Ok(_)) = body.frame().await {
                            beats.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                tokio::task::yield_now().await;
            });
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iterations {
                        let target = beats.load(Ordering::Relaxed) + 1_000;
                        let started = Instant::now();
                        tokio::time::advance(INTERVAL).await;
                        while beats.load(Ordering::Relaxed) < target {
                            tokio::task::yield_now().await;
                        }
                        spent += started.elapsed();
                    }
                    spent
                })
            });
        });
    }
    group.finish();
}

/// A body that yields the same frame forever.
struct Busy(Bytes);

impl Body for Busy {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(self.0.clone()))))
    }
}

fn forwarding_cpu(c: &mut Criterion) {
    let mut event = b"id: 12345\nevent: tick\ndata: ".to_vec();
    event.resize(1021, b'x');
    event.extend_from_slice(b"\n\n\n");
    event.truncate(1024);
    let frame = Bytes::from(event);
    let mut group = c.benchmark_group("forward_1KiB_event_frame");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    let runtime = paused_runtime();
    let waker = std::task::Waker::noop();
    group.bench_function("bare body (baseline)", |b| {
        let mut body = Box::pin(Busy(frame.clone()));
        let mut cx = Context::from_waker(waker);
        b.iter(|| std::hint::black_box(body.as_mut().poll_frame(&mut cx)));
    });
    let busy_upstream = |frame: Bytes| {
        service_fn(move |_req: Request<()>| {
            let frame = frame.clone();
            async move {
                let response = Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .body(Busy(frame))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        })
    };
    group.bench_function("through HeartbeatLayer", |b| {
        let service = HeartbeatLayer::new(INTERVAL).layer(busy_upstream(frame.clone()));
        let response = runtime.block_on(service.oneshot(Request::new(()))).unwrap();
        let mut body = Box::pin(response.into_body());
        let _guard = runtime.enter();
        let mut cx = Context::from_waker(waker);
        b.iter(|| std::hint::black_box(body.as_mut().poll_frame(&mut cx)));
    });
    // Passthrough reports every frame to telemetry (a `tracing` callsite and, with the
    // `metrics` feature, two counters): here with neither a subscriber nor a recorder.
    group.bench_function(
        "through PassthroughLayer (telemetry, nothing listening)",
        |b| {
            let service = PassthroughLayer::new().layer(busy_upstream(frame.clone()));
            let response = runtime.block_on(service.oneshot(Request::new(()))).unwrap();
            let mut body = Box::pin(response.into_body());
            let mut cx = Context::from_waker(waker);
            b.iter(|| std::hint::black_box(body.as_mut().poll_frame(&mut cx)));
        },
    );
    group.finish();
}

fn main() {
    memory_per_idle_stream("tower-sse HeartbeatLayer", || Box::pin(tower_sse_stream()));
    memory_per_idle_stream("axum Sse::keep_alive", || Box::pin(axum_stream()));
    memory_per_idle_stream("tower-sse LifetimeLayer", || Box::pin(lifetime_stream()));
    memory_per_idle_stream("tower-sse IdleTimeoutLayer", || {
        Box::pin(idle_timeout_stream())
    });
    memory_per_idle_stream("tower-sse ReplayLayer", || Box::pin(replay_stream()));
    memory_per_idle_stream("tower-sse full stack", || Box::pin(full_stack_stream()));
    memory_per_idle_stream("tower-sse SseStack", || Box::pin(stack_builder_stream()));
    let mut criterion = Criterion::default().configure_from_args();
    heartbeat_cpu(&mut criterion);
    forwarding_cpu(&mut criterion);
    criterion.final_summary();
}
