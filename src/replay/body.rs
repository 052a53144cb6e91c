//! The body of a replayed and recorded event stream.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{lost_event, Config, Ids, Lookup, Plan, ReadFrom, ReplayStore, StoredEvent};
use crate::body::InnerFrames;
use crate::wire::{Event, Parser};

pin_project! {
    /// The response body of [`Replay`](super::Replay): replayed events first, then the live
    /// stream, recorded as it goes.
    pub struct ReplayBody<B, St: ReplayStore> {
        #[pin]
        kind: Kind<B, St>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B, St: ReplayStore> {
        Untouched { #[pin] inner: B },
        Stream {
            #[pin]
            inner: B,
            #[pin]
            fill: Fill<St::Read>,
            state: StreamState<St>,
        },
    }
}

pin_project! {
    /// Closing the gap between what was replayed and the first live event.
    #[project = FillProj]
    enum Fill<R> {
        Idle,
        // Boxed: a rare state that would otherwise widen every stream's body.
        Reading { #[pin] read: R, held: Option<Box<Event>> },
    }
}

struct StreamState<St> {
    /// Replayed events (and the history-lost signal), sent before anything live.
    first: Option<Bytes>,
    frames: InnerFrames,
    /// Made on the first frame: an idle stream carries no parser.
    parser: Option<Box<Parser>>,
    /// Events are re-encoded one by one (to drop duplicates or set ids) rather than forwarded
    /// frame by frame. Switched off at an event boundary once neither is needed.
    reframe: bool,
    /// Ids the client already has (the one it sent, and every replayed one): live events with
    /// these ids are dropped for the life of the stream. Bounded by the replay limit.
    delivered: HashSet<Bytes>,
    /// The newest id the client has, until the first new live event: events recorded after it
    /// in the meantime (in flight while the client reconnected) are sent before that event.
    fill_after: Option<Bytes>,
    replay_limit: usize,
    recording: bool,
    ended: bool,
    store: St,
    key: Bytes,
    ids: Ids,
}

impl<B, St: ReplayStore> ReplayBody<B, St> {
    pub(super) fn untouched(inner: B) -> Self {
        Self {
            kind: Kind::Untouched { inner },
        }
    }

    /// The stream variant. `recorded`: an inner layer recorded the events, with final ids.
    pub(super) fn stream(
        inner: B,
        plan: Plan,
        store: St,
        config: Arc<Config>,
        recorded: bool,
    ) -> Self {
        let mut first = BytesMut::new();
        if let Some(lost) = plan.lost.and_then(|lost| lost_event(&config, lost)) {
            first.extend_from_slice(&lost);
        }
        let ids = if recorded { Ids::Keep } else { config.ids };
        // No allocation for a new client, which has nothing to drop.
        let capacity = plan.replay.len() + usize::from(plan.client_id.is_some());
        let mut delivered = HashSet::with_capacity(capacity);
        let newest = plan
            .replay
            .last()
            .map(|e| e.id.clone())
            .or(plan.client_id.clone());
        // Filling the gap needs ids the store knows: the upstream's own, or the hub's.
        let mut fill_after = newest.filter(|_| ids == Ids::Keep);
        delivered.extend(plan.client_id);
        for event in plan.replay {
            first.extend_from_slice(&event.bytes);
            delivered.insert(event.id);
        }
        let mut frames = InnerFrames::new();
        if !first.is_empty() {
            frames.drop_leading_bom();
        }
        let reframe = !delivered.is_empty() || ids != Ids::Keep;
        let replay_limit = config.replay_limit();
        // A recorder inside (the hub) has stored everything up to what this client will receive
        // live, so the gap is filled at once instead of before the next live event.
        let fill = match fill_after.take_if(|_| recorded) {
            Some(after) => Fill::Reading {
                read: store.read(&plan.key, ReadFrom::After(&after), replay_limit),
                held: None,
            },
            None => Fill::Idle,
        };
        Self {
            kind: Kind::Stream {
                inner,
                fill,
                state: StreamState {
                    first: (!first.is_empty()).then(|| first.freeze()),
                    frames,
                    parser: None,
                    reframe,
                    delivered,
                    fill_after,
                    replay_limit,
                    recording: !recorded,
                    ended: false,
                    store,
                    key: plan.key,
                    ids,
                },
            },
        }
    }
}

impl<B, St: ReplayStore> ReplayBody<B, St> {
    inner_body_accessors!("replayed events not yet sent, held-back bytes and the recording are dropped: later events are no longer recorded.");
}

impl<B: Default, St: ReplayStore> Default for ReplayBody<B, St> {
    /// The inner body's default, passed through untouched.
    fn default() -> Self {
        Self {
            kind: Kind::Untouched {
                inner: B::default(),
            },
        }
    }
}

impl<B, St: ReplayStore> fmt::Debug for ReplayBody<B, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Untouched { .. } => "Untouched",
            Kind::Stream { .. } => "Stream",
        };
        f.debug_tuple("ReplayBody").field(&kind).finish()
    }
}

impl<St: ReplayStore> StreamState<St> {
    fn parser_mut(&mut self) -> &mut Parser {
        self.parser.get_or_insert_with(Box::default)
    }

    /// Records a message event that has an id; heartbeats and id-less events are not recorded.
    fn record(&self, event: &Event) {
        if !self.recording || !super::is_recordable(event) {
            return;
        }
        // The id is a slice of the encoded bytes: one allocation per recorded event.
        if let (bytes, Some(id)) = event.encode_with_id() {
            self.store.append(&self.key, StoredEvent { id, bytes });
        }
    }

    /// Parses a raw frame that is forwarded as it is, to record its events.
    fn record_frame(&mut self, data: &Bytes) {
        if !self.recording {
            return;
        }
        self.parser_mut().push(data.clone());
        while let Some(event) = self.parser_mut().next_event() {
            match event {
                Ok(event) => self.record(&event),
                // Past the parser's limits the stream still flows; only recording stops.
                Err(_) => self.recording = false,
            }
        }
    }

    /// Re-encodes the complete events queued in the parser into `out`, minus duplicates, with
    /// ids as configured. Stops at the first new live event while a gap may need filling, and
    /// hands it back.
    fn reframe(&mut self, out: &mut BytesMut) -> Reframed {
        while let Some(event) = self.parser_mut().next_event() {
            let Ok(mut event) = event else {
                return Reframed::Broken;
            };
            if event.is_message() {
                if event.id().is_some_and(|id| self.delivered.contains(id)) {
                    continue;
                }
                if self.fill_after.is_some() {
                    return Reframed::Gap(event);
                }
                self.emit(event, out);
            } else {
                if self.ids == Ids::AssignAlways && event.id().is_some() {
                    // An id-only block would move the client's cursor to an upstream id.
                    event.clear_id();
                }
                event.encode_into(out);
            }
        }
        let mid_event = self.parser.as_ref().is_some_and(|p| p.is_mid_event());
        if self.delivered.is_empty() && self.ids == Ids::Keep && !mid_event {
            self.reframe = false;
        }
        Reframed::Done
    }

    /// Sends a live message event: with an id as configured, recorded.
    fn emit(&mut self, mut event: Event, out: &mut BytesMut) {
        let assign = self.ids.assigns(&event);
        if assign {
            event.set_id(self.store.next_id(&self.key));
        }
        self.record(&event);
        event.encode_into(out);
    }

    /// The events recorded since the client's newest id, up to the live event `held`.
    fn fill(&mut self, lookup: Lookup, held: Option<&Event>, out: &mut BytesMut) {
        let Lookup::Found(events) = lookup else {
            return;
        };
        for stored in events {
            if held.is_some_and(|held| held.id() == Some(&stored.id[..])) {
                break;
            }
            if self.delivered.insert(stored.id) {
                out.extend_from_slice(&stored.bytes);
            }
        }
    }
}

/// How re-framing the queued events ended.
enum Reframed {
    Done,
    /// The first new live event, held back until the gap before it is filled.
    Gap(Event),
    /// The stream broke the parser's limits.
    Broken,
}

fn poll_stream<B, St>(
    mut inner: Pin<&mut B>,
    mut fill: Pin<&mut Fill<St::Read>>,
    state: &mut StreamState<St>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    St: ReplayStore,
{
    if let Some(first) = state.first.take() {
        return Poll::Ready(Some(Ok(Frame::data(first))));
    }
    loop {
        let mut out = BytesMut::new();
        if let FillProj::Reading { read, held } = fill.as_mut().project() {
            // A failed read fills nothing: the live event goes on.
            let lookup = ready!(read.poll(cx)).unwrap_or(Lookup::Unknown);
            let held = held.take();
            state.fill(lookup, held.as_deref(), &mut out);
            state.fill_after = None;
            fill.set(Fill::Idle);
            if let Some(held) = held {
                state.emit(*held, &mut out);
            }
        } else {
            if state.ended {
                return Poll::Ready(None);
            }
            let frame = match ready!(state.frames.poll_frame(inner.as_mut(), cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            if !state.reframe {
                state.record_frame(&data);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            state.parser_mut().push(data);
        }
        match state.reframe(&mut out) {
            Reframed::Done => {}
            Reframed::Gap(held) => {
                let after = state.fill_after.clone().expect("a gap to fill");
                let read =
                    state
                        .store
                        .read(&state.key, ReadFrom::After(&after), state.replay_limit);
                fill.set(Fill::Reading {
                    read,
                    held: Some(Box::new(held)),
                });
            }
            Reframed::Broken => {
                // Too large to re-frame: end cleanly; the client reconnects and resumes.
                state.ended = true;
            }
        }
        if !out.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
        }
    }
}

impl<B: Body<Data = Bytes>, St: ReplayStore> Body for ReplayBody<B, St> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Untouched { inner } => inner.poll_frame(cx),
            KindProj::Stream { inner, fill, state } => poll_stream(inner, fill, state, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Untouched { inner } => inner.is_end_stream(),
            Kind::Stream {
                inner, fill, state, ..
            } => {
                state.ended
                    || (state.first.is_none()
                        && matches!(fill, Fill::Idle)
                        && state.frames.is_end_stream(inner))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Untouched { inner } => inner.size_hint(),
            Kind::Stream { .. } => SizeHint::new(),
        }
    }
}
