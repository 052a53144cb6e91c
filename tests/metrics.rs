//! The metrics the layers emit (feature `metrics`), read back from a recorder of the test's own,
//! installed for each test's thread: every test runs on its own current-thread runtime.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_sse::compression::SseCompressionLayer;
use tower_sse::fanout::FanoutLayer;
use tower_sse::testing::{Script, ScriptedService, TestStream};
use tower_sse::timeout::{IdleTimeoutLayer, ResponseTimeoutLayer};
use tower_sse::{HeartbeatLayer, PassthroughLayer, ReplayLayer, SseHeadersLayer};

/// A recorder for the tests: every counter and gauge by name and labels, readable at any time.
#[derive(Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// `name{k=v,...}` with the labels sorted.
fn render(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

fn render_key(key: &Key) -> String {
    let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
    render(key.name(), &labels)
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(counters.entry(render_key(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = self.gauges.lock().unwrap();
        Gauge::from_arc(gauges.entry(render_key(key)).or_default().clone())
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

struct Recorded {
    recorder: &'static TestRecorder,
    _guard: metrics::LocalRecorderGuard<'static>,
}

/// A recorder for this thread only (each test runs on its own current-thread runtime).
fn record() -> Recorded {
    let recorder: &'static TestRecorder = Box::leak(Box::default());
    let guard = metrics::set_default_local_recorder(recorder);
    Recorded {
        recorder,
        _guard: guard,
    }
}

impl Recorded {
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let counters = self.recorder.counters.lock().unwrap();
        counters
            .get(&render(name, labels))
            .map_or(0.0, |c| c.load(Ordering::Relaxed) as f64)
    }

    fn gauge(&self, name: &str) -> f64 {
        let gauges = self.recorder.gauges.lock().unwrap();
        gauges
            .get(&render(name, &[]))
            .map_or(0.0, |g| f64::from_bits(g.load(Ordering::Relaxed)))
    }
}

fn upstream(script: Script) -> ScriptedService {
    ScriptedService::event_stream(script)
}

fn get() -> Request<()> {
    Request::get("/events").body(()).unwrap()
}

/// Three frames through the passthrough: its first comment, then two events.
fn commented_two_events() -> tower_sse::passthrough::Passthrough<ScriptedService> {
    PassthroughLayer::new()
        .initial_comment("ok")
        .layer_service(upstream(
            Script::new().chunk("data: a\n\n").chunk("data: b\n\n"),
        ))
}

#[tokio::test]
async fn a_streams_first_frame_is_counted_at_once_and_the_rest_by_its_end() {
    let recorded = record();
    let service = commented_two_events();
    let mut body = service.oneshot(get()).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(recorded.counter("sse_frames_sent_total", &[]), 1.0);
    assert_eq!(
        recorded.counter("sse_bytes_sent_total", &[]),
        first.len() as f64
    );
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(recorded.counter("sse_frames_sent_total", &[]), 3.0);
    assert_eq!(
        recorded.counter("sse_bytes_sent_total", &[]),
        (first.len() + rest.len()) as f64
    );
}

#[tokio::test]
async fn streams_frames_and_bytes_are_counted_with_how_each_stream_closed() {
    let recorded = record();
    let service = commented_two_events();
    let body = service.clone().oneshot(get()).await.unwrap().into_body();
    assert_eq!(recorded.gauge("sse_streams_open"), 1.0);
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(recorded.counter("sse_streams_opened_total", &[]), 1.0);
    assert_eq!(recorded.counter("sse_frames_sent_total", &[]), 3.0);
    assert_eq!(
        recorded.counter("sse_bytes_sent_total", &[]),
        bytes.len() as f64
    );
    assert_eq!(
        recorded.counter("sse_streams_closed_total", &[("reason", "end")]),
        1.0
    );
    assert_eq!(recorded.gauge("sse_streams_open"), 0.0);

    // A client that leaves before the end.
    let hanging =
        PassthroughLayer::new().layer_service(upstream(Script::new().chunk("data: a\n\n").hang()));
    let response = hanging.oneshot(get()).await.unwrap();
    drop(response);
    assert_eq!(
        recorded.counter("sse_streams_closed_total", &[("reason", "client_gone")]),
        1.0
    );
    assert_eq!(recorded.gauge("sse_streams_open"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_and_timeouts_are_counted() {
    let recorded = record();
    let service = ServiceBuilder::new()
        .layer(HeartbeatLayer::new(Duration::from_secs(1)))
        .layer(IdleTimeoutLayer::new(Duration::from_millis(3500)))
        .service(upstream(Script::new().chunk("data: a\n\n").hang()));
    let mut stream = TestStream::new(service.oneshot(get()).await.unwrap());
    stream.next_event().await;
    stream.assert_ends().await;
    assert_eq!(recorded.counter("sse_heartbeats_total", &[]), 3.0);
    assert_eq!(
        recorded.counter("sse_timeouts_total", &[("kind", "idle")]),
        1.0
    );

    let slow = service_fn(|_request: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let response = ResponseTimeoutLayer::new(Duration::from_secs(5))
        .layer_service(slow)
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        recorded.counter("sse_timeouts_total", &[("kind", "response")]),
        1.0
    );
}

#[tokio::test]
async fn rejections_replays_and_unknown_ids_are_counted() {
    let recorded = record();
    let strict = SseHeadersLayer::new()
        .strict_accept(true)
        .layer_service(upstream(Script::new()));
    let request = Request::get("/")
        .header(header::ACCEPT, "application/json")
        .body(())
        .unwrap();
    let response = strict.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
    assert_eq!(
        recorded.counter("sse_rejected_total", &[("reason", "not_acceptable")]),
        1.0
    );

    let events = "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n";
    let service = ReplayLayer::new().layer_service(upstream(Script::new().chunk(events)));
    let resume = |id: &'static str| {
        Request::get("/events")
            .header("last-event-id", id)
            .body(())
            .unwrap()
    };
    for request in [get(), resume("1"), resume("9")] {
        let body = service.clone().oneshot(request).await.unwrap().into_body();
        body.collect().await.unwrap();
    }
    assert_eq!(
        recorded.counter("sse_replay_requests_total", &[("resumed", "new")]),
        1.0
    );
    // The first stream ended and nothing recorded after it: a scripted upstream is not known to
    // resume, so the known id resumes partially.
    assert_eq!(
        recorded.counter("sse_replay_requests_total", &[("resumed", "partial")]),
        1.0
    );
    assert_eq!(
        recorded.counter("sse_replay_requests_total", &[("resumed", "earliest")]),
        1.0
    );
    // 2 after id 1, then 3 from the oldest.
    assert_eq!(recorded.counter("sse_replay_events_total", &[]), 5.0);
    assert_eq!(recorded.counter("sse_replay_unknown_ids_total", &[]), 1.0);
    assert_eq!(recorded.gauge("sse_replay_store_keys"), 1.0);
    assert_eq!(
        recorded.gauge("sse_replay_store_events"),
        3.0,
        "reported after the first write that retained events (one frame of three)"
    );
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test]
async fn fanout_subscriptions_clients_and_slow_clients_are_counted() {
    let recorded = record();
    let quiet = FanoutLayer::new()
        .linger(Duration::ZERO)
        .layer_service(upstream(Script::new().hang()));
    let first = quiet.clone().oneshot(get()).await.unwrap();
    let second = quiet.clone().oneshot(get()).await.unwrap();
    assert_eq!(recorded.gauge("sse_fanout_subscriptions"), 1.0);
    assert_eq!(recorded.gauge("sse_fanout_clients"), 2.0);
    drop((first, second));
    assert_eq!(recorded.gauge("sse_fanout_clients"), 0.0);
    eventually("the subscription closes after its zero linger", || {
        recorded.gauge("sse_fanout_subscriptions") == 0.0
    })
    .await;

    // A client that never reads, with a queue of one frame: the second frame cuts it off.
    let busy = FanoutLayer::new().queue_capacity(1).layer_service(upstream(
        Script::new()
            .chunk("data: 1\n\n")
            .chunk("data: 2\n\n")
            .chunk("data: 3\n\n")
            .hang(),
    ));
    let _slow = busy.oneshot(get()).await.unwrap();
    eventually("the slow client is cut", || {
        recorded.counter("sse_fanout_slow_clients_total", &[("policy", "disconnect")]) == 1.0
    })
    .await;
    assert_eq!(recorded.gauge("sse_fanout_clients"), 0.0);
    // Every upstream event is fanned out, whoever still reads it.
    eventually("three events fanned out", || {
        recorded.counter("sse_fanout_events_total", &[]) == 3.0
    })
    .await;
}

#[tokio::test]
async fn compression_counts_bytes_in_and_out() {
    let recorded = record();
    let events = "data: hello hello hello hello hello hello hello hello\n\n".repeat(20);
    let service =
        SseCompressionLayer::new().layer_service(upstream(Script::new().chunk(events.clone())));
    let request = Request::get("/")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(())
        .unwrap();
    service
        .oneshot(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let raw = recorded.counter("sse_compression_in_bytes_total", &[("encoding", "gzip")]);
    let encoded = recorded.counter("sse_compression_out_bytes_total", &[("encoding", "gzip")]);
    assert_eq!(raw, events.len() as f64);
    assert!(encoded > 0.0 && encoded < raw / 5.0, "{raw} -> {encoded}");
}

/// `layer_service`: a layer applied to a service, for brevity above.
trait LayerService<S>: tower::Layer<S> + Sized {
    fn layer_service(self, service: S) -> Self::Service {
        self.layer(service)
    }
}

impl<L: tower::Layer<S>, S> LayerService<S> for L {}

#[tokio::test]
async fn subscription_channels_refusals_and_closes_are_counted() {
    use http::Method;
    use tower_sse::subscriptions::Subscriptions;
    let metrics = record();
    let topics = service_fn(|_request: Request<Full<Bytes>>| async {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes>::new(1);
        tokio::spawn(async move {
            let _ = tx
                .send_data(Bytes::from_static(b"id: 1\ndata: a\n\n"))
                .await;
            std::future::pending::<()>().await;
        });
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        Ok::<_, Infallible>(response)
    });
    // This test plays the operator too: the layer serves the API here.
    let service = tower::Layer::layer(&Subscriptions::in_memory().layer().with_api(), topics);
    let call = |method: Method, uri: String, body: &'static str| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::from(body))
            .unwrap();
        service.clone().oneshot(request)
    };
    let created = call(Method::POST, "/topics/news/subscriptions".into(), "")
        .await
        .unwrap();
    let json = created.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let id = json["id"].as_str().unwrap().to_owned();

    let open = call(Method::GET, format!("/subscriptions/{id}/subscribe"), "")
        .await
        .unwrap();
    let mut open = Box::pin(open.into_body());
    open.frame().await.unwrap().unwrap();
    let _disposable = call(Method::GET, "/topics/news".into(), "").await.unwrap();
    let unknown = call(Method::GET, "/subscriptions/0000/subscribe".into(), "")
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let patch = r#"{"status":"suspended"}"#;
    call(Method::PATCH, format!("/subscriptions/{id}"), patch)
        .await
        .unwrap();
    assert!(open.frame().await.is_none());
    let refused = call(Method::GET, format!("/subscriptions/{id}/subscribe"), "")
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);

    let channels = "sse_subscription_channels_total";
    for (outcome, n) in [
        ("provisioned", 1.0),
        ("disposable", 1.0),
        ("unknown", 1.0),
        ("suspended", 1.0),
    ] {
        assert_eq!(
            metrics.counter(channels, &[("outcome", outcome)]),
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        metrics.counter("sse_subscription_closed_channels_total", &[]),
        1.0
    );
}

/// Serves `service` over HTTP/1.1 on a loopback socket, each connection on this thread (the
/// recorder is per thread), and fetches `/events` with a hyper client: the body read to its end.
async fn fetch_over_hyper<S, B>(service: S, after_first_frame: impl FnOnce()) -> Bytes
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let service = hyper_util::service::TowerToHyperService::new(service);
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(socket), service)
            .await;
    });
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/events")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let mut body = sender.send_request(request).await.unwrap().into_body();
    let mut got = Vec::new();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    got.extend_from_slice(&first);
    after_first_frame();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the server ends the stream")
        .unwrap()
        .to_bytes();
    got.extend_from_slice(&rest);
    Bytes::from(got)
}

#[tokio::test]
async fn streams_the_server_ends_over_hyper_count_as_ended_not_as_client_gone() {
    use tower_sse::lifetime::{LifetimeLayer, Shutdown};
    let recorded = record();
    let closed = |reason| recorded.counter("sse_streams_closed_total", &[("reason", reason)]);

    // Ended by the lifetime, with a final retry block: hyper sees `is_end_stream` after that
    // frame, stops polling and drops the body.
    let lifetime = ServiceBuilder::new()
        .layer(PassthroughLayer::new())
        .layer(
            LifetimeLayer::new()
                .max_lifetime(Duration::from_millis(100))
                .retry_on_end(Duration::from_secs(3)),
        )
        .service(upstream(Script::new().chunk("data: a\n\n").hang()));
    let body = fetch_over_hyper(lifetime, || {}).await;
    assert_eq!(body, "data: a\n\nretry: 3000\n\n");
    eventually("the stream is closed", || {
        recorded.gauge("sse_streams_open") == 0.0
    })
    .await;
    assert_eq!(closed("end"), 1.0);
    assert_eq!(closed("client_gone"), 0.0);

    // Ended by a shutdown, with and without a final retry block.
    for retry in [Some(Duration::from_secs(1)), None] {
        let shutdown = Shutdown::new();
        let mut layer = LifetimeLayer::new().shutdown(&shutdown);
        if let Some(retry) = retry {
            layer = layer.retry_on_end(retry);
        }
        let service = ServiceBuilder::new()
            .layer(PassthroughLayer::new())
            .layer(layer)
            .service(upstream(Script::new().chunk("data: a\n\n").hang()));
        let body = fetch_over_hyper(service, || shutdown.trigger()).await;
        let expected = if retry.is_some() {
            "data: a\n\nretry: 1000\n\n"
        } else {
            "data: a\n\n"
        };
        assert_eq!(body, expected);
        eventually("the stream is closed", || {
            recorded.gauge("sse_streams_open") == 0.0
        })
        .await;
    }
    assert_eq!(closed("end"), 3.0);
    assert_eq!(closed("client_gone"), 0.0);
    assert_eq!(
        recorded.counter("sse_timeouts_total", &[("kind", "shutdown")]),
        2.0
    );
}
