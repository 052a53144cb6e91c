//! [`SubscribeBody`]: a subscription's channel, moving its cursor as events are written.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::channels::Registration;
use super::SubscriptionStore;
use crate::body::InnerOrLocal;
use crate::engine::{Cursor, EngineBody, NoStore, Stages, Start};
use crate::lifetime::LifetimeConfig;
use crate::wire::is_plain_event_stream;

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
    ) -> Response<SubscribeBody<B>> {
        let (parts, inner) = response.into_parts();
        let body = if is_plain_event_stream(&parts.headers) {
            let stages = Stages {
                lifetime: Some(LifetimeConfig::on_signal(
                    self.registration.signal().clone(),
                    GRACE,
                )),
                ..Stages::default()
            };
            let mut start = Start::new();
            start.cursor = Some(Box::new(SavedCursor {
                sink: self.sink.clone(),
                id: self.registration.id().into(),
            }));
            EngineBody::stream(inner, &stages, true, &parts.headers, start)
        } else {
            EngineBody::untouched(inner)
        };
        Response::from_parts(
            parts,
            SubscribeBody {
                kind: Kind::Channel {
                    body,
                    channel: self,
                },
            },
        )
    }
}

/// A channel's cursor, saved in the store as its events pass.
struct SavedCursor {
    sink: Arc<dyn Sink>,
    id: Box<str>,
}

impl Cursor for SavedCursor {
    fn moved(&self, id: &Bytes) {
        // A copy: a slice would keep the whole frame alive in the store.
        self.sink.save_cursor(&self.id, Bytes::copy_from_slice(id));
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

pin_project! {
    /// The response body of [`Subscribe`](super::Subscribe): an API answer, a subscription's
    /// channel, or the inner body untouched.
    pub struct SubscribeBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // The inner body untouched, or an answer of the API.
        Plain { #[pin] inner: InnerOrLocal<B> },
        // An event stream ends at a boundary when the subscription is suspended or deleted;
        // anything else passes untouched. The channel lives as long as the body.
        Channel {
            #[pin]
            body: EngineBody<B, NoStore>,
            channel: Channel,
        },
    }
}

impl<B> SubscribeBody<B> {
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

impl<B> SubscribeBody<B> {
    /// The inner service's body; `None` for an answer of the subscription API.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.kind {
            Kind::Plain { inner } => inner.get_ref(),
            Kind::Channel { body, .. } => Some(body.get_ref()),
        }
    }

    /// The inner service's body, mutably; `None` for an answer of the subscription API.
    pub fn get_mut(&mut self) -> Option<&mut B> {
        match &mut self.kind {
            Kind::Plain { inner } => inner.get_mut(),
            Kind::Channel { body, .. } => Some(body.get_mut()),
        }
    }

    /// Unwraps the inner service's body; `None` for an answer of the subscription API. A
    /// subscription's channel closes as when its client leaves (a disposable subscription is
    /// removed), and its stream state (bytes held back, the watch for suspension or deletion)
    /// is dropped.
    pub fn into_inner(self) -> Option<B> {
        match self.kind {
            Kind::Plain { inner } => inner.into_inner(),
            Kind::Channel { body, .. } => Some(body.into_inner()),
        }
    }
}

impl<B: Default> Default for SubscribeBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self::untouched(B::default())
    }
}

impl<B> fmt::Debug for SubscribeBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Plain { inner } => f.debug_tuple("SubscribeBody").field(inner).finish(),
            Kind::Channel { channel, .. } => f
                .debug_tuple("SubscribeBody::Channel")
                .field(channel)
                .finish(),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for SubscribeBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Plain { inner } => inner.poll_frame(cx),
            KindProj::Channel { body, .. } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { inner } => inner.is_end_stream(),
            Kind::Channel { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { inner } => inner.size_hint(),
            Kind::Channel { body, .. } => body.size_hint(),
        }
    }
}
