//! Compression for event streams, flushed after every event (feature `compression`).
//!
//! tower-http's `CompressionLayer` skips `text/event-stream` on purpose: a compressor holds bytes
//! back, so events would stall. [`SseCompressionLayer`] compresses event streams and flushes the
//! compressor at the end of every complete event, so each event is decodable by the client the
//! moment it is sent: latency is that of the uncompressed stream, and JSON event streams still
//! shrink several times over. Several events that arrive in one frame share one flush.
//!
//! - Negotiation by `Accept-Encoding` with q-values among `gzip`, `deflate`, `br` and `zstd`
//!   (server preference `zstd`, `br`, `gzip`, `deflate` on ties); identity when the client did
//!   not ask or accepts none. The response gets `Content-Encoding`, `Vary: Accept-Encoding`, and
//!   loses `Content-Length`. Responses already encoded ([`is_encoded`]: `identity` is no
//!   coding), and responses that are not event streams, are left alone (compress those with
//!   tower-http).
//! - The first frame is the compressor's header, flushed at once, so headers and a first byte
//!   leave immediately, as [`PassthroughLayer`](crate::PassthroughLayer)'s initial comment would.
//!   (Passthrough sends no comment of its own in front of an encoded body, which would corrupt it.)
//! - One compressor per stream, with bounded memory. Measured heap per open stream
//!   (`cargo bench --bench compression --features compression`), defaults in bold:
//!
//! | encoding | levels | window | heap per stream |
//! |---|---|---|---|
//! | `gzip`, `deflate` | 0-9, **6** | 32 KiB | about 345 KiB |
//! | `br` | 0-11; **3** or lower / 4 / 5 and up | 64 KiB (`lgwin` 16) | 270 KiB / 530 KiB / about 33 MB |
//! | `zstd` | 1-22, **3** | 64 KiB (`window_log` 16) | about 33 KiB |
//!
//!   Brotli from quality 5 on switches to a hasher whose tables cost about 33 MB per stream:
//!   keep it at 4 or below unless streams are few.
//!
//! A response to `HEAD` gets the headers a `GET` would (`Content-Encoding` included) and no
//! compressor: there is no body to compress.
//!
//! Put it inside [`PassthroughLayer`](crate::PassthroughLayer) and outside the layers that add
//! events (heartbeats, replay, comment metadata), so everything the client gets is compressed.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::io::Write;
//! use http::{header, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::compression::SseCompressionLayer;
//!
//! let stream = service_fn(|_req: Request<()>| async {
//!     let response = Response::builder()
//!         .header(header::CONTENT_TYPE, "text/event-stream")
//!         .body(Full::new(bytes::Bytes::from_static(b"data: {\"price\":1}\n\n")))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let request = Request::builder().header("accept-encoding", "gzip").body(()).unwrap();
//! let response = SseCompressionLayer::new().layer(stream).oneshot(request).await.unwrap();
//! assert_eq!(response.headers()["content-encoding"], "gzip");
//!
//! let compressed = response.into_body().collect().await.unwrap().to_bytes();
//! let mut decoder = flate2::write::GzDecoder::new(Vec::new());
//! decoder.write_all(&compressed).unwrap();
//! assert_eq!(decoder.finish().unwrap(), b"data: {\"price\":1}\n\n");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, VARY};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::future::Exchange;
use crate::telemetry;
use crate::wire::media::{parse_qvalue, trim};
use crate::wire::{is_encoded, is_event_stream, Scanner};

/// A content coding this layer can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encoding {
    /// `gzip` (RFC 1952).
    Gzip,
    /// `deflate`: zlib-wrapped deflate (RFC 1950), as HTTP defines it.
    Deflate,
    /// `br`: brotli.
    Brotli,
    /// `zstd`.
    Zstd,
}

impl Encoding {
    /// Server preference when the client rates several the same.
    const PREFERENCE: [Encoding; 4] = [Self::Zstd, Self::Brotli, Self::Gzip, Self::Deflate];

    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Brotli => "br",
            Self::Zstd => "zstd",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Gzip => 0,
            Self::Deflate => 1,
            Self::Brotli => 2,
            Self::Zstd => 3,
        }
    }
}

/// Compresses event streams, flushing after every event; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct SseCompressionLayer {
    config: Config,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    /// Per encoding (by `Encoding::index`): offered, and at which level.
    levels: [Option<u32>; 4],
    /// Every frame of the inner body ends at an event boundary (the stack's engine below makes
    /// it so): a flush per frame, no scan of its own.
    frames_are_events: bool,
}

impl Default for SseCompressionLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl SseCompressionLayer {
    /// Offers every encoding at its default level (gzip and deflate 6, brotli 3, zstd 3).
    pub fn new() -> Self {
        Self {
            config: Config {
                levels: [Some(6), Some(6), Some(3), Some(3)],
                frames_are_events: false,
            },
        }
    }

    /// Offers `encoding` (true, the default) or not.
    pub fn offer(mut self, encoding: Encoding, offered: bool) -> Self {
        let default = Self::new().config.levels[encoding.index()];
        self.config.levels[encoding.index()] = offered.then_some(default).flatten();
        self
    }

    /// Compresses with `encoding` at `level` (gzip/deflate 0-9, brotli 0-11, zstd 1-22), and
    /// offers it.
    pub fn level(mut self, encoding: Encoding, level: u32) -> Self {
        self.config.levels[encoding.index()] = Some(level);
        self
    }

    /// Flushes after every frame instead of finding event boundaries: for the stack, whose
    /// engine below sends whole events per frame (its one scan serves both).
    pub(crate) fn frames_are_events(mut self) -> Self {
        self.config.frames_are_events = true;
        self
    }
}

impl Config {
    /// The encoding to use for a request, by its `Accept-Encoding`.
    fn negotiate(&self, headers: &HeaderMap) -> Option<Encoding> {
        let mut weights = [None::<u16>; 4];
        let mut wildcard = None;
        for value in headers.get_all(ACCEPT_ENCODING) {
            for entry in value.as_bytes().split(|&b| b == b',') {
                let mut parts = entry.split(|&b| b == b';');
                let token = trim(parts.next().unwrap_or_default());
                let mut q = Some(1000);
                for param in parts {
                    let param = trim(param);
                    if param.len() >= 2 && param[..2].eq_ignore_ascii_case(b"q=") {
                        q = parse_qvalue(&param[2..]);
                    }
                }
                let Some(q) = q else { continue };
                if token == b"*" {
                    wildcard = Some(q);
                }
                for encoding in Encoding::PREFERENCE {
                    if token.eq_ignore_ascii_case(encoding.token().as_bytes()) {
                        weights[encoding.index()] = Some(q);
                    }
                }
            }
        }
        Encoding::PREFERENCE
            .into_iter()
            .filter(|e| self.levels[e.index()].is_some())
            .filter_map(|e| Some((e, weights[e.index()].or(wildcard)?)))
            .filter(|(_, q)| *q > 0)
            // max_by_key keeps the last maximum: iterate preference in reverse.
            .rev()
            .max_by_key(|(_, q)| *q)
            .map(|(e, _)| e)
    }
}

impl<S> Layer<S> for SseCompressionLayer {
    type Service = SseCompression<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SseCompression {
            inner,
            config: self.config,
        }
    }
}

/// The service made by [`SseCompressionLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct SseCompression<S> {
    inner: S,
    config: Config,
}

impl<S> SseCompression<S> {
    /// Wraps `inner` with the defaults of [`SseCompressionLayer::new`].
    pub fn new(inner: S) -> Self {
        SseCompressionLayer::new().layer(inner)
    }

    /// The layer, to configure it.
    pub fn layer() -> SseCompressionLayer {
        SseCompressionLayer::new()
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SseCompression<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<SseCompressionBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let encoding = self.config.negotiate(request.headers());
        if self.config.frames_are_events && encoding.is_some() {
            request.extensions_mut().insert(crate::future::WholeEvents);
        }
        let exchange = Exchange::of(&request);
        ResponseFuture {
            future: self.inner.call(request),
            choice: encoding.map(|e| (e, self.config.levels[e.index()].unwrap_or_default())),
            exchange,
            frames_are_events: self.config.frames_are_events,
        }
    }
}

pin_project! {
    /// The response future of [`SseCompression`].
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        choice: Option<(Encoding, u32)>,
        exchange: Exchange,
        frames_are_events: bool,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("choice", &self.choice)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<SseCompressionBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let compress = is_event_stream(response.headers()) && !is_encoded(response.headers());
        let (mut parts, inner) = response.into_parts();
        if is_event_stream(&parts.headers) {
            // The answer depends on Accept-Encoding, encoded or not.
            parts
                .headers
                .append(VARY, HeaderValue::from_static("accept-encoding"));
        }
        let Some((encoding, level)) = this.choice.take().filter(|_| compress) else {
            return Poll::Ready(Ok(Response::from_parts(
                parts,
                SseCompressionBody {
                    kind: Kind::Untouched { inner },
                },
            )));
        };
        parts.headers.remove(CONTENT_LENGTH);
        parts
            .headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
        if this.exchange.is_head() {
            // The headers of a GET, and no body to compress: not even a compressor's header.
            let body = SseCompressionBody {
                kind: Kind::Untouched { inner },
            };
            return Poll::Ready(Ok(Response::from_parts(parts, body)));
        }
        let mut compressor = Compressor::new(encoding, level);
        // The header (and an empty flushed block) goes out at once.
        compressor.flush();
        let first = compressor.take();
        let body = SseCompressionBody {
            kind: Kind::Stream {
                inner,
                state: Box::new(StreamState {
                    compressor: Some(compressor),
                    counters: telemetry::CompressionCounters::new(encoding.token()),
                    scanner: (!*this.frames_are_events).then(Scanner::new),
                    first: Some(first),
                    stashed: None,
                }),
            },
        };
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

/// One compressor writing into a buffer that is taken after every write.
enum Compressor {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Compressor {
    fn new(encoding: Encoding, level: u32) -> Self {
        match encoding {
            Encoding::Gzip => Self::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.min(9)),
            )),
            Encoding::Deflate => Self::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.min(9)),
            )),
            // lgwin 16: a 64 KiB window keeps each stream's memory bounded.
            Encoding::Brotli => Self::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                level.min(11),
                16,
            ))),
            Encoding::Zstd => {
                let level = i32::try_from(level.clamp(1, 22)).unwrap_or(3);
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), level)
                    .expect("zstd accepts levels 1 to 22");
                // A 64 KiB window bounds memory per stream; errors leave the default.
                let _ = encoder.window_log(16);
                Self::Zstd(encoder)
            }
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Self::Gzip(e) => e,
            Self::Deflate(e) => e,
            Self::Brotli(e) => &mut **e,
            Self::Zstd(e) => e,
        }
    }

    fn write(&mut self, data: &[u8]) {
        // Writing into a Vec cannot fail.
        let _ = self.writer().write_all(data);
    }

    /// Makes everything written so far decodable (a sync flush).
    fn flush(&mut self) {
        let _ = self.writer().flush();
    }

    /// The compressed bytes produced so far.
    fn take(&mut self) -> Bytes {
        let buffer = match self {
            Self::Gzip(e) => e.get_mut(),
            Self::Deflate(e) => e.get_mut(),
            Self::Brotli(e) => e.get_mut(),
            Self::Zstd(e) => e.get_mut(),
        };
        Bytes::from(std::mem::take(buffer))
    }

    /// Ends the compressed stream and returns its last bytes.
    fn finish(self) -> Bytes {
        let out = match self {
            Self::Gzip(e) => e.finish().unwrap_or_default(),
            Self::Deflate(e) => e.finish().unwrap_or_default(),
            Self::Brotli(e) => e.into_inner(),
            Self::Zstd(e) => e.finish().unwrap_or_default(),
        };
        Bytes::from(out)
    }
}

pin_project! {
    /// The response body of [`SseCompression`].
    pub struct SseCompressionBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Untouched { #[pin] inner: B },
        // Boxed: the compressor's state is large, and a body that is not compressed (or an
        // idle stream's) should not carry its size.
        Stream { #[pin] inner: B, state: Box<StreamState> },
    }
}

struct StreamState {
    /// `None` once the compressed stream is finished.
    compressor: Option<Compressor>,
    counters: telemetry::CompressionCounters,
    /// Where events end, so each one is flushed as soon as it is complete (`None`: every frame
    /// ends one).
    scanner: Option<Scanner>,
    first: Option<Bytes>,
    /// Trailers wait until the compressed stream's end has gone out.
    stashed: Option<Box<Frame<Bytes>>>,
}

impl<B> SseCompressionBody<B> {
    inner_body_accessors!("the compressor and compressed bytes not yet sent are dropped, so what the inner body sends next is plain bytes after a compressed prefix: only useful before the first frame or after the end.");
}

impl<B: Default> Default for SseCompressionBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self {
            kind: Kind::Untouched {
                inner: B::default(),
            },
        }
    }
}

impl<B> fmt::Debug for SseCompressionBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Untouched { .. } => "Untouched",
            Kind::Stream { .. } => "Stream",
        };
        f.debug_tuple("SseCompressionBody").field(&kind).finish()
    }
}

impl StreamState {
    fn poll_frame<B: Body<Data = Bytes>>(
        &mut self,
        mut inner: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if let Some(frame) = self.stashed.take() {
            return Poll::Ready(Some(Ok(*frame)));
        }
        loop {
            let Some(compressor) = self.compressor.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match ready!(inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    let last = self.compressor.take().map(Compressor::finish);
                    return Poll::Ready(last.filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => {
                    let last = self.compressor.take().map(Compressor::finish);
                    match last.filter(|b| !b.is_empty()) {
                        Some(last) => {
                            self.stashed = Some(Box::new(trailers));
                            return Poll::Ready(Some(Ok(Frame::data(last))));
                        }
                        None => return Poll::Ready(Some(Ok(trailers))),
                    }
                }
            };
            // An unbounded scanner holds nothing, so it cannot fail.
            let boundary = match self.scanner.as_mut() {
                Some(scanner) => scanner.scan(&data).ok().flatten(),
                None => Some(data.len()),
            };
            match boundary {
                Some(end) => {
                    compressor.write(&data[..end]);
                    compressor.flush();
                    compressor.write(&data[end..]);
                }
                None => compressor.write(&data),
            }
            let out = compressor.take();
            self.counters.compressed(data.len(), out.len());
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for SseCompressionBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Untouched { inner } => inner.poll_frame(cx),
            KindProj::Stream { inner, state } => state.poll_frame(inner, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Untouched { inner } => inner.is_end_stream(),
            Kind::Stream { state, .. } => {
                state.compressor.is_none() && state.first.is_none() && state.stashed.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Untouched { inner } => inner.size_hint(),
            Kind::Stream { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
