//! `Watch`: a stream of what this node applied (commands with their outcomes, version
//! changes, timers delivered, events guests emitted; filtered by service and topic), from a
//! start index inside the node's event history, then live. Bounded: at most
//! `ApiLimits::max_watches` streams, [`WATCH_BUFFER`] events ahead of a slow reader. A watch
//! is served where it lands: it needs no leader.

use super::{ApiLimits, convert};
use crate::pb::api;
use crate::storage::StateHandle;
use crate::storage::events::{Filter, Since};
use std::sync::Arc;
use tonic::{Response as GrpcResponse, Status};

pub(super) type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::WatchEvent, Status>> + Send>>;

/// Events a watch sends ahead of its client before it waits for the client to read.
const WATCH_BUFFER: usize = 256;

/// A watch asked for events the node's history no longer holds.
fn history_gone(from: u64, first: u64) -> Status {
    Status::out_of_range(format!(
        "events from index {from} are no longer kept on this node (its history starts at index \
         {first}; it starts afresh when the node restarts or installs a snapshot): read the \
         current state with a query, then watch from index {first} or from now"
    ))
}

/// The watches of one node.
#[derive(Clone)]
pub(super) struct Watches {
    state: StateHandle,
    /// Open `Watch` streams, at most `max`.
    open: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl std::fmt::Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Watches {
    pub(super) fn new(state: StateHandle, limits: &ApiLimits) -> Watches {
        Watches {
            state,
            open: Arc::new(tokio::sync::Semaphore::new(limits.max_watches)),
            max: limits.max_watches,
        }
    }

    /// `Waft.Watch`: the events from the requested index on, then as they are applied.
    #[allow(clippy::result_large_err)]
    pub(super) fn open(&self, req: api::WatchRequest) -> Result<GrpcResponse<WatchStream>, Status> {
        let Ok(permit) = self.open.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "this node already serves {} watches, its limit; watch through another node or \
                 end a watch first",
                self.max
            )));
        };
        let filter = Filter {
            service: req.service.clone(),
            topic_prefix: match (req.topic_prefix.is_empty(), req.guest_events) {
                (true, false) => None,
                _ => Some(req.topic_prefix.clone()),
            },
        };
        let events = self.state.events();
        let start = match req.start_index {
            0 => events.last() + 1,
            i => i,
        };
        if let Since::Gone { first } = events.since(start, &filter, 0) {
            return Err(history_gone(start, first));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            let _permit = permit;
            let mut grew = events.subscribe();
            let mut next = start;
            loop {
                grew.borrow_and_update();
                match events.since(next, &filter, WATCH_BUFFER) {
                    Since::Gone { first } => {
                        let _ = tx.send(Err(history_gone(next, first))).await;
                        return;
                    }
                    Since::Events {
                        events: found,
                        upto,
                    } => {
                        let more = found.len() == WATCH_BUFFER;
                        for e in found {
                            if tx.send(Ok(convert::watch_event(&e))).await.is_err() {
                                return;
                            }
                        }
                        next = next.max(upto + 1);
                        if more {
                            continue;
                        }
                    }
                }
                if events.is_closed() {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the node is stopping; watch another node from index {next}"
                        ))))
                        .await;
                    return;
                }
                tokio::select! {
                    changed = grew.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
