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
//! Re-framing sends whole events only: an event that spans frames goes out when it ends. An
//! event with a metadata field is parsed and encoded again (its line endings become LF); every
//! other event goes out as the upstream's own bytes, not parsed at all (in a stack, while replay
//! re-frames a resuming client's stream, its events are encoded again too). Responses that are
//! not event streams pass through untouched.
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

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::HeaderName;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use memchr::memchr;
use tower_layer::Layer;
use tower_service::Service;

use crate::engine::{engine_body, EngineBody, Stages, Start};
use crate::future::{head_response_future, Exchange, OnResponse};
use crate::wire::{Event, METADATA_PREFIX};

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
    config: Arc<MetadataConfig>,
}

/// What the metadata stage of the stream engine needs.
#[derive(Clone, Debug)]
pub(crate) struct MetadataConfig {
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
            config: Arc::new(MetadataConfig {
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

impl MetadataConfig {
    /// The prefix that marks metadata fields.
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// True when events are changed: metadata fields rendered or stripped.
    pub(crate) fn rewrites(&self) -> bool {
        self.metadata != Metadata::Keep
    }

    fn is_sensitive(&self, name: &HeaderName) -> bool {
        SENSITIVE.contains(&name.as_str()) && !self.allowed_sensitive.contains(name)
    }

    /// The comment block of the listed headers, if any.
    pub(crate) fn header_block(&self, headers: &HeaderMap) -> Option<Bytes> {
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

    /// Renders or strips the metadata fields of `event`; true when it had any.
    pub(crate) fn frame(&self, event: &mut Event) -> bool {
        if self.metadata == Metadata::Keep || event.unknown_fields().is_empty() {
            return false;
        }
        let mut changed = false;
        for (name, value) in event.take_unknown_fields() {
            match name.strip_prefix(&self.prefix[..]) {
                Some(key) => {
                    changed = true;
                    if self.metadata == Metadata::Comments {
                        if let Some(line) = self.comment(key, &value) {
                            event.push_comment(line);
                        }
                    }
                }
                None => event.push_unknown_field(name, value),
            }
        }
        changed
    }
}

impl CommentMetadataLayer {
    /// The engine stage.
    pub(crate) fn stage(&self) -> Arc<MetadataConfig> {
        self.config.clone()
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
    /// Wraps `inner` with the defaults of [`CommentMetadataLayer::new`].
    pub fn new(inner: S) -> Self {
        CommentMetadataLayer::new().layer(inner)
    }

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
        if !exchange.has_plain_stream_body(response.headers()) {
            return response
                .map(|inner| CommentMetadataBody::from_engine(EngineBody::untouched(inner)));
        }
        let stages = Stages {
            metadata: Some(self.config),
            ..Stages::default()
        };
        let (parts, inner) = response.into_parts();
        let body = EngineBody::stream(inner, &stages, true, &parts.headers, Start::new());
        Response::from_parts(parts, CommentMetadataBody::from_engine(body))
    }
}

engine_body! {
    /// The response body of [`CommentMetadata`].
    pub struct CommentMetadataBody,
    dropping "the metadata block not yet sent, a byte order mark or trailers held back, and the parser with an event in progress are dropped."
}

#[cfg(test)]
mod tests;
