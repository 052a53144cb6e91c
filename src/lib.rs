//! Composable [`tower`] middleware for Server-Sent Events.
//!
//! tower-sse gives any `Service<http::Request<_>>` (an axum app, a hyper reverse proxy, a tonic
//! server) the things a good SSE gateway does, as layers you stack with `ServiceBuilder`.
//! Every layer wraps arbitrary response bodies (proxied ones included) and lets everything that is
//! not an event stream (JSON, gRPC with trailers) through untouched. Two shared tests decide, in
//! [`wire`]: [`wire::is_event_stream`] (the Content-Type's essence, as browsers test it) for
//! every layer, and [`wire::is_encoded`] (a content coding other than `identity`) for the layers
//! that read or write the body, which leave a compressed stream alone
//! ([`wire::is_plain_event_stream`] is the two together).
//!
//! | layer | what it does |
//! |---|---|
//! | [`SseHeadersLayer`] | `Content-Type`, `Cache-Control`, `Connection` (HTTP/1 only), `X-Accel-Buffering: no`; optional `406` on a wrong `Accept` |
//! | [`PassthroughLayer`] | forwards every frame at once, drops `Content-Length`, optionally sends a first byte immediately |
//! | `SseCompressionLayer` (feature `compression`) | gzip, deflate, brotli or zstd by `Accept-Encoding`, flushed after every event |
//! | [`ReconnectDelayLayer`] | `retry:` first in every stream, jittered against reconnect storms |
//! | [`CommentMetadataLayer`] | response headers and per-event metadata as `:key=value` comments for raw readers, injection-proof |
//! | [`HeartbeatLayer`] | a comment (or a typed event) when the stream is quiet, only between events |
//! | [`LifetimeLayer`] + [`Shutdown`] | end streams at an event boundary after a (jittered) maximum lifetime or on shutdown, so graceful shutdown completes |
//! | [`ReplayLayer`] | record events per stream key; a client reconnecting with `Last-Event-ID` gets what it missed, then the live stream, with QoS presets |
//! | [`FanoutLayer`] | one upstream subscription per stream key shared by all its clients, a bounded queue per client, lingering for reconnects |
//! | `SubscribeLayer` (feature `subscriptions`) | provisioned subscriptions: readers through the layer (by id, from a server-side cursor; disposable subscriptions for plain readers), and a JSON management API to mount behind your authentication (`Subscriptions::api`): create, list, suspend (closing channels at a boundary), reactivate, delete |
//! | [`IdleTimeoutLayer`] | end a stream whose upstream went silent |
//! | [`ResponseTimeoutLayer`] | `504` when response headers are late |
//! | [`SseStack`] | all of the above in the one order that works, each part optional at run time; the parts that read streams run as one engine: one scan, one timer |
//!
//! The names follow tower-http's pattern: each `FooLayer` (at the crate root) makes a `Foo`
//! service (in its module, with `Foo::new(inner, ..)` and `Foo::layer(..)`) whose response body
//! is a `FooBody`; errors end in `Error`, and every jitter is a `Duration` spread.
//!
//! Beneath the layers, [`wire`] is the event-stream core they share: a scanner for event
//! boundaries, a zero-copy parser that follows the WHATWG rules to the letter, and a typed
//! [`Event`](wire::Event) encoder that cannot inject fields.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{routing::get, Router};
//! use axum::response::sse::{Event, Sse};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sse::{PassthroughLayer, SseHeadersLayer};
//!
//! async fn events() -> Sse<impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>> {
//!     Sse::new(tokio_stream::iter([Ok(Event::default().data("hi"))]))
//! }
//!
//! let app = Router::new()
//!     .route("/events", get(events))
//!     .route("/health", get(|| async { "ok" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(SseHeadersLayer::new())
//!             .layer(PassthroughLayer::new().initial_comment("ok")),
//!     );
//!
//! let request = http::Request::get("/events").body(axum::body::Body::empty()).unwrap();
//! let response = app.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.headers()["x-accel-buffering"], "no");
//!
//! let mut reader = tower_sse::wire::EventReader::new(response.into_body());
//! let first = reader.next_event().await.unwrap().unwrap();
//! assert_eq!(first.comments()[0], "ok");
//! let second = reader.next_event().await.unwrap().unwrap();
//! assert_eq!(second.data().as_deref(), Some("hi"));
//!
//! // Other routes are untouched.
//! let request = http::Request::get("/health").body(axum::body::Body::empty()).unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert!(response.headers().get("x-accel-buffering").is_none());
//! # }
//! ```
//!
//! # Stack order
//!
//! The layers work in one order only, outermost first: headers, passthrough, compression,
//! subscriptions, retry, comment metadata, heartbeat, lifetime, replay, fan-out, then the
//! timeouts. [`SseStack`] applies it by construction and runs the stream-reading parts as one
//! engine (one scan, one timer per stream); the [`stack`] module documents the order, and what
//! breaks if it changes, once.
//!
//! ```
//! use std::time::Duration;
//! use tower_sse::replay::MemoryStore;
//! use tower_sse::{
//!     CommentMetadataLayer, FanoutLayer, LifetimeLayer, ReplayLayer, Shutdown, SseStack,
//! };
//!
//! let shutdown = Shutdown::new();
//! let stack = SseStack::new()
//!     .initial_comment("ok")
//!     .reconnect_delay(Duration::from_secs(2))
//!     .metadata(CommentMetadataLayer::new().metadata_as_comment(true))
//!     .heartbeat(Duration::from_secs(15))
//!     .lifetime(LifetimeLayer::new().max_lifetime(Duration::from_secs(600)).jitter(Duration::from_secs(120)).shutdown(&shutdown))
//!     .replay(ReplayLayer::with_store(MemoryStore::new()))
//!     .fanout(FanoutLayer::new().linger(Duration::from_secs(10)))
//!     .idle_timeout(Duration::from_secs(60))
//!     .response_timeout(Duration::from_secs(10));
//! # let _ = stack;
//! ```
//!
//! # With tower-http
//!
//! tower-http's `TraceLayer`, `CorsLayer` and `TimeoutLayer` go anywhere around or inside these
//! layers in one `ServiceBuilder` (the bodies implement `Default` for tower-http's own answers).
//! tower-http's `TimeoutLayer` times the response head only; [`timeout::IdleTimeoutLayer`] bounds
//! the silence within a stream and ends it at an event boundary, where tower-http's
//! `ResponseBodyTimeoutLayer` would fail the body mid-event. tower-http's `CompressionLayer`
//! leaves event streams alone; `SseCompressionLayer` (feature `compression`) compresses them,
//! flushing after every event. The README's "With tower-http" section has the table and an
//! example, which `tests/compat.rs` runs in both orders.
//!
//! # Operations
//!
//! Every layer reports its decisions as `tracing` events with target `tower_sse`. They are
//! free when no subscriber listens.
//! - `debug`: a stream opened or closed (with the reason and the bytes sent), a `406`, a
//!   timeout or lifetime end, a replay (where it resumed, how many events), an unknown
//!   `Last-Event-ID`, a fan-out subscription opened or closed (with the reason), a
//!   subscription channel opened or refused, channels closed by a suspension.
//! - `info`: a fan-out client too slow.
//! - `warn`: a replay or subscription store failure (Redis unreachable, a write sent again,
//!   writes dropped).
//! - `trace`: every frame, heartbeat and compressed frame.
//!
//! With the `metrics` feature, the same decisions go to the [`metrics`](https://docs.rs/metrics)
//! facade: install any recorder (Prometheus, StatsD, ...). Without the feature, no metric code is
//! compiled.
//!
//! | metric | kind | labels | from |
//! |---|---|---|---|
//! | `sse_streams_open` | gauge | | passthrough: event streams open now |
//! | `sse_streams_opened_total` | counter | | passthrough |
//! | `sse_streams_closed_total` | counter | `reason`: `end` (the body ended: the upstream's end, or a lifetime or shutdown end, which `sse_timeouts_total` counts by kind), `error`, `client_gone` (dropped before its end) | passthrough |
//! | `sse_frames_sent_total`, `sse_bytes_sent_total` | counter | | passthrough: what left for clients; a stream adds its first frame at once, then at most once a second and at its end (every stream adds to the same counter, and adding per frame costs a busy proxy some 1.5 % of its CPU) |
//! | `sse_heartbeats_total` | counter | | heartbeat |
//! | `sse_timeouts_total` | counter | `kind`: `idle`, `response`, `lifetime`, `shutdown` | timeouts, lifetime |
//! | `sse_rejected_total` | counter | `reason`: `not_acceptable` | headers (`406`) |
//! | `sse_replay_requests_total` | counter | `resumed`: `new`, `snapshot`, `last-event-id`, `partial`, `earliest`, `live`, `upstream` | replay |
//! | `sse_replay_events_total` | counter | | replay: events replayed |
//! | `sse_replay_unknown_ids_total` | counter | | replay |
//! | `sse_replay_store_failures_total` | counter | | replay |
//! | `sse_replay_store_keys`, `sse_replay_store_events` | gauge | | `MemoryStore`, at most once a second |
//! | `sse_replay_store_write_failures_total` | counter | | `RedisStore`: batches of appends that failed and are sent again |
//! | `sse_replay_store_dropped_total` | counter | | `RedisStore`: appends dropped from Redis's copy (queue full; still in the local tier) |
//! | `sse_replay_store_local_reads_total` | counter | `reason`: `failed` (Redis failed), `unknown` (Redis did not know the id), `more` (the local tier knew more) | `RedisStore` |
//! | `sse_fanout_subscriptions`, `sse_fanout_clients` | gauge | | fan-out |
//! | `sse_fanout_events_total` | counter | | fan-out: upstream events shared |
//! | `sse_fanout_slow_clients_total` | counter | `policy`: `disconnect`, `skip` | fan-out |
//! | `sse_compression_in_bytes_total`, `sse_compression_out_bytes_total` | counter | `encoding` | compression (ratio = in / out) |
//! | `sse_subscription_channels_total` | counter | `outcome`: `provisioned`, `disposable` (opened), `suspended`, `unknown` (refused) | subscriptions |
//! | `sse_subscription_closed_channels_total` | counter | | subscriptions: open channels closed by a suspension or deletion |
//!
//! Counts of streams, frames and bytes come from the passthrough layer, which sees every event
//! stream once; a stack without it reports no stream counts.
//!
//! # Feature flags
//!
//! - `compression`: `SseCompressionLayer` (pulls flate2, brotli and zstd).
//! - `redis`: `replay::RedisStore`, replay history in Redis Streams shared by several instances
//!   (pulls redis).
//! - `metrics`: metrics through the `metrics` facade (see Operations).
//! - `subscriptions`: [`subscriptions`](https://docs.rs/tower-sse/latest/tower_sse/subscriptions/), provisioned subscriptions with a JSON management API
//!   and server-side cursors (pulls serde, serde_json and http-body-util); in Redis with
//!   `redis` too.
//! - `test-util`: the [`testing`](https://docs.rs/tower-sse/latest/tower_sse/testing/) kit for your own tests (requests as browsers send them,
//!   assertions on what a client sees, scripted upstreams).
//! - `full`: every feature.
//!
//! The crate depends on tokio for timers and, in the fan-out hub, one spawned task per shared
//! subscription (`time`, `sync`, `rt`); it needs a tokio runtime.
//!
//! [`tower`]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
// Input never reaches a bare unwrap in the library; invariants say why in an `expect`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

/// `get_ref`, `get_mut` and `into_inner` for a layer body whose `self.kind` is `Kind::Untouched
/// { inner }` or `Kind::Stream { inner, .. }`; `$drops` says what `into_inner` leaves behind.
#[cfg(feature = "compression")]
macro_rules! inner_body_accessors {
    ($drops:literal) => {
        /// The inner service's body.
        pub fn get_ref(&self) -> &B {
            match &self.kind {
                Kind::Untouched { inner } | Kind::Stream { inner, .. } => inner,
            }
        }

        /// The inner service's body, mutably.
        pub fn get_mut(&mut self) -> &mut B {
            match &mut self.kind {
                Kind::Untouched { inner } | Kind::Stream { inner, .. } => inner,
            }
        }

        #[doc = concat!("Unwraps the inner service's body: ", $drops)]
        pub fn into_inner(self) -> B {
            match self.kind {
                Kind::Untouched { inner } | Kind::Stream { inner, .. } => inner,
            }
        }
    };
}

/// `get_ref`, `get_mut` and `into_inner` for a service whose inner service is `self.inner: S`.
macro_rules! inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Unwraps the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

mod body;
#[cfg(feature = "compression")]
#[cfg_attr(docsrs, doc(cfg(feature = "compression")))]
pub mod compression;
mod engine;
pub mod fanout;
mod future;
pub mod headers;
pub mod heartbeat;
mod jitter;
pub mod lifetime;
pub mod metadata;
pub mod passthrough;
pub mod reconnect;
pub mod replay;
pub mod stack;
#[cfg(feature = "subscriptions")]
#[cfg_attr(docsrs, doc(cfg(feature = "subscriptions")))]
pub mod subscriptions;
mod telemetry;
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
pub mod timeout;
pub mod wire;

// Every layer is at the crate root (with the shutdown handle and the stack builder); services,
// bodies, futures, errors and policies stay in their modules.
#[cfg(feature = "compression")]
#[cfg_attr(docsrs, doc(cfg(feature = "compression")))]
pub use compression::SseCompressionLayer;
pub use fanout::FanoutLayer;
pub use headers::SseHeadersLayer;
pub use heartbeat::HeartbeatLayer;
pub use lifetime::{LifetimeLayer, Shutdown};
pub use metadata::CommentMetadataLayer;
pub use passthrough::PassthroughLayer;
pub use reconnect::ReconnectDelayLayer;
pub use replay::ReplayLayer;
pub use stack::SseStack;
#[cfg(feature = "subscriptions")]
#[cfg_attr(docsrs, doc(cfg(feature = "subscriptions")))]
pub use subscriptions::SubscribeLayer;
pub use timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};

/// A boxed error, as the bodies of the layers that can end a stream with their own error report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(test)]
mod test_util;

/// The README's Rust examples, compiled and run as doc tests (they use every feature).
#[cfg(all(
    doctest,
    feature = "test-util",
    feature = "compression",
    feature = "redis",
    feature = "subscriptions"
))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
