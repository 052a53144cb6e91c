//! The response future shared by the layers that decide from the response head alone.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

pub(crate) mod sealed {
    /// What a layer does with the response head: pick the body (untouched, or its stream
    /// variant) once, when the inner service answers.
    pub trait OnResponse<B> {
        /// The body the layer answers with.
        type Body;

        /// Wraps the inner service's response.
        fn on_response(self, response: http::Response<B>) -> http::Response<Self::Body>;
    }
}

pin_project! {
    /// The response future of the layers that look at the response head once: passthrough,
    /// retry, heartbeat, lifetime, comment metadata and the idle timeout. `L` is the layer,
    /// which carries the configuration.
    pub struct ResponseFuture<F, L> {
        #[pin]
        future: F,
        layer: Option<L>,
    }
}

impl<F, L> ResponseFuture<F, L> {
    pub(crate) fn new(future: F, layer: L) -> Self {
        Self {
            future,
            layer: Some(layer),
        }
    }
}

impl<F, L> fmt::Debug for ResponseFuture<F, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, L, B, E> Future for ResponseFuture<F, L>
where
    F: Future<Output = Result<Response<B>, E>>,
    L: sealed::OnResponse<B>,
{
    type Output = Result<Response<L::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let layer = this
            .layer
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(Ok(layer.on_response(response)))
    }
}
