//! Telling clients how long to wait before they reconnect.
//!
//! [`ReconnectDelayLayer`] sets the SSE reconnection delay (not to be confused with
//! `tower::retry`, which retries requests): it sends a `retry: <ms>` block as the first bytes of every event stream, which
//! sets the client's reconnection time. With [`jitter`](ReconnectDelayLayer::jitter) each stream gets a
//! slightly different value, so that when a gateway restarts its clients do not all come back in
//! the same instant (a reconnect storm).
//!
//! The block goes first, before the inner body's first byte, and the layer drops a leading BOM
//! of the inner body that would otherwise no longer be leading. Responses that are not event
//! streams pass through untouched.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use http::{header, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::ReconnectDelayLayer;
//!
//! let stream = service_fn(|_req: Request<()>| async {
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(Full::new(bytes::Bytes::from_static(b"data: hi\n\n")))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let service = ReconnectDelayLayer::new(Duration::from_secs(3)).layer(stream);
//! let response = service.oneshot(Request::new(())).await.unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "retry: 3000\n\ndata: hi\n\n");
//! # }
//! ```

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{shared_body, PrefixedBody};
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::jitter;
use crate::wire::Event;

/// Sets the client's reconnection delay with a `retry:` block first in every event stream; see
/// the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct ReconnectDelayLayer {
    config: Config,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    retry: Duration,
    jitter: Duration,
}

impl Config {
    fn block(&self) -> Bytes {
        block(self.retry, self.jitter)
    }
}

/// A `retry:` block of `retry` extended by up to `jitter`.
pub(crate) fn block(retry: Duration, jitter: Duration) -> Bytes {
    let retry = jitter::extend(retry, jitter);
    Event::builder()
        .retry(retry)
        .build()
        .map(|event| event.encode())
        .unwrap_or_default()
}

impl ReconnectDelayLayer {
    /// The engine stage: the retry time and its jitter.
    pub(crate) fn stage(&self) -> (Duration, Duration) {
        (self.config.retry, self.config.jitter)
    }
}

impl ReconnectDelayLayer {
    /// Tells clients to wait `delay` before reconnecting.
    pub fn new(delay: Duration) -> Self {
        Self {
            config: Config {
                retry: delay,
                jitter: Duration::ZERO,
            },
        }
    }

    /// Adds up to `spread` to each stream's retry time, at random. The sum saturates: any
    /// `retry` and `spread` are accepted, and a time beyond what `retry:` can say is sent as
    /// the largest one it can.
    pub fn jitter(mut self, spread: Duration) -> Self {
        self.config.jitter = spread;
        self
    }
}

impl<S> Layer<S> for ReconnectDelayLayer {
    type Service = ReconnectDelay<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReconnectDelay {
            inner,
            layer: *self,
        }
    }
}

/// The service made by [`ReconnectDelayLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ReconnectDelay<S> {
    inner: S,
    layer: ReconnectDelayLayer,
}

impl<S> ReconnectDelay<S> {
    /// Wraps `inner`, telling clients to wait `delay`.
    pub fn new(inner: S, delay: Duration) -> Self {
        ReconnectDelayLayer::new(delay).layer(inner)
    }

    /// The layer, to configure it for several services.
    pub fn layer(delay: Duration) -> ReconnectDelayLayer {
        ReconnectDelayLayer::new(delay)
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ReconnectDelay<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ReconnectDelayBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture::new(Exchange::of(&request), self.inner.call(request), self.layer)
    }
}

head_response_future! {
    /// The response future of [`ReconnectDelay`].
    pub struct ResponseFuture for ReconnectDelayLayer => ReconnectDelayBody
}

impl<B> OnResponse<B> for ReconnectDelayLayer {
    type Body = ReconnectDelayBody<B>;

    fn on_response(
        self,
        exchange: Exchange,
        response: Response<B>,
    ) -> Response<ReconnectDelayBody<B>> {
        if !exchange.has_plain_stream_body(response.headers()) {
            return response
                .map(|inner| ReconnectDelayBody::from_shared(PrefixedBody::untouched(inner)));
        }
        let block = self.config.block();
        response
            .map(|inner| ReconnectDelayBody::from_shared(PrefixedBody::stream(inner, Some(block))))
    }
}

shared_body! {
    /// The response body of [`ReconnectDelay`]: the inner body, after the retry block on an event stream.
    pub struct ReconnectDelayBody(PrefixedBody), none when "always `Some`: retry keeps every inner body"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{frames, Script};
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    async fn respond(
        layer: ReconnectDelayLayer,
        content_type: &'static str,
        chunks: &'static [&'static [u8]],
    ) -> Vec<Bytes> {
        let inner = service_fn(move |_req: Request<()>| async move {
            let response = Response::builder()
                .header(http::header::CONTENT_TYPE, content_type)
                .body(Script::new().chunks(chunks).into_body())
                .unwrap();
            Ok::<_, Infallible>(response)
        });
        let response = layer.layer(inner).oneshot(Request::new(())).await.unwrap();
        frames(response.into_body()).await
    }

    #[tokio::test]
    async fn retry_block_comes_first_and_a_bom_is_dropped() {
        let got = respond(
            ReconnectDelayLayer::new(Duration::from_millis(2500)),
            "text/event-stream",
            &[b"\xEF\xBB\xBFdata: 1\n\n"],
        )
        .await;
        assert_eq!(got, [&b"retry: 2500\n\n"[..], b"data: 1\n\n"]);
    }

    #[tokio::test]
    async fn jitter_varies_the_retry_time_within_the_spread() {
        let layer = ReconnectDelayLayer::new(Duration::from_secs(1)).jitter(Duration::from_secs(1));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let got = respond(layer, "text/event-stream", &[b"data: 1\n\n"]).await;
            let mut parser = crate::wire::Parser::new();
            parser.push(got[0].clone());
            let retry = parser.next_event().unwrap().unwrap().retry().unwrap();
            assert!((1000..2000).contains(&retry.as_millis()), "{retry:?}");
            seen.insert(retry);
        }
        assert!(seen.len() > 1, "no spread: {seen:?}");
    }

    #[tokio::test]
    async fn non_streams_are_untouched() {
        let got = respond(
            ReconnectDelayLayer::new(Duration::from_secs(1)),
            "application/json",
            &[b"{}"],
        )
        .await;
        assert_eq!(got, [&b"{}"[..]]);
    }
}
