use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::replay::{Lookup, ReadFrom, ReplayLayer, StoredEvent};
use crate::test_util::channel_service;
use crate::testing::TestStream;

const SECOND: Duration = Duration::from_secs(1);

fn get(uri: &str) -> Request<()> {
    Request::builder().uri(uri).body(()).unwrap()
}

fn resume(uri: &str, id: &str) -> Request<()> {
    Request::builder()
        .uri(uri)
        .header("last-event-id", id)
        .body(())
        .unwrap()
}

async fn send(sender: &mut Sender<Bytes>, text: &str) {
    sender
        .send_data(Bytes::copy_from_slice(text.as_bytes()))
        .await
        .unwrap();
}

fn event(id: u32) -> String {
    format!("id: {id}\ndata: event {id}\n\n")
}

fn data(event: &crate::wire::Event) -> String {
    event.data().unwrap().into_owned()
}

/// Lets spawned tasks run until they wait.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn clients_of_one_key_share_one_upstream_call() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let layer = FanoutLayer::new();
    let service = layer.layer(upstream);
    let mut first = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut second = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut sender = senders.recv().await.unwrap();
    assert_eq!(layer.subscriptions(), 1);
    assert_eq!(layer.clients(), 2);
    // An event split across chunks reaches every client whole.
    send(&mut sender, "id: 1\nda").await;
    send(&mut sender, "ta: one\n\n").await;
    assert_eq!(data(&first.next_event().await), "one");
    assert_eq!(data(&second.next_event().await), "one");
    // A third client attaches later and sees only what follows.
    let mut third = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    send(&mut sender, &event(2)).await;
    for stream in [&mut first, &mut second, &mut third] {
        assert_eq!(data(&stream.next_event().await), "event 2");
    }
    // Another key is another subscription.
    let _other = service.clone().oneshot(get("/u")).await.unwrap();
    assert!(senders.recv().await.is_some());
    assert!(senders.try_recv().is_err(), "one upstream call per key");
    assert_eq!(layer.subscriptions(), 2);
}

#[tokio::test]
async fn frames_hold_whole_events_only() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let service = FanoutLayer::new().layer(upstream);
    let response = service.clone().oneshot(get("/t")).await.unwrap();
    let mut body = response.into_body();
    let mut sender = senders.recv().await.unwrap();
    send(&mut sender, "data: a\n\ndata: b\n").await;
    send(&mut sender, "\ndata: c").await;
    send(&mut sender, "\r\n\r\n").await;
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, "data: a\n\n");
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, "data: b\n\n");
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, "data: c\n\n");
}

#[tokio::test]
async fn other_methods_and_unkeyed_requests_go_straight_through() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let layer = FanoutLayer::new().key(|request: &Request<()>| {
        (request.uri().path() != "/private").then(|| Bytes::from_static(b"k"))
    });
    let service = layer.layer(upstream);
    let post = Request::post("/t").body(()).unwrap();
    let response = service.clone().oneshot(post).await.unwrap();
    assert!(!response.body().is_shared());
    let response = service.clone().oneshot(get("/private")).await.unwrap();
    assert!(!response.body().is_shared());
    assert!(senders.recv().await.is_some());
    assert!(senders.recv().await.is_some());
    assert_eq!(layer.subscriptions(), 0);
}

#[tokio::test]
async fn a_response_that_is_not_an_event_stream_is_not_shared() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let (release, gate) = tokio::sync::watch::channel(false);
    let upstream = service_fn(move |_request: Request<()>| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        let mut gate = gate.clone();
        async move {
            gate.wait_for(|open| *open).await.unwrap();
            let response = Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(format!("{{\"call\":{call}}}"))))
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    let layer = FanoutLayer::new();
    let service = layer.layer(upstream);
    let owner = tokio::spawn(service.clone().oneshot(get("/t")));
    settle().await;
    let waiter = tokio::spawn(service.clone().oneshot(get("/t")));
    settle().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the waiter waits for the owner"
    );
    release.send(true).unwrap();
    let owner = owner.await.unwrap().unwrap();
    let waiter = waiter.await.unwrap().unwrap();
    assert_eq!(owner.status(), StatusCode::NOT_FOUND);
    let body = owner.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"call\":0}");
    // The waiter asked the inner service itself and got its own answer.
    let body = waiter.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"call\":1}");
    settle().await;
    assert_eq!(layer.subscriptions(), 0);
    assert_eq!(layer.clients(), 0);
}

#[tokio::test]
async fn an_inner_error_goes_to_the_owner_and_waiters_retry_on_their_own() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = service_fn(move |_request: Request<()>| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if call == 0 {
                tokio::task::yield_now().await;
                return Err("upstream refused");
            }
            let response = Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Full::new(Bytes::from("data: direct\n\n")))
                .unwrap();
            Ok(response)
        }
    });
    let service = FanoutLayer::new().layer(upstream);
    let owner = service.clone().oneshot(get("/t"));
    let waiter = service.clone().oneshot(get("/t"));
    let (owner, waiter) = tokio::join!(owner, waiter);
    assert_eq!(owner.unwrap_err(), "upstream refused");
    let waiter = waiter.unwrap();
    assert!(!waiter.body().is_shared());
    let body = waiter.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "data: direct\n\n");
}

#[tokio::test(start_paused = true)]
async fn the_subscription_lingers_then_closes_and_its_task_ends() {
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let (mut senders, upstream) = channel_service("text/event-stream");
    let layer = FanoutLayer::new().linger(10 * SECOND);
    let service = layer.layer(upstream);
    let client = service.clone().oneshot(get("/t")).await.unwrap();
    let mut sender = senders.recv().await.unwrap();
    drop(client);
    settle().await;
    assert_eq!(layer.clients(), 0);
    // Within the linger, the upstream stays subscribed.
    tokio::time::sleep(9 * SECOND).await;
    assert_eq!(layer.subscriptions(), 1);
    send(&mut sender, &event(1)).await;
    // A client that comes back within it attaches to the same subscription, and the linger
    // starts again when it leaves.
    let client = service.clone().oneshot(get("/t")).await.unwrap();
    tokio::time::sleep(5 * SECOND).await;
    drop(client);
    tokio::time::sleep(9 * SECOND).await;
    assert_eq!(layer.subscriptions(), 1);
    assert!(senders.try_recv().is_err(), "no second upstream call");
    tokio::time::sleep(2 * SECOND).await;
    settle().await;
    assert_eq!(layer.subscriptions(), 0);
    // The upstream body was dropped: its sender is closed.
    assert!(sender.send_data(Bytes::from("data: x\n\n")).await.is_err());
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks_after, tasks_before, "the hub task ended");
    // The next request opens a new subscription.
    let _client = service.clone().oneshot(get("/t")).await.unwrap();
    assert!(senders.recv().await.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_lone_client_reconnecting_within_the_linger_gets_every_event() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(FanoutLayer::new().record_into(store).linger(5 * SECOND))
        .service(upstream);
    let mut client = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut sender = senders.recv().await.unwrap();
    send(&mut sender, &event(1)).await;
    assert_eq!(data(&client.next_event().await), "event 1");
    drop(client);
    // While nobody listens, the upstream goes on; the hub records.
    send(&mut sender, &event(2)).await;
    send(&mut sender, &event(3)).await;
    tokio::time::sleep(3 * SECOND).await;
    let response = service.clone().oneshot(resume("/t", "1")).await.unwrap();
    let mut client = TestStream::new(response);
    client.assert_header("sse-resumed-from", "last-event-id");
    send(&mut sender, &event(4)).await;
    let got: Vec<String> = client.events(3).await.iter().map(data).collect();
    assert_eq!(got, ["event 2", "event 3", "event 4"]);
    assert!(senders.try_recv().is_err(), "one upstream subscription");
}

/// A store whose reads answer from the moment they were made but only when the test says so:
/// events recorded while a replay is in flight.
#[derive(Clone)]
struct GatedStore {
    inner: MemoryStore,
    gate: Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
}

impl ReplayStore for GatedStore {
    type Read = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Lookup, crate::replay::StoreError>> + Send>,
    >;

    fn read(&self, key: &Bytes, from: ReadFrom<'_>, limit: usize) -> Self::Read {
        let snapshot = self.inner.read(key, from, limit);
        let gate = self.gate.lock().unwrap().take();
        Box::pin(async move {
            let lookup = snapshot.await;
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            lookup
        })
    }

    fn append(&self, key: &Bytes, event: StoredEvent) {
        self.inner.append(key, event);
    }

    fn next_id(&self, key: &Bytes) -> Bytes {
        self.inner.next_id(key)
    }

    fn trim(&self, key: &Bytes, keep: usize) {
        self.inner.trim(key, keep);
    }
}

#[tokio::test]
async fn events_recorded_while_a_replay_is_read_are_neither_lost_nor_doubled() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let (open_gate, gate) = tokio::sync::oneshot::channel();
    let store = GatedStore {
        inner: MemoryStore::new(),
        gate: Arc::new(Mutex::new(None)),
    };
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(FanoutLayer::new().record_into(store.clone()))
        .service(upstream);
    let mut watcher = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut sender = senders.recv().await.unwrap();
    for id in 1..=3 {
        send(&mut sender, &event(id)).await;
    }
    assert_eq!(watcher.events(3).await.len(), 3);
    // A client with id 1 reconnects; its replay read sees 2 and 3, and is slow to answer.
    *store.gate.lock().unwrap() = Some(gate);
    let reconnect = tokio::spawn(service.clone().oneshot(resume("/t", "1")));
    settle().await;
    // Meanwhile 4 and 5 arrive, before the client has joined the fan-out.
    send(&mut sender, &event(4)).await;
    send(&mut sender, &event(5)).await;
    assert_eq!(watcher.events(2).await.len(), 2);
    open_gate.send(()).unwrap();
    let mut client = TestStream::new(reconnect.await.unwrap().unwrap());
    // 4 and 5 come at once, without waiting for the next live event.
    let got = tokio::time::timeout(10 * SECOND, client.events(4))
        .await
        .expect("4 and 5 without a further live event");
    let got: Vec<String> = got.iter().map(data).collect();
    assert_eq!(got, ["event 2", "event 3", "event 4", "event 5"]);
    for id in 6..=7 {
        send(&mut sender, &event(id)).await;
        assert_eq!(data(&client.next_event().await), format!("event {id}"));
    }
}

#[tokio::test]
async fn a_stalled_client_is_cut_off_while_the_others_keep_going() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let layer = FanoutLayer::new().queue_capacity(4);
    let service = layer.layer(upstream);
    let mut reader = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let stalled = service.clone().oneshot(get("/t")).await.unwrap();
    let mut sender = senders.recv().await.unwrap();
    for id in 1..=100 {
        send(&mut sender, &event(id)).await;
        assert_eq!(data(&reader.next_event().await), format!("event {id}"));
    }
    assert_eq!(layer.clients(), 1, "the stalled client's queue is gone");
    // When it finally reads, it learns it was cut off: no event, an error.
    let mut body = stalled.into_body();
    let error = body.frame().await.unwrap().unwrap_err();
    assert!(error.is::<ClientTooSlow>(), "{error}");
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(layer.clients(), 1);
    send(&mut sender, &event(101)).await;
    assert_eq!(data(&reader.next_event().await), "event 101");
}

#[tokio::test(start_paused = true)]
async fn a_frame_older_than_the_write_deadline_cuts_the_client_off() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let layer = FanoutLayer::new().write_deadline(Some(5 * SECOND));
    let service = layer.layer(upstream);
    let stalled = service.clone().oneshot(get("/t")).await.unwrap();
    let mut sender = senders.recv().await.unwrap();
    send(&mut sender, &event(1)).await;
    tokio::time::sleep(4 * SECOND).await;
    send(&mut sender, &event(2)).await;
    tokio::time::sleep(2 * SECOND).await;
    // Event 1 has now waited 6 s: the next event applies the policy.
    send(&mut sender, &event(3)).await;
    settle().await;
    let mut body = stalled.into_body();
    let error = body.frame().await.unwrap().unwrap_err();
    assert!(error.is::<ClientTooSlow>());
}

#[tokio::test]
async fn skipping_keeps_a_slow_client_connected_with_a_gap() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let layer = FanoutLayer::new()
        .queue_capacity(2)
        .on_slow_client(SlowClient::SkipEvents);
    let service = layer.layer(upstream);
    let mut slow = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut sender = senders.recv().await.unwrap();
    for id in 1..=5 {
        send(&mut sender, &event(id)).await;
    }
    settle().await;
    let got: Vec<String> = slow.events(2).await.iter().map(data).collect();
    assert_eq!(got, ["event 1", "event 2"]);
    send(&mut sender, &event(6)).await;
    assert_eq!(data(&slow.next_event().await), "event 6");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_end_ends_every_client_and_the_next_request_resumes_upstream() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (senders_tx, mut senders) = mpsc::unbounded_channel();
    let upstream = service_fn(move |request: Request<()>| {
        let _ = seen_tx.send(request.headers().get("last-event-id").cloned());
        let (sender, body) = Channel::<Bytes>::new(16);
        let _ = senders_tx.send(sender);
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let layer = FanoutLayer::new();
    let service = layer.layer(upstream);
    let mut first = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut second = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    assert_eq!(seen.recv().await.unwrap(), None);
    let mut sender = senders.recv().await.unwrap();
    send(&mut sender, &event(7)).await;
    drop(sender);
    for stream in [&mut first, &mut second] {
        assert_eq!(data(&stream.next_event().await), "event 7");
        stream.assert_ends().await;
    }
    // The next subscription asks the upstream to continue after its last id.
    let _again = service.clone().oneshot(get("/t")).await.unwrap();
    assert_eq!(
        seen.recv().await.unwrap(),
        Some(HeaderValue::from_static("7"))
    );
}

#[tokio::test]
async fn ids_assigned_by_the_hub_are_the_same_for_every_client() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let store = MemoryStore::new();
    let service = ServiceBuilder::new()
        .layer(ReplayLayer::with_store(store.clone()))
        .layer(
            FanoutLayer::new()
                .record_into(store.clone())
                .ids(crate::replay::Ids::AssignMissing),
        )
        .service(upstream);
    let mut first = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut second = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut sender = senders.recv().await.unwrap();
    send(&mut sender, "data: a\n\ndata: b\n\n").await;
    let first_ids: Vec<Bytes> = first
        .events(2)
        .await
        .iter()
        .map(|e| Bytes::copy_from_slice(e.id().unwrap()))
        .collect();
    let second_ids: Vec<Bytes> = second
        .events(2)
        .await
        .iter()
        .map(|e| Bytes::copy_from_slice(e.id().unwrap()))
        .collect();
    assert_eq!(first_ids, second_ids);
    // Recorded once each, and resumable by those ids.
    let response = service
        .clone()
        .oneshot(resume("/t", std::str::from_utf8(&first_ids[0]).unwrap()))
        .await
        .unwrap();
    let mut resumed = TestStream::new(response);
    assert_eq!(data(&resumed.next_event().await), "b");
}

#[tokio::test]
async fn every_client_gets_the_upstream_head() {
    let upstream = service_fn(|_request: Request<()>| async {
        let (sender, body) = Channel::<Bytes>::new(1);
        std::mem::forget(sender);
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CONTENT_LENGTH, "100")
            .header("x-topic", "news")
            .body(body)
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    let mut service = FanoutLayer::new().layer(upstream);
    let first = service
        .ready()
        .await
        .unwrap()
        .call(get("/t"))
        .await
        .unwrap();
    let second = service
        .ready()
        .await
        .unwrap()
        .call(get("/t"))
        .await
        .unwrap();
    for response in [first, second] {
        assert!(response.body().is_shared());
        assert_eq!(response.headers()["x-topic"], "news");
        assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
    }
}

#[tokio::test]
async fn an_event_beyond_the_limits_ends_the_subscription_cleanly() {
    let (mut senders, upstream) = channel_service("text/event-stream");
    let limits = crate::wire::Limits::default().max_line_len(64);
    let layer = FanoutLayer::new().limits(limits).linger(Duration::ZERO);
    let service = layer.layer(upstream);
    let mut client = TestStream::new(service.clone().oneshot(get("/t")).await.unwrap());
    let mut sender = senders.recv().await.unwrap();
    send(&mut sender, &event(1)).await;
    send(&mut sender, &format!("data: {}\n\n", "x".repeat(100))).await;
    assert_eq!(data(&client.next_event().await), "event 1");
    client.assert_ends().await;
    // The next request subscribes again.
    let _again = service.clone().oneshot(get("/t")).await.unwrap();
    assert!(senders.recv().await.is_some());
}

/// Upstream responses alive right now, the most at once, and calls made.
#[derive(Debug, Default)]
struct Upstreams {
    live: AtomicUsize,
    most: AtomicUsize,
    calls: AtomicUsize,
}

/// Alive while its response (or the call that makes it) is.
struct Alive(Arc<Upstreams>);

impl Alive {
    fn new(upstreams: &Arc<Upstreams>) -> Self {
        upstreams.calls.fetch_add(1, Ordering::SeqCst);
        let live = upstreams.live.fetch_add(1, Ordering::SeqCst) + 1;
        upstreams.most.fetch_max(live, Ordering::SeqCst);
        Self(upstreams.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An endless event stream that counts itself among the live upstreams.
struct Endless {
    _alive: Alive,
    sent: bool,
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.sent, true) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(
            "id: 1\ndata: hello\n\n",
        )))))
    }
}

/// An upstream that answers every request with an [`Endless`] stream after `delay`.
fn counted_upstream(
    delay: Duration,
) -> (
    Arc<Upstreams>,
    impl Service<
            Request<()>,
            Response = Response<Endless>,
            Error = Infallible,
            Future = impl Send + 'static,
        > + Clone
        + Send
        + 'static,
) {
    let upstreams = Arc::new(Upstreams::default());
    let counter = upstreams.clone();
    let service = service_fn(move |_request: Request<()>| {
        let alive = Alive::new(&counter);
        async move {
            tokio::time::sleep(delay).await;
            let response = Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Endless {
                    _alive: alive,
                    sent: false,
                })
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    (upstreams, service)
}

#[tokio::test(start_paused = true)]
async fn the_hub_holds_at_most_max_subscriptions_and_closes_idle_ones_first() {
    let (upstreams, upstream) = counted_upstream(Duration::from_millis(1));
    let layer = FanoutLayer::new().linger(60 * SECOND).max_subscriptions(3);
    let service = layer.layer(upstream);
    // 3 + 7 distinct keys, each read for an event and left: each lingers until room is needed.
    for n in 0..10 {
        let response = service
            .clone()
            .oneshot(get(&format!("/t?n={n}")))
            .await
            .unwrap();
        assert!(response.body().is_shared());
        let mut client = TestStream::new(response);
        assert_eq!(data(&client.next_event().await), "hello");
        drop(client);
        settle().await;
        assert!(layer.subscriptions() <= 3, "{}", layer.subscriptions());
    }
    assert_eq!(upstreams.calls.load(Ordering::SeqCst), 10);
    assert_eq!(
        upstreams.most.load(Ordering::SeqCst),
        3,
        "never more than 3 at once"
    );
    assert_eq!(upstreams.live.load(Ordering::SeqCst), 3);
    // The newest keys are the ones still lingering: a client of key 9 rejoins it.
    let _again = service.clone().oneshot(get("/t?n=9")).await.unwrap();
    assert_eq!(upstreams.calls.load(Ordering::SeqCst), 10);
    // And the lingering ones close after their linger.
    tokio::time::sleep(61 * SECOND).await;
    settle().await;
    assert_eq!(upstreams.live.load(Ordering::SeqCst), 1);
    assert_eq!(layer.subscriptions(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_hub_of_attended_subscriptions_serves_new_keys_unshared() {
    let (upstreams, upstream) = counted_upstream(Duration::ZERO);
    let layer = FanoutLayer::new().max_subscriptions(2);
    let service = layer.layer(upstream);
    let first = service.clone().oneshot(get("/a")).await.unwrap();
    let second = service.clone().oneshot(get("/b")).await.unwrap();
    assert!(first.body().is_shared() && second.body().is_shared());
    // Both have a client: a third key is not shared, and costs nothing once its client leaves.
    let third = service.clone().oneshot(get("/c")).await.unwrap();
    assert!(!third.body().is_shared());
    assert_eq!(layer.subscriptions(), 2);
    assert_eq!(upstreams.live.load(Ordering::SeqCst), 3);
    drop(third);
    assert_eq!(upstreams.live.load(Ordering::SeqCst), 2);
    // Clients of a subscribed key still share it.
    let again = service.clone().oneshot(get("/a")).await.unwrap();
    assert!(again.body().is_shared());
    assert_eq!(upstreams.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_subscription_nobody_got_does_not_linger() {
    let (upstreams, upstream) = counted_upstream(10 * Duration::from_millis(1));
    let layer = FanoutLayer::new().linger(60 * SECOND);
    let service = layer.layer(upstream);
    // Requests that give up before the upstream answers: each call is dropped at once.
    for n in 0..50 {
        let pending = service.clone().oneshot(get(&format!("/t?n={n}")));
        let _ = tokio::time::timeout(Duration::from_millis(1), pending).await;
        settle().await;
        assert_eq!(layer.subscriptions(), 0);
        assert_eq!(upstreams.live.load(Ordering::SeqCst), 0);
    }
    assert_eq!(upstreams.calls.load(Ordering::SeqCst), 50);
    assert_eq!(upstreams.most.load(Ordering::SeqCst), 1);
    // A request that got the response lingers as before.
    let response = service.clone().oneshot(get("/kept")).await.unwrap();
    drop(response);
    tokio::time::sleep(30 * SECOND).await;
    settle().await;
    assert_eq!(layer.subscriptions(), 1);
    assert_eq!(upstreams.live.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_hub_closes_a_batch_of_the_longest_idle() {
    let (upstreams, upstream) = counted_upstream(Duration::ZERO);
    let layer = FanoutLayer::new()
        .linger(60 * SECOND)
        .max_subscriptions(128);
    let service = layer.layer(upstream);
    for n in 0..128 {
        drop(
            service
                .clone()
                .oneshot(get(&format!("/t?n={n}")))
                .await
                .unwrap(),
        );
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    settle().await;
    assert_eq!(layer.subscriptions(), 128);
    // Key 0 comes back: it is reattached, and so no longer the longest idle.
    let zero = service.clone().oneshot(get("/t?n=0")).await.unwrap();
    assert!(zero.body().is_shared());
    // A new key closes a batch of 128 / 64 = 2: keys 1 and 2, idle longest.
    let _new = service.clone().oneshot(get("/t?n=new")).await.unwrap();
    settle().await;
    assert_eq!(layer.subscriptions(), 127);
    assert_eq!(upstreams.live.load(Ordering::SeqCst), 127);
    let calls = upstreams.calls.load(Ordering::SeqCst);
    for kept in [0, 3, 127] {
        drop(
            service
                .clone()
                .oneshot(get(&format!("/t?n={kept}")))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        upstreams.calls.load(Ordering::SeqCst),
        calls,
        "still subscribed"
    );
    drop(service.clone().oneshot(get("/t?n=1")).await.unwrap());
    assert_eq!(
        upstreams.calls.load(Ordering::SeqCst),
        calls + 1,
        "key 1 was closed"
    );
}
