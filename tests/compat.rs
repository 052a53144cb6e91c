//! The layers in real stacks: an axum `Router`, a hyper server over real loopback sockets
//! (HTTP/1.1 and HTTP/2 with prior knowledge), and a tonic gRPC service whose responses and
//! trailers must come through untouched.
//!
//! Nothing here waits on the wall clock for an assertion: ordering is proven with channels, and
//! `GUARD` only turns a hang into a failure.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as AxumEvent, Sse};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::header::{
    ACCEPT, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING, VARY,
};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse::headers::SseHeaders;
use tower_sse::passthrough::Passthrough;
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::wire::{Event, EventReader};
use tower_sse::{
    HeartbeatLayer, LifetimeLayer, PassthroughLayer, ReconnectDelayLayer, Shutdown, SseHeadersLayer,
};

/// Turns a hang into a failure; never part of an assertion.
const GUARD: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The two layers every test puts in front of its service.
macro_rules! sse_stack {
    () => {
        ServiceBuilder::new()
            .layer(SseHeadersLayer::new())
            .layer(PassthroughLayer::new().initial_comment("ok"))
    };
}

/// Every layer of the crate, in the recommended order.
macro_rules! full_stack {
    ($shutdown:expr) => {
        ServiceBuilder::new()
            .layer(SseHeadersLayer::new())
            .layer(PassthroughLayer::new().initial_comment("ok"))
            .layer(ReconnectDelayLayer::new(Duration::from_secs(2)))
            .layer(HeartbeatLayer::new(Duration::from_secs(15)))
            .layer(LifetimeLayer::new().shutdown($shutdown))
            .layer(IdleTimeoutLayer::new(Duration::from_secs(60)))
            .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
    };
}

async fn guarded<F: Future>(what: &str, future: F) -> F::Output {
    match timeout(GUARD, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: no progress within {GUARD:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A hyper server and client over loopback.
// ---------------------------------------------------------------------------------------------

/// A hyper server (HTTP/1.1 and HTTP/2, detected per connection) on 127.0.0.1, port 0.
///
/// [`stop`](TestServer::stop) closes the listener and every connection; dropping it does the same
/// without waiting.
struct TestServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start<S, B>(service: S) -> Self
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    // A stop, or the TestServer dropped.
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let (stream, _) = accepted.unwrap();
                        let service = TowerToHyperService::new(service.clone());
                        connections.spawn(async move {
                            let builder =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            }
            drop(listener);
            // Streams never end by themselves: close their connections.
            connections.shutdown().await;
        });
        Self { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        guarded("server shutdown", self.task).await.unwrap();
    }
}

enum Sender {
    Http1(http1::SendRequest<Empty<Bytes>>),
    Http2(http2::SendRequest<Empty<Bytes>>),
}

/// One client connection, HTTP/1.1 or HTTP/2 with prior knowledge.
struct Conn {
    addr: SocketAddr,
    sender: Sender,
    driver: JoinHandle<()>,
}

impl Conn {
    async fn open(addr: SocketAddr, version: Version) -> Self {
        let io = TokioIo::new(guarded("connect", TcpStream::connect(addr)).await.unwrap());
        let (sender, driver) = if version == Version::HTTP_2 {
            let (sender, conn) =
                guarded("h2 handshake", http2::handshake(TokioExecutor::new(), io))
                    .await
                    .unwrap();
            (
                Sender::Http2(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        } else {
            let (sender, conn) = guarded("h1 handshake", http1::handshake(io)).await.unwrap();
            (
                Sender::Http1(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        };
        Self {
            addr,
            sender,
            driver,
        }
    }

    /// `GET path`, with `Accept: accept` when given; resolves with the response head.
    async fn get(&mut self, path: &str, accept: Option<&str>) -> Response<Incoming> {
        let mut builder = Request::get(path);
        if let Some(accept) = accept {
            builder = builder.header(ACCEPT, accept);
        }
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                let request = builder
                    .header(HOST, self.addr.to_string())
                    .body(Empty::new())
                    .unwrap();
                guarded("h1 ready", sender.ready()).await.unwrap();
                guarded("h1 response head", sender.send_request(request)).await
            }
            Sender::Http2(sender) => {
                let request = builder
                    .uri(format!("http://{}{path}", self.addr))
                    .version(Version::HTTP_2)
                    .body(Empty::new())
                    .unwrap();
                guarded("h2 ready", sender.ready()).await.unwrap();
                guarded("h2 response head", sender.send_request(request)).await
            }
        };
        response.unwrap()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn next_event<B>(reader: &mut EventReader<B>) -> Event
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    guarded("next event", reader.next_event())
        .await
        .expect("the stream ended early")
        .expect("a well-formed event")
}

fn assert_stream_headers(response: &Response<Incoming>, version: Version) {
    let headers = response.headers();
    assert_eq!(response.status(), StatusCode::OK, "{version:?}");
    assert_eq!(response.version(), version);
    assert_eq!(
        headers[CONTENT_TYPE], "text/event-stream; charset=utf-8",
        "{version:?}"
    );
    assert_eq!(headers[CACHE_CONTROL], "no-cache", "{version:?}");
    assert_eq!(headers["x-accel-buffering"], "no", "{version:?}");
    assert!(headers.get(CONTENT_LENGTH).is_none(), "{version:?}");
    if version == Version::HTTP_2 {
        // hyper strips connection headers on HTTP/2 as well; the layer's own removal is checked
        // through `oneshot` in `axum_router_accepts_the_layers`.
        assert!(headers.get(CONNECTION).is_none());
    } else {
        assert_eq!(headers[CONNECTION], "keep-alive");
        assert_eq!(headers[TRANSFER_ENCODING], "chunked");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. axum
// ---------------------------------------------------------------------------------------------

async fn axum_events() -> Sse<impl tokio_stream::Stream<Item = Result<AxumEvent, Infallible>>> {
    Sse::new(tokio_stream::iter([
        Ok(AxumEvent::default().id("1").data("one")),
        Ok(AxumEvent::default().id("2").data("two")),
    ]))
}

fn routes() -> Router {
    Router::new()
        .route("/events", get(axum_events))
        // A stream of known size whose handler states its `Content-Length` (as one that forwards
        // an upstream's headers does): the initial comment would make that length wrong.
        .route(
            "/snapshot",
            get(|| async {
                (
                    [(CONTENT_TYPE, "text/event-stream"), (CONTENT_LENGTH, "16")],
                    "data: snapshot\n\n",
                )
            }),
        )
        .route(
            "/status",
            get(|| async { axum::Json(serde_json::json!({ "ok": true, "streams": [1, 2] })) }),
        )
}

/// What `Router::layer` demands of a layer and the service it makes.
fn assert_axum_bounds<T: Clone + Send + Sync + 'static>() {}

fn assert_send<T: Send>(value: T) -> T {
    value
}

async fn axum_get(app: &Router, path: &str, version: Version) -> Response<axum::body::Body> {
    let request = Request::get(path)
        .version(version)
        .body(axum::body::Body::empty())
        .unwrap();
    guarded(path, assert_send(app.clone().oneshot(request)))
        .await
        .unwrap()
}

#[tokio::test]
async fn axum_router_accepts_the_layers() {
    // Compile-time: the layers, the stack and the services they make around axum's `Route`.
    assert_axum_bounds::<SseHeadersLayer>();
    assert_axum_bounds::<PassthroughLayer>();
    let stack = sse_stack!();
    fn bounds_of<T: Clone + Send + Sync + 'static>(_: &T) {}
    bounds_of(&stack);
    assert_axum_bounds::<SseHeaders<Passthrough<axum::routing::Route>>>();

    let plain = routes();
    let app = routes().layer(stack);

    // The SSE route, over HTTP/1.1.
    let response = axum_get(&app, "/events", Version::HTTP_11).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers[CONTENT_TYPE], "text/event-stream; charset=utf-8");
    assert_eq!(headers[CACHE_CONTROL], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers[CONNECTION], "keep-alive");
    assert!(headers.get(CONTENT_LENGTH).is_none());
    let mut reader = EventReader::new(response.into_body());
    let first = next_event(&mut reader).await;
    assert_eq!(first.comments(), ["ok"]);
    assert!(!first.is_message());
    let data: Vec<_> = guarded("rest of /events", reader.messages())
        .await
        .unwrap()
        .iter()
        .map(|event| event.data().unwrap().into_owned())
        .collect();
    assert_eq!(data, ["one", "two"]);
    assert_eq!(reader.parser().last_event_id(), b"2");
    assert!(!reader.ended_mid_event());

    // Over HTTP/2 the layer sends no `Connection` header.
    let response = axum_get(&app, "/events", Version::HTTP_2).await;
    assert!(response.headers().get(CONNECTION).is_none());
    assert_eq!(response.headers()["x-accel-buffering"], "no");

    // A stream with a known length: the handler's `Content-Length` must be gone, and must not
    // come back either: axum's outermost `Route` sets one from an exact size hint.
    let unlayered = axum_get(&plain, "/snapshot", Version::HTTP_11).await;
    assert_eq!(unlayered.headers()[CONTENT_LENGTH], "16");
    let response = axum_get(&app, "/snapshot", Version::HTTP_11).await;
    assert!(response.headers().get(CONTENT_LENGTH).is_none());
    assert_eq!(response.body().size_hint().exact(), None);
    let body = guarded("/snapshot body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, ":ok\n\ndata: snapshot\n\n");

    // The JSON route is byte-for-byte what it is without the layers.
    let expected = axum_get(&plain, "/status", Version::HTTP_11).await;
    let actual = axum_get(&app, "/status", Version::HTTP_11).await;
    assert_eq!(actual.status(), expected.status());
    assert_eq!(actual.headers(), expected.headers());
    assert_eq!(actual.headers()[CONTENT_TYPE], "application/json");
    assert_eq!(actual.headers()[CONTENT_LENGTH], "27");
    assert_eq!(
        actual.body().size_hint().exact(),
        expected.body().size_hint().exact()
    );
    let expected = expected.into_body().collect().await.unwrap().to_bytes();
    let actual = actual.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(actual, expected);
    assert_eq!(actual, r#"{"ok":true,"streams":[1,2]}"#);
}

#[tokio::test]
async fn axum_router_accepts_the_full_stack() {
    let shutdown = Shutdown::new();
    let app = routes().layer(full_stack!(&shutdown));
    let response = axum_get(&app, "/events", Version::HTTP_11).await;
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(next_event(&mut reader).await.comments(), ["ok"]);
    assert_eq!(
        next_event(&mut reader).await.retry(),
        Some(Duration::from_secs(2))
    );
    let data: Vec<_> = guarded("rest of /events", reader.messages())
        .await
        .unwrap()
        .iter()
        .map(|event| event.data().unwrap().into_owned())
        .collect();
    assert_eq!(data, ["one", "two"]);

    let expected = axum_get(&routes(), "/status", Version::HTTP_11).await;
    let actual = axum_get(&app, "/status", Version::HTTP_11).await;
    assert_eq!(actual.headers(), expected.headers());
    let actual = actual.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(actual, r#"{"ok":true,"streams":[1,2]}"#);
}

// ---------------------------------------------------------------------------------------------
// 2. and 3. hyper over real sockets
// ---------------------------------------------------------------------------------------------

type ChunkBody = StreamBody<
    tokio_stream::adapters::Map<
        ReceiverStream<Bytes>,
        fn(Bytes) -> Result<Frame<Bytes>, Infallible>,
    >,
>;

/// An upstream whose event-stream body is whatever the test sends into the channel it hands
/// over, one per request. It announces a `Content-Length`, as an upstream that does not know
/// better might: the layers must not let it through.
fn fed_upstream() -> (
    impl Service<
            Request<Incoming>,
            Response = Response<ChunkBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send,
    mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
) {
    let (senders_tx, senders_rx) = mpsc::unbounded_channel();
    let service = tower::service_fn(move |_request: Request<Incoming>| {
        let (sender, receiver) = mpsc::channel::<Bytes>(1);
        senders_tx.send(sender).unwrap();
        let to_frame: fn(Bytes) -> Result<Frame<Bytes>, Infallible> = |b| Ok(Frame::data(b));
        let body = StreamBody::new(ReceiverStream::new(receiver).map(to_frame));
        let response = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .header(CONTENT_LENGTH, "4096")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    (service, senders_rx)
}

#[tokio::test]
async fn first_event_arrives_before_the_upstream_sends_the_second() {
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let (upstream, mut senders) = fed_upstream();
        let server = TestServer::start(sse_stack!().service(upstream)).await;
        let mut conn = Conn::open(server.addr, version).await;
        let response = conn.get("/events", Some("text/event-stream")).await;
        assert_stream_headers(&response, version);
        let upstream = guarded("upstream called", senders.recv()).await.unwrap();
        let mut reader = EventReader::new(response.into_body());
        assert_eq!(next_event(&mut reader).await.comments(), ["ok"]);

        for id in 1..=3 {
            let event = Event::builder()
                .id(id.to_string())
                .event("tick")
                .data(format!("event {id}\nsecond line"))
                .build()
                .unwrap();
            guarded("upstream send", upstream.send(event.encode()))
                .await
                .unwrap();
            // The next event is sent only once the client has read this one, so this one cannot
            // be waiting in any buffer for more bytes.
            assert_eq!(next_event(&mut reader).await, event, "{version:?}");
        }

        // The upstream ends its stream: the client sees the end, nothing more.
        drop(upstream);
        assert!(
            guarded("end of stream", reader.next_event())
                .await
                .is_none(),
            "{version:?}"
        );
        assert!(!reader.ended_mid_event());
        drop(conn);
        server.stop().await;
    }
}

#[tokio::test]
async fn initial_comment_reaches_the_client_before_any_event() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let silent = tower::service_fn(move |_request: Request<Incoming>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let body = StreamBody::new(tokio_stream::pending::<Result<Frame<Bytes>, Infallible>>());
        let response = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let server = TestServer::start(sse_stack!().service(silent.clone())).await;
        let mut conn = Conn::open(server.addr, version).await;
        let response = conn.get("/events", None).await;
        assert_stream_headers(&response, version);
        let mut reader = EventReader::new(response.into_body());
        let first = next_event(&mut reader).await;
        assert_eq!(first.comments(), ["ok"], "{version:?}");
        assert!(!first.is_message());

        // Nothing but the comment came: once the server closes the connection, the client sees
        // the stream break (or end), never an event.
        server.stop().await;
        let after = guarded("end after stop", reader.next_event()).await;
        assert!(
            !matches!(after, Some(Ok(_))),
            "{version:?}: unexpected {after:?}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// 4. tonic
// ---------------------------------------------------------------------------------------------

mod grpc {
    use super::*;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::server::HealthReporter;
    use tonic_health::ServingStatus;

    /// Serves `$health` behind `$layer` with tonic's own server on 127.0.0.1:0; returns the
    /// address, the shutdown trigger and the server task.
    macro_rules! spawn_tonic {
        ($layer:expr, $health:expr) => {{
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .layer($layer)
                    .add_service($health)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    }),
            );
            (addr, stop, server)
        }};
    }

    fn check(service: &str) -> HealthCheckRequest {
        HealthCheckRequest {
            service: service.into(),
        }
    }

    /// Unary calls (success and a trailers-only error) and a server stream, over a real h2
    /// connection.
    async fn exercise(addr: SocketAddr, reporter: &HealthReporter) {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let channel = guarded("grpc connect", endpoint.connect()).await.unwrap();
        let mut client = HealthClient::new(channel);

        let response = guarded("Check", client.check(check("orders")))
            .await
            .unwrap();
        assert_eq!(response.get_ref().status(), PbStatus::Serving);
        assert!(response.metadata().get("x-accel-buffering").is_none());
        assert_eq!(
            response.metadata().get("content-type").unwrap(),
            "application/grpc"
        );

        // An error travels in trailers only (`grpc-status: 5`): it must come through as a status.
        let missing = guarded("Check missing", client.check(check("missing")))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);

        let mut watch = guarded("Watch", client.watch(check("orders")))
            .await
            .unwrap()
            .into_inner();
        let mut next = async || {
            guarded("Watch update", watch.next())
                .await
                .expect("the watch stream ended")
                .expect("a watch update")
                .status()
        };
        assert_eq!(next().await, PbStatus::Serving);
        reporter
            .set_service_status("orders", ServingStatus::NotServing)
            .await;
        assert_eq!(next().await, PbStatus::NotServing);
        reporter
            .set_service_status("orders", ServingStatus::Serving)
            .await;
        assert_eq!(next().await, PbStatus::Serving);
    }

    /// `POST /grpc.health.v1.Health/Check` for the server's overall status, as tonic's client
    /// sends it: one empty length-prefixed message.
    fn raw_check() -> Request<tonic::body::Body> {
        Request::post("/grpc.health.v1.Health/Check")
            .version(Version::HTTP_2)
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(Full::new(Bytes::from_static(
                &[0; 5],
            ))))
            .unwrap()
    }

    #[tokio::test]
    async fn tonic_grpc_passes_through_untouched() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("orders", ServingStatus::Serving)
            .await;

        // Through `oneshot`: the layered response is the bare service's response, headers,
        // frames and trailers alike.
        let bare = guarded("bare Check", health.clone().oneshot(raw_check()))
            .await
            .unwrap();
        let layered = guarded(
            "layered Check",
            sse_stack!().service(health.clone()).oneshot(raw_check()),
        )
        .await
        .unwrap();
        assert_eq!(layered.status(), StatusCode::OK);
        assert_eq!(layered.headers()[CONTENT_TYPE], "application/grpc");
        assert!(layered.headers().get("x-accel-buffering").is_none());
        assert!(layered.headers().get(CACHE_CONTROL).is_none());
        assert_eq!(layered.headers(), bare.headers());
        let bare = bare.into_body().collect().await.unwrap();
        let layered = layered.into_body().collect().await.unwrap();
        let trailers = layered.trailers().expect("gRPC trailers").clone();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(Some(&trailers), bare.trailers());
        let (bare, layered) = (bare.to_bytes(), layered.to_bytes());
        // A length-prefixed message: SERVING (1) for the overall server status.
        assert_eq!(layered, &[0, 0, 0, 0, 2, 8, 1][..]);
        assert_eq!(layered, bare);

        // Over a socket, with tonic's server and client.
        let (addr, stop, server) = spawn_tonic!(sse_stack!(), health);
        exercise(addr, &reporter).await;
        let _ = stop.send(());
        guarded("tonic shutdown", server).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn tonic_grpc_passes_through_the_full_stack() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("orders", ServingStatus::Serving)
            .await;
        let shutdown = Shutdown::new();
        let (addr, stop, server) = spawn_tonic!(full_stack!(&shutdown), health);
        exercise(addr, &reporter).await;
        let _ = stop.send(());
        guarded("tonic shutdown", server).await.unwrap().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 5. strict Accept
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn strict_accept_over_a_socket() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = tower::service_fn(move |_request: Request<Incoming>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let response = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .body(Full::new(Bytes::from_static(b"data: hi\n\n")))
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let service = ServiceBuilder::new()
        .layer(SseHeadersLayer::new().strict_accept(true))
        .layer(PassthroughLayer::new().initial_comment("ok"))
        .service(upstream);
    let server = TestServer::start(service).await;

    for version in [Version::HTTP_11, Version::HTTP_2] {
        // Both requests on one connection: the 406 leaves it usable.
        let mut conn = Conn::open(server.addr, version).await;
        let before = calls.load(Ordering::SeqCst);

        let refused = conn.get("/events", Some("application/json")).await;
        assert_eq!(refused.status(), StatusCode::NOT_ACCEPTABLE, "{version:?}");
        assert_eq!(refused.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(refused.headers()[VARY], "accept");
        assert!(refused.headers().get("x-accel-buffering").is_none());
        let length: usize = refused.headers()[CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let text = guarded("406 body", refused.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(text.len(), length);
        assert!(text.starts_with(b"406 Not Acceptable"), "{text:?}");
        assert_eq!(calls.load(Ordering::SeqCst), before, "inner service called");

        let accepted = conn.get("/events", Some("text/event-stream")).await;
        assert_stream_headers(&accepted, version);
        let mut reader = EventReader::new(accepted.into_body());
        assert_eq!(next_event(&mut reader).await.comments(), ["ok"]);
        assert_eq!(next_event(&mut reader).await.data().unwrap(), "hi");
        assert!(guarded("end of stream", reader.next_event())
            .await
            .is_none());
        assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. tower-http's layers around and inside ours
// ---------------------------------------------------------------------------------------------

mod tower_http_layers {
    use super::*;
    use http::header::{ACCEPT_ENCODING, ACCESS_CONTROL_ALLOW_ORIGIN, CONTENT_ENCODING, ORIGIN};
    use http::Method;
    use std::pin::Pin;
    use tokio::time::Instant;
    use tower_http::compression::CompressionLayer;
    use tower_http::cors::{Any, CorsLayer};
    use tower_http::timeout::TimeoutLayer;
    use tower_http::trace::TraceLayer;
    use tower_sse::testing::{Script, ScriptedService};

    const SECOND: Duration = Duration::from_secs(1);
    const HEARTBEAT: Duration = Duration::from_secs(15);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// An event stream that sends one event and goes quiet, and a route that never answers.
    fn routes() -> Router {
        let events = ScriptedService::event_stream(Script::new().chunk("data: 1\n\n").hang());
        Router::new()
            .route_service("/events", events)
            .route("/never", get(std::future::pending::<&'static str>))
    }

    fn cors() -> CorsLayer {
        CorsLayer::new()
            .allow_origin(Any)
            .allow_methods([Method::GET])
    }

    /// tower-http's layers outside ours: they see our bodies, and must make their own answers
    /// (a CORS preflight, a timeout) with our bodies' `Default`.
    fn tower_http_outside() -> Router {
        routes().layer(
            ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .layer(cors())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    REQUEST_TIMEOUT,
                ))
                .layer(CompressionLayer::new())
                .layer(SseHeadersLayer::new())
                .layer(PassthroughLayer::new().initial_comment("ok"))
                .layer(HeartbeatLayer::new(HEARTBEAT)),
        )
    }

    /// tower-http's layers inside ours, between ours and the router.
    fn tower_http_inside() -> Router {
        routes().layer(
            ServiceBuilder::new()
                .layer(SseHeadersLayer::new())
                .layer(PassthroughLayer::new().initial_comment("ok"))
                .layer(HeartbeatLayer::new(HEARTBEAT))
                .layer(TraceLayer::new_for_http())
                .layer(cors())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    REQUEST_TIMEOUT,
                ))
                .layer(CompressionLayer::new()),
        )
    }

    fn request(method: Method, path: &str) -> Request<axum::body::Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(ORIGIN, "https://app.example")
            .header(ACCEPT, "text/event-stream")
            .header(ACCEPT_ENCODING, "gzip")
            .header("access-control-request-method", "GET")
            .body(axum::body::Body::empty())
            .unwrap()
    }

    /// The next data frame, or `None` if none comes within `within` (tokio's clock).
    async fn next_data(mut body: Pin<&mut axum::body::Body>, within: Duration) -> Option<Bytes> {
        match timeout(within, body.frame()).await {
            Ok(Some(frame)) => Some(frame.unwrap().into_data().expect("a data frame")),
            Ok(None) => panic!("the stream ended"),
            Err(_) => None,
        }
    }

    async fn assert_event_stream_with_cors_and_heartbeat(app: Router) {
        let response = app
            .clone()
            .oneshot(request(Method::GET, "/events"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream; charset=utf-8");
        assert_eq!(headers["x-accel-buffering"], "no");
        assert!(
            headers.get(CONTENT_ENCODING).is_none(),
            "tower-http's compression leaves an event stream alone"
        );
        let started = Instant::now();
        let mut body = std::pin::pin!(response.into_body());
        let mut received = Vec::new();
        while received.len() < b":ok\n\ndata: 1\n\n".len() {
            let frame = next_data(body.as_mut(), SECOND).await;
            received.extend_from_slice(&frame.expect("the first bytes at once"));
        }
        assert_eq!(received, b":ok\n\ndata: 1\n\n");
        let heartbeat = next_data(body.as_mut(), 2 * HEARTBEAT).await;
        assert_eq!(heartbeat.as_deref(), Some(&b":\n\n"[..]));
        assert_eq!(started.elapsed(), HEARTBEAT);
    }

    async fn assert_own_answers(app: Router) {
        // A preflight, answered by the CORS layer itself.
        let preflight = app
            .clone()
            .oneshot(request(Method::OPTIONS, "/events"))
            .await
            .unwrap();
        assert_eq!(preflight.status(), StatusCode::OK);
        assert_eq!(preflight.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let body = preflight.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty());
        // A handler that never answers, cut by the timeout layer.
        let started = Instant::now();
        let slow = app.oneshot(request(Method::GET, "/never")).await.unwrap();
        assert_eq!(slow.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn outside_ours_cors_timeout_trace_and_compression_work() {
        assert_event_stream_with_cors_and_heartbeat(tower_http_outside()).await;
        assert_own_answers(tower_http_outside()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn inside_ours_cors_timeout_trace_and_compression_work() {
        assert_event_stream_with_cors_and_heartbeat(tower_http_inside()).await;
        assert_own_answers(tower_http_inside()).await;
    }

    /// A body's `Default` is the inner body's default, untouched; `into_inner` gives it back.
    #[tokio::test]
    async fn bodies_default_to_the_inner_default_and_unwrap() {
        use tower_sse::heartbeat::HeartbeatBody;
        use tower_sse::passthrough::PassthroughBody;
        use tower_sse::timeout::IdleTimeoutBody;

        type Inner = Full<Bytes>;
        async fn empty<B: Body<Data = Bytes, Error: std::fmt::Debug>>(body: B) -> Bytes {
            assert_eq!(body.size_hint().exact(), Some(0));
            body.collect().await.unwrap().to_bytes()
        }
        assert!(empty(HeartbeatBody::<Inner>::default()).await.is_empty());
        assert!(empty(PassthroughBody::<Inner>::default()).await.is_empty());
        assert!(empty(IdleTimeoutBody::<Inner>::default()).await.is_empty());
        assert_eq!(
            HeartbeatBody::<Inner>::default()
                .into_inner()
                .size_hint()
                .exact(),
            Some(0)
        );
        let mut body = PassthroughBody::<Inner>::default();
        assert!(body.get_mut().is_some());
        assert!(body.into_inner().is_some());
    }
}
