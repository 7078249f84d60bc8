//! The calling side of a `Session` stream (`waft.v1.Waft/Session`): commands go out in order
//! and each request's reply is matched to it by position, since the server answers requests
//! in the order it received them. Shared by the CLI's clients and by followers, which relay
//! their clients' sessions to the leader over a session of their own.

use crate::proto as api;
use futures::FutureExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Response, Status, Streaming};

/// The requests a session sends, as the stream its call takes.
pub type Requests = UnboundedReceiverStream<api::SessionRequest>;

type Waiting = oneshot::Sender<Result<api::SessionReply, Status>>;

struct State {
    requests: mpsc::UnboundedSender<api::SessionRequest>,
    /// One per request sent and not yet answered, oldest first.
    waiting: VecDeque<Waiting>,
    /// Why the session ended, once it has: every later request fails with it.
    broken: Option<Status>,
}

/// An open session. Clones share it; dropping the last clone ends the request stream, and the
/// server then answers what it has and closes.
#[derive(Clone)]
pub struct Pipe {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl Pipe {
    /// Opens a session with `call`, which makes the `Session` call with the request stream it
    /// is given (and any metadata the caller wants on it).
    pub async fn open<F, Fut>(call: F) -> Result<Pipe, Status>
    where
        F: FnOnce(Requests) -> Fut,
        Fut: Future<Output = Result<Response<Streaming<api::SessionReply>>, Status>>,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let replies = call(UnboundedReceiverStream::new(rx)).await?.into_inner();
        let pipe = Pipe {
            state: Arc::new(Mutex::new(State {
                requests: tx,
                waiting: VecDeque::new(),
                broken: None,
            })),
        };
        tokio::spawn(read_replies(Arc::downgrade(&pipe.state), replies));
        Ok(pipe)
    }

    /// Sends `request`; the future is its reply, or the status that ended the session before
    /// the reply came (then the outcome of its commands is unknown).
    pub fn send(
        &self,
        request: api::SessionRequest,
    ) -> impl Future<Output = Result<api::SessionReply, Status>> + Send + 'static {
        let answer = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match &state.broken {
                Some(why) => Err(crate::copy_status(why)),
                None => {
                    let (tx, rx) = oneshot::channel();
                    if state.requests.send(request).is_err() {
                        Err(Status::unavailable("the session has closed"))
                    } else {
                        state.waiting.push_back(tx);
                        Ok(rx)
                    }
                }
            }
        };
        async move {
            answer?.await.unwrap_or_else(|_| {
                Err(Status::unavailable(
                    "the session closed before the reply came",
                ))
            })
        }
        .boxed()
    }

    /// Whether the session has ended (every send fails).
    pub fn is_broken(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .broken
            .is_some()
    }

    /// Requests sent and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .len()
    }
}

/// Hands each reply to the oldest request waiting; when the stream ends, fails every request
/// still waiting (and every later one) with the reason.
async fn read_replies(
    state: std::sync::Weak<Mutex<State>>,
    mut replies: Streaming<api::SessionReply>,
) {
    let why = loop {
        let next = replies.message().await;
        let Some(state) = state.upgrade() else { return };
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        match next {
            Ok(Some(reply)) => match state.waiting.pop_front() {
                Some(waiting) => {
                    let _ = waiting.send(Ok(reply));
                }
                None => break Status::internal("the server sent a reply to no request"),
            },
            Ok(None) if state.waiting.is_empty() => {
                break Status::unavailable("the server ended the session");
            }
            Ok(None) => {
                break Status::unavailable(
                    "the server ended the session with requests unanswered; their outcome is \
                     unknown: retry them (with their client sessions, each applies once)",
                );
            }
            Err(status) => break status,
        }
    };
    if let Some(state) = state.upgrade() {
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        for waiting in state.waiting.drain(..) {
            let _ = waiting.send(Err(crate::copy_status(&why)));
        }
        state.broken = Some(why);
    }
}
