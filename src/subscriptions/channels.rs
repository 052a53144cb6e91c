//! The channels open in this process, per subscription, so a suspension or deletion can close
//! them; and, for a shared store, the task that learns of changes made by other processes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::{Status, SubscriptionStore};
use crate::lifetime::Shutdown;

/// Open channels by subscription id. Each subscription's channels share one signal; closing
/// fires it and forgets it, so a channel opened afterwards gets a fresh one.
#[derive(Debug, Default)]
pub(crate) struct Channels {
    open: Mutex<HashMap<String, Entry>>,
    /// Whether the polling task runs (shared stores only).
    polling: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    signal: Shutdown,
    channels: usize,
    /// Tells this entry from one made for the same id after a close.
    generation: u64,
}

/// One open channel; dropping it unregisters the channel.
#[derive(Debug)]
pub(crate) struct Registration {
    channels: Arc<Channels>,
    id: String,
    generation: u64,
    signal: Shutdown,
}

impl Registration {
    /// Fires when the subscription is suspended or deleted.
    pub(crate) fn signal(&self) -> &Shutdown {
        &self.signal
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.channels.lock();
        if let Some(entry) = open.get_mut(&self.id) {
            if entry.generation == self.generation {
                entry.channels -= 1;
                if entry.channels == 0 {
                    open.remove(&self.id);
                }
            }
        }
    }
}

impl Channels {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a channel of `id`, before its status is read: a close that comes later fires
    /// its signal, and one that came earlier was preceded by the store change the read sees.
    pub(crate) fn open(self: &Arc<Self>, id: &str) -> Registration {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut open = self.lock();
        let entry = open.entry(id.to_owned()).or_insert_with(|| Entry {
            signal: Shutdown::new(),
            channels: 0,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        });
        entry.channels += 1;
        Registration {
            channels: self.clone(),
            id: id.to_owned(),
            generation: entry.generation,
            signal: entry.signal.clone(),
        }
    }

    /// Ends every open channel of `id` at its next event boundary.
    pub(crate) fn close(&self, id: &str) {
        if let Some(entry) = self.lock().remove(id) {
            crate::telemetry::subscription_channels_closed(id, entry.channels);
            entry.signal.trigger();
        }
    }

    /// How many channels are open, over all subscriptions.
    pub(crate) fn count(&self) -> usize {
        self.lock().values().map(|entry| entry.channels).sum()
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Starts the task that polls a shared store for the status of the subscriptions with open
    /// channels, once; it ends when the last handle on these channels is dropped.
    pub(crate) fn watch<St: SubscriptionStore>(self: &Arc<Self>, store: &St, every: Duration) {
        if !store.is_shared() || self.polling.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(poll(Arc::downgrade(self), store.clone(), every));
    }
}

async fn poll<St: SubscriptionStore>(channels: Weak<Channels>, store: St, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(channels) = channels.upgrade() else {
            return;
        };
        let ids = channels.ids();
        if ids.is_empty() {
            continue;
        }
        // A failing store closes nothing: channels stay open until it answers again.
        let statuses = match store.statuses(ids.clone()).await {
            Ok(statuses) => statuses,
            Err(error) => {
                tracing::warn!(target: "tower_sse", %error, "subscriptions: cannot poll statuses");
                continue;
            }
        };
        for (id, status) in ids.iter().zip(statuses) {
            if status != Some(Status::Active) {
                channels.close(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_fires_open_channels_and_forgets_them() {
        let channels = Arc::new(Channels::default());
        let a = channels.open("a");
        let b = channels.open("a");
        let other = channels.open("b");
        assert_eq!(channels.count(), 3);
        channels.close("a");
        assert!(a.signal().is_triggered() && b.signal().is_triggered());
        assert!(!other.signal().is_triggered());
        assert_eq!(channels.count(), 1);
        // A channel opened after the close is not closed by it, and the old ones leaving does
        // not unregister it.
        let c = channels.open("a");
        drop((a, b));
        assert!(!c.signal().is_triggered());
        assert_eq!(channels.count(), 2);
        drop((c, other));
        assert_eq!(channels.count(), 0);
        assert!(channels.lock().is_empty());
    }
}
