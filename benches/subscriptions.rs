//! Provisioned subscriptions: what the store operations cost in memory and in Redis, and what
//! opening a subscription's channel through the subscriptions layer adds to a plain request,
//! measured in one run.
//!
//! ```text
//! cargo bench --bench subscriptions
//! ```
//!
//! Criterion measures, per operation:
//! - `store/memory/*` and `store/redis/*` (the latter when `redis-server` is installed; the bench
//!   starts one on a free port), on `MemorySubscriptions` and `RedisSubscriptions`:
//!   - `create`: a new subscription stored on a topic whose maximum is never reached (the
//!     subscriptions are built beforehand, untimed);
//!   - `get`: an existing subscription by id;
//!   - `list`: a topic holding 100 subscriptions;
//!   - `patch`: one `set_status`, alternating suspended and active.
//! - `open/*`: a request through `Subscriptions::new(store).layer()` over a trivial topic service
//!   (a `text/event-stream` answer of one small event), until the body is read to its end:
//!   - `open/plain`: a path that is no topic (`/other`), passed untouched: the baseline;
//!   - `open/provisioned-{memory,redis}`: `GET /subscriptions/{id}/subscribe` of a subscription
//!     created beforehand (a `get` from the store, and a cursor move per event, written in the
//!     background by the Redis store);
//!   - `open/disposable-{memory,redis}`: `GET /topics/news`, which creates a disposable
//!     subscription and removes it when the body ends (the Redis store queues the removal for
//!     its background writer).
//!
//! Every path runs on the same two-worker tokio runtime, one `block_on` per criterion sample
//! (the operations awaited one after another inside it), so the runtime's wake-up is not
//! counted per operation.

#[path = "../tests/support/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis_server;

use std::convert::Infallible;
use std::future::{ready, Future};
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::runtime::Runtime;
use tower::{service_fn, Service, ServiceExt};
use tower_layer::Layer;
use tower_sse::replay::{RedisConfig, RedisStore};
use tower_sse::subscriptions::{
    Caps, Created, MemorySubscriptions, RedisSubscriptions, Status, Subscription,
    SubscriptionStore, Subscriptions,
};

/// Caps no bench reaches.
const UNBOUNDED: Caps = Caps {
    per_topic: 1_000_000_000,
    total: 1_000_000_000,
};
/// Subscriptions built (untimed) before each run of timed creates.
const CHUNK: u64 = 10_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Times `iters` runs of `operation`, awaited one after another in one `block_on`.
fn timed<F, Fut>(runtime: &Runtime, iters: u64, mut operation: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: Future,
{
    runtime.block_on(async {
        let started = Instant::now();
        for n in 0..iters {
            black_box(operation(n).await);
        }
        started.elapsed()
    })
}

/// The four store operations on the store `fresh` returns (`fresh` is called again for each
/// chunk of creates, so the memory store does not grow without bound).
fn store_ops<St: SubscriptionStore>(
    c: &mut Criterion,
    runtime: &Runtime,
    name: &str,
    fresh: impl Fn() -> St,
) {
    let mut group = c.benchmark_group(format!("store/{name}"));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));

    group.bench_function("create", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                left -= n;
                let store = fresh();
                let mut subscriptions: Vec<Subscription> =
                    (0..n).map(|_| Subscription::new("create")).collect();
                total += timed(runtime, n, |_| {
                    let subscription = subscriptions.pop().unwrap();
                    let created = store.create(subscription, UNBOUNDED);
                    async move { assert_eq!(created.await.unwrap(), Created::Stored) }
                });
                // Dropped untimed.
                drop(store);
            }
            total
        })
    });

    let store = fresh();
    let listed: Vec<Subscription> = (0..100).map(|_| Subscription::new("list")).collect();
    runtime.block_on(async {
        for subscription in &listed {
            let created = store.create(subscription.clone(), UNBOUNDED).await.unwrap();
            assert_eq!(created, Created::Stored);
        }
        assert_eq!(store.list("list").await.unwrap().len(), 100);
    });
    let id = listed[0].id.clone();

    group.bench_function("get", |b| {
        b.iter_custom(|iters| {
            timed(runtime, iters, |_| {
                let got = store.get(&id);
                async move { got.await.unwrap().expect("the subscription exists") }
            })
        })
    });
    group.bench_function("list", |b| {
        b.iter_custom(|iters| {
            timed(runtime, iters, |_| {
                let listed = store.list("list");
                async move {
                    let listed = listed.await.unwrap();
                    assert_eq!(listed.len(), 100);
                    listed
                }
            })
        })
    });
    group.bench_function("patch", |b| {
        b.iter_custom(|iters| {
            timed(runtime, iters, |n| {
                let status = if n % 2 == 0 {
                    Status::Suspended
                } else {
                    Status::Active
                };
                let patched = store.set_status(&id, status);
                async move {
                    let patched = patched.await.unwrap().expect("the subscription exists");
                    assert_eq!(patched.status, status);
                }
            })
        })
    });
    group.finish();
}

/// The topics' service: one small event, then the end of the stream.
fn topics(
    _request: Request<Empty<Bytes>>,
) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    let response = Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Full::new(Bytes::from_static(b"id: 1\ndata: x\n\n")))
        .unwrap();
    ready(Ok(response))
}

/// Times `iters` requests to `path` through `service`, each read to the end of its body; the
/// response must carry a subscription's channel exactly when `channel` is true.
fn open_bench<S, B>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &Runtime,
    name: &str,
    service: S,
    path: String,
    channel: bool,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let open = move || {
        let request = Request::get(&path).body(Empty::new()).unwrap();
        let response = service.clone().oneshot(request);
        async move {
            let response = response.await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers().contains_key("sse-subscription"), channel);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 15);
            body
        }
    };
    group.bench_function(name, |b| {
        b.iter_custom(|iters| timed(runtime, iters, |_| open()))
    });
}

/// `open/provisioned-<store>` and `open/disposable-<store>` on `store`.
fn open_with<St: SubscriptionStore>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &Runtime,
    name: &str,
    store: St,
) {
    // Far above the disposable subscriptions a background writer may still have to remove.
    let subscriptions = Subscriptions::new(store)
        .max_per_topic(UNBOUNDED.per_topic)
        .max_subscriptions(UNBOUNDED.total);
    let service = subscriptions.layer().layer(service_fn(topics));
    let provisioned = Subscription::new("news");
    let path = format!("/subscriptions/{}/subscribe", provisioned.id);
    let created = runtime.block_on(subscriptions.store().create(provisioned, UNBOUNDED));
    assert_eq!(created.unwrap(), Created::Stored);
    open_bench(
        group,
        runtime,
        &format!("provisioned-{name}"),
        service.clone(),
        path,
        true,
    );
    open_bench(
        group,
        runtime,
        &format!("disposable-{name}"),
        service,
        "/topics/news".to_owned(),
        true,
    );
    // Every disposable subscription is removed once its channel closed (the Redis store's
    // writer may need a moment): only the provisioned one is left.
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = subscriptions.store().list("news").await.unwrap().len();
            if left == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{left} subscriptions left on the topic"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

fn open(c: &mut Criterion, runtime: &Runtime, redis: Option<&RedisSubscriptions>) {
    let mut group = c.benchmark_group("open");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    let plain = Subscriptions::in_memory().layer().layer(service_fn(topics));
    open_bench(
        &mut group,
        runtime,
        "plain",
        plain,
        "/other".to_owned(),
        false,
    );
    open_with(&mut group, runtime, "memory", MemorySubscriptions::new());
    if let Some(redis) = redis {
        open_with(&mut group, runtime, "redis", redis.clone());
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let runtime = runtime();
    let server = redis_server::RedisServer::start();
    let redis = server.as_ref().map(|server| {
        runtime.block_on(async {
            let store =
                RedisStore::open(&server.url(), RedisConfig::default().prefix("bench:")).unwrap();
            assert!(store.connected(Duration::from_secs(10)).await);
            store.subscriptions()
        })
    });
    store_ops(&mut criterion, &runtime, "memory", MemorySubscriptions::new);
    match &redis {
        Some(redis) => store_ops(&mut criterion, &runtime, "redis", || redis.clone()),
        None => println!("store/redis/* and open/*-redis skipped: redis-server is not installed"),
    }
    open(&mut criterion, &runtime, redis.as_ref());
    criterion.final_summary();
    // The store's tasks end with the runtime, before the server goes.
    drop(redis);
    drop(runtime);
    drop(server);
}
