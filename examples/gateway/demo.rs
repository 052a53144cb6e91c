//! The built-in demo: a page at `/` and a ticking event stream at `/events`.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{Either, Full};
use tokio::time::{interval, Interval, MissedTickBehavior};
use tower::Service;
use tower_sse::wire::Event;

const PAGE: &str = include_str!("page.html");

/// Serves the page and the demo stream; anything else is 404.
#[derive(Clone, Debug)]
pub(crate) struct Demo {
    every: Duration,
}

impl Demo {
    pub(crate) fn new(every: Duration) -> Self {
        Self { every }
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
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET, "/") => Response::builder()
                .header(CONTENT_TYPE, "text/html; charset=utf-8")
                .body(Either::Right(Full::from(PAGE))),
            (&Method::GET, "/events") => {
                // Resume after the client's last id, as an upstream that keeps history would.
                let after = request
                    .headers()
                    .get("last-event-id")
                    .and_then(|id| std::str::from_utf8(id.as_bytes()).ok())
                    .and_then(|id| id.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .header("x-demo-stream", "ticks")
                    .body(Either::Left(Ticks::new(self.every, after + 1)))
            }
            (&Method::GET, "/index.html") => Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header(LOCATION, "/")
                .body(Either::Right(Full::default())),
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Either::Right(Full::from("not found: try / or /events\n"))),
        };
        ready(Ok(response.expect("static response parts are valid")))
    }
}

/// An endless event stream: one event with an increasing id per tick, the first at once.
#[derive(Debug)]
pub(crate) struct Ticks {
    interval: Interval,
    next_id: u64,
}

impl Ticks {
    fn new(every: Duration, first_id: u64) -> Self {
        let mut interval = interval(every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            interval,
            next_id: first_id,
        }
    }
}

impl Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.interval.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        let id = self.next_id;
        self.next_id += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let (h, m, s) = ((now / 3600) % 24, (now / 60) % 60, now % 60);
        let event = Event::builder()
            .id(id.to_string())
            // Shown to raw readers as `:source=demo` with --metadata-as-comment.
            .metadata("source", "demo")
            .data(format!(r#"{{"n":{id},"utc":"{h:02}:{m:02}:{s:02}"}}"#))
            .build()
            .expect("digits and JSON are valid event values");
        Poll::Ready(Some(Ok(Frame::data(event.encode()))))
    }
}
