//! [`RedisSubscriptions`]: subscriptions and cursors in Redis, shared by every instance.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::store::{
    Caps, Created, Status, StoreError, StoreFuture, Subscription, SubscriptionStore,
};
use crate::replay::{timed, RedisStore};

/// Redis's clock in milliseconds, in a script.
const NOW: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
";

/// Stores a subscription unless its topic or the store is full. Both indexes score an id by
/// when it expires (`+inf` for a provisioned one): a disposable one expires unless its
/// channel's instance keeps renewing it, so a crashed instance leaves nothing for long. Before
/// counting, the ids whose time passed leave the indexes: each id once, so a refusal costs a
/// constant number of commands (no scan of the topic).
const CREATE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then return 0 end
redis.call('HSET', KEYS[1], 'topic', ARGV[2], 'status', ARGV[3], 'disposable', ARGV[4], 'created', ARGV[5], 'cursor', ARGV[6])
local expires = '+inf'
if tonumber(ARGV[8]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  expires = now + tonumber(ARGV[8])
end
redis.call('ZADD', KEYS[2], expires, ARGV[7])
redis.call('ZADD', KEYS[3], expires, ARGV[7])
return 1
";

/// Sets the status of an existing subscription and returns it; nil when there is none.
const SET_STATUS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return redis.call('HGETALL', KEYS[1])
";

/// Deletes a subscription and its place in the indexes; 1 if it existed.
const DELETE: &str = r"
local topic = redis.call('HGET', KEYS[1], 'topic')
if not topic then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. topic .. ':live', ARGV[2])
redis.call('ZREM', ARGV[3], ARGV[2])
return 1
";

/// Moves the cursor of an existing subscription; never creates one.
const SAVE_CURSOR: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'cursor', ARGV[1]) end
return 0
";

/// The status of a subscription, renewing a disposable one's expiry (its key's and its
/// place in the indexes).
const STATUS: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if status and redis.call('HGET', KEYS[1], 'disposable') == '1' then
  local expires = now + tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('ZADD', ARGV[2] .. redis.call('HGET', KEYS[1], 'topic') .. ':live', expires, ARGV[4])
  redis.call('ZADD', ARGV[3], expires, ARGV[4])
end
return status
";

/// Subscriptions in Redis (features `subscriptions` and `redis`), from
/// [`RedisStore::subscriptions`]: on the same connection and under the same prefix as the
/// replay history, so any instance can serve, suspend or delete any subscription.
///
/// Per subscription, a hash `<prefix>{subs}:sub:<id>` (topic, status, disposable, created,
/// cursor); per topic, a sorted set `<prefix>{subs}:topic:<topic>:live` of its ids, and for the
/// whole store `<prefix>{subs}:live` of all ids, each scored by when the subscription expires
/// (`+inf` for a provisioned one), so the caps are counted in O(1) and a refused create costs a
/// constant number of commands. Topics and ids are validated before they reach a key name. Cursor moves and the removal of closed
/// disposable subscriptions are coalesced in memory (one pending cursor per subscription) and
/// written in pipelined batches by a background task, so a channel never waits for Redis.
/// Disposable subscriptions expire after [`disposable_ttl`](Self::disposable_ttl) unless the
/// instance holding their channel renews them (each status poll does).
///
/// On a Redis Cluster ([`RedisStore::open_cluster`]) the subscriptions live on one slot (their
/// keys share the hash tag `{subs}`), so each script and pipeline stays on one node; the topics'
/// event histories spread over the cluster as replay's do.
#[derive(Clone)]
pub struct RedisSubscriptions {
    shared: Arc<Shared>,
    disposable_ttl: Duration,
}

struct Shared {
    store: RedisStore,
    pending: Mutex<Pending>,
    wake: Arc<Notify>,
    /// Whether the background writer runs.
    writer: AtomicBool,
}

#[derive(Default)]
struct Pending {
    cursors: HashMap<String, Bytes>,
    removals: Vec<String>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the writer find the store gone and end.
        self.wake.notify_one();
    }
}

impl fmt::Debug for RedisSubscriptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscriptions")
            .field("prefix", &self.shared.store.config().prefix)
            .field("disposable_ttl", &self.disposable_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisSubscriptions {
    pub(crate) fn new(store: RedisStore) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                pending: Mutex::default(),
                wake: Arc::default(),
                writer: AtomicBool::new(false),
            }),
            disposable_ttl: Duration::from_secs(60),
        }
    }

    /// How long a disposable subscription outlives the last renewal by the instance that holds
    /// its channel (default 60 s; keep it well above the poll interval).
    pub fn disposable_ttl(mut self, ttl: Duration) -> Self {
        self.disposable_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    // Every key of the subscriptions shares one hash tag, `{subs}`: a script touches a
    // subscription and the indexes of its topic and of the store together, which a Redis
    // Cluster allows on one slot only.

    fn subscription_key(&self, id: &str) -> String {
        format!("{}{{subs}}:sub:{id}", self.shared.store.config().prefix)
    }

    fn topic_key(&self, topic: &str) -> String {
        format!("{}{}:live", self.topic_prefix(), topic)
    }

    /// The index of every subscription of the store.
    fn all_key(&self) -> String {
        format!("{}{{subs}}:live", self.shared.store.config().prefix)
    }

    fn topic_prefix(&self) -> String {
        format!("{}{{subs}}:topic:", self.shared.store.config().prefix)
    }

    fn timeout(&self) -> Duration {
        self.shared.store.config().timeout
    }

    fn connection(&self) -> Result<crate::replay::RedisConnection, StoreError> {
        self.shared
            .store
            .connection()
            .ok_or_else(|| StoreError::new("not connected to Redis"))
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a write for the background writer, starting it the first time. Outside a
    /// runtime (a body dropped while one shuts down) the write waits for a later start.
    fn queue(&self, write: impl FnOnce(&mut Pending)) {
        write(&mut self.pending());
        if !self.shared.writer.load(Ordering::Acquire) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                if !self.shared.writer.swap(true, Ordering::AcqRel) {
                    runtime.spawn(write_pending(
                        Arc::downgrade(&self.shared),
                        self.shared.wake.clone(),
                    ));
                }
            }
        }
        self.shared.wake.notify_one();
    }
}

/// A subscription from its hash's fields; `None` for a missing (empty) hash.
fn parse(id: &str, fields: HashMap<String, Vec<u8>>) -> Option<Subscription> {
    let text = |name: &str| fields.get(name).map(|value| String::from_utf8_lossy(value));
    let topic = text("topic")?.into_owned();
    Some(Subscription {
        id: id.to_owned(),
        topic,
        status: Status::from_name(&text("status")?).unwrap_or(Status::Active),
        disposable: text("disposable").as_deref() == Some("1"),
        created_ms: text("created").and_then(|ms| ms.parse().ok()).unwrap_or(0),
        cursor: fields
            .get("cursor")
            .cloned()
            .map(Bytes::from)
            .unwrap_or_default(),
    })
}

fn failed(error: redis::RedisError) -> StoreError {
    StoreError::new(error)
}

impl SubscriptionStore for RedisSubscriptions {
    fn create(&self, subscription: Subscription, caps: Caps) -> StoreFuture<Created> {
        let this = self.clone();
        Box::pin(async move {
            let mut connection = this.connection()?;
            let ttl = if subscription.disposable {
                this.disposable_ttl.as_millis() as u64
            } else {
                0
            };
            let script = redis::Script::new(&[NOW, CREATE].concat());
            let mut call = script.key(this.subscription_key(&subscription.id));
            call.key(this.topic_key(&subscription.topic))
                .key(this.all_key())
                .arg(caps.per_topic)
                .arg(&subscription.topic)
                .arg(subscription.status.as_str())
                .arg(if subscription.disposable { "1" } else { "0" })
                .arg(subscription.created_ms)
                .arg(&subscription.cursor[..])
                .arg(&subscription.id)
                .arg(ttl)
                .arg(caps.total);
            let stored: i64 = timed(this.timeout(), call.invoke_async(&mut connection))
                .await
                .map_err(failed)?;
            Ok(if stored == 1 {
                Created::Stored
            } else {
                Created::Full
            })
        })
    }

    fn get(&self, id: &str) -> StoreFuture<Option<Subscription>> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move {
            let mut connection = this.connection()?;
            let mut command = redis::cmd("HGETALL");
            command.arg(this.subscription_key(&id));
            let fields: HashMap<String, Vec<u8>> =
                timed(this.timeout(), command.query_async(&mut connection))
                    .await
                    .map_err(failed)?;
            Ok(parse(&id, fields))
        })
    }

    fn list(&self, topic: &str) -> StoreFuture<Vec<Subscription>> {
        let this = self.clone();
        let topic = topic.to_owned();
        Box::pin(async move {
            let mut connection = this.connection()?;
            let index = this.topic_key(&topic);
            let mut range = redis::cmd("ZRANGE");
            range.arg(&index).arg(0).arg(-1);
            let ids: Vec<String> = timed(this.timeout(), range.query_async(&mut connection))
                .await
                .map_err(failed)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGETALL").arg(this.subscription_key(id));
            }
            let all: Vec<HashMap<String, Vec<u8>>> =
                timed(this.timeout(), pipe.query_async(&mut connection))
                    .await
                    .map_err(failed)?;
            let mut listed = Vec::with_capacity(ids.len());
            let mut expired = redis::pipe();
            for (id, fields) in ids.iter().zip(all) {
                match parse(id, fields) {
                    Some(subscription) => listed.push(subscription),
                    // A disposable subscription whose instance went away expired.
                    None => {
                        expired.cmd("ZREM").arg(&index).arg(id).ignore();
                        expired.cmd("ZREM").arg(this.all_key()).arg(id).ignore();
                    }
                }
            }
            if listed.len() < ids.len() {
                let _: Result<(), _> =
                    timed(this.timeout(), expired.query_async(&mut connection)).await;
            }
            Ok(listed)
        })
    }

    fn set_status(&self, id: &str, status: Status) -> StoreFuture<Option<Subscription>> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move {
            let mut connection = this.connection()?;
            let script = redis::Script::new(SET_STATUS);
            let mut call = script.key(this.subscription_key(&id));
            call.arg(status.as_str());
            let fields: Option<HashMap<String, Vec<u8>>> =
                timed(this.timeout(), call.invoke_async(&mut connection))
                    .await
                    .map_err(failed)?;
            Ok(fields.and_then(|fields| parse(&id, fields)))
        })
    }

    fn delete(&self, id: &str) -> StoreFuture<bool> {
        let this = self.clone();
        let id = id.to_owned();
        Box::pin(async move {
            let mut connection = this.connection()?;
            let script = redis::Script::new(DELETE);
            let mut call = script.key(this.subscription_key(&id));
            call.arg(this.topic_prefix()).arg(&id).arg(this.all_key());
            let deleted: i64 = timed(this.timeout(), call.invoke_async(&mut connection))
                .await
                .map_err(failed)?;
            Ok(deleted == 1)
        })
    }

    fn save_cursor(&self, id: &str, cursor: Bytes) {
        self.queue(|pending| {
            pending.cursors.insert(id.to_owned(), cursor);
        });
    }

    fn remove(&self, id: &str) {
        self.queue(|pending| pending.removals.push(id.to_owned()));
    }

    fn statuses(&self, ids: Vec<String>) -> StoreFuture<Vec<Option<Status>>> {
        let this = self.clone();
        Box::pin(async move {
            let mut connection = this.connection()?;
            let ttl = this.disposable_ttl.as_millis() as u64;
            let (topic_prefix, all) = (this.topic_prefix(), this.all_key());
            let script = [NOW, STATUS].concat();
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("EVAL")
                    .arg(&script)
                    .arg(1)
                    .arg(this.subscription_key(id))
                    .arg(ttl)
                    .arg(&topic_prefix)
                    .arg(&all)
                    .arg(id);
            }
            let statuses: Vec<Option<String>> =
                timed(this.timeout(), pipe.query_async(&mut connection))
                    .await
                    .map_err(failed)?;
            Ok(statuses
                .into_iter()
                .map(|status| status.map(|s| Status::from_name(&s).unwrap_or(Status::Active)))
                .collect())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }
}

/// Writes pending cursors and removals, in one pipeline per wake-up, until the store is dropped.
async fn write_pending(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let store = RedisSubscriptions {
            shared: strong,
            disposable_ttl: Duration::ZERO,
        };
        let Pending { cursors, removals } = std::mem::take(&mut *store.pending());
        if cursors.is_empty() && removals.is_empty() {
            continue;
        }
        let Ok(mut connection) = store.connection() else {
            tracing::warn!(target: "tower_sse", cursors = cursors.len(), "subscriptions: not connected to Redis; cursors not saved");
            continue;
        };
        // Cursors first: a removal in the same batch then leaves nothing behind.
        let mut pipe = redis::pipe();
        for (id, cursor) in &cursors {
            pipe.cmd("EVAL")
                .arg(SAVE_CURSOR)
                .arg(1)
                .arg(store.subscription_key(id))
                .arg(&cursor[..])
                .ignore();
        }
        let (topic_prefix, all) = (store.topic_prefix(), store.all_key());
        for id in &removals {
            pipe.cmd("EVAL")
                .arg(DELETE)
                .arg(1)
                .arg(store.subscription_key(id))
                .arg(&topic_prefix)
                .arg(id)
                .arg(&all)
                .ignore();
        }
        if let Err(error) = timed(store.timeout(), pipe.query_async::<()>(&mut connection)).await {
            tracing::warn!(target: "tower_sse", %error, cursors = cursors.len(), removals = removals.len(), "subscriptions: Redis write failed");
        }
    }
}
