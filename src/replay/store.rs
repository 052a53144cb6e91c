//! Where replayed events live: the [`ReplayStore`] trait and the in-memory [`MemoryStore`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{ready, Future, Ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
pub enum Lookup {
    /// The starting point is retained; these events follow it, oldest first (at most the limit).
    Found(Vec<StoredEvent>),
    /// The id is not retained (never seen, or trimmed away).
    Unknown,
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

    /// A new id for an event of `key`: unique for this store, increasing per key.
    fn next_id(&self, key: &Bytes) -> Bytes;

    /// Keeps only the newest `keep` events of `key` (0 forgets its history).
    fn trim(&self, key: &Bytes, keep: usize);
}

/// Bounds of a [`MemoryStore`].
///
/// Worst-case memory is about `max_keys * (max_bytes_per_key + max_events_per_key * 170)`
/// bytes: the events' own bytes plus roughly 170 bytes of bookkeeping per retained event (its
/// id is counted in its bytes). The defaults (1,000 events and 1 MiB per key, 10,000 keys) bound
/// a full store to about 11.7 GiB only if every key is full; size them to your traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimits {
    events_per_key: usize,
    bytes_per_key: usize,
    max_age: Option<Duration>,
    max_keys: usize,
    key_idle: Duration,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            events_per_key: 1_000,
            bytes_per_key: 1024 * 1024,
            max_age: None,
            max_keys: 10_000,
            key_idle: Duration::from_secs(3600),
        }
    }
}

impl MemoryLimits {
    /// Keeps at most `events` events per key (default 1,000).
    pub fn events_per_key(mut self, events: usize) -> Self {
        self.events_per_key = events.max(1);
        self
    }

    /// Keeps at most `bytes` of encoded events per key (default 1 MiB); the newest event is
    /// always kept.
    pub fn bytes_per_key(mut self, bytes: usize) -> Self {
        self.bytes_per_key = bytes;
        self
    }

    /// Drops events older than `age` (default: no age limit).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Keeps at most `keys` stream keys (default 10,000); a new key beyond it evicts the one
    /// unused for longest.
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys.max(1);
        self
    }

    /// Forgets a key unused (no append, no read) for `idle` (default one hour).
    pub fn key_idle(mut self, idle: Duration) -> Self {
        self.key_idle = idle;
        self
    }
}

/// The default [`ReplayStore`]: bounded history per key in this process's memory.
///
/// Per key a ring of events and an id index: append is O(1), finding an id O(1). Keys live in a
/// map bounded by [`MemoryLimits::max_keys`] with idle expiry. One short `std` lock guards the
/// map; it is never held across an `.await`. Ids it assigns carry a random per-store prefix, so an
/// id from before a restart is unknown rather than mistaken for a new event's.
///
/// ```
/// use bytes::Bytes;
/// use tower_sse::replay::{Lookup, MemoryStore, ReadFrom, ReplayStore, StoredEvent};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryStore::new();
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
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    limits: MemoryLimits,
    prefix: String,
    streams: Mutex<HashMap<Bytes, Stream>>,
    /// When the store's size is next reported to telemetry (at most once a second).
    #[cfg(feature = "metrics")]
    next_report: Mutex<Instant>,
}

struct Stream {
    events: VecDeque<Retained>,
    /// id -> sequence number of the event that carries it.
    index: HashMap<Bytes, u64>,
    /// Sequence number of `events[0]`.
    first_seq: u64,
    bytes: usize,
    assigned: u64,
    last_used: Instant,
}

struct Retained {
    event: StoredEvent,
    at: Instant,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("limits", &self.shared.limits)
            .field("keys", &self.lock().len())
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
                streams: Mutex::new(HashMap::new()),
                #[cfg(feature = "metrics")]
                next_report: Mutex::new(Instant::now()),
            }),
        }
    }

    /// The number of keys held.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }

    /// The number of events retained for `key`.
    pub fn len(&self, key: &[u8]) -> usize {
        self.lock().get(key).map_or(0, |s| s.events.len())
    }

    /// True when nothing is retained for `key`.
    pub fn is_empty(&self, key: &[u8]) -> bool {
        self.len(key) == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Bytes, Stream>> {
        // A panic while holding the lock leaves the maps consistent (every update is done before
        // anything can panic), so a poisoned lock is still usable.
        self.shared
            .streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the size gauges, at most once a second (a sum over the keys).
    #[cfg(feature = "metrics")]
    fn report_size(&self, streams: &HashMap<Bytes, Stream>, now: Instant) {
        let mut next = self
            .shared
            .next_report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if now >= *next {
            *next = now + Duration::from_secs(1);
            let events = streams.values().map(|s| s.events.len()).sum();
            crate::telemetry::store_size(streams.len(), events);
        }
    }

    /// The stream of `key`, created if needed, with the key bound enforced.
    fn stream<'a>(
        &self,
        streams: &'a mut HashMap<Bytes, Stream>,
        key: &Bytes,
        now: Instant,
    ) -> &'a mut Stream {
        let limits = &self.shared.limits;
        if !streams.contains_key(key) && streams.len() >= limits.max_keys {
            streams.retain(|_, s| now.duration_since(s.last_used) < limits.key_idle);
            if streams.len() >= limits.max_keys {
                let oldest = streams
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    streams.remove(&oldest);
                }
            }
        }
        let stream = streams.entry(key.clone()).or_insert_with(|| Stream {
            events: VecDeque::new(),
            index: HashMap::new(),
            first_seq: 0,
            bytes: 0,
            assigned: 0,
            last_used: now,
        });
        stream.last_used = now;
        stream
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
            let gone = self.events.pop_front().expect("front exists");
            self.bytes -= gone.event.bytes.len();
            self.index.remove(&gone.event.id);
            self.first_seq += 1;
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
        let mut streams = self.lock();
        let Some(stream) = streams.get_mut(key) else {
            return ready(Ok(match from {
                ReadFrom::Oldest | ReadFrom::Newest => Lookup::Found(Vec::new()),
                ReadFrom::After(_) => Lookup::Unknown,
            }));
        };
        stream.last_used = now;
        stream.trim(&self.shared.limits, now);
        let lookup = match from {
            ReadFrom::Oldest => Lookup::Found(stream.collect(0, limit)),
            ReadFrom::Newest => {
                let from = stream.events.len().saturating_sub(limit);
                Lookup::Found(stream.collect(from, limit))
            }
            ReadFrom::After(id) => match stream.index.get(id) {
                Some(&seq) => {
                    let position = (seq - stream.first_seq) as usize;
                    Lookup::Found(stream.collect(position + 1, limit))
                }
                None => Lookup::Unknown,
            },
        };
        ready(Ok(lookup))
    }

    fn append(&self, key: &Bytes, event: StoredEvent) {
        let now = Instant::now();
        let mut streams = self.lock();
        let stream = self.stream(&mut streams, key, now);
        if stream.index.contains_key(&event.id) {
            return;
        }
        let seq = stream.first_seq + stream.events.len() as u64;
        stream.index.insert(event.id.clone(), seq);
        stream.bytes += event.bytes.len();
        stream.events.push_back(Retained { event, at: now });
        stream.trim(&self.shared.limits, now);
        #[cfg(feature = "metrics")]
        self.report_size(&streams, now);
    }

    fn trim(&self, key: &Bytes, keep: usize) {
        let mut streams = self.lock();
        let Some(stream) = streams.get_mut(key) else {
            return;
        };
        let limits = MemoryLimits {
            events_per_key: keep,
            ..self.shared.limits
        };
        stream.trim(&limits, Instant::now());
        if keep == 0 {
            // Ids assigned so far stay used: `assigned` keeps counting.
            stream.events.clear();
            stream.index.clear();
            stream.bytes = 0;
        }
    }

    fn next_id(&self, key: &Bytes) -> Bytes {
        let now = Instant::now();
        let mut streams = self.lock();
        let stream = self.stream(&mut streams, key, now);
        stream.assigned += 1;
        Bytes::from(format!("{}-{}", self.shared.prefix, stream.assigned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let retained: usize = store.lock().values().map(|s| s.events.len()).sum();
        assert_eq!(retained, 10_000);
        assert!(store
            .lock()
            .values()
            .all(|s| s.index.len() == s.events.len()));
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
    fn assigned_ids_increase_per_key_and_carry_the_store_prefix() {
        let store = MemoryStore::new();
        let key = Bytes::from_static(b"k");
        let a = store.next_id(&key);
        let b = store.clone().next_id(&key);
        let other = store.next_id(&Bytes::from_static(b"other"));
        let prefix = &store.shared.prefix;
        assert_eq!(a, format!("{prefix}-1"));
        assert_eq!(b, format!("{prefix}-2"));
        assert_eq!(other, format!("{prefix}-1"));
        assert_ne!(MemoryStore::new().shared.prefix, *prefix);
    }
}
