//! Heartbeats, timeouts, lifetime and shutdown together, in the recommended stack order.

use std::convert::Infallible;
use std::pin::pin;
use std::time::Duration;

use axum::response::sse::{Event as AxumEvent, Sse};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_stream::wrappers::IntervalStream;
use tokio_stream::StreamExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_sse::timeout::IdleTimeoutLayer;
use tower_sse::wire::EventReader;
use tower_sse::{HeartbeatLayer, LifetimeLayer, Shutdown};

const SECOND: Duration = Duration::from_secs(1);

type Feeds = mpsc::UnboundedReceiver<Sender<Bytes>>;
type Answer = std::future::Ready<Result<Response<Channel<Bytes>>, Infallible>>;

/// A service whose event-stream body the test feeds; the senders arrive on the receiver.
fn upstream() -> (
    Feeds,
    impl tower::Service<
            Request<()>,
            Response = Response<Channel<Bytes>>,
            Error = Infallible,
            Future = Answer,
        > + Clone,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let service = service_fn(move |_req: Request<()>| {
        let (sender, body) = Channel::new(8);
        let _ = tx.send(sender);
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(body)
            .unwrap();
        std::future::ready(Ok(response))
    });
    (rx, service)
}

/// Every data frame with the time it arrived (since `start`), until the body ends or `limit`.
async fn timeline<B>(body: B, start: Instant, limit: Duration) -> (Vec<(Duration, Bytes)>, bool)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut body = pin!(body);
    let mut frames = Vec::new();
    let deadline = start + limit;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    frames.push((start.elapsed(), data));
                }
            }
            Ok(None) => return (frames, true),
            Err(_) => return (frames, false),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_inside_heartbeat_sees_upstream_silence() {
    let (mut senders, inner) = upstream();
    let service = ServiceBuilder::new()
        .layer(HeartbeatLayer::new(15 * SECOND))
        .layer(IdleTimeoutLayer::new(60 * SECOND))
        .service(inner);
    let response = service.oneshot(Request::new(())).await.unwrap();
    let _tx = senders.recv().await.unwrap();
    let start = Instant::now();
    let (frames, ended) = timeline(response.into_body(), start, 600 * SECOND).await;
    assert!(ended, "the idle timeout must end the stream");
    let times: Vec<u64> = frames.iter().map(|(t, _)| t.as_secs()).collect();
    assert_eq!(times, [15, 30, 45], "heartbeats, then the end at 60 s");
    assert!(frames.iter().all(|(_, f)| f == ":\n\n"));
    assert_eq!(start.elapsed(), 60 * SECOND);
}

/// The wrong order, documented: an idle timeout outside the heartbeat layer takes heartbeats for
/// upstream activity and never fires.
#[tokio::test(start_paused = true)]
async fn idle_timeout_outside_heartbeat_never_fires() {
    let (mut senders, inner) = upstream();
    let service = ServiceBuilder::new()
        .layer(IdleTimeoutLayer::new(60 * SECOND))
        .layer(HeartbeatLayer::new(15 * SECOND))
        .service(inner);
    let response = service.oneshot(Request::new(())).await.unwrap();
    let _tx = senders.recv().await.unwrap();
    let (frames, ended) = timeline(response.into_body(), Instant::now(), 600 * SECOND).await;
    assert!(!ended);
    assert_eq!(frames.len(), 40);
}

#[tokio::test(start_paused = true)]
async fn upstream_traffic_resets_the_idle_timeout_but_heartbeats_do_not() {
    let (mut senders, inner) = upstream();
    let service = ServiceBuilder::new()
        .layer(HeartbeatLayer::new(10 * SECOND))
        .layer(IdleTimeoutLayer::new(25 * SECOND))
        .service(inner);
    let response = service.oneshot(Request::new(())).await.unwrap();
    let mut tx = senders.recv().await.unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(22 * SECOND).await;
        tx.send_data(Bytes::from_static(b"data: 1\n\n"))
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    let start = Instant::now();
    let (frames, ended) = timeline(response.into_body(), start, 600 * SECOND).await;
    assert!(ended);
    let times: Vec<u64> = frames.iter().map(|(t, _)| t.as_secs()).collect();
    // Heartbeats at 10 and 20 do not touch the idle clock; the event at 22 moves both clocks:
    // heartbeats at 32 and 42, the end 25 s after the event.
    assert_eq!(times, [10, 20, 22, 32, 42], "{frames:?}");
    assert_eq!(frames[2].1, "data: 1\n\n");
    assert_eq!(start.elapsed(), 47 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn max_lifetime_with_heartbeats_ends_at_a_boundary() {
    let (mut senders, inner) = upstream();
    let service = ServiceBuilder::new()
        .layer(HeartbeatLayer::new(5 * SECOND))
        .layer(
            LifetimeLayer::new()
                .max_lifetime(12 * SECOND)
                .retry_on_end(SECOND),
        )
        .service(inner);
    let response = service.oneshot(Request::new(())).await.unwrap();
    let mut tx = senders.recv().await.unwrap();
    tx.send_data(Bytes::from_static(b"data: a")).await.unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(14 * SECOND).await;
        tx.send_data(Bytes::from_static(b"\n\ndata: b\n\n"))
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    let (frames, ended) = timeline(response.into_body(), Instant::now(), 600 * SECOND).await;
    assert!(ended);
    let sent: Vec<&[u8]> = frames.iter().map(|(_, f)| &f[..]).collect();
    // No heartbeat inside the open event; the end waits for its blank line.
    assert_eq!(sent, [&b"data: a"[..], b"\n\n", b"retry: 1000\n\n"]);
    assert_eq!(frames[2].0, 14 * SECOND);
}

fn ticking_app(shutdown: &Shutdown) -> Router {
    async fn events() -> Sse<impl tokio_stream::Stream<Item = Result<AxumEvent, Infallible>>> {
        let mut n = 0u32;
        let ticks = IntervalStream::new(tokio::time::interval(Duration::from_millis(20)));
        Sse::new(ticks.map(move |_| {
            n += 1;
            Ok(AxumEvent::default().id(n.to_string()).data("tick"))
        }))
    }
    Router::new().route("/events", get(events)).layer(
        LifetimeLayer::new()
            .shutdown(shutdown)
            .retry_on_end(3 * SECOND),
    )
}

/// axum's graceful shutdown waits for every connection; open streams used to keep it waiting
/// forever (axum #2673). With the shutdown signal they end at a boundary and it returns.
#[tokio::test]
async fn axum_graceful_shutdown_returns_with_streams_open() {
    let shutdown = Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, ticking_app(&signal))
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
                signal.trigger();
            })
            .await
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut readers = Vec::new();
    for _ in 0..5 {
        let request = Request::get(format!("http://{addr}/events"))
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        let mut reader = EventReader::new(response.into_body());
        let first = reader.next_event().await.unwrap().unwrap();
        assert_eq!(first.data().as_deref(), Some("tick"));
        readers.push(reader);
    }

    stop_tx.send(()).unwrap();
    for mut reader in readers {
        let rest = timeout(10 * SECOND, async {
            let mut blocks = Vec::new();
            while let Some(block) = reader.next_event().await {
                blocks.push(block.unwrap());
            }
            blocks
        })
        .await
        .expect("each stream ends promptly");
        assert!(!reader.ended_mid_event(), "streams end at a boundary");
        let last = rest.last().expect("at least the retry hint");
        assert_eq!(last.retry(), Some(3 * SECOND));
    }
    timeout(10 * SECOND, server)
        .await
        .expect("graceful shutdown completes")
        .unwrap()
        .unwrap();
}
