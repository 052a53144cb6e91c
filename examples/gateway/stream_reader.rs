//! The upstream side of a proxied event stream, read straight off its socket.
//!
//! A stream through hyper's client costs a connection task, the channel between the request
//! handle and that task, and a read buffer (8 KiB, refilled in place) for as long as the stream
//! lives: most of a quiet proxied stream's memory (see the README's "Sizing"). An event stream
//! needs none of it. It is one `GET` without a body, answered by one response that is never
//! reused, so this reader writes the request head, parses the response head, and then is the
//! response body itself: each poll reads what the socket has, takes the framing out of that
//! read in place and hands out the body's bytes (a small read's copied out of the thread's read
//! buffer, so that what waits to be sent holds no more than its bytes, in one allocation). A
//! quiet stream holds the socket, the framing state and nothing else.
//!
//! The framing follows RFC 9112, section 6: no body for `HEAD`, 1xx, 204 and 304; chunked when
//! it is the last transfer coding; else `Content-Length`; else until the upstream closes. Every
//! part of the head and of the chunk framing is bounded.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most a response head may take. Larger ones are refused (hyper's client allows ~400 KiB;
/// an event stream's head is a few hundred bytes).
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields a response head may have.
const MAX_HEADERS: usize = 100;
/// The most one chunk-size line (with extensions) or one trailer line may take.
const MAX_LINE: usize = 4 * 1024;
/// The most the trailer section may take.
const MAX_TRAILERS: usize = 64 * 1024;
/// The smallest and the largest read: a read that fills its buffer doubles the next one, a read
/// of less than a quarter halves it.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;

thread_local! {
    /// Where each thread reads small upstream chunks before copying them out.
    static SCRATCH: std::cell::RefCell<[u8; MIN_READ]> = const { std::cell::RefCell::new([0; MIN_READ]) };
}

/// Sends `request` (its body is not sent: callers use this for requests without one) to the
/// upstream at `address` (`host:port`) with `host` as its `Host`, and reads the response head;
/// the response's body reads the rest straight off the socket.
pub(crate) async fn send(
    address: &str,
    host: &str,
    request: &Request<()>,
) -> io::Result<Response<StreamBody>> {
    let mut io = TcpStream::connect(address).await?;
    // Events are small writes that must leave at once.
    io.set_nodelay(true)?;
    io.write_all(&request_head(host, request)).await?;
    let (response, mut rest) = read_head(&mut io).await?;
    let mut framing = Framing::of(request.method(), &response)?;
    // The body bytes that came with the head: copied, so that the head's buffer is not held.
    let decoded = framing.decode_in_place(&mut rest);
    let body = StreamBody {
        io: (!framing.is_done()).then_some(io),
        ready: Bytes::copy_from_slice(&rest[..decoded.data]),
        failure: decoded.error,
        framing,
        read_size: MIN_READ,
    };
    Ok(response.map(|()| body))
}

/// The request head as HTTP/1.1 puts it on the wire, with `host` as its `Host`.
fn request_head(host: &str, request: &Request<()>) -> Vec<u8> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(request.method().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(host.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in request.headers() {
        // Framing is this reader's: no body is sent.
        if [
            header::HOST,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Reads until a final response head is complete (skipping interim 1xx answers): the head, and
/// the body bytes that came with it.
async fn read_head(io: &mut TcpStream) -> io::Result<(Response<()>, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if !buf.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(&buf).map_err(invalid)? {
                httparse::Status::Complete(length) => {
                    let response = response_of(&parsed)?;
                    buf.advance(length);
                    if response.status().is_informational()
                        && response.status() != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Ok((response, buf));
                }
                httparse::Status::Partial if buf.len() >= MAX_HEAD => {
                    return Err(invalid("response head over 64 KiB"));
                }
                httparse::Status::Partial => {}
            }
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed before a complete response head",
            ));
        }
    }
}

fn response_of(parsed: &httparse::Response<'_, '_>) -> io::Result<Response<()>> {
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0)).map_err(invalid)?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut response = Response::builder().status(status).version(version);
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(invalid)?;
        let value = HeaderValue::from_bytes(field.value).map_err(invalid)?;
        response = response.header(name, value);
    }
    response.body(()).map_err(invalid)
}

fn invalid(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// The body of a response read by [`send`]: the upstream's socket and where its framing is.
pub(crate) struct StreamBody {
    /// `None` once the body has ended: the connection is closed, never reused.
    io: Option<TcpStream>,
    /// Body bytes decoded from the latest read, not yet handed out.
    ready: Bytes,
    /// What was wrong with the latest read's framing, after the body bytes before it.
    failure: Option<io::Error>,
    framing: Framing,
    /// The size of the next read's buffer.
    read_size: usize,
}

impl fmt::Debug for StreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamBody")
            .field("open", &self.io.is_some())
            .field("ready", &self.ready.len())
            .field("failed", &self.failure.is_some())
            .field("framing", &self.framing)
            .finish()
    }
}

/// How the body ends, and how far it is.
#[derive(Debug)]
enum Framing {
    /// The body's bytes left to come.
    Length(u64),
    /// Everything until the upstream closes.
    UntilClose,
    Chunked(Chunk),
}

/// Where a chunked body is (RFC 9112, 7.1).
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Hex digits of the next chunk's size.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: whitespace, extensions, up to the end of the line.
    Extension {
        size: u64,
        length: usize,
    },
    /// The chunk's data, this many bytes still to come.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd {
        seen_cr: bool,
    },
    /// After the last chunk: trailer lines up to an empty one. `line` bytes into the current
    /// line, `total` into the section.
    Trailers {
        line: usize,
        total: usize,
    },
    Done,
}

impl Framing {
    fn of(method: &Method, response: &Response<()>) -> io::Result<Self> {
        let status = response.status();
        if method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Self::Length(0));
        }
        let headers = response.headers();
        if headers.contains_key(header::TRANSFER_ENCODING) {
            let last = list_items(headers.get_all(header::TRANSFER_ENCODING)).last();
            return Ok(match last {
                Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => {
                    Self::Chunked(Chunk::Size { size: 0, digits: 0 })
                }
                _ => Self::UntilClose,
            });
        }
        let mut lengths = headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(|length| {
                std::str::from_utf8(length.trim_ascii())
                    .ok()
                    .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|digits| digits.parse::<u64>().ok())
            });
        match lengths.next() {
            None => Ok(Self::UntilClose),
            Some(Some(length)) if lengths.all(|other| other == Some(length)) => {
                Ok(Self::Length(length))
            }
            Some(_) => Err(invalid("invalid or conflicting Content-Length")),
        }
    }

    fn is_done(&self) -> bool {
        matches!(self, Self::Length(0) | Self::Chunked(Chunk::Done))
    }
}

/// What decoding one read in place gave.
#[derive(Debug)]
struct Decoded {
    /// The body's bytes of the read, moved to its front: the read's first `data` bytes.
    data: usize,
    /// The framing went wrong after those bytes; nothing after the error was decoded.
    error: Option<io::Error>,
}

impl Framing {
    /// Takes the framing out of `read`, the next bytes off the socket: its body bytes end up at
    /// its front, in order (a chunk's data only moves toward the front, over its own framing),
    /// so a read becomes the body's bytes without another buffer. Bytes past the body's end are
    /// left out.
    fn decode_in_place(&mut self, read: &mut [u8]) -> Decoded {
        let data = match self {
            Self::Length(left) => take_counted(left, read.len()),
            Self::UntilClose => read.len(),
            Self::Chunked(chunk) => return chunk.decode_in_place(read),
        };
        Decoded { data, error: None }
    }
}

impl Chunk {
    fn decode_in_place(&mut self, read: &mut [u8]) -> Decoded {
        let (mut at, mut data) = (0, 0);
        while at < read.len() {
            match self {
                Self::Done => break,
                Self::Data(left) => {
                    let take = take_counted(left, read.len() - at);
                    read.copy_within(at..at + take, data);
                    at += take;
                    data += take;
                    if *left == 0 {
                        *self = Self::DataEnd { seen_cr: false };
                    }
                }
                _ => match self.step(read[at]) {
                    Ok(next) => {
                        *self = next;
                        at += 1;
                    }
                    Err(error) => {
                        return Decoded {
                            data,
                            error: Some(error),
                        }
                    }
                },
            }
        }
        Decoded { data, error: None }
    }

    /// The state after one framing byte.
    fn step(self, byte: u8) -> io::Result<Self> {
        Ok(match self {
            Self::Size { size, digits } => match (byte as char).to_digit(16) {
                Some(digit) if digits < 16 => Self::Size {
                    size: size << 4 | u64::from(digit),
                    digits: digits + 1,
                },
                Some(_) => return Err(invalid("chunk size over 64 bits")),
                None if digits == 0 => return Err(invalid("chunk size without digits")),
                None => Self::Extension { size, length: 0 }.step(byte)?,
            },
            Self::Extension { size, length } => match byte {
                b'\n' if size == 0 => Self::Trailers { line: 0, total: 0 },
                b'\n' => Self::Data(size),
                // CR is part of the line end; a bare one is tolerated like the other parsers do.
                _ if length >= MAX_LINE => return Err(invalid("chunk-size line over 4 KiB")),
                _ => Self::Extension {
                    size,
                    length: length + 1,
                },
            },
            Self::DataEnd { seen_cr } => match byte {
                b'\r' if !seen_cr => Self::DataEnd { seen_cr: true },
                b'\n' => Self::Size { size: 0, digits: 0 },
                _ => return Err(invalid("chunk data longer than its size")),
            },
            Self::Trailers { line, total } => match byte {
                // An empty line (nothing but its CR) ends the trailers, and the body.
                b'\n' if line <= 1 => Self::Done,
                b'\n' => Self::Trailers {
                    line: 0,
                    total: total + 1,
                },
                _ if line >= MAX_LINE || total >= MAX_TRAILERS => {
                    return Err(invalid("trailer section over its bound"))
                }
                _ => Self::Trailers {
                    line: line + 1,
                    total: total + 1,
                },
            },
            Self::Data(_) | Self::Done => self,
        })
    }
}

/// How many of `available` bytes belong to a chunk's data or a length-framed body with `left`
/// bytes to come, counted off `left`.
fn take_counted(left: &mut u64, available: usize) -> usize {
    let take = (*left).min(available as u64) as usize;
    *left -= take as u64;
    take
}

impl StreamBody {
    fn end(&mut self) {
        self.io = None;
        self.ready = Bytes::new();
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.ready)))));
            }
            if let Some(error) = this.failure.take() {
                this.end();
                return Poll::Ready(Some(Err(error)));
            }
            if this.framing.is_done() {
                this.end();
            }
            let Some(io) = &this.io else {
                return Poll::Ready(None);
            };
            if let Err(error) = ready!(io.poll_read_ready(cx)) {
                this.end();
                return Poll::Ready(Some(Err(error)));
            }
            // Small reads (an event at a time) go through the thread's scratch buffer, and their
            // body bytes are copied out: what waits to be sent holds only its own bytes, in one
            // allocation, and no read buffer is allocated and freed per read. Reads that fill
            // their buffer grow it, and go straight into a buffer of their own.
            let read = if this.read_size == MIN_READ {
                SCRATCH.with_borrow_mut(|scratch| {
                    let read = read_draining(io, || {
                        let n = io.try_read(&mut scratch[..])?;
                        Ok((n, n < scratch.len()))
                    })?;
                    let decoded = this.framing.decode_in_place(&mut scratch[..read]);
                    this.ready = Bytes::copy_from_slice(&scratch[..decoded.data]);
                    this.failure = decoded.error;
                    Ok(read)
                })
            } else {
                let mut buf = BytesMut::with_capacity(this.read_size);
                read_draining(io, || {
                    let n = io.try_read_buf(&mut buf)?;
                    Ok((n, buf.capacity() > buf.len()))
                })
                .inspect(|_| {
                    let decoded = this.framing.decode_in_place(&mut buf);
                    buf.truncate(decoded.data);
                    this.ready = if decoded.data * 4 < buf.capacity() {
                        Bytes::copy_from_slice(&buf)
                    } else {
                        buf.freeze()
                    };
                    this.failure = decoded.error;
                })
            };
            match read {
                Ok(0) if matches!(this.framing, Framing::UntilClose) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.end();
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed in the middle of the body",
                    ))));
                }
                Ok(read) => {
                    this.read_size = if read == this.read_size {
                        (this.read_size * 2).min(MAX_READ)
                    } else if read < this.read_size / 4 {
                        (this.read_size / 2).max(MIN_READ)
                    } else {
                        this.read_size
                    };
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    this.end();
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.io.is_none() && self.ready.is_empty() && self.failure.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

/// Reads what `io` has with `read_into`, which answers how many bytes it read and whether its
/// buffer had room left. A read that leaves room in the buffer has emptied the socket's receive
/// queue, so it also clears the socket's readiness, as a read that would block does: the next
/// poll waits for the next bytes instead of spending a system call to learn there are none
/// (nginx saves that call the same way). If bytes arrive between the read and the clearing,
/// tokio's readiness ticks keep them from being missed: a readiness event newer than the one
/// this read started from is never cleared.
fn read_draining(
    io: &TcpStream,
    mut read_into: impl FnMut() -> io::Result<(usize, bool)>,
) -> io::Result<usize> {
    let mut read = None;
    let cleared = io.try_io(Interest::READABLE, || {
        let (n, room_left) = read_into()?;
        read = Some(n);
        if n > 0 && room_left {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (cleared, read) {
        (Ok(n), _) | (Err(_), Some(n)) => Ok(n),
        (Err(error), None) => Err(error),
    }
}

/// The items of a comma-separated header field (RFC 9110, section 5.6.1), trimmed, empty ones
/// skipped.
pub(crate) fn list_items<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .into_iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes each read in turn: the body, and whether it ended.
    fn decode(mut framing: Framing, reads: &[&[u8]]) -> io::Result<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        for read in reads {
            let mut read = read.to_vec();
            let decoded = framing.decode_in_place(&mut read);
            out.extend_from_slice(&read[..decoded.data]);
            if let Some(error) = decoded.error {
                return Err(error);
            }
            if framing.is_done() {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }

    fn chunked(reads: &[&[u8]]) -> io::Result<(Vec<u8>, bool)> {
        decode(Framing::Chunked(Chunk::Size { size: 0, digits: 0 }), reads)
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let wire: &[u8] = b"9\r\ndata: 1\n\n\r\n19;name=value\r\n\
            data: two, longer event\n\n\r\n0\r\nx-trailer: 1\r\n\r\n";
        let expected = b"data: 1\n\ndata: two, longer event\n\n";
        for split in 0..wire.len() {
            let (left, right) = wire.split_at(split);
            let (data, ended) = chunked(&[left, right]).unwrap();
            assert_eq!(data, expected, "split at {split}");
            assert!(ended, "split at {split}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(chunked(&bytes).unwrap(), (expected.to_vec(), true));
    }

    #[test]
    fn a_read_of_several_chunks_becomes_one_run_of_body_bytes() {
        let mut framing = Framing::Chunked(Chunk::Size { size: 0, digits: 0 });
        let mut read = b"3\r\nabc\r\n2;x=y\r\nde\r\n1\r\nf".to_vec();
        let decoded = framing.decode_in_place(&mut read);
        assert_eq!(
            (&read[..decoded.data], decoded.error.is_none()),
            (&b"abcdef"[..], true)
        );
        // The last chunk goes on in the next read.
        let mut read = b"\r\n0\r\n\r\nafter the end".to_vec();
        let decoded = framing.decode_in_place(&mut read);
        assert_eq!(decoded.data, 0);
        assert!(framing.is_done());
    }

    #[test]
    fn body_bytes_before_a_framing_error_are_kept() {
        let mut framing = Framing::Chunked(Chunk::Size { size: 0, digits: 0 });
        let mut read = b"3\r\nabc\r\nzz\r\nmore".to_vec();
        let decoded = framing.decode_in_place(&mut read);
        assert_eq!(&read[..decoded.data], b"abc");
        assert_eq!(
            decoded.error.map(|error| error.kind()),
            Some(io::ErrorKind::InvalidData)
        );
    }

    #[test]
    fn a_length_framed_body_ends_at_its_length() {
        assert_eq!(
            decode(Framing::Length(5), &[b"ab", b"cdef", b"gh"]).unwrap(),
            (b"abcde".to_vec(), true)
        );
        assert_eq!(
            decode(Framing::UntilClose, &[b"ab", b"cd"]).unwrap(),
            (b"abcd".to_vec(), false)
        );
    }

    #[test]
    fn bare_line_feeds_are_tolerated() {
        let (data, ended) = chunked(&[b"3\nabc\n0\n\n"]).unwrap();
        assert_eq!((data.as_slice(), ended), (&b"abc"[..], true));
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"11111111111111111\r\n",
            b"3\r\nabcd\r\n",
        ] {
            assert!(
                chunked(&[wire]).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long_extension = [b"1;".as_slice(), &[b'x'; MAX_LINE + 1]].concat();
        assert!(chunked(&[&long_extension]).is_err());
        let endless_trailers = [b"0\r\n".as_slice(), &[b'x'; MAX_LINE + 1]].concat();
        assert!(chunked(&[&endless_trailers]).is_err());
    }

    fn framing(method: Method, status: u16, headers: &[(&str, &str)]) -> io::Result<Framing> {
        let mut response = Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        Framing::of(&method, &response.body(()).unwrap())
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let is = |f: io::Result<Framing>, want: &str| {
            let got = format!("{:?}", f.map_err(|e| e.kind()));
            assert!(got.starts_with(want), "{got} is not {want}");
        };
        is(framing(Method::GET, 200, &[]), "Ok(UntilClose");
        is(
            framing(Method::HEAD, 200, &[("content-length", "5")]),
            "Ok(Length(0)",
        );
        is(framing(Method::GET, 204, &[]), "Ok(Length(0)");
        is(
            framing(Method::GET, 304, &[("content-length", "5")]),
            "Ok(Length(0)",
        );
        is(
            framing(Method::GET, 200, &[("content-length", "5")]),
            "Ok(Length(5)",
        );
        is(
            framing(Method::GET, 200, &[("content-length", "5, 5")]),
            "Ok(Length(5)",
        );
        is(
            framing(
                Method::GET,
                200,
                &[("content-length", "5"), ("content-length", "6")],
            ),
            "Err(InvalidData",
        );
        is(
            framing(Method::GET, 200, &[("content-length", "-1")]),
            "Err(InvalidData",
        );
        is(
            framing(Method::GET, 200, &[("content-length", "+5")]),
            "Err(InvalidData",
        );
        is(
            framing(
                Method::GET,
                200,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "5"),
                ],
            ),
            "Ok(Chunked",
        );
        is(
            framing(Method::GET, 200, &[("transfer-encoding", "chunked, gzip")]),
            "Ok(UntilClose",
        );
    }
}
