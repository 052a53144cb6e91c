//! Response body machinery shared by several layers.
//!
//! Crate-private: each layer's public body is its own newtype around these (see
//! [`shared_body!`]), so none of them appears in a public signature.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::telemetry::{self, Close};
use crate::wire::BomFilter;

/// The inner body's frames, as a layer that inserts bytes of its own forwards them.
///
/// Once the layer has sent bytes before the inner body's first byte, a leading BOM from the inner
/// body would no longer be leading (see [`BomFilter`]); [`drop_leading_bom`] turns on dropping it.
/// While a possible BOM is held back, a trailers frame waits behind it; and the inner body is never
/// polled again after it ended.
///
/// [`drop_leading_bom`]: InnerFrames::drop_leading_bom
#[derive(Debug)]
pub(crate) struct InnerFrames {
    bom: BomFilter,
    seen_data: bool,
    // Boxed: a frame waits here only when trailers follow a held BOM, and inline it would make
    // every idle stream carry a header map's worth of bytes.
    stashed: Option<Box<Frame<Bytes>>>,
    ended: bool,
}

impl InnerFrames {
    pub(crate) const fn new() -> Self {
        Self {
            bom: BomFilter::off(),
            seen_data: false,
            stashed: None,
            ended: false,
        }
    }

    /// The layer sends bytes before the inner body's first byte: drop its leading BOM, if any.
    /// True when it will be dropped here: a reader of the frames then sees a stream already
    /// past its start (a mark that follows is content).
    pub(crate) fn drop_leading_bom(&mut self) -> bool {
        if !self.seen_data {
            self.bom = BomFilter::dropping();
        }
        !self.seen_data
    }

    /// The next frame of the inner body, filtered.
    pub(crate) fn poll_frame<B: Body<Data = Bytes>>(
        &mut self,
        mut inner: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.stashed.take() {
            return Poll::Ready(Some(Ok(*frame)));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            let frame = match ready!(inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    self.ended = true;
                    // Ended inside a possible BOM: what was held is content.
                    return Poll::Ready(self.bom.finish().map(|b| Ok(Frame::data(b))));
                }
            };
            if self.bom.is_done() {
                self.seen_data |= frame.is_data();
                return Poll::Ready(Some(Ok(frame)));
            }
            match frame.into_data() {
                Ok(data) => {
                    self.seen_data = true;
                    if let Some(data) = self.bom.push(data) {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Err(frame) => {
                    let frame = match self.bom.finish() {
                        Some(held) => {
                            self.stashed = Some(Box::new(frame));
                            Frame::data(held)
                        }
                        None => frame,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    /// True when nothing is held and the inner body has nothing more.
    pub(crate) fn is_end_stream<B: Body>(&self, inner: &B) -> bool {
        self.stashed.is_none() && self.bom.is_done() && (self.ended || inner.is_end_stream())
    }
}

/// A frame of the layer's own first, then the inner body's frames (see [`InnerFrames`]).
#[derive(Debug)]
pub(crate) struct Prefixed {
    // Boxed: sent once, then every idle stream would carry its room.
    first: Option<Box<Bytes>>,
    frames: InnerFrames,
}

impl Prefixed {
    pub(crate) fn new(first: Option<Bytes>) -> Self {
        let mut frames = InnerFrames::new();
        if first.is_some() {
            frames.drop_leading_bom();
        }
        Self {
            first: first.map(Box::new),
            frames,
        }
    }

    pub(crate) fn poll_frame<B: Body<Data = Bytes>>(
        &mut self,
        inner: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(*first)))),
            None => self.frames.poll_frame(inner, cx),
        }
    }

    pub(crate) fn is_end_stream<B: Body>(&self, inner: &B) -> bool {
        self.first.is_none() && self.frames.is_end_stream(inner)
    }
}

pin_project! {
    /// The inner service's body untouched, or a short plain-text answer a layer gave itself
    /// (`406 Not Acceptable`, `504 Gateway Timeout`) without a body from the inner service.
    pub(crate) struct InnerOrLocal<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // Boxed: every body of an event stream has room for this variant, and such answers
        // are rare.
        Local { body: Option<Box<Bytes>> },
    }
}

impl<B> InnerOrLocal<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body of `bytes`, answered by a layer itself.
    #[cfg(feature = "subscriptions")]
    pub(crate) fn local(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Local {
                body: (!bytes.is_empty()).then(|| Box::new(bytes)),
            },
        }
    }

    /// A response with `status` and `text` as a `text/plain` body.
    pub(crate) fn plain_text(status: StatusCode, text: &'static str) -> Response<Self> {
        let mut response = Response::new(Self {
            kind: Kind::Local {
                body: Some(Box::new(Bytes::from_static(text.as_bytes()))),
            },
        });
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
        response
    }

    /// No body at all: the answer to a `HEAD` request (see [`head_parts`]).
    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Local { body: None },
        }
    }

    /// True when a layer answered by itself.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Local { .. })
    }

    pub(crate) fn get_ref(&self) -> Option<&B> {
        match &self.kind {
            Kind::Inner { body } => Some(body),
            Kind::Local { .. } => None,
        }
    }

    pub(crate) fn get_mut(&mut self) -> Option<&mut B> {
        match &mut self.kind {
            Kind::Inner { body } => Some(body),
            Kind::Local { .. } => None,
        }
    }

    pub(crate) fn into_inner(self) -> Option<B> {
        match self.kind {
            Kind::Inner { body } => Some(body),
            Kind::Local { .. } => None,
        }
    }

    pub(crate) fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Local { .. } => "Local",
        }
    }
}

impl<B: Default> Default for InnerOrLocal<B> {
    fn default() -> Self {
        Self::inner(B::default())
    }
}

impl<B> fmt::Debug for InnerOrLocal<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InnerOrLocal")
            .field(&self.kind_name())
            .finish()
    }
}

impl<B: Body<Data = Bytes>> Body for InnerOrLocal<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Local { body } => Poll::Ready(body.take().map(|b| Ok(Frame::data(*b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Local { body } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Local { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

pin_project! {
    /// The inner body untouched (a response that is not an event stream), or an event stream
    /// with a frame of the layer's own first: the body of the layers that only add a prefix.
    pub(crate) struct PrefixedBody<B> {
        #[pin]
        kind: PrefixedKind<B>,
    }
}

pin_project! {
    #[project = PrefixedProj]
    enum PrefixedKind<B> {
        Untouched { #[pin] inner: B },
        Stream { #[pin] inner: B, frames: Prefixed, tally: Option<StreamTally> },
        Empty { nothing: () },
    }
}

/// The head of a response to a `HEAD` request, its body dropped: a `HEAD` response carries no
/// body on any protocol, and HTTP/2 resets the stream of one that sends it anyway.
///
/// The headers stay those of a `GET`: an event stream keeps no `Content-Length` (it has no
/// length); any other response gets the `Content-Length` the server would have sent for the
/// body's exact size, if it had none.
pub(crate) fn head_parts<B: Body>(response: Response<B>) -> http::response::Parts {
    let (mut parts, body) = response.into_parts();
    if crate::wire::is_event_stream(&parts.headers) {
        parts.headers.remove(CONTENT_LENGTH);
    } else if let Some(length) = body.size_hint().exact() {
        parts
            .headers
            .entry(CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(length));
    }
    parts
}

/// Reports an event stream's life (opened, frames, how it closed) to telemetry; the client
/// leaving shows as the body dropped before its end.
#[derive(Debug)]
pub(crate) struct StreamTally {
    bytes: u64,
    closed: bool,
    counters: telemetry::FrameCounters,
}

impl StreamTally {
    pub(crate) fn open() -> Self {
        telemetry::stream_opened();
        Self {
            bytes: 0,
            closed: false,
            counters: telemetry::FrameCounters::new(),
        }
    }

    pub(crate) fn observe<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    self.counters.sent(data.len());
                }
            }
            Poll::Ready(Some(Err(_))) => self.close(Close::Error),
            Poll::Ready(None) => self.close(Close::End),
            Poll::Pending => {}
        }
    }

    fn close(&mut self, close: Close) {
        if !self.closed {
            self.closed = true;
            self.counters.report();
            telemetry::stream_closed(close, self.bytes);
        }
    }
}

impl Drop for StreamTally {
    fn drop(&mut self) {
        self.close(Close::ClientGone);
    }
}

impl<B> PrefixedBody<B> {
    pub(crate) fn untouched(inner: B) -> Self {
        Self {
            kind: PrefixedKind::Untouched { inner },
        }
    }

    /// No body at all: the answer to a `HEAD` request (see [`head_parts`]).
    pub(crate) fn empty() -> Self {
        Self {
            kind: PrefixedKind::Empty { nothing: () },
        }
    }

    /// An event stream: `first` (if any) goes out first; the inner body's leading BOM is then
    /// dropped.
    pub(crate) fn stream(inner: B, first: Option<Bytes>) -> Self {
        Self {
            kind: PrefixedKind::Stream {
                inner,
                frames: Prefixed::new(first),
                tally: None,
            },
        }
    }

    /// [`stream`](Self::stream), reporting the stream's life to telemetry (the passthrough
    /// layer's job: it sees every event stream once).
    pub(crate) fn counted_stream(inner: B, first: Option<Bytes>) -> Self {
        Self {
            kind: PrefixedKind::Stream {
                inner,
                frames: Prefixed::new(first),
                tally: Some(StreamTally::open()),
            },
        }
    }
}

impl<B> PrefixedBody<B> {
    pub(crate) fn get_ref(&self) -> Option<&B> {
        match &self.kind {
            PrefixedKind::Untouched { inner } | PrefixedKind::Stream { inner, .. } => Some(inner),
            PrefixedKind::Empty { .. } => None,
        }
    }

    pub(crate) fn get_mut(&mut self) -> Option<&mut B> {
        match &mut self.kind {
            PrefixedKind::Untouched { inner } | PrefixedKind::Stream { inner, .. } => Some(inner),
            PrefixedKind::Empty { .. } => None,
        }
    }

    pub(crate) fn into_inner(self) -> Option<B> {
        match self.kind {
            PrefixedKind::Untouched { inner } | PrefixedKind::Stream { inner, .. } => Some(inner),
            PrefixedKind::Empty { .. } => None,
        }
    }

    pub(crate) fn kind_name(&self) -> &'static str {
        match self.kind {
            PrefixedKind::Untouched { .. } => "Untouched",
            PrefixedKind::Stream { .. } => "Stream",
            PrefixedKind::Empty { .. } => "Empty",
        }
    }
}

impl<B: Default> Default for PrefixedBody<B> {
    fn default() -> Self {
        Self::untouched(B::default())
    }
}

impl<B> fmt::Debug for PrefixedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PrefixedBody")
            .field(&self.kind_name())
            .finish()
    }
}

impl<B: Body<Data = Bytes>> Body for PrefixedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            PrefixedProj::Untouched { inner } => inner.poll_frame(cx),
            PrefixedProj::Empty { .. } => Poll::Ready(None),
            PrefixedProj::Stream {
                mut inner,
                frames,
                tally,
            } => {
                let polled = frames.poll_frame(inner.as_mut(), cx);
                if let Some(tally) = tally {
                    tally.observe(&polled);
                    // A server that is told the body ended (a lifetime or shutdown end frame, an
                    // inner body with a known end) polls no more and drops it: the stream ended
                    // here, not when the tally is dropped.
                    if matches!(polled, Poll::Ready(Some(Ok(_)))) && frames.is_end_stream(&*inner) {
                        tally.close(Close::End);
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            PrefixedKind::Untouched { inner } => inner.is_end_stream(),
            PrefixedKind::Stream { inner, frames, .. } => frames.is_end_stream(inner),
            PrefixedKind::Empty { .. } => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            PrefixedKind::Untouched { inner } => inner.size_hint(),
            // Bytes are added, and Content-Length is gone: an exact hint would bring it back.
            PrefixedKind::Stream { .. } => SizeHint::default(),
            PrefixedKind::Empty { .. } => SizeHint::with_exact(0),
        }
    }
}

/// Declares a layer's own public body: a newtype around one of this module's shared bodies
/// (`InnerOrLocal` or `PrefixedBody`), forwarding frames, end and size hint, with `Default`
/// (the inner body's default, untouched) and `get_ref`/`get_mut`/`into_inner`. `$none` ends the
/// sentence "The inner service's body": when there is none to give back.
macro_rules! shared_body {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($shared:ident), none when $none:literal
    ) => {
        pin_project_lite::pin_project! {
            $(#[$meta])*
            pub struct $name<B> {
                #[pin]
                body: $crate::body::$shared<B>,
            }
        }

        impl<B> $name<B> {
            pub(crate) fn from_shared(body: $crate::body::$shared<B>) -> Self {
                Self { body }
            }

            #[doc = concat!("The inner service's body; ", $none, ".")]
            pub fn get_ref(&self) -> Option<&B> {
                self.body.get_ref()
            }

            #[doc = concat!("The inner service's body, mutably; ", $none, ".")]
            pub fn get_mut(&mut self) -> Option<&mut B> {
                self.body.get_mut()
            }

            #[doc = concat!(
                "Unwraps the inner service's body; ", $none, ". Whatever this layer ",
                "had not sent yet (its own first frame, a held-back byte order mark or trailers) ",
                "is dropped."
            )]
            pub fn into_inner(self) -> Option<B> {
                self.body.into_inner()
            }
        }

        impl<B: Default> Default for $name<B> {
            /// The inner body's default, passed through untouched.
            fn default() -> Self {
                Self {
                    body: Default::default(),
                }
            }
        }

        impl<B> ::std::fmt::Debug for $name<B> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_tuple(stringify!($name))
                    .field(&self.body.kind_name())
                    .finish()
            }
        }

        impl<B: http_body::Body<Data = bytes::Bytes>> http_body::Body for $name<B> {
            type Data = bytes::Bytes;
            type Error = B::Error;

            fn poll_frame(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
                self.project().body.poll_frame(cx)
            }

            fn is_end_stream(&self) -> bool {
                self.body.is_end_stream()
            }

            fn size_hint(&self) -> http_body::SizeHint {
                self.body.size_hint()
            }
        }
    };
}
pub(crate) use shared_body;
