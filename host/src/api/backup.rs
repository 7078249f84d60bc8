//! Backups and restores: `Cluster.Backup` streams a snapshot the leader takes now;
//! `Cluster.Restore` takes one back (checked on the leader, then proposed as one entry that
//! every replica applies).

use super::ApiLimits;
use super::router::{Caller, Router};
use crate::pb::api;
use crate::pb::upload::Upload;
use crate::storage::StateHandle;
use crate::types::{Request, Response, now_ms};
use std::sync::Arc;
use tonic::{Response as GrpcResponse, Status, Streaming};

pub(super) type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::BackupChunk, Status>> + Send>>;

fn backup_chunks(bytes: Vec<u8>, index: u64, force: bool) -> Vec<api::BackupChunk> {
    use api::backup_chunk::Kind;
    let header = api::BackupChunk {
        kind: Some(Kind::Header(api::BackupHeader {
            size: bytes.len() as u64,
            index,
            force,
        })),
    };
    std::iter::once(header)
        .chain(bytes.chunks(1 << 20).map(|c| api::BackupChunk {
            kind: Some(Kind::Data(c.to_vec())),
        }))
        .collect()
}

/// Builds the chunks of a backup upload (for `waft restore`).
pub fn restore_chunks(bytes: &[u8], force: bool) -> Vec<api::BackupChunk> {
    backup_chunks(bytes.to_vec(), 0, force)
}

/// Backups and restores on one node.
#[derive(Clone)]
pub(super) struct Backups {
    router: Router,
    state: StateHandle,
    limits: ApiLimits,
    /// Where this node's snapshots live (backups are read from there).
    snapshot_dir: std::path::PathBuf,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("snapshot_dir", &self.snapshot_dir)
            .finish_non_exhaustive()
    }
}

impl Backups {
    pub(super) fn new(
        router: Router,
        state: StateHandle,
        limits: ApiLimits,
        snapshot_dir: std::path::PathBuf,
    ) -> Backups {
        Backups {
            router,
            state,
            limits,
            snapshot_dir,
        }
    }

    /// Takes a snapshot now (this node leads) and returns its bytes and index.
    async fn take_backup(&self) -> Result<(Vec<u8>, u64), Status> {
        let applied = self.state.last_applied().map_or(0, |l| l.index);
        self.router
            .raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if self
                .router
                .metrics()
                .snapshot
                .is_some_and(|s| s.index >= applied)
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(
                    "the snapshot for the backup was not built within 120 s",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let path = self.snapshot_dir.join("current.snap");
        tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
            use std::io::Read;
            // Read through one open handle: a newer snapshot may replace the file meanwhile.
            let mut file = std::fs::File::open(&path)?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            let reader = crate::storage::snapshot::Reader::from_bytes(&bytes)?;
            let index = reader.header.meta.last_log_id.map_or(0, |l| l.index);
            drop(reader);
            Ok((bytes, index))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("reading the snapshot for the backup: {e}")))
    }

    /// `Cluster.Backup`: the leader snapshots now and streams the file.
    pub(super) async fn backup(
        &self,
        caller: &Caller,
    ) -> Result<GrpcResponse<BackupStream>, Status> {
        if let Some(leader) = self.router.leader(caller).await? {
            let upstream = leader
                .relay(api::BackupRequest {}, |mut c, r| async move {
                    c.cluster.backup(r).await
                })
                .await?
                .into_inner();
            return Ok(GrpcResponse::new(Box::pin(upstream)));
        }
        let (bytes, index) = self.take_backup().await?;
        let chunks = backup_chunks(bytes, index, false);
        Ok(GrpcResponse::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    /// `Cluster.Restore`: the backup is checked on the leader, then proposed as one entry.
    pub(super) async fn restore(
        &self,
        caller: &Caller,
        mut input: Streaming<api::BackupChunk>,
    ) -> Result<GrpcResponse<api::RestoreReply>, Status> {
        let upload = Upload {
            call: "restore",
            item: "backup",
            max: self.limits.max_backup_bytes as u64,
            chunk_timeout: None,
        };
        let (header, bytes) = upload.read(&mut input, |_| Ok(())).await?;
        if let Some(leader) = self.router.leader(caller).await? {
            let chunks = backup_chunks(bytes, header.index, header.force);
            return leader
                .relay(futures::stream::iter(chunks), |mut c, r| async move {
                    c.cluster.restore(r).await
                })
                .await;
        }
        // Validate before proposing: a backup that does not load never reaches the log.
        let bytes = Arc::new(bytes);
        self.state
            .check_backup(bytes.clone())
            .await
            .map_err(|e| Status::invalid_argument(format!("not a usable backup: {e}")))?;
        let bytes = Arc::try_unwrap(bytes).unwrap_or_else(|shared| shared.to_vec());
        let entry = Request::Restore {
            backup: bytes,
            force: header.force,
            timestamp_ms: now_ms(),
        };
        match self.router.write(entry, &Caller::local()).await? {
            Ok((index, Response::Restored(services))) => {
                Ok(GrpcResponse::new(api::RestoreReply { index, services }))
            }
            Ok((_, Response::DeployFailed(why))) => Err(Status::failed_precondition(why)),
            Ok((_, other)) => Err(Status::internal(format!(
                "unexpected response to a restore: {other:?}"
            ))),
            Err(_) => Err(Status::unavailable(
                "leadership moved during the restore; retry",
            )),
        }
    }
}
