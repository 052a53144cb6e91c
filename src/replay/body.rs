//! The body of a replayed and recorded event stream: the stream engine with its replay stage.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::{
    lost_event, CarriedEvents, Config, Ids, Lookup, Plan, Position, ReadFrom, ReplayStore, Resumed,
    StoredEvent,
};
use crate::engine::{EngineBody, Stages, Start};
use crate::wire::{Event, RawBlock, RawSpan};

pin_project_lite::pin_project! {
    /// The response body of [`Replay`](super::Replay): replayed events first, then the live
    /// stream, recorded as it goes.
    pub struct ReplayBody<B, St: ReplayStore> {
        #[pin]
        body: EngineBody<B, St>,
    }
}

impl<B, St: ReplayStore> ReplayBody<B, St> {
    pub(crate) fn from_engine(body: EngineBody<B, St>) -> Self {
        Self { body }
    }

    /// The inner service's body.
    pub fn get_ref(&self) -> &B {
        self.body.get_ref()
    }

    /// The inner service's body, mutably.
    pub fn get_mut(&mut self) -> &mut B {
        self.body.get_mut()
    }

    /// Unwraps the inner service's body: replayed events not yet sent, held-back bytes and the
    /// recording are dropped: later events are no longer recorded.
    pub fn into_inner(self) -> B {
        self.body.into_inner()
    }
}

crate::engine::engine_body_impls!(ReplayBody<B, St: ReplayStore>);

/// The replay stage of the stream engine: drops what the client has, assigns ids, records,
/// and fills the gap between what was replayed and the first live event.
pub(crate) struct ReplayStage<St: ReplayStore> {
    /// What a resuming client already has; `None` for a new client (boxed: most are new).
    resume: Option<Box<Resume>>,
    recorder: Recorder<St>,
}

/// What a resuming client already has.
struct Resume {
    /// Ids the client already has (the one it sent, and every replayed one): live events with
    /// these ids are dropped for the life of the stream. Bounded by the replay limit.
    delivered: HashSet<Bytes>,
    /// The newest id the client has, until the first new live event: events recorded after it
    /// in the meantime (in flight while the client reconnected) are sent before that event.
    fill_after: Option<Bytes>,
    replay_limit: usize,
}

/// Records a stream's events into a replay store, with ids as configured: the one recorder of
/// the replay layer and the fan-out hub.
pub(crate) struct Recorder<St: ReplayStore> {
    store: St,
    key: Bytes,
    ids: Ids,
    recording: bool,
    /// Events recorded from the current frame, handed to the store together.
    batch: Vec<Pending>,
    /// Where this connection's recording stands in the key's history.
    position: Position,
}

impl<St: ReplayStore> Recorder<St> {
    /// A recorder of `key`; `recording`: false when another records the stream (a hub inside),
    /// and this one only stamps ids. `continues_after`: see
    /// [`ReplayStore::recorder_started`].
    pub(crate) fn new(
        store: St,
        key: Bytes,
        ids: Ids,
        recording: bool,
        continues_after: Option<&[u8]>,
    ) -> Self {
        let key = if recording {
            store.recorder_started(&key, continues_after);
            store.shared_key(&key).unwrap_or(key)
        } else {
            key
        };
        Self {
            store,
            key,
            ids,
            recording,
            batch: Vec::new(),
            position: Position::default(),
        }
    }

    /// Records nothing more: the store learns that this connection no longer records.
    pub(crate) fn stop(&mut self) {
        if std::mem::take(&mut self.recording) {
            self.store.recorder_stopped(&self.key);
        }
    }

    /// Gives `event` its id as configured: a new one for a message event that needs it, none
    /// for an id-only block when every id is assigned (it would move a client's cursor to an
    /// upstream id). True when the id changed.
    pub(crate) fn stamp(&self, event: &mut Event) -> bool {
        if event.is_message() {
            if self.ids.assigns(event) {
                event.set_id(self.store.next_id(&self.key));
                return true;
            }
        } else if self.ids == Ids::AssignAlways && event.id().is_some() {
            event.clear_id();
            return true;
        }
        false
    }

    /// Records a message event that has an id; heartbeats and id-less events are not recorded.
    /// `raw`: the event's bytes as the client gets them, with the length of the chunk they are
    /// a slice of, when the event is unchanged and was one piece of one chunk.
    pub(crate) fn record(&mut self, event: &Event, raw: Option<(Bytes, usize)>) {
        if !self.recording || !super::is_recordable(event) {
            return;
        }
        let stored = match (raw, event.id_bytes()) {
            (Some((raw, chunk_len)), Some(id)) => Pending::new(raw, chunk_len, id),
            _ => None,
        };
        // Else re-encoded, the id a slice of the encoding: one allocation per recorded event.
        let stored = stored.or_else(|| match event.encode_with_id() {
            (bytes, Some(id)) => {
                let len = bytes.len();
                Pending::new(bytes, len, &id)
            }
            (_, None) => None,
        });
        self.batch.extend(stored);
    }

    /// Records a block found as raw bytes in `chunk`, if it is a message with an id, as it
    /// is. The chunk is flushed with it, before the next one.
    pub(crate) fn record_raw(&mut self, block: &RawBlock, chunk: &Bytes) {
        if self.recording {
            self.batch.extend(Pending::of_block(block, chunk));
        }
    }

    /// Hands the events recorded so far to the store.
    pub(crate) fn flush(&mut self) {
        self.flush_chunk(None, None);
    }

    /// Hands the events recorded so far to the store; `chunk`: the chunk raw blocks were
    /// recorded from; `now`: the time, when the caller has read the clock.
    pub(crate) fn flush_chunk(&mut self, chunk: Option<&Bytes>, now: Option<Instant>) {
        if !self.batch.is_empty() {
            let mut carried = Carried {
                pending: &mut self.batch,
                chunk,
                own: BytesMut::new(),
            };
            let now = now.unwrap_or_else(Instant::now);
            self.store
                .append_carried(&self.key, &mut self.position, &mut carried, now);
            self.batch.clear();
            // A burst of events must not keep its room for the rest of the stream.
            self.batch.shrink_to(16);
        }
    }
}

impl<St: ReplayStore> Drop for Recorder<St> {
    fn drop(&mut self) {
        // What was recorded of the last frame goes in, then the store learns recording stopped.
        self.flush();
        self.stop();
    }
}

/// A frame's recorded events on their way to the store: ids read where they are, bytes copied
/// only for the events the store keeps.
struct Carried<'a> {
    pending: &'a mut [Pending],
    /// The chunk a [`Source::Chunk`] is a range of.
    chunk: Option<&'a Bytes>,
    /// The copies of the small events kept, in one buffer per frame: one allocation, and
    /// nothing kept that the store does not count.
    own: BytesMut,
}

impl CarriedEvents for Carried<'_> {
    fn len(&self) -> usize {
        self.pending.len()
    }

    fn id(&self, index: usize) -> &[u8] {
        self.pending
            .get(index)
            .map_or(&[][..], |pending| pending.id(self.chunk))
    }

    fn take(&mut self, index: usize) -> Option<StoredEvent> {
        let (pending, rest) = self.pending.get_mut(index..)?.split_first_mut()?;
        if pending.copied_len() > 0 && self.own.capacity() == 0 {
            // Room for the copies of what is left of the frame, made at the first one kept.
            let left = pending.copied_len() + rest.iter().map(Pending::copied_len).sum::<usize>();
            self.own.reserve(left);
        }
        pending.stored(&mut self.own, self.chunk)
    }
}

/// What the replay stage does with a live event.
pub(crate) enum Admit {
    /// The client has it already.
    Drop,
    /// The first new live event while a gap may need filling: held until it is filled.
    Hold,
    /// On its way, `changed` when its id was set or cleared.
    Pass { changed: bool },
}

/// What replay starts a stream with.
pub(crate) struct Opening<St: ReplayStore> {
    pub(crate) stage: ReplayStage<St>,
    /// Replayed events (and the history-lost signal), sent before anything live.
    pub(crate) first: Option<Bytes>,
    /// A read to close the gap at once (a recorder inside has stored everything up to now).
    pub(crate) fill: Option<St::Read>,
}

impl<St: ReplayStore> ReplayStage<St> {
    /// The stage for `plan`. `recorded`: an inner layer recorded the events, with final ids.
    pub(super) fn open(plan: Plan, store: St, config: &Config, recorded: bool) -> Opening<St> {
        let mut first = BytesMut::new();
        if let Some(lost) = plan.lost.and_then(|lost| lost_event(config, lost)) {
            first.extend_from_slice(&lost);
        }
        let ids = if recorded { Ids::Keep } else { config.ids };
        // The id an upstream known to resume was asked to resume after: the last one replayed,
        // or the client's own.
        let continues_after = matches!(plan.resumed, Resumed::LastEventId | Resumed::Partial)
            .then(|| {
                plan.replay
                    .last()
                    .map(|e| e.id.clone())
                    .or(plan.client_id.clone())
            })
            .flatten()
            .filter(|_| config.upstream_resumes && config.ids != Ids::AssignAlways);
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
        let replay_limit = config.replay_limit();
        // A recorder inside (the hub) has stored everything up to what this client will receive
        // live, so the gap is filled at once instead of before the next live event.
        let fill = fill_after
            .take_if(|_| recorded)
            .map(|after| store.read(&plan.key, ReadFrom::After(&after), replay_limit));
        let resume = (!delivered.is_empty() || fill_after.is_some()).then(|| {
            Box::new(Resume {
                delivered,
                fill_after,
                replay_limit,
            })
        });
        Opening {
            stage: Self {
                resume,
                recorder: Recorder::new(
                    store,
                    plan.key,
                    ids,
                    !recorded,
                    continues_after.as_deref(),
                ),
            },
            first: (!first.is_empty()).then(|| first.freeze()),
            fill,
        }
    }

    /// True when events are re-encoded one by one (to drop what the client has, or to set
    /// ids) rather than forwarded frame by frame: for the life of the stream, since what a
    /// resuming client has is dropped for as long.
    fn reframe(&self) -> bool {
        self.recorder.ids != Ids::Keep
            || self
                .resume
                .as_ref()
                .is_some_and(|r| !r.delivered.is_empty())
    }

    /// True when the stage needs the events' fields: to record them or to change them.
    pub(crate) fn reads_events(&self) -> bool {
        self.recorder.recording || self.reframe()
    }

    /// True when the stage may drop or change events.
    pub(crate) fn rewrites(&self) -> bool {
        self.reframe()
    }

    /// True when the stage only records the events as they are: their raw bytes and ids are
    /// all it needs, not parsed events.
    pub(crate) fn only_records(&self) -> bool {
        self.recorder.recording && !self.reframe()
    }

    /// Records a block found as raw bytes (see [`Recorder::record_raw`]).
    pub(crate) fn record_raw(&mut self, block: &RawBlock, chunk: &Bytes) {
        self.recorder.record_raw(block, chunk);
    }

    pub(crate) fn stop_recording(&mut self) {
        self.recorder.stop();
    }

    /// Hands the events recorded so far to the store.
    pub(crate) fn flush(&mut self) {
        self.recorder.flush();
    }

    /// Decides on a live event, recording what goes on (`raw` as [`Recorder::record`] takes it).
    pub(crate) fn admit(&mut self, event: &mut Event, raw: Option<(Bytes, usize)>) -> Admit {
        if !self.reframe() {
            self.recorder.record(event, raw);
            return Admit::Pass { changed: false };
        }
        if !event.is_message() {
            return Admit::Pass {
                changed: self.recorder.stamp(event),
            };
        }
        let resume = self.resume.as_deref();
        if event
            .id()
            .is_some_and(|id| resume.is_some_and(|r| r.delivered.contains(id)))
        {
            return Admit::Drop;
        }
        if resume.is_some_and(|r| r.fill_after.is_some()) {
            return Admit::Hold;
        }
        Admit::Pass {
            changed: self.release(event, raw),
        }
    }

    /// Sends a new live message event on: with an id as configured, recorded. True when its id
    /// was set.
    pub(crate) fn release(&mut self, event: &mut Event, raw: Option<(Bytes, usize)>) -> bool {
        let changed = self.recorder.stamp(event);
        self.recorder.record(event, raw.filter(|_| !changed));
        changed
    }

    /// The read that fills the gap before a held event.
    pub(crate) fn gap_read(&mut self) -> St::Read {
        self.flush();
        let resume = self.resume.as_deref().expect("a gap to fill");
        let after = resume.fill_after.as_ref().expect("a gap to fill");
        let recorder = &self.recorder;
        recorder
            .store
            .read(&recorder.key, ReadFrom::After(after), resume.replay_limit)
    }

    /// The events recorded since the client's newest id, up to the live event `held`.
    pub(crate) fn fill(&mut self, lookup: Lookup, held: Option<&Event>, out: &mut BytesMut) {
        let Some(resume) = self.resume.as_deref_mut() else {
            return;
        };
        resume.fill_after = None;
        let Some(events) = lookup.into_events() else {
            return;
        };
        for stored in events {
            if held.is_some_and(|held| held.id() == Some(&stored.id[..])) {
                break;
            }
            if resume.delivered.insert(stored.id) {
                out.extend_from_slice(&stored.bytes);
            }
        }
    }

    /// At the end of a frame's events: what was recorded goes to the store.
    ///
    /// `chunk`: the chunk raw blocks were recorded from, if any; `now`: the frame's reading of
    /// the clock, when the caller read it.
    pub(crate) fn settle(&mut self, chunk: Option<&Bytes>, now: Option<Instant>) {
        self.recorder.flush_chunk(chunk, now);
    }
}

/// The engine body of a replayed stream: `stages` are those of a stack built together (none for
/// the replay layer alone).
pub(super) fn stream_body<B, St: ReplayStore>(
    inner: B,
    headers: &http::HeaderMap,
    plan: Plan,
    store: St,
    config: &Arc<Config>,
    recorded: bool,
    stages: &Stages,
) -> EngineBody<B, St> {
    let opening = ReplayStage::open(plan, store, config, recorded);
    let mut start = Start::new();
    start.replayed = opening.first;
    start.replay = Some(opening.stage);
    start.fill = opening.fill;
    EngineBody::stream(inner, stages, true, headers, start)
}

/// An event on its way to the store: where its bytes are (still in its frame), where its id is
/// in them, and what the store gets.
struct Pending {
    source: Source,
    id: std::ops::Range<usize>,
    keep: Keep,
}

enum Source {
    Bytes(Bytes),
    /// A range of the chunk the recorder is flushed with: nothing counted until then.
    Chunk(std::ops::Range<usize>),
}

enum Keep {
    /// The slice itself: the event is most of its frame.
    Slice,
    /// A copy: a small slice would keep a big frame alive beyond what the store counts.
    Copy,
    /// A copy after a blank line: the event starts with a byte order mark, content here, that
    /// a client would take for the stream's own (and drop) if the event came first.
    Guarded,
}

impl Keep {
    /// For an event of `len` bytes starting with `start`, in a buffer of `buffer_len` bytes.
    fn of(start: &[u8], len: usize, buffer_len: usize) -> Self {
        if crate::wire::starts_with_bom(start) {
            Self::Guarded
        } else if len * 2 >= buffer_len {
            Self::Slice
        } else {
            Self::Copy
        }
    }
}

impl Pending {
    /// `raw`: an unchanged event's own bytes, a slice of a chunk of `chunk_len` bytes; `id` a
    /// slice of them. `None` when the id is not within the bytes.
    fn new(raw: Bytes, chunk_len: usize, id: &Bytes) -> Option<Self> {
        let offset = (id.as_ptr() as usize).checked_sub(raw.as_ptr() as usize)?;
        if offset + id.len() > raw.len() {
            return None;
        }
        Some(Self {
            id: offset..offset + id.len(),
            keep: Keep::of(&raw, raw.len(), chunk_len),
            source: Source::Bytes(raw),
        })
    }

    /// A raw block of `chunk` that is a message with an id.
    fn of_block(block: &RawBlock, chunk: &Bytes) -> Option<Self> {
        let id = block.id.clone()?;
        let bytes = block.bytes(chunk);
        let keep = Keep::of(bytes, bytes.len(), block.buffer_len(chunk));
        let source = match (&block.span, &keep) {
            (RawSpan::Chunk(range), Keep::Slice) => Source::Bytes(chunk.slice(range.clone())),
            (RawSpan::Chunk(range), _) => Source::Chunk(range.clone()),
            (RawSpan::Own(bytes), _) => Source::Bytes(bytes.clone()),
        };
        Some(Self { source, id, keep })
    }

    /// Its id; `chunk`: the chunk a [`Source::Chunk`] is a range of.
    fn id<'a>(&'a self, chunk: Option<&'a Bytes>) -> &'a [u8] {
        let bytes = match &self.source {
            Source::Bytes(bytes) => Some(&bytes[..]),
            Source::Chunk(range) => chunk.and_then(|chunk| chunk.get(range.clone())),
        };
        bytes
            .and_then(|bytes| bytes.get(self.id.clone()))
            .unwrap_or_default()
    }

    fn len(&self) -> usize {
        match &self.source {
            Source::Bytes(bytes) => bytes.len(),
            Source::Chunk(range) => range.len(),
        }
    }

    /// The bytes it takes in the frame's buffer of copies.
    fn copied_len(&self) -> usize {
        match self.keep {
            Keep::Slice => 0,
            Keep::Copy => self.len(),
            Keep::Guarded => self.len() + 1,
        }
    }

    /// The event as stored, a copy split off `own` (sized by [`copied_len`]) when it is one.
    /// `chunk`: the chunk a [`Source::Chunk`] is a range of. A slice of its own is moved out:
    /// taken once.
    ///
    /// [`copied_len`]: Self::copied_len
    fn stored(&mut self, own: &mut BytesMut, chunk: Option<&Bytes>) -> Option<StoredEvent> {
        debug_assert!(
            chunk.is_some() || matches!(self.source, Source::Bytes(_)),
            "a range of a chunk is flushed with that chunk"
        );
        let (bytes, shift) = match (&self.keep, &mut self.source) {
            (Keep::Slice, Source::Bytes(bytes)) => (std::mem::take(bytes), 0),
            (Keep::Slice, Source::Chunk(range)) => (chunk?.slice(range.clone()), 0),
            (keep, source) => {
                let raw = match source {
                    Source::Bytes(bytes) => &bytes[..],
                    Source::Chunk(range) => chunk?.get(range.clone())?,
                };
                let shift = usize::from(matches!(keep, Keep::Guarded));
                if shift == 1 {
                    own.extend_from_slice(b"\n");
                }
                own.extend_from_slice(raw);
                (own.split().freeze(), shift)
            }
        };
        let id = self.id.start + shift..self.id.end + shift;
        (id.end <= bytes.len()).then(|| StoredEvent {
            id: bytes.slice(id),
            bytes,
        })
    }
}
