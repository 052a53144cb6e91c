//! A layer applied or not, decided at run time, without boxing.
//!
//! `tower::util::option_layer` needs the layer to keep the response type, which the tower-sse
//! layers change (they wrap the body). Here the two branches' bodies meet in
//! `http_body_util::Either` instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// `Some(layer)` applies the layer; `None` passes requests straight to the inner service.
#[derive(Clone, Debug)]
pub(crate) struct Optional<L>(pub(crate) Option<L>);

impl<L: Layer<S>, S> Layer<S> for Optional<L> {
    type Service = OptionalService<L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.0 {
            Some(layer) => OptionalService::On(layer.layer(inner)),
            None => OptionalService::Off(inner),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum OptionalService<A, B> {
    On(A),
    Off(B),
}

impl<A, B, Req, BodyA, BodyB> Service<Request<Req>> for OptionalService<A, B>
where
    A: Service<Request<Req>, Response = Response<BodyA>>,
    B: Service<Request<Req>, Response = Response<BodyB>, Error = A::Error>,
{
    type Response = Response<Either<BodyA, BodyB>>;
    type Error = A::Error;
    type Future = OptionalFuture<A::Future, B::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::On(service) => service.poll_ready(cx),
            Self::Off(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        match self {
            Self::On(service) => OptionalFuture::On {
                future: service.call(request),
            },
            Self::Off(service) => OptionalFuture::Off {
                future: service.call(request),
            },
        }
    }
}

pin_project! {
    #[project = OptionalFutureProj]
    pub(crate) enum OptionalFuture<A, B> {
        On { #[pin] future: A },
        Off { #[pin] future: B },
    }
}

impl<A, B, BodyA, BodyB, E> Future for OptionalFuture<A, B>
where
    A: Future<Output = Result<Response<BodyA>, E>>,
    B: Future<Output = Result<Response<BodyB>, E>>,
{
    type Output = Result<Response<Either<BodyA, BodyB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match self.project() {
            OptionalFutureProj::On { future } => {
                ready!(future.poll(cx)).map(|r| r.map(Either::Left))
            }
            OptionalFutureProj::Off { future } => {
                ready!(future.poll(cx)).map(|r| r.map(Either::Right))
            }
        })
    }
}
