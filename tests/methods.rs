//! Every method and protocol answered correctly: a `HEAD` gets the headers of a `GET` and no body
//! from any layer, over HTTP/1.1 and HTTP/2; an HTTP/1.0 stream is not promised `keep-alive`.

use std::convert::Infallible;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_layer::Layer;
use tower_sse::compression::SseCompressionLayer;
use tower_sse::testing::{Script, ScriptedService};
use tower_sse::timeout::IdleTimeoutLayer;
use tower_sse::{
    CommentMetadataLayer, HeartbeatLayer, LifetimeLayer, PassthroughLayer, ReconnectDelayLayer,
    SseHeadersLayer,
};

const SECOND: Duration = Duration::from_secs(1);

fn request(method: Method) -> Request<()> {
    Request::builder()
        .method(method)
        .uri("/events")
        .header(ACCEPT_ENCODING, "gzip")
        .body(())
        .unwrap()
}

/// Wraps the scripted upstream in one layer.
type Wrap = Box<dyn Fn(ScriptedService) -> Box<dyn Check>>;

/// What each layer does with an event stream, configured to add bytes as soon as it can.
fn each_layer() -> Vec<(&'static str, Wrap)> {
    fn boxed<S>(service: S) -> Box<dyn Check>
    where
        S: Service<Request<()>, Error = Infallible> + Clone + 'static,
        S::Response: IntoParts,
    {
        Box::new(Checked(service))
    }
    vec![
        (
            "passthrough",
            Box::new(|s| boxed(PassthroughLayer::new().initial_comment("ok").layer(s))),
        ),
        (
            "headers",
            Box::new(|s| boxed(SseHeadersLayer::new().layer(s))),
        ),
        (
            "retry",
            Box::new(|s| boxed(ReconnectDelayLayer::new(SECOND).jitter(SECOND).layer(s))),
        ),
        (
            "heartbeat",
            Box::new(|s| boxed(HeartbeatLayer::new(SECOND).layer(s))),
        ),
        (
            "lifetime",
            Box::new(|s| {
                boxed(
                    LifetimeLayer::new()
                        .max_lifetime(SECOND)
                        .retry_on_end(SECOND)
                        .layer(s),
                )
            }),
        ),
        (
            "metadata",
            Box::new(|s| {
                boxed(
                    CommentMetadataLayer::new()
                        .headers_as_comment([CONTENT_TYPE])
                        .layer(s),
                )
            }),
        ),
        (
            "compression",
            Box::new(|s| boxed(SseCompressionLayer::new().layer(s))),
        ),
        (
            "idle timeout",
            Box::new(|s| boxed(IdleTimeoutLayer::new(SECOND).layer(s))),
        ),
    ]
}

/// A response split into its head and the frames its body yields within an hour (paused time:
/// every timer of the layer gets its chance), with whether it still had more.
struct Outcome {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Bytes>,
    ended_at_once: bool,
    ended: bool,
}

type Boxed<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

trait IntoParts {
    fn outcome(self) -> Boxed<Outcome>;
}

impl<B> IntoParts for Response<B>
where
    B: Body<Data = Bytes> + 'static,
    B::Error: std::fmt::Debug,
{
    fn outcome(self) -> Boxed<Outcome> {
        Box::pin(async move {
            let (parts, body) = self.into_parts();
            let mut body = pin!(body);
            let ended_at_once = body.is_end_stream();
            let mut frames = Vec::new();
            let ended = tokio::time::timeout(3600 * SECOND, async {
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        frames.push(data);
                    }
                }
            })
            .await
            .is_ok();
            Outcome {
                status: parts.status,
                headers: parts.headers,
                frames,
                ended_at_once,
                ended,
            }
        })
    }
}

trait Check {
    fn call(
        &self,
        request: Request<()>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome>>>;
}

struct Checked<S>(S);

impl<S> Check for Checked<S>
where
    S: Service<Request<()>, Error = Infallible> + Clone + 'static,
    S::Response: IntoParts,
{
    fn call(
        &self,
        request: Request<()>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome>>> {
        let service = self.0.clone();
        Box::pin(async move {
            let Ok(response) = service.oneshot(request).await;
            response.outcome().await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn no_layer_adds_a_body_to_a_head_response() {
    // Every layer is checked before the test fails, so a failure names all the culprits.
    let mut problems = Vec::new();
    for (name, layer) in each_layer() {
        // An inner service that answers HEAD correctly: headers, and an empty body.
        let service = layer(ScriptedService::event_stream(Script::new()));
        let head = service.call(request(Method::HEAD)).await;
        if !head.frames.is_empty() {
            problems.push(format!("{name}: sent {:?}", head.frames));
        }
        if !head.ended_at_once {
            problems.push(format!(
                "{name}: the body must end before the headers go out"
            ));
        }
        // The headers are those of a GET.
        let get = service.call(request(Method::GET)).await;
        if (head.status, &head.headers) != (get.status, &get.headers) {
            problems.push(format!(
                "{name}: {:?} is not {:?}",
                head.headers, get.headers
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_body_wrongly_given_to_head_is_not_worked_on_and_the_outermost_layers_drop_it() {
    let mut problems = Vec::new();
    for (name, layer) in each_layer() {
        // An inner service that wrongly gives HEAD a live stream.
        let service = layer(ScriptedService::event_stream(
            Script::new().chunk("data: 1\n\n").hang(),
        ));
        let head = service.call(request(Method::HEAD)).await;
        if matches!(name, "passthrough" | "headers") {
            if !head.frames.is_empty() || !head.ended_at_once {
                problems.push(format!("{name}: did not drop the body: {:?}", head.frames));
            }
        } else if head.frames != ["data: 1\n\n"] || head.ended {
            // Forwarded as it is, nothing added, never ended by the layer's timers.
            problems.push(format!(
                "{name}: worked on the body: {} frames, first {:?}, ended: {}",
                head.frames.len(),
                &head.frames[..head.frames.len().min(2)],
                head.ended
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn head_of_a_non_stream_keeps_its_content_length() {
    let json = ScriptedService::new("application/json", Script::new().chunk("{}"));
    for service in [
        Box::new(Checked(PassthroughLayer::new().layer(json.clone()))) as Box<dyn Check>,
        Box::new(Checked(SseHeadersLayer::new().layer(json))),
    ] {
        let head = service.call(request(Method::HEAD)).await;
        assert!(head.frames.is_empty());
        assert_eq!(head.headers[CONTENT_LENGTH], "2");
    }
}

/// The layers of a full stack, over an inner service that (wrongly) answers HEAD with a live
/// stream, as a proxied upstream might.
fn full_stack() -> impl Service<
    Request<hyper::body::Incoming>,
    Response = Response<impl Body<Data = Bytes, Error = impl Into<tower_sse::BoxError>> + Send>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(SseHeadersLayer::new())
        .layer(PassthroughLayer::new().initial_comment("ok"))
        .layer(SseCompressionLayer::new())
        .layer(ReconnectDelayLayer::new(SECOND))
        .layer(CommentMetadataLayer::new().headers_as_comment([CONTENT_TYPE]))
        .layer(HeartbeatLayer::new(Duration::from_millis(50)))
        .layer(
            LifetimeLayer::new()
                .max_lifetime(10 * SECOND)
                .retry_on_end(SECOND),
        )
        .layer(IdleTimeoutLayer::new(10 * SECOND))
        .service(ScriptedService::event_stream(
            Script::new().chunk("data: 1\n\n").hang(),
        ))
}

async fn listen(http2: bool) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(full_stack());
            tokio::spawn(async move {
                let io = TokioIo::new(socket);
                let _ = if http2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    addr
}

fn client_request(method: Method) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://127.0.0.1/events")
        .header("accept", "text/event-stream")
        .body(Empty::new())
        .unwrap()
}

/// HEAD answers 200 with the stream's headers and an empty body, with no protocol error; then
/// a GET on the same connection still streams.
async fn head_then_get<B>(
    mut send: impl FnMut(
        Request<Empty<Bytes>>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = hyper::Result<Response<B>>> + Send>,
    >,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let head = tokio::time::timeout(5 * SECOND, send(client_request(Method::HEAD)))
        .await
        .expect("HEAD within 5 s")
        .expect("HEAD is answered");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()[CONTENT_TYPE],
        "text/event-stream; charset=utf-8"
    );
    assert!(head.headers().get(CONTENT_LENGTH).is_none());
    let body = tokio::time::timeout(5 * SECOND, head.into_body().collect())
        .await
        .expect("HEAD body within 5 s")
        .expect("no protocol error")
        .to_bytes();
    assert!(body.is_empty(), "{body:?}");

    let get = tokio::time::timeout(5 * SECOND, send(client_request(Method::GET)))
        .await
        .expect("GET within 5 s")
        .expect("GET is answered on the same connection");
    assert_eq!(get.status(), StatusCode::OK);
    let mut body = get.into_body();
    let first = tokio::time::timeout(5 * SECOND, body.frame())
        .await
        .expect("GET body within 5 s")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, ":ok\n\n");
}

#[tokio::test]
async fn head_over_http2_answers_headers_without_a_protocol_error() {
    let addr = listen(true).await;
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket))
            .await
            .unwrap();
    tokio::spawn(connection);
    head_then_get(move |request| {
        let mut sender = sender.clone();
        Box::pin(async move { sender.send_request(request).await })
    })
    .await;
}

#[tokio::test]
async fn head_over_http1_answers_headers_and_keeps_the_connection() {
    let addr = listen(false).await;
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
        .await
        .unwrap();
    tokio::spawn(connection);
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    head_then_get(move |request| {
        let sender = sender.clone();
        Box::pin(async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request).await
        })
    })
    .await;
}

#[tokio::test]
async fn an_http10_stream_is_not_promised_keep_alive() {
    let addr = listen(false).await;
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /events HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(5 * SECOND, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the headers");
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("headers within 5 s");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
}
