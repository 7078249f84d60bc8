//! [`Watch`]: a `Watch` stream that resumes after the last event seen when its connection
//! breaks or its node stops.

use crate::Error;
use crate::pool::{Pool, retryable, waft};
use crate::proto;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// An applied command, version change, delivered timer or event a guest emitted, as `Watch`
/// reports it.
pub type Event = proto::WatchEvent;

type Events = Pin<Box<dyn Stream<Item = Result<Event, Error>> + Send>>;

/// The events of a service (or of all), in log order, each once. When the stream breaks (the
/// node stopped, the connection dropped), it opens again on a node the client finds, after the
/// last event it delivered (an entry can have several events: a command and the events its
/// guest emitted, several timers; every replica records the same ones in the same order, so
/// those already delivered are skipped); it ends with an error only when that fails for
/// good (every attempt, or the events are no longer kept: [`Error::OutOfRange`]).
pub struct Watch {
    inner: Events,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

struct State {
    client: Arc<Pool>,
    service: String,
    /// Guest events only, with this topic prefix (`None`: every event).
    topic_prefix: Option<String>,
    /// The index to ask for when (re)opening: 0 for "from now", else the next one wanted.
    next: u64,
    /// Events at `next` already delivered (skipped when the watch opens again).
    seen_at_next: usize,
    /// Events at `next` the current stream sent so far.
    sent_at_next: usize,
    open: Option<tonic::Streaming<Event>>,
    failures: u32,
    done: bool,
}

impl Watch {
    pub(crate) fn new(
        client: Arc<Pool>,
        service: String,
        topic_prefix: Option<String>,
        from: u64,
    ) -> Watch {
        let state = State {
            client,
            service,
            topic_prefix,
            next: from,
            seen_at_next: 0,
            sent_at_next: 0,
            open: None,
            failures: 0,
            done: false,
        };
        Watch {
            inner: futures::stream::unfold(state, step).boxed(),
        }
    }
}

async fn step(mut s: State) -> Option<(Result<Event, Error>, State)> {
    loop {
        if s.done {
            return None;
        }
        if s.open.is_none() {
            match open(&s).await {
                Ok(stream) => {
                    s.open = Some(stream);
                    s.sent_at_next = 0;
                }
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
            }
        }
        let stream = s.open.as_mut().expect("opened above");
        let failure = match stream.message().await {
            Ok(Some(event)) => {
                s.failures = 0;
                if event.index == s.next && s.next != 0 {
                    s.sent_at_next += 1;
                    if s.sent_at_next <= s.seen_at_next {
                        continue; // delivered before the watch broke
                    }
                } else {
                    s.next = event.index;
                    s.sent_at_next = 1;
                }
                s.seen_at_next = s.sent_at_next;
                return Some((Ok(event), s));
            }
            Ok(None) => Error::Unavailable("the node ended the watch".to_owned()),
            Err(status) if retryable(&status) => Error::from(status),
            Err(status) => {
                s.done = true;
                return Some((Err(status.into()), s));
            }
        };
        // Broken: open again after the last event delivered.
        s.open = None;
        s.failures += 1;
        if s.failures >= s.client.attempts() {
            s.done = true;
            return Some((Err(failure), s));
        }
        tracing::info!(error = %failure, next = s.next, "waft watch broke; resuming");
        s.client.reconnect().await;
        tokio::time::sleep(Duration::from_millis(100 << s.failures.min(4))).await;
    }
}

async fn open(s: &State) -> Result<tonic::Streaming<Event>, Error> {
    let request = proto::WatchRequest {
        service: s.service.clone(),
        start_index: s.next,
        topic_prefix: s.topic_prefix.clone().unwrap_or_default(),
        guest_events: s.topic_prefix.is_some(),
    };
    let stream = s
        .client
        .retrying(|c| {
            let r = request.clone();
            async move { waft(c).watch(r).await }
        })
        .await?;
    Ok(stream.into_inner())
}

impl Stream for Watch {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}
