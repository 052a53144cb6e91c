//! The built-in demo: a page at `/` and a ticking event stream at `/events` and at every
//! `/topics/{topic}` (for `--subscriptions`).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{Either, Full};
use tokio::time::{interval, Interval, MissedTickBehavior};
use tower::Service;
use tower_sse::wire::Event;

const PAGE: &str = include_str!("page.html");

/// Serves the page and the demo stream to GET and HEAD (other methods: 405); anything else is
/// 404.
#[derive(Clone, Debug)]
pub(crate) struct Demo {
    every: Duration,
    /// Data padded to about this many bytes (load tests).
    size: usize,
}

impl Demo {
    pub(crate) fn new(every: Duration, size: usize) -> Self {
        Self { every, size }
    }
}

pub(crate) type DemoBody = Either<Ticks, Full<Bytes>>;

impl<B> Service<Request<B>> for Demo {
    type Response = Response<DemoBody>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        let stream = path == "/events" || is_topic(path);
        let known = stream || path == "/" || path == "/index.html";
        // HEAD answers what GET would, without a body (the stream is not even started).
        let head = request.method() == Method::HEAD;
        let response = match (request.method(), path) {
            (&Method::GET | &Method::HEAD, "/") => Response::builder()
                .header(CONTENT_TYPE, "text/html; charset=utf-8")
                .header(CONTENT_LENGTH, PAGE.len())
                .body(Either::Right(if head {
                    Full::default()
                } else {
                    Full::from(PAGE)
                })),
            (&Method::GET | &Method::HEAD, _) if stream => {
                // Resume after the client's last id, as an upstream that keeps history would.
                let after = request
                    .headers()
                    .get("last-event-id")
                    .and_then(|id| std::str::from_utf8(id.as_bytes()).ok())
                    .and_then(|id| id.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                let ticks = if head {
                    Ticks::ended()
                } else {
                    Ticks::new(self.every, after + 1, self.size)
                };
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .header("x-demo-stream", "ticks")
                    .body(Either::Left(ticks))
            }
            (&Method::GET | &Method::HEAD, "/index.html") => Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header(LOCATION, "/")
                .body(Either::Right(Full::default())),
            _ if known => Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header(ALLOW, "GET, HEAD")
                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Either::Right(if head {
                    Full::default()
                } else {
                    Full::from("method not allowed: use GET or HEAD\n")
                })),
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Either::Right(if head {
                    Full::default()
                } else {
                    Full::from("not found: try /, /events or /topics/<name>\n")
                })),
        };
        ready(Ok(response.expect("static response parts are valid")))
    }
}

/// `/topics/{topic}` with a plain topic name: each topic is a demo stream of its own.
fn is_topic(path: &str) -> bool {
    path.strip_prefix("/topics/").is_some_and(|topic| {
        !topic.is_empty()
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    })
}

/// An endless event stream: one event with an increasing id per tick, the first at once. Each
/// event's data carries its send time (`ts`, microseconds since the Unix epoch) for load tools.
#[derive(Debug)]
pub(crate) struct Ticks {
    /// `None` for the empty body of a HEAD response.
    interval: Option<Interval>,
    next_id: u64,
    size: usize,
}

/// At most this many due ticks go out in one frame: a client that stalls and comes back gets
/// the backlog in frames of this size, not in one huge frame held for it meanwhile.
const MAX_BATCH: usize = 64;

impl Ticks {
    fn new(every: Duration, first_id: u64, size: usize) -> Self {
        let mut interval = interval(every);
        // Below the timer's 1 ms resolution, several ticks fall due per wake-up: they go out
        // together and the rate holds.
        interval.set_missed_tick_behavior(if every < Duration::from_millis(1) {
            MissedTickBehavior::Burst
        } else {
            MissedTickBehavior::Delay
        });
        Self {
            interval: Some(interval),
            next_id: first_id,
            size,
        }
    }

    /// No events at all: the body of a HEAD response.
    fn ended() -> Self {
        Self {
            interval: None,
            next_id: 0,
            size: 0,
        }
    }

    fn event(&mut self, now: Duration) -> Event {
        let id = self.next_id;
        self.next_id += 1;
        let secs = now.as_secs();
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let mut data = format!(
            r#"{{"n":{id},"utc":"{h:02}:{m:02}:{s:02}","ts":{}"#,
            now.as_micros()
        );
        if data.len() + 2 < self.size {
            data.push_str(r#","pad":""#);
            let pad = self.size.saturating_sub(data.len() + 2);
            data.extend(std::iter::repeat_n('x', pad));
            data.push('"');
        }
        data.push('}');
        Event::builder()
            .id(id.to_string())
            // Shown to raw readers as `:source=demo` with --metadata-as-comment.
            .metadata("source", "demo")
            .data(data)
            .build()
            .expect("digits and JSON are valid event values")
    }
}

impl Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(interval) = self.interval.as_mut() else {
            return Poll::Ready(None);
        };
        if interval.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut frame = BytesMut::new();
        self.event(now).encode_into(&mut frame);
        for _ in 1..MAX_BATCH {
            if self
                .interval
                .as_mut()
                .is_some_and(|interval| interval.poll_tick(cx).is_pending())
            {
                break;
            }
            self.event(now).encode_into(&mut frame);
        }
        Poll::Ready(Some(Ok(Frame::data(frame.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.interval.is_none()
    }
}
