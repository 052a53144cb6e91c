//! Replay costs: appending to and resuming from the in-memory store, and what recording and
//! resuming add to a response through `ReplayLayer`, each next to a same-run baseline.
//!
//! ```text
//! cargo bench --bench replay
//! ```
//!
//! First it prints the heap memory per retained event (a counting global allocator, 10,000
//! keys of 100 events each). Then criterion measures:
//! - `store/append`: events appended per second to one key bounded at 1,000 events;
//! - `store/resume`: reads of the 100 events after an id in the middle of that key;
//! - `layer/record`: a 1,000-event response through `ReplayLayer` (parsing and recording every
//!   event), against the same response through no layer (baseline);
//! - `layer/resume`: a reconnect that replays 100 events, against a new subscription (baseline).
//! - `redis/append` and `redis/resume` (when `redis-server` is installed; the bench starts one on
//!   a free port): the same two operations on a `RedisStore`, to set against `store/*`. An append
//!   is counted when Redis has confirmed it (pipelined batches through the store's writer task).

#[path = "support/alloc.rs"]
mod alloc;
#[path = "../tests/support/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis_server;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;
use tower_sse::replay::{
    Lookup, MemoryLimits, MemoryStore, ReadFrom, RedisConfig, RedisStore, ReplayLayer, ReplayStore,
    StoredEvent,
};

fn event(id: u64) -> StoredEvent {
    let bytes = Bytes::from(format!(
        "id: {id}\nevent: tick\ndata: {{\"n\":{id},\"msg\":\"hello world\"}}\n\n"
    ));
    StoredEvent {
        id: Bytes::from(id.to_string()),
        bytes,
    }
}

fn memory_per_retained_event() {
    // No byte budget here: this measures what a million retained events cost.
    let limits = MemoryLimits::default()
        .events_per_key(100)
        .max_keys(10_000)
        .max_bytes(usize::MAX);
    let events: Vec<Vec<StoredEvent>> = (0..10_000u64)
        .map(|k| (0..100).map(|i| event(k * 100 + i)).collect())
        .collect();
    let payload: usize = events
        .iter()
        .flatten()
        .map(|e| e.bytes.len() + e.id.len())
        .sum();
    let before = alloc::LIVE.load(Ordering::Relaxed);
    let store = MemoryStore::with_limits(limits);
    let keys: Vec<Bytes> = (0..10_000)
        .map(|k| Bytes::from(format!("/stream/{k}")))
        .collect();
    for (key, events) in keys.iter().zip(events) {
        for event in events {
            store.append(key, event);
        }
    }
    let total = (alloc::LIVE.load(Ordering::Relaxed) - before) as f64;
    let retained = 1_000_000.0;
    println!(
        "MemoryStore, 10,000 keys x 100 events: {:.0} bytes per retained event, of which {:.0} are the \
         event and its id and {:.0} bookkeeping",
        total / retained,
        payload as f64 / retained,
        (total - payload as f64) / retained
    );
    // The events were allocated before `before`: what the store holds is both.
    println!(
        "MemoryStore counts {:.0} bytes per retained event against {:.0} held",
        store.bytes() as f64 / retained,
        (total + payload as f64) / retained
    );
    drop(store);
}

/// What a key with a single small event costs, against what the store counts for it.
fn memory_per_key() {
    let events: Vec<StoredEvent> = (0..100_000u64).map(event).collect();
    let keys: Vec<Bytes> = (0..100_000)
        .map(|k| Bytes::from(format!("/stream?nonce={k}")))
        .collect();
    let payload: usize = events
        .iter()
        .map(|e| e.bytes.len() + e.id.len())
        .sum::<usize>()
        + keys.iter().map(|k| k.len()).sum::<usize>();
    let before = alloc::LIVE.load(Ordering::Relaxed);
    let limits = MemoryLimits::default()
        .max_keys(100_000)
        .max_bytes(usize::MAX);
    let store = MemoryStore::with_limits(limits);
    for (key, event) in keys.iter().zip(events) {
        store.append(key, event);
    }
    let total = (alloc::LIVE.load(Ordering::Relaxed) - before) as f64 + payload as f64;
    println!(
        "MemoryStore, 100,000 keys x 1 event: {:.0} bytes held per key, {:.0} counted",
        total / 100_000.0,
        store.bytes() as f64 / 100_000.0
    );
    drop(store);
}

fn store(c: &mut Criterion) {
    let key = Bytes::from_static(b"/stream");
    let events: Vec<StoredEvent> = (0..10_000).map(event).collect();
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("append", |b| {
        let store = MemoryStore::with_limits(MemoryLimits::default().events_per_key(1_000));
        b.iter(|| {
            for event in &events {
                store.append(&key, event.clone());
            }
        })
    });
    let store = MemoryStore::with_limits(MemoryLimits::default().events_per_key(1_000));
    for event in &events {
        store.append(&key, event.clone());
    }
    let middle = events[9_500].id.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    group.throughput(Throughput::Elements(100));
    group.bench_function("resume (100 events after an id)", |b| {
        b.iter(|| {
            runtime
                .block_on(store.read(&key, ReadFrom::After(&middle), 100))
                .unwrap()
        })
    });
    group.finish();
}

fn redis(c: &mut Criterion) {
    let Some(server) = redis_server::RedisServer::start() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        let store = RedisStore::open(&server.url(), RedisConfig::default().max_len(1_000)).unwrap();
        assert!(store.connected(Duration::from_secs(10)).await);
        store
    });
    let key = Bytes::from_static(b"/stream");
    let events: Vec<StoredEvent> = (0..10_000).map(event).collect();
    let mut group = c.benchmark_group("redis");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("append", |b| {
        let mut round = 0u64;
        b.iter_custom(|iters| {
            let started = std::time::Instant::now();
            for _ in 0..iters {
                round += 1;
                // New ids each round: a retained id would be deduplicated, not appended.
                let target = store.stats().appended + events.len() as u64;
                for event in &events {
                    let id = Bytes::from(format!(
                        "{round}-{}",
                        std::str::from_utf8(&event.id).unwrap()
                    ));
                    store.append(
                        &key,
                        StoredEvent {
                            id,
                            bytes: event.bytes.clone(),
                        },
                    );
                }
                runtime.block_on(async {
                    while store.stats().appended < target {
                        assert_eq!(store.stats().dropped, 0, "an append was dropped");
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                });
            }
            started.elapsed()
        })
    });
    for event in &events {
        store.append(&key, event.clone());
    }
    let middle = events[9_500].id.clone();
    runtime.block_on(async {
        while !matches!(
            store.read(&key, ReadFrom::After(&middle), 100).await,
            Ok(Lookup::Found(ref found)) if found.len() == 100
        ) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    group.throughput(Throughput::Elements(100));
    group.bench_function("resume (100 events after an id)", |b| {
        b.iter(|| {
            runtime
                .block_on(store.read(&key, ReadFrom::After(&middle), 100))
                .unwrap()
        })
    });
    group.finish();
}

fn stream_of(events: u64) -> Bytes {
    let mut out = Vec::new();
    for id in 1..=events {
        out.extend_from_slice(&event(id).bytes);
    }
    Bytes::from(out)
}

fn layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let stream = stream_of(1_000);
    let upstream = service_fn(move |_req: Request<()>| {
        let body = Full::new(stream.clone());
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut group = c.benchmark_group("layer");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("record: 1000 events, no layer (baseline)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = upstream.clone().oneshot(Request::new(())).await.unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.bench_function("record: 1000 events through ReplayLayer", |b| {
        let layer = ReplayLayer::new();
        b.iter(|| {
            runtime.block_on(async {
                let response = layer
                    .layer(upstream.clone())
                    .oneshot(Request::new(()))
                    .await
                    .unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    // Resuming: the store holds the 1,000 events; the upstream has nothing new to say.
    let empty = service_fn(|_req: Request<()>| {
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Full::new(Bytes::new()))
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let layer = ReplayLayer::new();
    runtime.block_on(async {
        let response = layer
            .layer(upstream.clone())
            .oneshot(Request::new(()))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("resume: new subscription (baseline)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = layer.layer(empty).oneshot(Request::new(())).await.unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.bench_function("resume: reconnect replaying 100 events", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let request = Request::builder()
                    .header("last-event-id", "900")
                    .body(())
                    .unwrap();
                let response = layer.layer(empty).oneshot(request).await.unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.finish();
}

fn main() {
    memory_per_retained_event();
    memory_per_key();
    let mut criterion = Criterion::default().configure_from_args();
    store(&mut criterion);
    redis(&mut criterion);
    layer(&mut criterion);
    criterion.final_summary();
}
