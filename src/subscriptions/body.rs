//! [`SubscriptionBody`]: a subscription's channel, moving its cursor as events are written.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::channels::Registration;
use super::{SubscriptionStore, Subscriptions};
use crate::future::sealed::OnResponse;
use crate::lifetime::{LifetimeBody, LifetimeLayer};
use crate::wire::{is_plain_event_stream, ParseError, Parser};

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
    pub(super) fn new<St: SubscriptionStore>(
        subscriptions: Subscriptions<St>,
        registration: Registration,
        disposable: bool,
    ) -> Self {
        Self {
            registration,
            sink: Arc::new(subscriptions.store),
            disposable,
        }
    }

    /// The response with the channel in its body: an event stream ends at an event boundary
    /// when the subscription is suspended or deleted, and moves the cursor as it goes.
    pub(super) fn wrap<B: Body<Data = Bytes>>(
        self,
        response: Response<B>,
    ) -> Response<SubscriptionBody<B>> {
        let cursor = is_plain_event_stream(response.headers()).then(|| {
            Box::new(Cursor {
                parser: Parser::new(),
                saved: Bytes::new(),
            })
        });
        let ending = LifetimeLayer::new().shutdown(self.registration.signal());
        ending.on_response(response).map(|inner| SubscriptionBody {
            kind: Kind::Channel {
                inner,
                cursor,
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

/// Reads the events written, for the id a client would send as `Last-Event-ID`.
struct Cursor {
    parser: Parser,
    /// The cursor last written to the store.
    saved: Bytes,
}

impl Cursor {
    /// Reads `data`; the new cursor, if it moved.
    fn advance(&mut self, data: &Bytes) -> Result<Option<Bytes>, ParseError> {
        self.parser.push(data.clone());
        while let Some(event) = self.parser.next_event() {
            event?;
        }
        let current = self.parser.last_event_id();
        if current == &self.saved[..] {
            return Ok(None);
        }
        self.saved = Bytes::copy_from_slice(current);
        Ok(Some(self.saved.clone()))
    }
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
        Untouched { #[pin] inner: B },
        Answer { bytes: Option<Bytes> },
        Channel {
            #[pin]
            inner: LifetimeBody<B>,
            // `None` when the answer is not an event stream, or after a parse failure (the
            // cursor then stays where it was).
            cursor: Option<Box<Cursor>>,
            channel: Channel,
        },
    }
}

impl<B> SubscriptionBody<B> {
    pub(super) fn untouched(inner: B) -> Self {
        Self {
            kind: Kind::Untouched { inner },
        }
    }

    pub(super) fn answer(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Answer {
                bytes: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The id of the subscription whose channel this is.
    pub fn subscription_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Channel { channel, .. } => Some(channel.registration.id()),
            _ => None,
        }
    }
}

impl<B> fmt::Debug for SubscriptionBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Untouched { .. } => f.debug_tuple("SubscriptionBody::Untouched").finish(),
            Kind::Answer { .. } => f.debug_tuple("SubscriptionBody::Answer").finish(),
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
            KindProj::Untouched { inner } => inner.poll_frame(cx),
            KindProj::Answer { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            KindProj::Channel {
                inner,
                cursor,
                channel,
            } => {
                let polled = inner.poll_frame(cx);
                if let (Poll::Ready(Some(Ok(frame))), Some(reader)) = (&polled, cursor.as_mut()) {
                    if let Some(data) = frame.data_ref() {
                        match reader.advance(data) {
                            Ok(Some(moved)) => {
                                channel.sink.save_cursor(channel.registration.id(), moved);
                            }
                            Ok(None) => {}
                            Err(_) => *cursor = None,
                        }
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Untouched { inner } => inner.is_end_stream(),
            Kind::Answer { bytes } => bytes.is_none(),
            Kind::Channel { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Untouched { inner } => inner.size_hint(),
            Kind::Answer { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Channel { inner, .. } => inner.size_hint(),
        }
    }
}
