//! Helpers shared by the integration tests that need real sockets: a counting live upstream, a
//! proxy to it, a server for a stack, SSE clients, and (for Redis) a real redis-server.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body_util::{Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::service_fn;
use tower_sse::wire::{Event, EventReader};

pub mod gateway;
pub mod redis;

pub const GUARD: Duration = Duration::from_secs(30);

/// A live upstream without history that counts the connections and requests it gets.
#[derive(Clone, Default)]
pub struct Upstream {
    pub feeds: Arc<Mutex<Vec<mpsc::Sender<Bytes>>>>,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn serve() -> (SocketAddr, Self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Self::default();
        let shared = upstream.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
                    shared.requests.fetch_add(1, Ordering::SeqCst);
                    // Bounded: an upstream that a slow reader could hold back would show it.
                    let (tx, rx) = mpsc::channel::<Bytes>(64);
                    shared.feeds.lock().unwrap().push(tx);
                    let frames = tokio_stream::wrappers::ReceiverStream::new(rx);
                    let body = StreamBody::new(tokio_stream::StreamExt::map(frames, |b| {
                        Ok::<_, Infallible>(Frame::data(b))
                    }));
                    let response = Response::builder()
                        .header(CONTENT_TYPE, "text/event-stream")
                        .body(body)
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, upstream)
    }

    /// Sends an event to every open upstream stream, waiting while one is full.
    pub async fn send(&self, id: usize, data: &str) {
        let event = Event::builder()
            .id(id.to_string())
            .data(data)
            .build()
            .unwrap();
        let bytes = event.encode();
        let feeds: Vec<_> = self.feeds.lock().unwrap().clone();
        for feed in feeds {
            let _ = timeout(GUARD, feed.send(bytes.clone()))
                .await
                .expect("the upstream is never held back");
        }
    }
}

/// The inner service of the hub: one upstream connection per call, as a proxy without a pool.
pub fn proxy(
    upstream: SocketAddr,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Incoming>,
    Error = hyper::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |request: Request<Incoming>| async move {
        let stream = TcpStream::connect(upstream).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut forwarded = Request::get(request.uri().clone());
        for (name, value) in request.headers() {
            forwarded = forwarded.header(name, value);
        }
        sender
            .send_request(forwarded.body(Empty::<Bytes>::new()).unwrap())
            .await
    })
}

/// An SSE client on its own connection.
pub async fn subscribe(addr: SocketAddr, last_event_id: Option<&str>) -> EventReader<Incoming> {
    subscribe_with_headers(addr, last_event_id).await.1
}

/// [`subscribe`], with the response's headers.
pub async fn subscribe_with_headers(
    addr: SocketAddr,
    last_event_id: Option<&str>,
) -> (http::HeaderMap, EventReader<Incoming>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::get(format!("http://{addr}/topic"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = timeout(
        GUARD,
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let (parts, body) = response.into_parts();
    (parts.headers, EventReader::new(body))
}

pub async fn read_ids(reader: &mut EventReader<Incoming>, n: usize) -> Vec<usize> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let event = timeout(GUARD, reader.next_event())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("a valid event");
        if event.is_message() {
            let id = std::str::from_utf8(event.id().unwrap()).unwrap();
            ids.push(id.parse().unwrap());
        }
    }
    ids
}

pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    timeout(GUARD, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waiting for {what}"));
}

pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Serves `service` (HTTP/1 and HTTP/2) on a free loopback port.
pub async fn serve<S, B>(service: S) -> SocketAddr
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
