//! A timeout on the response head.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{shared_body, InnerOrLocal};
use crate::telemetry::{self, Timeout};

const GATEWAY_TIMEOUT_BODY: &str =
    "504 Gateway Timeout: the upstream sent no response headers in time\n";

/// Answers `504 Gateway Timeout` when the inner service takes longer than the timeout to produce
/// its response headers; see the [module docs](super).
///
/// Only the head is timed: once headers arrive, the body may stream for as long as it likes. The
/// inner call is dropped on expiry, which cancels a proxied request. The service error type is
/// unchanged.
#[derive(Clone, Copy, Debug)]
pub struct ResponseTimeoutLayer {
    timeout: Duration,
}

impl ResponseTimeoutLayer {
    /// Expects response headers within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for ResponseTimeoutLayer {
    type Service = ResponseTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service made by [`ResponseTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct ResponseTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> ResponseTimeout<S> {
    /// Wraps `inner`, expecting response headers within `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The layer, to configure it for several services.
    pub fn layer(timeout: Duration) -> ResponseTimeoutLayer {
        ResponseTimeoutLayer::new(timeout)
    }

    inner_service_accessors!();
}

shared_body! {
    /// The response body of [`ResponseTimeout`]: the inner body, or the text of the `504`.
    pub struct ResponseTimeoutBody(InnerOrLocal), none when "`None` for the layer's own `504`"
}

impl<B> ResponseTimeoutBody<B> {
    /// True when the layer answered by itself: the `504 Gateway Timeout`.
    pub fn is_local(&self) -> bool {
        self.body.is_local()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResponseTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseTimeoutBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            future: self.inner.call(request),
            sleep: tokio::time::sleep(self.timeout),
        }
    }
}

pin_project! {
    /// The response future of [`ResponseTimeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: Sleep,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("deadline", &self.sleep.deadline())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseTimeoutBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.future.poll(cx) {
            return Poll::Ready(result.map(|response| {
                response.map(|inner| ResponseTimeoutBody::from_shared(InnerOrLocal::inner(inner)))
            }));
        }
        if this.sleep.poll(cx).is_ready() {
            telemetry::timed_out(Timeout::Response);
            let response =
                InnerOrLocal::plain_text(StatusCode::GATEWAY_TIMEOUT, GATEWAY_TIMEOUT_BODY)
                    .map(ResponseTimeoutBody::from_shared);
            return Poll::Ready(Ok(response));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tower::{service_fn, ServiceExt};

    fn slow(
        delay: Duration,
    ) -> impl Service<
        Request<()>,
        Response = Response<Full<bytes::Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Full<bytes::Bytes>>, Infallible>>,
    > {
        service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new(Full::from("late")))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn slow_headers_get_a_504() {
        let started = tokio::time::Instant::now();
        let response = ResponseTimeoutLayer::new(Duration::from_secs(5))
            .layer(slow(Duration::from_secs(6)))
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(response.body().is_local());
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, GATEWAY_TIMEOUT_BODY);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_in_time_pass_and_the_body_is_not_timed() {
        let response = ResponseTimeoutLayer::new(Duration::from_secs(5))
            .layer(slow(Duration::from_secs(4)))
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "late");
    }

    #[tokio::test(start_paused = true)]
    async fn the_inner_call_is_dropped_on_expiry() {
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let never = service_fn(move |_req: Request<()>| {
            let guard = SetOnDrop(flag.clone());
            async move {
                let _guard = guard;
                std::future::pending::<Result<Response<Full<bytes::Bytes>>, Infallible>>().await
            }
        });
        let response = ResponseTimeoutLayer::new(Duration::from_secs(1))
            .layer(never)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(dropped.load(Ordering::SeqCst));
    }
}
