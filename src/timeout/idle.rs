//! A timeout on silence between frames of an event stream.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use crate::engine::{EngineBody, NoStore, Stages, Start};
use crate::future::{head_response_future, Exchange, OnResponse};

/// Ends an event stream when its inner body sends nothing for the timeout; see the
/// [module docs](super).
///
/// By default the stream ends cleanly, so the client reconnects at once with its
/// `Last-Event-ID`; [`error_on_timeout`](IdleTimeoutLayer::error_on_timeout) ends it with an
/// [`IdleTimeoutError`] instead (hyper then resets the connection). Responses that are not event
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

    /// End with an [`IdleTimeoutError`] rather than a clean end of stream.
    pub fn error_on_timeout(mut self, error: bool) -> Self {
        self.config.error = error;
        self
    }
}

impl<S> Layer<S> for IdleTimeoutLayer {
    type Service = IdleTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleTimeout {
            inner,
            layer: *self,
        }
    }
}

/// The service made by [`IdleTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct IdleTimeout<S> {
    inner: S,
    layer: IdleTimeoutLayer,
}

impl<S> IdleTimeout<S> {
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdleTimeout<S>
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
    /// The response future of [`IdleTimeout`].
    pub struct ResponseFuture for IdleTimeoutLayer => IdleTimeoutBody
}

impl<B> OnResponse<B> for IdleTimeoutLayer {
    type Body = IdleTimeoutBody<B>;

    fn on_response(
        self,
        exchange: Exchange,
        response: Response<B>,
    ) -> Response<IdleTimeoutBody<B>> {
        let error = self.config.error;
        if !exchange.has_stream_body(response.headers()) {
            return response.map(|inner| IdleTimeoutBody {
                body: EngineBody::untouched(inner),
                error,
            });
        }
        let stages = Stages {
            idle: Some(self.config.timeout),
            ..Stages::default()
        };
        let (parts, inner) = response.into_parts();
        // Encoded or not, the stream is only timed: its bytes are never read.
        let body = EngineBody::stream(inner, &stages, false, &parts.headers, Start::new());
        Response::from_parts(parts, IdleTimeoutBody { body, error })
    }
}

pin_project! {
    /// The response body of [`IdleTimeout`].
    pub struct IdleTimeoutBody<B> {
        #[pin]
        body: EngineBody<B, NoStore>,
        error: bool,
    }
}

impl<B> IdleTimeoutBody<B> {
    /// The inner service's body.
    pub fn get_ref(&self) -> &B {
        self.body.get_ref()
    }

    /// The inner service's body, mutably.
    pub fn get_mut(&mut self) -> &mut B {
        self.body.get_mut()
    }

    /// Unwraps the inner service's body: the idle timer is dropped.
    pub fn into_inner(self) -> B {
        self.body.into_inner()
    }
}

impl<B: Default> Default for IdleTimeoutBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self {
            body: EngineBody::default(),
            error: false,
        }
    }
}

impl<B> fmt::Debug for IdleTimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdleTimeoutBody")
            .field(&self.body.kind_name())
            .finish()
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
        let mut this = self.project();
        match ready!(this.body.as_mut().poll_frame(cx)) {
            None if *this.error && this.body.as_mut().take_idle_timeout() => {
                Poll::Ready(Some(Err(IdleTimeoutError(()).into())))
            }
            other => Poll::Ready(other.map(|frame| frame.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The error an [`IdleTimeoutLayer`] body ends with when configured to
/// ([`error_on_timeout`](IdleTimeoutLayer::error_on_timeout)); downcast a body error to it.
#[derive(Debug)]
pub struct IdleTimeoutError(());

impl fmt::Display for IdleTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the event stream was idle for longer than its idle timeout")
    }
}

impl std::error::Error for IdleTimeoutError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{channel_service, next_data_within};
    use std::pin::pin;
    use tokio::time::Instant;
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
        assert!(
            error.downcast_ref::<IdleTimeoutError>().is_some(),
            "{error}"
        );
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
