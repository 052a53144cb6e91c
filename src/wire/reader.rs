//! Events from an HTTP body.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;

use bytes::Buf;
use http::HeaderMap;
use http_body::Body;

use super::{Event, Limits, ParseError, Parser};

/// Reads [`Event`]s from an HTTP response body, as a client would.
///
/// A thin async loop around a [`Parser`]: it pulls frames from the body, parses data frames, keeps
/// trailers, and at the end of the body discards an incomplete event as the spec says. Handy in
/// tests (`tower::ServiceExt::oneshot` a request, read the events) and in clients.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use http_body_util::Full;
/// use tower_sse::wire::EventReader;
///
/// let body = Full::new(bytes::Bytes::from_static(b"id: 1\ndata: hi\n\ndata: cut off"));
/// let mut reader = EventReader::new(body);
///
/// let event = reader.next_event().await.unwrap().unwrap();
/// assert_eq!(event.data().as_deref(), Some("hi"));
/// assert!(reader.next_event().await.is_none());
/// assert!(reader.ended_mid_event());
/// assert_eq!(reader.parser().last_event_id(), b"1");
/// # }
/// ```
#[derive(Debug)]
pub struct EventReader<B> {
    body: Pin<Box<B>>,
    parser: Parser,
    trailers: Option<HeaderMap>,
    finished: bool,
    ended_mid_event: bool,
}

/// Why an [`EventReader`] stopped early.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReadError<E> {
    /// The body itself failed.
    Body(E),
    /// The stream broke a [`Limits`] bound.
    Parse(ParseError),
}

impl<E: fmt::Display> fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Body(error) => write!(f, "event-stream body failed: {error}"),
            Self::Parse(error) => error.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ReadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Body(error) => Some(error),
            Self::Parse(error) => Some(error),
        }
    }
}

impl<B: Body> EventReader<B> {
    /// Reads `body` with the default [`Limits`].
    pub fn new(body: B) -> Self {
        Self::with_limits(body, Limits::default())
    }

    /// Reads `body`, failing once a line or event exceeds `limits`.
    pub fn with_limits(body: B, limits: Limits) -> Self {
        Self {
            body: Box::pin(body),
            parser: Parser::with_limits(limits),
            trailers: None,
            finished: false,
            ended_mid_event: false,
        }
    }

    /// The next dispatched block, `None` at the end of the body (or after an error).
    pub async fn next_event(&mut self) -> Option<Result<Event, ReadError<B::Error>>> {
        loop {
            if let Some(parsed) = self.parser.next_event() {
                return Some(parsed.map_err(|error| {
                    self.finished = true;
                    ReadError::Parse(error)
                }));
            }
            if self.finished {
                return None;
            }
            match poll_fn(|cx| self.body.as_mut().poll_frame(cx)).await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let chunk = data.copy_to_bytes(data.remaining());
                        self.parser.push(chunk);
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(error)) => {
                    self.finished = true;
                    return Some(Err(ReadError::Body(error)));
                }
                None => {
                    self.finished = true;
                    self.ended_mid_event = self.parser.finish();
                }
            }
        }
    }

    /// Reads to the end and returns every block that fires a message (see [`Event::is_message`]).
    pub async fn messages(&mut self) -> Result<Vec<Event>, ReadError<B::Error>> {
        let mut messages = Vec::new();
        while let Some(event) = self.next_event().await {
            let event = event?;
            if event.is_message() {
                messages.push(event);
            }
        }
        Ok(messages)
    }

    /// The parser, for the client-side state it tracks (last event id, reconnection time).
    pub fn parser(&self) -> &Parser {
        &self.parser
    }

    /// The body's trailers, once they arrived.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// True when the body ended inside an event, which was then discarded.
    pub fn ended_mid_event(&self) -> bool {
        self.ended_mid_event
    }
}
