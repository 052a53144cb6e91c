//! [`SubscriptionBody`]: a subscription's channel, moving its cursor as events are written.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;

use super::channels::Registration;
use super::SubscriptionStore;
use crate::body::InnerOrLocal;
use crate::wire::{is_plain_event_stream, LastEventIds, Piece, Scanner};

/// What a channel writes to the store without waiting: its cursor, and the removal of its
/// disposable subscription. Type-erased so that the body does not carry the store's type.
pub(super) trait Sink: Send + Sync {
    fn save_cursor(&self, id: &str, cursor: Bytes);
    fn remove(&self, id: &str);
}

impl<St: SubscriptionStore> Sink for St {
    fn save_cursor(&self, id: &str, cursor: Bytes) {
        SubscriptionStore::save_cursor(self, id, cursor);
    }

    fn remove(&self, id: &str) {
        SubscriptionStore::remove(self, id);
    }
}

/// An open channel of a subscription: registered, so a suspension can close it; a disposable
/// subscription is removed when it is dropped.
pub(super) struct Channel {
    registration: Registration,
    sink: Arc<dyn Sink>,
    disposable: bool,
}

impl Channel {
    /// A channel writing through `sink`, the subscriptions' store.
    pub(super) fn new(sink: Arc<dyn Sink>, registration: Registration, disposable: bool) -> Self {
        Self {
            registration,
            sink,
            disposable,
        }
    }

    /// The id of the subscription whose channel this is.
    pub(super) fn id(&self) -> &str {
        self.registration.id()
    }

    /// The response with the channel in its body: an event stream ends at an event boundary
    /// when the subscription is suspended or deleted, and moves the cursor as it goes.
    pub(super) fn wrap<B: Body<Data = Bytes>>(
        self,
        response: Response<B>,
    ) -> Response<SubscriptionBody<B>> {
        let stream = is_plain_event_stream(response.headers()).then(|| {
            Box::new(Stream {
                scanner: Scanner::new(),
                ids: LastEventIds::default(),
                phase: Phase::Live,
                grace: None,
            })
        });
        let closing = self.registration.signal().waiter();
        response.map(|inner| SubscriptionBody {
            kind: Kind::Channel {
                inner,
                closing,
                stream,
                channel: self,
            },
        })
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        tracing::debug!(target: "tower_sse", subscription = self.registration.id(), "subscription channel closed");
        if self.disposable {
            self.sink.remove(self.registration.id());
        }
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("subscription", &self.registration.id())
            .field("disposable", &self.disposable)
            .finish()
    }
}

/// How long an event in flight may take to end once the subscription is suspended.
const GRACE: Duration = Duration::from_secs(5);

/// An event stream on a channel: where its events end, and the id its reader would resume from.
struct Stream {
    scanner: Scanner,
    ids: LastEventIds,
    phase: Phase,
    /// Started when the stream must end inside an event.
    grace: Option<Pin<Box<Sleep>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Live,
    /// Suspended or deleted: forwarding up to the next event boundary.
    Ending,
    Done,
}

pin_project! {
    /// The response body of [`Subscribe`](super::Subscribe): an API answer, a subscription's
    /// channel, or the inner body untouched.
    pub struct SubscriptionBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // The inner body untouched, or an answer of the API.
        Plain { #[pin] inner: InnerOrLocal<B> },
        Channel {
            #[pin]
            inner: B,
            // Fires when the subscription is suspended or deleted.
            #[pin]
            closing: OwnedNotified,
            // `None` when the answer is not an event stream: it passes untouched.
            stream: Option<Box<Stream>>,
            channel: Channel,
        },
    }
}

impl<B> SubscriptionBody<B> {
    pub(super) fn untouched(inner: B) -> Self {
        Self {
            kind: Kind::Plain {
                inner: InnerOrLocal::inner(inner),
            },
        }
    }

    pub(super) fn answer(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Plain {
                inner: InnerOrLocal::local(bytes),
            },
        }
    }
}

impl<B> SubscriptionBody<B> {
    /// The inner service's body; `None` for an answer of the subscription API.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.kind {
            Kind::Plain { inner } => inner.get_ref(),
            Kind::Channel { inner, .. } => Some(inner),
        }
    }

    /// The inner service's body, mutably; `None` for an answer of the subscription API.
    pub fn get_mut(&mut self) -> Option<&mut B> {
        match &mut self.kind {
            Kind::Plain { inner } => inner.get_mut(),
            Kind::Channel { inner, .. } => Some(inner),
        }
    }

    /// Unwraps the inner service's body; `None` for an answer of the subscription API. A
    /// subscription's channel closes as when its client leaves (a disposable subscription is
    /// removed), and its stream state (bytes held back, the watch for suspension or deletion)
    /// is dropped.
    pub fn into_inner(self) -> Option<B> {
        match self.kind {
            Kind::Plain { inner } => inner.into_inner(),
            Kind::Channel { inner, .. } => Some(inner),
        }
    }
}

impl<B: Default> Default for SubscriptionBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self::untouched(B::default())
    }
}

impl<B> fmt::Debug for SubscriptionBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Plain { inner } => f.debug_tuple("SubscriptionBody").field(inner).finish(),
            Kind::Channel { channel, .. } => f
                .debug_tuple("SubscriptionBody::Channel")
                .field(channel)
                .finish(),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for SubscriptionBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Plain { inner } => inner.poll_frame(cx),
            KindProj::Channel {
                inner,
                closing,
                stream,
                channel,
            } => match stream {
                Some(stream) => stream.poll_frame(inner, closing, channel, cx),
                None => inner.poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { inner } => inner.is_end_stream(),
            Kind::Channel { inner, stream, .. } => match stream {
                Some(stream) if stream.phase == Phase::Done => true,
                _ => inner.is_end_stream(),
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { inner } => inner.size_hint(),
            Kind::Channel { inner, stream, .. } => match stream {
                // The stream may be cut short.
                Some(_) => SizeHint::new(),
                None => inner.size_hint(),
            },
        }
    }
}

impl Stream {
    /// The next frame: cut at the first event boundary once the subscription is closing, and
    /// the cursor moved to the id of the last event it completes. One scan serves both.
    fn poll_frame<B: Body<Data = Bytes>>(
        &mut self,
        inner: Pin<&mut B>,
        mut closing: Pin<&mut OwnedNotified>,
        channel: &Channel,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.phase {
            Phase::Done => return Poll::Ready(None),
            Phase::Live => {
                let signal = channel.registration.signal();
                if closing.as_mut().poll(cx).is_ready() || signal.is_triggered() {
                    if self.scanner.is_at_boundary() {
                        self.phase = Phase::Done;
                        return Poll::Ready(None);
                    }
                    self.phase = Phase::Ending;
                    self.grace = Some(Box::pin(tokio::time::sleep(GRACE)));
                }
            }
            Phase::Ending => {}
        }
        if let Some(grace) = &mut self.grace {
            if grace.as_mut().poll(cx).is_ready() {
                // The event in flight never ended; the client discards its start.
                self.phase = Phase::Done;
                return Poll::Ready(None);
            }
        }
        let frame = match ready!(inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => {
                self.phase = Phase::Done;
                return Poll::Ready(other);
            }
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let ending = self.phase == Phase::Ending;
        let (mut moved, mut cut) = (false, None);
        for piece in self.scanner.pieces(data) {
            // The scanner has no limits: it fails on nothing.
            let Ok(piece) = piece else { break };
            moved |= self.ids.piece(data, piece);
            if let (true, Piece::Dispatch { end }) = (ending, piece) {
                cut = Some(end);
                break;
            }
        }
        if moved {
            // A copy: a slice would keep the whole frame alive in the store.
            let cursor = Bytes::copy_from_slice(self.ids.last());
            channel.sink.save_cursor(channel.registration.id(), cursor);
        }
        let Some(end) = cut else {
            return Poll::Ready(Some(Ok(frame)));
        };
        self.phase = Phase::Done;
        let mut data = frame.into_data().unwrap_or_default();
        data.truncate(end);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}
