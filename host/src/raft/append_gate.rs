//! Coalescing appends to a follower, the way Nagle's algorithm coalesces small TCP segments.
//!
//! openraft builds a replication stream's next `AppendEntries` request when the stream asks
//! for it, from every entry the leader's log holds by then (and the commit index it knows).
//! Asked as fast as the transport can take requests, it sends one request per proposal, and
//! one more for each commit index that moved: under many small concurrent writes, a follower
//! gets several small appends per round, each a message, a log write and an fsync of its own,
//! and an acknowledgement back.
//!
//! The gate lets a stream ask for its next request only when no request of it awaits its
//! reply, or when the last one went out at least `hold` ago. Entries proposed while a request
//! is in flight then travel together in the next one, with the commit index, as soon as the
//! follower answers. `hold` bounds what an entry can wait for that: on a link whose round trip
//! is longer, requests go out at least every `hold`, pipelined as before. A backlog (a
//! follower catching up) goes out in full requests either way. Zero turns the gate off.

use super::rtt::InFlight;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// One replication stream's gate (see the module docs), over the stream's record of the
/// requests awaiting replies (which also times them for `/metrics`).
#[derive(Debug)]
pub struct AppendGate {
    hold: Duration,
    requests: InFlight,
    replied: Notify,
}

impl AppendGate {
    /// A gate that holds a request back at most `hold` (zero: never), keeping `requests`.
    pub fn new(hold: Duration, requests: InFlight) -> AppendGate {
        AppendGate {
            hold,
            requests,
            replied: Notify::new(),
        }
    }

    /// Returns once the stream may build its next request: nothing in flight, or the last
    /// request sent `hold` ago.
    pub async fn ready(&self) {
        if self.hold.is_zero() {
            return;
        }
        loop {
            let replied = self.replied.notified();
            tokio::pin!(replied);
            // Registered before looking, so that a reply in between still wakes this.
            replied.as_mut().enable();
            let Some(sent) = self.requests.newest() else {
                return;
            };
            let deadline = sent + self.hold;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = &mut replied => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// A request (a heartbeat if it carries no entries) went out.
    pub fn sent(&self, heartbeat: bool) {
        self.requests.sent(heartbeat);
    }

    /// The reply to the oldest request in flight came.
    pub fn replied(&self) {
        self.requests.replied();
        self.replied.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn gate(hold: Duration) -> AppendGate {
        AppendGate::new(
            hold,
            InFlight::new(Arc::new(super::super::rtt::PeerRtt::default())),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_reply_or_the_hold_whichever_comes_first() {
        let gate = Arc::new(gate(Duration::from_millis(5)));
        // Nothing in flight: at once.
        gate.ready().await;
        gate.sent(false);
        // One in flight: held until its reply.
        let start = Instant::now();
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move {
                gate.ready().await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        gate.replied();
        let at = waiting.await.expect("joins");
        assert_eq!(
            at - start,
            Duration::from_millis(2),
            "released by the reply"
        );
        // In flight with no reply: released after the hold, counted from the send.
        gate.ready().await;
        gate.sent(false);
        let start = Instant::now();
        gate.ready().await;
        assert_eq!(
            Instant::now() - start,
            Duration::from_millis(5),
            "released by the hold"
        );
        // A reply to nothing in flight changes nothing.
        gate.replied();
        gate.replied();
        gate.replied();
        gate.ready().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_hold_never_waits() {
        let gate = gate(Duration::ZERO);
        gate.sent(false);
        gate.sent(false);
        let start = Instant::now();
        gate.ready().await;
        assert_eq!(Instant::now(), start);
    }
}
