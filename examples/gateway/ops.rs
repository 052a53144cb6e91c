//! Operations endpoints of the gateway: `/metrics` (Prometheus text) and `/status` (a live
//! summary as an event stream, which the demo page shows), to GET and HEAD (other methods: 405).
//! Everything else goes to the stack.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_stream::wrappers::IntervalStream;
use tokio_stream::StreamExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse::wire::Event;
use tower_sse::{HeartbeatLayer, PassthroughLayer, SseHeadersLayer};

use crate::BoxError;

pub(crate) type OpsBody = UnsyncBoxBody<Bytes, BoxError>;

/// Installs the Prometheus recorder for the whole process (the layers' metrics go to it).
pub(crate) fn install_recorder() -> Result<PrometheusHandle, BoxError> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// Serves `/metrics` and `/status` itself and hands every other request to `stack`.
#[derive(Clone)]
pub(crate) struct Ops<S> {
    stack: S,
    metrics: PrometheusHandle,
}

impl<S> Ops<S> {
    pub(crate) fn new(stack: S, metrics: PrometheusHandle) -> Self {
        Self { stack, metrics }
    }
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for Ops<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // The stack's body as it is: boxing it (to share a type with the operations' bodies) would
    // cost every event stream an allocation and an indirect call per frame.
    type Response = Response<Either<B, OpsBody>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if path != "/metrics" && path != "/status" {
            let future = self.stack.call(request);
            return Box::pin(async move { Ok(future.await?.map(Either::Left)) });
        }
        let answer = self.operations(request);
        Box::pin(async move { Ok(answer.await?.map(Either::Right)) })
    }
}

impl<S> Ops<S> {
    /// The answer of `/metrics` or `/status`.
    fn operations<ReqBody: Send + 'static>(
        &self,
        request: Request<ReqBody>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<OpsBody>, Infallible>> + Send>> {
        let path = request.uri().path();
        let head = request.method() == Method::HEAD;
        if !head && request.method() != Method::GET {
            return Box::pin(ready(not_allowed()));
        }
        if path == "/metrics" {
            let text = self.metrics.render();
            let length = text.len();
            // HEAD: what GET would answer, without the body.
            let body = if head {
                Bytes::new()
            } else {
                Bytes::from(text)
            };
            return Box::pin(ready(Ok(Response::builder()
                .header(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                .header(CONTENT_LENGTH, length)
                .body(Full::new(body).map_err(Into::into).boxed_unsync())
                .expect("static response parts are valid"))));
        }
        if head {
            return Box::pin(ready(Ok(Response::builder()
                .header(CONTENT_TYPE, "text/event-stream; charset=utf-8")
                .header(CACHE_CONTROL, "no-cache")
                .header("x-accel-buffering", "no")
                .body(empty())
                .expect("static response parts are valid"))));
        }
        Box::pin(status(self.metrics.clone(), request))
    }
}

fn empty() -> OpsBody {
    Full::new(Bytes::new()).map_err(Into::into).boxed_unsync()
}

/// 405 for methods other than GET and HEAD on `/metrics` and `/status`.
fn not_allowed() -> Result<Response<OpsBody>, Infallible> {
    Ok(Response::builder()
        .status(StatusCode::METHOD_NOT_ALLOWED)
        .header(ALLOW, "GET, HEAD")
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from_static(b"method not allowed: use GET or HEAD\n"))
                .map_err(Into::into)
                .boxed_unsync(),
        )
        .expect("static response parts are valid"))
}

/// The values of the status view, read from the rendered Prometheus text.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    open: f64,
    frames: f64,
    bytes: f64,
    heartbeats: f64,
}

/// The value of an unlabelled metric in Prometheus text.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum()
}

fn sample(metrics: &PrometheusHandle) -> Sample {
    let text = metrics.render();
    Sample {
        open: value(&text, "sse_streams_open"),
        frames: value(&text, "sse_frames_sent_total"),
        bytes: value(&text, "sse_bytes_sent_total"),
        heartbeats: value(&text, "sse_heartbeats_total"),
    }
}

/// `/status`: every second, an event with open streams and the rates since the last one, going
/// through the same layers as any event stream (so it counts as one).
async fn status<ReqBody: Send + 'static>(
    metrics: PrometheusHandle,
    request: Request<ReqBody>,
) -> Result<Response<OpsBody>, Infallible> {
    let source = tower::service_fn(move |_request: Request<ReqBody>| {
        let metrics = metrics.clone();
        async move {
            let mut previous = sample(&metrics);
            let ticks = IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
            let events = ticks.map(move |_| {
                let now = sample(&metrics);
                let data = format!(
                    r#"{{"open_streams":{},"frames_per_sec":{},"bytes_per_sec":{},"heartbeats_per_sec":{}}}"#,
                    now.open,
                    now.frames - previous.frames,
                    now.bytes - previous.bytes,
                    now.heartbeats - previous.heartbeats,
                );
                previous = now;
                let event = Event::builder()
                    .event("status")
                    .data(data)
                    .build()
                    .expect("JSON is a valid data value");
                Ok::<_, Infallible>(Frame::data(event.encode()))
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .body(StreamBody::new(events))
                    .expect("static response parts are valid"),
            )
        }
    });
    let response = ServiceBuilder::new()
        .layer(SseHeadersLayer::new())
        .layer(PassthroughLayer::new().initial_comment("status"))
        .layer(HeartbeatLayer::new(Duration::from_secs(15)))
        .service(source)
        .oneshot(request)
        .await?;
    Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
}
