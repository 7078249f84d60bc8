//! The steps of a deploy or rollback as they happen, for `Waft.DeployWatched` and
//! `Waft.RollbackWatched`: where the leader's deploy code tells them ([`Steps`]), and the
//! caller's stream they reach, the reply (or the error) last.

use crate::pb::api;
use tonic::Status;

/// What the watched calls answer: the steps, then the reply or the error.
pub(super) type DeployProgressStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::DeployProgress, Status>> + Send>>;

type Sender = tokio::sync::mpsc::UnboundedSender<Result<api::DeployProgress, Status>>;

/// Where a deploy or rollback tells its steps: a watched call's stream, or nowhere.
#[derive(Clone, Default)]
pub(super) struct Steps(Option<Sender>);

impl Steps {
    /// Tells a step of `kind`, filled in by `fill`.
    pub(super) fn tell(
        &self,
        kind: api::deploy_step::Kind,
        fill: impl FnOnce(&mut api::DeployStep),
    ) {
        if let Some(tx) = &self.0 {
            let mut step = api::DeployStep {
                kind: kind as i32,
                ..Default::default()
            };
            fill(&mut step);
            let _ = tx.send(Ok(api::DeployProgress {
                kind: Some(api::deploy_progress::Kind::Step(step)),
            }));
        }
    }
}

/// Runs `work` in a task of its own, its steps and then its reply sent to the stream returned:
/// a caller that goes away stops hearing of the work, not the work.
pub(super) fn watched<F, Fut>(work: F) -> DeployProgressStream
where
    F: FnOnce(Steps) -> Fut,
    Fut: Future<Output = Result<api::DeployReply, Status>> + Send + 'static,
{
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let done = work(Steps(Some(tx.clone())));
    tokio::spawn(async move {
        let reply = done.await;
        let _ = tx.send(reply.map(|reply| api::DeployProgress {
            kind: Some(api::deploy_progress::Kind::Done(reply)),
        }));
    });
    Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).fuse())
}
