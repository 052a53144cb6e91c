//! Client-chosen stream keys cannot grow the gateway without bound: many short connections on
//! distinct query strings, through the gateway binary over real loopback sockets, against a
//! small replay store budget and a small fan-out subscription cap.
//!
//! Build the binary first: `cargo build --all-features --example gateway`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tokio_stream::StreamExt;

mod support;

use support::gateway::Gateway;
use support::GUARD;

/// Upstream connections open now, the most open at once, and accepted in all.
#[derive(Debug, Default)]
struct Counts {
    open: AtomicUsize,
    most: AtomicUsize,
    accepted: AtomicUsize,
}

/// An upstream SSE server that counts its open connections. Every stream answers after `delay`,
/// sends two events at once, then a comment every 100 ms (so a write notices a closed
/// connection too).
async fn counting_upstream(delay: Duration) -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let shared = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            let open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
            shared.most.fetch_max(open, Ordering::SeqCst);
            let counts = shared.clone();
            let service =
                hyper::service::service_fn(move |_request: Request<Incoming>| async move {
                    sleep(delay).await;
                    let first = Bytes::from_static(b"id: 1\ndata: hello\n\nid: 2\ndata: again\n\n");
                    let comments = tokio_stream::wrappers::IntervalStream::new(
                        tokio::time::interval(Duration::from_millis(100)),
                    )
                    .map(|_| Bytes::from_static(b": hb\n\n"));
                    let frames = tokio_stream::once(first)
                        .chain(comments)
                        .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
                    let response = Response::builder()
                        .header(CONTENT_TYPE, "text/event-stream")
                        .body(StreamBody::new(frames))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                counts.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

/// A short connection: a raw HTTP/1.1 request, read until `until` shows up, then the socket is
/// dropped. Returns what was read.
async fn short_connection(gateway: SocketAddr, path: &str, headers: &str, until: &str) -> String {
    let read = async {
        let mut stream = TcpStream::connect(gateway).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: gateway\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(until) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {until:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    };
    timeout(GUARD, read)
        .await
        .expect("the stream answers in time")
}

/// The value of a gauge in the gateway's Prometheus text.
async fn gauge(gateway: SocketAddr, name: &str) -> f64 {
    let text = short_connection(gateway, "/metrics", "connection: close\r\n", name).await;
    // Read to the end of the line that names it.
    let text = if text.lines().any(|l| l.starts_with(&format!("{name} "))) {
        text
    } else {
        short_connection(
            gateway,
            "/metrics",
            "connection: close\r\n",
            &format!("{name} "),
        )
        .await
    };
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

#[tokio::test]
async fn distinct_keys_stay_within_the_subscription_cap_and_the_store_budget() {
    const CAP: usize = 8;
    const BUDGET: usize = 8 * 1024;
    const AT_ONCE: usize = 4;
    let (upstream, counts) = counting_upstream(Duration::ZERO).await;
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{upstream}"),
        "--fanout",
        "--fanout-max-subscriptions",
        &CAP.to_string(),
        "--linger",
        "2",
        "--replay",
        "100",
        "--replay-max-bytes",
        &BUDGET.to_string(),
        "--replay-max-keys",
        "1000",
        "--heartbeat",
        "0",
    ])
    .await;
    let addr = gateway.addr;

    // 200 short connections on distinct query strings, a few at a time: each reads its first
    // event and leaves, so its subscription would linger for 2 s.
    let started = Instant::now();
    for batch in 0..200 / AT_ONCE {
        let mut clients = tokio::task::JoinSet::new();
        for n in batch * AT_ONCE..(batch + 1) * AT_ONCE {
            clients.spawn(async move {
                short_connection(addr, &format!("/s?n={n}"), "", "data: hello").await
            });
        }
        while let Some(done) = clients.join_next().await {
            done.unwrap();
        }
    }
    let took = started.elapsed();
    let most = counts.most.load(Ordering::SeqCst);
    let accepted = counts.accepted.load(Ordering::SeqCst);
    eprintln!("200 connections in {took:?}: upstream accepted {accepted}, at most {most} open");
    assert!(accepted >= 200, "one upstream stream per key: {accepted}");
    // The hub holds at most CAP upstream responses. A subscription closed to make room lets
    // go of its response before the new one calls, but its socket closes a scheduler turn
    // later, so the upstream may see its FIN after the new connection: at most one such
    // crossing per request in flight. (Without the cap: one lingering connection per key.)
    assert!(
        most <= CAP + AT_ONCE,
        "{most} upstream connections open at once (cap {CAP}, {AT_ONCE} at a time)"
    );
    // Once the crossings are over, CAP at most.
    sleep(Duration::from_millis(300)).await;
    let open = counts.open.load(Ordering::SeqCst);
    assert!(open <= CAP, "{open} upstream connections open (cap {CAP})");
    assert!(gauge(addr, "sse_fanout_subscriptions").await <= CAP as f64);

    // The newest stream is still replayable; the store keeps few keys (the gauge is refreshed
    // at most once a second, on a recording).
    sleep(Duration::from_millis(1100)).await;
    let replayed = short_connection(addr, "/s?n=199", "last-event-id: 1\r\n", "data: again").await;
    assert!(
        replayed.contains("sse-resumed-from: last-event-id"),
        "{replayed}"
    );
    short_connection(addr, "/s?n=200", "", "data: again").await;
    let keys = gauge(addr, "sse_replay_store_keys").await;
    eprintln!("{keys} keys in the replay store");
    // A key with one event is counted for more than 512 bytes: at most 16 fit in 8 KiB.
    assert!(
        (1.0..=(BUDGET / 512) as f64).contains(&keys),
        "{keys} keys in the store"
    );

    // Once nobody reads them, the lingering subscriptions close.
    let deadline = Instant::now() + Duration::from_secs(8);
    while counts.open.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} upstream connections still open",
            counts.open.load(Ordering::SeqCst)
        );
        sleep(Duration::from_millis(100)).await;
    }
    assert!(counts.most.load(Ordering::SeqCst) <= CAP + AT_ONCE);
}

#[tokio::test]
async fn requests_that_leave_before_the_upstream_answers_leave_nothing_behind() {
    let (upstream, counts) = counting_upstream(Duration::from_millis(300)).await;
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{upstream}"),
        "--fanout",
        "--linger",
        "30",
        "--heartbeat",
        "0",
    ])
    .await;
    // 50 requests on distinct keys that give up after 100 ms (time for the gateway to call the
    // upstream), long before the upstream answers.
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..50 {
        let addr = gateway.addr;
        clients.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = format!("GET /s?n={n} HTTP/1.1\r\nhost: gateway\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            sleep(Duration::from_millis(100)).await;
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let accepted = counts.accepted.load(Ordering::SeqCst);
    assert!(accepted > 0, "the upstream was called");
    // Nobody got a response, so nobody can come back for it: no subscription lingers for 30 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts.open.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} of {accepted} upstream connections still open",
            counts.open.load(Ordering::SeqCst)
        );
        sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{accepted} upstream calls, all closed");
}
