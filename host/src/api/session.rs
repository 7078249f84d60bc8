//! `Session`: a client's commands pipelined on one stream.
//!
//! One task per stream reads requests as they come, without waiting for earlier ones to be
//! applied, and proposes what has arrived together: the requests that are already readable
//! when one arrives form a group (up to [`GROUP_COMMANDS`] commands), proposed in one message
//! to Raft like a `SubmitBatch`. Replies go out in the order the requests came. At most
//! [`MAX_OUTSTANDING`] commands are read and not answered; beyond that the task stops reading,
//! and HTTP/2 flow control holds the client back.
//!
//! On a follower, the groups travel to the leader over one session of the follower's own
//! ([`crate::pb::session::Pipe`], marked as forwarded), so they stay in order and share one
//! HTTP/2 stream; a new one is opened when the leader changes. Every failure, of a command or
//! of the way to the leader, is a failure result of the commands it concerns: the stream
//! itself ends only when the client ends it, or with an error status when a request does not
//! decode (the requests read before it may then go unanswered: their outcome is unknown).

use super::router::{Caller, Leader, relay_failure};
use super::{Data, MAX_BATCH_COMMANDS, convert};
use crate::pb::session::Pipe;
use crate::pb::{api, copy_status};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response as GrpcResponse, Status, Streaming};

/// Commands read from one stream and not yet answered.
const MAX_OUTSTANDING: usize = 4096;
/// The most commands proposed together.
const GROUP_COMMANDS: usize = MAX_BATCH_COMMANDS;
/// A group stops growing past this many payload bytes.
const GROUP_BYTES: usize = 4 << 20;

pub(super) type SessionStream = ReceiverStream<Result<api::SessionReply, Status>>;

/// The session a follower holds to the leader for one client session.
struct Upstream {
    leader: String,
    pipe: Pipe,
}

impl Data {
    /// `Waft.Session`: serves `input` until the client ends it.
    pub(super) fn open_session(
        &self,
        caller: Caller,
        input: Streaming<api::SessionRequest>,
    ) -> GrpcResponse<SessionStream> {
        let (tx, rx) = mpsc::channel(64);
        let data = self.clone();
        tokio::spawn(async move { data.serve_session(caller, input, tx).await });
        GrpcResponse::new(ReceiverStream::new(rx))
    }

    async fn serve_session(
        self,
        caller: Caller,
        mut input: Streaming<api::SessionRequest>,
        replies: mpsc::Sender<Result<api::SessionReply, Status>>,
    ) {
        let mut answers: FuturesOrdered<BoxFuture<'static, Vec<api::SessionReply>>> =
            FuturesOrdered::new();
        let mut outstanding = 0usize;
        let mut open = true;
        let mut upstream: Option<Upstream> = None;
        loop {
            tokio::select! {
                biased;
                Some(answered) = answers.next(), if !answers.is_empty() => {
                    for reply in answered {
                        outstanding -= reply.results.len();
                        if replies.send(Ok(reply)).await.is_err() {
                            return; // The client went away.
                        }
                    }
                }
                read = input.message(), if open && outstanding < MAX_OUTSTANDING => {
                    let first = match read {
                        Ok(Some(first)) => first,
                        Ok(None) => {
                            open = false;
                            continue;
                        }
                        // A request that does not decode (or the client's side broke): the
                        // stream ends with that status; what was read before is not answered.
                        Err(status) => {
                            let _ = replies.send(Err(status)).await;
                            return;
                        }
                    };
                    let mut n = first.commands.len();
                    let mut bytes = payload_bytes(&first);
                    let mut group = vec![first];
                    // What is readable already joins this group.
                    while n < GROUP_COMMANDS
                        && bytes < GROUP_BYTES
                        && outstanding + n < MAX_OUTSTANDING
                    {
                        match input.message().now_or_never() {
                            Some(Ok(Some(next))) => {
                                n += next.commands.len();
                                bytes += payload_bytes(&next);
                                group.push(next);
                            }
                            Some(Ok(None)) => {
                                open = false;
                                break;
                            }
                            Some(Err(status)) => {
                                let _ = replies.send(Err(status)).await;
                                return;
                            }
                            None => break,
                        }
                    }
                    outstanding += n;
                    answers.push_back(self.answer(group, &caller, &mut upstream).await);
                }
                else => return,
            }
        }
    }

    /// Proposes a group of requests (here, or through the leader) and returns the future of
    /// their replies, one per request.
    async fn answer(
        &self,
        group: Vec<api::SessionRequest>,
        caller: &Caller,
        upstream: &mut Option<Upstream>,
    ) -> BoxFuture<'static, Vec<api::SessionReply>> {
        // A request over a batch's limits fails as a SubmitBatch of it would, on its own.
        let mut counts = Vec::with_capacity(group.len());
        let mut refused: Vec<Option<Status>> = Vec::with_capacity(group.len());
        let mut commands = Vec::new();
        for request in group {
            let over = self.batch_limits(&request.commands).err();
            counts.push(request.commands.len());
            if over.is_none() {
                commands.extend(request.commands);
            }
            refused.push(over);
        }
        let proposed = commands.len();
        let results: BoxFuture<'static, Vec<api::SubmitResult>> = if commands.is_empty() {
            futures::future::ready(Vec::new()).boxed()
        } else {
            match self.router.leader(caller).await {
                Err(status) => failed(proposed, &status),
                Ok(None) => match self.propose_here(commands).await {
                    Ok(results) => results,
                    Err(status) => failed(proposed, &status),
                },
                Ok(Some(leader)) => self.relay_group(leader, commands, upstream).await,
            }
        };
        async move {
            let mut results = results.await.into_iter();
            counts
                .into_iter()
                .zip(refused)
                .map(|(n, refused)| api::SessionReply {
                    results: match refused {
                        Some(status) => (0..n)
                            .map(|_| convert::to_result(Err(copy_status(&status))))
                            .collect(),
                        None => results.by_ref().take(n).collect(),
                    },
                })
                .collect()
        }
        .boxed()
    }

    /// Sends `commands` to the leader over this session's own session with it (opened, or
    /// opened again when the leader changed or the last one broke).
    async fn relay_group(
        &self,
        leader: Leader,
        commands: Vec<api::SubmitRequest>,
        upstream: &mut Option<Upstream>,
    ) -> BoxFuture<'static, Vec<api::SubmitResult>> {
        let n = commands.len();
        let addr = leader.addr().to_owned();
        let reusable = upstream
            .as_ref()
            .is_some_and(|u| u.leader == addr && !u.pipe.is_broken());
        if !reusable {
            let opened = Pipe::open(|requests| {
                leader.relay(requests, |mut c, r| async move { c.waft.session(r).await })
            })
            .await;
            match opened {
                Ok(pipe) => {
                    *upstream = Some(Upstream {
                        leader: addr.clone(),
                        pipe,
                    })
                }
                Err(status) => return failed(n, &status),
            }
        }
        let pipe = &upstream.as_ref().expect("opened above").pipe;
        self.router.count_forwarded(n);
        let reply = pipe.send(api::SessionRequest { commands });
        async move {
            match reply.await {
                Ok(reply) if reply.results.len() == n => reply.results,
                Ok(reply) => {
                    failed(
                        n,
                        &Status::internal(format!(
                            "the leader at {addr} answered {} results for {n} commands",
                            reply.results.len()
                        )),
                    )
                    .await
                }
                Err(status) => failed(n, &relay_failure(&addr, status)).await,
            }
        }
        .boxed()
    }
}

fn payload_bytes(request: &api::SessionRequest) -> usize {
    request.commands.iter().map(|c| c.payload.len()).sum()
}

/// `n` results that each fail with `status`.
fn failed(n: usize, status: &Status) -> BoxFuture<'static, Vec<api::SubmitResult>> {
    let results = (0..n)
        .map(|_| convert::to_result(Err(copy_status(status))))
        .collect();
    futures::future::ready(results).boxed()
}
