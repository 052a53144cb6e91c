//! The client side of an HTTP/1 event stream, written straight to its socket.
//!
//! hyper's HTTP/1 server runs a dispatcher, a connection state, a read buffer and a write buffer
//! (8 KiB each) for every connection, and goes through all of them with every event: per event
//! it is most of what the gateway spends above a plain relay (README, "Sizing"). An event stream
//! needs little of it. Its request is a `GET` without a body, its response one endless chunked
//! body. So a connection starts here: request heads are read and parsed (with hyper's parser,
//! `httparse`, under the same bounds) and handed to the gateway's service; an event stream
//! answered with `200` is written to the socket by this module, each event chunk-framed and
//! sent with one `write`, and the connection waits for its next request here.
//!
//! Anything else goes to hyper with every byte read so far, and hyper serves the connection from
//! then on: a request that is not a plain `GET` (a body, `Expect`, `Upgrade`, `Connection`
//! other than `keep-alive`, HTTP/1.0), a head hyper would refuse (malformed, too large, too
//! many fields), and any response other than an event stream, which hyper writes as the answer
//! to the request it parses again. So the bytes of a request that could carry a body or change
//! the protocol are only ever framed by hyper: this module never guesses where a body ends.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tower_sse::lifetime::Triggered;
use tower_sse::wire::is_event_stream;

use crate::stream_reader::list_items;
use crate::BoxError;

/// The most header fields a request head may have: hyper's server default.
const MAX_HEADERS: usize = 100;
/// The first read of a request head; a head that fills it doubles the next, up to the limit.
const FIRST_READ: usize = 1024;
/// A write buffer grown past this by a client that fell behind is freed once it caught up.
const KEPT_WRITE_BUFFER: usize = 4 * 1024;

/// How a connection goes on after the requests served here.
pub(crate) enum Handoff<B> {
    /// The connection is over: the client left or timed out, the service asked to close, or
    /// the gateway shuts down.
    Closed(Result<(), BoxError>),
    /// hyper serves the rest of the connection. `read` is what was read from the socket and not
    /// answered yet; `response`, when set, answers its first request, already made.
    Hyper {
        read: Bytes,
        response: Option<Response<B>>,
    },
}

/// What the bounds of a connection are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// The longest request head, and the most that waits to be sent (`--http1-buffer`).
    pub(crate) buffer: usize,
    /// How long a request head may take to arrive (`--header-timeout`).
    pub(crate) header: Option<Duration>,
}

/// Serves the requests of an HTTP/1 connection that `call` answers with an event stream, until
/// one that hyper must serve; `shutdown` ends the connection between requests.
pub(crate) async fn serve<Io, B, F, Fut>(
    io: &mut Io,
    mut call: F,
    bounds: Bounds,
    shutdown: &mut Triggered,
) -> Handoff<B>
where
    Io: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnMut(Request<()>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
{
    let mut read = BytesMut::new();
    loop {
        let (request, head_len) = match read_head(io, &mut read, bounds, shutdown).await {
            Ok(Some(head)) => head,
            Ok(None) => {
                return Handoff::Hyper {
                    read: read.freeze(),
                    response: None,
                }
            }
            Err(ended) => return Handoff::Closed(ended),
        };
        // A client that leaves before its answer drops the call, and what it started upstream,
        // as hyper does.
        let response = tokio::select! {
            answered = call(request) => match answered {
                Ok(response) => response,
                Err(never) => match never {},
            },
            left = poll_fn(|cx| watch_client(&mut *io, &mut read, bounds.buffer, cx)) => {
                return Handoff::Closed(left.map(|_| ()));
            }
        };
        if !written_here(&response) {
            return Handoff::Hyper {
                read: read.freeze(),
                response: Some(response),
            };
        }
        read.advance(head_len);
        if read.is_empty() {
            // The head's buffer is not kept for the stream's life.
            read = BytesMut::new();
        }
        let keep_alive = !asks_to_close(response.headers());
        let (parts, body) = response.into_parts();
        let mut out = Vec::with_capacity(256);
        write_head(&mut out, &parts.headers);
        // The head is written: its fields are not kept for the stream's life.
        drop(parts);
        let body = pin!(body);
        let mut stream = Streaming {
            io: &mut *io,
            body,
            out,
            sent: 0,
            read: &mut read,
            bounds,
            ended: false,
        };
        match poll_fn(|cx| stream.poll(cx)).await {
            Ok(Streamed::Ended) => {}
            Ok(Streamed::ClientLeft) => return Handoff::Closed(Ok(())),
            Err(error) => return Handoff::Closed(Err(error)),
        }
        if !keep_alive || fired(shutdown).await {
            return Handoff::Closed(Ok(()));
        }
    }
}

/// Reads until `read` holds a complete request head. `Ok(Some)`: a request served here, with
/// the head's length; `Ok(None)`: one for hyper (or a head hyper refuses); `Err`: the connection
/// is over.
async fn read_head<Io: AsyncRead + Unpin>(
    io: &mut Io,
    read: &mut BytesMut,
    bounds: Bounds,
    shutdown: &mut Triggered,
) -> Result<Option<(Request<()>, usize)>, Result<(), BoxError>> {
    let started = tokio::time::Instant::now();
    loop {
        match parse(read) {
            Parsed::Request(request, len) => return Ok(Some((*request, len))),
            Parsed::Other => return Ok(None),
            // hyper answers a head that does not fit with 431.
            Parsed::Partial if read.len() >= bounds.buffer => return Ok(None),
            Parsed::Partial => {}
        }
        if read.len() == read.capacity() {
            let more = if read.is_empty() {
                FIRST_READ
            } else {
                read.len()
            };
            read.reserve(more.min(bounds.buffer - read.len()));
        }
        let waiting_for_a_request = read.is_empty();
        let deadline = bounds.header.map(|limit| started + limit);
        let got = tokio::select! {
            got = io.read_buf(read) => got,
            () = sleep_until(deadline) => return Err(Ok(())),
            // Between requests a shutdown closes the connection, as hyper's graceful shutdown
            // does with an idle one.
            () = &mut *shutdown, if waiting_for_a_request => return Err(Ok(())),
        };
        match got {
            // The client closed the connection, between requests or within a head.
            Ok(0) => return Err(Ok(())),
            Ok(_) => {}
            Err(error) => return Err(Err(error.into())),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Whether the shutdown has fired, without waiting for it.
async fn fired(shutdown: &mut Triggered) -> bool {
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *shutdown).poll(cx).is_ready())).await
}

/// What a request head in a buffer is.
enum Parsed {
    /// Not complete yet.
    Partial,
    /// A request served here, and the length of its head (boxed: the request is a few hundred
    /// bytes, and this is returned by value).
    Request(Box<Request<()>>, usize),
    /// A request for hyper, or a head it refuses.
    Other,
}

/// Parses a request head, and keeps it only if it is a `GET` with no body and nothing that
/// changes the connection: a request whose framing needs reading is hyper's to frame.
fn parse(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if head.method != Some("GET") || head.version != Some(1) {
        return Parsed::Other;
    }
    // Origin form only (`/path?query`): the others are for proxies and `OPTIONS`.
    let uri = match head.path {
        Some(path) if path.starts_with('/') => match Uri::try_from(path) {
            Ok(uri) => uri,
            Err(_) => return Parsed::Other,
        },
        _ => return Parsed::Other,
    };
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::Other;
        };
        let Ok(value) = HeaderValue::from_bytes(field.value) else {
            return Parsed::Other;
        };
        let plain = match name {
            header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::EXPECT
            | header::UPGRADE
            | header::TE => false,
            header::CONNECTION => only_keep_alive(&value),
            _ => true,
        };
        if !plain {
            return Parsed::Other;
        }
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Request(Box::new(request), len)
}

/// A `Connection` field that only asks for what HTTP/1.1 does anyway.
fn only_keep_alive(value: &HeaderValue) -> bool {
    list_items([value]).all(|option| option.eq_ignore_ascii_case(b"keep-alive"))
}

/// A response asking to close the connection after it.
fn asks_to_close(headers: &HeaderMap) -> bool {
    list_items(headers.get_all(header::CONNECTION))
        .any(|option| option.eq_ignore_ascii_case(b"close"))
}

/// An event stream with `200` and no framing of its own: the response written here.
fn written_here<B>(response: &Response<B>) -> bool {
    let headers = response.headers();
    response.status() == StatusCode::OK
        && is_event_stream(headers)
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
}

/// The status line (only a `200` is written here), the response's fields, `date` as hyper adds
/// it, and chunked framing.
fn write_head(out: &mut Vec<u8>, headers: &HeaderMap) {
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (name, value) in headers {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !headers.contains_key(header::DATE) {
        DATE.with_borrow_mut(|date| field(out, b"date", date.now()));
    }
    out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `date` field of the current second, formatted once per second and thread.
    static DATE: std::cell::RefCell<Date> = const { std::cell::RefCell::new(Date { second: 0, text: String::new() }) };
}

struct Date {
    second: u64,
    text: String,
}

impl Date {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        self.text.as_bytes()
    }
}

/// Appends one chunk of `data` in chunked framing.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut size = [0u8; 16];
    let digits = hex(data.len(), &mut size);
    out.reserve(digits.len() + data.len() + 4);
    out.extend_from_slice(digits);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789ABCDEF"[n & 0xF];
        n >>= 4;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// How a response written here ended.
enum Streamed {
    /// Its body ended and the client has all of it.
    Ended,
    /// The client closed the connection.
    ClientLeft,
}

/// A response body on its way to the client: frames are framed into `out` while less than the
/// buffer bound waits there, and sent as the socket takes them. The socket is read too, for
/// the client closing it (and a next request, kept in `read` within the same bound).
struct Streaming<'a, Io, B> {
    io: &'a mut Io,
    body: Pin<&'a mut B>,
    out: Vec<u8>,
    /// How much of `out` the socket took.
    sent: usize,
    read: &'a mut BytesMut,
    bounds: Bounds,
    ended: bool,
}

impl<Io, B> Streaming<'_, Io, B>
where
    Io: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Streamed, BoxError>> {
        loop {
            let mut bounded = false;
            while !self.ended {
                if self.out.len() - self.sent >= self.bounds.buffer {
                    bounded = true;
                    break;
                }
                match self.body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are dropped, as hyper does for a client that did not ask
                        // for them (no `TE: trailers` reaches this module).
                        if let Ok(data) = frame.into_data() {
                            if !data.is_empty() {
                                chunk(&mut self.out, &data);
                            }
                        }
                    }
                    // The stream breaks off without its last chunk: the client sees it end
                    // early, not complete.
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                    Poll::Ready(None) => {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                        self.ended = true;
                    }
                    Poll::Pending => break,
                }
            }
            while self.sent < self.out.len() {
                match Pin::new(&mut *self.io).poll_write(cx, &self.out[self.sent..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()))
                    }
                    Poll::Ready(Ok(n)) => self.sent += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                    Poll::Pending => break,
                }
            }
            if self.sent == self.out.len() {
                self.sent = 0;
                self.out.clear();
                if self.ended {
                    return Poll::Ready(Ok(Streamed::Ended));
                }
                if bounded {
                    // Room again for frames the bound held back.
                    continue;
                }
                // All sent, and the stream waits for its next event: a buffer a burst or a slow
                // client made grow is not kept for a quiet stream (a busy one keeps it).
                if self.out.capacity() > KEPT_WRITE_BUFFER {
                    self.out = Vec::new();
                }
            }
            return watch_client(&mut *self.io, self.read, self.bounds.buffer, cx);
        }
    }
}

/// Reads what the client sends while its request is answered: nothing, until it closes the
/// connection, which ends the exchange. A pipelined request is kept in `read` for later, up to
/// `limit`; past it the socket is no longer read.
fn watch_client<Io: AsyncRead + Unpin>(
    io: &mut Io,
    read: &mut BytesMut,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Streamed, BoxError>> {
    while read.len() < limit {
        let mut scratch = [0u8; 512];
        let room = scratch.len().min(limit - read.len());
        let mut buf = ReadBuf::new(&mut scratch[..room]);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                return Poll::Ready(Ok(Streamed::ClientLeft))
            }
            Poll::Ready(Ok(())) => read.extend_from_slice(buf.filled()),
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
            Poll::Pending => break,
        }
    }
    Poll::Pending
}

pin_project! {
    /// A socket whose first reads give back bytes already read from it.
    pub(crate) struct Rewind<Io> {
        read: Bytes,
        #[pin]
        io: Io,
    }
}

impl<Io> Rewind<Io> {
    pub(crate) fn new(io: Io, read: Bytes) -> Self {
        Self { read, io }
    }
}

impl<Io: AsyncRead> AsyncRead for Rewind<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.read.is_empty() {
            return this.io.poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        if this.read.is_empty() {
            *this.read = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<Io: AsyncWrite> AsyncWrite for Rewind<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_gets_are_served_here_and_the_rest_goes_to_hyper() {
        let here = |head: &str| matches!(parse(head.as_bytes()), Parsed::Request(..));
        assert!(here(
            "GET /events?a=1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
        ));
        assert!(here("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"));
        for head in [
            "HEAD / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\n Folded: x\r\n\r\n",
        ] {
            assert!(!here(head), "{head:?} should go to hyper");
        }
        assert!(matches!(
            parse(b"GET /events HTTP/1.1\r\nHost:"),
            Parsed::Partial
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
        assert!(!here(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
    }

    #[test]
    fn the_head_length_leaves_a_pipelined_request_in_place() {
        let two = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let Parsed::Request(request, len) = parse(two) else {
            panic!("a request")
        };
        assert_eq!(request.uri(), "/a");
        assert_eq!(&two[len..], b"GET /b HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn chunks_are_framed_with_hex_sizes() {
        let mut out = Vec::new();
        chunk(&mut out, b"data: x\n\n");
        chunk(&mut out, &[b'a'; 0x1ab]);
        assert!(out.starts_with(b"9\r\ndata: x\n\n\r\n1AB\r\n"));
        assert!(out.ends_with(b"a\r\n"));
        let mut buf = [0; 16];
        assert_eq!(hex(0, &mut buf), b"0");
        assert_eq!(hex(usize::MAX, &mut buf).len(), 16);
    }

    #[test]
    fn connection_tokens() {
        let value = |s: &'static str| HeaderValue::from_static(s);
        assert!(only_keep_alive(&value("keep-alive")));
        assert!(only_keep_alive(&value(" Keep-Alive , ")));
        assert!(!only_keep_alive(&value("keep-alive, x-hop")));
        let mut headers = HeaderMap::new();
        assert!(!asks_to_close(&headers));
        headers.append(header::CONNECTION, value("keep-alive, Close"));
        assert!(asks_to_close(&headers));
    }
}
