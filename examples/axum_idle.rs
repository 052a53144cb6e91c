//! A baseline for idle-stream memory: a plain axum server whose `/events` is an `Sse` stream that
//! never sends an event. By default it is kept alive by axum's own `KeepAlive` comments every
//! second and no tower-sse layer is involved; with `stack`, the same route runs behind the full
//! tower-sse stack instead (header policy, passthrough with a first comment, retry, heartbeat
//! every second, lifetime, replay, idle and response timeouts). `benches/compare.sh` holds
//! thousands of idle streams on each and compares their memory per stream.
//!
//! ```sh
//! cargo run --release --example axum_idle -- 127.0.0.1:4300          # axum KeepAlive
//! cargo run --release --example axum_idle -- 127.0.0.1:4301 stack    # tower-sse full stack
//! ```

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use tokio_stream::Stream;
use tower::ServiceBuilder;
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::{
    HeartbeatLayer, LifetimeLayer, PassthroughLayer, ReconnectDelayLayer, ReplayLayer,
    SseHeadersLayer,
};

fn idle() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(tokio_stream::pending())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4300".to_owned());
    let stack = args.next().as_deref() == Some("stack");
    let router = if stack {
        Router::new()
            .route("/events", get(|| async { idle() }))
            .layer(
                ServiceBuilder::new()
                    .layer(SseHeadersLayer::new())
                    .layer(PassthroughLayer::new().initial_comment("ok"))
                    .layer(ReconnectDelayLayer::new(Duration::from_secs(3)))
                    .layer(HeartbeatLayer::new(Duration::from_secs(1)))
                    .layer(LifetimeLayer::new().max_lifetime(Duration::from_secs(3600)))
                    .layer(ReplayLayer::new())
                    .layer(IdleTimeoutLayer::new(Duration::from_secs(3600)))
                    .layer(ResponseTimeoutLayer::new(Duration::from_secs(30))),
            )
    } else {
        Router::new().route(
            "/events",
            get(|| async { idle().keep_alive(KeepAlive::new().interval(Duration::from_secs(1))) }),
        )
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("the address is free");
    let what = if stack {
        "tower-sse full stack"
    } else {
        "axum KeepAlive"
    };
    println!("idle-stream server ({what}) listening on http://{addr}/events");
    axum::serve(listener, router)
        .await
        .expect("the server runs");
}
