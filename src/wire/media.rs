//! Whether an exchange is an event stream and whether its body is encoded (the two tests every
//! layer shares), and `Accept` negotiation.

use http::header::{ACCEPT, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};

/// The Content-Type this crate writes: `text/event-stream; charset=utf-8`.
pub const EVENT_STREAM_UTF8: HeaderValue =
    HeaderValue::from_static("text/event-stream; charset=utf-8");

const ESSENCE: &[u8] = b"text/event-stream";

/// True when the response headers describe an event stream: the Content-Type's MIME essence is
/// `text/event-stream`, compared case-insensitively, with any parameters (even a bare `;`).
///
/// This is the test browsers apply before they open a stream, and the one test every layer of
/// this crate uses to decide whether to touch a response; everything else passes through.
///
/// ```
/// use http::{header::CONTENT_TYPE, HeaderMap};
/// use tower_sse::wire::is_event_stream;
///
/// let mut headers = HeaderMap::new();
/// assert!(!is_event_stream(&headers));
/// headers.insert(CONTENT_TYPE, "Text/Event-Stream;charset=UTF-8".parse().unwrap());
/// assert!(is_event_stream(&headers));
/// headers.insert(CONTENT_TYPE, "text/event-streams".parse().unwrap());
/// assert!(!is_event_stream(&headers));
/// ```
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|value| is_event_stream_type(value.as_bytes()))
}

/// True when the response is an event stream whose bytes a layer may read and insert into: an
/// event stream ([`is_event_stream`]) with no content coding (or `identity`).
///
/// A compressed stream (say, proxied from an upstream that compressed it) is opaque: layers
/// that parse or insert bytes (heartbeats, retry, lifetime, replay, metadata) leave it alone;
/// layers that only set headers or time the body still apply.
///
/// ```
/// use http::{header::{CONTENT_ENCODING, CONTENT_TYPE}, HeaderMap};
/// use tower_sse::wire::is_plain_event_stream;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(CONTENT_TYPE, "text/event-stream".parse().unwrap());
/// assert!(is_plain_event_stream(&headers));
/// headers.insert(CONTENT_ENCODING, "gzip".parse().unwrap());
/// assert!(!is_plain_event_stream(&headers));
/// ```
pub fn is_plain_event_stream(headers: &HeaderMap) -> bool {
    is_event_stream(headers) && !is_encoded(headers)
}

/// True when the body has a content coding: a `Content-Encoding` names a coding other than
/// `identity`. The one rule every layer of this crate applies.
///
/// `identity` (in any case) means "no coding", so `Content-Encoding: IDENTITY` is as plain as no
/// header at all. Every coding of every `Content-Encoding` line counts (`identity, gzip` is
/// encoded); a value that is not text is taken as encoded, so an unreadable header never lets a
/// layer write plain bytes into a body it cannot read.
///
/// ```
/// use http::{header::CONTENT_ENCODING, HeaderMap};
/// use tower_sse::wire::is_encoded;
///
/// let mut headers = HeaderMap::new();
/// assert!(!is_encoded(&headers));
/// headers.insert(CONTENT_ENCODING, "IDENTITY".parse().unwrap());
/// assert!(!is_encoded(&headers));
/// headers.insert(CONTENT_ENCODING, "gzip".parse().unwrap());
/// assert!(is_encoded(&headers));
/// ```
pub fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|value| match value.to_str() {
            Ok(value) => value
                .split(',')
                .map(str::trim)
                .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity")),
            Err(_) => true,
        })
}

/// True when a Content-Type value's MIME essence is `text/event-stream` (see [`is_event_stream`]).
pub fn is_event_stream_type(content_type: &[u8]) -> bool {
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default();
    trim(essence).eq_ignore_ascii_case(ESSENCE)
}

/// True when the request's `Accept` allows a `text/event-stream` answer.
///
/// Follows HTTP content negotiation: no `Accept` (or an empty one) accepts anything; otherwise the
/// most specific matching range decides (`text/event-stream`, then `text/*`, then `*/*`), and
/// `q=0` refuses. `Accept: application/json` or `text/event-stream;q=0, */*` rule it out.
/// Malformed entries (such as `q=2`) are skipped; a header with no usable entry counts as absent,
/// so a garbled header never locks a client out.
///
/// ```
/// use http::{header::ACCEPT, HeaderMap};
/// use tower_sse::wire::accepts_event_stream;
///
/// let mut headers = HeaderMap::new();
/// assert!(accepts_event_stream(&headers));
/// headers.insert(ACCEPT, "text/html, */*;q=0.8".parse().unwrap());
/// assert!(accepts_event_stream(&headers));
/// headers.insert(ACCEPT, "application/json".parse().unwrap());
/// assert!(!accepts_event_stream(&headers));
/// headers.insert(ACCEPT, "text/event-stream;q=0, */*".parse().unwrap());
/// assert!(!accepts_event_stream(&headers));
/// ```
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    let mut best: Option<(u8, u16)> = None;
    let mut any_range = false;
    for range in media_ranges(headers) {
        any_range = true;
        let Some(specificity) = range.specificity() else {
            continue;
        };
        best = match best {
            Some((s, _)) if s > specificity => best,
            Some((s, q)) if s == specificity => Some((s, q.max(range.q))),
            _ => Some((specificity, range.q)),
        };
    }
    match best {
        Some((_, q)) => q > 0,
        None => !any_range,
    }
}

/// True when the request's `Accept` names `text/event-stream` itself with a non-zero weight, as
/// `EventSource` does. Wildcards do not count: this says the client asked for a stream.
///
/// ```
/// use http::{header::ACCEPT, HeaderMap};
/// use tower_sse::wire::asks_for_event_stream;
///
/// let mut headers = HeaderMap::new();
/// headers.insert(ACCEPT, "text/event-stream".parse().unwrap());
/// assert!(asks_for_event_stream(&headers));
/// headers.insert(ACCEPT, "*/*".parse().unwrap());
/// assert!(!asks_for_event_stream(&headers));
/// ```
pub fn asks_for_event_stream(headers: &HeaderMap) -> bool {
    media_ranges(headers).any(|range| range.specificity() == Some(EXACT) && range.q > 0)
}

const EXACT: u8 = 3;

/// One entry of an `Accept` list; `q` in thousandths.
struct MediaRange<'a> {
    essence: &'a [u8],
    q: u16,
}

impl MediaRange<'_> {
    /// How specifically this range matches `text/event-stream`, if it matches at all.
    fn specificity(&self) -> Option<u8> {
        if self.essence.eq_ignore_ascii_case(ESSENCE) {
            Some(EXACT)
        } else if self.essence.eq_ignore_ascii_case(b"text/*") {
            Some(2)
        } else if self.essence == b"*/*" {
            Some(1)
        } else {
            None
        }
    }
}

fn media_ranges(headers: &HeaderMap) -> impl Iterator<Item = MediaRange<'_>> {
    headers
        .get_all(ACCEPT)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|entry| {
            let mut parts = entry.split(|&b| b == b';');
            let essence = trim(parts.next()?);
            if essence.is_empty() {
                return None;
            }
            let mut q = 1000;
            for param in parts {
                let param = trim(param);
                if param.len() >= 2 && param[..2].eq_ignore_ascii_case(b"q=") {
                    // A malformed weight makes the whole entry unusable.
                    q = parse_qvalue(&param[2..])?;
                }
            }
            Some(MediaRange { essence, q })
        })
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
pub(crate) fn parse_qvalue(value: &[u8]) -> Option<u16> {
    let (whole, fraction) = match value.iter().position(|&b| b == b'.') {
        Some(dot) => (&value[..dot], &value[dot + 1..]),
        None => (value, &b""[..]),
    };
    if fraction.len() > 3 || !fraction.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + fraction.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match whole {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

pub(crate) fn trim(bytes: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(ACCEPT, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn content_types() {
        for yes in [
            "text/event-stream",
            "text/event-stream;",
            "text/event-stream ; charset=utf-8",
            " TEXT/EVENT-STREAM",
            "text/event-stream;charset=\"utf-8\"",
        ] {
            assert!(is_event_stream_type(yes.as_bytes()), "{yes}");
        }
        for no in [
            "",
            "text/plain",
            "text/event-stream2",
            "text/ event-stream",
            "application/json; text/event-stream",
            "text/event",
        ] {
            assert!(!is_event_stream_type(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn negotiation() {
        assert!(accepts_event_stream(&accept(&[])));
        assert!(accepts_event_stream(&accept(&[""])));
        assert!(accepts_event_stream(&accept(&["text/event-stream"])));
        assert!(accepts_event_stream(&accept(&["text/*"])));
        assert!(accepts_event_stream(&accept(&[
            "application/json",
            "*/*;q=0.1"
        ])));
        assert!(accepts_event_stream(&accept(&[
            "text/*;q=0, text/event-stream"
        ])));
        assert!(!accepts_event_stream(&accept(&["application/json"])));
        assert!(!accepts_event_stream(&accept(&["text/*;q=0, */*"])));
        assert!(!accepts_event_stream(&accept(&["*/*;q=0"])));
        assert!(!accepts_event_stream(&accept(&[
            "text/event-stream;q=0.000"
        ])));
        // A malformed entry is skipped; with none usable, the header counts as absent.
        assert!(accepts_event_stream(&accept(&["text/event-stream;q=2"])));
        assert!(!accepts_event_stream(&accept(&[
            "text/event-stream;q=2, text/html"
        ])));
        assert!(accepts_event_stream(&accept(&["text/event-stream;q=0.5"])));
    }

    #[test]
    fn asking() {
        assert!(asks_for_event_stream(&accept(&[
            "text/html",
            "text/event-stream"
        ])));
        assert!(!asks_for_event_stream(&accept(&["text/event-stream;q=0"])));
        assert!(!asks_for_event_stream(&accept(&["text/*"])));
        assert!(!asks_for_event_stream(&accept(&[])));
    }

    #[test]
    fn qvalues() {
        assert_eq!(parse_qvalue(b"0"), Some(0));
        assert_eq!(parse_qvalue(b"0.5"), Some(500));
        assert_eq!(parse_qvalue(b"0.125"), Some(125));
        assert_eq!(parse_qvalue(b"1"), Some(1000));
        assert_eq!(parse_qvalue(b"1.000"), Some(1000));
        assert_eq!(parse_qvalue(b"1.5"), None);
        assert_eq!(parse_qvalue(b"0.1234"), None);
        assert_eq!(parse_qvalue(b""), None);
        assert_eq!(parse_qvalue(b"abc"), None);
    }
}
