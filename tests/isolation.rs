//! Who sees whose stream: replay and fan-out keep users apart by their credentials, share only
//! `GET`, and keep the stream keys a client can make up bounded. Over real loopback sockets: an
//! upstream that answers each request with events naming the credentials it saw, the layers (or
//! the gateway binary) in front of it, and HTTP clients.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE};
use http::{Method, Request, Response};
use http_body_util::{Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{service_fn, ServiceBuilder};
use tower_sse::fanout::FanoutLayer;
use tower_sse::replay::{MemoryStore, PathAndQuery, ReplayLayer, StreamKey};
use tower_sse::wire::{Event, EventReader};

use support::gateway::Gateway;
use support::{serve, until, GUARD};

/// What the upstream saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: Method,
    uri: String,
    /// `Authorization`, else `Cookie`, else `anonymous`.
    who: String,
    last_event_id: Option<String>,
}

/// An open live stream: the credentials that opened it, and its feed.
type LiveFeed = (String, mpsc::Sender<Bytes>);

/// An upstream that names, in every event's data, the credentials of the request it answers.
///
/// On `/live...` a stream stays open and sends an event whenever the test says
/// ([`EchoUpstream::send`]); on any other path it sends the events after the request's
/// `Last-Event-ID` up to id 5 and ends.
#[derive(Clone, Default)]
struct EchoUpstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    live: Arc<Mutex<Vec<LiveFeed>>>,
}

fn event(id: usize, data: &str) -> Bytes {
    Event::builder()
        .id(id.to_string())
        .data(data)
        .build()
        .unwrap()
        .encode()
}

impl EchoUpstream {
    async fn serve() -> (SocketAddr, Self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Self::default();
        let shared = upstream.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let header = |name| {
                        request
                            .headers()
                            .get(name)
                            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
                    };
                    let who = header(AUTHORIZATION)
                        .or_else(|| header(COOKIE))
                        .unwrap_or_else(|| "anonymous".to_owned());
                    let last_event_id = header(http::HeaderName::from_static("last-event-id"));
                    shared.seen.lock().unwrap().push(Seen {
                        method: request.method().clone(),
                        uri: request.uri().path_and_query().unwrap().to_string(),
                        who: who.clone(),
                        last_event_id: last_event_id.clone(),
                    });
                    let (tx, rx) = mpsc::channel::<Bytes>(64);
                    if request.uri().path().starts_with("/live") {
                        shared.live.lock().unwrap().push((who, tx));
                    } else {
                        let after = last_event_id.and_then(|id| id.parse().ok()).unwrap_or(0);
                        for id in after + 1..=5 {
                            tx.try_send(event(id, &who)).unwrap();
                        }
                    }
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

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Open live streams.
    fn live(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// Sends event `id` on every open live stream, its data the credentials that opened it.
    async fn send(&self, id: usize) {
        let feeds = self.live.lock().unwrap().clone();
        for (who, feed) in feeds {
            let _ = timeout(GUARD, feed.send(event(id, &who))).await.unwrap();
        }
    }
}

/// A proxy without a pool: one upstream connection per call, method, URI and headers forwarded.
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
        let mut forwarded = Request::builder()
            .method(request.method().clone())
            .uri(request.uri().clone());
        for (name, value) in request.headers() {
            forwarded = forwarded.header(name, value);
        }
        sender
            .send_request(forwarded.body(Empty::<Bytes>::new()).unwrap())
            .await
    })
}

/// Sends one request on its own connection.
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    timeout(
        GUARD,
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap()
}

/// A `GET` with these headers.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    request(addr, Method::GET, path, headers).await
}

/// The `(id, data)` of every message event of a stream that ends.
async fn all_events(response: Response<Incoming>) -> Vec<(String, String)> {
    let mut reader = EventReader::new(response.into_body());
    let mut events = Vec::new();
    while let Some(event) = timeout(GUARD, reader.next_event()).await.unwrap() {
        let event = event.unwrap();
        // The gateway's history-lost signal (data `earliest`, ...) carries nobody's data.
        if event.is_message() && event.event_type() != Some(&b"history-lost"[..]) {
            events.push(id_and_data(&event));
        }
    }
    events
}

/// The next message event's `(id, data)` on a stream that goes on.
async fn next_event(reader: &mut EventReader<Incoming>) -> (String, String) {
    loop {
        let event = timeout(GUARD, reader.next_event())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("a valid event");
        if event.is_message() {
            return id_and_data(&event);
        }
    }
}

fn id_and_data(event: &Event) -> (String, String) {
    let id = String::from_utf8(event.id().unwrap_or_default().to_vec()).unwrap();
    (id, event.data().unwrap_or_default().into_owned())
}

fn events(ids: std::ops::RangeInclusive<usize>, who: &str) -> Vec<(String, String)> {
    ids.map(|id| (id.to_string(), who.to_owned())).collect()
}

const ALICE: &str = "Bearer alice";
const BOB: &str = "Bearer bob";

/// Replay alone in front of the upstream, keyed by `key`.
async fn replay_gateway(upstream: SocketAddr, key: PathAndQuery) -> (SocketAddr, MemoryStore) {
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        // The echo upstream resumes after the id it is sent.
        .layer(
            ReplayLayer::with_store(store.clone())
                .key(key)
                .upstream_resumes(true),
        )
        .service(proxy(upstream));
    (serve(service).await, store)
}

/// Replay outside a fan-out hub that records into its store, as the gateway stacks them.
async fn fanout_gateway(
    upstream: SocketAddr,
    fanout: FanoutLayer,
    key: PathAndQuery,
) -> SocketAddr {
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        .layer(
            ReplayLayer::with_store(store.clone())
                .key(key)
                .upstream_resumes(true),
        )
        .layer(fanout.record_into(store))
        .service(proxy(upstream));
    serve(service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_hands_one_users_events_to_another() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let (addr, _store) = replay_gateway(upstream_addr, PathAndQuery::new()).await;

    // Alice records events 1..=5 on /private.
    let alice = get(addr, "/private", &[("authorization", ALICE)]).await;
    assert_eq!(all_events(alice).await, events(1..=5, ALICE));

    // Bob, anonymous and a cookie holder resume from 1 on the same path: none of alice's events.
    for (headers, who) in [
        (vec![("authorization", BOB)], BOB),
        (vec![], "anonymous"),
        (vec![("cookie", "session=carol")], "session=carol"),
    ] {
        let mut headers = headers;
        headers.push(("last-event-id", "1"));
        let response = get(addr, "/private", &headers).await;
        assert_ne!(response.headers()["sse-resumed-from"], "last-event-id");
        assert_eq!(all_events(response).await, events(2..=5, who), "{who}");
    }

    // Alice comes back: hers, from the store (the upstream is asked only after the last one).
    let alice = get(
        addr,
        "/private",
        &[("authorization", ALICE), ("last-event-id", "2")],
    )
    .await;
    assert_eq!(alice.headers()["sse-resumed-from"], "last-event-id");
    assert_eq!(all_events(alice).await, events(3..=5, ALICE));
    let last = upstream.seen().pop().unwrap();
    assert_eq!(
        (last.who.as_str(), last.last_event_id),
        (ALICE, Some("5".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shares_across_credentials_only_when_told() {
    let (upstream_addr, _upstream) = EchoUpstream::serve().await;
    let key = PathAndQuery::new().share_across_credentials();
    let (addr, _store) = replay_gateway(upstream_addr, key).await;
    let alice = get(addr, "/public", &[("authorization", ALICE)]).await;
    assert_eq!(all_events(alice).await, events(1..=5, ALICE));
    let bob = get(
        addr,
        "/public",
        &[("authorization", BOB), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(bob.headers()["sse-resumed-from"], "last-event-id");
    assert_eq!(all_events(bob).await, events(2..=5, ALICE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_credential_header_keeps_its_holders_apart() {
    let (upstream_addr, _upstream) = EchoUpstream::serve().await;
    let key = PathAndQuery::new().credential_headers([http::HeaderName::from_static("x-api-key")]);
    let (addr, _store) = replay_gateway(upstream_addr, key).await;
    let first = get(addr, "/keyed", &[("x-api-key", "one")]).await;
    assert_eq!(all_events(first).await, events(1..=5, "anonymous"));
    let second = get(
        addr,
        "/keyed",
        &[("x-api-key", "two"), ("last-event-id", "1")],
    )
    .await;
    assert_ne!(second.headers()["sse-resumed-from"], "last-event-id");
    let same = get(
        addr,
        "/keyed",
        &[("x-api-key", "one"), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(same.headers()["sse-resumed-from"], "last-event-id");
}

/// Alice, bob and an anonymous client on one path, one after the other; each reads one event.
async fn three_users_on_one_path(
    addr: SocketAddr,
    fanout: &FanoutLayer,
    upstream: &EchoUpstream,
) -> Vec<String> {
    let users: [&[(&str, &str)]; 3] = [&[("authorization", ALICE)], &[("authorization", BOB)], &[]];
    let mut readers = Vec::new();
    for headers in users {
        readers.push(EventReader::new(
            get(addr, "/live", headers).await.into_body(),
        ));
    }
    until("three clients attached", || fanout.clients() == 3).await;
    upstream.send(1).await;
    let mut data = Vec::new();
    for reader in &mut readers {
        data.push(next_event(reader).await.1);
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_opens_one_subscription_per_credentials_each_with_its_own() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let fanout = FanoutLayer::new().linger(Duration::from_millis(100));
    let addr = fanout_gateway(upstream_addr, fanout.clone(), PathAndQuery::new()).await;
    let data = three_users_on_one_path(addr, &fanout, &upstream).await;
    assert_eq!(data, [ALICE, BOB, "anonymous"]);
    assert_eq!(fanout.subscriptions(), 3);
    let seen: Vec<_> = upstream.seen().into_iter().map(|seen| seen.who).collect();
    assert_eq!(seen, [ALICE, BOB, "anonymous"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_shares_across_credentials_only_when_told() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let key = PathAndQuery::new().share_across_credentials();
    let fanout = FanoutLayer::new()
        .key(key.clone())
        .linger(Duration::from_millis(100));
    let addr = fanout_gateway(upstream_addr, fanout.clone(), key).await;
    let data = three_users_on_one_path(addr, &fanout, &upstream).await;
    assert_eq!(data, [ALICE, ALICE, ALICE]);
    assert_eq!(fanout.subscriptions(), 1);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_leaves_every_method_but_get_alone() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let (addr, store) = replay_gateway(upstream_addr, PathAndQuery::new()).await;
    for method in [Method::POST, Method::HEAD, Method::PUT, Method::DELETE] {
        let response = request(addr, method.clone(), "/private", &[("last-event-id", "3")]).await;
        assert!(
            response.headers().get("sse-resumed-from").is_none(),
            "{method}"
        );
        let events = all_events(response).await;
        if method != Method::HEAD {
            assert_eq!(events, self::events(4..=5, "anonymous"), "{method}");
        }
        let seen = upstream.seen().pop().unwrap();
        assert_eq!(
            (seen.method, seen.last_event_id),
            (method.clone(), Some("3".into()))
        );
        assert_eq!(store.keys(), 0, "{method} recorded nothing");
    }
    // A GET records; a POST with an id the store knows is still not replayed.
    all_events(get(addr, "/private", &[]).await).await;
    assert_eq!(store.keys(), 1);
    let post = request(addr, Method::POST, "/private", &[("last-event-id", "4")]).await;
    assert!(post.headers().get("sse-resumed-from").is_none());
    assert_eq!(all_events(post).await, events(5..=5, "anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_shares_only_get() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let fanout = FanoutLayer::new().linger(Duration::from_secs(5));
    let addr = fanout_gateway(upstream_addr, fanout.clone(), PathAndQuery::new()).await;
    for method in [Method::POST, Method::HEAD, Method::PUT] {
        let first = request(addr, method.clone(), "/live", &[]).await;
        let second = request(addr, method.clone(), "/live", &[]).await;
        assert_eq!(fanout.subscriptions(), 0, "{method}");
        drop((first, second));
    }
    let methods: Vec<_> = upstream
        .seen()
        .into_iter()
        .map(|seen| seen.method)
        .collect();
    assert_eq!(
        methods,
        [
            Method::POST,
            Method::POST,
            Method::HEAD,
            Method::HEAD,
            Method::PUT,
            Method::PUT
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_query_parameters_bound_the_keys_and_the_request_is_unchanged() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let key = PathAndQuery::new().query_params(["topic"]);
    let (addr, store) = replay_gateway(upstream_addr, key.clone()).await;
    for n in 0..10 {
        let path = format!("/private?topic=a&junk={n}");
        all_events(get(addr, &path, &[]).await).await;
    }
    assert_eq!(store.keys(), 1, "unnamed parameters make no new keys");
    assert_eq!(upstream.seen()[3].uri, "/private?topic=a&junk=3");
    all_events(get(addr, "/private?topic=b", &[]).await).await;
    assert_eq!(store.keys(), 2);
    // One key whatever the order, repeats or escapes of unreserved characters.
    let resumed = get(
        addr,
        "/private?junk=x&%74opic=a&topic=a",
        &[("last-event-id", "2")],
    )
    .await;
    assert_eq!(resumed.headers()["sse-resumed-from"], "last-event-id");

    // The hub: one subscription for every spelling of topic=a.
    let fanout = FanoutLayer::new()
        .key(key.clone())
        .linger(Duration::from_millis(100));
    let addr = fanout_gateway(upstream_addr, fanout.clone(), key).await;
    let before = upstream.live();
    let mut readers = Vec::new();
    for path in [
        "/live?topic=a&junk=1",
        "/live?junk=2&topic=a",
        "/live?topic=a",
    ] {
        readers.push(get(addr, path, &[]).await);
    }
    until("three clients attached", || fanout.clients() == 3).await;
    assert_eq!(upstream.live() - before, 1);
    assert_eq!(upstream.seen().pop().unwrap().uri, "/live?topic=a&junk=1");
}

#[test]
fn the_default_key_documents_what_goes_into_it() {
    let key = |uri: &str, headers: &[(&str, &str)]| {
        let mut request = Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).unwrap();
        String::from_utf8(PathAndQuery::new().key(&request).unwrap().to_vec()).unwrap()
    };
    assert_eq!(key("/a?x=1&lastEventId=5&y=2", &[]), "/a?x=1&y=2");
    let alice = key("/a?x=1", &[("authorization", ALICE)]);
    let (path, digest) = alice.split_once("#credentials=").unwrap();
    assert_eq!(path, "/a?x=1");
    assert_eq!(digest.len(), 64);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
    // Deterministic (instances sharing Redis agree), never in clear, apart per credential.
    assert_eq!(alice, key("/a?x=1", &[("authorization", ALICE)]));
    assert!(!alice.contains("alice"));
    assert_ne!(alice, key("/a?x=1", &[("authorization", BOB)]));
    assert_ne!(alice, key("/a?x=1", &[("cookie", ALICE)]));
    let both = key("/a?x=1", &[("authorization", ALICE), ("cookie", "s=1")]);
    assert_ne!(alice, both);
    // Headers that are not credentials change nothing.
    assert_eq!(key("/a", &[("accept", "text/event-stream")]), "/a");
}

// ---- The gateway binary -------------------------------------------------------------------

/// Alice, bob and an anonymous client on `/live` of a gateway; the data each reads.
async fn three_users_through(
    gateway: &Gateway,
    upstream: &EchoUpstream,
    subscriptions: usize,
) -> Vec<String> {
    let users: [&[(&str, &str)]; 3] = [&[("authorization", ALICE)], &[("authorization", BOB)], &[]];
    let mut readers = Vec::new();
    for headers in users {
        readers.push(EventReader::new(
            get(gateway.addr, "/live", headers).await.into_body(),
        ));
    }
    until("the upstream subscriptions", || {
        upstream.live() == subscriptions
    })
    .await;
    // A client attaches to a shared subscription a moment after its request is sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    upstream.send(1).await;
    let mut data = Vec::new();
    for reader in &mut readers {
        data.push(next_event(reader).await.1);
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keeps_users_apart_in_replay_and_fanout() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let gateway = Gateway::proxy(
        upstream_addr,
        &["--fanout", "--linger", "1", "--replay", "100"],
    )
    .await;
    let data = three_users_through(&gateway, &upstream, 3).await;
    assert_eq!(data, [ALICE, BOB, "anonymous"]);
    let seen: Vec<_> = upstream.seen().into_iter().map(|seen| seen.who).collect();
    assert_eq!(seen, [ALICE, BOB, "anonymous"]);

    // Replay: alice records /private; bob resuming from 1 gets only his own.
    let alice = get(gateway.addr, "/private", &[("authorization", ALICE)]).await;
    assert_eq!(all_events(alice).await, events(1..=5, ALICE));
    let bob = get(
        gateway.addr,
        "/private",
        &[("authorization", BOB), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(all_events(bob).await, events(2..=5, BOB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_shares_across_credentials_when_told() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let args = [
        "--fanout",
        "--linger",
        "1",
        "--replay",
        "100",
        "--share-across-credentials",
    ];
    let gateway = Gateway::proxy(upstream_addr, &args).await;
    let data = three_users_through(&gateway, &upstream, 1).await;
    assert_eq!(data, [ALICE, ALICE, ALICE]);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_key_query_leaves_other_parameters_out_of_the_key() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let args = [
        "--fanout",
        "--linger",
        "1",
        "--key-query",
        "topic,kind",
        "--upstream-resumes",
    ];
    let gateway = Gateway::proxy(upstream_addr, &args).await;
    let mut readers = Vec::new();
    for path in [
        "/live?topic=a&junk=1",
        "/live?junk=2&topic=a",
        "/live?topic=b&junk=3",
    ] {
        readers.push(get(gateway.addr, path, &[]).await);
    }
    until("two upstream subscriptions", || upstream.live() == 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.live(), 2);
    let uris: Vec<_> = upstream.seen().into_iter().map(|seen| seen.uri).collect();
    assert_eq!(uris, ["/live?topic=a&junk=1", "/live?topic=b&junk=3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_sharing_redis_agree_on_keys_and_store_no_credentials() {
    let Some(redis) = support::redis::RedisServer::start() else {
        return;
    };
    let (upstream_addr, _upstream) = EchoUpstream::serve().await;
    let url = redis.url();
    let args = [
        "--redis",
        url.as_str(),
        "--replay",
        "100",
        "--upstream-resumes",
    ];
    let first = Gateway::proxy(upstream_addr, &args).await;
    let second = Gateway::proxy(upstream_addr, &args).await;

    let alice = get(first.addr, "/private", &[("authorization", ALICE)]).await;
    assert_eq!(all_events(alice).await, events(1..=5, ALICE));
    // Recording is asynchronous: wait until the other gateway replays alice's history.
    let headers = [("authorization", ALICE), ("last-event-id", "2")];
    timeout(GUARD, async {
        loop {
            let alice = get(second.addr, "/private", &headers).await;
            if alice.headers()["sse-resumed-from"] == "last-event-id" {
                assert_eq!(all_events(alice).await, events(3..=5, ALICE));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the second gateway finds alice's history");
    let bob = get(
        second.addr,
        "/private",
        &[("authorization", BOB), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(all_events(bob).await, events(2..=5, BOB));

    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit());
    let keys = timeout(
        GUARD,
        Command::new("redis-cli")
            .args(["-p", port, "--scan"])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let keys = String::from_utf8(keys.stdout).unwrap();
    assert!(keys.contains("/private%23credentials%3D"), "{keys}");
    assert!(!keys.contains("alice") && !keys.contains("bob"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_records_replays_and_shares_only_get() {
    let (upstream_addr, upstream) = EchoUpstream::serve().await;
    let args = [
        "--fanout",
        "--linger",
        "1",
        "--replay",
        "100",
        "--upstream-resumes",
    ];
    let gateway = Gateway::proxy(upstream_addr, &args).await;
    // A GET records 1..=5; POSTs with an id the store knows reach the upstream, one each.
    all_events(get(gateway.addr, "/private", &[]).await).await;
    for _ in 0..2 {
        let post = request(
            gateway.addr,
            Method::POST,
            "/private",
            &[("last-event-id", "3")],
        )
        .await;
        assert!(post.headers().get("sse-resumed-from").is_none());
        assert_eq!(all_events(post).await, events(4..=5, "anonymous"));
    }
    let seen: Vec<_> = upstream
        .seen()
        .into_iter()
        .map(|seen| (seen.method, seen.last_event_id))
        .collect();
    assert_eq!(
        seen,
        [
            (Method::GET, None),
            (Method::POST, Some("3".into())),
            (Method::POST, Some("3".into()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_never_hand_one_users_events_to_another() {
    const TOKEN: &str = "an-admin-token-for-the-test";
    let (upstream_addr, _upstream) = EchoUpstream::serve().await;
    let args = [
        "--subscriptions",
        "--replay",
        "100",
        "--admin-token",
        TOKEN,
        "--upstream-resumes",
    ];
    let gateway = Gateway::proxy(upstream_addr, &args).await;

    // Alice reads the topic (a disposable subscription): her events are recorded for her.
    let alice = get(gateway.addr, "/topics/news", &[("authorization", ALICE)]).await;
    assert!(alice.headers().contains_key("sse-subscription"));
    assert_eq!(all_events(alice).await, events(1..=5, ALICE));

    // Bob resumes the same topic after id 2: none of alice's history, his own stream.
    let bob_resumes = [("authorization", BOB), ("last-event-id", "2")];
    let bob = get(gateway.addr, "/topics/news", &bob_resumes).await;
    assert_ne!(bob.headers()["sse-resumed-from"], "last-event-id");
    assert_eq!(all_events(bob).await, events(3..=5, BOB));

    // A provisioned subscription, created by the operator, read by each user with an id of
    // their own: each gets only what was recorded for them.
    let bearer = format!("Bearer {TOKEN}");
    let created = request(
        gateway.addr,
        Method::POST,
        "/topics/news/subscriptions",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(created.status(), http::StatusCode::CREATED);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let stream = format!("{location}/subscribe");

    let alice_resumes = [("authorization", ALICE), ("last-event-id", "2")];
    let alice = get(gateway.addr, &stream, &alice_resumes).await;
    assert_eq!(alice.headers()["sse-resumed-from"], "last-event-id");
    assert_eq!(all_events(alice).await, events(3..=5, ALICE));
    let bob = get(gateway.addr, &stream, &bob_resumes).await;
    assert_ne!(bob.headers()["sse-resumed-from"], "last-event-id");
    assert_eq!(all_events(bob).await, events(3..=5, BOB));
}
