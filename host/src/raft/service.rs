//! The Raft network, server side: the gRPC service peers call.

use super::identity::Message;
use crate::pb::{self, raft::raft_server, raft::snapshot_chunk::Kind};
use crate::storage::snapshot;
use crate::storage::{SnapshotFile, state_machine::Snapshot};
use crate::types::{SnapshotMeta, TypeConfig, Vote};
use futures::{Stream, StreamExt};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::Raft;

/// Limits on incoming snapshots.
#[derive(Debug, Clone)]
pub struct SnapshotLimits {
    /// Largest snapshot accepted, in bytes.
    pub max_bytes: u64,
    /// Longest wait for the next chunk before the transfer is abandoned.
    pub chunk_timeout: Duration,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits {
            max_bytes: 8 << 30,
            chunk_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves Raft RPCs from peers into the local [`Raft`].
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    identity: Arc<super::Identity>,
    incoming_dir: PathBuf,
    limits: SnapshotLimits,
    require_peer_certificate: bool,
    share_compiled: bool,
    /// This node's guest memory budget (`--max-guest-memory`), checked when it is asked to
    /// hold a module for a service.
    max_guest_memory: Option<u64>,
    /// The state audits and heals read (`None`: those RPCs answer UNAVAILABLE).
    state: Option<crate::storage::StateHandle>,
    /// Records messages for compatibility fixtures (nothing, but with `--record-messages`).
    recorder: Arc<super::record::Recorder>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// A service feeding `raft`; incoming snapshots are written under `incoming_dir`. Messages
    /// for another node or from another cluster than `identity`'s are refused.
    pub fn new(
        raft: Raft,
        identity: Arc<super::Identity>,
        incoming_dir: PathBuf,
        limits: SnapshotLimits,
    ) -> RaftService {
        RaftService {
            raft,
            identity,
            incoming_dir,
            limits,
            require_peer_certificate: false,
            share_compiled: false,
            max_guest_memory: None,
            state: None,
            recorder: Arc::default(),
        }
    }

    /// Records the messages this node receives and answers into `dir` (see
    /// [`super::record`]).
    pub fn record_messages(mut self, dir: Option<PathBuf>) -> RaftService {
        self.recorder = Arc::new(super::record::Recorder::new(dir));
        self
    }

    /// Answers audit digest and heal requests from this state.
    pub fn with_state(mut self, state: crate::storage::StateHandle) -> RaftService {
        self.state = Some(state);
        self
    }

    fn state(&self) -> Result<&crate::storage::StateHandle, Status> {
        self.state
            .as_ref()
            .ok_or_else(|| Status::unavailable("this node serves no state audits"))
    }

    /// Serves this node's compiled code to the members that ask (`waft node
    /// --share-compiled`).
    pub fn share_compiled(mut self, share: bool) -> RaftService {
        self.share_compiled = share;
        self
    }

    /// Checks this budget (bytes) when asked to hold a module for a service.
    pub fn max_guest_memory(mut self, budget: Option<u64>) -> RaftService {
        self.max_guest_memory = budget;
        self
    }

    /// Refuses Raft messages that come over a connection without a client certificate (which
    /// the TLS handshake has checked against the cluster CA): mutual TLS between nodes.
    pub fn require_peer_certificate(mut self, required: bool) -> RaftService {
        self.require_peer_certificate = required;
        self
    }

    /// The checks every Raft message passes before openraft sees it: the peer's certificate
    /// (under mutual TLS), then the cluster token, cluster id and target node id.
    fn admit<T>(&self, request: &Request<T>, message: Message) -> Result<(), Status> {
        if self.require_peer_certificate && !crate::tls::has_peer_certificate(request) {
            return Err(Status::unauthenticated(
                "Raft messages need mutual TLS: connect with a certificate signed by the cluster CA",
            ));
        }
        self.identity.admit(request.metadata(), message)
    }

    /// `FetchModule` for compiled code: this node's file, with its size in the response's
    /// [`ARTIFACT_SIZE_HEADER`].
    fn fetch_compiled(
        &self,
        state: &crate::storage::StateHandle,
        sha256: &str,
        key: &str,
    ) -> Result<Response<ModuleStream>, Status> {
        if !self.share_compiled {
            return Err(Status::failed_precondition(
                "this node does not share compiled code (waft node --share-compiled)",
            ));
        }
        let path = state
            .compiled_code(sha256, key)
            .map_err(Status::not_found)?;
        let file = std::fs::File::open(&path).map_err(|e| Status::not_found(e.to_string()))?;
        let size = file.metadata().map_err(internal)?.len();
        let mut response = Response::new(file_chunks(file));
        response
            .metadata_mut()
            .insert(ARTIFACT_SIZE_HEADER, size.into());
        Ok(response)
    }

    async fn receive_snapshot(
        &self,
        mut input: Streaming<pb::raft::SnapshotChunk>,
    ) -> Result<pb::raft::RaftMessage, Status> {
        let timeout = self.limits.chunk_timeout;
        let header = match next_chunk(&mut input, timeout).await?.and_then(|c| c.kind) {
            Some(Kind::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "a snapshot stream must start with its header",
                ));
            }
        };
        let (vote, meta): (Vote, SnapshotMeta) = pb::decode(&pb::raft::RaftMessage {
            format: header.format,
            payload: header.vote_and_meta,
        })?;
        if header.size > self.limits.max_bytes {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {} bytes is over this node's {}-byte limit",
                header.size, self.limits.max_bytes
            )));
        }
        tokio::fs::create_dir_all(&self.incoming_dir)
            .await
            .map_err(internal)?;
        let path = self
            .incoming_dir
            .join(format!("incoming-{}.snap", unique()));
        let guard = RemoveOnDrop(Some(path.clone()));
        let mut file = tokio::fs::File::create(&path).await.map_err(internal)?;
        let mut received: u64 = 0;
        while let Some(chunk) = next_chunk(&mut input, timeout).await? {
            let Some(Kind::Data(data)) = chunk.kind else {
                return Err(Status::invalid_argument(
                    "a snapshot header may only come first",
                ));
            };
            received += data.len() as u64;
            if received > header.size {
                return Err(Status::invalid_argument(format!(
                    "snapshot stream is longer than the {} bytes its header announced",
                    header.size
                )));
            }
            file.write_all(&data).await.map_err(internal)?;
        }
        if received != header.size {
            return Err(Status::invalid_argument(format!(
                "snapshot stream ended after {received} of {} bytes",
                header.size
            )));
        }
        file.sync_all().await.map_err(internal)?;
        drop(file);
        let verify_path = path.clone();
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<SnapshotFile> {
            let mut f = SnapshotFile::open(&verify_path)?;
            snapshot::verify(&mut f.file)?;
            Ok(f)
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::data_loss(format!("received snapshot is corrupt: {e}")))?;
        tracing::info!(last = ?meta.last_log_id, "snapshot received from the leader");
        let response = self
            .raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: opened,
                },
            )
            .await
            .map_err(|e| Status::unavailable(format!("cannot install the snapshot: {e}")))?;
        // Installed: the state machine has moved the file into place (or kept the old one).
        std::mem::forget(guard);
        let _ = tokio::fs::remove_file(&path).await;
        pb::encode(&response)
    }
}

/// The next chunk, or an error when none comes within `timeout` (a stalled sender).
async fn next_chunk<T>(input: &mut Streaming<T>, timeout: Duration) -> Result<Option<T>, Status> {
    match tokio::time::timeout(timeout, input.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no snapshot chunk for {timeout:?}; transfer abandoned"
        ))),
        Ok(r) => r,
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes a partly received snapshot when the transfer fails.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

type AppendStream =
    Pin<Box<dyn Stream<Item = Result<pb::raft::RaftMessage, Status>> + Send + 'static>>;

type ModuleStream =
    Pin<Box<dyn Stream<Item = Result<pb::raft::ModuleChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn vote(
        &self,
        request: Request<pb::raft::RaftMessage>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        let req: VoteRequest<TypeConfig> = pb::decode(request.get_ref())?;
        let candidate_last = req.last_log_id.map(|l| l.index);
        self.admit(&request, Message::Vote { candidate_last })?;
        self.recorder.record("vote-request", request.get_ref());
        let resp = self
            .raft
            .vote(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let reply = pb::encode(&resp)?;
        self.recorder.record("vote-reply", &reply);
        Ok(Response::new(reply))
    }

    async fn pre_vote(
        &self,
        request: Request<pb::raft::RaftMessage>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        let req: VoteRequest<TypeConfig> = pb::decode(request.get_ref())?;
        let candidate_last = req.last_log_id.map(|l| l.index);
        self.admit(&request, Message::Vote { candidate_last })?;
        self.recorder.record("pre-vote-request", request.get_ref());
        let resp = self
            .raft
            .pre_vote(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let reply = pb::encode(&resp)?;
        self.recorder.record("pre-vote-reply", &reply);
        Ok(Response::new(reply))
    }

    type AppendStream = AppendStream;

    async fn append(
        &self,
        request: Request<Streaming<pb::raft::RaftMessage>>,
    ) -> Result<Response<AppendStream>, Status> {
        self.admit(&request, Message::Replication)?;
        // Decoding failures end the request stream and are reported as the final status of the
        // reply stream: never dropped silently.
        let failure: Arc<Mutex<Option<Status>>> = Arc::default();
        let record = failure.clone();
        let (recorder, replies_recorder) = (self.recorder.clone(), self.recorder.clone());
        let requests = request
            .into_inner()
            .map(move |item| {
                let decoded = item.and_then(|msg| {
                    let req = pb::decode::<AppendEntriesRequest<TypeConfig>>(&msg)?;
                    if !req.entries.is_empty() {
                        recorder.record("append-request", &msg);
                    }
                    Ok(req)
                });
                match decoded {
                    Ok(req) => Some(req),
                    Err(status) => {
                        if status.code() != tonic::Code::Cancelled {
                            tracing::warn!(error = %status, "bad append stream from a peer");
                        }
                        *crate::sync::lock_anyway(&record) = Some(status);
                        None
                    }
                }
            })
            .take_while(|r| futures::future::ready(r.is_some()))
            .filter_map(futures::future::ready);
        let replies = self
            .raft
            .stream_append(requests)
            .map(move |result| match result {
                Ok(r) => pb::encode(&r).inspect(|m| replies_recorder.record("append-reply", m)),
                Err(fatal) => Err(Status::unavailable(format!("this node stopped: {fatal}"))),
            });
        let tail = futures::stream::once(async move { crate::sync::lock_anyway(&failure).take() })
            .filter_map(|s| futures::future::ready(s.map(Err)));
        Ok(Response::new(Box::pin(replies.chain(tail))))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::raft::SnapshotChunk>>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        self.admit(&request, Message::Replication)?;
        let reply = self.receive_snapshot(request.into_inner()).await;
        if let Err(e) = &reply {
            tracing::warn!(error = %e, "snapshot transfer refused");
        }
        reply.map(Response::new)
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::raft::RaftMessage>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        self.admit(&request, Message::TransferLeader)?;
        let req: TransferLeaderRequest<TypeConfig> = pb::decode(request.get_ref())?;
        self.recorder
            .record("transfer-leader-request", request.get_ref());
        let resp = self
            .raft
            .handle_transfer_leader(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::encode(&resp)?))
    }

    async fn digest(
        &self,
        request: Request<pb::raft::RaftMessage>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        self.admit(&request, Message::Audit)?;
        let index: u64 = pb::decode(request.get_ref())?;
        self.recorder.record("digest-request", request.get_ref());
        let state = self.state()?.clone();
        // The state machine's lock can be held by an apply batch: not on an async worker.
        let reply = tokio::task::spawn_blocking(move || state.digest_at(index))
            .await
            .map_err(internal)?;
        let reply = pb::encode(&reply)?;
        self.recorder.record("digest-reply", &reply);
        Ok(Response::new(reply))
    }

    async fn prepare_module(
        &self,
        request: Request<Streaming<pb::raft::ModuleChunk>>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        self.admit(&request, Message::Replication)?;
        let state = self.state()?.clone();
        let mut input = request.into_inner();
        let upload = pb::upload::Upload {
            call: "module",
            item: "module",
            max: state.max_module_bytes() as u64,
            chunk_timeout: Some(self.limits.chunk_timeout),
        };
        let (header, module) = upload.read(&mut input, |_| Ok(())).await?;
        let started = std::time::Instant::now();
        let prepared = state
            .prepare_module(module, header.sha256)
            .await
            .map(|()| started.elapsed().as_millis() as u64);
        Ok(Response::new(pb::encode(&prepared)?))
    }

    type FetchModuleStream = ModuleStream;

    async fn fetch_module(
        &self,
        request: Request<pb::raft::FetchModuleRequest>,
    ) -> Result<Response<ModuleStream>, Status> {
        self.admit(&request, Message::Audit)?;
        let state = self.state()?.clone();
        let req = request.into_inner();
        let hash = crate::runtime::ModuleHash::from_hex(&req.sha256).ok_or_else(|| {
            Status::invalid_argument(format!("{:?} is not a module hash", req.sha256))
        })?;
        if !req.compiled_for.is_empty() {
            return self.fetch_compiled(&state, &req.sha256, &req.compiled_for);
        }
        let file = state.modules().reader(&hash, req.offset).map_err(|e| {
            Status::not_found(format!("this node does not hold module {hash}: {e}"))
        })?;
        Ok(Response::new(file_chunks(file)))
    }

    async fn hold_module(
        &self,
        request: Request<pb::raft::HoldModuleRequest>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        self.admit(&request, Message::Replication)?;
        let state = self.state()?.clone();
        self.recorder
            .record("hold-module-request", request.get_ref());
        let req = request.into_inner();
        if req.size > state.max_module_bytes() as u64 {
            let refused: Result<u64, String> = Err(format!(
                "the module is {} bytes, over this node's {}-byte limit",
                req.size,
                state.max_module_bytes()
            ));
            return Ok(Response::new(pb::encode(&refused)?));
        }
        let sources: Vec<(crate::types::NodeId, String)> =
            req.sources.into_iter().map(|s| (s.node, s.addr)).collect();
        let timeout = Duration::from_millis(req.timeout_ms.max(1));
        let started = std::time::Instant::now();
        let held = state
            .hold_module(&req.sha256, &sources, tokio::time::Instant::now() + timeout)
            .await;
        if let (Ok(code_bytes), Some(reserve), Some(budget)) =
            (&held, &req.reserve, self.max_guest_memory)
        {
            let module = crate::runtime::ModuleHash::from_hex(&req.sha256)
                .ok_or_else(|| Status::invalid_argument("a module hash that is not one"))?;
            crate::budget::check_change(
                &state,
                &reserve.service,
                reserve.memory_limit,
                module,
                *code_bytes,
                Some(budget),
            )
            .map_err(Status::resource_exhausted)?;
        }
        let held = held.map(|_| started.elapsed().as_millis() as u64);
        let reply = pb::encode(&held)?;
        self.recorder.record("hold-module-reply", &reply);
        Ok(Response::new(reply))
    }

    async fn heal_state(
        &self,
        request: Request<pb::raft::RaftMessage>,
    ) -> Result<Response<pb::raft::RaftMessage>, Status> {
        self.admit(&request, Message::Audit)?;
        let req: crate::storage::HealRequest = pb::decode(request.get_ref())?;
        self.recorder.record("heal-request", request.get_ref());
        let state = self.state()?.clone();
        // Copying a service's history can take a while for a big state: off the async threads.
        let reply = tokio::task::spawn_blocking(move || state.heal_source(&req))
            .await
            .map_err(internal)?;
        let reply = pb::encode(&reply)?;
        self.recorder.record("heal-reply", &reply);
        Ok(Response::new(reply))
    }
}

/// The response header of a `FetchModule` for compiled code: the file's size in bytes.
pub const ARTIFACT_SIZE_HEADER: &str = "waft-artifact-size";

/// A file as a stream of `data` chunks, one chunk read ahead at most: the peer's pace (HTTP/2
/// flow control) sets ours.
fn file_chunks(file: std::fs::File) -> ModuleStream {
    use tokio::io::AsyncReadExt;
    let chunks =
        futures::stream::try_unfold(tokio::fs::File::from_std(file), |mut file| async move {
            let mut buf = Vec::with_capacity(crate::storage::modules::CHUNK_BYTES);
            while buf.len() < crate::storage::modules::CHUNK_BYTES {
                let n = (&mut file)
                    .take((crate::storage::modules::CHUNK_BYTES - buf.len()) as u64)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(internal)?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok(None);
            }
            let chunk = pb::raft::ModuleChunk {
                kind: Some(pb::raft::module_chunk::Kind::Data(buf)),
            };
            Ok(Some((chunk, file)))
        });
    Box::pin(chunks)
}
