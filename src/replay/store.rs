//! Where replayed events live: the [`ReplayStore`] trait and the in-memory [`MemoryStore`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::{ready, Future, Ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// The store's maps: keyed with a per-map random seed (keys come from clients, ids from
/// upstreams), cheaper than SipHash on short keys.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use bytes::Bytes;
use tokio::time::Instant;

/// One recorded event: its id and its encoded block, ready to send as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// The event's id, as bytes.
    pub id: Bytes,
    /// The encoded block, blank line included.
    pub bytes: Bytes,
}

/// Where one connection's recording stands in its key's history, kept by the recorder from one
/// batch to the next (see [`ReplayStore::append_carried`]). A store sets it; `Default` is
/// "nowhere yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Position(u64);

impl Position {
    /// A position a store encodes as it likes (0 is "nowhere yet").
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The value the store set.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// The events one connection carried in a frame, in order, handed to
/// [`ReplayStore::append_carried`]: each id is there at once, an event's bytes are built only
/// when the store keeps it.
pub trait CarriedEvents {
    /// How many events there are.
    fn len(&self) -> usize;

    /// True when there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of event `index`.
    fn id(&self, index: usize) -> &[u8];

    /// Event `index` as stored, its bytes built now. Taken at most once; `None` after that.
    fn take(&mut self, index: usize) -> Option<StoredEvent>;
}

/// Where a read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom<'a> {
    /// From the oldest event retained.
    Oldest,
    /// The newest `limit` events retained (oldest first).
    Newest,
    /// After the event with this id.
    After(&'a [u8]),
}

/// The answer to a read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// The starting point is retained; these events follow it, oldest first (at most the limit).
    Found(Vec<StoredEvent>),
    /// The starting point is retained and these events follow it, but recording stopped after
    /// it for a while (no connection carried the stream): events sent meanwhile may be missing.
    Interrupted {
        /// The events retained after the starting point, oldest first (at most the limit).
        events: Vec<StoredEvent>,
        /// Recording stopped only after the last of `events` (nothing was recorded since): an
        /// upstream that resumes from the last one sends what is missing.
        resumable: bool,
    },
    /// The id is not retained (never seen, or trimmed away).
    Unknown,
}

impl Lookup {
    /// The events found after the starting point, whether or not recording was interrupted.
    pub fn into_events(self) -> Option<Vec<StoredEvent>> {
        match self {
            Self::Found(events) | Self::Interrupted { events, .. } => Some(events),
            Self::Unknown => None,
        }
    }
}

/// A store failed; the replay layer then serves the live stream without replay.
#[derive(Debug)]
pub struct StoreError(Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    /// Wraps the store's own error.
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(error.into())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "replay store failed: {}", self.0)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Storage for the [`ReplayLayer`](super::ReplayLayer): a bounded, ordered history per stream key.
///
/// Reads are asynchronous (a networked store fits behind them). Appends are not: the live stream
/// never waits for the store, so a networked store queues them and writes in the background.
/// Errors never reach the live stream; they only mean less replay.
pub trait ReplayStore: Clone + Send + Sync + 'static {
    /// The future of a read.
    type Read: Future<Output = Result<Lookup, StoreError>> + Send + 'static;

    /// Reads up to `limit` events of `key`, starting as `from` says.
    fn read(&self, key: &Bytes, from: ReadFrom<'_>, limit: usize) -> Self::Read;

    /// Records an event of `key`, unless an event with the same id is already retained (several
    /// connections on one key see the same events; each is stored once).
    fn append(&self, key: &Bytes, event: StoredEvent);

    /// Records the events of `key`, in order, as [`append`](ReplayStore::append) does one by one;
    /// a store may take them in one go (the replay layer hands over each frame's events).
    fn append_all(&self, key: &Bytes, events: impl Iterator<Item = StoredEvent>)
    where
        Self: Sized,
    {
        for event in events {
            self.append(key, event);
        }
    }

    /// [`append_all`](ReplayStore::append_all) at `now`, the caller's reading of the clock: a
    /// store that notes when events came (the memory store, for ages and idle keys) need not
    /// read it again. By default the time is not used.
    fn append_all_at(&self, key: &Bytes, events: impl Iterator<Item = StoredEvent>, now: Instant)
    where
        Self: Sized,
    {
        let _ = now;
        self.append_all(key, events);
    }

    /// Records the events one connection carried, in order, after the event `position` marks
    /// (the connection's previous batch left it there; `Default` for its first).
    ///
    /// Without the fan-out hub every connection on a key records the same events. A store that
    /// keeps one ordered history per key uses the position to tell what a connection carries
    /// from what is new: an event that follows the connection's previous one in the history is
    /// recorded already (found without copying it), and a connection that fell behind the
    /// retained history (a slow client's) appends nothing stale after the newest event. By
    /// default every event goes to [`append_all_at`](ReplayStore::append_all_at) and the
    /// position is not used.
    fn append_carried(
        &self,
        key: &Bytes,
        position: &mut Position,
        events: &mut dyn CarriedEvents,
        now: Instant,
    ) where
        Self: Sized,
    {
        let _ = position;
        let count = events.len();
        self.append_all_at(key, (0..count).filter_map(|index| events.take(index)), now);
    }

    /// A connection starts recording `key`. With [`recorder_stopped`](Self::recorder_stopped),
    /// a store can tell when nothing recorded a key for a while, and answer a read that spans
    /// that time with [`Lookup::Interrupted`]. `continues_after`: the id the connection's
    /// upstream resumes after (it was sent as `Last-Event-ID` to an upstream known to resume):
    /// when that is the newest event retained, recording goes on from it without a gap. By
    /// default nothing is tracked.
    fn recorder_started(&self, key: &Bytes, continues_after: Option<&[u8]>) {
        let _ = (key, continues_after);
    }

    /// A connection that recorded `key` stopped (its stream ended or its client went away).
    fn recorder_stopped(&self, key: &Bytes) {
        let _ = key;
    }

    /// The store's own copy of `key` while it holds that key, which a recorder keeps in place
    /// of its own: the connections recording one key then read its bytes (hashed and compared
    /// with every append) from one place, not from an allocation each that is cold by the time
    /// its next event comes. By default none.
    fn shared_key(&self, key: &Bytes) -> Option<Bytes> {
        let _ = key;
        None
    }

    /// A new id for an event of `key`: unique for this store, increasing per key.
    fn next_id(&self, key: &Bytes) -> Bytes;

    /// Keeps only the newest `keep` events of `key` (0 forgets its history).
    fn trim(&self, key: &Bytes, keep: usize);
}

/// Bounds of a [`MemoryStore`].
///
/// The whole store holds at most [`max_bytes`](Self::max_bytes) (default 64 MiB) and
/// [`max_keys`](Self::max_keys) keys (default 10,000), whatever the number of distinct keys
/// clients ask for; within that, each key keeps at most
/// [`events_per_key`](Self::events_per_key) events and [`bytes_per_key`](Self::bytes_per_key)
/// bytes. The bytes counted are what the store keeps:
///
/// - per retained event: its encoded bytes, its id and [`EVENT_OVERHEAD`](Self::EVENT_OVERHEAD)
///   bytes of bookkeeping (its slot in the ring, its entry in the id index, its time);
/// - per key: the key's bytes and [`KEY_OVERHEAD`](Self::KEY_OVERHEAD) bytes (its map entry,
///   its place in the recency order, the empty ring and index).
///
/// An event's bytes are counted by their length: give the store events that own their buffer (as
/// the replay layer and the fan-out hub do), since a slice keeps its whole buffer alive. When a new event or key would go past the budget, whole
/// keys are evicted, the one least recently appended or read first (keys idle for
/// [`key_idle`](Self::key_idle) are forgotten before that); the key being written to loses its
/// oldest events only when it is the last one left, and an event bigger than the whole budget is
/// not recorded. Memory comes back as keys expire or are evicted
/// ([`MemoryStore::bytes`] reports the count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimits {
    events_per_key: usize,
    bytes_per_key: usize,
    max_age: Option<Duration>,
    max_keys: usize,
    max_bytes: usize,
    key_idle: Duration,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            events_per_key: 1_000,
            bytes_per_key: 1024 * 1024,
            max_age: None,
            max_keys: Self::DEFAULT_MAX_KEYS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            key_idle: Duration::from_secs(3600),
        }
    }
}

impl MemoryLimits {
    /// The default bound of the whole store: 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

    /// The default bound on the number of keys: 10,000.
    pub const DEFAULT_MAX_KEYS: usize = 10_000;

    /// Bytes counted per retained event besides its bytes and id: its ring slot, id index entry
    /// and timestamp (`benches/replay.rs` measures about 119 with 100 events per key).
    pub const EVENT_OVERHEAD: usize = 144;

    /// Bytes counted per key besides the key's own bytes: its map entry, recency entry and the
    /// first allocations of its ring and index (`benches/replay.rs` measures a key holding one
    /// small event at about 830 bytes in all, which this counts at about 870).
    pub const KEY_OVERHEAD: usize = 640;

    /// Keeps at most `events` events per key (default 1,000).
    pub fn events_per_key(mut self, events: usize) -> Self {
        self.events_per_key = events.max(1);
        self
    }

    /// Keeps at most `bytes` of encoded events per key (default 1 MiB); the newest event is
    /// always kept (within [`max_bytes`](Self::max_bytes)).
    pub fn bytes_per_key(mut self, bytes: usize) -> Self {
        self.bytes_per_key = bytes;
        self
    }

    /// Drops events older than `age` (default: no age limit).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Keeps at most `keys` stream keys (default 10,000, at least 1); a new key beyond it evicts
    /// the one unused for longest.
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys.max(1);
        self
    }

    /// Keeps at most `bytes` for the whole store, all keys together, counted as the
    /// [type docs](Self) say (default 64 MiB); beyond it, the keys least recently appended or
    /// read are evicted whole.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Forgets a key unused (no append, no read) for `idle` (default one hour).
    pub fn key_idle(mut self, idle: Duration) -> Self {
        self.key_idle = idle;
        self
    }

    fn is_idle_since(&self, last_used: Instant, now: Instant) -> bool {
        now.saturating_duration_since(last_used) >= self.key_idle
    }
}

/// The bytes counted for a retained event.
fn event_cost(event: &StoredEvent) -> usize {
    event.bytes.len() + event.id.len() + MemoryLimits::EVENT_OVERHEAD
}

/// The bytes counted for a key with nothing retained.
fn key_cost(key: &[u8]) -> usize {
    key.len() + MemoryLimits::KEY_OVERHEAD
}

/// The default [`ReplayStore`]: bounded history per key in this process's memory.
///
/// Per key a ring of events and an id index: append is O(1), finding an id O(1). Keys live in a
/// map bounded in count and in bytes ([`MemoryLimits`]), ordered by last use so that eviction and
/// idle expiry take the least recently used key in O(log n). One short `std` lock guards the
/// map; it is never held across an `.await`. Ids it assigns carry a random per-store prefix, so an
/// id from before a restart is unknown rather than mistaken for a new event's.
///
/// ```
/// use bytes::Bytes;
/// use tower_sse::replay::{Lookup, MemoryLimits, MemoryStore, ReadFrom, ReplayStore, StoredEvent};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryStore::with_limits(MemoryLimits::default().max_bytes(64 * 1024));
/// let key = Bytes::from_static(b"/prices");
/// for id in ["1", "2", "3"] {
///     let bytes = Bytes::from(format!("id: {id}\ndata: x\n\n"));
///     store.append(&key, StoredEvent { id: Bytes::from(id), bytes });
/// }
/// let Lookup::Found(after) = store.read(&key, ReadFrom::After(b"1"), 10).await.unwrap() else {
///     panic!("id 1 is retained")
/// };
/// assert_eq!(after.len(), 2);
/// assert_eq!(store.read(&key, ReadFrom::After(b"9"), 10).await.unwrap(), Lookup::Unknown);
///
/// // However many keys clients make up, the store stays within its budget.
/// for n in 0..1_000 {
///     let key = Bytes::from(format!("/prices?nonce={n}"));
///     store.append(&key, StoredEvent { id: Bytes::from("1"), bytes: Bytes::from("data: x\n\n") });
/// }
/// assert!(store.bytes() <= 64 * 1024);
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    limits: MemoryLimits,
    prefix: String,
    /// Read-locked by connections carrying events recorded already (see
    /// [`MemoryStore::carry_recorded`]), write-locked by everything else.
    streams: RwLock<Streams>,
    /// The last id number assigned.
    assigned: AtomicU64,
}

/// Every key's stream, their order of last use and the bytes they are counted for.
#[derive(Default)]
struct Streams {
    map: HashMap<Bytes, Stream>,
    /// Keys by last use, least recent first: a stream's `tick` leads to its key.
    recency: BTreeMap<u64, Bytes>,
    clock: u64,
    /// The sum of every stream's `cost`.
    bytes: usize,
    /// The sequence number a new key's first event gets: past every number a forgotten key
    /// used, so that a [`Position`] of a forgotten key never names an event of its successor.
    next_first_seq: u64,
    /// No key goes idle before this: the least recent key's last use plus the idle time (keys
    /// are only ever used later, so it stays a lower bound until that key goes).
    no_expiry_before: Option<Instant>,
    /// What every stream's [`UsedAt`] counts from.
    epoch: Epoch,
    /// When the store's size is next reported to telemetry (at most once a second; `None`:
    /// at once).
    #[cfg(feature = "metrics")]
    next_report: Option<Instant>,
}

struct Stream {
    events: VecDeque<Retained>,
    /// id -> sequence number of the event that carries it.
    index: IdIndex,
    /// Sequence number of `events[0]` (numbers are unique in the store, see
    /// [`Streams::next_first_seq`]).
    first_seq: u64,
    /// Encoded bytes of the retained events (the per-key bound).
    bytes: usize,
    /// Bytes counted for this key: its own cost and its events'.
    cost: usize,
    last_used: UsedAt,
    /// Its place in [`Streams::recency`].
    tick: u64,
    /// Connections recording it now.
    recorders: u32,
    /// Where recording stopped (the sequence number the next event would have had when the
    /// last recorder went), oldest first; those before `first_seq` are dropped with their events.
    paused_at: VecDeque<u64>,
}

/// The instant the store was made, which a key's last use is counted from.
#[derive(Clone, Copy)]
struct Epoch(Instant);

impl Default for Epoch {
    fn default() -> Self {
        Self(Instant::now())
    }
}

/// When a key was last used, in milliseconds since the store's [`Epoch`]: an atomic, so that a
/// connection holding the store's lock only to read can still mark its key used.
struct UsedAt(AtomicU64);

impl UsedAt {
    fn new(epoch: Epoch, now: Instant) -> Self {
        let used = Self(AtomicU64::new(0));
        used.mark(epoch, now);
        used
    }

    fn get(&self, epoch: Epoch) -> Instant {
        epoch.0 + Duration::from_millis(self.0.load(Ordering::Relaxed))
    }

    /// Marks the key used at `now` (never earlier than it was): a write at most once a
    /// millisecond, however many connections carry the key.
    fn mark(&self, epoch: Epoch, now: Instant) {
        let millis = now.saturating_duration_since(epoch.0).as_millis();
        let millis = u64::try_from(millis).unwrap_or(u64::MAX);
        if self.0.load(Ordering::Relaxed) < millis {
            self.0.fetch_max(millis, Ordering::Relaxed);
        }
    }
}

use std::collections::hash_map::Entry;

/// Ids to sequence numbers. Keyed by the id's hash, so that no id is copied or counted again
/// for the index; a hit is checked against the retained event's id. An id whose hash another
/// retained id holds already goes to `collided` (with a seeded 64-bit hash, practically never).
#[derive(Default)]
struct IdIndex<S = foldhash::fast::RandomState> {
    ids: S,
    by_hash: std::collections::HashMap<u64, u64, std::hash::BuildHasherDefault<HashIsKey>>,
    collided: HashMap<Bytes, u64>,
}

/// The hasher of a map keyed by hashes already: the key is its own hash.
#[derive(Default)]
struct HashIsKey(u64);

impl std::hash::Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else is folded in all the same.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

impl<S: std::hash::BuildHasher> IdIndex<S> {
    fn hash(&self, id: &[u8]) -> u64 {
        self.ids.hash_one(id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }

    /// The sequence number of the retained event with `id`.
    fn get(&self, id: &[u8], events: &VecDeque<Retained>, first_seq: u64) -> Option<u64> {
        self.get_hashed(self.hash(id), id, events, first_seq)
    }

    /// [`get`](Self::get) with the id's hash at hand.
    fn get_hashed(
        &self,
        hash: u64,
        id: &[u8],
        events: &VecDeque<Retained>,
        first_seq: u64,
    ) -> Option<u64> {
        let holds = |seq: u64| {
            events
                .get(seq.wrapping_sub(first_seq) as usize)
                .is_some_and(|retained| retained.event.id == id)
        };
        match self.by_hash.get(&hash) {
            Some(&seq) if holds(seq) => Some(seq),
            _ if self.collided.is_empty() => None,
            _ => self.collided.get(id).copied(),
        }
    }

    /// Indexes `id` at `seq`; false when an event with `id` is retained already.
    #[cfg(test)]
    fn insert(
        &mut self,
        id: &Bytes,
        seq: u64,
        events: &VecDeque<Retained>,
        first_seq: u64,
    ) -> bool {
        self.insert_hashed(self.hash(id), id, seq, events, first_seq)
            .is_ok()
    }

    /// [`insert`](Self::insert) with the id's hash at hand.
    fn insert_hashed(
        &mut self,
        hash: u64,
        id: &Bytes,
        seq: u64,
        events: &VecDeque<Retained>,
        first_seq: u64,
    ) -> Result<(), u64> {
        if let Some(&held) = (!self.collided.is_empty())
            .then(|| self.collided.get(&id[..]))
            .flatten()
        {
            return Err(held);
        }
        match self.by_hash.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(seq);
                Ok(())
            }
            Entry::Occupied(held) => {
                let other = *held.get();
                let same = events
                    .get(other.wrapping_sub(first_seq) as usize)
                    .is_some_and(|retained| retained.event.id == *id);
                if same {
                    return Err(other);
                }
                self.collided.insert(id.clone(), seq);
                Ok(())
            }
        }
    }

    /// Forgets `id`, indexed at `seq`.
    fn remove(&mut self, hash: u64, id: &[u8], seq: u64) {
        if let Entry::Occupied(held) = self.by_hash.entry(hash) {
            if *held.get() == seq {
                held.remove();
                return;
            }
        }
        if !self.collided.is_empty() {
            self.collided.remove(id);
        }
    }
}

struct Retained {
    event: StoredEvent,
    at: Instant,
    /// Its id's hash in the index, kept so that trimming does not hash the id again.
    hash: u64,
}

/// Where a connection's batch stands in a key's history.
#[derive(Clone, Copy)]
enum Place {
    /// Its events come after the newest (or nothing is retained): new ones are appended.
    Newest,
    /// Its last event is retained with this sequence number.
    After(u64),
    /// Its last event is no longer retained, others are: it is behind the history.
    Behind,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let streams = self.lock();
        f.debug_struct("MemoryStore")
            .field("limits", &self.shared.limits)
            .field("keys", &streams.map.len())
            .field("bytes", &streams.bytes)
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default [`MemoryLimits`].
    pub fn new() -> Self {
        Self::with_limits(MemoryLimits::default())
    }

    /// A store bounded by `limits`.
    pub fn with_limits(limits: MemoryLimits) -> Self {
        let prefix = format!(
            "{:08x}",
            (crate::jitter::unit() * f64::from(u32::MAX)) as u32
        );
        Self {
            shared: Arc::new(Shared {
                limits,
                prefix,
                streams: RwLock::new(Streams::default()),
                assigned: AtomicU64::new(0),
            }),
        }
    }

    /// Runs `write` on the stream of `key` (made if new) under one lock and one lookup of the
    /// key, then keeps the store's byte count and budget in step. `write` gets the limits and a
    /// test of whether an event fits the budget at all.
    fn write(
        &self,
        key: &Bytes,
        now: Instant,
        write: impl FnOnce(&mut Stream, &MemoryLimits, &dyn Fn(&StoredEvent) -> bool),
    ) {
        let limits = &self.shared.limits;
        let mut guard = self.lock();
        let streams = &mut *guard;
        streams.expire(limits, now);
        let stream = match streams.map.get_mut(key) {
            Some(stream) => {
                Streams::touch_stream(
                    &mut streams.recency,
                    &mut streams.clock,
                    streams.epoch,
                    stream,
                    now,
                );
                stream
            }
            None => {
                if !streams.admit(key, limits, now) {
                    return;
                }
                match streams.map.get_mut(key) {
                    Some(stream) => stream,
                    None => return,
                }
            }
        };
        // Bigger than the whole budget: never recorded (a replay then finds its id unknown).
        let fits = |event: &StoredEvent| key_cost(key) + event_cost(event) <= limits.max_bytes;
        let before = stream.cost;
        #[cfg(feature = "metrics")]
        let end_before = stream.end_seq();
        write(stream, limits, &fits);
        // Every event retained moves the end on.
        #[cfg(feature = "metrics")]
        let retained = stream.end_seq() != end_before;
        let after = stream.cost;
        streams.bytes = streams.bytes - before + after;
        streams.fit(key, limits);
        // The size gauges, at most once a second, after a write that retained something.
        #[cfg(feature = "metrics")]
        if retained && streams.report_due(now) {
            let events = streams.map.values().map(|s| s.events.len()).sum();
            crate::telemetry::store_size(streams.map.len(), events);
        }
    }

    /// The number of keys held (keys idle past [`MemoryLimits::key_idle`] are forgotten first).
    pub fn keys(&self) -> usize {
        let mut streams = self.lock();
        streams.expire(&self.shared.limits, Instant::now());
        streams.map.len()
    }

    /// The bytes the store is counted for, all keys together, as [`MemoryLimits`] counts them
    /// (keys idle past [`MemoryLimits::key_idle`] are forgotten first); never more than
    /// [`MemoryLimits::max_bytes`].
    pub fn bytes(&self) -> usize {
        let mut streams = self.lock();
        streams.expire(&self.shared.limits, Instant::now());
        streams.bytes
    }

    /// The number of events retained for `key`.
    pub fn len(&self, key: &[u8]) -> usize {
        self.lock().map.get(key).map_or(0, |s| s.events.len())
    }

    /// True when nothing is retained for `key`.
    pub fn is_empty(&self, key: &[u8]) -> bool {
        self.len(key) == 0
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Streams> {
        // A panic while holding the lock leaves the maps consistent (every update is done before
        // anything can panic), so a poisoned lock is still usable.
        self.shared
            .streams
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_shared(&self) -> RwLockReadGuard<'_, Streams> {
        self.shared
            .streams
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The common case of [`append_carried`](ReplayStore::append_carried) with many
    /// connections on one key: every event of the batch follows the connection's previous one
    /// in the history, recorded already by the connection ahead. Done under the read lock, so
    /// such connections never wait for one another (nor for one that lost its core while
    /// holding the lock); false, with nothing done, when the batch needs more (an event to
    /// append or look up, an expiry due, a key to move up the recency order): the write path
    /// does it all.
    fn carry_recorded(
        &self,
        key: &Bytes,
        position: &mut Position,
        events: &dyn CarriedEvents,
        now: Instant,
    ) -> bool {
        let streams = self.lock_shared();
        if streams.no_expiry_before.is_none_or(|at| now >= at) {
            return false;
        }
        let Some(stream) = streams.map.get(&key[..]) else {
            return false;
        };
        // Touching any other key would move it in the recency order.
        if stream.tick != streams.clock {
            return false;
        }
        let Place::After(mut seq) = stream.place(*position) else {
            return false;
        };
        for index in 0..events.len() {
            match stream.at(seq + 1) {
                Some(next) if next.event.id == events.id(index) => seq += 1,
                _ => return false,
            }
        }
        stream.last_used.mark(streams.epoch, now);
        *position = Position::new(seq + 1);
        true
    }
}

impl Streams {
    /// True when the store's size is due to be reported.
    #[cfg(feature = "metrics")]
    fn report_due(&mut self, now: Instant) -> bool {
        let due = self.next_report.is_none_or(|next| now >= next);
        if due {
            self.next_report = Some(now + Duration::from_secs(1));
        }
        due
    }

    /// Forgets the keys unused for the idle time (the least recently used come first).
    fn expire(&mut self, limits: &MemoryLimits, now: Instant) {
        if self.no_expiry_before.is_some_and(|at| now < at) {
            return;
        }
        self.no_expiry_before = None;
        while let Some((_, key)) = self.recency.first_key_value() {
            let last_used = self
                .map
                .get(key)
                .map(|stream| stream.last_used.get(self.epoch));
            if let Some(last_used) = last_used.filter(|&used| !limits.is_idle_since(used, now)) {
                self.no_expiry_before = last_used.checked_add(limits.key_idle);
                break;
            }
            let key = key.clone();
            self.remove(&key);
        }
    }

    /// Forgets `key` and everything retained for it.
    fn remove(&mut self, key: &[u8]) {
        if let Some(stream) = self.map.remove(key) {
            self.recency.remove(&stream.tick);
            self.bytes -= stream.cost;
            self.next_first_seq = self.next_first_seq.max(stream.end_seq());
        }
    }

    /// Forgets the least recently used key other than `keep`; false when there is none.
    fn evict_one(&mut self, keep: &[u8]) -> bool {
        let victim = self
            .recency
            .values()
            .find(|key| key.as_ref() != keep)
            .cloned();
        match victim {
            Some(victim) => {
                self.remove(&victim);
                true
            }
            None => false,
        }
    }

    /// Marks `key` (held) as the most recently used.
    fn touch(&mut self, key: &[u8], now: Instant) {
        if let Some(stream) = self.map.get_mut(key) {
            Self::touch_stream(&mut self.recency, &mut self.clock, self.epoch, stream, now);
        }
    }

    fn touch_stream(
        recency: &mut BTreeMap<u64, Bytes>,
        clock: &mut u64,
        epoch: Epoch,
        stream: &mut Stream,
        now: Instant,
    ) {
        stream.last_used.mark(epoch, now);
        // The most recent key already (one hot stream): its place stays.
        if stream.tick == *clock {
            return;
        }
        if let Some(key) = recency.remove(&stream.tick) {
            *clock += 1;
            stream.tick = *clock;
            recency.insert(*clock, key);
        }
    }

    /// Makes the stream of a new `key`, evicting others as the budget needs; false when the key
    /// alone is over the budget.
    fn admit(&mut self, key: &Bytes, limits: &MemoryLimits, now: Instant) -> bool {
        let cost = key_cost(key);
        if cost > limits.max_bytes {
            return false;
        }
        while self.map.len() >= limits.max_keys || self.bytes + cost > limits.max_bytes {
            if !self.evict_one(key) {
                break;
            }
        }
        self.clock += 1;
        self.recency.insert(self.clock, key.clone());
        self.bytes += cost;
        if self.no_expiry_before.is_none() {
            self.no_expiry_before = now.checked_add(limits.key_idle);
        }
        self.map.insert(
            key.clone(),
            Stream {
                events: VecDeque::new(),
                index: IdIndex::default(),
                first_seq: self.next_first_seq,
                bytes: 0,
                cost,
                last_used: UsedAt::new(self.epoch, now),
                tick: self.clock,
                recorders: 0,
                paused_at: VecDeque::new(),
            },
        );
        true
    }

    /// Applies `f` to the stream of `key` and keeps the byte count in step with its cost.
    fn update<T>(&mut self, key: &[u8], f: impl FnOnce(&mut Stream) -> T) -> Option<T> {
        let stream = self.map.get_mut(key)?;
        let before = stream.cost;
        let out = f(stream);
        self.bytes = self.bytes - before + stream.cost;
        Some(out)
    }

    /// Brings the store back within its byte budget after `key` grew: other keys go first, the
    /// least recently used first; then `key`'s own oldest events.
    fn fit(&mut self, key: &[u8], limits: &MemoryLimits) {
        while self.bytes > limits.max_bytes {
            if self.evict_one(key) {
                continue;
            }
            let shrunk = self.update(key, Stream::pop_oldest).unwrap_or(false);
            if !shrunk {
                break;
            }
        }
    }
}

impl Stream {
    fn trim(&mut self, limits: &MemoryLimits, now: Instant) {
        while let Some(front) = self.events.front() {
            let too_many = self.events.len() > limits.events_per_key;
            let too_big = self.bytes > limits.bytes_per_key && self.events.len() > 1;
            let too_old = limits
                .max_age
                .is_some_and(|age| now.duration_since(front.at) > age);
            if !(too_many || too_big || too_old) {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Drops the oldest event; false when there is none.
    fn pop_oldest(&mut self) -> bool {
        let Some(gone) = self.events.pop_front() else {
            return false;
        };
        self.bytes -= gone.event.bytes.len();
        self.cost -= event_cost(&gone.event);
        self.index.remove(gone.hash, &gone.event.id, self.first_seq);
        self.first_seq += 1;
        // A pause before the oldest event left no trace in what is retained.
        while self
            .paused_at
            .front()
            .is_some_and(|&at| at <= self.first_seq)
        {
            self.paused_at.pop_front();
        }
        true
    }

    /// Recording of this key stops if `recorders` reaches zero: noted where it stopped.
    fn recorder_stopped(&mut self) {
        self.recorders = self.recorders.saturating_sub(1);
        if self.recorders == 0 {
            let at = self.end_seq();
            if self.paused_at.back() != Some(&at) {
                self.paused_at.push_back(at);
            }
        }
    }

    /// The events after the one with sequence number `seq`, and whether recording stopped
    /// between it and now.
    fn after(&self, seq: u64, limit: usize) -> Lookup {
        let position = (seq - self.first_seq) as usize;
        let events = self.collect(position + 1, limit);
        // A pause at `p` lost what came between events `p - 1` and `p`.
        let mut pauses = self.paused_at.iter().filter(|&&at| at > seq);
        match pauses.next() {
            None => Lookup::Found(events),
            Some(&first) => Lookup::Interrupted {
                resumable: first == self.end_seq()
                    && pauses.next().is_none()
                    && events.len() == self.events.len() - position - 1,
                events,
            },
        }
    }

    /// Retains `event`, unless an event with its id is retained already (false).
    fn push(&mut self, event: StoredEvent, now: Instant) -> bool {
        self.push_hashed(self.index.hash(&event.id), event, now)
            .is_ok()
    }

    /// [`push`](Self::push) with the id's hash at hand; `Err` with the sequence number of the
    /// retained event with its id.
    fn push_hashed(&mut self, hash: u64, event: StoredEvent, now: Instant) -> Result<(), u64> {
        let seq = self.end_seq();
        self.index
            .insert_hashed(hash, &event.id, seq, &self.events, self.first_seq)?;
        self.bytes += event.bytes.len();
        self.cost += event_cost(&event);
        self.events.push_back(Retained {
            event,
            at: now,
            hash,
        });
        Ok(())
    }

    /// The sequence number the next event gets.
    fn end_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }

    /// The retained event with sequence number `seq`.
    fn at(&self, seq: u64) -> Option<&Retained> {
        self.events
            .get(usize::try_from(seq.checked_sub(self.first_seq)?).ok()?)
    }

    /// Where a connection's batch starts, from where its previous batch left it.
    fn place(&self, position: Position) -> Place {
        match position.get().checked_sub(1) {
            Some(seq) if self.at(seq).is_some() => Place::After(seq),
            // Its previous event was trimmed (or it has none), and another connection's events
            // are retained: it carries what was recorded before, or is far behind.
            Some(_) if !self.events.is_empty() => Place::Behind,
            _ => Place::Newest,
        }
    }

    /// Records what one connection carried (see [`ReplayStore::append_carried`]).
    fn carry(
        &mut self,
        events: &mut dyn CarriedEvents,
        position: &mut Position,
        fits: &dyn Fn(&StoredEvent) -> bool,
        limits: &MemoryLimits,
        now: Instant,
    ) {
        let mut place = self.place(*position);
        let count = events.len();
        if let Place::Behind = place {
            // A batch shorter than the history, with neither end in it, lies wholly before it
            // (the connection's events follow one another as the history's do): two lookups
            // for the batch, not one per event.
            let retained = |id: &[u8]| self.index.get(id, &self.events, self.first_seq).is_some();
            if count < self.events.len()
                && !retained(events.id(0))
                && !retained(events.id(count - 1))
            {
                return;
            }
        }
        for index in 0..count {
            let id = events.id(index);
            // The connection's previous event is followed by this one: recorded already, by the
            // connection ahead; no hashing, no copy.
            if let Place::After(seq) = place {
                if self.at(seq + 1).is_some_and(|next| next.event.id == id) {
                    place = Place::After(seq + 1);
                    continue;
                }
            }
            let hash = self.index.hash(id);
            // After the newest event, the next one is new unless the connection's events differ
            // from the history's: the index is looked up once, when the event goes in.
            let at_newest = matches!(place, Place::After(seq) if seq + 1 == self.end_seq());
            let found = || {
                self.index
                    .get_hashed(hash, id, &self.events, self.first_seq)
            };
            if let Some(seq) = (!at_newest).then(found).flatten() {
                place = Place::After(seq);
                continue;
            }
            if let Place::Behind = place {
                // Older than the retained history: recorded and trimmed before. Appended now it
                // would follow the newest event, and a resuming client would get it again.
                continue;
            }
            let Some(event) = events.take(index).filter(|event| fits(event)) else {
                continue;
            };
            let seq = self.end_seq();
            match self.push_hashed(hash, event, now) {
                Ok(()) => {
                    self.trim(limits, now);
                    place = match self.at(seq) {
                        Some(_) => Place::After(seq),
                        None => Place::Newest,
                    };
                }
                // Retained already after all.
                Err(held) => place = Place::After(held),
            }
        }
        if let Place::After(seq) = place {
            *position = Position::new(seq + 1);
        }
    }

    fn collect(&self, from: usize, limit: usize) -> Vec<StoredEvent> {
        self.events
            .iter()
            .skip(from)
            .take(limit)
            .map(|r| r.event.clone())
            .collect()
    }
}

impl ReplayStore for MemoryStore {
    type Read = Ready<Result<Lookup, StoreError>>;

    fn read(&self, key: &Bytes, from: ReadFrom<'_>, limit: usize) -> Self::Read {
        let now = Instant::now();
        let limits = &self.shared.limits;
        let mut streams = self.lock();
        streams.expire(limits, now);
        streams.touch(key, now);
        let lookup = streams.update(key, |stream| {
            stream.trim(limits, now);
            match from {
                ReadFrom::Oldest => Lookup::Found(stream.collect(0, limit)),
                ReadFrom::Newest => {
                    let from = stream.events.len().saturating_sub(limit);
                    Lookup::Found(stream.collect(from, limit))
                }
                ReadFrom::After(id) => match stream.index.get(id, &stream.events, stream.first_seq)
                {
                    Some(seq) => stream.after(seq, limit),
                    None => Lookup::Unknown,
                },
            }
        });
        ready(Ok(lookup.unwrap_or(match from {
            ReadFrom::Oldest | ReadFrom::Newest => Lookup::Found(Vec::new()),
            ReadFrom::After(_) => Lookup::Unknown,
        })))
    }

    fn append(&self, key: &Bytes, event: StoredEvent) {
        self.append_all(key, std::iter::once(event));
    }

    fn append_all(&self, key: &Bytes, events: impl Iterator<Item = StoredEvent>) {
        self.append_all_at(key, events, Instant::now());
    }

    /// One lock and one key lookup for all of `events`.
    fn append_all_at(&self, key: &Bytes, events: impl Iterator<Item = StoredEvent>, now: Instant) {
        let mut events = events.peekable();
        if events.peek().is_none() {
            return;
        }
        self.write(key, now, |stream, limits, fits| {
            for event in events.filter(|event| fits(event)) {
                // Several connections on one key see the same events: each is stored once.
                if stream.push(event, now) {
                    stream.trim(limits, now);
                }
            }
        });
    }

    /// One lock and one key lookup for the batch; an event that follows the connection's
    /// previous one in the history costs one comparison of ids.
    fn append_carried(
        &self,
        key: &Bytes,
        position: &mut Position,
        events: &mut dyn CarriedEvents,
        now: Instant,
    ) {
        if events.is_empty() || self.carry_recorded(key, position, events, now) {
            return;
        }
        self.write(key, now, |stream, limits, fits| {
            stream.carry(events, position, fits, limits, now);
        });
    }

    fn recorder_started(&self, key: &Bytes, continues_after: Option<&[u8]>) {
        let now = Instant::now();
        self.write(key, now, |stream, _, _| {
            stream.recorders = stream.recorders.saturating_add(1);
            let newest = continues_after
                .and_then(|id| stream.index.get(id, &stream.events, stream.first_seq))
                .is_some_and(|seq| seq + 1 == stream.end_seq());
            if newest && stream.paused_at.back() == Some(&stream.end_seq()) {
                stream.paused_at.pop_back();
            }
        });
    }

    fn shared_key(&self, key: &Bytes) -> Option<Bytes> {
        let streams = self.lock_shared();
        streams
            .map
            .get_key_value(&key[..])
            .map(|(shared, _)| shared.clone())
    }

    fn recorder_stopped(&self, key: &Bytes) {
        let mut streams = self.lock();
        if let Some(stream) = streams.map.get_mut(&key[..]) {
            stream.recorder_stopped();
        }
    }

    fn trim(&self, key: &Bytes, keep: usize) {
        let limits = MemoryLimits {
            events_per_key: keep,
            ..self.shared.limits
        };
        self.lock().update(key, |stream| {
            stream.trim(&limits, Instant::now());
            if keep == 0 {
                while stream.pop_oldest() {}
            }
        });
    }

    fn next_id(&self, _key: &Bytes) -> Bytes {
        // One counter for the whole store: ids stay unique and increasing per key even when a
        // key is evicted and comes back (an id handed out before is then unknown, never reused).
        let n = self.shared.assigned.fetch_add(1, Ordering::Relaxed) + 1;
        Bytes::from(format!("{}-{}", self.shared.prefix, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id on one hash (a seeded 64-bit hash practically never collides; this hasher
    /// always does): every id is found, a duplicate is refused, and they go in any order.
    #[test]
    fn the_id_index_keeps_ids_whose_hashes_collide() {
        #[derive(Default)]
        struct Constant;
        impl std::hash::Hasher for Constant {
            fn finish(&self) -> u64 {
                7
            }
            fn write(&mut self, _bytes: &[u8]) {}
        }
        let retained = |id: &'static str| Retained {
            event: StoredEvent {
                id: Bytes::from_static(id.as_bytes()),
                bytes: Bytes::new(),
            },
            at: Instant::now(),
            hash: 7,
        };
        let mut events: VecDeque<Retained> = ["a", "b", "c"].map(retained).into();
        let mut index = IdIndex::<std::hash::BuildHasherDefault<Constant>>::default();
        for (seq, id) in [b"a", b"b", b"c"].into_iter().enumerate() {
            assert!(index.insert(&Bytes::from_static(id), seq as u64, &events, 0));
        }
        assert_eq!(index.collided.len(), 2);
        for (seq, id) in [b"a", b"b", b"c"].into_iter().enumerate() {
            assert!(!index.insert(&Bytes::from_static(id), 9, &events, 0));
            assert_eq!(index.get(id, &events, 0), Some(seq as u64));
        }
        assert_eq!(index.get(b"x", &events, 0), None);
        // The holder of the hash goes first; the others are still found, then go too.
        for (seq, id) in [b"a", b"b", b"c"].into_iter().enumerate() {
            index.remove(index.hash(id), id, seq as u64);
            events.pop_front();
            assert_eq!(index.get(id, &events, seq as u64 + 1), None);
            if let Some(next) = events.front() {
                let next_id = next.event.id.clone();
                assert_eq!(
                    index.get(&next_id, &events, seq as u64 + 1),
                    Some(seq as u64 + 1)
                );
            }
        }
        assert_eq!(index.len(), 0);
        // A new id on the freed hash, while nothing collides any more.
        events.push_back(retained("d"));
        assert!(index.insert(&Bytes::from_static(b"d"), 3, &events, 3));
        assert_eq!(index.get(b"d", &events, 3), Some(3));
    }

    fn event(id: &str) -> StoredEvent {
        StoredEvent {
            id: Bytes::copy_from_slice(id.as_bytes()),
            bytes: Bytes::from(format!("id: {id}\ndata: x\n\n")),
        }
    }

    fn ids(lookup: Lookup) -> Vec<String> {
        match lookup {
            Lookup::Found(events) => events
                .iter()
                .map(|e| String::from_utf8_lossy(&e.id).into_owned())
                .collect(),
            Lookup::Unknown => vec!["<unknown>".into()],
            Lookup::Interrupted { .. } => vec!["<interrupted>".into()],
        }
    }

    async fn read(
        store: &MemoryStore,
        key: &Bytes,
        from: ReadFrom<'_>,
        limit: usize,
    ) -> Vec<String> {
        ids(store.read(key, from, limit).await.unwrap())
    }

    #[tokio::test]
    async fn read_after_an_id_and_from_the_oldest() {
        let store = MemoryStore::new();
        let key = Bytes::from_static(b"k");
        for id in ["a", "b", "c", "d"] {
            store.append(&key, event(id));
        }
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"b"), 10).await,
            ["c", "d"]
        );
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"a"), 2).await,
            ["b", "c"]
        );
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"d"), 10).await,
            Vec::<String>::new()
        );
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["a", "b", "c", "d"]
        );
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"z"), 10).await,
            ["<unknown>"]
        );
        let other = Bytes::from_static(b"other");
        assert_eq!(
            read(&store, &other, ReadFrom::After(b"a"), 10).await,
            ["<unknown>"]
        );
        assert_eq!(
            read(&store, &other, ReadFrom::Oldest, 10).await,
            Vec::<String>::new()
        );
    }

    /// One connection's batch, counting the events the store takes (copies).
    struct Batch {
        events: Vec<StoredEvent>,
        taken: usize,
    }

    impl Batch {
        fn of(ids: &[&str]) -> Self {
            Self {
                events: ids.iter().map(|id| event(id)).collect(),
                taken: 0,
            }
        }
    }

    impl CarriedEvents for Batch {
        fn len(&self) -> usize {
            self.events.len()
        }

        fn id(&self, index: usize) -> &[u8] {
            &self.events[index].id
        }

        fn take(&mut self, index: usize) -> Option<StoredEvent> {
            self.taken += 1;
            Some(self.events[index].clone())
        }
    }

    /// Carries `ids` for the connection at `position`; the number of events the store took.
    fn carry(store: &MemoryStore, key: &Bytes, position: &mut Position, ids: &[&str]) -> usize {
        let mut batch = Batch::of(ids);
        store.append_carried(key, position, &mut batch, Instant::now());
        batch.taken
    }

    #[tokio::test]
    async fn a_connection_carrying_recorded_events_has_nothing_copied() {
        let store = MemoryStore::new();
        let key = Bytes::from_static(b"k");
        let (mut ahead, mut behind) = (Position::default(), Position::default());
        assert_eq!(carry(&store, &key, &mut ahead, &["1", "2", "3"]), 3);
        // The second connection finds its first event by id, then each next one where it
        // expects it: no copies.
        assert_eq!(carry(&store, &key, &mut behind, &["1", "2"]), 0);
        assert_eq!(carry(&store, &key, &mut behind, &["3"]), 0);
        // Past the newest it records, and the first connection then follows it.
        assert_eq!(carry(&store, &key, &mut behind, &["4", "5"]), 2);
        assert_eq!(carry(&store, &key, &mut ahead, &["4", "5", "6"]), 1);
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["1", "2", "3", "4", "5", "6"]
        );
        // A connection whose events differ from what follows its last one records them after
        // the newest, as `append` does.
        assert_eq!(carry(&store, &key, &mut behind, &["x"]), 1);
        assert_eq!(read(&store, &key, ReadFrom::After(b"6"), 10).await, ["x"]);
        // An event retained already, carried at the newest: stored once, and the connection
        // goes on from where it is.
        carry(&store, &key, &mut behind, &["5"]);
        assert_eq!(carry(&store, &key, &mut behind, &["6", "x", "y"]), 1);
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["1", "2", "3", "4", "5", "6", "x", "y"]
        );
    }

    #[tokio::test]
    async fn a_connection_behind_the_history_appends_nothing_stale() {
        let store = MemoryStore::with_limits(MemoryLimits::default().events_per_key(3));
        let key = Bytes::from_static(b"k");
        let (mut fast, mut slow) = (Position::default(), Position::default());
        assert_eq!(carry(&store, &key, &mut fast, &["1"]), 1);
        assert_eq!(carry(&store, &key, &mut slow, &["1"]), 0);
        for id in 2..=10 {
            carry(&store, &key, &mut fast, &[&id.to_string()]);
        }
        // The slow client's events were recorded and trimmed: appended again, they would come
        // after 10, and a client resuming from 10 would get 2 again. One by one, in a batch
        // shorter than the history and in one as long.
        assert_eq!(carry(&store, &key, &mut slow, &["2"]), 0);
        assert_eq!(carry(&store, &key, &mut slow, &["3", "4"]), 0);
        assert_eq!(carry(&store, &key, &mut slow, &["5", "6", "7"]), 0);
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"10"), 10).await,
            Vec::<String>::new()
        );
        // Back within the history it follows it, and records past the newest.
        assert_eq!(carry(&store, &key, &mut slow, &["8", "9", "10", "11"]), 1);
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["9", "10", "11"]
        );
        // A batch that reaches from before the history to past it records its new events.
        let mut lagging = Position::default();
        carry(&store, &key, &mut lagging, &["9"]);
        for id in 12..=20 {
            carry(&store, &key, &mut fast, &[&id.to_string()]);
        }
        let batch: Vec<String> = (10..=23).map(|id| id.to_string()).collect();
        let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
        assert_eq!(carry(&store, &key, &mut lagging, &batch), 3);
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["21", "22", "23"]
        );
    }

    #[tokio::test]
    async fn a_forgotten_key_numbers_its_events_anew() {
        let store = MemoryStore::with_limits(MemoryLimits::default().max_keys(1));
        let key = Bytes::from_static(b"k");
        let mut old = Position::default();
        carry(&store, &key, &mut old, &["1", "2"]);
        store.append(&Bytes::from_static(b"other"), event("x"));
        assert_eq!(store.len(b"k"), 0);
        let mut new = Position::default();
        carry(&store, &key, &mut new, &["a", "b", "c"]);
        // The old position names nothing of the new history: its connection is behind it.
        assert!(old.get() <= store.lock().map[&key].first_seq);
        assert_eq!(carry(&store, &key, &mut old, &["3"]), 0);
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["a", "b", "c"]
        );
    }

    #[tokio::test]
    async fn the_same_id_is_stored_once() {
        let store = MemoryStore::new();
        let key = Bytes::from_static(b"k");
        for id in ["1", "2", "1", "2", "3"] {
            store.append(&key, event(id));
        }
        assert_eq!(store.len(b"k"), 3);
    }

    #[tokio::test]
    async fn count_and_byte_bounds_trim_the_oldest() {
        let store = MemoryStore::with_limits(MemoryLimits::default().events_per_key(3));
        let key = Bytes::from_static(b"k");
        for id in 0..10 {
            store.append(&key, event(&id.to_string()));
        }
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["7", "8", "9"]
        );
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"2"), 10).await,
            ["<unknown>"]
        );
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"7"), 10).await,
            ["8", "9"]
        );

        let one_event = event("0").bytes.len();
        let store = MemoryStore::with_limits(MemoryLimits::default().bytes_per_key(2 * one_event));
        for id in 0..5 {
            store.append(&key, event(&id.to_string()));
        }
        assert_eq!(read(&store, &key, ReadFrom::Oldest, 10).await, ["3", "4"]);
    }

    #[tokio::test(start_paused = true)]
    async fn age_bound_and_idle_keys() {
        let limits = MemoryLimits::default()
            .max_age(Duration::from_secs(60))
            .max_keys(2)
            .key_idle(Duration::from_secs(600));
        let store = MemoryStore::with_limits(limits);
        let key = Bytes::from_static(b"k");
        store.append(&key, event("old"));
        tokio::time::advance(Duration::from_secs(61)).await;
        store.append(&key, event("new"));
        assert_eq!(read(&store, &key, ReadFrom::Oldest, 10).await, ["new"]);

        store.append(&Bytes::from_static(b"k2"), event("x"));
        tokio::time::advance(Duration::from_secs(10)).await;
        // A third key evicts the one unused for longest.
        store.append(&key, event("newer"));
        store.append(&Bytes::from_static(b"k3"), event("y"));
        assert_eq!(store.keys(), 2);
        assert!(store.is_empty(b"k2"));
        assert_eq!(store.len(b"k"), 2);
    }

    #[tokio::test]
    async fn memory_stays_bounded_under_ten_thousand_keys() {
        let limits = MemoryLimits::default().max_keys(1_000).events_per_key(10);
        let store = MemoryStore::with_limits(limits);
        for key in 0..10_000 {
            let key = Bytes::from(format!("/stream/{key}"));
            for id in 0..20 {
                store.append(&key, event(&id.to_string()));
            }
        }
        assert_eq!(store.keys(), 1_000);
        let retained: usize = store.lock().map.values().map(|s| s.events.len()).sum();
        assert_eq!(retained, 10_000);
        assert!(store
            .lock()
            .map
            .values()
            .all(|s| s.index.len() == s.events.len()));
        assert!(store
            .lock()
            .map
            .values()
            .all(|s| s.index.collided.is_empty()));
    }

    #[tokio::test]
    async fn trim_keeps_the_newest() {
        let store = MemoryStore::new();
        let key = Bytes::from_static(b"k");
        for id in 0..10 {
            store.append(&key, event(&id.to_string()));
        }
        store.trim(&key, 2);
        assert_eq!(read(&store, &key, ReadFrom::Oldest, 10).await, ["8", "9"]);
        store.trim(&key, 0);
        assert!(store.is_empty(b"k"));
        store.append(&key, event("10"));
        assert_eq!(read(&store, &key, ReadFrom::Oldest, 10).await, ["10"]);
        store.trim(&Bytes::from_static(b"none"), 0);
    }

    #[test]
    fn assigned_ids_increase_and_carry_the_store_prefix() {
        let store = MemoryStore::new();
        let key = Bytes::from_static(b"k");
        let a = store.next_id(&key);
        let b = store.clone().next_id(&key);
        let other = store.next_id(&Bytes::from_static(b"other"));
        let prefix = &store.shared.prefix;
        assert_eq!(a, format!("{prefix}-1"));
        assert_eq!(b, format!("{prefix}-2"));
        assert_eq!(other, format!("{prefix}-3"));
        assert_ne!(MemoryStore::new().shared.prefix, *prefix);
    }

    /// Appends one event to each of `keys` distinct keys.
    fn fill(store: &MemoryStore, keys: std::ops::Range<usize>) {
        for n in keys {
            let key = Bytes::from(format!("/stream?nonce={n}"));
            store.append(&key, event(&n.to_string()));
        }
    }

    #[tokio::test]
    async fn the_whole_store_stays_within_its_byte_budget() {
        let budget = 16 * 1024;
        let store = MemoryStore::with_limits(MemoryLimits::default().max_bytes(budget));
        assert_eq!(store.bytes(), 0);
        fill(&store, 0..5_000);
        assert!(store.bytes() <= budget, "{} > {budget}", store.bytes());
        // What is counted is the keys and events held.
        let one = key_cost(b"/stream?nonce=4999") + event_cost(&event("4999"));
        assert!(store.keys() >= budget / one - 1 && store.keys() <= budget / one);
        // The newest key is still replayable; the oldest were evicted whole.
        let newest = Bytes::from("/stream?nonce=4999");
        assert_eq!(read(&store, &newest, ReadFrom::Oldest, 10).await, ["4999"]);
        assert_eq!(store.len(b"/stream?nonce=0"), 0);
        let counted: usize = store.lock().map.values().map(|s| s.cost).sum();
        assert_eq!(counted, store.bytes());
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_used_key() {
        let one = key_cost(b"/stream?nonce=0") + event_cost(&event("0"));
        let store = MemoryStore::with_limits(MemoryLimits::default().max_bytes(3 * one));
        fill(&store, 0..3);
        assert_eq!(store.keys(), 3);
        // Reading key 0 makes key 1 the least recently used.
        let first = Bytes::from("/stream?nonce=0");
        assert_eq!(read(&store, &first, ReadFrom::Oldest, 10).await, ["0"]);
        fill(&store, 3..4);
        assert_eq!(store.keys(), 3);
        assert_eq!(store.len(b"/stream?nonce=0"), 1);
        assert_eq!(store.len(b"/stream?nonce=1"), 0);
        assert_eq!(store.len(b"/stream?nonce=3"), 1);
    }

    #[tokio::test]
    async fn a_lone_key_past_the_budget_loses_its_oldest_events() {
        let key = Bytes::from_static(b"k");
        let budget = key_cost(&key) + 3 * event_cost(&event("0"));
        let store = MemoryStore::with_limits(MemoryLimits::default().max_bytes(budget));
        for id in 0..10 {
            store.append(&key, event(&id.to_string()));
        }
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["7", "8", "9"]
        );
        assert!(store.bytes() <= budget);
        // An event bigger than the whole budget is not recorded, and costs nothing.
        let before = store.bytes();
        let huge = StoredEvent {
            id: Bytes::from_static(b"huge"),
            bytes: Bytes::from(vec![b'x'; budget]),
        };
        store.append(&key, huge);
        assert_eq!(store.bytes(), before);
        assert_eq!(
            read(&store, &key, ReadFrom::After(b"huge"), 10).await,
            ["<unknown>"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_comes_back_when_keys_expire() {
        let limits = MemoryLimits::default()
            .max_bytes(1024 * 1024)
            .key_idle(Duration::from_secs(60));
        let store = MemoryStore::with_limits(limits);
        let baseline = store.bytes();
        fill(&store, 0..1_000);
        assert!(store.bytes() > baseline + 1_000 * MemoryLimits::KEY_OVERHEAD);
        tokio::time::advance(Duration::from_secs(30)).await;
        // A key still in use stays; the others go once idle.
        let kept = Bytes::from("/stream?nonce=7");
        assert_eq!(read(&store, &kept, ReadFrom::Oldest, 10).await, ["7"]);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(store.keys(), 1);
        assert_eq!(store.bytes(), key_cost(&kept) + event_cost(&event("7")));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(store.bytes(), baseline);
        assert_eq!(store.keys(), 0);
        assert!(store.lock().recency.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_carried_under_the_read_lock_stays_in_use() {
        let store =
            MemoryStore::with_limits(MemoryLimits::default().key_idle(Duration::from_secs(10)));
        let key = Bytes::from_static(b"k");
        let (mut ahead, mut behind) = (Position::default(), Position::default());
        assert_eq!(carry(&store, &key, &mut ahead, &["1", "2", "3"]), 3);
        assert_eq!(carry(&store, &key, &mut behind, &["1"]), 0);
        // Event 2 follows event 1: the read-locked path, which must still mark the key used.
        tokio::time::advance(Duration::from_secs(8)).await;
        let marked = behind;
        assert_eq!(carry(&store, &key, &mut behind, &["2"]), 0);
        assert_ne!(behind, marked);
        // 16 s after the last append but 8 s after the last carry: not idle.
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(carry(&store, &key, &mut behind, &["3"]), 0);
        assert_eq!(store.keys(), 1);
        assert_eq!(
            read(&store, &key, ReadFrom::Oldest, 10).await,
            ["1", "2", "3"]
        );
        // Nothing carried for the idle time: forgotten.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(store.keys(), 0);
    }

    #[test]
    fn recorders_of_one_key_share_the_stores_copy_of_it() {
        let store = MemoryStore::new();
        let first = Bytes::from(b"/events?room=1".to_vec());
        let second = Bytes::from(b"/events?room=1".to_vec());
        assert!(store.shared_key(&first).is_none());
        store.recorder_started(&first, None);
        let shared = store.shared_key(&second).unwrap();
        assert_eq!(shared, second);
        assert_ne!(shared.as_ptr(), second.as_ptr());
        assert_eq!(shared.as_ptr(), store.shared_key(&first).unwrap().as_ptr());
    }

    #[test]
    fn the_defaults_bound_the_store() {
        let limits = MemoryLimits::default();
        assert_eq!(limits.max_bytes, MemoryLimits::DEFAULT_MAX_BYTES);
        assert_eq!(limits.max_bytes, 64 * 1024 * 1024);
        assert_eq!(limits.max_keys, 10_000);
    }
}
