//! The fan-out hub over real sockets: a counting upstream, the hub in a hyper server, and real
//! HTTP clients on loopback.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{service_fn, ServiceBuilder};
use tower_sse::fanout::FanoutLayer;
use tower_sse::replay::{MemoryStore, ReplayLayer};
use tower_sse::wire::{Event, EventReader};

const GUARD: Duration = Duration::from_secs(30);

/// A live upstream without history that counts the connections and requests it gets.
#[derive(Clone, Default)]
struct Upstream {
    feeds: Arc<Mutex<Vec<mpsc::Sender<Bytes>>>>,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Upstream {
    async fn serve() -> (SocketAddr, Self) {
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
    async fn send(&self, id: usize, data: &str) {
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
fn proxy(
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

/// Serves replay + fan-out in front of `upstream`; returns the address and the hub's layer.
async fn gateway(upstream: SocketAddr, fanout: FanoutLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(fanout.record_into(store))
        .service(proxy(upstream));
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

/// An SSE client on its own connection.
async fn subscribe(addr: SocketAddr, last_event_id: Option<&str>) -> EventReader<Incoming> {
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
    EventReader::new(response.into_body())
}

async fn read_ids(reader: &mut EventReader<Incoming>, n: usize) -> Vec<usize> {
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

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    timeout(GUARD, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waiting for {what}"));
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_cost_one_upstream_connection_and_the_hub_ends_after_its_linger() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let fanout = FanoutLayer::new().linger(Duration::from_millis(200));
    let addr = gateway(upstream_addr, fanout.clone()).await;
    let baseline = alive_tasks();

    let mut clients = Vec::new();
    for _ in 0..1_000 {
        clients.push(tokio::spawn(subscribe(addr, None)));
    }
    let mut readers = Vec::new();
    for client in clients {
        readers.push(client.await.unwrap());
    }
    until("1,000 attached clients", || fanout.clients() == 1_000).await;
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
    assert_eq!(fanout.subscriptions(), 1);

    let expected: Vec<usize> = (1..=20).collect();
    let send = {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            for id in 1..=20 {
                upstream.send(id, "tick").await;
            }
        })
    };
    let mut reads = Vec::new();
    for mut reader in readers {
        reads.push(tokio::spawn(async move {
            let ids = read_ids(&mut reader, 20).await;
            (ids, reader)
        }));
    }
    let mut readers = Vec::new();
    for read in reads {
        let (ids, reader) = read.await.unwrap();
        assert_eq!(ids, expected);
        readers.push(reader);
    }
    send.await.unwrap();
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    // Everyone leaves: after the linger the upstream stream closes and every task is gone.
    drop(readers);
    until("no attached client", || fanout.clients() == 0).await;
    until("the subscription to close", || fanout.subscriptions() == 0).await;
    until("the upstream stream to be closed", || {
        upstream
            .feeds
            .lock()
            .unwrap()
            .iter()
            .all(|feed| feed.is_closed())
    })
    .await;
    until("tasks back to the baseline", || alive_tasks() <= baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_that_reconnects_within_the_linger_misses_nothing() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let fanout = FanoutLayer::new().linger(Duration::from_secs(20));
    let addr = gateway(upstream_addr, fanout.clone()).await;

    let mut client = subscribe(addr, None).await;
    until("the upstream stream", || {
        upstream.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    for id in 1..=3 {
        upstream.send(id, "before").await;
    }
    assert_eq!(read_ids(&mut client, 3).await, [1, 2, 3]);
    drop(client);
    until("the client to leave", || fanout.clients() == 0).await;

    // The upstream cannot resume; the hub keeps listening and recording meanwhile.
    for id in 4..=6 {
        upstream.send(id, "while away").await;
    }
    let mut client = subscribe(addr, Some("3")).await;
    for id in 7..=8 {
        upstream.send(id, "after").await;
    }
    assert_eq!(read_ids(&mut client, 5).await, [4, 5, 6, 7, 8]);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_disconnected_while_the_others_get_everything() {
    let (upstream_addr, upstream) = Upstream::serve().await;
    let fanout = FanoutLayer::new().queue_capacity(64);
    let addr = gateway(upstream_addr, fanout.clone()).await;

    let mut readers = Vec::new();
    for _ in 0..10 {
        readers.push(subscribe(addr, None).await);
    }
    // A client that sends its request and never reads a byte, with a small receive buffer (so
    // the kernel's autotuning does not swallow the test's stream).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /topic HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    until("11 attached clients", || fanout.clients() == 11).await;

    // Enough to fill the stalled client's socket buffers many times over, sent no faster than
    // the readers read (a hub never holds its upstream back, so a burst beyond every reader's
    // queue would cut them all): at most 32 events ahead of the slowest reader.
    const EVENTS: usize = 4_000;
    let data = "x".repeat(4 * 1024);
    let progress: Vec<Arc<AtomicUsize>> = (0..readers.len()).map(|_| Arc::default()).collect();
    let mut reads = Vec::new();
    for (mut reader, progress) in readers.into_iter().zip(progress.clone()) {
        reads.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(EVENTS);
            while ids.len() < EVENTS {
                ids.extend(read_ids(&mut reader, 1).await);
                progress.store(ids.len(), Ordering::Release);
            }
            (ids, reader)
        }));
    }
    for id in 1..=EVENTS {
        let slowest = || progress.iter().map(|p| p.load(Ordering::Acquire)).min();
        if slowest().unwrap_or(0) + 32 < id {
            until("the readers to keep up", || {
                slowest().unwrap_or(0) + 16 >= id
            })
            .await;
        }
        upstream.send(id, &data).await;
    }
    let expected: Vec<usize> = (1..=EVENTS).collect();
    let mut readers = Vec::new();
    for read in reads {
        let (ids, reader) = read.await.unwrap();
        assert_eq!(ids, expected);
        readers.push(reader);
    }
    // The stalled client was cut off: the hub let it go, and the server closed its connection
    // (reading what its buffers hold ends, rather than waiting forever).
    until("the stalled client to be dropped", || {
        fanout.clients() == 10
    })
    .await;
    let mut sink = vec![0; 1 << 16];
    timeout(GUARD, async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the stalled connection is closed");
}
