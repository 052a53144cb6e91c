//! The response future machinery shared by the layers that decide from the response head alone.
//!
//! Crate-private: each layer declares its own public response future around [`HeadFuture`] with
//! [`head_response_future!`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

#[cfg(feature = "compression")]
pub(crate) use sealed::WholeEvents;
pub(crate) use sealed::{Exchange, OnResponse};

mod sealed {
    use http::{HeaderMap, Method, Request};

    use crate::wire::{is_event_stream, is_plain_event_stream};

    /// What a layer needs to know of the request to decide, with the response head, whether the
    /// response gets event-stream body work: the one decision every layer takes the same way.
    ///
    /// A response to `HEAD` carries no body on any protocol (HTTP/2 resets a stream that sends one),
    /// so it never gets body work, whatever its headers say: no initial comment, retry block,
    /// heartbeat, metadata, compressor header or end frame. Its headers are those of a `GET`.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Exchange {
        head: bool,
        whole_events: bool,
    }

    /// Marks a request whose response the stack's compression will compress, flushing per frame:
    /// the engine below then sends whole events per frame, and its one scan serves both.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct WholeEvents;

    impl Exchange {
        /// The exchange of `request`.
        pub(crate) fn of<B>(request: &Request<B>) -> Self {
            Self {
                head: request.method() == Method::HEAD,
                whole_events: request.extensions().get::<WholeEvents>().is_some(),
            }
        }

        /// True when frames of the response must end at event boundaries ([`WholeEvents`]).
        pub(crate) fn wants_whole_events(self) -> bool {
            self.whole_events
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
    pub(crate) trait OnResponse<B> {
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
    pub(crate) struct HeadFuture<F, L> {
        #[pin]
        future: F,
        layer: Option<L>,
        exchange: Exchange,
    }
}

impl<F, L> HeadFuture<F, L> {
    pub(crate) fn new(exchange: Exchange, future: F, layer: L) -> Self {
        Self {
            future,
            layer: Some(layer),
            exchange,
        }
    }
}

impl<F, L> fmt::Debug for HeadFuture<F, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadFuture").finish_non_exhaustive()
    }
}

impl<F, L, B, E> Future for HeadFuture<F, L>
where
    F: Future<Output = Result<Response<B>, E>>,
    L: OnResponse<B>,
{
    type Output = Result<Response<L::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let layer = this
            .layer
            .take()
            .expect("response future polled after completion");
        Poll::Ready(Ok(layer.on_response(*this.exchange, response)))
    }
}

/// Declares a layer's own public response future: a newtype around [`HeadFuture`] with the
/// layer `$layer`, resolving to the inner response with the body `$body<B>`. The `where` bounds
/// on `B` are those of the layer's `OnResponse` impl.
macro_rules! head_response_future {
    (
        $(#[$meta:meta])*
        pub struct $name:ident for $layer:ty => $body:ident $(where B: $($bound:tt)+)?
    ) => {
        pin_project_lite::pin_project! {
            $(#[$meta])*
            pub struct $name<F> {
                #[pin]
                inner: $crate::future::HeadFuture<F, $layer>,
            }
        }

        impl<F> $name<F> {
            pub(crate) fn new(exchange: $crate::future::Exchange, future: F, layer: $layer) -> Self {
                Self {
                    inner: $crate::future::HeadFuture::new(exchange, future, layer),
                }
            }
        }

        impl<F> ::std::fmt::Debug for $name<F> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }

        impl<F, B, E> ::std::future::Future for $name<F>
        where
            F: ::std::future::Future<Output = Result<http::Response<B>, E>>,
            $(B: $($bound)+)?
        {
            type Output = Result<http::Response<$body<B>>, E>;

            fn poll(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<Self::Output> {
                self.project().inner.poll(cx)
            }
        }
    };
}
pub(crate) use head_response_future;
