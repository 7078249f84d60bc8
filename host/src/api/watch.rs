//! `Watch`: a stream of what this node applied (commands with their outcomes, version
//! changes, timers delivered, events guests emitted; filtered by service and topic), from a start index inside the node's event history, then live. Bounded: at most
//! `ApiLimits::max_watches` streams, [`WATCH_BUFFER`] events ahead of a slow reader.

use super::{Api, convert};
use crate::auth::Role;
use crate::pb::api;
use crate::storage::events::{Filter, Since};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

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

impl Api {
    /// `Waft.Watch`: the events from the requested index on, then as they are applied.
    #[allow(clippy::result_large_err)]
    pub(super) fn open_watch(
        &self,
        request: GrpcRequest<api::WatchRequest>,
    ) -> Result<GrpcResponse<WatchStream>, Status> {
        self.authorize(&request, Role::Client)?;
        let req = request.into_inner();
        let Ok(permit) = self.watches.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "this node already serves {} watches, its limit; watch through another node or \
                 end a watch first",
                self.limits.max_watches
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
