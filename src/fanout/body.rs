//! The body a client of the hub reads.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::hub::{Client, Next};
use super::ClientTooSlow;
use crate::BoxError;

pin_project! {
    /// The response body of [`Fanout`](super::Fanout): the shared subscription's frames from this
    /// client's queue, or the inner service's own body for a request that was not shared.
    pub struct FanoutBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Direct { #[pin] inner: B },
        Shared { client: Client },
    }
}

impl<B> FanoutBody<B> {
    pub(super) fn direct(inner: B) -> Self {
        Self {
            kind: Kind::Direct { inner },
        }
    }

    pub(super) fn shared(client: Client) -> Self {
        Self {
            kind: Kind::Shared { client },
        }
    }

    /// True when the body is read from a shared subscription.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Shared { .. })
    }

    /// The inner service's body; `None` when the body is read from a shared subscription.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.kind {
            Kind::Direct { inner } => Some(inner),
            Kind::Shared { .. } => None,
        }
    }

    /// The inner service's body, mutably; `None` when the body is read from a shared
    /// subscription.
    pub fn get_mut(&mut self) -> Option<&mut B> {
        match &mut self.kind {
            Kind::Direct { inner } => Some(inner),
            Kind::Shared { .. } => None,
        }
    }

    /// Unwraps the inner service's body; `None` when the body is read from a shared
    /// subscription, whose place in the hub is then given up (frames queued for it are dropped).
    pub fn into_inner(self) -> Option<B> {
        match self.kind {
            Kind::Direct { inner } => Some(inner),
            Kind::Shared { .. } => None,
        }
    }
}

impl<B: Default> Default for FanoutBody<B> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self::direct(B::default())
    }
}

impl<B> fmt::Debug for FanoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_shared() { "Shared" } else { "Direct" };
        f.debug_tuple("FanoutBody").field(&kind).finish()
    }
}

impl<B> Body for FanoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Direct { inner } => inner
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            KindProj::Shared { client } => {
                Poll::Ready(match std::task::ready!(client.queue().poll_next(cx)) {
                    Next::Frame(data) => Some(Ok(Frame::data(data))),
                    Next::Cut => Some(Err(ClientTooSlow(()).into())),
                    Next::End => None,
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Direct { inner } => inner.is_end_stream(),
            Kind::Shared { client } => client.queue().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Direct { inner } => inner.size_hint(),
            Kind::Shared { .. } => SizeHint::new(),
        }
    }
}
