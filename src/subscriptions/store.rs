//! Where subscriptions live: the [`SubscriptionStore`] trait and [`MemorySubscriptions`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use crate::replay::StoreError;

/// Whether a subscription may be consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Channels may be opened.
    Active,
    /// New channels are refused and open ones are closed at an event boundary.
    Suspended,
}

impl Status {
    /// `active` or `suspended`, as in the JSON bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }

    /// The status named `name` (`active` or `suspended`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            _ => None,
        }
    }
}

/// A provisioned (or disposable) subscription to a topic. A store of your own builds it from
/// its fields when it reads one back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Its id: 128 random bits in hex, the only way to consume it.
    pub id: String,
    /// The topic it is bound to.
    pub topic: String,
    /// Whether it may be consumed now.
    pub status: Status,
    /// Created implicitly by a plain topic request, and removed when that channel closes.
    pub disposable: bool,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The id of the last event written to one of its channels (empty: none yet, or the
    /// stream reset its id). A channel opened without `Last-Event-ID` resumes after it.
    pub cursor: Bytes,
}

impl Subscription {
    /// A new active subscription to `topic` with a fresh random id, created now.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            id: new_id(),
            topic: topic.into(),
            status: Status::Active,
            disposable: false,
            created_ms: now_ms(),
            cursor: Bytes::new(),
        }
    }

    /// Marks it disposable: removed when its (single) channel closes.
    pub fn disposable(mut self, disposable: bool) -> Self {
        self.disposable = disposable;
        self
    }

    /// Starts its cursor after the event `id`.
    pub fn cursor(mut self, id: impl Into<Bytes>) -> Self {
        self.cursor = id.into();
        self
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// 128 bits from the operating system's CSPRNG, in hex: a subscription's id is the bearer
/// capability to read it, so it must not be guessable from other ids or from the time.
///
/// # Panics
///
/// When the operating system has no randomness to give (`getrandom` fails), rather than hand
/// out a guessable id.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
    let mut id = String::with_capacity(32);
    for byte in bytes {
        use std::fmt::Write;
        let _ = write!(id, "{byte:02x}");
    }
    id
}

/// What [`SubscriptionStore::create`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The subscription is stored.
    Stored,
    /// The topic (or the whole store) already holds its maximum number of subscriptions.
    Full,
}

/// The bounds a store holds to when it creates a subscription, from
/// [`Subscriptions::max_per_topic`](super::Subscriptions::max_per_topic) and
/// [`Subscriptions::max_subscriptions`](super::Subscriptions::max_subscriptions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// At most this many subscriptions of one topic.
    pub per_topic: usize,
    /// At most this many subscriptions in the whole store, every topic and instance together.
    pub total: usize,
}

/// The future of a store operation.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Storage for subscriptions and their cursors.
///
/// Operations of the API are asynchronous (a networked store fits behind them). Cursor updates
/// and the removal of a closed disposable subscription are not: a channel never waits for the
/// store, so a networked store queues them and writes in the background.
pub trait SubscriptionStore: Clone + Send + Sync + 'static {
    /// Stores `subscription`, unless its topic already holds `caps.per_topic` subscriptions or
    /// the store `caps.total` ([`Created::Full`]). Disposable subscriptions count while they
    /// exist. A refusal should cost the store a constant amount of work, however many
    /// subscriptions it holds: it is what a flood of creates costs.
    fn create(&self, subscription: Subscription, caps: Caps) -> StoreFuture<Created>;

    /// The subscription `id`, if it exists.
    fn get(&self, id: &str) -> StoreFuture<Option<Subscription>>;

    /// Every subscription of `topic`, in no particular order.
    fn list(&self, topic: &str) -> StoreFuture<Vec<Subscription>>;

    /// Sets the status of `id`; the updated subscription, or `None` if there is none.
    fn set_status(&self, id: &str, status: Status) -> StoreFuture<Option<Subscription>>;

    /// Deletes `id` and its cursor; false if there was none.
    fn delete(&self, id: &str) -> StoreFuture<bool>;

    /// Moves the cursor of `id` to the event `cursor`; nothing if `id` no longer exists.
    fn save_cursor(&self, id: &str, cursor: Bytes);

    /// Removes `id` without waiting: a disposable subscription whose channel closed.
    fn remove(&self, id: &str);

    /// The status of each of `ids` (`None`: deleted), for a store that other processes change
    /// too. Also keeps disposable subscriptions with open channels from expiring.
    fn statuses(&self, ids: Vec<String>) -> StoreFuture<Vec<Option<Status>>> {
        let store = self.clone();
        Box::pin(async move {
            let mut statuses = Vec::with_capacity(ids.len());
            for id in ids {
                statuses.push(store.get(&id).await?.map(|s| s.status));
            }
            Ok(statuses)
        })
    }

    /// True when other processes may change subscriptions (a shared store): open channels then
    /// learn of a suspension or deletion by polling [`statuses`](Self::statuses).
    fn is_shared(&self) -> bool {
        false
    }
}

/// Subscriptions in this process's memory: the default store. Bounded in number by the
/// [`Caps`] of each create (100,000 in all by default, see
/// [`Subscriptions::max_subscriptions`](super::Subscriptions::max_subscriptions)) and by its own
/// [`max_total`](MemorySubscriptions::max_total) if set; lost on restart.
#[derive(Clone, Default)]
pub struct MemorySubscriptions {
    shared: Arc<Mutex<Memory>>,
}

#[derive(Default)]
struct Memory {
    by_id: HashMap<String, Subscription>,
    /// Ids per topic, for listing without a scan.
    by_topic: BTreeMap<String, Vec<String>>,
    max_total: Option<usize>,
}

impl fmt::Debug for MemorySubscriptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscriptions")
            .field("subscriptions", &self.len())
            .finish()
    }
}

impl MemorySubscriptions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuses new subscriptions beyond `max` in all, whatever the caps of a create say
    /// (default: no bound of its own).
    pub fn max_total(self, max: usize) -> Self {
        self.lock().max_total = Some(max);
        self
    }

    /// How many subscriptions are stored.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// True when no subscription is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Memory> {
        // A panic while the lock was held leaves consistent maps: every change is one step.
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Memory {
    fn remove(&mut self, id: &str) -> bool {
        let Some(removed) = self.by_id.remove(id) else {
            return false;
        };
        if let Some(ids) = self.by_topic.get_mut(&removed.topic) {
            ids.retain(|other| other != id);
            if ids.is_empty() {
                self.by_topic.remove(&removed.topic);
            }
        }
        true
    }
}

fn done<T: Send + 'static>(value: T) -> StoreFuture<T> {
    Box::pin(ready(Ok(value)))
}

impl SubscriptionStore for MemorySubscriptions {
    fn create(&self, subscription: Subscription, caps: Caps) -> StoreFuture<Created> {
        let mut memory = self.lock();
        let in_topic = memory.by_topic.get(&subscription.topic).map_or(0, Vec::len);
        let max_total = memory
            .max_total
            .map_or(caps.total, |own| own.min(caps.total));
        if in_topic >= caps.per_topic || memory.by_id.len() >= max_total {
            return done(Created::Full);
        }
        memory
            .by_topic
            .entry(subscription.topic.clone())
            .or_default()
            .push(subscription.id.clone());
        memory.by_id.insert(subscription.id.clone(), subscription);
        done(Created::Stored)
    }

    fn get(&self, id: &str) -> StoreFuture<Option<Subscription>> {
        done(self.lock().by_id.get(id).cloned())
    }

    fn list(&self, topic: &str) -> StoreFuture<Vec<Subscription>> {
        let memory = self.lock();
        let ids = memory.by_topic.get(topic).map_or(&[][..], Vec::as_slice);
        done(
            ids.iter()
                .filter_map(|id| memory.by_id.get(id).cloned())
                .collect(),
        )
    }

    fn set_status(&self, id: &str, status: Status) -> StoreFuture<Option<Subscription>> {
        let mut memory = self.lock();
        let updated = memory.by_id.get_mut(id).map(|subscription| {
            subscription.status = status;
            subscription.clone()
        });
        done(updated)
    }

    fn delete(&self, id: &str) -> StoreFuture<bool> {
        done(self.lock().remove(id))
    }

    fn save_cursor(&self, id: &str, cursor: Bytes) {
        if let Some(subscription) = self.lock().by_id.get_mut(id) {
            subscription.cursor = cursor;
        }
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_list_update_delete() {
        let store = MemorySubscriptions::new();
        let a = Subscription::new("news");
        let b = Subscription::new("news");
        let c = Subscription::new("sport");
        for s in [&a, &b, &c] {
            assert_eq!(
                store.create(s.clone(), caps(10)).await.unwrap(),
                Created::Stored
            );
        }
        assert_eq!(store.list("news").await.unwrap().len(), 2);
        assert_eq!(store.list("none").await.unwrap().len(), 0);
        let suspended = store.set_status(&a.id, Status::Suspended).await.unwrap();
        assert_eq!(suspended.unwrap().status, Status::Suspended);
        store.save_cursor(&a.id, Bytes::from_static(b"42"));
        assert_eq!(store.get(&a.id).await.unwrap().unwrap().cursor, "42");
        assert!(store.delete(&a.id).await.unwrap());
        assert!(!store.delete(&a.id).await.unwrap());
        // A cursor saved after the delete does not bring it back.
        store.save_cursor(&a.id, Bytes::from_static(b"43"));
        assert_eq!(store.get(&a.id).await.unwrap(), None);
        assert_eq!(
            store
                .statuses(vec![a.id.clone(), b.id.clone()])
                .await
                .unwrap(),
            vec![None, Some(Status::Active)]
        );
        store.remove(&b.id);
        assert_eq!(store.list("news").await.unwrap(), vec![]);
        assert_eq!(store.len(), 1);
    }

    fn caps(per_topic: usize) -> Caps {
        Caps {
            per_topic,
            total: usize::MAX,
        }
    }

    #[tokio::test]
    async fn topics_and_the_store_are_bounded() {
        let store = MemorySubscriptions::new().max_total(3);
        for _ in 0..2 {
            let created = store.create(Subscription::new("a"), caps(2)).await.unwrap();
            assert_eq!(created, Created::Stored);
        }
        let third = store.create(Subscription::new("a"), caps(2)).await.unwrap();
        assert_eq!(third, Created::Full);
        let other = store.create(Subscription::new("b"), caps(2)).await.unwrap();
        assert_eq!(other, Created::Stored);
        let beyond = store.create(Subscription::new("c"), caps(2)).await.unwrap();
        assert_eq!(beyond, Created::Full);
    }

    #[tokio::test]
    async fn the_total_cap_of_a_create_holds() {
        let store = MemorySubscriptions::new();
        let caps = Caps {
            per_topic: 10,
            total: 3,
        };
        for topic in ["a", "b", "c"] {
            let created = store.create(Subscription::new(topic), caps).await.unwrap();
            assert_eq!(created, Created::Stored);
        }
        let beyond = store.create(Subscription::new("d"), caps).await.unwrap();
        assert_eq!(beyond, Created::Full);
        assert_eq!(store.len(), 3);
    }

    /// 128 bits from the CSPRNG: every bit position varies, about half the time.
    #[test]
    fn ids_are_128_random_bits() {
        let ids: Vec<u128> = (0..4_096)
            .map(|_| u128::from_str_radix(&new_id(), 16).unwrap())
            .collect();
        for bit in 0..128 {
            let ones = ids.iter().filter(|id| *id >> bit & 1 == 1).count();
            assert!(
                (1_648..=2_448).contains(&ones),
                "bit {bit}: {ones} of 4,096"
            );
        }
    }

    #[test]
    fn ids_are_distinct_hex() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    }
}
