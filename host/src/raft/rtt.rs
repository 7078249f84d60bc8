//! Round trips of the Raft messages this node sends as leader: from the moment a request goes
//! into a replication stream to its reply, heartbeats (no entries) apart from appends. Local
//! observations for `/metrics` (`waft_peer_round_trip_seconds`), like etcd's
//! `etcd_network_peer_round_trip_time_seconds`: how a deploy's compile or a big snapshot
//! weighs on Raft's own messages shows here first.
//!
//! A request whose stream is dropped before its reply (openraft gives a heartbeat one
//! heartbeat interval) counts with the time it waited: at least that long.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's clock (the system's outside tests), so that tests on a paused clock can time it.
use tokio::time::Instant;

/// Upper bounds of the histogram's buckets, seconds: 0.1 ms up to about 2.6 s in steps of
/// 1.5×, fine enough that a percentile read from it is within a step of the truth.
pub const RTT_BUCKETS_S: [f64; 26] = {
    let mut b = [0.0; 26];
    let mut i = 0;
    let mut v = 0.0001;
    while i < 26 {
        b[i] = v;
        v *= 1.5;
        i += 1;
    }
    b
};

/// One histogram: counts per bucket of [`RTT_BUCKETS_S`] and overflow, and the sum.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; RTT_BUCKETS_S.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = RTT_BUCKETS_S
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(RTT_BUCKETS_S.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn read(&self) -> RttHistogram {
        RttHistogram {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram as read.
#[derive(Debug, Clone, PartialEq)]
pub struct RttHistogram {
    /// Counts per bucket of [`RTT_BUCKETS_S`] (not cumulative), then overflow.
    pub buckets: [u64; RTT_BUCKETS_S.len() + 1],
    /// Sum of the round trips, seconds.
    pub sum_seconds: f64,
}

/// Round trips of heartbeats and of appends, over every peer.
#[derive(Debug, Default)]
pub struct PeerRtt {
    heartbeats: Histogram,
    appends: Histogram,
}

impl PeerRtt {
    /// Heartbeats (requests without entries), then appends.
    pub fn read(&self) -> (RttHistogram, RttHistogram) {
        (self.heartbeats.read(), self.appends.read())
    }

    fn observe(&self, heartbeat: bool, d: Duration) {
        if heartbeat {
            self.heartbeats.observe(d)
        } else {
            self.appends.observe(d)
        }
    }
}

/// The requests of one replication stream still waiting for their replies, in order (a
/// stream answers its requests in the order they were sent).
#[derive(Debug)]
pub struct InFlight {
    rtt: Arc<PeerRtt>,
    sent: Mutex<VecDeque<(Instant, bool)>>,
}

impl InFlight {
    /// Tracks a stream's requests into `rtt`.
    pub fn new(rtt: Arc<PeerRtt>) -> InFlight {
        InFlight {
            rtt,
            sent: Mutex::new(VecDeque::new()),
        }
    }

    /// A request (a heartbeat if it carries no entries) goes out.
    pub fn sent(&self, heartbeat: bool) {
        crate::sync::lock_anyway(&self.sent).push_back((Instant::now(), heartbeat));
    }

    /// When the newest request awaiting its reply went out; `None` when none awaits one.
    pub fn newest(&self) -> Option<Instant> {
        crate::sync::lock_anyway(&self.sent)
            .back()
            .map(|(at, _)| *at)
    }

    /// The oldest request's reply came.
    pub fn replied(&self) {
        if let Some((at, heartbeat)) = crate::sync::lock_anyway(&self.sent).pop_front() {
            self.rtt.observe(heartbeat, at.elapsed());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for (at, heartbeat) in crate::sync::lock_anyway(&self.sent).drain(..) {
            self.rtt.observe(heartbeat, at.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_timed_in_order_and_unanswered_requests_at_drop() {
        let rtt = Arc::new(PeerRtt::default());
        let flight = InFlight::new(rtt.clone());
        flight.sent(true);
        flight.sent(false);
        flight.replied();
        let (hb, ap) = rtt.read();
        assert_eq!(hb.buckets.iter().sum::<u64>(), 1);
        assert_eq!(ap.buckets.iter().sum::<u64>(), 0);
        drop(flight);
        let (_, ap) = rtt.read();
        assert_eq!(
            ap.buckets.iter().sum::<u64>(),
            1,
            "the unanswered append counts"
        );
        // A reply with nothing in flight (a stray) changes nothing.
        let flight = InFlight::new(rtt.clone());
        flight.replied();
        assert_eq!(rtt.read().0.buckets.iter().sum::<u64>(), 1);
    }

    #[test]
    fn buckets_grow_by_half_from_a_tenth_of_a_millisecond() {
        assert!((RTT_BUCKETS_S[0] - 0.0001).abs() < 1e-12);
        assert!(
            RTT_BUCKETS_S
                .windows(2)
                .all(|w| (w[1] / w[0] - 1.5).abs() < 1e-9)
        );
        assert!(RTT_BUCKETS_S[RTT_BUCKETS_S.len() - 1] > 2.0);
        let h = Histogram::default();
        h.observe(Duration::from_micros(120));
        h.observe(Duration::from_secs(10));
        let r = h.read();
        assert_eq!(r.buckets[1], 1);
        assert_eq!(r.buckets[RTT_BUCKETS_S.len()], 1);
    }
}
