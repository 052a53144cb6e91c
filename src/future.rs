//! The response future shared by the layers that decide from the response head alone.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

pub(crate) use sealed::Exchange;

pub(crate) mod sealed {
    use http::{HeaderMap, Method, Request};

    use crate::wire::{is_event_stream, is_plain_event_stream};

    /// What a layer needs to know of the request to decide, with the response head, whether the
    /// response gets event-stream body work: the one decision every layer takes the same way.
    ///
    /// A response to `HEAD` carries no body on any protocol (HTTP/2 resets a stream that sends one),
    /// so it never gets body work, whatever its headers say: no initial comment, retry block,
    /// heartbeat, metadata, compressor header or end frame. Its headers are those of a `GET`.
    #[derive(Clone, Copy, Debug)]
    pub struct Exchange {
        head: bool,
    }

    impl Exchange {
        /// The exchange of `request`.
        pub(crate) fn of<B>(request: &Request<B>) -> Self {
            Self {
                head: request.method() == Method::HEAD,
            }
        }

        /// True for a `HEAD` request: the response must carry no body.
        pub(crate) fn is_head(self) -> bool {
            self.head
        }

        /// True when the response is an event stream whose body a layer may time or wrap
        /// ([`is_event_stream`]), and there is a body at all.
        pub(crate) fn has_stream_body(self, headers: &HeaderMap) -> bool {
            !self.head && is_event_stream(headers)
        }

        /// True when the response is an event stream whose bytes a layer may read and insert into
        /// ([`is_plain_event_stream`]), and there is a body at all.
        pub(crate) fn has_plain_stream_body(self, headers: &HeaderMap) -> bool {
            !self.head && is_plain_event_stream(headers)
        }
    }

    /// What a layer does with the response head: pick the body (untouched, or its stream
    /// variant) once, when the inner service answers.
    pub trait OnResponse<B> {
        /// The body the layer answers with.
        type Body;

        /// Wraps the inner service's response.
        fn on_response(
            self,
            exchange: Exchange,
            response: http::Response<B>,
        ) -> http::Response<Self::Body>;
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
        exchange: Exchange,
    }
}

impl<F, L> ResponseFuture<F, L> {
    pub(crate) fn new(exchange: Exchange, future: F, layer: L) -> Self {
        Self {
            future,
            layer: Some(layer),
            exchange,
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
        Poll::Ready(Ok(layer.on_response(*this.exchange, response)))
    }
}
