//! Machinery the layers' response bodies share.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};

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
    stashed: Option<Frame<Bytes>>,
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
    pub(crate) fn drop_leading_bom(&mut self) {
        if !self.seen_data {
            self.bom = BomFilter::dropping();
        }
    }

    /// The next frame of the inner body, filtered.
    pub(crate) fn poll_frame<B: Body<Data = Bytes>>(
        &mut self,
        mut inner: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.stashed.take() {
            return Poll::Ready(Some(Ok(frame)));
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
                            self.stashed = Some(frame);
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
