//! Events from chunks, as slices of the chunks.

use std::collections::VecDeque;
use std::fmt;

use bytes::{Bytes, BytesMut};
use memchr::memchr;

use super::{Event, LimitError, Limits, Piece, Scanner};

/// An incremental event-stream parser that follows the WHATWG rules to the letter.
///
/// Push chunks as they arrive with [`push`](Parser::push) and pull events with
/// [`next_event`](Parser::next_event). Values are zero-copy slices of the pushed chunks whenever a
/// line arrived in one chunk; only lines split across chunks and multi-line `data` are copied.
///
/// One [`Event`] is returned per dispatched block: that is, per blank line that ends a block with
/// at least one line. That includes blocks a browser fires no event for (an `id`-only block, a
/// comment, a `retry`), because they matter to middleware: an `id`-only block moves the client's
/// cursor. [`Event::is_message`] tells whether `EventSource` would fire a message.
///
/// The parser holds at most the unfinished line and the current event, both bounded by its
/// [`Limits`]; past them [`next_event`](Parser::next_event) returns a [`ParseError`] and the
/// parser stays failed.
///
/// ```
/// use bytes::Bytes;
/// use tower_sse::wire::Parser;
///
/// let mut parser = Parser::new();
/// parser.push(Bytes::from_static(b"\xEF\xBB\xBFid: 1\ndata: a\n\nid\n\ndata: b"));
///
/// let first = parser.next_event().unwrap().unwrap();
/// assert_eq!((first.id(), first.data().as_deref()), (Some(&b"1"[..]), Some("a")));
/// assert_eq!(parser.last_event_id(), b"1");
///
/// // An id-only block resets the client's cursor without firing an event.
/// let reset = parser.next_event().unwrap().unwrap();
/// assert!(!reset.is_message());
/// assert_eq!(parser.last_event_id(), b"");
///
/// // The last event never got its blank line: it is discarded at the end of the stream.
/// assert!(parser.next_event().is_none());
/// assert!(parser.finish());
/// ```
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    scanner: Scanner,
    /// Chunks pushed and not yet fully parsed; the front one is parsed from `pos`.
    input: VecDeque<Bytes>,
    pos: usize,
    /// The unfinished line from earlier chunks.
    line: BytesMut,
    block: Block,
    last_event_id: Bytes,
    reconnection_time: Option<u64>,
    /// Where the block being read began in the front chunk, while all of it is in that chunk.
    span: Span,
    /// The bytes of the last event handed out, when they were one piece of one chunk, and that
    /// chunk's length.
    last_raw: Option<(Bytes, usize)>,
}

/// Where the block being read began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Span {
    /// No line of it yet.
    #[default]
    None,
    /// At this offset of the front chunk.
    At(usize),
    /// In an earlier chunk, or a line of it spanned chunks.
    Split,
}

/// The fields of the block being read, before its blank line.
#[derive(Debug, Default)]
struct Block {
    has_lines: bool,
    event: Option<Bytes>,
    data: Data,
    id: Option<Bytes>,
    retry: Option<u64>,
    comments: Vec<Bytes>,
    fields: Vec<(Bytes, Bytes)>,
}

/// The data buffer, kept as a slice of the input until a second `data` line needs a copy.
#[derive(Debug, Default)]
enum Data {
    #[default]
    None,
    One(Bytes),
    Many(BytesMut),
}

/// Why a [`Parser`] (or a layer reading a stream) gave up on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseError {
    limit: LimitError,
}

impl ParseError {
    /// The limit that was exceeded.
    pub fn limit(&self) -> LimitError {
        self.limit
    }
}

impl From<LimitError> for ParseError {
    fn from(limit: LimitError) -> Self {
        Self { limit }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot parse event stream: {}", self.limit)
    }
}

impl std::error::Error for ParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.limit)
    }
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser for a new stream with the default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A parser for a new stream bounded by `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            scanner: Scanner::with_limits(limits),
            input: VecDeque::new(),
            pos: 0,
            line: BytesMut::new(),
            block: Block::default(),
            last_event_id: Bytes::new(),
            reconnection_time: None,
            span: Span::None,
            last_raw: None,
        }
    }

    /// Queues the next chunk of the stream. Cheap: nothing is parsed until
    /// [`next_event`](Parser::next_event) is called.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.input.push_back(chunk);
        }
    }

    /// Parses queued chunks up to the next dispatched block.
    ///
    /// `None` means every queued byte has been parsed; push more and call again.
    pub fn next_event(&mut self) -> Option<Result<Event, ParseError>> {
        let Self {
            limits,
            scanner,
            input,
            pos,
            line,
            block,
            last_event_id,
            reconnection_time,
            span,
            last_raw,
        } = self;
        loop {
            let chunk = input.front()?;
            let Some(piece) = scanner.next_piece(chunk, pos) else {
                input.pop_front();
                *pos = 0;
                if *span != Span::None {
                    *span = Span::Split;
                }
                continue;
            };
            let piece = match piece {
                Ok(piece) => piece,
                Err(limit) => {
                    input.clear();
                    *pos = 0;
                    *line = BytesMut::new();
                    *block = Block::default();
                    *span = Span::None;
                    return Some(Err(limit.into()));
                }
            };
            match piece {
                Piece::Bom { .. } => line.clear(),
                Piece::Partial { start } => {
                    line.extend_from_slice(&chunk[start..]);
                    *span = Span::Split;
                }
                Piece::Line {
                    start,
                    end,
                    continued: false,
                } => {
                    if *span == Span::None {
                        *span = Span::At(start);
                    }
                    let kept = limits.kept_lines();
                    block.take_line(chunk, &chunk[start..end], kept, reconnection_time);
                }
                Piece::Line {
                    start,
                    end,
                    continued: true,
                } => {
                    line.extend_from_slice(&chunk[start..end]);
                    *span = Span::Split;
                    let joined = line.split().freeze();
                    let kept = limits.kept_lines();
                    block.take_line(&joined, &joined, kept, reconnection_time);
                }
                Piece::Dispatch { end } => {
                    let started = std::mem::take(span);
                    if let Some(event) = block.dispatch(last_event_id) {
                        *last_raw = match started {
                            Span::At(start) => Some((chunk.slice(start..end), chunk.len())),
                            Span::None | Span::Split => None,
                        };
                        return Some(Ok(event));
                    }
                }
            }
        }
    }

    /// See [`Scanner::past_leading_bom`].
    pub(crate) fn past_leading_bom(&mut self) {
        self.scanner.past_leading_bom();
    }

    /// The stream ended: an incomplete event is discarded, and its `id` is not applied.
    ///
    /// Returns true when something was discarded (an unfinished line or event). Call it after
    /// [`next_event`](Parser::next_event) returned `None`; chunks still queued are discarded too.
    /// The parser can then read a new stream that continues the same cursor, as a reconnecting
    /// client does.
    pub fn finish(&mut self) -> bool {
        let discarded = self.block.has_lines || !self.line.is_empty() || !self.input.is_empty();
        self.input.clear();
        self.pos = 0;
        self.line.clear();
        self.block = Block::default();
        self.span = Span::None;
        self.last_raw = None;
        self.scanner = Scanner::with_limits(self.limits);
        discarded
    }

    /// The id a client would send as `Last-Event-ID` now: the id of the last dispatched block
    /// that had one (empty when there was none, or after an `id` reset).
    pub fn last_event_id(&self) -> &[u8] {
        &self.last_event_id
    }

    /// The reconnection time a client would use now, from the last valid `retry` field.
    ///
    /// A `retry` line takes effect when it is read, even inside an event that never completes.
    pub fn reconnection_time(&self) -> Option<std::time::Duration> {
        self.reconnection_time.map(std::time::Duration::from_millis)
    }

    /// The bytes of the event [`next_event`](Parser::next_event) returned last, from its first
    /// line to its blank line, when they were one piece of one pushed chunk; with that chunk's
    /// length (a slice keeps its whole chunk alive).
    pub(crate) fn raw_of_last(&mut self) -> Option<(Bytes, usize)> {
        self.last_raw.take()
    }

    /// True when part of an event (or a line) has been read but not yet dispatched.
    pub fn is_mid_event(&self) -> bool {
        !self.scanner.is_at_boundary()
    }

    /// The offset just past the first event boundary in `chunk`, were it pushed next; the parser
    /// is left as it is.
    pub(crate) fn boundary_in(&self, chunk: &[u8]) -> Option<usize> {
        let mut scanner = self.scanner.clone();
        let mut pos = 0;
        while let Some(piece) = scanner.next_piece(chunk, &mut pos) {
            match piece {
                Ok(Piece::Dispatch { end }) => return Some(end),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

/// The event of a block's complete lines (ranges of `block`, line endings left out), by the
/// parser's own field rules: for a reader that found the lines itself, so that nothing is
/// scanned twice. `None` for a block without lines.
pub(crate) fn event_of_lines(
    block: &Bytes,
    lines: &[std::ops::Range<usize>],
    kept_lines: usize,
) -> Option<Event> {
    let mut fields = Block::default();
    let mut reconnection_time = None;
    for line in lines {
        fields.take_line(
            block,
            &block[line.clone()],
            kept_lines,
            &mut reconnection_time,
        );
    }
    fields.dispatch(&mut Bytes::new())
}

impl Block {
    /// Interprets one complete, non-blank line; `line` is a slice of `owner`.
    fn take_line(
        &mut self,
        owner: &Bytes,
        line: &[u8],
        kept_lines: usize,
        reconnection_time: &mut Option<u64>,
    ) {
        self.has_lines = true;
        let (name, value) = match memchr(b':', line) {
            Some(0) => {
                if self.comments.len() < kept_lines {
                    self.comments.push(owner.slice_ref(&line[1..]));
                }
                return;
            }
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[line.len()..]),
        };
        match name {
            b"data" => self.data.append(owner, value),
            b"event" => self.event = Some(owner.slice_ref(value)),
            b"id" if memchr(0, value).is_none() => self.id = Some(owner.slice_ref(value)),
            // An id holding NUL is ignored, not an unknown field.
            b"id" => {}
            b"retry" => {
                if let Some(ms) = parse_retry(value) {
                    self.retry = Some(ms);
                    *reconnection_time = Some(ms);
                }
            }
            _ if self.fields.len() < kept_lines => self
                .fields
                .push((owner.slice_ref(name), owner.slice_ref(value))),
            _ => {}
        }
    }

    /// The blank line: applies the id and hands out the block, if it had any line.
    fn dispatch(&mut self, last_event_id: &mut Bytes) -> Option<Event> {
        if !self.has_lines {
            return None;
        }
        let block = std::mem::take(self);
        if let Some(id) = &block.id {
            *last_event_id = id.clone();
        }
        let data = match block.data {
            Data::None => (None, false),
            Data::One(data) => (Some(data), true),
            Data::Many(data) => (Some(data.freeze()), false),
        };
        Some(Event::from_parts(
            block.id,
            block.event.filter(|name| !name.is_empty()),
            data,
            block.retry,
            block.comments,
            block.fields,
        ))
    }
}

impl Data {
    fn append(&mut self, owner: &Bytes, value: &[u8]) {
        match self {
            Self::None => *self = Self::One(owner.slice_ref(value)),
            Self::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + 1 + value.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(b"\n");
                joined.extend_from_slice(value);
                *self = Self::Many(joined);
            }
            Self::Many(joined) => {
                joined.extend_from_slice(b"\n");
                joined.extend_from_slice(value);
            }
        }
    }
}

/// `retry` takes base-ten ASCII digits only; anything else, or a value too large for `u64`
/// milliseconds (which no client could honour either), is ignored.
fn parse_retry(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |ms, digit| {
        ms.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_digits_only() {
        assert_eq!(parse_retry(b"03000"), Some(3000));
        assert_eq!(parse_retry(b"0"), Some(0));
        for bad in [
            &b""[..],
            b"1000x",
            b"+5",
            b"5 ",
            b" 5",
            b"-1",
            b"1.5",
            b"\xd9\xa1",
        ] {
            assert_eq!(parse_retry(bad), None, "{bad:?}");
        }
        assert_eq!(parse_retry(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_retry(b"18446744073709551616"), None);
    }

    #[test]
    fn single_line_data_is_a_slice_of_the_chunk() {
        let chunk = Bytes::from_static(b"data: zero-copy\n\n");
        let mut parser = Parser::new();
        parser.push(chunk.clone());
        let event = parser.next_event().unwrap().unwrap();
        let data = event.data_bytes().unwrap();
        assert_eq!(data.as_ptr(), chunk[6..].as_ptr());
    }

    #[test]
    fn limit_error_fails_the_parser_for_good() {
        let mut parser = Parser::with_limits(Limits::default().max_event_len(16));
        parser.push(Bytes::from_static(b"data: 0123456789abcdef\n\n"));
        let err = parser.next_event().unwrap().unwrap_err();
        assert_eq!(err.limit(), LimitError::EventTooLarge { limit: 16 });
        parser.push(Bytes::from_static(b"data: x\n\n"));
        assert!(parser.next_event().unwrap().is_err());
        assert!(parser.next_event().is_none());
    }

    #[test]
    fn comment_and_unknown_field_lines_kept_are_capped() {
        let mut parser = Parser::with_limits(Limits::default().max_kept_lines(3));
        parser.push(Bytes::from(":\nx\n".repeat(100_000) + "data: d\n\n"));
        let event = parser.next_event().unwrap().unwrap();
        assert_eq!(event.comments().len(), 3);
        assert_eq!(event.unknown_fields().len(), 3);
        assert_eq!(event.data().as_deref(), Some("d"));
        assert_eq!(Limits::default().kept_lines(), 64);
    }

    #[test]
    fn memory_stays_bounded_on_an_endless_line() {
        let mut parser = Parser::with_limits(Limits::default().max_line_len(1024));
        let chunk = Bytes::from(vec![b'x'; 100]);
        let mut failed_after = None;
        for i in 0..1000 {
            parser.push(chunk.clone());
            if let Some(Err(_)) = parser.next_event() {
                failed_after = Some(i);
                break;
            }
            assert!(parser.line.len() <= 1024);
        }
        assert_eq!(failed_after, Some(10));
    }
}
