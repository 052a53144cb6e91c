//! A timeout on silence between frames of an event stream.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use super::{deadline, BoxError};
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::telemetry::{self, Timeout};

/// Ends an event stream when its inner body sends nothing for the timeout; see the
/// [module docs](super).
///
/// By default the stream ends cleanly, so the client reconnects at once with its
/// `Last-Event-ID`; [`error_on_timeout`](IdleTimeoutLayer::error_on_timeout) ends it with an
/// [`IdleTimeout`] error instead (hyper then resets the connection). Responses that are not event
/// streams pass through untouched, though their errors are boxed.
#[derive(Clone, Copy, Debug)]
pub struct IdleTimeoutLayer {
    config: Config,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    timeout: Duration,
    error: bool,
}

impl IdleTimeoutLayer {
    /// Ends event streams after `timeout` without a frame from the inner body.
    ///
    /// Any timeout is accepted: `Duration::MAX` means never, as for `tokio::time::sleep`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            config: Config {
                timeout,
                error: false,
            },
        }
    }

    /// End with an [`IdleTimeout`] error rather than a clean end of stream.
    pub fn error_on_timeout(mut self, error: bool) -> Self {
        self.config.error = error;
        self
    }
}

impl<S> Layer<S> for IdleTimeoutLayer {
    type Service = IdleTimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleTimeoutService {
            inner,
            layer: *self,
        }
    }
}

/// The service made by [`IdleTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct IdleTimeoutService<S> {
    inner: S,
    layer: IdleTimeoutLayer,
}

impl<S> IdleTimeoutService<S> {
    /// Wraps `inner`, ending its event streams after `timeout` of silence.
    pub fn new(inner: S, timeout: Duration) -> Self {
        IdleTimeoutLayer::new(timeout).layer(inner)
    }

    /// The layer, to configure it for several services.
    pub fn layer(timeout: Duration) -> IdleTimeoutLayer {
        IdleTimeoutLayer::new(timeout)
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdleTimeoutService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<IdleTimeoutBody<ResBody>>;
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
    /// The response future of [`IdleTimeoutService`].
    pub struct ResponseFuture for IdleTimeoutLayer => IdleTimeoutBody
}

impl<B> OnResponse<B> for IdleTimeoutLayer {
    type Body = IdleTimeoutBody<B>;

    fn on_response(
        self,
        exchange: Exchange,
        response: Response<B>,
    ) -> Response<IdleTimeoutBody<B>> {
        let config = self.config;
        if !exchange.has_stream_body(response.headers()) {
            return response.map(|inner| IdleTimeoutBody {
                kind: Kind::Untouched { inner },
            });
        }
        let now = Instant::now();
        response.map(|inner| IdleTimeoutBody {
            kind: Kind::Stream {
                inner,
                timer: tokio::time::sleep_until(deadline(now, config.timeout)),
                last_frame: now,
                config,
                timed_out: false,
            },
        })
    }
}

pin_project! {
    /// The response body of [`IdleTimeoutService`].
    pub struct IdleTimeoutBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Untouched { #[pin] inner: B },
        Stream {
            #[pin]
            inner: B,
            #[pin]
            timer: Sleep,
            last_frame: Instant,
            config: Config,
            timed_out: bool,
        },
    }
}

impl<B> IdleTimeoutBody<B> {
    inner_body_accessors!("the idle timer is dropped.");
}

impl<B: Default> Default for IdleTimeoutBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self {
            kind: Kind::Untouched {
                inner: B::default(),
            },
        }
    }
}

impl<B> fmt::Debug for IdleTimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Untouched { .. } => "Untouched",
            Kind::Stream { .. } => "Stream",
        };
        f.debug_tuple("IdleTimeoutBody").field(&kind).finish()
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (inner, mut timer, last_frame, config, timed_out) = match self.project().kind.project()
        {
            KindProj::Untouched { inner } => {
                return inner.poll_frame(cx).map_err(Into::into);
            }
            KindProj::Stream {
                inner,
                timer,
                last_frame,
                config,
                timed_out,
            } => (inner, timer, last_frame, config, timed_out),
        };
        if *timed_out {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = inner.poll_frame(cx) {
            // Only the time is noted: the timer is moved lazily, when it fires.
            *last_frame = Instant::now();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            let due = deadline(*last_frame, config.timeout);
            if Instant::now() < due {
                timer.as_mut().reset(due);
                continue;
            }
            *timed_out = true;
            telemetry::timed_out(Timeout::Idle);
            return Poll::Ready(config.error.then(|| Err(IdleTimeout(()).into())));
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Untouched { inner } => inner.is_end_stream(),
            Kind::Stream {
                inner, timed_out, ..
            } => *timed_out || inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Untouched { inner } => inner.size_hint(),
            // The stream may end early, so no exact size holds.
            Kind::Stream { inner, .. } => {
                let mut hint = SizeHint::new();
                if let Some(upper) = inner.size_hint().upper() {
                    hint.set_upper(upper);
                }
                hint
            }
        }
    }
}

/// The error an [`IdleTimeoutLayer`] body ends with when configured to
/// ([`error_on_timeout`](IdleTimeoutLayer::error_on_timeout)); downcast a body error to it.
#[derive(Debug)]
pub struct IdleTimeout(());

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the event stream was idle for longer than its idle timeout")
    }
}

impl std::error::Error for IdleTimeout {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{channel_service, next_data_within};
    use std::pin::pin;
    use tower::ServiceExt;

    const SECOND: Duration = Duration::from_secs(1);

    async fn start(
        layer: IdleTimeoutLayer,
        content_type: &'static str,
    ) -> (
        http_body_util::channel::Sender<Bytes>,
        IdleTimeoutBody<http_body_util::channel::Channel<Bytes>>,
    ) {
        let (mut senders, service) = channel_service(content_type);
        let response = layer
            .layer(service)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        (senders.recv().await.unwrap(), response.into_body())
    }

    async fn end(
        body: Pin<&mut IdleTimeoutBody<http_body_util::channel::Channel<Bytes>>>,
    ) -> Option<Result<Frame<Bytes>, BoxError>> {
        let mut body = body;
        std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn silence_ends_the_stream_cleanly() {
        let (mut tx, body) = start(IdleTimeoutLayer::new(30 * SECOND), "text/event-stream").await;
        let mut body = pin!(body);
        for _ in 0..3 {
            tokio::time::sleep(20 * SECOND).await;
            tx.send_data(Bytes::from_static(b"data: x\n\n"))
                .await
                .unwrap();
            assert!(next_data_within(body.as_mut(), SECOND).await.is_some());
        }
        let last = Instant::now();
        assert!(end(body.as_mut()).await.is_none(), "a clean end");
        assert_eq!(last.elapsed(), 30 * SECOND);
        assert!(body.is_end_stream());
        assert!(end(body.as_mut()).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn error_on_timeout_gives_a_downcastable_error() {
        let layer = IdleTimeoutLayer::new(SECOND).error_on_timeout(true);
        let (_tx, body) = start(layer, "text/event-stream").await;
        let mut body = pin!(body);
        let error = end(body.as_mut()).await.unwrap().unwrap_err();
        assert!(error.downcast_ref::<IdleTimeout>().is_some(), "{error}");
        assert!(end(body.as_mut()).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn non_streams_are_not_timed() {
        let (mut tx, body) = start(IdleTimeoutLayer::new(SECOND), "application/json").await;
        let mut body = pin!(body);
        tokio::time::sleep(3600 * SECOND).await;
        tx.send_data(Bytes::from_static(b"{}")).await.unwrap();
        assert_eq!(next_data_within(body.as_mut(), SECOND).await.unwrap(), "{}");
    }
}
