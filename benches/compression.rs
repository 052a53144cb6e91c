//! SSE compression on a realistic JSON event stream (events of about 300 bytes with repeated
//! keys), every event flushed as the layer does: ratio, CPU per event, memory per stream.
//!
//! ```text
//! cargo bench --bench compression --features compression
//! ```
//!
//! The baseline in the same run is the identity encoding through the same layer (no compressor):
//! the CPU figures subtract nothing, they sit side by side.

#[path = "support/alloc.rs"]
mod alloc;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_sse::compression::SseCompressionLayer;
use tower_sse::testing::{Script, ScriptedService};

const EVENTS: usize = 1_000;

fn event(n: usize) -> Bytes {
    let event = format!(
        "id: {n}\nevent: quote\ndata: {{\"symbol\":\"ACME\",\"exchange\":\"XNAS\",\"price\":{}.{:02},\
         \"bid\":{}.{:02},\"ask\":{}.{:02},\"volume\":{},\"currency\":\"USD\",\
         \"timestamp\":\"2026-11-22T12:{:02}:{:02}.{:03}Z\",\"source\":\"consolidated-feed\",\
         \"flags\":[\"regular\",\"lit\"],\"sequence\":{n}}}\n\n",
        100 + n % 50,
        n % 100,
        99 + n % 50,
        (n * 7) % 100,
        101 + n % 50,
        (n * 3) % 100,
        1000 + n * 13 % 5000,
        n / 60 % 60,
        n % 60,
        n % 1000,
    );
    Bytes::from(event)
}

/// The stream, one event per frame: each one is flushed on its own.
fn script() -> Script {
    Script::new().chunks((0..EVENTS).map(event))
}

fn compress(runtime: &tokio::runtime::Runtime, accept: &str) -> Bytes {
    runtime.block_on(async {
        let service = SseCompressionLayer::new().layer(ScriptedService::event_stream(script()));
        let request = Request::builder()
            .header("accept-encoding", accept)
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    })
}

const ENCODINGS: [&str; 5] = ["identity", "gzip", "deflate", "br", "zstd"];

fn ratios_and_memory(runtime: &tokio::runtime::Runtime) {
    let raw: usize = (0..EVENTS).map(|n| event(n).len()).sum();
    println!(
        "{EVENTS} events of {} bytes on average, each flushed:",
        raw / EVENTS
    );
    for accept in ENCODINGS {
        let compressed = compress(runtime, accept).len();
        // Memory: 100 open streams, each after its first event.
        let before = alloc::LIVE.load(Ordering::Relaxed);
        let bodies: Vec<_> = (0..100)
            .map(|_| {
                runtime.block_on(async {
                    let service = SseCompressionLayer::new().layer(ScriptedService::event_stream(
                        Script::new().chunk(event(0)).hang(),
                    ));
                    let request = Request::builder()
                        .header("accept-encoding", accept)
                        .body(())
                        .unwrap();
                    let mut body = Box::pin(service.oneshot(request).await.unwrap().into_body());
                    // The compressor's header, then the first event (identity: the event only).
                    if accept != "identity" {
                        body.frame().await;
                    }
                    body.frame().await;
                    body
                })
            })
            .collect();
        let per_stream = (alloc::LIVE.load(Ordering::Relaxed) - before) / 100;
        drop(bodies);
        println!(
            "  {accept:<8} {compressed:>7} bytes, ratio {:>5.2}x, {:>5.1} bytes per event, heap per open stream {:>7} bytes",
            raw as f64 / compressed as f64,
            compressed as f64 / EVENTS as f64,
            per_stream,
        );
    }
}

fn cpu(c: &mut Criterion, runtime: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("compress_1000_events");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    for accept in ENCODINGS {
        group.bench_function(accept, |b| b.iter(|| compress(runtime, accept)));
    }
    group.finish();
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    ratios_and_memory(&runtime);
    let mut criterion = Criterion::default().configure_from_args();
    cpu(&mut criterion, &runtime);
    criterion.final_summary();
}
