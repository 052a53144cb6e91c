//! The event-stream wire core every layer shares.
//!
//! Everything in this crate that looks at the bytes of an event stream goes through this module,
//! so the rules of the [WHATWG event-stream format] live in exactly one place:
//!
//! | piece | what it does | who uses it |
//! |---|---|---|
//! | [`Scanner`] | knows where lines and events end across chunks, without building events | layers that only need event boundaries |
//! | [`Parser`] | builds [`Event`]s as zero-copy slices of the input chunks | layers that need fields (ids, data), tests |
//! | [`Event`], [`EventBuilder`] | a typed, validated event and its encoder, immune to field injection | demo sources, injected and replayed frames |
//! | [`is_event_stream`] and friends | the one "is this an SSE exchange?" predicate, and `Accept` negotiation | every layer |
//! | [`Limits`] | bounds on line and event size, so memory stays bounded whatever the input | scanner, parser |
//!
//! # Parsing rules, in short
//!
//! A line ends at CRLF, LF or a lone CR, and a CR at the end of one chunk followed by an LF at
//! the start of the next is one line ending. One UTF-8 byte order mark at the very start of the
//! stream is dropped. A blank line dispatches the event. Field values lose one leading space;
//! `id` values containing NUL are ignored; `retry` accepts ASCII digits only. An event that is
//! still incomplete when the stream ends is discarded, and its `id` is not applied.
//!
//! The stream is parsed as bytes: values are [`Bytes`](bytes::Bytes) and ids compare as bytes,
//! which is exactly equivalent to what a client that decodes UTF-8 first would see, because no
//! byte of a multi-byte UTF-8 sequence is ever a CR, LF, colon or space.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use tower_sse::wire::{Event, Parser};
//!
//! let mut parser = Parser::new();
//! // A CRLF split across two chunks is one line ending.
//! parser.push(Bytes::from_static(b"id: 7\r"));
//! parser.push(Bytes::from_static(b"\ndata: hello\n\n"));
//!
//! let event = parser.next_event().unwrap().unwrap();
//! assert_eq!(event.id(), Some(&b"7"[..]));
//! assert_eq!(event.data().as_deref(), Some("hello"));
//! assert!(parser.next_event().is_none());
//!
//! // Encoding a typed event and parsing it back gives the same event.
//! let built = Event::builder().event("tick").id("8").data("two\nlines").build().unwrap();
//! parser.push(built.encode());
//! assert_eq!(parser.next_event().unwrap().unwrap(), built);
//! ```
//!
//! [WHATWG event-stream format]: https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream

mod bom;
mod event;
// Only subscriptions follow the cursor on the scanner's pieces so far.
#[cfg(feature = "subscriptions")]
mod ids;
pub(crate) mod media;
mod parser;
mod raw;
mod reader;
mod scanner;

use std::fmt;

pub use event::{Event, EventBuilder, EventError, Field, METADATA_PREFIX};
pub use media::{
    accepts_event_stream, asks_for_event_stream, is_encoded, is_event_stream, is_event_stream_type,
    is_plain_event_stream, EVENT_STREAM_UTF8,
};
pub(crate) use parser::event_of_lines;
pub use parser::{ParseError, Parser};
pub use reader::{EventReader, ReadError};
pub use scanner::{Piece, Pieces, Scanner};

pub(crate) use bom::{starts_with_bom, BomFilter, BomStep, LeadingBom};
#[cfg(feature = "subscriptions")]
pub(crate) use ids::LastEventIds;
pub(crate) use raw::{Fed, RawBlock, RawEvents, Span as RawSpan};
#[cfg(test)]
pub(crate) use scanner::scanned;

/// The request header a reconnecting client sends its last event id in: `Last-Event-ID`.
pub(crate) const LAST_EVENT_ID: http::header::HeaderName =
    http::header::HeaderName::from_static("last-event-id");

/// Bounds on how much of an unfinished line or event a reader of the stream may hold.
///
/// A line or event larger than its bound ends the stream with a [`LimitError`]: the [`Parser`]
/// and every layer that parses report it as an error of the response body, so a hostile or broken
/// upstream can never make a layer hold more than `max_event_len` bytes per stream.
///
/// The defaults (1 MiB per line, 4 MiB per event) leave room for large JSON payloads; tighten them
/// where events are known to be small.
///
/// A parsed event also keeps at most [`kept_lines`](Limits::kept_lines) comment lines and as many
/// unknown-field lines (64 of each by default). Each kept line costs a handle of a few dozen bytes
/// however short it is, so without this cap an event made of bare `:` lines would cost many times
/// its size. Lines past the cap are still parsed and count towards the size limits; they are just
/// not kept in the [`Event`]. Clients ignore both kinds of line anyway.
///
/// ```
/// use tower_sse::wire::Limits;
///
/// let limits = Limits::default().max_line_len(16 * 1024).max_event_len(64 * 1024);
/// assert_eq!(limits.line_len(), 16 * 1024);
/// assert_eq!(Limits::unbounded().event_len(), usize::MAX);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    max_line: usize,
    max_event: usize,
    max_kept_lines: usize,
}

impl Limits {
    /// The default bound on one line: 1 MiB.
    pub const DEFAULT_MAX_LINE_LEN: usize = 1024 * 1024;
    /// The default bound on one event: 4 MiB.
    pub const DEFAULT_MAX_EVENT_LEN: usize = 4 * 1024 * 1024;
    /// The default number of comment lines, and of unknown-field lines, kept per event: 64.
    pub const DEFAULT_MAX_KEPT_LINES: usize = 64;

    /// No bound at all: for readers that hold none of the bytes they scan.
    pub const fn unbounded() -> Self {
        Self {
            max_line: usize::MAX,
            max_event: usize::MAX,
            max_kept_lines: usize::MAX,
        }
    }

    /// Keeps at most `lines` comment lines, and as many unknown-field lines, per parsed event.
    pub const fn max_kept_lines(mut self, lines: usize) -> Self {
        self.max_kept_lines = lines;
        self
    }

    /// The number of comment lines, and of unknown-field lines, kept per parsed event.
    pub const fn kept_lines(&self) -> usize {
        self.max_kept_lines
    }

    /// Bounds one line (its content, without the line ending) to `bytes`.
    pub const fn max_line_len(mut self, bytes: usize) -> Self {
        self.max_line = bytes;
        self
    }

    /// Bounds one event (every line of it, with line endings, up to its blank line) to `bytes`.
    pub const fn max_event_len(mut self, bytes: usize) -> Self {
        self.max_event = bytes;
        self
    }

    /// The bound on one line, in bytes.
    pub const fn line_len(&self) -> usize {
        self.max_line
    }

    /// The bound on one event, in bytes.
    pub const fn event_len(&self) -> usize {
        self.max_event
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: Self::DEFAULT_MAX_LINE_LEN,
            max_event: Self::DEFAULT_MAX_EVENT_LEN,
            max_kept_lines: Self::DEFAULT_MAX_KEPT_LINES,
        }
    }
}

/// A line or event exceeded its [`Limits`]; the stream cannot be read further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitError {
    /// A line was longer than [`Limits::line_len`] bytes.
    LineTooLong {
        /// The bound that was exceeded.
        limit: usize,
    },
    /// An event was larger than [`Limits::event_len`] bytes.
    EventTooLarge {
        /// The bound that was exceeded.
        limit: usize,
    },
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineTooLong { limit } => {
                write!(
                    f,
                    "event-stream line longer than the limit of {limit} bytes"
                )
            }
            Self::EventTooLarge { limit } => {
                write!(
                    f,
                    "event-stream event larger than the limit of {limit} bytes"
                )
            }
        }
    }
}

impl std::error::Error for LimitError {}
