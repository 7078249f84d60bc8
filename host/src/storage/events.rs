//! What each replica applied, for watchers: a bounded in-memory history of applied commands and
//! version changes, and a signal when it grows.
//!
//! Events are observations of the apply path, never part of the replicated state: every
//! replica records the same events (apply is deterministic) as far as it has applied. The
//! history is bounded by a count and a byte budget; the oldest events go first. It starts
//! empty when a node starts (entries replayed from the log after its snapshot are recorded
//! again), and it is cleared when the state is replaced wholesale (a snapshot installed from
//! the leader, a backup restored): a watcher that needs events from before that gets
//! [`Since::Gone`] and reads the state afresh, like an etcd watcher whose revision was
//! compacted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// How an applied entry ended, for watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest's reply.
    Reply(Vec<u8>),
    /// The guest rejected the command (no state change).
    Rejected(String),
    /// The command did not run to the end: the guest trapped, or the service does not exist.
    Failed(String),
    /// The service now runs this version (a deploy or a rollback).
    Version(u32),
    /// The guest emitted an event under this topic (the event's data is the payload).
    Emitted(String),
    /// The timer of this key was delivered (its payload is the payload).
    Fired(String),
}

/// One applied entry of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The log index of the entry.
    pub index: u64,
    /// The service it was for (shared by the events of one apply batch).
    pub service: Arc<str>,
    /// The entry's timestamp (the one the guest saw).
    pub timestamp_ms: u64,
    /// The command's payload (empty for a version change).
    pub payload: Vec<u8>,
    /// How it ended.
    pub outcome: Outcome,
    /// What a reader made of the event, kept for the next reader (the etcd endpoint decodes each
    /// key-value event once per node, not once per watcher).
    pub memo: Memo,
}

/// A slot for one value derived from an event, filled by its first reader. It takes no part in
/// comparisons.
#[derive(Default, Clone)]
pub struct Memo(std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl Memo {
    /// The value in the slot, made by `make` if the slot is empty; `None` if it holds a value
    /// of another type (another reader's).
    pub fn get_or_init<T: Send + Sync + 'static>(
        &self,
        make: impl FnOnce() -> T,
    ) -> Option<Arc<T>> {
        self.0
            .get_or_init(|| Arc::new(make()))
            .clone()
            .downcast::<T>()
            .ok()
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

impl PartialEq for Memo {
    fn eq(&self, _: &Memo) -> bool {
        true
    }
}

impl Eq for Memo {}

impl Event {
    fn bytes(&self) -> usize {
        let outcome = match &self.outcome {
            Outcome::Reply(b) => b.len(),
            Outcome::Rejected(s) | Outcome::Failed(s) | Outcome::Emitted(s) | Outcome::Fired(s) => {
                s.len()
            }
            Outcome::Version(_) => 4,
        };
        64 + self.service.len() + self.payload.len() + outcome
    }
}

/// Bounds of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most events kept (0: none, watchers only see what comes after they start).
    pub events: usize,
    /// Most bytes of payloads and replies kept.
    pub bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            events: 10_000,
            bytes: 64 << 20,
        }
    }
}

#[derive(Debug)]
struct History {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    /// Events at indexes below this are no longer kept (or never were).
    first: u64,
    /// The last index applied and recorded (events or not).
    last: u64,
}

/// Which events a watcher wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Events of this service only; empty: every service.
    pub service: String,
    /// Only the events guests emit, and of those only topics that start with this prefix
    /// (`Some("")`: every topic). `None`: every event.
    pub topic_prefix: Option<String>,
}

impl Filter {
    /// Every event of `service` (every service if empty).
    pub fn service(service: &str) -> Filter {
        Filter {
            service: service.to_owned(),
            topic_prefix: None,
        }
    }

    fn admits(&self, e: &Event) -> bool {
        if !self.service.is_empty() && *e.service != *self.service {
            return false;
        }
        match (&self.topic_prefix, &e.outcome) {
            (None, _) => true,
            (Some(prefix), Outcome::Emitted(topic)) => topic.starts_with(prefix.as_str()),
            (Some(_), _) => false,
        }
    }
}

/// What [`Events::since`] found.
#[derive(Debug)]
pub enum Since {
    /// Events at `from` or later, oldest first (maybe none yet).
    Events {
        /// The events found.
        events: Vec<Arc<Event>>,
        /// Every event up to this index has been looked at: the next look starts after it.
        upto: u64,
    },
    /// Events at `from` are no longer kept: the history starts at `first`.
    Gone {
        /// The oldest index the history still covers.
        first: u64,
    },
}

/// The history of one replica, shared by its state machine and its watchers.
#[derive(Debug)]
pub struct Events {
    limits: HistoryLimits,
    history: Mutex<History>,
    grew: tokio::sync::watch::Sender<u64>,
    closed: std::sync::atomic::AtomicBool,
}

impl Events {
    /// An empty history with the given bounds.
    pub fn new(limits: HistoryLimits) -> Events {
        Events {
            limits,
            history: Mutex::new(History {
                events: VecDeque::new(),
                bytes: 0,
                first: 0,
                last: 0,
            }),
            grew: tokio::sync::watch::channel(0).0,
            closed: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        crate::sync::lock_anyway(&self.history)
    }

    /// Events held, and the bytes of their payloads and replies.
    pub fn held(&self) -> (usize, usize) {
        let h = self.lock();
        (h.events.len(), h.bytes)
    }

    /// Records a batch of applied entries (indexes `applied`) and the events among them,
    /// oldest first.
    pub fn record(&self, applied: std::ops::RangeInclusive<u64>, events: Vec<Event>) {
        let last = *applied.end();
        {
            let mut h = self.lock();
            if h.first == 0 && h.last == 0 {
                // The first entries applied since this node started: what came before them was
                // not seen here.
                h.first = *applied.start();
            }
            for e in events {
                h.bytes += e.bytes();
                h.events.push_back(Arc::new(e));
            }
            while h.events.len() > self.limits.events || h.bytes > self.limits.bytes {
                let Some(old) = h.events.pop_front() else {
                    break;
                };
                h.bytes -= old.bytes();
                h.first = old.index + 1;
            }
            h.last = h.last.max(last);
        }
        self.grew.send_replace(last);
    }

    /// Forgets the history: the state was replaced as of index `last` (a snapshot installed, a
    /// backup restored), so no event before `last + 1` can be told.
    pub fn reset(&self, last: u64) {
        {
            let mut h = self.lock();
            h.events.clear();
            h.bytes = 0;
            h.first = last + 1;
            h.last = h.last.max(last);
        }
        self.grew.send_replace(last);
    }

    /// The oldest index the history covers (events before it are no longer kept).
    pub fn first(&self) -> u64 {
        self.lock().first
    }

    /// The last index applied here.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// Up to `max` events at index `from` or later that `filter` lets through.
    pub fn since(&self, from: u64, filter: &Filter, max: usize) -> Since {
        let h = self.lock();
        if from < h.first {
            return Since::Gone { first: h.first };
        }
        let start = h.events.partition_point(|e| e.index < from);
        let mut events = Vec::new();
        for e in h.events.range(start..) {
            if filter.admits(e) {
                if events.len() == max {
                    // Stopped early: the next look starts after the last event taken.
                    let upto = events
                        .last()
                        .map_or(from.saturating_sub(1), |e: &Arc<Event>| e.index);
                    return Since::Events { events, upto };
                }
                events.push(e.clone());
            }
        }
        Since::Events {
            events,
            upto: h.last.max(from.saturating_sub(1)),
        }
    }

    /// Marks the history closed (the node is stopping) and wakes every watcher.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.grew.send_modify(|_| {});
    }

    /// Whether [`Events::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A receiver told whenever the history grows, and when it closes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.grew.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: u64, service: &str, payload: usize) -> Event {
        Event {
            index,
            service: Arc::from(service),
            timestamp_ms: 1,
            payload: vec![0; payload],
            outcome: Outcome::Reply(b"ok".to_vec()),
            memo: Memo::default(),
        }
    }

    fn indexes(s: Since) -> Vec<u64> {
        match s {
            Since::Events { events, .. } => events.iter().map(|e| e.index).collect(),
            Since::Gone { first } => panic!("gone, first {first}"),
        }
    }

    #[test]
    fn history_is_bounded_filtered_and_reset() {
        let events = Events::new(HistoryLimits {
            events: 3,
            bytes: 1 << 20,
        });
        // The first record after a start: nothing before it was seen here.
        events.record(5..=7, vec![event(5, "a", 1), event(6, "b", 1)]);
        assert!(matches!(
            events.since(4, &Filter::default(), 10),
            Since::Gone { first: 5 }
        ));
        assert_eq!(indexes(events.since(5, &Filter::default(), 10)), vec![5, 6]);
        assert_eq!(indexes(events.since(5, &Filter::service("b"), 10)), vec![6]);
        events.record(8..=9, vec![event(8, "a", 1), event(9, "a", 1)]);
        // Four events over a bound of three: the oldest went.
        assert!(matches!(
            events.since(5, &Filter::default(), 10),
            Since::Gone { first: 6 }
        ));
        assert_eq!(
            indexes(events.since(6, &Filter::service("a"), 10)),
            vec![8, 9]
        );
        assert_eq!(indexes(events.since(7, &Filter::default(), 1)), vec![8]);
        assert!(matches!(
            events.since(7, &Filter::default(), 1),
            Since::Events { upto: 8, .. }
        ));
        // Nothing of service "b" after 7, but the look covered up to 9.
        assert!(matches!(
            events.since(7, &Filter::service("b"), 10),
            Since::Events { upto: 9, .. }
        ));
        assert_eq!(
            indexes(events.since(10, &Filter::default(), 10)),
            Vec::<u64>::new()
        );
        assert_eq!(events.last(), 9);
        events.reset(20);
        assert!(matches!(
            events.since(9, &Filter::default(), 10),
            Since::Gone { first: 21 }
        ));
        assert_eq!(
            indexes(events.since(21, &Filter::default(), 10)),
            Vec::<u64>::new()
        );

        // The byte budget bounds too.
        let events = Events::new(HistoryLimits {
            events: 100,
            bytes: 300,
        });
        events.record(1..=5, (1..=5).map(|i| event(i, "a", 100)).collect());
        assert!(matches!(
            events.since(1, &Filter::default(), 10),
            Since::Gone { .. }
        ));
        assert_eq!(indexes(events.since(5, &Filter::default(), 10)), vec![5]);
    }
}
