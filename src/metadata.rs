//! Headers and per-event metadata as `:key=value` comment lines.
//!
//! [`CommentMetadataLayer`] shows what a browser's `EventSource` never would to raw readers of a
//! stream (curl, custom clients, logs), as comment lines that every spec-conformant client
//! ignores, so the events they see do not change:
//!
//! - **headers as comments** ([`headers_as_comment`](CommentMetadataLayer::headers_as_comment)):
//!   selected response headers, as one comment block at the start of the stream;
//! - **metadata as comments** ([`metadata_as_comment`](CommentMetadataLayer::metadata_as_comment)):
//!   metadata attached with [`EventBuilder::metadata`](crate::wire::EventBuilder::metadata)
//!   travels as extension fields named `meta-<key>` (or any [`metadata_prefix`]); the layer
//!   turns each into a `:key=value` comment inside its event's block, before the fields. A
//!   proxied upstream that sends such fields is handled the same way.
//!
//! With metadata framing off, the layer strips the metadata fields, so clients never see them
//! unless you [`keep_metadata_fields`](CommentMetadataLayer::keep_metadata_fields).
//!
//! The two options side by side, for an upstream that answers with `x-request-id: 7f3a` and
//! sends `meta-trace: abc` `data: hi`:
//!
//! ```text
//! headers_as_comment(["x-request-id"])      metadata_as_comment(true)
//!
//! :x-request-id=7f3a                         :trace=abc
//!                                            data: hi
//! data: hi
//!                                            (with both: the header block first,
//!                                             then :trace=abc inside the event)
//! ```
//!
//! # Safety
//!
//! Nothing rendered can inject a field or an event. Header values cannot hold CR, LF or NUL
//! (`http` forbids them) and names are tokens. Metadata comes from single parsed lines, so it
//! holds no line break; an entry whose key is empty or holds `=`, or whose key or value holds a
//! NUL, or that is longer than [`max_comment_len`](CommentMetadataLayer::max_comment_len) (1 KiB by
//! default), is dropped rather than rendered. The builder rejects such metadata up front with an
//! [`EventError`](crate::wire::EventError).
//!
//! Sensitive headers (`set-cookie`, `cookie`, `authorization`, `proxy-authorization`,
//! `x-api-key`, `x-auth-token`) are never rendered, even when listed, unless named again in
//! [`allow_sensitive_header`](CommentMetadataLayer::allow_sensitive_header).
//!
//! Re-framing parses every event and encodes it again (line endings become LF); events that hold
//! no metadata come out with the same meaning. Responses that are not event streams pass
//! through untouched.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http::{header::{HeaderName, CONTENT_TYPE}, Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceExt};
//! use tower_layer::Layer;
//! use tower_sse::{metadata::CommentMetadataLayer, wire::Event};
//!
//! let upstream = service_fn(|_req: Request<()>| async {
//!     let event = Event::builder().metadata("trace", "abc").data("hi").build().unwrap();
//!     let response = Response::builder()
//!         .header(CONTENT_TYPE, "text/event-stream")
//!         .header("x-request-id", "7f3a")
//!         .header("set-cookie", "session=secret")
//!         .body(Full::new(event.encode()))
//!         .unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let layer = CommentMetadataLayer::new()
//!     .headers_as_comment([
//!         HeaderName::from_static("x-request-id"),
//!         HeaderName::from_static("set-cookie"),
//!     ])
//!     .metadata_as_comment(true);
//! let response = layer.layer(upstream).oneshot(Request::new(())).await.unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! // set-cookie is listed but sensitive: never rendered.
//! assert_eq!(body, ":x-request-id=7f3a\n\n:trace=abc\ndata: hi\n\n");
//! # }
//! ```
//!
//! [`metadata_prefix`]: CommentMetadataLayer::metadata_prefix

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::HeaderName;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use memchr::memchr;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::InnerFrames;
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::wire::{Event, Parser, METADATA_PREFIX};

const SENSITIVE: [&str; 6] = [
    "set-cookie",
    "cookie",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "x-auth-token",
];

/// What happens to metadata fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metadata {
    Comments,
    Strip,
    Keep,
}

/// Renders headers and metadata as comment lines; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct CommentMetadataLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    headers: Vec<HeaderName>,
    allowed_sensitive: Vec<HeaderName>,
    metadata: Metadata,
    prefix: Bytes,
    max_len: usize,
}

impl Default for CommentMetadataLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CommentMetadataLayer {
    /// No header comments; metadata fields are stripped.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                headers: Vec::new(),
                allowed_sensitive: Vec::new(),
                metadata: Metadata::Strip,
                prefix: Bytes::from_static(METADATA_PREFIX.as_bytes()),
                max_len: 1024,
            }),
        }
    }

    /// Writes these response headers (every value of each) as `:name=value` comments at the
    /// start of the stream; sensitive ones only if also allowed by name.
    pub fn headers_as_comment(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        Arc::make_mut(&mut self.config).headers = names.into_iter().collect();
        self
    }

    /// Lets one sensitive header (such as `authorization`) be rendered when it is listed.
    pub fn allow_sensitive_header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).allowed_sensitive.push(name);
        self
    }

    /// Renders metadata fields as `:key=value` comments (true) or strips them (false, the
    /// default).
    pub fn metadata_as_comment(mut self, enabled: bool) -> Self {
        Arc::make_mut(&mut self.config).metadata = if enabled {
            Metadata::Comments
        } else {
            Metadata::Strip
        };
        self
    }

    /// Leaves metadata fields as they are: clients see the raw extension fields.
    pub fn keep_metadata_fields(mut self) -> Self {
        Arc::make_mut(&mut self.config).metadata = Metadata::Keep;
        self
    }

    /// The prefix that marks metadata fields (default `meta-`).
    pub fn metadata_prefix(mut self, prefix: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).prefix = Bytes::from(prefix.into());
        self
    }

    /// Drops (rather than renders) a comment longer than `bytes` (default 1 KiB).
    pub fn max_comment_len(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_len = bytes;
        self
    }
}

impl Config {
    fn is_sensitive(&self, name: &HeaderName) -> bool {
        SENSITIVE.contains(&name.as_str()) && !self.allowed_sensitive.contains(name)
    }

    /// The comment block of the listed headers, if any.
    fn header_block(&self, headers: &HeaderMap) -> Option<Bytes> {
        let mut block = Event::default();
        for name in self.headers.iter().filter(|n| !self.is_sensitive(n)) {
            for value in headers.get_all(name) {
                if let Some(line) = self.comment(name.as_str().as_bytes(), value.as_bytes()) {
                    block.push_comment(line);
                }
            }
        }
        (!block.comments().is_empty()).then(|| block.encode())
    }

    /// `key=value`, or `None` when it cannot be rendered safely (see the module docs).
    fn comment(&self, key: &[u8], value: &[u8]) -> Option<Bytes> {
        let unsafe_key = key.is_empty() || memchr(b'=', key).is_some() || memchr(0, key).is_some();
        if unsafe_key || memchr(0, value).is_some() || key.len() + 1 + value.len() > self.max_len {
            return None;
        }
        let mut line = BytesMut::with_capacity(key.len() + 1 + value.len());
        line.extend_from_slice(key);
        line.extend_from_slice(b"=");
        line.extend_from_slice(value);
        Some(line.freeze())
    }

    /// Renders or strips the metadata fields of `event`.
    fn frame(&self, event: &mut Event) {
        for (name, value) in event.take_unknown_fields() {
            match name.strip_prefix(&self.prefix[..]) {
                Some(key) => {
                    if self.metadata == Metadata::Comments {
                        if let Some(line) = self.comment(key, &value) {
                            event.push_comment(line);
                        }
                    }
                }
                None => event.push_unknown_field(name, value),
            }
        }
    }
}

impl<S> Layer<S> for CommentMetadataLayer {
    type Service = CommentMetadata<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CommentMetadata {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`CommentMetadataLayer`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct CommentMetadata<S> {
    inner: S,
    layer: CommentMetadataLayer,
}

impl<S> CommentMetadata<S> {
    /// The layer, to configure it.
    pub fn layer() -> CommentMetadataLayer {
        CommentMetadataLayer::new()
    }

    inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CommentMetadata<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<CommentMetadataBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        ResponseFuture::new(
            Exchange::of(&request),
            self.inner.call(request),
            self.layer.clone(),
        )
    }
}

head_response_future! {
    /// The response future of [`CommentMetadata`].
    pub struct ResponseFuture for CommentMetadataLayer => CommentMetadataBody
}

impl<B> OnResponse<B> for CommentMetadataLayer {
    type Body = CommentMetadataBody<B>;

    fn on_response(
        self,
        exchange: Exchange,
        response: Response<B>,
    ) -> Response<CommentMetadataBody<B>> {
        let config = self.config;
        if !exchange.has_plain_stream_body(response.headers()) {
            return response.map(|inner| CommentMetadataBody {
                kind: Kind::Untouched { inner },
            });
        }
        let first = config.header_block(response.headers());
        let mut frames = InnerFrames::new();
        if first.is_some() {
            frames.drop_leading_bom();
        }
        response.map(|inner| CommentMetadataBody {
            kind: Kind::Stream {
                inner,
                state: StreamState {
                    first,
                    frames,
                    parser: Parser::new(),
                    ended: false,
                    config,
                },
            },
        })
    }
}

pin_project! {
    /// The response body of [`CommentMetadata`].
    pub struct CommentMetadataBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Untouched { #[pin] inner: B },
        Stream { #[pin] inner: B, state: StreamState },
    }
}

struct StreamState {
    first: Option<Bytes>,
    frames: InnerFrames,
    parser: Parser,
    ended: bool,
    config: Arc<Config>,
}

impl<B> CommentMetadataBody<B> {
    inner_body_accessors!("the metadata block not yet sent, a byte order mark or trailers held back, and the parser with an event in progress are dropped.");
}

impl<B: Default> Default for CommentMetadataBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self {
            kind: Kind::Untouched {
                inner: B::default(),
            },
        }
    }
}

impl<B> fmt::Debug for CommentMetadataBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Untouched { .. } => "Untouched",
            Kind::Stream { .. } => "Stream",
        };
        f.debug_tuple("CommentMetadataBody").field(&kind).finish()
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
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            let frame = match ready!(self.frames.poll_frame(inner.as_mut(), cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let data = match frame.into_data() {
                Ok(data) if self.config.metadata != Metadata::Keep => data,
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            self.parser.push(data);
            let mut out = BytesMut::new();
            while let Some(event) = self.parser.next_event() {
                let Ok(mut event) = event else {
                    // Too large to re-frame: end cleanly; the client reconnects.
                    self.ended = true;
                    break;
                };
                self.config.frame(&mut event);
                event.encode_into(&mut out);
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for CommentMetadataBody<B> {
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
            Kind::Stream { inner, state } => {
                state.ended || (state.first.is_none() && state.frames.is_end_stream(inner))
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
