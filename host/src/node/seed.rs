//! Seeding an empty data directory from a backup, offline (`waft restore --data-dir`).

use super::{Node, NodeConfig, NodeError};
use crate::storage::LogEngine;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

impl Node {
    /// Seeds an empty data directory with a backup, offline: the directory becomes node
    /// `config.id` of a new one-node cluster (with its own cluster id) whose member address is
    /// `advertise`, and whose state is the backup's, in a snapshot. Start a node on that
    /// directory (`waft node --data-dir`) and add others with `--join`: they receive the state
    /// by snapshot. Returns the restore entry's index and the services restored.
    ///
    /// Refuses a directory that already holds a node's log, and a backup that does not verify
    /// or load (checksums, modules, every service accepting its state), before writing anything
    /// lasting.
    pub async fn seed_from_backup(
        mut config: NodeConfig,
        advertise: String,
        backup: Vec<u8>,
    ) -> Result<(u64, Vec<String>), NodeError> {
        use crate::types::{Request, Response};
        let dir = config.data_dir.clone();
        let log = config.log_engine.unwrap_or_default().path(&dir);
        if LogEngine::found_in(&dir)?.is_some() {
            return Err(NodeError::Restore(format!(
                "{} already holds a node's data; seed an empty directory, or restore into the \
                 running cluster with `waft restore FILE`",
                config.data_dir.display()
            )));
        }
        crate::storage::snapshot::Reader::from_bytes(&backup)
            .map_err(|e| NodeError::Restore(format!("not a usable backup: {e}")))?;
        config.advertise = Some(advertise.clone());
        config.raft.audit_interval = None;
        config.raft.remove_unreachable = None;
        config.metrics_listen = None;
        config.etcd_listen = None;
        // Nothing dials this node while it is seeded; it listens on a port of its own only
        // because a node always serves.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let node = Node::start(config, listener).await?;
        let seeded = async {
            let backup = Arc::new(backup);
            node.state()
                .check_backup(backup.clone())
                .await
                .map_err(|e| NodeError::Restore(format!("not a usable backup: {e}")))?;
            node.initialize(
                [(node.id(), openraft::BasicNode { addr: advertise })]
                    .into_iter()
                    .collect(),
            )
            .await?;
            node.raft()
                .wait(Some(Duration::from_secs(30)))
                .state(openraft::ServerState::Leader, "the seeded node leads")
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let backup = Arc::try_unwrap(backup).unwrap_or_else(|shared| shared.to_vec());
            let written = node
                .raft()
                .client_write(Request::Restore {
                    backup,
                    force: false,
                    timestamp_ms: crate::types::now_ms(),
                })
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let index = written.log_id.index;
            let services = match written.data {
                Response::Restored(services) => services,
                Response::DeployFailed(why) => return Err(NodeError::Restore(why)),
                other => {
                    return Err(NodeError::Restore(format!(
                        "unexpected response to a restore: {other:?}"
                    )));
                }
            };
            // In a snapshot, so nodes that join get the state in one transfer, not a replay.
            node.raft()
                .trigger()
                .snapshot()
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            node.raft()
                .wait(Some(Duration::from_secs(600)))
                .metrics(
                    |m| m.snapshot.is_some_and(|s| s.index >= index),
                    "the restored state is in a snapshot",
                )
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            Ok((index, services))
        }
        .await;
        let stopped = node.shutdown().await;
        if seeded.is_err() {
            // Leave no half-seeded node behind: a retry starts afresh.
            let _ = std::fs::remove_file(&log);
            let _ = std::fs::remove_file(dir.join("cluster-id"));
            let _ = std::fs::remove_dir_all(dir.join("snapshots"));
        }
        let seeded = seeded?;
        stopped?;
        Ok(seeded)
    }
}
