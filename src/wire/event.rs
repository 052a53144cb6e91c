//! The typed event and its encoder.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use memchr::{memchr, memchr2};

/// One block of an event stream: a message, or a block that only moves the cursor or comments.
///
/// Events come from the [`Parser`](super::Parser) (values are slices of the parsed chunks) or from
/// [`Event::builder`] (values are validated). Either way an `Event` can always be encoded without
/// injecting fields: ids, event types and comments never hold a line break, and `data` is split
/// into one `data:` line per line of the value.
///
/// ```
/// use std::time::Duration;
/// use tower_sse::wire::Event;
///
/// let event = Event::builder()
///     .event("price")
///     .id("42")
///     .retry(Duration::from_secs(3))
///     .data(" leading space\nsecond line")
///     .build()
///     .unwrap();
/// assert_eq!(
///     event.encode(),
///     "event: price\nid: 42\nretry: 3000\ndata:  leading space\ndata: second line\n\n"
/// );
///
/// // A line break in an id would inject a field: it is an error, never a panic.
/// assert!(Event::builder().id("1\ndata: forged").build().is_err());
/// ```
#[derive(Clone, Default)]
pub struct Event {
    id: Option<Bytes>,
    event: Option<Bytes>,
    data: Option<Bytes>,
    /// `data` holds no line break: it came from one `data` line (encoding needs no search).
    data_is_one_line: bool,
    retry: Option<u64>,
    comments: Vec<Bytes>,
    fields: Vec<(Bytes, Bytes)>,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.event == other.event
            && self.data == other.data
            && self.retry == other.retry
            && self.comments == other.comments
            && self.fields == other.fields
    }
}

impl Eq for Event {}

impl Event {
    /// Starts building an event.
    pub fn builder() -> EventBuilder {
        EventBuilder::default()
    }

    /// A block holding only a comment, such as a keep-alive: `:text` + blank line.
    ///
    /// Line breaks in `text` start further comment lines, so the comment cannot inject fields.
    ///
    /// ```
    /// use tower_sse::wire::Event;
    ///
    /// assert_eq!(Event::comment("ping").encode(), ":ping\n\n");
    /// assert_eq!(Event::comment("").encode(), ":\n\n");
    /// assert_eq!(Event::comment("a\ndata: x").encode(), ":a\n:data: x\n\n");
    /// ```
    pub fn comment(text: impl Into<String>) -> Self {
        Self {
            comments: split_lines(Bytes::from(text.into())),
            ..Self::default()
        }
    }

    /// An event as parsed; `data_is_one_line`: `data` came from a single `data` line.
    pub(crate) fn from_parts(
        id: Option<Bytes>,
        event: Option<Bytes>,
        (data, data_is_one_line): (Option<Bytes>, bool),
        retry: Option<u64>,
        comments: Vec<Bytes>,
        fields: Vec<(Bytes, Bytes)>,
    ) -> Self {
        Self {
            id,
            event,
            data,
            data_is_one_line,
            retry,
            comments,
            fields,
        }
    }

    pub(crate) fn set_id(&mut self, id: Bytes) {
        self.id = Some(id);
    }

    pub(crate) fn clear_id(&mut self) {
        self.id = None;
    }

    pub(crate) fn take_unknown_fields(&mut self) -> Vec<(Bytes, Bytes)> {
        std::mem::take(&mut self.fields)
    }

    pub(crate) fn push_unknown_field(&mut self, name: Bytes, value: Bytes) {
        self.fields.push((name, value));
    }

    pub(crate) fn push_comment(&mut self, comment: Bytes) {
        self.comments.push(comment);
    }

    /// The `id` of this block: `Some(b"")` resets the client's last event id.
    pub fn id(&self) -> Option<&[u8]> {
        self.id.as_deref()
    }

    /// The id as the shared bytes it was parsed from or built with.
    pub(crate) fn id_bytes(&self) -> Option<&Bytes> {
        self.id.as_ref()
    }

    /// The event type, if the block named one; clients use `message` otherwise.
    pub fn event_type(&self) -> Option<&[u8]> {
        self.event.as_deref()
    }

    /// [`id`](Self::id) as text, when it is UTF-8: assertions read `Some("2")`.
    ///
    /// ```
    /// use tower_sse::wire::Event;
    ///
    /// let event = Event::builder().id("2").event("tick").data("x").build().unwrap();
    /// assert_eq!(event.id_str(), Some("2"));
    /// assert_eq!(event.event_type_str(), Some("tick"));
    /// ```
    pub fn id_str(&self) -> Option<&str> {
        self.id().and_then(|id| std::str::from_utf8(id).ok())
    }

    /// [`event_type`](Self::event_type) as text, when it is UTF-8.
    pub fn event_type_str(&self) -> Option<&str> {
        self.event_type()
            .and_then(|event| std::str::from_utf8(event).ok())
    }

    /// The data as a client decodes it (invalid UTF-8 becomes U+FFFD), lines joined with LF.
    pub fn data(&self) -> Option<Cow<'_, str>> {
        self.data.as_deref().map(String::from_utf8_lossy)
    }

    /// The data as raw bytes, lines joined with LF.
    pub fn data_bytes(&self) -> Option<&Bytes> {
        self.data.as_ref()
    }

    /// The reconnection time this block sets.
    pub fn retry(&self) -> Option<Duration> {
        self.retry.map(Duration::from_millis)
    }

    /// The comment lines of this block, without their leading colon.
    pub fn comments(&self) -> &[Bytes] {
        &self.comments
    }

    /// Fields that clients ignore (unknown names), as `(name, value)` in the order they came.
    pub fn unknown_fields(&self) -> &[(Bytes, Bytes)] {
        &self.fields
    }

    /// True when `EventSource` fires a message for this block: it has `data`.
    pub fn is_message(&self) -> bool {
        self.data.is_some()
    }

    /// The number of bytes [`encode`](Event::encode) produces.
    pub fn encoded_len(&self) -> usize {
        let mut len = 1; // the blank line
        len += self.comments.iter().map(|c| c.len() + 2).sum::<usize>();
        len += self.event.as_ref().map_or(0, |e| e.len() + 8);
        len += self.id.as_ref().map_or(0, |id| id.len() + 5);
        len += self.retry.map_or(0, |ms| decimal_len(ms) + 8);
        len += self
            .fields
            .iter()
            .map(|(n, v)| n.len() + v.len() + 3 + usize::from(n.starts_with(BOM)))
            .sum::<usize>();
        match &self.data {
            Some(data) if self.data_is_one_line => len += data.len() + 7,
            Some(data) => for_each_line(data, |line| len += line.len() + 7),
            None => {}
        }
        len
    }

    /// Encodes the block and returns its id as a slice of the encoding (no second allocation).
    pub(crate) fn encode_with_id(&self) -> (Bytes, Option<Bytes>) {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_reserved(&mut buf);
        let bytes = buf.freeze();
        let id = self.id.as_ref().map(|id| {
            // The id line follows the comments and the event type, as `encode_into` writes them.
            let start = self.comments.iter().map(|c| c.len() + 2).sum::<usize>()
                + self.event.as_ref().map_or(0, |e| e.len() + 8)
                + 4;
            bytes.slice(start..start + id.len())
        });
        (bytes, id)
    }

    /// Encodes the block, ending with its blank line.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_reserved(&mut buf);
        buf.freeze()
    }

    /// Appends the encoded block to `buf`.
    ///
    /// Order: comments, `event`, `id`, `retry`, unknown fields, `data` lines, blank line. Every
    /// value is written after `": "`, so a value that starts with a space keeps it.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        self.encode_reserved(buf);
    }

    /// [`encode_into`](Event::encode_into) a buffer known to have room.
    fn encode_reserved(&self, buf: &mut BytesMut) {
        for comment in &self.comments {
            buf.put_u8(b':');
            buf.put_slice(comment);
            buf.put_u8(b'\n');
        }
        if let Some(event) = &self.event {
            put_field(buf, b"event", event);
        }
        if let Some(id) = &self.id {
            put_field(buf, b"id", id);
        }
        if let Some(ms) = self.retry {
            put_field(buf, b"retry", ms.to_string().as_bytes());
        }
        for (name, value) in &self.fields {
            if name.starts_with(BOM) {
                // A field name starting with a BOM only comes from a spoiled first line. Written
                // at the start of a stream, a layer or client would strip that BOM and revive the
                // field; as a comment it stays ignored wherever it lands.
                buf.put_u8(b':');
            }
            put_field(buf, name, value);
        }
        match &self.data {
            Some(data) if self.data_is_one_line => put_field(buf, b"data", data),
            Some(data) => for_each_line(data, |line| put_field(buf, b"data", line)),
            None => {}
        }
        buf.put_u8(b'\n');
    }
}

/// UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        let mut s = f.debug_struct("Event");
        if let Some(id) = &self.id {
            s.field("id", &text(id));
        }
        if let Some(event) = &self.event {
            s.field("event", &text(event));
        }
        if let Some(data) = &self.data {
            s.field("data", &text(data));
        }
        if let Some(retry) = self.retry {
            s.field("retry_ms", &retry);
        }
        if !self.comments.is_empty() {
            s.field(
                "comments",
                &self.comments.iter().map(text).collect::<Vec<_>>(),
            );
        }
        if !self.fields.is_empty() {
            let fields: Vec<_> = self
                .fields
                .iter()
                .map(|(n, v)| (text(n), text(v)))
                .collect();
            s.field("unknown_fields", &fields);
        }
        s.finish()
    }
}

fn put_field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value);
    buf.put_u8(b'\n');
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Calls `f` with each line of `value`, split where a client would split it: CRLF, LF, lone CR.
fn for_each_line(value: &[u8], mut f: impl FnMut(&[u8])) {
    let mut rest = value;
    while let Some(i) = memchr2(b'\n', b'\r', rest) {
        f(&rest[..i]);
        let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[i + skip..];
    }
    f(rest);
}

fn split_lines(value: Bytes) -> Vec<Bytes> {
    let mut lines = Vec::new();
    for_each_line(&value, |line| lines.push(value.slice_ref(line)));
    lines
}

/// The prefix of the extension fields that carry [`EventBuilder::metadata`].
pub const METADATA_PREFIX: &str = "meta-";

/// Builds a validated [`Event`]; errors are kept until [`build`](EventBuilder::build).
///
/// Values may hold any text. Line breaks in `data` become several `data:` lines (clients join
/// them with LF, so CRLF and CR read back as LF) and line breaks in a comment start new comment
/// lines; a line break in an id or event type, or a NUL in an id, is an [`EventError`].
#[derive(Clone, Debug, Default)]
#[must_use = "call `build` to get the event"]
pub struct EventBuilder {
    event: Event,
    error: Option<EventError>,
}

impl EventBuilder {
    /// Sets the data; line breaks in it make several `data:` lines.
    pub fn data(mut self, data: impl Into<String>) -> Self {
        self.event.data = Some(Bytes::from(data.into()));
        self
    }

    /// Sets the event type (`addEventListener` name in the browser).
    pub fn event(mut self, name: impl Into<String>) -> Self {
        let name = Bytes::from(name.into());
        if memchr2(b'\n', b'\r', &name).is_some() {
            self.fail(EventError::LineBreak(Field::Event));
        }
        self.event.event = Some(name);
        self
    }

    /// Sets the id; an empty id resets the client's last event id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        let id = Bytes::from(id.into());
        if memchr2(b'\n', b'\r', &id).is_some() {
            self.fail(EventError::LineBreak(Field::Id));
        } else if memchr(0, &id).is_some() {
            self.fail(EventError::NulInId);
        }
        self.event.id = Some(id);
        self
    }

    /// Sets the reconnection time, sent in whole milliseconds.
    pub fn retry(mut self, retry: Duration) -> Self {
        self.event.retry = Some(u64::try_from(retry.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Adds a comment; line breaks in it start further comment lines.
    pub fn comment(mut self, text: impl Into<String>) -> Self {
        let lines = split_lines(Bytes::from(text.into()));
        self.event.comments.extend(lines);
        self
    }

    /// Adds an extension field, which spec-conformant clients ignore.
    ///
    /// The name must be non-empty, hold no colon, CR, LF or NUL, and not be one of the spec's
    /// own fields (`data`, `event`, `id`, `retry`); the value must hold no CR, LF or NUL.
    /// Anything else is an [`EventError`], never an injected field.
    pub fn field(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (Bytes::from(name.into()), Bytes::from(value.into()));
        let reserved = matches!(&name[..], b"data" | b"event" | b"id" | b"retry");
        if name.is_empty() || reserved || memchr::memchr3(b':', b'\r', b'\n', &name).is_some() {
            self.fail(EventError::InvalidFieldName);
        } else if memchr(0, &name).is_some() || memchr(0, &value).is_some() {
            self.fail(EventError::Nul(Field::Extension));
        } else if memchr2(b'\n', b'\r', &value).is_some() {
            self.fail(EventError::LineBreak(Field::Extension));
        }
        self.event.fields.push((name, value));
        self
    }

    /// Attaches metadata: an extension field named [`METADATA_PREFIX`] + `key`, which the
    /// [`CommentMetadataLayer`](crate::metadata::CommentMetadataLayer) shows raw readers as a
    /// `:key=value` comment (or strips). The key must also hold no `=`, so the comment reads back
    /// unambiguously.
    ///
    /// ```
    /// use tower_sse::wire::Event;
    ///
    /// let event = Event::builder().metadata("trace", "abc123").data("x").build().unwrap();
    /// assert_eq!(event.encode(), "meta-trace: abc123\ndata: x\n\n");
    /// assert!(Event::builder().metadata("a=b", "x").build().is_err());
    /// assert!(Event::builder().metadata("k", "line\nbreak").build().is_err());
    /// ```
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        if key.contains('=') {
            self.fail(EventError::InvalidFieldName);
        }
        self.field(format!("{METADATA_PREFIX}{key}"), value)
    }

    /// The event, or the first error found while building it.
    pub fn build(self) -> Result<Event, EventError> {
        match self.error {
            Some(error) => Err(error),
            None => Ok(self.event),
        }
    }

    fn fail(&mut self, error: EventError) {
        self.error.get_or_insert(error);
    }
}

/// Why an [`EventBuilder`] refused a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventError {
    /// A CR or LF in a value that must stay on one line: it would inject fields.
    LineBreak(Field),
    /// A NUL in an id: clients ignore such an id, so the event would not move their cursor.
    NulInId,
    /// A NUL in a value that raw readers show as text.
    Nul(Field),
    /// An extension field name (or metadata key) that is empty, holds a colon, `=`, CR or LF,
    /// or names one of the spec's own fields.
    InvalidFieldName,
}

/// A field of an event, named in an [`EventError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// The `id` field.
    Id,
    /// The `event` field.
    Event,
    /// An extension field (or metadata).
    Extension,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Id => "id",
            Self::Event => "event",
            Self::Extension => "extension field",
        })
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineBreak(field) => write!(f, "the `{field}` value contains a line break"),
            Self::NulInId => f.write_str("the `id` value contains a NUL character"),
            Self::Nul(field) => write!(f, "the `{field}` value contains a NUL character"),
            Self::InvalidFieldName => f.write_str(
                "an extension field name must be non-empty, hold no colon, `=`, CR, LF or NUL, \
                 and not be data, event, id or retry",
            ),
        }
    }
}

impl std::error::Error for EventError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_is_exact() {
        let events = [
            Event::default(),
            Event::comment("x\r\ny"),
            Event::builder().data("").build().unwrap(),
            Event::builder().data("a\rb\r\nc\n").id("").build().unwrap(),
            Event::builder()
                .event("e")
                .id("i")
                .retry(Duration::from_millis(1234567))
                .comment("c")
                .data("d")
                .build()
                .unwrap(),
        ];
        for event in events {
            assert_eq!(event.encode().len(), event.encoded_len(), "{event:?}");
        }
    }

    #[test]
    fn encode_with_id_slices_the_id_out_of_the_encoding() {
        let event = Event::builder()
            .comment("c\nd")
            .event("tick")
            .id("42")
            .data("x")
            .build()
            .unwrap();
        let (bytes, id) = event.encode_with_id();
        assert_eq!(bytes, event.encode());
        assert_eq!(id.unwrap(), "42");
        assert_eq!(Event::comment("x").encode_with_id().1, None);
    }

    #[test]
    fn data_line_breaks_become_data_lines() {
        let event = Event::builder().data("a\rb\r\nc\n").build().unwrap();
        assert_eq!(event.encode(), "data: a\ndata: b\ndata: c\ndata: \n\n");
    }

    #[test]
    fn invalid_values_are_errors() {
        assert_eq!(
            Event::builder().event("a\rb").build(),
            Err(EventError::LineBreak(Field::Event))
        );
        assert_eq!(
            Event::builder().id("a\nb").build(),
            Err(EventError::LineBreak(Field::Id))
        );
        assert_eq!(
            Event::builder().id("\0").data("x").build(),
            Err(EventError::NulInId)
        );
        // The first error wins.
        assert_eq!(
            Event::builder().id("\0").event("\n").build(),
            Err(EventError::NulInId)
        );
        assert_eq!(
            EventError::LineBreak(Field::Id).to_string(),
            "the `id` value contains a line break"
        );
    }

    #[test]
    fn empty_id_resets() {
        let event = Event::builder().id("").build().unwrap();
        assert_eq!(event.encode(), "id: \n\n");
        assert!(!event.is_message());
    }

    #[test]
    fn huge_retry_saturates() {
        let event = Event::builder().retry(Duration::MAX).build().unwrap();
        assert_eq!(event.retry(), Some(Duration::from_millis(u64::MAX)));
    }
}
