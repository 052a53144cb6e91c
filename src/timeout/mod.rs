//! Timeouts that fit long-lived streams.
//!
//! A plain request timeout (`tower::timeout`, tower-http's `TimeoutLayer`) cannot serve event
//! streams: it either covers only the response head, or kills a healthy stream that is simply
//! long. Streams need two separate clocks, as Envoy users keep asking for:
//!
//! | layer | clock | on expiry |
//! |---|---|---|
//! | [`ResponseTimeoutLayer`] | from the request to the inner service's response headers | `504 Gateway Timeout`, the inner call dropped |
//! | [`IdleTimeoutLayer`] | between frames of an event-stream body | the stream ends cleanly (or with [`IdleTimeoutError`]) |
//!
//! Put both innermost, right around the inner service: they must measure the upstream's silence,
//! and a [`HeartbeatLayer`](crate::HeartbeatLayer) outside them keeps the client's connection warm
//! without ever resetting them. Inside a heartbeat layer, an idle timeout would never fire.
//!
//! When the idle timeout ends a stream, the client sees a normal end of stream and reconnects with
//! its `Last-Event-ID`, which is what an upstream that went silent calls for. An event the
//! upstream left half-sent is discarded by the client, as the spec says; it never sees part of
//! one.
//!
//! tower-http's `ResponseBodyTimeoutLayer` also times the gaps between body frames, but for every
//! body, and on expiry it fails the body: the server aborts the connection wherever the stream
//! was, mid-event included. [`IdleTimeoutLayer`] applies to event streams only (anything else
//! passes untouched), ends the stream cleanly at an event boundary, and re-arms its timer lazily
//! (a frame notes the time; the timer is moved only when it fires), so a busy stream costs no
//! timer work per frame.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use http::{header, Request, Response, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
//!
//! // An upstream that sends one event and then stalls.
//! let stalls = service_fn(|_req: Request<()>| async {
//!     let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes>::new(1);
//!     tokio::spawn(async move {
//!         tx.send_data("data: 1\n\n".into()).await.unwrap();
//!         std::future::pending::<()>().await;
//!     });
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(body)
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let service = ServiceBuilder::new()
//!     .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
//!     .layer(IdleTimeoutLayer::new(Duration::from_secs(60)))
//!     .service(stalls);
//!
//! let response = service.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! // The event, then a clean end after 60 s of silence.
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "data: 1\n\n");
//! # }
//! ```

use std::time::Duration;

use tokio::time::Instant;

mod idle;
mod response;

pub use idle::{IdleTimeout, IdleTimeoutBody, IdleTimeoutError, IdleTimeoutLayer};
pub use response::{ResponseTimeout, ResponseTimeoutBody, ResponseTimeoutLayer};

/// The boxed error the [`IdleTimeoutLayer`]'s body reports.
pub use crate::BoxError;

/// About thirty years, tokio's own stand-in for "never": later than any stream lives, early
/// enough for tokio's timer.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `start + after`, saturating to the far future: a `Duration::MAX` timeout means "never", as it
/// does for `tokio::time::sleep`, instead of an overflow panic. Every timer of the crate's layers
/// takes its deadline from here.
pub(crate) fn deadline(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after.min(FAR_FUTURE))
        .unwrap_or_else(|| start + Duration::from_secs(86_400))
}

/// Response futures of the layers in this module.
pub mod future {
    pub use super::idle::ResponseFuture as IdleTimeoutFuture;
    pub use super::response::ResponseFuture as ResponseTimeoutFuture;
}
