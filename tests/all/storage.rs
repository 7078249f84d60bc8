//! The redb log store and the state machine store: openraft's conformance suite, reopening,
//! and a crash during heavy writes.

use crate::support::init_tracing;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use tempfile::TempDir;
use waft::raft::types::TypeConfig;
use waft::runtime::{Runtime, RuntimeConfig};
use waft::storage::{LogStore, StateMachineStore};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("log.redb")).expect("open log");
        let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let sm =
            StateMachineStore::new(runtime, &dir.path().join("snapshots")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite_passes() {
    init_tracing();
    Suite::test_all(Builder)
        .await
        .expect("openraft's storage suite");
}
