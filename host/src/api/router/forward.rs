//! Followers forward their clients' Submits to the leader in batches.
//!
//! A Submit that reaches a follower joins a queue per (leader address, caller token). One task
//! per queue sends what has queued up as one `SubmitBatch` call, with at most [`IN_FLIGHT`]
//! calls outstanding. Under light load a batch holds one command and costs what forwarding it
//! alone did; under load, the commands that arrive while calls are in flight travel together,
//! so the follower and the leader handle one HTTP/2 stream, and the leader's Raft core one
//! proposal message, per batch instead of per command.
//!
//! Batching changes nothing a client can observe: each command is proposed as it would have
//! been alone and gets the reply or the status its own forwarded Submit would have got.
//! Commands of one queue are proposed in the order they arrived. A batch call that fails in
//! the connection (the leader went away) fails each of its commands with UNAVAILABLE: their
//! outcome is unknown, and a retry with the same client session applies each at most once.

use super::{Caller, Router, relay_failure};
use crate::api::MAX_BATCH_COMMANDS as MAX_COMMANDS;
use crate::api::convert::from_result;
use crate::pb::api;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;
use tonic::metadata::AsciiMetadataValue;

/// Batch calls one queue may have outstanding.
const IN_FLIGHT: usize = 4;
/// A batch stops growing past this many payload bytes.
const MAX_BYTES: usize = 4 << 20;
/// Commands that may wait in one queue; senders wait beyond that.
const QUEUE: usize = 4096;
/// A queue whose leader has not been needed for this long is closed (the leader moved).
const IDLE: Duration = Duration::from_secs(30);

/// A forwarded command's reply and the id of the node that served it.
pub(super) type Forwarded = Result<(api::SubmitReply, Option<AsciiMetadataValue>), Status>;

struct Pending {
    command: api::SubmitRequest,
    request_id: Option<AsciiMetadataValue>,
    reply: oneshot::Sender<Forwarded>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    leader: String,
    token: Option<AsciiMetadataValue>,
}

/// The follower's queues, one per leader address and caller token.
#[derive(Default)]
pub(super) struct Forwarder {
    queues: Mutex<HashMap<Key, mpsc::Sender<Pending>>>,
}

impl Forwarder {
    /// Forwards `command` to the leader at `leader` with the caller's credentials and waits
    /// for its reply.
    pub(super) async fn submit(
        self: &Arc<Self>,
        router: &Router,
        leader: &str,
        caller: &Caller,
        command: api::SubmitRequest,
    ) -> Forwarded {
        let key = Key {
            leader: leader.to_owned(),
            token: caller.token.clone(),
        };
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending {
            command,
            request_id: caller.request_id.clone(),
            reply,
        };
        loop {
            let queue = self.queue(router, &key);
            match queue.send(pending).await {
                Ok(()) => break,
                // The queue closed as it went idle: open a new one.
                Err(mpsc::error::SendError(p)) => {
                    pending = p;
                    let mut queues = crate::sync::lock_anyway(&self.queues);
                    if queues.get(&key).is_some_and(|q| q.same_channel(&queue)) {
                        queues.remove(&key);
                    }
                }
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(Status::unavailable(
                "the node stopped while forwarding the command; retry",
            ))
        })
    }

    fn queue(self: &Arc<Self>, router: &Router, key: &Key) -> mpsc::Sender<Pending> {
        let mut queues = crate::sync::lock_anyway(&self.queues);
        if let Some(q) = queues.get(key) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        queues.insert(key.clone(), tx.clone());
        tokio::spawn(run(self.clone(), router.clone(), key.clone(), rx));
        tx
    }
}

/// One queue's task: takes what has queued up whenever a call slot is free, and sends it.
async fn run(forwarder: Arc<Forwarder>, router: Router, key: Key, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let first = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(_) => {
                // Idle: close the queue under the map's lock, so no sender can queue after the
                // last look; what slipped in before is still sent.
                let mut left = Vec::new();
                {
                    let mut queues = crate::sync::lock_anyway(&forwarder.queues);
                    rx.close();
                    while let Ok(p) = rx.try_recv() {
                        left.push(p);
                    }
                    queues.remove(&key);
                }
                for chunk in chunks(left) {
                    send(&router, &key, chunk).await;
                }
                return;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // While every slot was busy, more commands queued: they go together.
        let mut bytes = first.command.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_COMMANDS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.command.payload.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (router, key) = (router.clone(), key.clone());
        tokio::spawn(async move {
            send(&router, &key, batch).await;
            drop(slot);
        });
    }
}

fn chunks(mut all: Vec<Pending>) -> Vec<Vec<Pending>> {
    let mut out = Vec::new();
    while !all.is_empty() {
        let rest = all.split_off(all.len().min(MAX_COMMANDS));
        out.push(std::mem::replace(&mut all, rest));
    }
    out
}

/// One batch call; every command of `batch` gets its answer.
async fn send(router: &Router, key: &Key, batch: Vec<Pending>) {
    router.count_forwarded(batch.len());
    // A batch of one keeps its caller's request id on the leader; a larger batch gets one of
    // its own there, logged here next to each command's.
    let caller = Caller {
        token: key.token.clone(),
        request_id: match batch.as_slice() {
            [one] => one.request_id.clone(),
            _ => None,
        },
        // Each command waits for its own reply as long as its caller does; the batch carries
        // no deadline of its own.
        deadline: None,
        forwarded: false,
    };
    let (commands, waiting): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| (p.command, (p.request_id, p.reply)))
        .unzip();
    let n = commands.len();
    let call = async {
        router
            .waft_client(&key.leader)?
            .submit_batch({
                let mut req = tonic::Request::new(api::SubmitBatchRequest { commands });
                *req.metadata_mut() = router.mark(&caller);
                req
            })
            .await
    };
    let outcome = match call.await {
        Ok(reply) => {
            let served_by = reply.metadata().get(crate::api::trace::SERVED_BY).cloned();
            let batch_id = reply.metadata().get(crate::api::trace::REQUEST_ID).cloned();
            let results = reply.into_inner().results;
            if results.len() == n {
                if n > 1 {
                    for (id, _) in &waiting {
                        tracing::debug!(request_id = ?id, batch = ?batch_id, size = n, "forwarded in a batch");
                    }
                }
                Ok((results, served_by))
            } else {
                Err(Status::internal(format!(
                    "the leader at {} answered {} results for a batch of {n} commands",
                    key.leader,
                    results.len()
                )))
            }
        }
        Err(status) => Err(relay_failure(&key.leader, status)),
    };
    match outcome {
        Ok((results, served_by)) => {
            for ((_, reply), result) in waiting.into_iter().zip(results) {
                let _ = reply.send(from_result(result).map(|r| (r, served_by.clone())));
            }
        }
        Err(status) => {
            for (_, reply) in waiting {
                let _ = reply.send(Err(crate::pb::copy_status(&status)));
            }
        }
    }
}
