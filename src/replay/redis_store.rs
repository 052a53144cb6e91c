//! [`RedisStore`]: replay history in Redis Streams, shared by every gateway instance.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Value};
use tokio::sync::{mpsc, watch};

use super::store::{
    CarriedEvents, Lookup, MemoryLimits, MemoryStore, Position, ReadFrom, ReplayStore, StoreError,
    StoredEvent,
};

/// Drops the oldest entries of stream `KEYS[1]` past `ARGV[1]` entries, with their ids in the
/// index `KEYS[2]`: no id outlives the entry it names. (A Lua chunk shared by the scripts.)
const TRIM_OLDEST: &str = r"
local function trim_oldest(stream, index, keep)
  local excess = redis.call('XLEN', stream) - keep
  if excess <= 0 then return end
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)) do
    local fields = entry[2]
    for f = 1, #fields, 2 do
      if fields[f] == 'i' then redis.call('HDEL', index, fields[f + 1]) end
    end
    redis.call('XDEL', stream, entry[1])
  end
end
";

/// Records an event unless its id is already retained: the index (a hash from SSE id to stream
/// entry) is the dedupe. Keeps at most `ARGV[3]` entries, and both keys expire together. Both
/// keys share a hash tag (cluster-safe).
const APPEND: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local entry = redis.call('XADD', KEYS[1], '*', 'i', ARGV[1], 'b', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], entry)
trim_oldest(KEYS[1], KEYS[2], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
";

/// Marks where appends were dropped (the queue was full): an entry without an id, which a read
/// across it reports as [`Lookup::Interrupted`].
const GAP: &str = r"
redis.call('XADD', KEYS[1], '*', 'g', '1')
trim_oldest(KEYS[1], KEYS[2], tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
";

/// Keeps the newest `ARGV[1]` entries (none: both keys go).
const TRIM: &str = r"
if tonumber(ARGV[1]) == 0 then return redis.call('DEL', KEYS[1], KEYS[2]) end
trim_oldest(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return 1
";

/// The entries after the one an SSE id names; nil when the id is unknown or trimmed away.
const READ_AFTER: &str = r"
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return false end
if #redis.call('XRANGE', KEYS[1], entry, entry) == 0 then return false end
return redis.call('XRANGE', KEYS[1], '(' .. entry, '+', 'COUNT', ARGV[2])
";

/// A script with the shared chunk before it.
fn script(body: &str) -> String {
    format!("{TRIM_OLDEST}{body}")
}

/// Settings of a [`RedisStore`].
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub(crate) prefix: String,
    max_len: usize,
    ttl: Duration,
    pub(crate) timeout: Duration,
    queue: usize,
    batch: usize,
    /// `None`: the default, sized from `max_len`.
    local: Option<MemoryLimits>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            prefix: "sse:".to_owned(),
            max_len: 1_000,
            ttl: Duration::from_secs(3600),
            timeout: Duration::from_millis(500),
            queue: 10_000,
            batch: 256,
            local: None,
        }
    }
}

impl RedisConfig {
    /// Prefixes every Redis key (default `sse:`), so several applications can share a server.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Keeps at most `events` events per stream (default 1,000), and their ids: the oldest go
    /// with each append past it.
    pub fn max_len(mut self, events: usize) -> Self {
        self.max_len = events.max(1);
        self
    }

    /// Forgets a stream, and every id of it, `ttl` after its last append (default one hour).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Gives up on a Redis call after `timeout` (default 500 ms): a read that times out is
    /// answered by the local tier when it can be, a batch of appends that times out is sent
    /// again.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Queues at most `events` appends waiting for Redis (default 10,000): while Redis is down
    /// they wait here and go out in order once it is back. Beyond it, appends are dropped
    /// (counted, logged, and still in the local tier) rather than held in memory.
    pub fn queue(mut self, events: usize) -> Self {
        self.queue = events.max(1);
        self
    }

    /// Sends at most `events` appends in one pipelined round trip (default 256).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Bounds the local tier: the events this instance recorded, kept in its memory too, that
    /// replay reads when Redis fails, or knows less than this instance does (default: the
    /// [`MemoryLimits`] defaults with [`max_len`](Self::max_len) events per key and 16 MiB in
    /// all).
    pub fn local(mut self, limits: MemoryLimits) -> Self {
        self.local = Some(limits);
        self
    }

    fn local_limits(&self) -> MemoryLimits {
        self.local.unwrap_or_else(|| {
            MemoryLimits::default()
                .events_per_key(self.max_len)
                .max_bytes(16 * 1024 * 1024)
        })
    }
}

/// What a [`RedisStore`] has done, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStats {
    /// Appends Redis confirmed (new or already retained).
    pub appended: u64,
    /// Appends that never reached Redis: the queue was full while Redis was down or slow (they
    /// are still in the local tier, within its bounds).
    pub dropped: u64,
    /// Batches of appends that failed or timed out and were sent again.
    pub retried: u64,
    /// Reads that failed or timed out.
    pub failed_reads: u64,
    /// Reads answered by the local tier: Redis failed, or knew less than this instance.
    pub local_reads: u64,
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    dropped: AtomicU64,
    retried: AtomicU64,
    failed_reads: AtomicU64,
    local_reads: AtomicU64,
    sequence: AtomicU64,
}

enum Command {
    Append {
        key: Bytes,
        event: StoredEvent,
    },
    /// Appends of `key` were dropped here.
    Gap {
        key: Bytes,
    },
    Trim {
        key: Bytes,
        keep: usize,
    },
}

/// Keys whose appends were dropped, until their gap marker is queued.
#[derive(Default)]
struct Holes {
    keys: std::sync::Mutex<std::collections::HashSet<Bytes>>,
    /// Whether `keys` may hold any: the append path looks no further when not.
    any: std::sync::atomic::AtomicBool,
}

/// At most this many keys wait for a gap marker at once (each is a key recording while Redis was
/// down and the queue full); past it, a warning says some gaps go unmarked.
const MAX_HOLES: usize = 10_000;

struct Shared {
    config: RedisConfig,
    counters: Counters,
    writes: mpsc::Sender<Command>,
    connection: watch::Receiver<Option<Connection>>,
    /// Distinguishes the ids this store assigns from those of other instances.
    instance: u32,
    scripts: Scripts,
    /// What this instance recorded, in its own memory too.
    local: MemoryStore,
    holes: Holes,
    /// Redis failed the last call made to it: until this time, reads the local tier can answer
    /// skip it (the writer keeps trying, and clears this once Redis answers).
    down: Down,
}

/// When Redis was last seen failing, for a second: reads do not wait on a Redis that is down.
#[derive(Default)]
struct Down(std::sync::Mutex<Option<std::time::Instant>>);

impl Down {
    /// How long a failure keeps reads off Redis.
    const FOR: Duration = Duration::from_secs(1);

    fn set(&self, down: bool) {
        if let Ok(mut until) = self.0.lock() {
            *until = down.then(|| std::time::Instant::now() + Self::FOR);
        }
    }

    fn is_down(&self) -> bool {
        self.0
            .lock()
            .is_ok_and(|until| until.is_some_and(|until| std::time::Instant::now() < until))
    }
}

/// The store's Lua scripts.
struct Scripts {
    append: Lua,
    gap: Lua,
    trim: Lua,
    read_after: redis::Script,
}

/// A script sent in pipelines: `EVALSHA` by its hash, its source once after a Redis restart.
struct Lua {
    source: String,
    hash: String,
}

impl Lua {
    fn new(body: &str) -> Self {
        let source = script(body);
        let hash = redis::Script::new(&source).get_hash().to_owned();
        Self { source, hash }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            append: Lua::new(APPEND),
            gap: Lua::new(GAP),
            trim: Lua::new(TRIM),
            read_after: redis::Script::new(READ_AFTER),
        }
    }
}

/// A [`ReplayStore`] in Redis Streams (feature `redis`): every gateway instance that points at
/// the same Redis replays what any of them recorded, so a client may reconnect to any instance.
///
/// Per stream key, one Redis stream holds the encoded events, and one hash maps each SSE id to
/// its stream entry: a lookup is O(1) for any id, the upstream's own included, and it dedupes
/// (several instances that record the same upstream event store it once). Both keys are trimmed
/// together to [`max_len`](RedisConfig::max_len) entries by each append (an id never outlives its
/// entry) and expire together, [`ttl`](RedisConfig::ttl) after the last append. Reads are one round trip (a
/// short Lua script: `GET` the entry, `XRANGE` after it).
///
/// The live stream never waits for Redis. Every append goes to a local tier first (a
/// [`MemoryStore`] in this instance, bounded by [`RedisConfig::local`]), then into a bounded
/// queue that a background task writes to Redis in pipelined batches. A batch that fails is sent
/// again, with backoff, before anything after it, so appends reach Redis in order once it is
/// back (resending is harmless: an id is stored once). Only a full queue drops appends from
/// Redis's copy; [`stats`](RedisStore::stats) and the metrics count every drop, retry and local
/// read, and a `tracing` warning says when Redis fails. A read goes to Redis; the local tier
/// answers instead when Redis fails or times out, does not know the id, or holds fewer events
/// after it than this instance recorded (a Redis that came back empty or missed writes): a
/// client reconnecting to the instance that recorded its stream loses nothing to an outage. A
/// read neither can answer makes the replay layer apply its store-failure policy. The connection
/// is multiplexed and reconnects by itself. The store can be created while Redis is down and
/// starts writing once Redis is up.
///
/// Client input never shapes a Redis command: stream keys and ids are bulk arguments, and in key
/// names they are percent-encoded (`{`, `}`, `:` and every byte outside `A-Za-z0-9-._~/`), under
/// the configured prefix.
///
/// Ids it assigns ([`Ids`](super::Ids)) are `<unix ms>-<instance>-<n>`: unique across instances,
/// increasing per instance.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_sse::replay::{RedisConfig, RedisStore, ReplayLayer};
///
/// let store = RedisStore::open("redis://127.0.0.1:6379/", RedisConfig::default().prefix("app:sse:"))
///     .expect("a valid Redis URL");
/// let replay = ReplayLayer::with_store(store);
/// # let _ = replay;
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.shared.config)
            .field("connected", &self.shared.connection.borrow().is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port/db`). Connects in the background and
    /// keeps reconnecting; must be called within a tokio runtime. Fails only on a malformed URL.
    pub fn open(url: &str, config: RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::new)?;
        Ok(Self::start(Client::Single(client), config))
    }

    /// A store on a Redis Cluster, reached through any of `nodes` (`redis://host:port/`; the
    /// others are discovered). Every key of a stream shares its hash tag, so each script and
    /// each pipeline stays on one slot; appends are pipelined per stream. Connects in the
    /// background and follows the cluster's topology (failovers, resharding) by itself. Fails
    /// only on malformed URLs.
    pub fn open_cluster(
        nodes: impl IntoIterator<Item = impl AsRef<str>>,
        config: RedisConfig,
    ) -> Result<Self, StoreError> {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(config.timeout)
            .response_timeout(config.timeout)
            .build()
            .map_err(StoreError::new)?;
        Ok(Self::start(Client::Cluster(client), config))
    }

    fn start(client: Client, config: RedisConfig) -> Self {
        let config_local = config.local_limits();
        let (writes, commands) = mpsc::channel(config.queue);
        let (publish, connection) = watch::channel(None);
        let store = Self {
            shared: Arc::new(Shared {
                config,
                counters: Counters::default(),
                writes,
                connection,
                instance: (crate::jitter::unit() * f64::from(u32::MAX)) as u32,
                scripts: Scripts::default(),
                local: MemoryStore::with_limits(config_local),
                holes: Holes::default(),
                down: Down::default(),
            }),
        };
        tokio::spawn(connect(client, store.shared.config.timeout, publish));
        tokio::spawn(write(Arc::downgrade(&store.shared), commands));
        store
    }

    /// Waits until the first connection to Redis is made, or `timeout` passes; true if connected.
    pub async fn connected(&self, timeout: Duration) -> bool {
        let mut connection = self.shared.connection.clone();
        tokio::time::timeout(timeout, connection.wait_for(Option::is_some))
            .await
            .is_ok_and(|changed| changed.is_ok())
    }

    /// Provisioned subscriptions and their cursors in the same Redis, under the same prefix
    /// (feature `subscriptions`), so any instance can serve any subscription.
    #[cfg(feature = "subscriptions")]
    #[cfg_attr(docsrs, doc(cfg(feature = "subscriptions")))]
    pub fn subscriptions(&self) -> crate::subscriptions::RedisSubscriptions {
        crate::subscriptions::RedisSubscriptions::new(self.clone())
    }

    /// The connection, once made.
    #[cfg(feature = "subscriptions")]
    pub(crate) fn connection(&self) -> Option<Connection> {
        self.shared.connection()
    }

    /// The store's settings.
    #[cfg(feature = "subscriptions")]
    pub(crate) fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// What the store has done so far.
    pub fn stats(&self) -> RedisStats {
        let counters = &self.shared.counters;
        RedisStats {
            appended: counters.appended.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
            retried: counters.retried.load(Ordering::Relaxed),
            failed_reads: counters.failed_reads.load(Ordering::Relaxed),
            local_reads: counters.local_reads.load(Ordering::Relaxed),
        }
    }
}

/// The events a local tier takes, kept for Redis too.
struct Taken<'a> {
    events: &'a mut dyn CarriedEvents,
    kept: Vec<StoredEvent>,
}

impl CarriedEvents for Taken<'_> {
    fn len(&self) -> usize {
        self.events.len()
    }

    fn id(&self, index: usize) -> &[u8] {
        self.events.id(index)
    }

    fn take(&mut self, index: usize) -> Option<StoredEvent> {
        let event = self.events.take(index)?;
        self.kept.push(event.clone());
        Some(event)
    }
}

/// `%XX` for every byte outside the unreserved set (and `/`), so that client-chosen bytes can
/// neither leave the key's hash tag nor collide with the key layout.
fn escape(bytes: &[u8], out: &mut String) {
    for &byte in bytes {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

impl Shared {
    /// `<prefix>{<key>}:s`, the stream.
    fn stream_key(&self, key: &[u8]) -> String {
        let mut name = String::with_capacity(self.config.prefix.len() + key.len() + 4);
        name.push_str(&self.config.prefix);
        name.push('{');
        escape(key, &mut name);
        name.push_str("}:s");
        name
    }

    /// `<prefix>{<key>}:i`, the index from SSE ids to stream entries.
    fn index_key(&self, key: &[u8]) -> String {
        let mut name = self.stream_key(key);
        name.pop();
        name.push('i');
        name
    }

    fn connection(&self) -> Option<Connection> {
        self.connection.borrow().clone()
    }

    /// Queues appends for the writer; past the queue's bound they are dropped and counted.
    fn queue(&self, key: &Bytes, events: Vec<StoredEvent>) {
        let mut dropped = 0;
        for event in events {
            // Where appends were dropped, a marker goes first, so that a read across it knows.
            if self.holes.any.load(Ordering::Relaxed) && self.holes.has(key) {
                let gap = Command::Gap { key: key.clone() };
                if self.writes.try_send(gap).is_err() {
                    dropped += 1;
                    continue;
                }
                self.holes.filled(key);
            }
            let command = Command::Append {
                key: key.clone(),
                event,
            };
            if self.writes.try_send(command).is_err() {
                dropped += 1;
                self.holes.dug(key);
            }
        }
        if dropped > 0 {
            let before = self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
            crate::telemetry::store_writes_dropped(dropped);
            // A warning per thousand drops: a full queue drops at the event rate.
            if before / 1_000 != (before + dropped) / 1_000 || before == 0 {
                tracing::warn!(
                    target: "tower_sse",
                    dropped = before + dropped,
                    "replay store: Redis write queue full; events kept only in this instance's memory, the gap marked in Redis"
                );
            }
        }
    }
}

impl Holes {
    fn has(&self, key: &Bytes) -> bool {
        self.keys.lock().is_ok_and(|keys| keys.contains(key))
    }

    fn dug(&self, key: &Bytes) {
        let Ok(mut keys) = self.keys.lock() else {
            return;
        };
        if keys.len() < MAX_HOLES {
            keys.insert(key.clone());
            self.any.store(true, Ordering::Relaxed);
        } else if !keys.contains(key) {
            tracing::warn!(
                target: "tower_sse",
                "replay store: appends dropped for more than {MAX_HOLES} keys; some gaps are not marked in Redis"
            );
        }
    }

    fn filled(&self, key: &Bytes) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(key);
            self.any.store(!keys.is_empty(), Ordering::Relaxed);
        }
    }
}

/// What the store connects to.
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to one Redis or to a cluster: both reconnect by themselves.
#[derive(Clone)]
pub(crate) enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Connection {
    fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Connects, retrying with backoff until Redis answers; then the connection reconnects by itself.
async fn connect(client: Client, timeout: Duration, publish: watch::Sender<Option<Connection>>) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(2)
        .set_max_delay(1_000);
    let mut delay = Duration::from_millis(50);
    loop {
        let connection = match &client {
            Client::Single(client) => {
                ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(Connection::Single)
            }
            Client::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
        };
        match connection {
            Ok(connection) => {
                let _ = publish.send(Some(connection));
                return;
            }
            Err(error) => {
                tracing::warn!(target: "tower_sse", %error, "replay store: cannot connect to Redis; retrying");
                if publish.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Writes queued appends in pipelined batches until the store is dropped. A batch that fails
/// is sent again (with backoff) before anything queued after it: appends reach Redis in order,
/// and resending is harmless (an id retained already is not stored twice). While it waits, the
/// queue fills, and appends past its bound are dropped and counted.
async fn write(shared: std::sync::Weak<Shared>, mut commands: mpsc::Receiver<Command>) {
    let mut batch = Vec::new();
    loop {
        let Some(first) = commands.recv().await else {
            return;
        };
        batch.push(first);
        let Some(limit) = shared.upgrade().map(|shared| shared.config.batch) else {
            return;
        };
        while batch.len() < limit {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let appends = batch
            .iter()
            .filter(|c| matches!(c, Command::Append { .. }))
            .count() as u64;
        let mut delay = Duration::from_millis(50);
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let counters = &shared.counters;
            match send_batch(&shared, &batch).await {
                Ok(()) => {
                    counters.appended.fetch_add(appends, Ordering::Relaxed);
                    shared.down.set(false);
                    break;
                }
                Err(error) => {
                    shared.down.set(true);
                    let retried = counters.retried.fetch_add(1, Ordering::Relaxed);
                    // Once per outage and then every hundredth attempt: a down Redis fails
                    // every few seconds.
                    if delay == Duration::from_millis(50) || retried % 100 == 0 {
                        tracing::warn!(target: "tower_sse", %error, events = appends, "replay store: Redis write failed; sending again");
                    }
                    crate::telemetry::store_write_failed();
                }
            }
            drop(shared);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        batch.clear();
    }
}

async fn send_batch(shared: &Shared, batch: &[Command]) -> Result<(), StoreError> {
    let Some(mut connection) = shared.connection() else {
        return Err(StoreError::new("not connected to Redis"));
    };
    if !connection.is_cluster() {
        return send_pipeline(shared, &mut connection, batch.iter()).await;
    }
    // A cluster takes a pipeline on one slot only: one per stream, in order within each.
    let mut keys: Vec<&Bytes> = Vec::new();
    for command in batch {
        if !keys.contains(&command.key()) {
            keys.push(command.key());
        }
    }
    for key in keys {
        let of_key = batch.iter().filter(|command| command.key() == key);
        send_pipeline(shared, &mut connection, of_key).await?;
    }
    Ok(())
}

impl Command {
    fn key(&self) -> &Bytes {
        match self {
            Self::Append { key, .. } | Self::Gap { key } | Self::Trim { key, .. } => key,
        }
    }
}

async fn send_pipeline<'a>(
    shared: &Shared,
    connection: &mut Connection,
    commands: impl Iterator<Item = &'a Command> + Clone,
) -> Result<(), StoreError> {
    let config = &shared.config;
    let ttl = config.ttl.as_secs().max(1);
    let scripts = &shared.scripts;
    let pipeline = |with_source: bool| {
        let mut pipe = redis::pipe();
        for command in commands.clone() {
            let script = match command {
                Command::Append { .. } => &scripts.append,
                Command::Gap { .. } => &scripts.gap,
                Command::Trim { .. } => &scripts.trim,
            };
            let call = if with_source {
                pipe.cmd("EVAL").arg(&script.source)
            } else {
                pipe.cmd("EVALSHA").arg(&script.hash)
            };
            let key = command.key();
            call.arg(2)
                .arg(shared.stream_key(key))
                .arg(shared.index_key(key));
            match command {
                Command::Append { event, .. } => {
                    call.arg(&event.id[..])
                        .arg(&event.bytes[..])
                        .arg(config.max_len)
                        .arg(ttl);
                }
                Command::Gap { .. } => {
                    call.arg(config.max_len).arg(ttl);
                }
                Command::Trim { keep, .. } => {
                    call.arg(*keep);
                }
            }
            call.ignore();
        }
        pipe
    };
    let result = timed(
        config.timeout,
        pipeline(false).query_async::<()>(connection),
    )
    .await;
    match result {
        // The script cache is empty after a Redis restart: send the source once, which loads it.
        Err(error) if error.kind() == ErrorKind::NoScriptError => {
            timed(config.timeout, pipeline(true).query_async::<()>(connection))
                .await
                .map_err(StoreError::new)
        }
        other => other.map_err(StoreError::new),
    }
}

/// `future` within `timeout`, a timeout being an I/O error like any other.
pub(crate) async fn timed<T>(
    timeout: Duration,
    future: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not answer in time",
        ))),
    }
}

/// Entries of an `XRANGE` answer as stored events; with where appends were dropped among them:
/// `None` nowhere, `Some(true)` only after the last event, `Some(false)` before some.
fn entries(value: Value) -> Result<(Vec<StoredEvent>, Option<bool>), StoreError> {
    let Value::Array(entries) = value else {
        return Err(StoreError::new("unexpected XRANGE answer"));
    };
    let mut events = Vec::with_capacity(entries.len());
    let mut gap = None;
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            return Err(StoreError::new("unexpected stream entry"));
        };
        let Some(Value::Array(fields)) = parts.pop() else {
            return Err(StoreError::new("unexpected stream entry fields"));
        };
        let (mut id, mut bytes) = (None, None);
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            match (name, value) {
                (Value::BulkString(name), Value::BulkString(value)) if name == b"i" => {
                    id = Some(Bytes::from(value));
                }
                (Value::BulkString(name), Value::BulkString(value)) if name == b"b" => {
                    bytes = Some(Bytes::from(value));
                }
                (Value::BulkString(name), _) if name == b"g" => gap = Some(true),
                _ => {}
            }
        }
        if let (Some(id), Some(bytes)) = (id, bytes) {
            if gap.is_some() {
                gap = Some(false);
            }
            events.push(StoredEvent { id, bytes });
        }
    }
    Ok((events, gap))
}

/// Where a Redis read starts, with the id already turned into its key.
enum RedisReadFrom {
    Oldest,
    Newest,
    After { index: String, id: Bytes },
}

async fn read(
    shared: Arc<Shared>,
    stream: String,
    from: &RedisReadFrom,
    limit: usize,
) -> Result<Lookup, StoreError> {
    let Some(mut connection) = shared.connection() else {
        shared.counters.failed_reads.fetch_add(1, Ordering::Relaxed);
        return Err(StoreError::new("not connected to Redis"));
    };
    let count = limit.min(shared.config.max_len + 100).max(1);
    // The whole stream from one end, `count` entries at most.
    let range = |command: &str, start: &str, end: &str| {
        let mut range = redis::cmd(command);
        range
            .arg(&stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count);
        range
    };
    let answer = match &from {
        RedisReadFrom::Oldest => {
            let command = range("XRANGE", "-", "+");
            timed(
                shared.config.timeout,
                command.query_async::<Value>(&mut connection),
            )
            .await
        }
        RedisReadFrom::Newest => {
            let command = range("XREVRANGE", "+", "-");
            timed(
                shared.config.timeout,
                command.query_async::<Value>(&mut connection),
            )
            .await
            .map(|value| match value {
                // Newest first from Redis; oldest first for the client.
                Value::Array(mut entries) => {
                    entries.reverse();
                    Value::Array(entries)
                }
                other => other,
            })
        }
        RedisReadFrom::After { index, id } => {
            let mut invocation = shared.scripts.read_after.key(&stream);
            invocation.key(index).arg(&id[..]).arg(count);
            timed(
                shared.config.timeout,
                invocation.invoke_async::<Value>(&mut connection),
            )
            .await
        }
    };
    let after = matches!(from, RedisReadFrom::After { .. });
    let lookup = match answer {
        Ok(Value::Nil) => Ok(Lookup::Unknown),
        Ok(value) => entries(value).map(|(events, gap)| match gap {
            // Only a read after an id can miss what came after it.
            Some(resumable) if after => Lookup::Interrupted { events, resumable },
            _ => Lookup::Found(events),
        }),
        Err(error) => Err(StoreError::new(error)),
    };
    if let Err(error) = &lookup {
        shared.counters.failed_reads.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "tower_sse", %error, "replay store: Redis read failed");
    }
    lookup
}

impl ReplayStore for RedisStore {
    type Read = Pin<Box<dyn Future<Output = Result<Lookup, StoreError>> + Send>>;

    fn read(&self, key: &Bytes, from: ReadFrom<'_>, limit: usize) -> Self::Read {
        let shared = &self.shared;
        let stream = shared.stream_key(key);
        let from = match from {
            ReadFrom::Oldest => RedisReadFrom::Oldest,
            ReadFrom::Newest => RedisReadFrom::Newest,
            ReadFrom::After(id) => RedisReadFrom::After {
                index: shared.index_key(key),
                id: Bytes::copy_from_slice(id),
            },
        };
        let (shared, key) = (shared.clone(), key.clone());
        Box::pin(async move {
            let local_from = match &from {
                RedisReadFrom::Oldest => ReadFrom::Oldest,
                RedisReadFrom::Newest => ReadFrom::Newest,
                RedisReadFrom::After { id, .. } => ReadFrom::After(id),
            };
            let local = shared.local.read(&key, local_from, limit).await;
            let after = matches!(from, RedisReadFrom::After { .. });
            // While Redis is down, what this instance knows answers at once.
            let knows = match &local {
                Ok(Lookup::Found(events)) => after || !events.is_empty(),
                Ok(Lookup::Interrupted { .. }) => true,
                _ => false,
            };
            let remote = if knows && shared.down.is_down() {
                Err(StoreError::new("Redis is down"))
            } else {
                let remote = read(shared.clone(), stream, &from, limit).await;
                shared.down.set(remote.is_err());
                remote
            };
            let (lookup, reason) = prefer_local(remote, local, after);
            if let Some(reason) = reason {
                shared.counters.local_reads.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::store_local_read(reason);
            }
            lookup
        })
    }

    fn append(&self, key: &Bytes, event: StoredEvent) {
        self.append_all_at(key, std::iter::once(event), tokio::time::Instant::now());
    }

    fn append_all(&self, key: &Bytes, events: impl Iterator<Item = StoredEvent>) {
        self.append_all_at(key, events, tokio::time::Instant::now());
    }

    /// Into the local tier, then queued for Redis.
    fn append_all_at(
        &self,
        key: &Bytes,
        events: impl Iterator<Item = StoredEvent>,
        now: tokio::time::Instant,
    ) {
        let events: Vec<StoredEvent> = events.collect();
        self.shared
            .local
            .append_all_at(key, events.iter().cloned(), now);
        self.shared.queue(key, events);
    }

    /// The local tier keeps one history per key as the memory store does; what it takes as new
    /// is queued for Redis.
    fn append_carried(
        &self,
        key: &Bytes,
        position: &mut Position,
        events: &mut dyn CarriedEvents,
        now: tokio::time::Instant,
    ) {
        let mut taken = Taken {
            events,
            kept: Vec::new(),
        };
        self.shared
            .local
            .append_carried(key, position, &mut taken, now);
        self.shared.queue(key, taken.kept);
    }

    fn next_id(&self, _key: &Bytes) -> Bytes {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let n = self
            .shared
            .counters
            .sequence
            .fetch_add(1, Ordering::Relaxed);
        Bytes::from(format!("{millis}-{:08x}-{n}", self.shared.instance))
    }

    fn recorder_started(&self, key: &Bytes, continues_after: Option<&[u8]>) {
        self.shared.local.recorder_started(key, continues_after);
    }

    fn recorder_stopped(&self, key: &Bytes) {
        self.shared.local.recorder_stopped(key);
    }

    fn shared_key(&self, key: &Bytes) -> Option<Bytes> {
        self.shared.local.shared_key(key)
    }

    fn trim(&self, key: &Bytes, keep: usize) {
        let command = Command::Trim {
            key: key.clone(),
            keep,
        };
        self.shared.local.trim(key, keep);
        if self.shared.writes.try_send(command).is_err() {
            tracing::warn!(target: "tower_sse", "replay store: Redis write queue full; trim skipped");
        }
    }
}

/// Redis's answer, or the local tier's when Redis failed, did not know the id, or knows fewer
/// events after it than this instance recorded (appends lost while Redis was down, or a Redis
/// that came back empty). With why the local tier answered. `after`: a read after an id, which
/// the local tier answers (even with nothing) only when it knows the id.
fn prefer_local(
    remote: Result<Lookup, StoreError>,
    local: Result<Lookup, StoreError>,
    after: bool,
) -> (Result<Lookup, StoreError>, Option<&'static str>) {
    let (local_len, interrupted) = match &local {
        Ok(Lookup::Found(events)) => (events.len(), None),
        Ok(Lookup::Interrupted { events, resumable }) => (events.len(), Some(*resumable)),
        _ => return (remote, None),
    };
    match remote {
        Err(_) if after || local_len > 0 => (local, Some("failed")),
        Ok(Lookup::Unknown) => (local, Some("unknown")),
        Ok(Lookup::Found(remote)) if local_len > remote.len() => (local, Some("more")),
        // Redis misses appends its queue dropped; this instance recorded them all.
        Ok(Lookup::Interrupted { events, .. })
            if interrupted.is_none() && local_len >= events.len() =>
        {
            (local, Some("more"))
        }
        // Redis knows no more than this instance, which stopped recording for a while: the
        // interruption stands (another instance recording meanwhile would have added events).
        Ok(Lookup::Found(events)) if interrupted.is_some() && local_len == events.len() => (
            Ok(Lookup::Interrupted {
                events,
                resumable: interrupted.unwrap_or(false),
            }),
            None,
        ),
        remote => (remote, None),
    }
}
