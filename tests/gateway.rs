//! End to end: the gateway example as a user runs it, over real loopback sockets.
//!
//! `cargo test` builds the examples before it runs tests, so the binary is next to this test's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tower_sse::wire::{Event, EventReader};

mod support;

use support::gateway::Gateway;
use support::GUARD;

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    timeout(GUARD, client().request(request.body(Empty::new()).unwrap()))
        .await
        .unwrap()
        .unwrap()
}

async fn next(reader: &mut EventReader<Incoming>) -> Event {
    timeout(GUARD, reader.next_event())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("a valid event")
}

#[tokio::test]
async fn demo_stream_page_and_resume() {
    let gateway = Gateway::start(&["--demo-interval", "20"]).await;

    let response = get(&gateway.url("/events"), &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers[CONTENT_TYPE], "text/event-stream; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers[CONNECTION], "keep-alive");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(headers.get(CONTENT_LENGTH).is_none());
    let mut reader = EventReader::new(response.into_body());
    let first = next(&mut reader).await;
    assert_eq!(first.comments(), ["ok"], "the initial comment comes first");
    for id in 1..=3 {
        let event = next(&mut reader).await;
        assert_eq!(event.id(), Some(id.to_string().as_bytes()));
        assert!(event.data().unwrap().starts_with(&format!("{{\"n\":{id},")));
    }

    let response = get(&gateway.url("/events"), &[("last-event-id", "41")]).await;
    let mut reader = EventReader::new(response.into_body());
    next(&mut reader).await;
    assert_eq!(next(&mut reader).await.id(), Some(&b"42"[..]));

    let page = get(&gateway.url("/"), &[]).await;
    assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    let html = page.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&html);
    assert!(html.contains("new EventSource(streamPath())") && html.contains("\"/events\""));

    let missing = get(&gateway.url("/nope"), &[]).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.headers().get("x-accel-buffering").is_none());
}

/// An upstream SSE server whose events the test sends one by one.
async fn upstream() -> (SocketAddr, mpsc::Sender<mpsc::Receiver<Bytes>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Each accepted stream request takes the next event feed the test provides.
    let (feeds_tx, feeds_rx) = mpsc::channel::<mpsc::Receiver<Bytes>>(4);
    let feeds = std::sync::Arc::new(tokio::sync::Mutex::new(feeds_rx));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let feeds = feeds.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let feeds = feeds.clone();
                async move {
                    type Body = http_body_util::Either<
                        StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>,
                        Full<Bytes>,
                    >;
                    if request.uri().path() == "/json" {
                        let response: Response<Body> = Response::builder()
                            .header(CONTENT_TYPE, "application/json")
                            .header(CONTENT_LENGTH, "11")
                            .body(http_body_util::Either::Right(Full::from("{\"ok\":true}")))
                            .unwrap();
                        return Ok::<_, Infallible>(response);
                    }
                    let mut feed = feeds.lock().await.recv().await.unwrap();
                    let (tx, rx) = mpsc::channel(1);
                    tokio::spawn(async move {
                        while let Some(bytes) = feed.recv().await {
                            if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                                return;
                            }
                        }
                    });
                    let body = StreamBody::new(ReceiverStream::new(rx));
                    Ok(Response::builder()
                        .header(CONTENT_TYPE, "text/event-stream")
                        .body(http_body_util::Either::Left(body))
                        .unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, feeds_tx)
}

#[tokio::test]
async fn proxies_an_upstream_unbuffered() {
    proxies_unbuffered_with(&["--stream-reader", "direct"]).await;
}

#[tokio::test]
async fn proxies_an_upstream_unbuffered_through_hyper_s_client() {
    proxies_unbuffered_with(&["--stream-reader", "hyper"]).await;
}

#[tokio::test]
async fn proxies_an_upstream_unbuffered_with_writev() {
    proxies_unbuffered_with(&["--http1-writev", "--http1-hyper"]).await;
}

#[tokio::test]
async fn proxies_an_upstream_unbuffered_on_one_multi_threaded_runtime() {
    proxies_unbuffered_with(&["--workers", "0"]).await;
}

#[tokio::test]
async fn proxies_an_upstream_unbuffered_through_hyper_s_server() {
    proxies_unbuffered_with(&["--http1-hyper"]).await;
}

async fn proxies_unbuffered_with(flags: &[&str]) {
    let (upstream_addr, feeds) = upstream().await;
    let upstream = format!("http://{upstream_addr}");
    let mut args = vec!["--upstream", &upstream];
    args.extend_from_slice(flags);
    let gateway = Gateway::start(&args).await;

    let (events, feed) = mpsc::channel(4);
    feeds.send(feed).await.unwrap();
    let response = get(&gateway.url("/stream"), &[("accept", "text/event-stream")]).await;
    assert_eq!(
        response.headers()[CONTENT_TYPE],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut reader = EventReader::new(response.into_body());
    // Headers and the first byte arrive before the upstream sent anything.
    assert_eq!(next(&mut reader).await.comments(), ["ok"]);

    for id in 1..=3 {
        // Each event reaches the client while the upstream still holds back the next one.
        let event = Event::builder()
            .id(id.to_string())
            .data("x")
            .build()
            .unwrap();
        events.send(event.encode()).await.unwrap();
        assert_eq!(next(&mut reader).await, event);
    }
    // An event split mid-line reaches the client whole once its end arrives.
    events.send(Bytes::from_static(b"data: spl")).await.unwrap();
    events.send(Bytes::from_static(b"it\n\n")).await.unwrap();
    assert_eq!(next(&mut reader).await.data().as_deref(), Some("split"));

    let json = get(&gateway.url("/json"), &[]).await;
    assert_eq!(json.headers()[CONTENT_LENGTH], "11");
    assert!(json.headers().get("x-accel-buffering").is_none());
    let body = json.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"ok\":true}");
}

/// Reads from `stream` until `buf` holds `needle`, within ten seconds; the bytes up to its end.
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    needle: &[u8],
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let found = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(at) = buf.windows(needle.len()).position(|w| w == needle) {
                return buf.drain(..at + needle.len()).collect::<Vec<u8>>();
            }
            let mut more = [0; 4096];
            match stream.read(&mut more).await {
                Ok(0) | Err(_) => panic!("closed before {:?}", String::from_utf8_lossy(needle)),
                Ok(n) => buf.extend_from_slice(&more[..n]),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "no {:?} in {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(buf)
        )
    })
}

/// The gateway writes an HTTP/1 event stream to the socket itself (unless `--http1-hyper`):
/// the connection stays the client's for the requests after it, pipelined or not, whoever
/// answers them.
#[tokio::test]
async fn an_event_stream_connection_serves_pipelined_requests_after_the_stream() {
    use tokio::io::AsyncWriteExt;
    let (upstream_addr, feeds) = upstream().await;
    let gateway = Gateway::start(&["--upstream", &format!("http://{upstream_addr}")]).await;
    let (events, feed) = mpsc::channel(4);
    feeds.send(feed).await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    // The stream and, in the same write, the request after it.
    stream
        .write_all(
            b"GET /stream HTTP/1.1\r\nhost: gateway\r\naccept: text/event-stream\r\n\r\n\
              GET /json HTTP/1.1\r\nhost: gateway\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = String::from_utf8(read_until(&mut stream, &mut buf, b"\r\n\r\n").await).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for field in [
        "content-type: text/event-stream; charset=utf-8\r\n",
        "transfer-encoding: chunked\r\n",
        "x-accel-buffering: no\r\n",
        "date: ",
    ] {
        assert!(head.contains(field), "{field:?} in {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    // Each event its own chunk, as it comes.
    assert_eq!(
        read_until(&mut stream, &mut buf, b":ok\n\n\r\n").await,
        b"5\r\n:ok\n\n\r\n".as_slice()
    );
    events
        .send(Bytes::from_static(b"id: 1\ndata: x\n\n"))
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut stream, &mut buf, b"\n\n\r\n").await,
        b"F\r\nid: 1\ndata: x\n\n\r\n".as_slice()
    );
    // The upstream ends the stream: the last chunk, then the pipelined request's answer,
    // written by hyper.
    drop(events);
    read_until(&mut stream, &mut buf, b"0\r\n\r\n").await;
    let json =
        String::from_utf8(read_until(&mut stream, &mut buf, b"{\"ok\":true}").await).unwrap();
    assert!(json.starts_with("HTTP/1.1 200 OK\r\n"), "{json}");
    assert!(json.contains("content-length: 11\r\n"), "{json}");
    // And a request after that, on the same connection.
    stream
        .write_all(b"GET /json HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut stream, &mut buf, b"{\"ok\":true}").await;
    // HTTP/1.0 is hyper's from the start; it closes the connection after the response.
    let mut old = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    old.write_all(b"GET /json HTTP/1.0\r\n\r\n").await.unwrap();
    let mut all = Vec::new();
    let response = read_until(&mut old, &mut all, b"{\"ok\":true}").await;
    assert!(
        response.starts_with(b"HTTP/1.0 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&response)
    );
}

/// A client that closes its connection mid-stream frees the stream: the gateway closes the
/// upstream's, which stops taking events.
#[tokio::test]
async fn a_client_leaving_an_event_stream_frees_its_upstream() {
    use tokio::io::AsyncWriteExt;
    let (upstream_addr, feeds) = upstream().await;
    let gateway = Gateway::start(&["--upstream", &format!("http://{upstream_addr}")]).await;
    let (events, feed) = mpsc::channel(1);
    feeds.send(feed).await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nhost: gateway\r\naccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    read_until(&mut stream, &mut buf, b":ok\n\n\r\n").await;
    events
        .send(Bytes::from_static(b"data: x\n\n"))
        .await
        .unwrap();
    read_until(&mut stream, &mut buf, b"data: x\n\n\r\n").await;
    drop(stream);
    // The upstream's body goes with its connection; its feed then refuses events.
    timeout(Duration::from_secs(10), async {
        while events
            .send(Bytes::from_static(b"data: y\n\n"))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the upstream stream outlived its client");
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let gateway = Gateway::start(&["--upstream", &format!("http://{addr}")]).await;
    let response = get(&gateway.url("/events"), &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

/// Ctrl-C, as a user stops the gateway.
#[cfg(unix)]
fn interrupt(gateway: &Gateway) {
    let pid = gateway.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[cfg(unix)]
#[tokio::test]
async fn ctrl_c_ends_streams_at_a_boundary_and_stops_the_gateway() {
    let mut gateway = Gateway::start(&["--demo-interval", "20", "--retry", "1500"]).await;
    let response = get(&gateway.url("/events"), &[]).await;
    let mut reader = EventReader::new(response.into_body());
    next(&mut reader).await;
    interrupt(&gateway);
    ends_at_a_boundary_with_retry(reader, Duration::from_millis(1500)).await;
    let exit = timeout(GUARD, gateway.child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Reads `reader` to its end: a clean end at an event boundary, a final `retry:` of `retry`.
#[cfg(unix)]
async fn ends_at_a_boundary_with_retry(mut reader: EventReader<Incoming>, retry: Duration) {
    let mut last = None;
    while let Some(block) = timeout(GUARD, reader.next_event()).await.unwrap() {
        last = Some(block.unwrap());
    }
    assert!(!reader.ended_mid_event());
    assert_eq!(last.unwrap().retry(), Some(retry));
}

/// `--workers 2`: two single-threaded runtimes, each with its own listener on one address, serve
/// streams side by side; Ctrl-C ends the streams of both at a boundary and stops the gateway.
#[cfg(unix)]
#[tokio::test]
async fn workers_share_the_address_and_shut_down_together() {
    let mut gateway =
        Gateway::start(&["--workers", "2", "--demo-interval", "20", "--retry", "1500"]).await;
    let mut readers = Vec::new();
    for _ in 0..8 {
        let response = get(&gateway.url("/events"), &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut reader = EventReader::new(response.into_body());
        assert_eq!(next(&mut reader).await.comments(), ["ok"]);
        assert_eq!(
            next(&mut reader).await.retry(),
            Some(Duration::from_millis(1500))
        );
        assert!(next(&mut reader).await.id().is_some());
        readers.push(reader);
    }
    interrupt(&gateway);
    for reader in readers {
        ends_at_a_boundary_with_retry(reader, Duration::from_millis(1500)).await;
    }
    let exit = timeout(GUARD, gateway.child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// `--sched-slice` asks Linux (6.12 and later) to run every thread of the gateway in short CPU
/// slices: 100 µs by default, the kernel's own with 0. What the gateway says at start is what
/// its threads get; where the kernel has no custom slices it says so, and serves all the same.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serving_threads_run_in_the_cpu_slice_asked_for() {
    /// A thread's slice in nanoseconds, from its scheduler statistics (Linux 6.6 and later).
    fn slice_of(sched: &str) -> Option<u64> {
        let line = sched.lines().find(|line| line.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let custom_slices = (numbers.next().unwrap(), numbers.next().unwrap()) >= (6, 12);
    let kernel_default =
        slice_of(&std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default());
    let cases: [(&[&str], u64); 3] = [
        (&["--workers", "2"], 100),
        (&["--workers", "2", "--sched-slice", "250"], 250),
        (&["--workers", "0", "--sched-slice", "0"], 0),
    ];
    for (args, asked) in cases {
        let (gateway, mut lines) = gateway_with_limits(":", args).await;
        let mut said = None;
        loop {
            let line = timeout(GUARD, lines.recv()).await.unwrap().unwrap();
            if line.contains("CPU slice") {
                said = Some(line.clone());
            }
            if line == "Ctrl-C to stop." {
                break;
            }
        }
        let response = get(&gateway.url("/events"), &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut reader = EventReader::new(response.into_body());
        assert_eq!(next(&mut reader).await.comments(), ["ok"]);

        let pid = gateway.child.id().unwrap();
        let mut threads = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap();
            let sched = std::fs::read_to_string(task.join("sched")).unwrap_or_default();
            threads.push((name.trim().to_owned(), slice_of(&sched)));
        }
        let workers = threads
            .iter()
            .filter(|(name, _)| name.starts_with("gateway-worker"))
            .count();
        assert_eq!(workers, if args[1] == "2" { 2 } else { 0 }, "{threads:?}");

        let Some(kernel_default) = kernel_default else {
            continue; // No slices in the scheduler statistics: nothing to compare.
        };
        let applied = format!("CPU slice of serving threads: {asked} µs");
        let got = match &said {
            None => {
                assert_eq!(asked, 0, "nothing said about the slice asked for");
                kernel_default
            }
            Some(line) if line.ends_with(&applied) => asked * 1_000,
            // Only a refused request leaves a kernel with custom slices at its own.
            Some(line) => {
                assert!(!custom_slices || line.contains("not requested"), "{line}");
                kernel_default
            }
        };
        for (name, slice) in &threads {
            assert_eq!(*slice, Some(got), "{name} with {args:?}: {said:?}");
        }
    }
}

#[tokio::test]
async fn heartbeats_and_retry_reach_the_client_between_events() {
    let gateway = Gateway::start(&[
        "--demo-interval",
        "60000",
        "--heartbeat",
        "0.05",
        "--retry",
        "2500",
        "--initial-comment",
        "hello",
    ])
    .await;
    let response = get(&gateway.url("/events"), &[]).await;
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(next(&mut reader).await.comments(), ["hello"]);
    assert_eq!(
        next(&mut reader).await.retry(),
        Some(Duration::from_millis(2500))
    );
    assert_eq!(next(&mut reader).await.id(), Some(&b"1"[..]));
    // The next event is a minute away: heartbeats keep the connection busy meanwhile.
    for _ in 0..3 {
        let heartbeat = next(&mut reader).await;
        assert_eq!(heartbeat.comments(), [""]);
        assert!(!heartbeat.is_message());
    }
}

#[tokio::test]
async fn slow_upstream_headers_get_a_504() {
    // An upstream that accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{addr}"),
        "--response-timeout",
        "0.2",
    ])
    .await;
    let response = get(&gateway.url("/events"), &[]).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    held.abort();
}

#[tokio::test]
async fn idle_upstream_ends_the_stream_despite_heartbeats() {
    let (upstream_addr, feeds) = upstream().await;
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{upstream_addr}"),
        "--heartbeat",
        "0.05",
        "--idle-timeout",
        "0.5",
    ])
    .await;
    let (events, feed) = mpsc::channel(4);
    feeds.send(feed).await.unwrap();
    let response = get(&gateway.url("/stream"), &[]).await;
    let mut reader = EventReader::new(response.into_body());
    events
        .send(Bytes::from_static(b"id: 7\ndata: x\n\n"))
        .await
        .unwrap();
    let mut heartbeats = 0;
    while let Some(block) = timeout(GUARD, reader.next_event()).await.unwrap() {
        if block.unwrap().comments() == [""] {
            heartbeats += 1;
        }
    }
    assert!(
        heartbeats >= 3,
        "{heartbeats} heartbeats before the idle end"
    );
    assert_eq!(reader.parser().last_event_id(), b"7");
}

/// A live upstream with no history: every event goes to the streams open when it is sent.
#[derive(Clone, Default)]
struct Broadcast {
    feeds: std::sync::Arc<std::sync::Mutex<Vec<mpsc::UnboundedSender<Bytes>>>>,
}

impl Broadcast {
    async fn serve() -> (SocketAddr, Self) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broadcast = Self::default();
        let feeds = broadcast.feeds.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let feeds = feeds.clone();
                let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
                    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                    feeds.lock().unwrap().push(tx);
                    let frames = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
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
        (addr, broadcast)
    }

    fn send(&self, id: &str) {
        let event = Event::builder()
            .id(id)
            .data(format!("event {id}"))
            .build()
            .unwrap();
        let bytes = event.encode();
        self.feeds
            .lock()
            .unwrap()
            .retain(|feed| feed.send(bytes.clone()).is_ok());
    }

    /// Waits until `n` upstream streams are open.
    async fn wait_for(&self, n: usize) {
        timeout(GUARD, async {
            while self.feeds.lock().unwrap().len() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("upstream connections");
    }
}

/// Reads message events until `n` arrived; returns their ids.
async fn read_ids(reader: &mut EventReader<Incoming>, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let event = next(reader).await;
        if event.is_message() {
            ids.push(String::from_utf8_lossy(event.id().unwrap()).into_owned());
        }
    }
    ids
}

#[tokio::test]
async fn replay_resumes_a_reconnecting_client_without_gap_or_duplicate() {
    let (upstream_addr, upstream) = Broadcast::serve().await;
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{upstream_addr}"),
        "--replay",
        "100",
        "--heartbeat",
        "0",
    ])
    .await;
    let url = gateway.url("/live?room=7");

    // Another client keeps the stream recording throughout.
    let recorder = get(&url, &[]).await;
    let mut recorder = EventReader::new(recorder.into_body());
    let client = get(&url, &[]).await;
    let mut client = EventReader::new(client.into_body());
    upstream.wait_for(2).await;
    let ids: Vec<String> = (1..=5).map(|n| n.to_string()).collect();
    for id in &ids {
        upstream.send(id);
    }
    assert_eq!(read_ids(&mut client, 5).await, ids);
    assert_eq!(read_ids(&mut recorder, 5).await, ids);
    drop(client);

    // Reconnect having seen only up to 3: 4 and 5 from history, then live 6 and 7.
    let resumed = get(&url, &[("last-event-id", "3")]).await;
    assert_eq!(resumed.headers()["sse-resumed-from"], "last-event-id");
    let mut resumed = EventReader::new(resumed.into_body());
    assert_eq!(read_ids(&mut resumed, 2).await, ["4", "5"]);
    upstream.wait_for(2).await;
    upstream.send("6");
    upstream.send("7");
    assert_eq!(read_ids(&mut resumed, 2).await, ["6", "7"]);
    assert_eq!(read_ids(&mut recorder, 2).await, ["6", "7"]);

    // The id in the query string (EventSource polyfills, Mercure) works the same.
    let by_query = get(&gateway.url("/live?room=7&lastEventId=5"), &[]).await;
    assert_eq!(by_query.headers()["sse-resumed-from"], "last-event-id");
    let mut by_query = EventReader::new(by_query.into_body());
    assert_eq!(read_ids(&mut by_query, 2).await, ["6", "7"]);

    // A non-ASCII id round-trips through Last-Event-ID as raw bytes.
    upstream.send("\u{2026}8");
    assert_eq!(read_ids(&mut recorder, 1).await, ["\u{2026}8"]);
    upstream.send("9");
    assert_eq!(read_ids(&mut recorder, 1).await, ["9"]);
    let non_ascii = http::HeaderValue::from_bytes("\u{2026}8".as_bytes()).unwrap();
    let mut request = Request::get(&url);
    request = request.header("last-event-id", non_ascii);
    let response = timeout(GUARD, client_request(request)).await.unwrap();
    assert_eq!(response.headers()["sse-resumed-from"], "last-event-id");
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(read_ids(&mut reader, 1).await, ["9"]);

    // An unknown (expired) id: the default policy replays from the oldest retained.
    let expired = get(&url, &[("last-event-id", "gone")]).await;
    assert_eq!(expired.headers()["sse-resumed-from"], "earliest");
    let mut expired = EventReader::new(expired.into_body());
    // The page learns it too: the gateway's history-lost event comes first.
    let lost = loop {
        let event = next(&mut expired).await;
        if event.is_message() {
            break event;
        }
    };
    assert_eq!(lost.event_type(), Some(&b"history-lost"[..]));
    assert_eq!(lost.data().as_deref(), Some("earliest"));
    assert_eq!(read_ids(&mut expired, 3).await, ["1", "2", "3"]);
}

async fn client_request(request: http::request::Builder) -> Response<Incoming> {
    client()
        .request(request.body(Empty::new()).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn comment_metadata_shows_raw_readers_what_event_source_ignores() {
    let plain = Gateway::start(&["--demo-interval", "20", "--initial-comment", "x"]).await;
    let framed = Gateway::start(&[
        "--demo-interval",
        "20",
        "--initial-comment",
        "x",
        "--headers-as-comment",
        "x-demo-stream,set-cookie",
        "--metadata-as-comment",
    ])
    .await;
    let raw = |gateway: &Gateway| {
        let url = gateway.url("/events");
        async move {
            let response = get(&url, &[]).await;
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            // Enough for the header block and three events.
            while bytes.windows(4).filter(|w| w == b"id: ").count() < 3 {
                let frame = timeout(GUARD, body.frame())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            bytes
        }
    };
    let plain_bytes = raw(&plain).await;
    let framed_bytes = raw(&framed).await;
    let framed_text = String::from_utf8_lossy(&framed_bytes);
    assert!(
        framed_text.contains(":x-demo-stream=ticks\n"),
        "{framed_text}"
    );
    assert!(
        framed_text.contains(":source=demo\nid: 1\n"),
        "{framed_text}"
    );
    assert!(!framed_text.contains("meta-source"));
    assert!(String::from_utf8_lossy(&plain_bytes).contains("meta-source: demo"));

    // What EventSource sees is the same either way.
    let messages = |bytes: &[u8]| {
        let mut parser = tower_sse::wire::Parser::new();
        parser.push(Bytes::copy_from_slice(bytes));
        let mut seen = Vec::new();
        while let Some(Ok(event)) = parser.next_event() {
            if event.is_message() {
                let data = event.data().unwrap().into_owned();
                // The demo's data holds the time; compare ids and the shape only.
                seen.push((event.id().map(<[u8]>::to_vec), data.starts_with("{\"n\":")));
            }
        }
        seen
    };
    assert_eq!(messages(&plain_bytes)[..3], messages(&framed_bytes)[..3]);
}

/// curl decodes the compressed stream event by event (gzip, br and zstd builds of curl).
#[tokio::test]
async fn curl_decodes_compressed_streams_event_by_event() {
    let Ok(version) = std::process::Command::new("curl").arg("--version").output() else {
        assert!(std::env::var_os("CI").is_none(), "curl is missing under CI");
        eprintln!("skipped: curl is not installed");
        return;
    };
    let features = String::from_utf8_lossy(&version.stdout).to_lowercase();
    let gateway = Gateway::start(&["--demo-interval", "100", "--compression"]).await;
    for encoding in ["gzip", "deflate", "br", "zstd"] {
        if encoding != "deflate" && !features.contains(&encoding.replace("br", "brotli")) {
            continue;
        }
        let mut curl = Command::new("curl")
            .args(["-sN", "--max-time", "10", "-H"])
            .arg(format!("accept-encoding: {encoding}"))
            .args(["--compressed", "-D", "-", &gateway.url("/events")])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
        let mut headers = Vec::new();
        let mut ids = Vec::new();
        // Three events arrive while the stream is still open: decoded one by one.
        while ids.len() < 3 {
            let line = timeout(GUARD, lines.next_line())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(id) = line.strip_prefix("id: ") {
                ids.push(id.to_owned());
            } else if ids.is_empty() {
                headers.push(line.to_lowercase());
            }
        }
        assert!(
            headers
                .iter()
                .any(|h| h.trim() == format!("content-encoding: {encoding}")),
            "{encoding}: {headers:?}"
        );
        assert_eq!(ids, ["1", "2", "3"], "{encoding}");
        curl.kill().await.unwrap();
    }
}

#[tokio::test]
async fn fanout_shares_one_upstream_stream_and_replays_from_it() {
    let (upstream_addr, upstream) = Broadcast::serve().await;
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{upstream_addr}"),
        "--fanout",
        "--linger",
        "30",
        "--replay",
        "100",
        "--heartbeat",
        "0",
    ])
    .await;
    let url = gateway.url("/live");
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(EventReader::new(get(&url, &[]).await.into_body()));
    }
    upstream.wait_for(1).await;
    for id in ["1", "2", "3"] {
        upstream.send(id);
    }
    for reader in &mut readers {
        assert_eq!(read_ids(reader, 3).await, ["1", "2", "3"]);
    }
    assert_eq!(
        upstream.feeds.lock().unwrap().len(),
        1,
        "one upstream stream"
    );
    // Everyone leaves; the hub lingers and records; a client comes back with its last id.
    drop(readers);
    upstream.send("4");
    upstream.send("5");
    let resumed = get(&url, &[("last-event-id", "3")]).await;
    assert_eq!(resumed.headers()["sse-resumed-from"], "last-event-id");
    let mut resumed = EventReader::new(resumed.into_body());
    upstream.send("6");
    assert_eq!(read_ids(&mut resumed, 3).await, ["4", "5", "6"]);
    assert_eq!(upstream.feeds.lock().unwrap().len(), 1);
}

/// A Prometheus text line: `name{label="value",...} number`, or a `#` comment.
fn is_prometheus_line(line: &str) -> bool {
    if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
        return true;
    }
    let (series, value) = match line.rsplit_once(' ') {
        Some(parts) => parts,
        None => return false,
    };
    let number = value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value);
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')),
        None => (series, Some("")),
    };
    let name_ok = !name.is_empty()
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    let labels_ok = labels.is_some_and(|labels| {
        labels.is_empty()
            || labels.split(',').all(|pair| {
                pair.split_once('=').is_some_and(|(k, v)| {
                    !k.is_empty() && v.len() >= 2 && v.starts_with('"') && v.ends_with('"')
                })
            })
    });
    number && name_ok && labels_ok
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_status_streams_them() {
    let gateway = Gateway::start(&["--demo-interval", "20", "--replay", "10", "--fanout"]).await;
    let events = get(&gateway.url("/events"), &[]).await;
    let mut reader = EventReader::new(events.into_body());
    for _ in 0..3 {
        next(&mut reader).await;
    }
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    // A stream's frame counts reach the recorder at most a second late (and at once for its
    // first frame): the stream goes on, so they come.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let response = get(&gateway.url("/metrics"), &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let text = String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        if value(&text, "sse_frames_sent_total") >= 3.0 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        next(&mut reader).await;
    };
    let bad: Vec<&str> = text.lines().filter(|l| !is_prometheus_line(l)).collect();
    assert!(bad.is_empty(), "not Prometheus text: {bad:?}\n{text}");
    let value = |name: &str| value(&text, name);
    assert!(value("sse_streams_opened_total") >= 1.0);
    assert!(value("sse_frames_sent_total") >= 3.0);
    assert_eq!(value("sse_fanout_subscriptions"), 1.0);
    assert!(text.contains("sse_replay_requests_total{resumed=\"new\"}"));

    // /status is an event stream of the same numbers.
    let status = get(&gateway.url("/status"), &[]).await;
    assert_eq!(
        status.headers()[CONTENT_TYPE],
        "text/event-stream; charset=utf-8"
    );
    let mut status = EventReader::new(status.into_body());
    let event = loop {
        let event = next(&mut status).await;
        if event.is_message() {
            break event;
        }
    };
    assert_eq!(event.event_type(), Some(&b"status"[..]));
    let data: serde_json::Value = serde_json::from_str(&event.data().unwrap()).unwrap();
    assert!(data["open_streams"].as_f64().unwrap() >= 1.0, "{data}");
}

/// The gateway's resident memory, in KiB.
fn rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 100 clients that stop reading while a fast stream runs: the gateway buffers nothing for them
/// beyond the sockets' own buffers, and a reading client keeps going. Measured by progress (events
/// read), not by the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_on_a_fast_stream_cost_bounded_memory() {
    for fanout in [false, true] {
        let mut args = vec![
            "--demo-rate",
            "5000",
            "--demo-size",
            "256",
            "--heartbeat",
            "1",
        ];
        if fanout {
            args.extend(["--fanout", "--replay", "1000"]);
        }
        let gateway = Gateway::start(&args).await;
        let pid = gateway.child.id().unwrap();
        let reader = get(&gateway.url("/events"), &[]).await;
        let mut reader = EventReader::new(reader.into_body());
        for _ in 0..100 {
            next(&mut reader).await;
        }
        let baseline = rss_kib(pid);
        let mut stalled = Vec::new();
        for _ in 0..100 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(16 * 1024).unwrap();
            let mut stream = socket.connect(gateway.addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(
                &mut stream,
                b"GET /events HTTP/1.1\r\nhost: gateway\r\n\r\n",
            )
            .await
            .unwrap();
            stalled.push(stream);
        }
        let mut samples = Vec::new();
        for _ in 0..20 {
            for _ in 0..2_000 {
                next(&mut reader).await;
            }
            samples.push(rss_kib(pid) - baseline);
        }
        let peak = *samples.iter().max().unwrap();
        eprintln!(
            "100 stalled clients (fan-out: {fanout}): RSS over baseline {baseline} KiB, sampled \
             every 2,000 events read: {samples:?} KiB; peak {peak} KiB, {} KiB per stalled client",
            peak / 100
        );
        // Debug builds hold about 450 KiB per stalled client here (release: about 95 KiB); the
        // bound leaves room for machines with other socket settings.
        assert!(peak < 128 * 1024, "bounded: {samples:?}");
        if fanout {
            // The hub cut every stalled client off: their queues are gone.
            let metrics = get(&gateway.url("/metrics"), &[]).await;
            let text = metrics.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&text);
            assert!(
                text.contains("sse_fanout_slow_clients_total{policy=\"disconnect\"} 100"),
                "{text}"
            );
        }
        drop(stalled);
    }
}

/// A request with a JSON body; the status and the parsed answer (Null when empty).
async fn json_call(method: http::Method, url: &str, body: &str) -> (StatusCode, serde_json::Value) {
    json_call_as(None, method, url, body).await
}

/// [`json_call`] with `Authorization: Bearer <token>` when there is a token.
async fn json_call_as(
    token: Option<&str>,
    method: http::Method,
    url: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = timeout(GUARD, client.request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// An admin token for the tests (`--admin-token`).
const TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test]
async fn subscriptions_resume_from_their_cursor_and_can_be_suspended() {
    use http::Method;
    let gateway = Gateway::start(&[
        "--subscriptions",
        "--admin-token",
        TOKEN,
        "--replay",
        "100",
        "--demo-interval",
        "20",
    ])
    .await;
    let json_call = |method, url: String, body| async move {
        json_call_as(Some(TOKEN), method, &url, body).await
    };
    let (status, created) =
        json_call(Method::POST, gateway.url("/topics/news/subscriptions"), "").await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap().to_owned();
    let stream = gateway.url(created["subscribe"].as_str().unwrap());
    let one = gateway.url(&format!("/subscriptions/{id}"));

    let response = get(&stream, &[]).await;
    assert_eq!(response.headers()["sse-subscription"], id.as_str());
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(read_ids(&mut reader, 3).await, ["1", "2", "3"]);
    drop(reader);
    // The cursor is where the reader left; a new reader without an id starts after it.
    let cursor = timeout(GUARD, async {
        loop {
            let (_, got) = json_call(Method::GET, one.clone(), "").await;
            if let Some(cursor) = got["lastEventId"].as_str() {
                if cursor.parse::<u32>().unwrap() >= 3 {
                    return cursor.parse::<u32>().unwrap();
                }
            }
        }
    })
    .await
    .unwrap();
    let mut reader = EventReader::new(get(&stream, &[]).await.into_body());
    assert_eq!(read_ids(&mut reader, 1).await, [(cursor + 1).to_string()]);

    let (status, _) = json_call(Method::PATCH, one.clone(), r#"{"status":"suspended"}"#).await;
    assert_eq!(status, StatusCode::OK);
    while timeout(GUARD, reader.next_event()).await.unwrap().is_some() {}
    assert_eq!(get(&stream, &[]).await.status(), StatusCode::CONFLICT);
    let (status, _) = json_call(Method::DELETE, one.clone(), "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(get(&stream, &[]).await.status(), StatusCode::NOT_FOUND);

    // A plain topic request is a disposable subscription, listed while it is open.
    let plain = get(&gateway.url("/topics/news"), &[]).await;
    let disposable = plain.headers()["sse-subscription"]
        .to_str()
        .unwrap()
        .to_owned();
    let (_, page) = json_call(Method::GET, gateway.url("/topics/news/subscriptions"), "").await;
    assert_eq!(page["items"][0]["id"], disposable.as_str());
    assert_eq!(page["items"][0]["disposable"], true);
}

/// A gateway started by `sh -c` with `limits` (shell `ulimit` commands) before it, whose stdout
/// and stderr lines the test reads from the returned channel.
async fn gateway_with_limits(
    limits: &str,
    args: &[&str],
) -> (Gateway, mpsc::UnboundedReceiver<String>) {
    let binary = support::gateway::binary();
    assert!(binary.exists(), "{} not built", binary.display());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{limits}; exec \"$0\" \"$@\""))
        .arg(binary)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = timeout(GUARD, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr = first
        .rsplit("http://")
        .next()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    let (lines_tx, lines) = mpsc::unbounded_channel();
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    forward_lines(stdout, lines_tx.clone());
    forward_lines(stderr, lines_tx);
    (Gateway { child, addr }, lines)
}

fn forward_lines<R>(mut lines: tokio::io::Lines<R>, to: mpsc::UnboundedSender<String>)
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = to.send(line);
        }
    });
}

/// Reads and discards until the peer closes (or resets) the connection; how long it took.
async fn wait_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = vec![0; 64 * 1024];
    let closed = timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

/// The client preface of HTTP/2 and an empty SETTINGS frame: a connection that never asks for
/// anything.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn silent_and_dribbling_clients_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let gateway = Gateway::start(&["--header-timeout", "1", "--demo-interval", "100"]).await;
    let slack = Duration::from_secs(4);

    // Never sends a byte.
    let mut silent = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    // Sends a request head one header line at a time, never finishing it.
    let mut dribbling = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut dribble_read, mut dribble_write) = dribbling.split();
    // Speaks HTTP/2 (the preface and its settings) and never sends a request.
    let mut h2 = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    h2.write_all(H2_PREFACE).await.unwrap();
    // A request, then nothing on the kept-alive connection.
    let mut kept_alive = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    kept_alive
        .write_all(b"GET /nope HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    // A stream that has been going for longer than the header timeout is left alone.
    let response = get(&gateway.url("/events"), &[]).await;
    let mut reader = EventReader::new(response.into_body());

    let dribble = async {
        let _ = dribble_write.write_all(b"GET /events HTTP/1.1\r\n").await;
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if dribble_write
                .write_all(format!("x-dribble-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let dribbled = async {
        use tokio::io::AsyncReadExt;
        let started = std::time::Instant::now();
        let mut buf = [0; 1024];
        let closed = timeout(slack, async {
            while !matches!(dribble_read.read(&mut buf).await, Ok(0) | Err(_)) {}
        })
        .await;
        closed.ok().map(|()| started.elapsed())
    };
    let (silent, dribbled, h2, kept_alive) = tokio::join!(
        wait_closed(&mut silent, slack),
        async {
            tokio::select! {
                closed = dribbled => closed,
                () = dribble => None,
            }
        },
        wait_closed(&mut h2, slack),
        wait_closed(&mut kept_alive, slack),
    );
    for (what, closed) in [
        ("silent", silent),
        ("dribbling", dribbled),
        ("HTTP/2 without a request", h2),
        ("idle keep-alive", kept_alive),
    ] {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {slack:?}"));
        assert!(
            closed >= Duration::from_millis(900),
            "{what}: closed after {closed:?}, before the header timeout"
        );
    }
    // The stream, older than the header timeout by now, goes on.
    let mut ids = 0;
    while ids < 3 {
        if next(&mut reader).await.id().is_some() {
            ids += 1;
        }
    }
}

/// An upstream that reads every request body to its end, then answers 200 with its length.
async fn body_reading_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                let body = request.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response::new(Full::<Bytes>::from(format!(
                    "{} bytes",
                    body.len()
                ))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Reads a raw HTTP/1.1 response head; its status line.
async fn status_line(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    timeout(limit, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    let head = String::from_utf8_lossy(&head);
    head.lines().next().map(str::to_owned)
}

/// `--http1-buffer` bounds a request head: one over it is answered 431, one under it is served.
#[tokio::test]
async fn request_heads_are_bounded_by_the_http1_buffer() {
    use tokio::io::AsyncWriteExt;
    let gateway = Gateway::start(&["--http1-buffer", "8192"]).await;
    for (padding, status) in [(4 * 1024, "HTTP/1.1 200 OK"), (12 * 1024, "HTTP/1.1 431")] {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        let request = format!(
            "GET / HTTP/1.1\r\nhost: gateway\r\nx-padding: {}\r\n\r\n",
            "x".repeat(padding)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let line = status_line(&mut stream, Duration::from_secs(10)).await;
        assert!(
            line.as_deref().is_some_and(|line| line.starts_with(status)),
            "{padding} bytes of header: {line:?}"
        );
    }
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_with_408_and_a_slow_one_is_not() {
    use tokio::io::AsyncWriteExt;
    let upstream = body_reading_upstream().await;
    let gateway = Gateway::start(&[
        "--upstream",
        &format!("http://{upstream}"),
        "--body-timeout",
        "1",
    ])
    .await;
    // Promises 100 bytes, sends 10, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stalled
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: gateway\r\ncontent-length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    // Sends its 5 bytes one every 400 ms: slow, never silent for the timeout.
    let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(b"POST /upload HTTP/1.1\r\nhost: gateway\r\ncontent-length: 5\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (stalled_status, slow_status) =
        tokio::join!(status_line(&mut stalled, Duration::from_secs(5)), async {
            for byte in b"abcde" {
                tokio::time::sleep(Duration::from_millis(400)).await;
                slow.write_all(&[*byte]).await.unwrap();
            }
            status_line(&mut slow, Duration::from_secs(5)).await
        });
    assert_eq!(
        stalled_status.as_deref(),
        Some("HTTP/1.1 408 Request Timeout"),
        "the stalled body is cut"
    );
    assert_eq!(slow_status.as_deref(), Some("HTTP/1.1 200 OK"));
    assert!(started.elapsed() >= Duration::from_secs(1));
}

/// The soft and hard open-files limits of a process.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let (gateway, mut lines) = gateway_with_limits("ulimit -Sn 64", &[]).await;
    let (soft, hard) = open_files_limits(gateway.child.id().unwrap());
    assert_eq!(soft, hard);
    assert_ne!(soft, "64");
    let line = timeout(GUARD, async {
        loop {
            let line = lines.recv().await.unwrap();
            if line.contains("open files limit") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        line.trim(),
        format!("open files limit raised from 64 to {hard}")
    );
}

/// User plus system CPU time of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start with the state, field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    // 64 files in all (soft and hard), idle connections never timed out: they use them up.
    // One worker: each worker's accept loop logs its own bursts.
    let (gateway, mut lines) = gateway_with_limits(
        "ulimit -n 64",
        &[
            "--header-timeout",
            "0",
            "--demo-interval",
            "50",
            "--workers",
            "1",
        ],
    )
    .await;
    let pid = gateway.child.id().unwrap();
    assert_eq!(open_files_limits(pid).0, "64");
    let mut idle = Vec::new();
    for _ in 0..100 {
        // The kernel completes connections in the listen backlog even when none is accepted.
        idle.push(tokio::net::TcpStream::connect(gateway.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = cpu_ticks(pid) - before;
    let mut output = Vec::new();
    while let Ok(line) = lines.try_recv() {
        output.push(line);
    }
    let failures: Vec<&String> = output
        .iter()
        .filter(|l| l.starts_with("accept failed"))
        .collect();
    assert_eq!(failures.len(), 1, "one line per burst: {output:?}");
    assert!(failures[0].contains("Too many open files"), "{failures:?}");
    assert!(
        spent <= 30,
        "{spent} ticks of CPU in 3 s out of file descriptors"
    );

    // The clients leave; the gateway serves again within its longest back-off.
    drop(idle);
    let response = get(&gateway.url("/events"), &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut reader = EventReader::new(response.into_body());
    next(&mut reader).await;
    let recovered = timeout(GUARD, async {
        loop {
            let line = lines.recv().await.unwrap();
            if line.starts_with("accepting again after") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    eprintln!("{}; {spent} CPU ticks in 3 s of failing accepts", recovered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for fanout in [false, true] {
        let mut args = vec![
            "--demo-rate",
            "2000",
            "--demo-size",
            "1000",
            "--send-timeout",
            "1",
        ];
        if fanout {
            args.push("--fanout");
        }
        let gateway = Gateway::start(&args).await;
        let request = b"GET /events HTTP/1.1\r\nhost: gateway\r\n\r\n";
        // Reads the response head, then nothing (a small receive buffer, so that it fills fast).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut stalled = socket.connect(gateway.addr).await.unwrap();
        stalled.write_all(request).await.unwrap();
        let head = status_line(&mut stalled, GUARD).await;
        assert_eq!(head.as_deref(), Some("HTTP/1.1 200 OK"));
        // Reads 16 KiB every 100 ms: far behind the stream, but its socket keeps taking bytes.
        let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        slow.write_all(request).await.unwrap();
        let slow_reader = async {
            let mut buf = vec![0; 16 * 1024];
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match timeout(GUARD, slow.read(&mut buf)).await.unwrap() {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
            true
        };
        // The socket buffers fill up within a few seconds at 2 MB/s, then the gateway waits a
        // second more. Reading after 5 s drains what is buffered, then finds the end (a
        // connection still open would go on streaming for all of the 10 s).
        let stalled_closed = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            wait_closed(&mut stalled, Duration::from_secs(10)).await
        };
        let (slow_open, stalled_closed) = tokio::join!(slow_reader, stalled_closed);
        assert!(
            stalled_closed.is_some(),
            "fan-out {fanout}: the stalled client is still connected"
        );
        // With the hub, its own slow-client rule ends both streams first (and the connection
        // with them): this half checks that the two do not get in each other's way.
        if !fanout {
            assert!(slow_open, "the slow reader was disconnected");
        }
    }
}

#[tokio::test]
async fn the_demo_answers_other_methods_with_405_and_unknown_paths_with_404() {
    let gateway = Gateway::start(&[]).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for (method, path, status) in [
        ("POST", "/events", StatusCode::METHOD_NOT_ALLOWED),
        ("PUT", "/", StatusCode::METHOD_NOT_ALLOWED),
        ("DELETE", "/topics/news", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/nope", StatusCode::NOT_FOUND),
        ("HEAD", "/nope", StatusCode::NOT_FOUND),
        ("HEAD", "/", StatusCode::OK),
        ("POST", "/metrics", StatusCode::METHOD_NOT_ALLOWED),
        ("DELETE", "/status", StatusCode::METHOD_NOT_ALLOWED),
        ("HEAD", "/metrics", StatusCode::OK),
        ("HEAD", "/status", StatusCode::OK),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(gateway.url(path))
            .body(Empty::new())
            .unwrap();
        let response = timeout(GUARD, client.request(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(response.headers()["allow"], "GET, HEAD", "{method} {path}");
        }
        if method == "HEAD" && path == "/status" {
            assert_eq!(
                response.headers()[CONTENT_TYPE],
                "text/event-stream; charset=utf-8"
            );
        } else if method == "HEAD" && status == StatusCode::OK {
            // What GET would send, without it.
            let length: usize = response.headers()[CONTENT_LENGTH]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                path == "/metrics" || length > 1000,
                "{method} {path}: {length}"
            );
        }
        let body = timeout(GUARD, response.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        if method == "HEAD" {
            assert!(body.is_empty(), "{method} {path}");
        }
    }
}

/// HEAD on an event stream: its headers, no body, over HTTP/1.1 and HTTP/2 (the HTTP/2 half
/// needs the layers to send nothing on a HEAD response).
#[tokio::test]
async fn head_on_an_event_stream_answers_its_headers_without_a_body() {
    let gateway = Gateway::start(&["--heartbeat", "0.05"]).await;
    for http2 in [false, true] {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http::<Empty<Bytes>>();
        let request = Request::head(gateway.url("/events"))
            .body(Empty::new())
            .unwrap();
        let response = timeout(GUARD, client.request(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "http2: {http2}");
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        let body = timeout(GUARD, response.into_body().collect())
            .await
            .unwrap()
            .unwrap_or_else(|error| panic!("http2: {http2}: {error:?}"))
            .to_bytes();
        assert!(body.is_empty(), "http2: {http2}: {body:?}");
    }
}

/// An upstream event stream that compresses with gzip whenever the request allows it (as many
/// do): three events, then silence. Records each request's `Accept-Encoding`.
async fn gzipping_upstream() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let accept_encoding = request
                    .headers()
                    .get("accept-encoding")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                seen.lock().unwrap().push(accept_encoding.clone());
                let gzip = accept_encoding.contains("gzip");
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                tokio::spawn(async move {
                    let mut encoder =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    for id in 1..=3 {
                        let event = format!("id: {id}\ndata: event {id}\n\n");
                        let bytes = if gzip {
                            encoder.write_all(event.as_bytes()).unwrap();
                            encoder.flush().unwrap();
                            Bytes::from(std::mem::take(encoder.get_mut()))
                        } else {
                            Bytes::from(event)
                        };
                        if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    tx.closed().await;
                });
                let mut response = Response::builder().header(CONTENT_TYPE, "text/event-stream");
                if gzip {
                    response = response.header("content-encoding", "gzip");
                }
                let body = StreamBody::new(ReceiverStream::new(rx));
                async move { Ok::<_, Infallible>(response.body(body).unwrap()) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, recorded)
}

#[tokio::test]
async fn event_streams_ask_the_upstream_for_identity_and_the_gateway_compresses_itself() {
    use std::io::Write;
    let (upstream, seen) = gzipping_upstream().await;
    let upstream = format!("http://{upstream}");
    let headers = [("accept", "text/event-stream"), ("accept-encoding", "gzip")];

    // Without --compression: the client gets the stream as the layers make it, uncompressed.
    let gateway = Gateway::start(&["--upstream", &upstream, "--heartbeat", "0.1"]).await;
    let response = get(&gateway.url("/stream"), &headers).await;
    assert!(response.headers().get("content-encoding").is_none());
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(next(&mut reader).await.comments(), ["ok"]);
    assert_eq!(read_ids(&mut reader, 3).await, ["1", "2", "3"]);
    let heartbeat = next(&mut reader).await;
    assert_eq!(heartbeat.comments(), [""], "a heartbeat after the events");
    assert_eq!(seen.lock().unwrap().as_slice(), ["identity"]);
    drop(gateway);

    // With --compression: the gateway compresses what the layers make.
    let gateway = Gateway::start(&[
        "--upstream",
        &upstream,
        "--heartbeat",
        "0.1",
        "--compression",
    ])
    .await;
    let response = get(&gateway.url("/stream"), &headers).await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut body = response.into_body();
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    let decoded = timeout(GUARD, async {
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                decoder.write_all(&data).unwrap();
                decoder.flush().unwrap();
            }
            let text = String::from_utf8_lossy(decoder.get_ref()).into_owned();
            if text
                .split_once("id: 3\n")
                .is_some_and(|(_, after)| after.contains("\n\n:\n\n"))
            {
                return text;
            }
        }
    })
    .await
    .expect("the decoded stream holds the events and a heartbeat");
    // (The initial comment is not sent on a compressed stream, demo or upstream alike.)
    assert!(decoded.contains("id: 1\ndata: event 1\n\n"), "{decoded:?}");
    assert_eq!(seen.lock().unwrap().as_slice(), ["identity", "identity"]);

    // A request that does not ask for an event stream keeps its Accept-Encoding.
    let other = get(&gateway.url("/json"), &[("accept-encoding", "gzip")]).await;
    drop(other);
    assert_eq!(seen.lock().unwrap()[2], "gzip");
}

/// An HTTP/2 client that stops granting flow-control window stalls its stream without blocking
/// the socket: the send timeout closes it all the same, and a reading stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_without_window_is_closed_after_the_send_timeout() {
    let gateway = Gateway::start(&[
        "--demo-rate",
        "2000",
        "--demo-size",
        "1000",
        "--send-timeout",
        "1",
    ])
    .await;
    let open = |window: u32| {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_initial_stream_window_size(window)
            .http2_initial_connection_window_size(window)
            .build_http::<Empty<Bytes>>();
        let url = gateway.url("/events");
        async move {
            timeout(GUARD, client.get(url.parse().unwrap()))
                .await
                .unwrap()
                .unwrap()
        }
    };
    // Its 64 KiB window fills at once and is never given back: the response is not read.
    let stalled = open(65_535).await;
    assert_eq!(stalled.status(), StatusCode::OK);
    // Another connection reads all along.
    let mut reading = EventReader::new(open(1 << 20).await.into_body());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        next(&mut reading).await;
    }
    // Reading now drains what the client holds, then finds the connection gone (one still open
    // would go on streaming for all of the 10 s).
    let mut body = stalled.into_body();
    let ended = timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stalled HTTP/2 stream is still open");
    next(&mut reading).await;
}

/// A free loopback address for a second listener.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Two users over real sockets: an operator who manages subscriptions and an anonymous client
/// on the public port, who can neither list, create, get, suspend nor delete (`404` where the
/// API is not served, `401` where it wants the token), yet reads a subscription whose id it
/// was given.
#[tokio::test]
async fn anonymous_clients_cannot_manage_subscriptions_only_read_them_by_id() {
    use http::Method;
    let admin = free_addr();
    let admin_flag = admin.to_string();
    let on_its_own = Gateway::start(&[
        "--subscriptions",
        "--admin-listen",
        &admin_flag,
        "--demo-interval",
        "20",
    ])
    .await;
    let behind_token = Gateway::start(&[
        "--subscriptions",
        "--admin-token",
        TOKEN,
        "--demo-interval",
        "20",
    ])
    .await;
    let off = Gateway::start(&["--subscriptions", "--demo-interval", "20"]).await;

    // The operator: on the admin listener, or with the token.
    let admin_url = |path: &str| format!("http://{admin}{path}");
    let (status, created) =
        json_call(Method::POST, &admin_url("/topics/news/subscriptions"), "").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let on_its_own_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(on_its_own_id.len(), 32);
    let (status, created) = json_call_as(
        Some(TOKEN),
        Method::POST,
        &behind_token.url("/topics/news/subscriptions"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let behind_token_id = created["id"].as_str().unwrap().to_owned();

    // The anonymous client, on each public port; with a wrong token where there is one.
    let cases = [
        (&on_its_own, &on_its_own_id, None, StatusCode::NOT_FOUND),
        (
            &behind_token,
            &behind_token_id,
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            &behind_token,
            &behind_token_id,
            Some("test-admin-token-0123456788"),
            StatusCode::UNAUTHORIZED,
        ),
        (&off, &on_its_own_id, None, StatusCode::NOT_FOUND),
    ];
    for (gateway, id, token, refused) in cases {
        let one = gateway.url(&format!("/subscriptions/{id}"));
        let list = gateway.url("/topics/news/subscriptions");
        let attempts = [
            (Method::GET, list.clone(), ""),
            (Method::POST, list.clone(), ""),
            (Method::GET, one.clone(), ""),
            (Method::PATCH, one.clone(), r#"{"status":"suspended"}"#),
            (Method::DELETE, one.clone(), ""),
        ];
        for (method, url, body) in attempts {
            let (status, answer) = json_call_as(token, method.clone(), &url, body).await;
            assert_eq!(status, refused, "{method} {url} with {token:?}: {answer}");
            assert!(
                !answer.to_string().contains(id.as_str()),
                "no id in a refusal: {answer}"
            );
        }
    }

    // Nothing changed: still one subscription each, active; the admin listener lists it.
    let (status, page) = json_call(Method::GET, &admin_url("/topics/news/subscriptions"), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["items"][0]["id"], on_its_own_id.as_str());
    assert_eq!(page["items"][0]["status"], "active");
    let (_, page) = json_call_as(
        Some(TOKEN),
        Method::GET,
        &behind_token.url("/topics/news/subscriptions"),
        "",
    )
    .await;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["items"][0]["status"], "active");
    // The admin listener serves the API only, not the streams.
    assert_eq!(
        get(&admin_url("/topics/news"), &[]).await.status(),
        StatusCode::NOT_FOUND
    );

    // With the id, reading works, anonymously; a made-up id reads nothing.
    for (gateway, id) in [
        (&on_its_own, &on_its_own_id),
        (&behind_token, &behind_token_id),
    ] {
        let response = get(&gateway.url(&format!("/subscriptions/{id}/subscribe")), &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["sse-subscription"], id.as_str());
        let mut reader = EventReader::new(response.into_body());
        assert_eq!(read_ids(&mut reader, 2).await, ["1", "2"]);
        let guessed = format!("/subscriptions/{}/subscribe", "0".repeat(32));
        assert_eq!(
            get(&gateway.url(&guessed), &[]).await.status(),
            StatusCode::NOT_FOUND
        );
    }
}

/// `--max-per-topic` and `--max-subscriptions` hold: creates beyond them answer `429`.
#[tokio::test]
async fn subscription_caps_are_flags() {
    use http::Method;
    let gateway = Gateway::start(&[
        "--subscriptions",
        "--admin-token",
        TOKEN,
        "--max-per-topic",
        "1",
        "--max-subscriptions",
        "2",
    ])
    .await;
    let create = |topic: &str| {
        let url = gateway.url(&format!("/topics/{topic}/subscriptions"));
        async move { json_call_as(Some(TOKEN), Method::POST, &url, "").await.0 }
    };
    assert_eq!(create("news").await, StatusCode::CREATED);
    assert_eq!(
        create("news").await,
        StatusCode::TOO_MANY_REQUESTS,
        "per topic"
    );
    assert_eq!(create("sport").await, StatusCode::CREATED);
    assert_eq!(
        create("weather").await,
        StatusCode::TOO_MANY_REQUESTS,
        "in all"
    );
}

/// A raw HTTP/1 upstream: for each connection, the request head it read goes to `heads`, then
/// `pieces` are written one by one (each flushed on its own); then the connection stays open
/// until the other side closes it, which is reported on `closed`.
async fn raw_upstream(
    pieces: &'static [&'static [u8]],
) -> (SocketAddr, mpsc::Receiver<String>, mpsc::Receiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads_tx, heads) = mpsc::channel(4);
    let (closed_tx, closed) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads_tx.clone();
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = heads
                    .send(String::from_utf8_lossy(&head).into_owned())
                    .await;
                for piece in pieces {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    stream.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                while stream.read(&mut byte).await.unwrap_or(0) > 0 {}
                let _ = closed.send(()).await;
            });
        }
    });
    (addr, heads, closed)
}

/// `--stream-reader direct` reads an upstream event stream straight off its socket: chunk
/// framing split anywhere, an interim `103` before the answer, trailers at the end; the request
/// it sends carries the proxy's headers; a client that leaves closes the upstream connection.
#[tokio::test]
async fn the_direct_reader_decodes_chunked_streams_split_anywhere() {
    const WIRE: &[&[u8]] = &[
        b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n",
        b"transfer-encoding: chunked\r\n\r\n",
        b"0",
        b"f;ext=1\r",
        b"\nid: 1\ndata: a\n\n\r\n",
        b"10\r\nid: 2\ndata: ",
        b"bb\n\n\r",
        b"\n",
    ];
    let (upstream_addr, mut heads, mut closed) = raw_upstream(WIRE).await;
    let gateway = Gateway::start(&["--upstream", &format!("http://{upstream_addr}")]).await;

    let response = get(
        &gateway.url("/s?x=1"),
        &[("accept", "text/event-stream"), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let head = timeout(GUARD, heads.recv()).await.unwrap().unwrap();
    assert!(head.starts_with("GET /s?x=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("host: {upstream_addr}\r\n")),
        "{head}"
    );
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("accept-encoding: identity\r\n"), "{head}");
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(next(&mut reader).await.comments(), ["ok"]);
    let first = next(&mut reader).await;
    assert_eq!(
        (first.id_str(), first.data().as_deref()),
        (Some("1"), Some("a"))
    );
    let second = next(&mut reader).await;
    assert_eq!(
        (second.id_str(), second.data().as_deref()),
        (Some("2"), Some("bb"))
    );

    drop(reader);
    timeout(GUARD, closed.recv())
        .await
        .expect("the upstream connection closes when its client leaves")
        .unwrap();
}

/// A body the upstream ends by closing (HTTP/1.0, no length) ends the client's stream cleanly;
/// a chunked body cut off mid-chunk does not pass for a complete one.
#[tokio::test]
async fn the_direct_reader_ends_as_the_upstream_framing_says() {
    use tokio::io::AsyncReadExt;
    const UNTIL_CLOSE: &[&[u8]] = &[
        b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n",
        b"data: 2\n\n",
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            for piece in UNTIL_CLOSE {
                let _ = stream.write_all(piece).await;
            }
            // Closed here: the end of the body.
        }
    });
    let gateway = Gateway::start(&["--upstream", &format!("http://{addr}")]).await;
    let response = get(&gateway.url("/"), &[("accept", "text/event-stream")]).await;
    let body = timeout(GUARD, response.into_body().collect())
        .await
        .unwrap()
        .expect("a clean end")
        .to_bytes();
    assert_eq!(body, ":ok\n\ndata: 1\n\ndata: 2\n\n");

    const CUT: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        b"9\r\ndata: 1\n\n\r\n20\r\ndata: 2",
    ];
    // Event 1 is whole; whatever reaches the client of the cut one, it never passes for an event.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut_tx, cut) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let _ = stream.write_all(CUT[0]).await;
            // The cut comes once the client has what came before it.
            let _ = cut.await;
            let _ = stream.write_all(CUT[1]).await;
        }
    });
    let gateway = Gateway::start(&["--upstream", &format!("http://{addr}")]).await;
    let response = get(&gateway.url("/"), &[("accept", "text/event-stream")]).await;
    let mut reader = EventReader::new(response.into_body());
    assert_eq!(next(&mut reader).await.comments(), ["ok"]);
    cut_tx.send(()).unwrap();
    let mut events = Vec::new();
    while let Some(Ok(event)) = timeout(GUARD, reader.next_event()).await.unwrap() {
        events.push(event.data().unwrap_or_default().into_owned());
    }
    assert!(
        events.len() <= 1 && events.iter().all(|data| data == "1"),
        "{events:?}"
    );
}
