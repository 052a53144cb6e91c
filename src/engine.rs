//! The stream engine: one pass over an event stream for every stage that works on it.
//!
//! Crate-private. The body layers (retry blocks aside) are each this engine with their own stage
//! switched on; [`SseStack`](crate::SseStack) switches several on in one engine, so a stack of
//! them scans every byte once, parses fields once (only where a stage needs them), and keeps one
//! timer for heartbeats, the idle timeout and the lifetime.
//!
//! What the client receives is either the inner body's own frames (the *raw* path: no stage
//! changes any event; the engine only watches where events end, and parses for recording), or
//! events re-encoded by the stages (the *rewrite* path: metadata framing, duplicate removal,
//! assigned ids). On the rewrite path a frame whose events all stay as they are, and that starts
//! and ends at an event boundary, still goes out as it came, so the client gets whole events only
//! and the common case copies nothing.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::body::InnerFrames;
use crate::lifetime::{LifetimeConfig, Shutdown, Triggered};
use crate::metadata::MetadataConfig;
use crate::replay::{Admit, Lookup, ReplayStage, ReplayStore, StoreError};
use crate::telemetry::{self, Timeout};
use crate::timeout::deadline;
use crate::wire::{
    event_of_lines, Event, Fed, Limits, Parser, Piece, RawBlock, RawEvents, RawSpan, Scanner,
};

/// The stages an engine runs, as configured on the layers (or the stack builder). Cheap to clone
/// into every response.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stages {
    /// `retry:` block first in the stream (the retry time, the jitter).
    pub(crate) retry: Option<(Duration, Duration)>,
    pub(crate) metadata: Option<Arc<MetadataConfig>>,
    pub(crate) heartbeat: Option<Arc<crate::heartbeat::Config>>,
    pub(crate) lifetime: Option<Arc<LifetimeConfig>>,
    /// Upstream silence after which the stream ends, cleanly.
    pub(crate) idle: Option<Duration>,
    /// Every frame out ends at an event boundary (events in flight wait for their end): set by
    /// the stack under its compression, which then flushes per frame instead of scanning again.
    pub(crate) whole_blocks: bool,
}

impl Stages {
    /// True when some stage reads or adds bytes, which only a plain (not encoded) stream allows;
    /// the idle timeout alone only times frames.
    pub(crate) fn reads_bytes(&self) -> bool {
        self.retry.is_some()
            || self.metadata.is_some()
            || self.heartbeat.is_some()
            || self.lifetime.is_some()
            || self.whole_blocks
    }

    pub(crate) fn is_empty(&self) -> bool {
        !self.reads_bytes() && self.idle.is_none()
    }

    fn is_timed(&self) -> bool {
        self.heartbeat.is_some() || self.idle.is_some() || self.lifetime.is_some()
    }
}

/// A replay store that stores nothing: the engine of a stack without replay.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NoStore;

impl ReplayStore for NoStore {
    type Read = std::future::Ready<Result<Lookup, StoreError>>;

    fn read(&self, _key: &Bytes, _from: crate::replay::ReadFrom<'_>, _limit: usize) -> Self::Read {
        std::future::ready(Ok(Lookup::Unknown))
    }

    fn append(&self, _key: &Bytes, _event: crate::replay::StoredEvent) {}

    fn next_id(&self, _key: &Bytes) -> Bytes {
        Bytes::new()
    }

    fn trim(&self, _key: &Bytes, _keep: usize) {}
}

pin_project! {
    /// The inner body untouched, or an event stream run through the engine.
    pub(crate) struct EngineBody<B, St: ReplayStore> {
        #[pin]
        kind: Kind<B, St>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B, St: ReplayStore> {
        Untouched { #[pin] inner: B },
        // The stream's state lives on the heap, once per stream: an idle stream's body stays
        // the size of its inner body and a pointer.
        Stream { #[pin] inner: B, core: Pin<Box<Core<St>>> },
    }
}

pin_project! {
    #[project = CoreProj]
    struct Core<St: ReplayStore> {
        #[pin]
        timer: Timer,
        engine: Engine<St>,
    }
}

pin_project! {
    /// One timer per stream, at the earliest deadline of the timed stages, moved lazily.
    #[project = TimerProj]
    enum Timer {
        Off,
        On { #[pin] sleep: Sleep },
    }
}

pin_project! {
    /// Replay closing the gap between what a client was replayed and its first live event.
    struct Filling<R> {
        #[pin]
        read: R,
        held: Option<Box<Event>>,
    }
}

/// Where the events are found: nowhere when no stage needs to know (the idle timeout alone), a
/// scanner when no stage needs fields, else a parser (made on the first frame: an idle stream
/// carries none).
#[derive(Debug)]
enum Wire {
    Blind,
    Scanner(Scanner),
    /// The blocks as the stream carried them, found on the scanner's pieces: for replay that
    /// only records, and for metadata framing (only a block with a metadata field is parsed).
    Raw(Option<Box<RawWire>>),
    Parser(Option<Box<Parsing>>),
}

/// A bounded scanner and the raw blocks found with it.
#[derive(Debug)]
struct RawWire {
    scanner: Scanner,
    events: RawEvents,
}

impl Default for RawWire {
    fn default() -> Self {
        Self {
            // The parser's bounds: the block held across chunks stays bounded.
            scanner: Scanner::with_limits(Limits::default()),
            events: RawEvents::default(),
        }
    }
}

/// The parser, and the events parsed from the current frame that no stage changed: sent as the
/// frame itself if they make it up whole, else re-encoded. Reused frame after frame.
#[derive(Debug, Default)]
struct Parsing {
    parser: Parser,
    unchanged: Vec<Event>,
}

/// The lifetime stage's state.
#[derive(Debug)]
struct Lifetime {
    config: Arc<LifetimeConfig>,
    /// The lifetime's end (far away without a maximum), then the grace period's.
    deadline: Instant,
    phase: Phase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Forwarding; waiting for the lifetime to end or for shutdown.
    Live,
    /// Told to end: forwarding up to the next boundary, within the grace period.
    Ending,
    /// At a boundary: the farewell block (if any) goes out, then the end.
    Farewell,
    Done,
}

/// The per-stream state of every stage. What a heartbeat alone needs is inline; every other
/// stage is in `more`, one allocation that a heartbeat-only stream does without.
pub(crate) struct Engine<St: ReplayStore> {
    frames: InnerFrames,
    wire: Wire,
    heartbeat: Option<Arc<crate::heartbeat::Config>>,
    /// When the client last got a frame.
    last_sent: Instant,
    /// Some event of the current frame changed, was dropped or held back.
    changed: bool,
    ended: bool,
    /// The idle timeout ended the stream, not yet reported as an error.
    idle_timed_out: bool,
    /// No stage reads or adds bytes, or ends at a boundary: frames pass as they come, only
    /// their time is noted (the idle timeout alone).
    only_times: bool,
    /// Frames out end at event boundaries (see [`Stages::whole_blocks`]).
    whole_blocks: bool,
    /// The inner body's leading mark is dropped before the wire: readers made later start past
    /// the stream's start.
    past_bom: bool,
    more: Option<Box<More<St>>>,
}

/// The stages besides the heartbeat, and the states some streams have for a while. What only
/// one stage or a moment needs is boxed again, so that each layer alone costs no more than its
/// own state.
struct More<St: ReplayStore> {
    /// The stages' own bytes before the stream: retry block, header comments, replayed events.
    first: Option<Box<Bytes>>,
    idle: Option<Duration>,
    /// When the inner body last gave a frame (kept only with an idle timeout).
    last_inner: Instant,
    lifetime: Option<Lifetime>,
    metadata: Option<Arc<MetadataConfig>>,
    replay: Option<Box<ReplayStage<St>>>,
    /// The lifetime's shutdown signal, while there is one to wait for.
    shutdown: Option<Triggered>,
    /// Replay's read closing a gap, while one runs.
    fill: Option<Pin<Box<Filling<St::Read>>>>,
    #[cfg(feature = "subscriptions")]
    cursor: Option<Box<CursorStage>>,
}

impl<St: ReplayStore> fmt::Debug for Engine<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("wire", &self.wire)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// Where a stream's cursor goes as its events pass: a subscription's server-side cursor.
#[cfg(feature = "subscriptions")]
pub(crate) trait Cursor: Send + Sync {
    /// The id a reader of the stream would resume from is now `id`.
    fn moved(&self, id: &Bytes);
}

/// The cursor stage: the stream's last event id, followed on the scanner's pieces.
#[cfg(feature = "subscriptions")]
struct CursorStage {
    ids: crate::wire::LastEventIds,
    sink: Box<dyn Cursor>,
}

/// What the engine starts a stream with, besides its stages.
pub(crate) struct Start<St: ReplayStore> {
    /// Bytes of layers outside the stages that go first (replayed events, a lost-history event).
    pub(crate) replayed: Option<Bytes>,
    pub(crate) replay: Option<ReplayStage<St>>,
    /// A read replay starts with, to close a gap at once.
    pub(crate) fill: Option<St::Read>,
    /// Where the stream's cursor goes (used alone: it follows the scanner).
    #[cfg(feature = "subscriptions")]
    pub(crate) cursor: Option<Box<dyn Cursor>>,
}

impl<St: ReplayStore> Start<St> {
    pub(crate) fn new() -> Self {
        Self {
            replayed: None,
            replay: None,
            fill: None,
            #[cfg(feature = "subscriptions")]
            cursor: None,
        }
    }
}

impl<B, St: ReplayStore> EngineBody<B, St> {
    pub(crate) fn untouched(inner: B) -> Self {
        Self {
            kind: Kind::Untouched { inner },
        }
    }

    /// An event stream through `stages`. `plain`: the stream may be read and written to (it is
    /// not encoded); an encoded stream only gets the idle timeout.
    pub(crate) fn stream(
        inner: B,
        stages: &Stages,
        plain: bool,
        headers: &http::HeaderMap,
        start: Start<St>,
    ) -> Self {
        let now = Instant::now();
        let (metadata, heartbeat, lifetime, replay) = if plain {
            (
                stages.metadata.clone(),
                stages.heartbeat.clone(),
                stages.lifetime.clone(),
                start.replay,
            )
        } else {
            (None, None, None, None)
        };
        let mut first = BytesMut::new();
        if plain {
            if let Some((retry, jitter)) = stages.retry {
                first.extend_from_slice(&crate::reconnect::block(retry, jitter));
            }
            if let Some(block) = metadata.as_ref().and_then(|m| m.header_block(headers)) {
                first.extend_from_slice(&block);
            }
        }
        if let Some(replayed) = start.replayed.filter(|_| plain) {
            match &metadata {
                Some(metadata) if metadata.rewrites() => {
                    frame_stored(metadata, &replayed, &mut first)
                }
                _ => first.extend_from_slice(&replayed),
            }
        }
        let mut frames = InnerFrames::new();
        // The inner body's leading mark is dropped before the wire sees it: a mark that
        // follows is content to the wire.
        let past_bom = !first.is_empty() && frames.drop_leading_bom();
        let needs_fields = metadata.as_ref().is_some_and(|m| m.rewrites())
            || replay.as_ref().is_some_and(ReplayStage::reads_events);
        #[cfg(feature = "subscriptions")]
        let cursor = start.cursor.filter(|_| plain).map(|sink| {
            Box::new(CursorStage {
                ids: crate::wire::LastEventIds::default(),
                sink,
            })
        });
        #[cfg(feature = "subscriptions")]
        let needs_boundaries = heartbeat.is_some() || lifetime.is_some() || cursor.is_some();
        #[cfg(not(feature = "subscriptions"))]
        let needs_boundaries = heartbeat.is_some() || lifetime.is_some();
        #[cfg(feature = "subscriptions")]
        let follows_cursor = cursor.is_some();
        #[cfg(not(feature = "subscriptions"))]
        let follows_cursor = false;
        // Raw blocks serve recording and metadata framing; replay that drops or changes events
        // (a resuming client, assigned ids) and the cursor need the parser.
        let whole_blocks = plain && stages.whole_blocks;
        let raw_blocks = !follows_cursor
            && replay.as_ref().is_none_or(|r| !r.rewrites())
            && (metadata.as_ref().is_some_and(|m| m.rewrites())
                || replay.as_ref().is_some_and(ReplayStage::only_records)
                || whole_blocks);
        let wire = if raw_blocks {
            Wire::Raw(None)
        } else if needs_fields {
            Wire::Parser(None)
        } else if needs_boundaries {
            let mut scanner = Scanner::new();
            if past_bom {
                scanner.past_leading_bom();
            }
            Wire::Scanner(scanner)
        } else {
            Wire::Blind
        };
        let lifetime = lifetime.map(|config| {
            // A far deadline stands in for "no lifetime": one timer serves lifetime and grace.
            let deadline = deadline(now, config.lifetime());
            Lifetime {
                config,
                deadline,
                phase: Phase::Live,
            }
        });
        let shutdown = lifetime
            .as_ref()
            .and_then(|l| l.config.shutdown())
            .map(Shutdown::triggered);
        let idle = stages.idle;
        let fill = start
            .fill
            .map(|read| Box::pin(Filling { read, held: None }));
        let first = (!first.is_empty()).then(|| Box::new(first.freeze()));
        #[cfg(feature = "subscriptions")]
        let has_cursor = cursor.is_some();
        #[cfg(not(feature = "subscriptions"))]
        let has_cursor = false;
        let any_more = first.is_some()
            || idle.is_some()
            || lifetime.is_some()
            || metadata.is_some()
            || replay.is_some()
            || fill.is_some()
            || has_cursor;
        let more = any_more.then(|| {
            Box::new(More {
                first,
                idle,
                last_inner: now,
                lifetime,
                metadata,
                replay: replay.map(Box::new),
                shutdown,
                fill,
                #[cfg(feature = "subscriptions")]
                cursor,
            })
        });
        let mut engine = Engine {
            frames,
            wire,
            heartbeat,
            last_sent: now,
            changed: false,
            ended: false,
            idle_timed_out: false,
            only_times: false,
            whole_blocks,
            past_bom,
            more,
        };
        engine.only_times = matches!(engine.wire, Wire::Blind)
            && engine.heartbeat.is_none()
            && engine.more.as_deref().is_some_and(|more| {
                more.first.is_none()
                    && more.lifetime.is_none()
                    && more.metadata.is_none()
                    && more.replay.is_none()
                    && more.fill.is_none()
            });
        let timer = match engine.next_due() {
            Some(due) if stages.is_timed() => Timer::On {
                sleep: tokio::time::sleep_until(due),
            },
            _ => Timer::Off,
        };
        engine.last_sent = now;
        Self {
            kind: Kind::Stream {
                inner,
                core: Box::pin(Core { timer, engine }),
            },
        }
    }

    pub(crate) fn get_ref(&self) -> &B {
        match &self.kind {
            Kind::Untouched { inner } | Kind::Stream { inner, .. } => inner,
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut B {
        match &mut self.kind {
            Kind::Untouched { inner } | Kind::Stream { inner, .. } => inner,
        }
    }

    pub(crate) fn into_inner(self) -> B {
        match self.kind {
            Kind::Untouched { inner } | Kind::Stream { inner, .. } => inner,
        }
    }

    /// True once, after the idle timeout ended the stream: for a layer that reports it as an
    /// error.
    pub(crate) fn take_idle_timeout(self: Pin<&mut Self>) -> bool {
        match self.project().kind.project() {
            KindProj::Stream { core, .. } => {
                std::mem::take(&mut core.as_mut().project().engine.idle_timed_out)
            }
            KindProj::Untouched { .. } => false,
        }
    }

    pub(crate) fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Untouched { .. } => "Untouched",
            Kind::Stream { core, .. } => match core.engine.lifetime().map(|l| l.phase) {
                Some(Phase::Ending) => "Ending",
                Some(Phase::Farewell) => "Farewell",
                Some(Phase::Done) => "Done",
                _ if core.engine.ended => "Done",
                _ => "Stream",
            },
        }
    }
}

impl<B: Default, St: ReplayStore> Default for EngineBody<B, St> {
    fn default() -> Self {
        Self::untouched(B::default())
    }
}

/// Frames the events of `stored` (bytes of whole events, as a store keeps them) for the client.
fn frame_stored(metadata: &MetadataConfig, stored: &Bytes, out: &mut BytesMut) {
    let mut parser = Parser::new();
    // After a blank line, as in its stream: a byte order mark first in it is content.
    parser.push(Bytes::from_static(b"\n"));
    parser.push(stored.clone());
    while let Some(Ok(mut event)) = parser.next_event() {
        metadata.frame(&mut event);
        event.encode_into(out);
    }
}

/// Splices `block` (of `chunk`) into the client's bytes when it goes out changed: framed, after
/// a guarding blank line (it starts with a byte order mark, content here, which a client would
/// drop if it came first), or whole when it began in an earlier chunk. `spliced`: the bytes so
/// far and the offset of `chunk` they cover.
fn splice_block(
    metadata: Option<&MetadataConfig>,
    block: &RawBlock,
    chunk: &Bytes,
    spliced: &mut Option<(BytesMut, usize)>,
) {
    let bytes = block.bytes(chunk);
    let guarded = crate::wire::starts_with_bom(bytes);
    let framed = block
        .marked
        .then(|| {
            event_of_lines(
                &block.to_bytes(chunk),
                &block.lines,
                Limits::default().kept_lines(),
            )
        })
        .flatten()
        .and_then(|mut event| metadata?.frame(&mut event).then_some(event));
    let start = match &block.span {
        // As it is in the chunk.
        RawSpan::Chunk(_) if framed.is_none() && !guarded => return,
        RawSpan::Chunk(range) => range.start,
        RawSpan::Own(_) => 0,
    };
    let (out, copied) = spliced.get_or_insert_with(|| (BytesMut::new(), 0));
    out.extend_from_slice(&chunk[*copied..start]);
    match framed {
        Some(event) => event.encode_into(out),
        None => {
            if guarded {
                out.extend_from_slice(b"\n");
            }
            out.extend_from_slice(bytes);
        }
    }
    *copied = block.ends_at;
}

/// What a frame of the inner body became.
struct Passed {
    /// What the client gets now (possibly nothing).
    bytes: Bytes,
    /// The first new live event, held back until replay has filled the gap before it (boxed:
    /// rare, and every frame's answer would carry its room).
    held: Option<Box<Event>>,
}

impl<St: ReplayStore> Engine<St> {
    fn lifetime(&self) -> Option<&Lifetime> {
        self.more.as_deref()?.lifetime.as_ref()
    }

    fn lifetime_mut(&mut self) -> Option<&mut Lifetime> {
        self.more.as_deref_mut()?.lifetime.as_mut()
    }

    fn replay(&self) -> Option<&ReplayStage<St>> {
        self.more.as_deref()?.replay.as_deref()
    }

    fn replay_mut(&mut self) -> Option<&mut ReplayStage<St>> {
        self.more.as_deref_mut()?.replay.as_deref_mut()
    }

    fn metadata(&self) -> Option<&Arc<MetadataConfig>> {
        self.more.as_deref()?.metadata.as_ref()
    }

    fn idle(&self) -> Option<Duration> {
        self.more.as_deref()?.idle
    }

    /// True when the idle timeout's deadline has passed.
    fn idle_due(&self, now: Instant) -> bool {
        self.more.as_deref().is_some_and(|more| {
            more.idle
                .is_some_and(|timeout| deadline(more.last_inner, timeout) <= now)
        })
    }

    /// The inner body gave a frame at `now`.
    fn inner_gave(&mut self, now: Instant) {
        if let Some(more) = self.more.as_deref_mut() {
            more.last_inner = now;
        }
    }

    fn take_first(&mut self) -> Option<Bytes> {
        self.more.as_deref_mut()?.first.take().map(|first| *first)
    }

    fn filling(&mut self) -> Option<&mut Pin<Box<Filling<St::Read>>>> {
        self.more.as_deref_mut()?.fill.as_mut()
    }

    fn parser(&mut self) -> Option<&mut Parser> {
        match &mut self.wire {
            Wire::Parser(parsing) => {
                let past_bom = self.past_bom;
                let parsing = parsing.get_or_insert_with(|| {
                    Self::fresh(past_bom, |p: &mut Parsing| p.parser.past_leading_bom())
                });
                Some(&mut parsing.parser)
            }
            Wire::Blind | Wire::Scanner(_) | Wire::Raw(_) => None,
        }
    }

    /// True when some stage may change events, or frames must end at boundaries: the client
    /// then gets whole events only.
    fn rewrites(&self) -> bool {
        self.whole_blocks
            || self.metadata().is_some_and(|m| m.rewrites())
            || self.replay().is_some_and(|r| r.rewrites())
    }

    /// True when the client's stream is between events: only there may a block go in. The
    /// rewrite path sends whole events only.
    fn client_at_boundary(&self) -> bool {
        match &self.wire {
            // Nothing is ever inserted.
            Wire::Blind => true,
            Wire::Scanner(scanner) => scanner.is_at_boundary(),
            // Framing sends whole blocks only.
            Wire::Raw(raw) => {
                self.rewrites() || raw.as_ref().is_none_or(|raw| raw.scanner.is_at_boundary())
            }
            Wire::Parser(parser) => {
                self.rewrites() || parser.as_ref().is_none_or(|p| !p.parser.is_mid_event())
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let heartbeat = self
            .heartbeat
            .as_ref()
            .map(|beat| deadline(self.last_sent, beat.interval));
        let idle = self
            .more
            .as_deref()
            .and_then(|more| Some(deadline(more.last_inner, more.idle?)));
        let lifetime = self
            .lifetime()
            .filter(|l| matches!(l.phase, Phase::Live | Phase::Ending))
            .map(|l| l.deadline);
        [heartbeat, idle, lifetime].into_iter().flatten().min()
    }

    /// True when the shutdown signal of the lifetime stage fired.
    fn shutdown_fired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(more) = self.more.as_deref_mut() else {
            return false;
        };
        more.shutdown
            .as_mut()
            .is_some_and(|triggered| Pin::new(triggered).poll(cx).is_ready())
    }

    fn phase(&self) -> Phase {
        self.lifetime().map_or(Phase::Live, |l| l.phase)
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(lifetime) = self.lifetime_mut() {
            lifetime.phase = phase;
        }
    }

    /// The lifetime is over (or shutdown came): end at the client's next boundary.
    fn end_lifetime(&mut self, now: Instant, kind: Timeout) {
        let at_boundary = self.client_at_boundary();
        let Some(lifetime) = self.lifetime_mut() else {
            return;
        };
        if lifetime.phase != Phase::Live {
            return;
        }
        if lifetime.config.is_counted() {
            telemetry::timed_out(kind);
        }
        if at_boundary {
            lifetime.phase = Phase::Farewell;
        } else {
            lifetime.phase = Phase::Ending;
            lifetime.deadline = deadline(now, lifetime.config.grace());
        }
    }

    /// Passes a data frame of the inner body through the stages.
    fn on_data(&mut self, data: Bytes, now: Instant) -> Passed {
        if self
            .lifetime()
            .is_some_and(|l| l.phase == Phase::Live && l.deadline <= now)
        {
            // A busy stream never lets the timer fire: its frames look at the clock too.
            self.end_lifetime(now, Timeout::Lifetime);
            if self.phase() == Phase::Farewell {
                // Ended at a boundary before this frame: the client resumes from there.
                return Passed {
                    bytes: Bytes::new(),
                    held: None,
                };
            }
        }
        let ending = self.phase() == Phase::Ending;
        let rewrites = self.rewrites();
        // `now` is the clock's reading (not a stand-in) when a timed stage needed one.
        let clock_read = self.heartbeat.is_some() || self.idle().is_some();
        let whole_blocks = self.whole_blocks;
        let passed = |bytes| Passed { bytes, held: None };
        let parser = match &mut self.wire {
            Wire::Blind => return passed(data),
            Wire::Scanner(scanner) => {
                #[cfg(feature = "subscriptions")]
                let cursor = self
                    .more
                    .as_deref_mut()
                    .and_then(|m| m.cursor.as_deref_mut());
                #[cfg(not(feature = "subscriptions"))]
                let cursor: Option<&mut ()> = None;
                if !ending && cursor.is_none() {
                    // An unbounded scanner holds nothing, so it cannot fail.
                    let _ = scanner.scan(&data);
                    return passed(data);
                }
                // Ending: forward up to the first boundary, drop the start of the next event.
                let mut end = None;
                #[cfg(feature = "subscriptions")]
                let mut cursor = cursor;
                #[cfg(feature = "subscriptions")]
                let mut moved = false;
                for piece in scanner.pieces(&data) {
                    // The scanner has no limits: it fails on nothing.
                    let Ok(piece) = piece else { break };
                    #[cfg(feature = "subscriptions")]
                    if let Some(cursor) = cursor.as_deref_mut() {
                        moved |= cursor.ids.piece(&data, piece);
                    }
                    if let (true, Piece::Dispatch { end: at }) = (ending, piece) {
                        end = Some(at);
                        break;
                    }
                }
                #[cfg(feature = "subscriptions")]
                if let (true, Some(cursor)) = (moved, cursor) {
                    cursor.sink.moved(cursor.ids.last());
                }
                return passed(match end {
                    Some(end) => {
                        self.set_phase(Phase::Farewell);
                        data.slice(..end)
                    }
                    None => data,
                });
            }
            Wire::Raw(raw) => {
                let past_bom = self.past_bom;
                let raw = raw.get_or_insert_with(|| {
                    Self::fresh(past_bom, |r: &mut RawWire| r.scanner.past_leading_bom())
                });
                let (mut replay, metadata) = match self.more.as_deref_mut() {
                    Some(more) => (
                        more.replay.as_deref_mut(),
                        more.metadata.as_deref().filter(|m| m.rewrites()),
                    ),
                    None => (None, None),
                };
                // Framing (metadata, or whole blocks asked for): the chunk, with what changed
                // spliced in (framed blocks, blocks begun in earlier chunks), up to the last
                // whole block.
                let framing = metadata.is_some() || whole_blocks;
                let mut spliced = None;
                let mut blocks_end = None;
                let fed = raw.events.feed(
                    &mut raw.scanner,
                    &data,
                    ending,
                    metadata.map(MetadataConfig::prefix),
                    |block| {
                        if let Some(replay) = replay.as_deref_mut() {
                            replay.record_raw(&block, &data);
                        }
                        if framing {
                            blocks_end = Some(block.ends_at);
                            splice_block(metadata, &block, &data, &mut spliced);
                        }
                    },
                );
                if let Some(replay) = replay {
                    replay.settle(Some(&data), clock_read.then_some(now));
                }
                let (fed, failed) = match fed {
                    Ok(fed) => (fed, false),
                    // Past the bounds: raw, the stream still flows (only recording stops);
                    // framed, the blocks before go out framed, then the stream ends.
                    Err(_) if !framing => {
                        self.on_parse_error();
                        return passed(data);
                    }
                    // Whole blocks only for compression: past the bounds the stream flows on
                    // as it comes, the block in flight with what was held of it.
                    Err(_) if metadata.is_none() => {
                        let held = raw.events.take_held();
                        let out = match spliced {
                            Some((mut out, copied)) => {
                                out.extend_from_slice(&data[copied..]);
                                out.freeze()
                            }
                            None if held.is_empty() => data,
                            None => {
                                let mut out = BytesMut::from(&held[..]);
                                out.extend_from_slice(&data);
                                out.freeze()
                            }
                        };
                        self.whole_blocks = false;
                        self.on_parse_error();
                        return passed(out);
                    }
                    Err(_) => (Fed::default(), true),
                };
                let out = if !framing {
                    match fed.stopped_at {
                        Some(end) => data.slice(..end),
                        None => data,
                    }
                } else {
                    // Whole blocks only: nothing when none ended here (a block in flight waits,
                    // bytes between blocks alone are dropped).
                    let end = match blocks_end {
                        None => 0,
                        Some(end) if failed => end,
                        Some(_) => fed.stopped_at.or(fed.held_from).unwrap_or(data.len()),
                    };
                    match spliced {
                        None if end == data.len() => data,
                        None => data.slice(..end),
                        Some((mut out, copied)) => {
                            out.extend_from_slice(&data[copied..end.max(copied)]);
                            out.freeze()
                        }
                    }
                };
                if fed.stopped_at.is_some() {
                    self.set_phase(Phase::Farewell);
                }
                if failed {
                    self.on_parse_error();
                }
                return passed(out);
            }
            Wire::Parser(parsing) => {
                let past_bom = self.past_bom;
                let parsing = parsing.get_or_insert_with(|| {
                    Self::fresh(past_bom, |p: &mut Parsing| p.parser.past_leading_bom())
                });
                &mut parsing.parser
            }
        };
        if !rewrites {
            // Nothing changes: the events are parsed for recording only.
            let mut data = data;
            let end = if ending {
                parser.boundary_in(&data)
            } else {
                None
            };
            if let Some(end) = end {
                data.truncate(end);
            }
            parser.push(data.clone());
            if end.is_some() {
                self.set_phase(Phase::Farewell);
            }
            let mut out = BytesMut::new();
            let held = self.drain(&mut out);
            debug_assert!(held.is_none() && out.is_empty(), "nothing changes");
            self.clear_unchanged();
            return passed(data);
        }
        let whole_start = !parser.is_mid_event();
        parser.push(data.clone());
        let mut out = BytesMut::new();
        self.changed = false;
        let held = self.drain(&mut out);
        let whole_end = self.parser().is_none_or(|parser| !parser.is_mid_event());
        if self.unchanged().is_none_or(|u| u.is_empty()) && !self.changed {
            // No event ended in this frame: its bytes wait in the parser (or were the rest of a
            // line ending).
            return Passed {
                bytes: Bytes::new(),
                held: held.map(Box::new),
            };
        }
        if held.is_none() && !self.changed && whole_start && whole_end {
            // Whole events, none changed: the frame itself.
            self.clear_unchanged();
            return passed(data);
        }
        self.flush_unchanged(&mut out);
        Passed {
            bytes: out.freeze(),
            held: held.map(Box::new),
        }
    }

    /// Runs the queued events through the event stages, into `out` or `unchanged`; stops at an
    /// event replay holds back and hands it over.
    fn drain(&mut self, out: &mut BytesMut) -> Option<Event> {
        loop {
            if self.phase() != Phase::Live && self.phase() != Phase::Ending {
                break;
            }
            let parser = self.parser()?;
            let event = match parser.next_event() {
                Some(Ok(event)) => event,
                Some(Err(_)) => {
                    self.on_parse_error();
                    return None;
                }
                None => break,
            };
            let raw = parser.raw_of_last();
            if let Some(held) = self.take_event(event, raw, out) {
                return Some(held);
            }
            if self.phase() == Phase::Ending && self.rewrites() {
                // The client is at a boundary after every event on the rewrite path.
                self.set_phase(Phase::Farewell);
            }
        }
        if let Some(replay) = self.replay_mut() {
            replay.settle(None, None);
        }
        None
    }

    fn on_parse_error(&mut self) {
        if self.rewrites() {
            // Too large to re-frame: end cleanly; the client reconnects and resumes.
            self.ended = true;
            return;
        }
        // Past the parser's limits the stream still flows; only recording stops, and a
        // scanner waits for the end of the event in flight.
        if let Some(replay) = self.replay_mut() {
            replay.flush();
            replay.stop_recording();
        }
        let mut scanner = Scanner::new();
        let _ = scanner.scan(b":");
        self.wire = Wire::Scanner(scanner);
    }

    /// One event through replay, then metadata; `Some` hands back an event replay holds.
    fn take_event(
        &mut self,
        mut event: Event,
        raw: Option<(Bytes, usize)>,
        out: &mut BytesMut,
    ) -> Option<Event> {
        let mut changed = false;
        if let Some(replay) = self.replay_mut() {
            match replay.admit(&mut event, raw) {
                Admit::Drop => {
                    self.changed = true;
                    self.flush_unchanged(out);
                    return None;
                }
                Admit::Hold => {
                    self.changed = true;
                    self.flush_unchanged(out);
                    return Some(event);
                }
                Admit::Pass { changed: c } => changed = c,
            }
        }
        self.finish_event(event, changed, out);
        None
    }

    /// Metadata framing, then out (or into `unchanged` while nothing in the frame changed).
    fn finish_event(&mut self, mut event: Event, mut changed: bool, out: &mut BytesMut) {
        if let Some(metadata) = self.metadata() {
            changed |= metadata.frame(&mut event);
        }
        if changed || self.changed {
            self.changed = true;
            self.flush_unchanged(out);
            event.encode_into(out);
        } else {
            match self.unchanged() {
                Some(unchanged) => unchanged.push(event),
                None => {
                    self.changed = true;
                    event.encode_into(out);
                }
            }
        }
    }

    /// The events of the current frame no stage changed (none without a parser).
    fn unchanged(&mut self) -> Option<&mut Vec<Event>> {
        match &mut self.wire {
            Wire::Parser(Some(parsing)) => Some(&mut parsing.unchanged),
            Wire::Parser(None) | Wire::Blind | Wire::Scanner(_) | Wire::Raw(_) => None,
        }
    }

    fn clear_unchanged(&mut self) {
        if let Some(unchanged) = self.unchanged() {
            unchanged.clear();
            // A burst of events must not keep its room for the rest of the stream.
            unchanged.shrink_to(16);
        }
    }

    fn flush_unchanged(&mut self, out: &mut BytesMut) {
        if let Some(unchanged) = self.unchanged() {
            for event in unchanged.drain(..) {
                event.encode_into(out);
            }
        }
    }

    /// Replay filled the gap before `held`: the events it found, then `held`, then whatever
    /// else the parser has queued.
    fn after_fill(&mut self, lookup: Lookup, held: Option<Box<Event>>) -> Passed {
        let mut out = BytesMut::new();
        if let Some(More {
            replay: Some(replay),
            metadata,
            ..
        }) = self.more.as_deref_mut()
        {
            let mut found = BytesMut::new();
            replay.fill(lookup, held.as_deref(), &mut found);
            match metadata {
                Some(metadata) if metadata.rewrites() && !found.is_empty() => {
                    frame_stored(metadata, &found.freeze(), &mut out)
                }
                _ => out.extend_from_slice(&found),
            }
        }
        self.changed = true;
        if let Some(mut held) = held {
            let changed = self
                .replay_mut()
                .is_some_and(|replay| replay.release(&mut held, None));
            self.finish_event(*held, changed, &mut out);
        }
        let held = self.drain(&mut out);
        self.flush_unchanged(&mut out);
        Passed {
            bytes: out.freeze(),
            held: held.map(Box::new),
        }
    }

    /// Starts replay's read when a frame held an event back; the bytes to send now, if any.
    fn start_fill(&mut self, passed: Passed) -> Option<Bytes> {
        if let (Some(held), Some(more)) = (passed.held, self.more.as_deref_mut()) {
            if let Some(replay) = more.replay.as_deref_mut() {
                more.fill = Some(Box::pin(Filling {
                    read: replay.gap_read(),
                    held: Some(held),
                }));
            }
        }
        (!passed.bytes.is_empty()).then_some(passed.bytes)
    }

    /// A block of the engine's own goes out: a leading BOM of the inner body is no longer
    /// leading, and the wire (which sees what follows it) is past the stream's start.
    fn own_bytes(&mut self, now: Instant) {
        if self.frames.drop_leading_bom() {
            self.past_bom = true;
            match &mut self.wire {
                Wire::Scanner(scanner) => scanner.past_leading_bom(),
                Wire::Raw(Some(raw)) => raw.scanner.past_leading_bom(),
                Wire::Parser(Some(parsing)) => parsing.parser.past_leading_bom(),
                Wire::Blind | Wire::Raw(None) | Wire::Parser(None) => {}
            }
        }
        self.last_sent = now;
    }

    /// A new wire reader, past the stream's start when the inner body's mark is dropped.
    fn fresh<T: Default>(past_bom: bool, past: impl FnOnce(&mut T)) -> Box<T> {
        let mut fresh = Box::<T>::default();
        if past_bom {
            past(&mut fresh);
        }
        fresh
    }
}

impl<B: Body<Data = Bytes>, St: ReplayStore> Body for EngineBody<B, St> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let (mut inner, core) = match self.project().kind.project() {
            KindProj::Untouched { inner } => return inner.poll_frame(cx),
            KindProj::Stream { inner, core } => (inner, core),
        };
        let CoreProj { mut timer, engine } = core.as_mut().project();
        if let Some(first) = engine.take_first() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if engine.only_times && !engine.ended {
            // The frames themselves, untouched; the timer below moves lazily.
            if let Poll::Ready(frame) = inner.as_mut().poll_frame(cx) {
                match &frame {
                    Some(Ok(_)) => engine.inner_gave(Instant::now()),
                    Some(Err(_)) => {}
                    None => engine.ended = true,
                }
                return Poll::Ready(frame);
            }
        }
        loop {
            match engine.phase() {
                Phase::Done => return Poll::Ready(None),
                Phase::Farewell => {
                    engine.set_phase(Phase::Done);
                    let farewell = engine.lifetime().and_then(|l| l.config.farewell());
                    if let Some(farewell) = farewell {
                        return Poll::Ready(Some(Ok(Frame::data(farewell))));
                    }
                    continue;
                }
                Phase::Live => {
                    if engine.shutdown_fired(cx) {
                        engine.end_lifetime(Instant::now(), Timeout::Shutdown);
                        rearm(timer.as_mut(), engine);
                        continue;
                    }
                }
                Phase::Ending => {}
            }
            if engine.ended {
                return Poll::Ready(None);
            }
            if let Some(filling) = engine.filling() {
                let filling = filling.as_mut().project();
                // A failed read fills nothing: the live event goes on.
                let lookup = ready!(filling.read.poll(cx)).unwrap_or(Lookup::Unknown);
                let held = filling.held.take();
                if let Some(more) = engine.more.as_deref_mut() {
                    more.fill = None;
                }
                let passed = engine.after_fill(lookup, held);
                if let Some(data) = engine.start_fill(passed) {
                    engine.last_sent = Instant::now();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                continue;
            }
            // Timing alone, the inner body was polled above and is quiet.
            let polled = if engine.only_times {
                Poll::Pending
            } else {
                engine.frames.poll_frame(inner.as_mut(), cx)
            };
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    // Only the time is noted: the timer is moved lazily, when it fires. The
                    // lifetime alone needs no clock per frame: its deadline passed only when
                    // the timer did.
                    let elapsed = matches!(&*timer, Timer::On { sleep } if sleep.is_elapsed());
                    let now = if engine.heartbeat.is_some() || engine.idle().is_some() || elapsed {
                        Instant::now()
                    } else {
                        // A time already past, as good as now for a deadline that has not come.
                        engine.last_sent
                    };
                    engine.inner_gave(now);
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let phase = engine.phase();
                    let passed = engine.on_data(data, now);
                    if engine.phase() != phase {
                        rearm(timer.as_mut(), engine);
                    }
                    if let Some(data) = engine.start_fill(passed) {
                        engine.last_sent = now;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    continue;
                }
                Poll::Ready(other) => {
                    if other.is_none() {
                        engine.set_phase(Phase::Done);
                        engine.ended = true;
                    }
                    return Poll::Ready(other);
                }
                Poll::Pending => {}
            }
            // The inner body is quiet: the timed stages.
            let TimerProj::On { mut sleep } = timer.as_mut().project() else {
                return Poll::Pending;
            };
            loop {
                ready!(sleep.as_mut().poll(cx));
                let now = Instant::now();
                if engine.idle_due(now) {
                    telemetry::timed_out(Timeout::Idle);
                    engine.ended = true;
                    engine.idle_timed_out = true;
                    return Poll::Ready(None);
                }
                match engine.lifetime() {
                    Some(l) if l.phase == Phase::Live && l.deadline <= now => {
                        engine.end_lifetime(now, Timeout::Lifetime);
                    }
                    Some(l) if l.phase == Phase::Ending && l.deadline <= now => {
                        // The event in flight never ended; a farewell now would join it.
                        engine.set_phase(Phase::Done);
                    }
                    _ => {}
                }
                if matches!(engine.phase(), Phase::Farewell | Phase::Done) {
                    break;
                }
                let mut beat = None;
                if let Some(heartbeat) = &engine.heartbeat {
                    if deadline(engine.last_sent, heartbeat.interval) <= now {
                        if engine.client_at_boundary() {
                            beat = Some(heartbeat.frame.clone());
                        } else {
                            // Mid-event: wait for the event to end; its frames move this anyway.
                            engine.last_sent = now;
                        }
                    }
                }
                if let Some(due) = engine.next_due() {
                    sleep.as_mut().reset(due);
                }
                if let Some(beat) = beat {
                    engine.own_bytes(now);
                    if let Some(due) = engine.next_due() {
                        sleep.as_mut().reset(due);
                    }
                    telemetry::heartbeat_sent();
                    return Poll::Ready(Some(Ok(Frame::data(beat))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Untouched { inner } => inner.is_end_stream(),
            Kind::Stream { inner, core } => match core.engine.phase() {
                Phase::Done => true,
                Phase::Farewell => core
                    .engine
                    .lifetime()
                    .is_none_or(|l| !l.config.has_farewell()),
                Phase::Live | Phase::Ending => {
                    core.engine.ended
                        || (core
                            .engine
                            .more
                            .as_deref()
                            .is_none_or(|more| more.first.is_none() && more.fill.is_none())
                            && core.engine.frames.is_end_stream(inner))
                }
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Untouched { inner } => inner.size_hint(),
            // Only timed: it may end early, so no exact size holds.
            Kind::Stream { inner, core } if matches!(core.engine.wire, Wire::Blind) => {
                let mut hint = SizeHint::new();
                if let Some(upper) = inner.size_hint().upper() {
                    hint.set_upper(upper);
                }
                hint
            }
            // Bytes are added and removed at times no one knows in advance.
            Kind::Stream { .. } => SizeHint::new(),
        }
    }
}

/// Moves the timer to the engine's earliest deadline, after a deadline moved closer.
fn rearm<St: ReplayStore>(timer: Pin<&mut Timer>, engine: &Engine<St>) {
    if let (TimerProj::On { sleep }, Some(due)) = (timer.project(), engine.next_due()) {
        sleep.reset(due);
    }
}

/// `Default`, `Debug` and `Body` for a layer's public body around an [`EngineBody`] in its field
/// `body`.
macro_rules! engine_body_impls {
    ($name:ident<B $(, $store:ident: $bound:path)?>) => {
        impl<B: Default $(, $store: $bound)?> Default for $name<B $(, $store)?> {
            /// The inner body's default, passed through untouched.
            fn default() -> Self {
                Self {
                    body: Default::default(),
                }
            }
        }

        impl<B $(, $store: $bound)?> ::std::fmt::Debug for $name<B $(, $store)?> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_tuple(stringify!($name))
                    .field(&self.body.kind_name())
                    .finish()
            }
        }

        impl<B: http_body::Body<Data = bytes::Bytes> $(, $store: $bound)?> http_body::Body
            for $name<B $(, $store)?>
        {
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
pub(crate) use engine_body_impls;

/// Declares a layer's own public body: a newtype around an [`EngineBody`] without replay, with
/// `Default`, `Debug`, `Body` and `get_ref`/`get_mut`/`into_inner`; `$drops` ends the sentence
/// of what `into_inner` leaves behind.
macro_rules! engine_body {
    (
        $(#[$meta:meta])*
        pub struct $name:ident, dropping $drops:literal
    ) => {
        pin_project_lite::pin_project! {
            $(#[$meta])*
            pub struct $name<B> {
                #[pin]
                body: $crate::engine::EngineBody<B, $crate::engine::NoStore>,
            }
        }

        impl<B> $name<B> {
            pub(crate) fn from_engine(
                body: $crate::engine::EngineBody<B, $crate::engine::NoStore>,
            ) -> Self {
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

            #[doc = concat!("Unwraps the inner service's body: ", $drops)]
            pub fn into_inner(self) -> B {
                self.body.into_inner()
            }
        }

        $crate::engine::engine_body_impls!($name<B>);
    };
}
pub(crate) use engine_body;
