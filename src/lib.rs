//! Composable [`tower`] middleware for Server-Sent Events.
//!
//! tower-sse gives any `Service<http::Request<_>>` (an axum app, a hyper reverse proxy, a tonic
//! server) the things a good SSE gateway does, as layers you stack with `ServiceBuilder`.
//! Every layer wraps arbitrary response bodies (proxied ones included), recognises event streams
//! by their Content-Type with one shared predicate, and lets everything else (JSON, gRPC with
//! trailers) through untouched.
//!
//! | layer | what it does |
//! |---|---|
//! | [`SseHeadersLayer`] | `Content-Type`, `Cache-Control`, `Connection` (HTTP/1 only), `X-Accel-Buffering: no`; optional `406` on a wrong `Accept` |
//! | [`PassthroughLayer`] | forwards every frame at once, drops `Content-Length`, optionally sends a first byte immediately |
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
//! Outermost first; each layer sees what the layers inside it produced:
//!
//! 1. [`SseHeadersLayer`]: it decides the final headers, so nothing inside can undo them, and
//!    its `406` answers before any other work is done.
//! 2. [`PassthroughLayer`]: it removes `Content-Length` and sends the first byte; outside every
//!    layer that adds bytes, so nothing it sends can be held back.
//!
//! Later layers (heartbeats, timeouts, replay) go inside these two.
//!
//! # Feature flags
//!
//! The crate has no optional dependencies yet; `full` is reserved for the modules that will
//! pull some (Redis, compression).
//!
//! [`tower`]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

pub mod body;
pub mod headers;
pub mod heartbeat;
mod jitter;
pub mod lifetime;
pub mod passthrough;
pub mod retry;
pub mod timeout;
pub mod wire;

pub use headers::SseHeadersLayer;
pub use heartbeat::HeartbeatLayer;
pub use lifetime::{LifetimeLayer, Shutdown};
pub use passthrough::PassthroughLayer;
pub use retry::RetryLayer;

#[cfg(test)]
mod test_util;

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
