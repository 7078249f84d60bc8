//! An in-process cluster of real nodes on 127.0.0.1 ports, with real redb files in temp dirs.

use crate::support::init_tracing;
use openraft::BasicNode;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tempfile::TempDir;
use tokio::net::TcpListener;
use waft::node::{Node, NodeConfig, RaftSettings};
use waft::types::{NodeId, Request, Response};

/// Fast timings so tests elect and replicate quickly.
pub fn test_settings() -> RaftSettings {
    RaftSettings {
        heartbeat: Duration::from_millis(50),
        election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
        snapshot_every: 10_000,
        keep_after_snapshot: 1_000,
        keep_for_lagging: 200_000,
        audit_interval: None,
        remove_unreachable: None,
    }
}

/// The timeouts an operator would pick for a loaded machine (like etcd's defaults: heartbeat
/// 100 ms, election 1 s and up), for tests that must not see a leader change while other
/// tests load the same two cores.
pub fn loaded_settings() -> RaftSettings {
    RaftSettings {
        heartbeat: Duration::from_millis(150),
        election_timeout: (Duration::from_millis(1500), Duration::from_millis(3000)),
        ..test_settings()
    }
}

/// Nodes 0..n, each with its own data directory that outlives restarts.
pub struct TestCluster {
    pub nodes: Vec<Option<Node>>,
    pub dirs: Vec<TempDir>,
    pub addrs: Vec<String>,
    pub settings: RaftSettings,
    /// Applied to every node's configuration before it starts.
    pub configure: fn(&mut NodeConfig),
}

impl TestCluster {
    /// Starts `n` nodes (not yet a cluster: see [`TestCluster::form`]).
    pub async fn start(n: usize, settings: RaftSettings) -> TestCluster {
        Self::start_with(n, settings, |_| {}).await
    }

    /// Like [`TestCluster::start`], with `configure` applied to each node's configuration.
    pub async fn start_with(
        n: usize,
        settings: RaftSettings,
        configure: fn(&mut NodeConfig),
    ) -> TestCluster {
        init_tracing();
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            dirs: Vec::new(),
            addrs: Vec::new(),
            settings,
            configure,
        };
        for _ in 0..n {
            cluster.dirs.push(tempfile::tempdir().expect("tempdir"));
            cluster.nodes.push(None);
            cluster.addrs.push(String::new());
        }
        for i in 0..n {
            cluster.restart(i).await;
        }
        cluster
    }

    /// (Re)starts node `i` with its existing data directory, on its old address if it had one
    /// (the cluster's membership records it).
    pub async fn restart(&mut self, i: usize) {
        let addr = if self.addrs[i].is_empty() {
            "127.0.0.1:0"
        } else {
            self.addrs[i].as_str()
        };
        let listener = TcpListener::bind(addr).await.expect("bind");
        let mut config = NodeConfig::new(i as NodeId, self.dirs[i].path());
        config.raft = self.settings.clone();
        (self.configure)(&mut config);
        let node = Node::start(config, listener).await.expect("node starts");
        self.addrs[i] = node.addr().to_owned();
        self.nodes[i] = Some(node);
    }

    /// Stops node `i` (its data stays).
    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await.expect("clean shutdown");
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// Initializes node 0 alone, adds the others as learners, then makes everyone a voter.
    pub async fn form(&self) {
        let n0 = self.node(0);
        let mut members = BTreeMap::new();
        members.insert(
            0,
            BasicNode {
                addr: self.addrs[0].clone(),
            },
        );
        n0.initialize(members).await.expect("initialize");
        self.wait_leader().await;
        // Membership changes are refused while the initial membership is uncommitted.
        n0.raft()
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(1), "initial membership committed")
            .await
            .expect("initial membership committed");
        for i in 1..self.nodes.len() {
            let node = BasicNode {
                addr: self.addrs[i].clone(),
            };
            n0.raft()
                .add_learner(i as NodeId, node, true)
                .await
                .expect("add learner");
        }
        let voters: BTreeSet<NodeId> = (0..self.nodes.len() as NodeId).collect();
        n0.raft()
            .change_membership(voters, false)
            .await
            .expect("change membership");
    }

    /// Waits until some running node knows a leader, and returns the leader's index.
    pub async fn wait_leader(&self) -> usize {
        for _ in 0..200 {
            for node in self.nodes.iter().flatten() {
                let m = node.metrics();
                if let Some(l) = m.current_leader
                    && self.nodes.get(l as usize).is_some_and(|n| n.is_some())
                    && m.state.is_leader() == (l == node.id())
                {
                    let leader = self.node(l as usize);
                    if leader.metrics().state.is_leader() {
                        return l as usize;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected within 10 s");
    }

    /// Waits (up to 5 s) until node `target` leads, as after a leadership transfer to it.
    pub async fn wait_leader_is(&self, target: usize) {
        for _ in 0..100 {
            if self.wait_leader().await == target {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("leadership did not move to node {target}");
    }

    /// Proposes through the current leader, following leader changes, until it commits.
    pub async fn write(&self, request: Request) -> (u64, Response) {
        for _ in 0..100 {
            let leader = self.wait_leader().await;
            match self.node(leader).raft().client_write(request.clone()).await {
                Ok(resp) => return (resp.log_id.index, resp.data),
                Err(e) => {
                    tracing::info!(error = %e, "write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        panic!("write did not commit after 100 tries");
    }

    pub async fn deploy(&self, service: &str, module: Vec<u8>) -> u64 {
        let (index, resp) = self
            .write(Request::Deploy {
                service: service.to_owned(),
                module,
                engine: self
                    .nodes
                    .iter()
                    .flatten()
                    .next()
                    .expect("a running node")
                    .state()
                    .engine(),
                limits: Default::default(),
                timestamp_ms: 1,
            })
            .await;
        assert!(
            matches!(resp, Response::Deployed { .. }),
            "deploy failed: {resp:?}"
        );
        index
    }

    /// Waits until every running node has applied `index`.
    pub async fn wait_applied(&self, index: u64) {
        self.wait_applied_within(index, Duration::from_secs(30))
            .await;
    }

    /// Like [`TestCluster::wait_applied`], with a longer patience (entries that compile big
    /// modules on a busy machine).
    pub async fn wait_applied_within(&self, index: u64, patience: Duration) {
        for node in self.nodes.iter().flatten() {
            node.raft()
                .wait(Some(patience))
                .applied_index_at_least(Some(index), "test waits for apply")
                .await
                .unwrap_or_else(|e| panic!("node {} did not apply {index}: {e}", node.id()));
        }
    }

    /// Every running node's service states; asserts they are byte-identical and returns one.
    pub async fn assert_identical(&self) -> BTreeMap<String, Vec<u8>> {
        let mut first: Option<(NodeId, BTreeMap<String, Vec<u8>>)> = None;
        for node in self.nodes.iter().flatten() {
            let states = node.state().service_states().await.expect("states");
            match &first {
                None => first = Some((node.id(), states)),
                Some((id, f)) => assert!(f == &states, "node {} and node {id} differ", node.id()),
            }
        }
        first.expect("some node runs").1
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

/// A kv command entry.
pub fn kv(payload: impl Into<String>) -> Request {
    Request::Command {
        service: "kv".to_owned(),
        payload: payload.into().into_bytes(),
        client: None,
        timestamp_ms: 1,
    }
}
