//! Test SSE stacks the way you test any tower service: `oneshot` a request, then look at what a
//! client would see. Enabled by the `test-util` feature.
//!
//! - [`subscribe`] and [`reconnect`] build requests as a browser's `EventSource` sends them.
//! - [`TestStream`] reads a response as events, comments and the end, with failure messages
//!   that show what arrived instead (raw bytes included). It works in virtual time:
//!   [`TestStream::expect_nothing_for`] under `#[tokio::test(start_paused = true)]` checks what
//!   happens while nothing arrives, instantly.
//! - [`Script`] and [`ScriptedService`] play an upstream: chunks, pauses, errors, the end.
//!
//! # Example
//!
//! An axum `Router` with the recommended stack, tested for headers, a heartbeat after the
//! interval, and a replay after a reconnect:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use axum::{body::Body, Router};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sse::testing::{reconnect, subscribe, Script, ScriptedService, TestStream};
//! use tower_sse::{HeartbeatLayer, PassthroughLayer, ReplayLayer, SseHeadersLayer};
//!
//! let upstream = ScriptedService::event_stream(
//!     Script::new()
//!         .chunk("id: 1\ndata: one\n\n")
//!         .chunk("id: 2\ndata: two\n\n")
//!         .pause(Duration::from_secs(60))
//!         .chunk("id: 3\ndata: three\n\n"),
//! );
//! let app = Router::new().route_service("/events", upstream.clone()).layer(
//!     ServiceBuilder::new()
//!         .layer(SseHeadersLayer::new())
//!         .layer(PassthroughLayer::new())
//!         .layer(HeartbeatLayer::new(Duration::from_secs(15)))
//!         .layer(ReplayLayer::new()),
//! );
//!
//! // axum's Router takes any body type: name the one to build.
//! let response = app.clone().oneshot(subscribe::<Body>("/events")).await.unwrap();
//! let mut stream = TestStream::new(response);
//! stream.assert_header("content-type", "text/event-stream; charset=utf-8");
//! assert_eq!(stream.next_event().await.data().as_deref(), Some("one"));
//! assert_eq!(stream.next_event().await.data().as_deref(), Some("two"));
//! // The upstream is quiet: after 15 s (virtual) a heartbeat comment, and no event.
//! assert_eq!(stream.next_comment().await, "");
//! stream.expect_nothing_for(Duration::from_secs(10)).await;
//! drop(stream);
//!
//! // A browser reconnecting after event 1 gets 2 from the replay buffer. Nothing recorded the
//! // stream while it was away, and this upstream is not declared to resume: `partial`.
//! let response = app.oneshot(reconnect::<Body>("/events", "1")).await.unwrap();
//! let mut stream = TestStream::new(response);
//! stream.assert_header("sse-resumed-from", "partial");
//! assert_eq!(stream.next_event().await.id(), Some(&b"2"[..]));
//! assert_eq!(upstream.requests()[1].headers()["last-event-id"], "2");
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::wire::{Event, Limits, Parser};

/// A `GET` as `EventSource` sends it: `Accept: text/event-stream`, `Cache-Control: no-cache`.
pub fn subscribe<B: Default>(uri: &str) -> Request<B> {
    Request::get(uri)
        .header(ACCEPT, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .body(B::default())
        .expect("a valid URI")
}

/// The request `EventSource` sends when it reconnects: [`subscribe`] plus `Last-Event-ID`
/// (raw bytes: a non-ASCII id is valid).
pub fn reconnect<B: Default>(uri: &str, last_event_id: impl AsRef<[u8]>) -> Request<B> {
    let mut request = subscribe(uri);
    let id = HeaderValue::from_bytes(last_event_id.as_ref()).expect("an id a header can carry");
    request.headers_mut().insert("last-event-id", id);
    request
}

/// Reads a response as a client would, for assertions; see the [module docs](self).
///
/// Every method that waits panics with a readable message (what arrived instead, and the raw
/// bytes received last) rather than returning an error, as test helpers should.
pub struct TestStream<B> {
    status: StatusCode,
    headers: HeaderMap,
    body: Pin<Box<B>>,
    parser: Parser,
    /// The last bytes received, for failure messages.
    recent: VecDeque<u8>,
    ended: bool,
    trailers: Option<HeaderMap>,
    /// How long a wait may take on tokio's clock before it fails.
    deadline: Duration,
}

impl<B> fmt::Debug for TestStream<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestStream")
            .field("status", &self.status)
            .field("recent", &self.recent_text())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

const RECENT: usize = 512;

/// How long a [`TestStream`] waits by default (tokio's clock): longer than any usual heartbeat
/// interval, and no real time at all under a paused clock.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

impl<B> TestStream<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    /// Reads `response`.
    pub fn new(response: Response<B>) -> Self {
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body: Box::pin(body),
            parser: Parser::with_limits(Limits::unbounded()),
            recent: VecDeque::new(),
            ended: false,
            trailers: None,
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// How long each wait ([`next_event`](Self::next_event), [`events`](Self::events),
    /// [`until_end`](Self::until_end), ...) may take on tokio's clock before it panics with what
    /// arrived (default [`DEFAULT_DEADLINE`], 60 s). Under `start_paused`, a wait whose event
    /// never comes fails after that much virtual time instead of spinning through heartbeats
    /// forever.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Asserts a response header's value.
    #[track_caller]
    pub fn assert_header(&self, name: &str, expected: &str) {
        let actual = self
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()));
        assert_eq!(
            actual.as_deref(),
            Some(expected),
            "header {name}: expected {expected:?}, got {actual:?} (all headers: {:?})",
            self.headers
        );
    }

    /// The next dispatched block of any kind (message, comment, id or retry only), or `None`
    /// at the end of the stream.
    #[track_caller]
    pub fn next_block(&mut self) -> impl Future<Output = Option<Event>> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let until = Instant::now() + self.deadline;
            match self.block_until(until).await {
                Ok(block) => block,
                Err(_) => self.late(caller, "a block"),
            }
        }
    }

    /// The next message (a block with data), skipping comments and id- or retry-only blocks.
    #[track_caller]
    pub fn next_event(&mut self) -> impl Future<Output = Event> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let until = Instant::now() + self.deadline;
            self.event_until(caller, until).await
        }
    }

    async fn event_until(
        &mut self,
        caller: &'static std::panic::Location<'static>,
        until: Instant,
    ) -> Event {
        loop {
            match self.block_until(until).await {
                Ok(Some(event)) if event.is_message() => return event,
                Ok(Some(_)) => {}
                Ok(None) => panic!(
                    "{caller}: expected an event, the stream ended\n  received last: {}",
                    self.recent_text()
                ),
                Err(_) => self.late(caller, "an event"),
            }
        }
    }

    /// The text of the next comment-only block (a heartbeat, say). Panics if a message comes
    /// first: that is usually the point of the test.
    #[track_caller]
    pub fn next_comment(&mut self) -> impl Future<Output = String> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let until = Instant::now() + self.deadline;
            loop {
                match self.block_until(until).await {
                    Ok(Some(event)) if event.is_message() => panic!(
                        "{caller}: expected a comment, got {event:?}\n  received last: {}",
                        self.recent_text()
                    ),
                    Ok(Some(event)) if !event.comments().is_empty() => {
                        return String::from_utf8_lossy(&event.comments()[0]).into_owned();
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => panic!(
                        "{caller}: expected a comment, the stream ended\n  received last: {}",
                        self.recent_text()
                    ),
                    Err(_) => self.late(caller, "a comment"),
                }
            }
        }
    }

    /// The next `n` messages, all within one deadline.
    #[track_caller]
    pub fn events(&mut self, n: usize) -> impl Future<Output = Vec<Event>> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let until = Instant::now() + self.deadline;
            let mut events = Vec::with_capacity(n);
            for _ in 0..n {
                events.push(self.event_until(caller, until).await);
            }
            events
        }
    }

    /// Every remaining message, until the stream ends (within the deadline).
    #[track_caller]
    pub fn until_end(&mut self) -> impl Future<Output = Vec<Event>> + '_ {
        let caller = std::panic::Location::caller();
        async move { self.rest(caller).await }
    }

    /// The messages left before the end, within the deadline.
    async fn rest(&mut self, caller: &'static std::panic::Location<'static>) -> Vec<Event> {
        let until = Instant::now() + self.deadline;
        let mut events = Vec::new();
        loop {
            match self.block_until(until).await {
                Ok(Some(event)) if event.is_message() => events.push(event),
                Ok(Some(_)) => {}
                Ok(None) => return events,
                Err(_) => self.late(caller, "the end of the stream"),
            }
        }
    }

    /// Whatever messages arrive within `duration` of tokio's clock (fewer if the stream ends
    /// first); never fails.
    pub async fn collect_for(&mut self, duration: Duration) -> Vec<Event> {
        let until = Instant::now() + duration;
        let mut events = Vec::new();
        while let Ok(Some(block)) = self.block_until(until).await {
            if block.is_message() {
                events.push(block);
            }
        }
        events
    }

    /// The next block, or `Err` once `until` passes.
    async fn block_until(
        &mut self,
        until: Instant,
    ) -> Result<Option<Event>, tokio::time::error::Elapsed> {
        tokio::time::timeout_at(until, self.read_block()).await
    }

    /// Fails a wait that outlived the deadline.
    fn late(&self, caller: &std::panic::Location<'_>, expected: &str) -> ! {
        panic!(
            "{caller}: expected {expected} within {:?} of tokio's clock, none came\n  received last: {}",
            self.deadline,
            self.recent_text()
        )
    }

    async fn read_block(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Some(event.expect("an unbounded parser cannot fail"));
            }
            if self.ended {
                return None;
            }
            match poll_fn(|cx| self.body.as_mut().poll_frame(cx)).await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.recent.extend(data.iter().copied());
                        let excess = self.recent.len().saturating_sub(RECENT);
                        self.recent.drain(..excess);
                        self.parser.push(data);
                    }
                    Err(frame) => self.trailers = frame.into_trailers().ok(),
                },
                Some(Err(error)) => panic!(
                    "the body failed: {error}\n  received last: {}",
                    self.recent_text()
                ),
                None => {
                    self.ended = true;
                    self.parser.finish();
                }
            }
        }
    }

    /// Asserts that nothing at all (no block, no end) arrives for `duration` of tokio's clock;
    /// under a paused clock this takes no real time.
    #[track_caller]
    pub fn expect_nothing_for(&mut self, duration: Duration) -> impl Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            if let Ok(block) = tokio::time::timeout(duration, self.read_block()).await {
                panic!(
                    "{caller}: expected nothing for {duration:?}, got {block:?}\n  received last: {}",
                    self.recent_text()
                );
            }
        }
    }

    /// Asserts that the stream ends (within the deadline) with no further message.
    #[track_caller]
    pub fn assert_ends(&mut self) -> impl Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let rest = self.rest(caller).await;
            assert!(
                rest.is_empty(),
                "{caller}: expected the end, got {rest:?}\n  received last: {}",
                self.recent_text()
            );
        }
    }

    /// The id a client would send when it reconnects now.
    pub fn last_event_id(&self) -> &[u8] {
        self.parser.last_event_id()
    }

    /// The trailers, once the body sent them.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }
}

impl<B> TestStream<B> {
    fn recent_text(&self) -> String {
        let bytes: Vec<u8> = self.recent.iter().copied().collect();
        format!("{:?}", String::from_utf8_lossy(&bytes))
    }
}

#[derive(Clone, Debug)]
enum Step {
    Chunk(Bytes),
    Pause(Duration),
    Trailers(HeaderMap),
    Error(String),
    Hang,
}

/// What a [`ScriptedBody`] plays: chunks, pauses (on tokio's clock), an error, or no end.
#[derive(Clone, Debug, Default)]
pub struct Script {
    steps: Vec<Step>,
}

impl Script {
    /// An empty script: the body ends at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `bytes` as one data frame.
    pub fn chunk(mut self, bytes: impl Into<Bytes>) -> Self {
        self.steps.push(Step::Chunk(bytes.into()));
        self
    }

    /// Sends each of `chunks` as one data frame.
    pub fn chunks<T: AsRef<[u8]>>(mut self, chunks: impl IntoIterator<Item = T>) -> Self {
        for chunk in chunks {
            self.steps
                .push(Step::Chunk(Bytes::copy_from_slice(chunk.as_ref())));
        }
        self
    }

    /// Sends a trailers frame (gRPC sends its status this way).
    pub fn trailers(mut self, trailers: HeaderMap) -> Self {
        self.steps.push(Step::Trailers(trailers));
        self
    }

    /// Sends `bytes` one byte per frame: the hardest chunking for a reader.
    pub fn byte_by_byte(mut self, bytes: impl AsRef<[u8]>) -> Self {
        for byte in bytes.as_ref() {
            self.steps
                .push(Step::Chunk(Bytes::copy_from_slice(&[*byte])));
        }
        self
    }

    /// Waits `duration` before the next step.
    pub fn pause(mut self, duration: Duration) -> Self {
        self.steps.push(Step::Pause(duration));
        self
    }

    /// Fails the body with `message`.
    pub fn error(mut self, message: impl Into<String>) -> Self {
        self.steps.push(Step::Error(message.into()));
        self
    }

    /// Never ends after the steps so far (a live stream that went quiet).
    pub fn hang(mut self) -> Self {
        self.steps.push(Step::Hang);
        self
    }

    /// The body that plays this script.
    pub fn into_body(self) -> ScriptedBody {
        ScriptedBody {
            steps: self.steps.into(),
            sleep: None,
            ended: false,
        }
    }
}

/// A body that plays a [`Script`].
///
/// Its size hint is exact while the script can only end normally (no error, no hang). Polling
/// it again after it ended panics: a layer that does so has a bug this body is here to catch.
pub struct ScriptedBody {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl fmt::Debug for ScriptedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedBody")
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// The error a [`ScriptedBody`] fails with.
#[derive(Debug)]
pub struct ScriptError(String);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = ScriptError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptError>>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match self.steps.pop_front() {
                None => {
                    assert!(!self.ended, "ScriptedBody polled again after it ended");
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Some(Step::Chunk(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Some(Step::Trailers(trailers)) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Some(Step::Error(message)) => return Poll::Ready(Some(Err(ScriptError(message)))),
                Some(Step::Pause(duration)) => {
                    self.sleep = Some(Box::pin(tokio::time::sleep(duration)));
                }
                Some(Step::Hang) => {
                    self.steps.push_front(Step::Hang);
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty() && self.sleep.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let mut exact = 0;
        for step in &self.steps {
            match step {
                Step::Chunk(bytes) => exact += bytes.len() as u64,
                Step::Error(_) | Step::Hang => return SizeHint::default(),
                Step::Pause(_) | Step::Trailers(_) => {}
            }
        }
        SizeHint::with_exact(exact)
    }
}

/// An inner service that answers every request with a [`Script`], and records the requests.
#[derive(Clone, Debug)]
pub struct ScriptedService {
    content_type: HeaderValue,
    script: Script,
    requests: Arc<Mutex<Vec<Request<()>>>>,
}

impl ScriptedService {
    /// Answers `200 OK`, `Content-Type: text/event-stream`, with `script` as the body.
    pub fn event_stream(script: Script) -> Self {
        Self::new("text/event-stream", script)
    }

    /// Answers `200 OK` with `content_type` and `script` as the body.
    pub fn new(content_type: &'static str, script: Script) -> Self {
        Self {
            content_type: HeaderValue::from_static(content_type),
            script,
            requests: Arc::default(),
        }
    }

    /// The requests received so far (bodies dropped), oldest first.
    pub fn requests(&self) -> Vec<Request<()>> {
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        requests
            .iter()
            .map(|r| {
                let mut copy = Request::new(());
                *copy.method_mut() = r.method().clone();
                *copy.uri_mut() = r.uri().clone();
                *copy.headers_mut() = r.headers().clone();
                copy
            })
            .collect()
    }
}

impl<B> tower_service::Service<Request<B>> for ScriptedService {
    type Response = Response<ScriptedBody>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, _) = request.into_parts();
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Request::from_parts(parts, ()));
        let mut response = Response::new(self.script.clone().into_body());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, self.content_type.clone());
        std::future::ready(Ok(response))
    }
}
