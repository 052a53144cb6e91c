//! The layers in real stacks: an axum `Router`, a hyper server over real sockets (HTTP/1.1 and
//! HTTP/2), and a tonic gRPC service whose responses and trailers must come through untouched.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as AxumEvent, Sse};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Version};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{ServiceBuilder, ServiceExt};
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::wire::{Event, EventReader};
use tower_sse::{
    HeartbeatLayer, LifetimeLayer, PassthroughLayer, RetryLayer, Shutdown, SseHeadersLayer,
};

const GUARD: Duration = Duration::from_secs(10);

/// Every layer of the crate, in the recommended order.
macro_rules! full_stack {
    ($shutdown:expr) => {
        ServiceBuilder::new()
            .layer(SseHeadersLayer::new())
            .layer(PassthroughLayer::new().initial_comment("ok"))
            .layer(RetryLayer::new(Duration::from_secs(2)))
            .layer(HeartbeatLayer::new(Duration::from_secs(15)))
            .layer(LifetimeLayer::new().shutdown($shutdown))
            .layer(IdleTimeoutLayer::new(Duration::from_secs(60)))
            .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
    };
}

async fn events() -> Sse<impl tokio_stream::Stream<Item = Result<AxumEvent, Infallible>>> {
    Sse::new(tokio_stream::iter([
        Ok(AxumEvent::default().id("1").data("one")),
        Ok(AxumEvent::default().id("2").data("two")),
    ]))
}

async fn status() -> ([(http::HeaderName, &'static str); 1], &'static str) {
    ([(CONTENT_TYPE, "application/json")], r#"{"ok":true}"#)
}

fn app(shutdown: &Shutdown) -> Router {
    Router::new()
        .route("/events", get(events))
        .route("/status", get(status))
        .layer(full_stack!(shutdown))
}

#[test]
fn layers_and_services_meet_axum_bounds() {
    fn layer<L: Clone + Send + Sync + 'static>(_: &L) {}
    fn service<S: Clone + Send + Sync + 'static>(_: &S) {}
    let shutdown = Shutdown::new();
    let stack = full_stack!(&shutdown);
    layer(&stack);
    let inner = tower::service_fn(|_req: Request<axum::body::Body>| async {
        Ok::<_, Infallible>(Response::new(axum::body::Body::empty()))
    });
    service(&stack.service(inner));
    // And the whole stack goes on a Router, which checks the rest of axum's bounds.
    let _ = app(&shutdown);
}

#[tokio::test]
async fn axum_router_streams_get_the_stack_json_stays_untouched() {
    let shutdown = Shutdown::new();
    let request = Request::get("/events")
        .version(Version::HTTP_11)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = app(&shutdown).oneshot(request).await.unwrap();
    let headers = response.headers();
    assert_eq!(headers[CONTENT_TYPE], "text/event-stream; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers[CONNECTION], "keep-alive");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(headers.get(CONTENT_LENGTH).is_none());
    let mut reader = EventReader::new(response.into_body());
    let mut blocks = Vec::new();
    while let Some(block) = timeout(GUARD, reader.next_event()).await.unwrap() {
        blocks.push(block.unwrap());
    }
    assert_eq!(blocks[0].comments(), ["ok"]);
    assert_eq!(blocks[1].retry(), Some(Duration::from_secs(2)));
    let data: Vec<_> = blocks[2..]
        .iter()
        .map(|b| b.data().unwrap().into_owned())
        .collect();
    assert_eq!(data, ["one", "two"]);
    assert_eq!(reader.parser().last_event_id(), b"2");

    let request = Request::get("/status")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = app(&shutdown).oneshot(request).await.unwrap();
    assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    assert_eq!(response.headers()[CONTENT_LENGTH], "11");
    assert!(response.headers().get("x-accel-buffering").is_none());
    assert!(response.headers().get("cache-control").is_none());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, r#"{"ok":true}"#);
}

/// A hyper server (HTTP/1 and HTTP/2) serving the full stack around a stream the test feeds.
async fn fed_server() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Sender<Bytes>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (senders_tx, senders_rx) = mpsc::unbounded_channel();
    let inner = tower::service_fn(move |_req: Request<Incoming>| {
        let (sender, body) = Channel::<Bytes>::new(1);
        let _ = senders_tx.send(sender);
        let response = Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let shutdown = Shutdown::new();
    let service = full_stack!(&shutdown).service(inner);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, senders_rx)
}

async fn first_event_before_second(http2: bool) {
    let (addr, mut senders) = fed_server().await;
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(http2);
    let client = builder.build_http::<Empty<Bytes>>();
    let response = timeout(
        GUARD,
        client.request(
            Request::get(format!("http://{addr}/"))
                .body(Empty::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.version(),
        if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        }
    );
    assert_eq!(response.headers().get(CONNECTION).is_some(), !http2);
    let mut tx = senders.recv().await.unwrap();
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(next(&mut reader).await.comments(), ["ok"]);
    assert_eq!(
        next(&mut reader).await.retry(),
        Some(Duration::from_secs(2))
    );
    for id in 1..=3 {
        // Nothing more is sent until the client has this event: it cannot be held anywhere.
        let event = Event::builder()
            .id(id.to_string())
            .data("x")
            .build()
            .unwrap();
        tx.send_data(event.encode()).await.unwrap();
        assert_eq!(next(&mut reader).await, event);
    }
}

async fn next(reader: &mut EventReader<Incoming>) -> Event {
    timeout(GUARD, reader.next_event())
        .await
        .expect("in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn first_event_arrives_before_the_second_is_sent_http1() {
    first_event_before_second(false).await;
}

#[tokio::test]
async fn first_event_arrives_before_the_second_is_sent_http2() {
    first_event_before_second(true).await;
}

mod grpc {
    use super::*;
    use tokio_stream::wrappers::TcpListenerStream;
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    #[tokio::test]
    async fn grpc_unary_and_streaming_pass_through_the_full_stack() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("orders", tonic_health::ServingStatus::Serving)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(full_stack!(&shutdown))
                .add_service(health)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );

        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let channel = timeout(GUARD, endpoint.connect()).await.unwrap().unwrap();
        let mut client = HealthClient::new(channel);
        let check = client
            .check(HealthCheckRequest {
                service: "orders".into(),
            })
            .await
            .unwrap();
        assert_eq!(check.get_ref().status(), ServingStatus::Serving);
        assert!(check.metadata().get("x-accel-buffering").is_none());

        // A gRPC error travels in trailers only: it must come through as a status.
        let missing = client
            .check(HealthCheckRequest {
                service: "missing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);

        let mut watch = client
            .watch(HealthCheckRequest {
                service: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = timeout(GUARD, watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        reporter
            .set_service_status("orders", tonic_health::ServingStatus::NotServing)
            .await;
        let second = timeout(GUARD, watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(second.status(), ServingStatus::NotServing);
        server.abort();
    }

    #[tokio::test]
    async fn grpc_response_frames_and_trailers_are_untouched() {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let shutdown = Shutdown::new();
        let service = full_stack!(&shutdown).service(health);
        // An empty HealthCheckRequest: no compression flag, zero length.
        let request = Request::post("/grpc.health.v1.Health/Check")
            .version(Version::HTTP_2)
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(Full::new(Bytes::from_static(
                &[0; 5],
            ))))
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        assert!(response.headers().get("x-accel-buffering").is_none());
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().expect("gRPC trailers").clone();
        assert_eq!(trailers["grpc-status"], "0");
        // A length-prefixed message: SERVING (1) for the overall server status.
        assert_eq!(collected.to_bytes(), &[0, 0, 0, 0, 2, 8, 1][..]);
    }
}
