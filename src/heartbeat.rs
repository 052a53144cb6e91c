//! Heartbeats on quiet event streams.
//!
//! [`HeartbeatLayer`] sends a comment (by default `:` and a blank line) when nothing has gone to
//! the client for the interval, so load balancers and proxies with idle limits (60 s is common)
//! keep the connection open. A frame from the inner body pushes the next heartbeat back: a busy
//! stream gets none.
//!
//! A heartbeat only ever goes in at an event boundary, where it cannot change what the client
//! parses. If the inner body goes quiet in the middle of an event, no heartbeat can be sent until
//! that event is complete; the layer waits rather than corrupt it (pair it with an
//! [`IdleTimeoutLayer`](crate::timeout::IdleTimeoutLayer) for upstreams that stall mid-event). A
//! heartbeat sent before the inner body's first byte makes the layer drop a leading BOM from the
//! inner body, which would otherwise spoil the first line.
//!
//! Browsers' `EventSource` hides comments. For page code that must see liveness, send a typed
//! [`Event`] instead with [`event`](HeartbeatLayer::event): without an id, it does not move the
//! client's cursor.
//!
//! Compared with axum's `KeepAlive`: it works on any body (a proxied upstream included), it only
//! inserts at event boundaries, and it costs one timer per stream that is moved, not re-created,
//! as frames flow. Responses that are not event streams pass through untouched.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use http::{header, Request, Response};
//! use http_body_util::BodyExt;
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::HeartbeatLayer;
//!
//! // An upstream that sends one event, then nothing for a long time.
//! let quiet = service_fn(|_req: Request<()>| async {
//!     let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes>::new(1);
//!     tokio::spawn(async move {
//!         tx.send_data("data: hello\n\n".into()).await.unwrap();
//!         tokio::time::sleep(Duration::from_secs(3600)).await;
//!     });
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(body)
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let service = HeartbeatLayer::new(Duration::from_secs(15)).comment("ping").layer(quiet);
//!
//! let body = service.oneshot(Request::new(())).await.unwrap().into_body();
//! // The timer lives inside the body, so the body is pinned (hyper and axum do this themselves).
//! let mut body = std::pin::pin!(body);
//! let frame = body.frame().await.unwrap().unwrap();
//! assert_eq!(frame.into_data().unwrap(), "data: hello\n\n");
//! let started = tokio::time::Instant::now();
//! let frame = body.frame().await.unwrap().unwrap();
//! assert_eq!(frame.into_data().unwrap(), ":ping\n\n");
//! assert_eq!(started.elapsed(), Duration::from_secs(15));
//! # }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::engine::{engine_body, EngineBody, Stages, Start};
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::wire::Event;

/// Sends heartbeats on quiet event streams; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct HeartbeatLayer {
    config: Arc<Config>,
}

/// What the heartbeat stage of the stream engine needs: shared by every stream.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) interval: Duration,
    pub(crate) frame: Bytes,
}

impl HeartbeatLayer {
    /// The interval heartbeats go out at by default: 15 seconds.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

    /// Sends `:` and a blank line after `interval` without any frame to the client.
    ///
    /// Any interval is accepted: `Duration::MAX` means no heartbeat ever, as it means "never"
    /// for `tokio::time::sleep`.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    pub fn new(interval: Duration) -> Self {
        assert!(!interval.is_zero(), "a heartbeat interval must not be zero");
        Self {
            config: Arc::new(Config {
                interval,
                frame: Event::comment("").encode(),
            }),
        }
    }

    /// Sends `:text` and a blank line as the heartbeat; line breaks start further comment lines.
    pub fn comment(mut self, text: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).frame = Event::comment(text).encode();
        self
    }

    /// Sends `event` as the heartbeat, for page code that must see it (`EventSource` hides
    /// comments). Give it no id, or every heartbeat moves the client's cursor.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_sse::{wire::Event, HeartbeatLayer};
    ///
    /// let ping = Event::builder().event("heartbeat").data("").build().unwrap();
    /// let layer = HeartbeatLayer::new(Duration::from_secs(5)).event(&ping);
    /// ```
    pub fn event(mut self, event: &Event) -> Self {
        Arc::make_mut(&mut self.config).frame = event.encode();
        self
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.config.interval
    }
}

impl HeartbeatLayer {
    /// The engine stage.
    pub(crate) fn stage(&self) -> Arc<Config> {
        self.config.clone()
    }
}

impl Default for HeartbeatLayer {
    fn default() -> Self {
        Self::new(Self::DEFAULT_INTERVAL)
    }
}

impl<S> Layer<S> for HeartbeatLayer {
    type Service = Heartbeat<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Heartbeat {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`HeartbeatLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Heartbeat<S> {
    inner: S,
    layer: HeartbeatLayer,
}

impl<S> Heartbeat<S> {
    /// Wraps `inner`, with heartbeats every `interval`.
    pub fn new(inner: S, interval: Duration) -> Self {
        HeartbeatLayer::new(interval).layer(inner)
    }

    /// The layer, to configure it for several services.
    pub fn layer(interval: Duration) -> HeartbeatLayer {
        HeartbeatLayer::new(interval)
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Heartbeat<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<HeartbeatBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture::new(
            Exchange::of(&request),
            self.inner.call(request),
            self.layer.clone(),
        )
    }
}

head_response_future! {
    /// The response future of [`Heartbeat`].
    pub struct ResponseFuture for HeartbeatLayer => HeartbeatBody
}

impl<B> OnResponse<B> for HeartbeatLayer {
    type Body = HeartbeatBody<B>;

    fn on_response(self, exchange: Exchange, response: Response<B>) -> Response<HeartbeatBody<B>> {
        if !exchange.has_plain_stream_body(response.headers()) {
            return response.map(|inner| HeartbeatBody::from_engine(EngineBody::untouched(inner)));
        }
        let stages = Stages {
            heartbeat: Some(self.stage()),
            ..Stages::default()
        };
        let (parts, inner) = response.into_parts();
        let body = EngineBody::stream(inner, &stages, true, &parts.headers, Start::new());
        Response::from_parts(parts, HeartbeatBody::from_engine(body))
    }
}

engine_body! {
    /// The response body of [`Heartbeat`]; see the [module docs](self).
    pub struct HeartbeatBody,
    dropping "the heartbeat timer, and a byte order mark or trailers held back at the start, are dropped."
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{channel_service, next_data_within, Script};
    use http_body_util::BodyExt;
    use std::pin::pin;

    use tokio::time::Instant;
    use tower::ServiceExt;

    const SECOND: Duration = Duration::from_secs(1);

    async fn start(
        layer: HeartbeatLayer,
        content_type: &'static str,
    ) -> (
        http_body_util::channel::Sender<Bytes>,
        HeartbeatBody<http_body_util::channel::Channel<Bytes>>,
    ) {
        let (mut senders, service) = channel_service(content_type);
        let response = layer
            .layer(service)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        (senders.recv().await.unwrap(), response.into_body())
    }

    #[tokio::test(start_paused = true)]
    async fn cadence_on_a_quiet_stream() {
        let (_tx, body) = start(HeartbeatLayer::new(15 * SECOND), "text/event-stream").await;
        let mut body = pin!(body);
        let started = Instant::now();
        for n in 1..=3 {
            let frame = next_data_within(body.as_mut(), 60 * SECOND).await.unwrap();
            assert_eq!(frame, ":\n\n");
            assert_eq!(started.elapsed(), n * 15 * SECOND);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_pushes_heartbeats_back() {
        let (mut tx, body) = start(HeartbeatLayer::new(15 * SECOND), "text/event-stream").await;
        let mut body = pin!(body);
        for _ in 0..5 {
            tokio::time::sleep(10 * SECOND).await;
            tx.send_data(Bytes::from_static(b"data: x\n\n"))
                .await
                .unwrap();
            let frame = next_data_within(body.as_mut(), SECOND).await.unwrap();
            assert_eq!(frame, "data: x\n\n", "no heartbeat on a busy stream");
        }
        // Quiet again: the heartbeat comes 15 s after the last event, not on a fixed grid.
        let last = Instant::now();
        assert_eq!(
            next_data_within(body.as_mut(), 60 * SECOND).await.unwrap(),
            ":\n\n"
        );
        assert_eq!(last.elapsed(), 15 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn no_heartbeat_in_the_middle_of_an_event() {
        let (mut tx, body) = start(HeartbeatLayer::new(15 * SECOND), "text/event-stream").await;
        let mut body = pin!(body);
        tx.send_data(Bytes::from_static(b"data: first half"))
            .await
            .unwrap();
        assert_eq!(
            next_data_within(body.as_mut(), SECOND).await.unwrap(),
            "data: first half"
        );
        // The upstream stalls mid-event for a minute: nothing may be inserted.
        assert_eq!(next_data_within(body.as_mut(), 60 * SECOND).await, None);
        tx.send_data(Bytes::from_static(b", second half\n\n"))
            .await
            .unwrap();
        assert_eq!(
            next_data_within(body.as_mut(), SECOND).await.unwrap(),
            ", second half\n\n"
        );
        let ended = Instant::now();
        assert_eq!(
            next_data_within(body.as_mut(), 60 * SECOND).await.unwrap(),
            ":\n\n"
        );
        assert_eq!(ended.elapsed(), 15 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_comment_line_without_its_blank_line_is_mid_event() {
        let (mut tx, body) = start(HeartbeatLayer::new(SECOND), "text/event-stream").await;
        let mut body = pin!(body);
        tx.send_data(Bytes::from_static(b":note\r")).await.unwrap();
        next_data_within(body.as_mut(), SECOND).await.unwrap();
        assert_eq!(next_data_within(body.as_mut(), 10 * SECOND).await, None);
        // The lone CR already ended the line; this LF only completes it. Still mid-event.
        tx.send_data(Bytes::from_static(b"\n")).await.unwrap();
        next_data_within(body.as_mut(), SECOND).await.unwrap();
        assert_eq!(next_data_within(body.as_mut(), 10 * SECOND).await, None);
        tx.send_data(Bytes::from_static(b"\r\n")).await.unwrap();
        next_data_within(body.as_mut(), SECOND).await.unwrap();
        assert_eq!(
            next_data_within(body.as_mut(), 2 * SECOND).await.unwrap(),
            ":\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_before_the_first_byte_drops_the_upstream_bom() {
        let layer = HeartbeatLayer::new(SECOND).comment("hb");
        let (mut tx, body) = start(layer, "text/event-stream").await;
        let mut body = pin!(body);
        assert_eq!(
            next_data_within(body.as_mut(), 2 * SECOND).await.unwrap(),
            ":hb\n\n"
        );
        tx.send_data(Bytes::from_static(b"\xEF\xBB")).await.unwrap();
        tx.send_data(Bytes::from_static(b"\xBFdata: 1\n\n"))
            .await
            .unwrap();
        assert_eq!(
            next_data_within(body.as_mut(), SECOND / 2).await.unwrap(),
            "data: 1\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn named_event_heartbeat() {
        let ping = Event::builder()
            .event("heartbeat")
            .data("")
            .build()
            .unwrap();
        let layer = HeartbeatLayer::new(5 * SECOND).event(&ping);
        let (_tx, body) = start(layer, "text/event-stream").await;
        let mut body = pin!(body);
        let frame = next_data_within(body.as_mut(), 10 * SECOND).await.unwrap();
        assert_eq!(frame, "event: heartbeat\ndata: \n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn non_streams_get_no_heartbeat() {
        let (mut tx, body) = start(HeartbeatLayer::new(SECOND), "application/json").await;
        let mut body = pin!(body);
        assert_eq!(next_data_within(body.as_mut(), 60 * SECOND).await, None);
        tx.send_data(Bytes::from_static(b"{}")).await.unwrap();
        assert_eq!(next_data_within(body.as_mut(), SECOND).await.unwrap(), "{}");
    }

    #[tokio::test(start_paused = true)]
    async fn body_end_and_trailers_pass_through() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-end", "1".parse().unwrap());
        let body = Script::new()
            .chunks([b"data: 1\n\n"])
            .trailers(trailers.clone())
            .into_body();
        let mut body = Some(body);
        let service = tower::service_fn(move |_req: Request<()>| {
            let body = body.take().expect("called once");
            async move {
                let response = Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/event-stream")
                    .body(body)
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let response = HeartbeatLayer::new(SECOND)
            .layer(service)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.body().size_hint().exact(), None);
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "data: 1\n\n");
    }

    #[test]
    #[should_panic(expected = "must not be zero")]
    fn zero_interval_is_refused() {
        let _ = HeartbeatLayer::new(Duration::ZERO);
    }
}

#[cfg(test)]
mod footprint {
    /// Idle streams are the common case: keep what each one holds small (see benches/liveness.rs).
    #[test]
    fn an_idle_stream_body_stays_small() {
        let size = std::mem::size_of::<super::HeartbeatBody<http_body_util::Full<bytes::Bytes>>>();
        assert!(size <= 256, "HeartbeatBody grew to {size} bytes");
    }
}
