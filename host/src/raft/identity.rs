//! Who a Raft message is for: every node-to-node RPC names the cluster it belongs to and the
//! node it is meant for, and a node refuses messages for another cluster or another node.
//!
//! Without this, an address that changes hands (a node replaced by another with a new id, a
//! pod IP reused by another cluster, a port reused on a test machine) lets a leader append its
//! entries to a stranger's log, which then diverges from its own cluster silently. etcd checks
//! a cluster id on every peer request for the same reason.
//!
//! The cluster id is 128 random bits, created by the node that initializes the cluster and
//! kept in `cluster-id` in its data directory. Other nodes adopt it from the first Raft message
//! they receive (a new member learns it from the leader that adds it) and keep it from then
//! on. A node that has none (data from an older waft) accepts any cluster until it learns one.
//!
//! A node with no cluster id and an empty log is new, or it is a member that lost its data
//! (a wiped disk, a replaced volume) and came back at its address with its id. It cannot tell
//! which; its peers can. A leader stamps the index it last knew a follower to hold
//! ([`MATCHED_HEADER`]), and a candidate's vote request names its last log index. An empty
//! node refuses both: taking the leader's entries would contradict what it acknowledged
//! before (openraft's leader stops on that), and voting would count a member that no longer
//! holds what it promised to keep. It is refused until it is removed and added back.

use crate::types::{NodeId, TypeConfig};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

/// gRPC metadata naming the sender's cluster.
pub const CLUSTER_HEADER: &str = "waft-cluster-id";
/// gRPC metadata naming the node a message is meant for.
pub const TARGET_HEADER: &str = "waft-target-node";
/// gRPC metadata on a leader's messages: the last log index the target acknowledged holding.
pub const MATCHED_HEADER: &str = "waft-matched-index";
const FILE: &str = "cluster-id";

/// This node's identity: its id and (once known) its cluster's.
pub struct Identity {
    node: NodeId,
    file: PathBuf,
    cluster: Mutex<Option<String>>,
    /// The cluster token (see [`crate::auth`]): sent with, and required on, Raft messages.
    tokens: crate::auth::Tokens,
    /// This node's Raft metrics, once Raft runs: its own log state, and (as leader) what each
    /// follower acknowledged.
    metrics: OnceLock<MetricsWatch>,
    /// Messages refused because this node lost its data (to log only some of them).
    refusals: std::sync::atomic::AtomicU64,
}

type MetricsWatch = openraft::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>;

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("cluster", &self.cluster())
            .finish_non_exhaustive()
    }
}

/// What an incoming Raft message asks of this node, for [`Identity::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A vote or pre-vote from a candidate whose log ends at this index.
    Vote {
        /// The candidate's last log index.
        candidate_last: Option<u64>,
    },
    /// Entries, heartbeats or a snapshot from a leader.
    Replication,
    /// A leader handing over its leadership.
    TransferLeader,
    /// A state audit's digest collection, or a diverged member asking for state: reads only.
    Audit,
}

fn valid(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Identity {
    /// Loads the identity of node `node` from `data_dir` (no cluster id yet if the file is
    /// missing). A damaged file is an error: guessing could join the wrong cluster.
    pub fn load(node: NodeId, data_dir: &std::path::Path) -> io::Result<Identity> {
        let file = data_dir.join(FILE);
        let cluster = match std::fs::read_to_string(&file) {
            Ok(text) => {
                let id = text.trim().to_owned();
                if !valid(&id) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} does not hold a cluster id: {text:?}", file.display()),
                    ));
                }
                Some(id)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Identity {
            node,
            file,
            cluster: Mutex::new(cluster),
            tokens: crate::auth::Tokens::default(),
            metrics: OnceLock::new(),
            refusals: Default::default(),
        })
    }

    /// Follows this node's Raft metrics (set once, when Raft starts).
    pub fn watch(&self, metrics: MetricsWatch) {
        let _ = self.metrics.set(metrics);
    }

    /// As leader, the last log index node `target` acknowledged holding, if it did.
    fn matched(&self, target: NodeId) -> Option<u64> {
        use openraft::async_runtime::WatchReceiver;
        let metrics = self.metrics.get()?.borrow_watched();
        let index = metrics.replication.as_ref()?.get(&target)?.as_ref()?.index;
        Some(index)
    }

    /// Whether this node's Raft log is known to be empty: no entries, no snapshot.
    fn empty(&self) -> bool {
        use openraft::async_runtime::WatchReceiver;
        self.metrics.get().is_some_and(|m| {
            let m = m.borrow_watched();
            m.last_log_index.is_none() && m.snapshot.is_none() && m.purged.is_none()
        })
    }

    /// Sends `token` with every Raft message and requires it on incoming ones.
    pub fn with_cluster_token(mut self, token: Option<String>) -> Identity {
        self.tokens.cluster = token;
        self
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The cluster id, once known.
    pub fn cluster(&self) -> Option<String> {
        crate::sync::lock_anyway(&self.cluster).clone()
    }

    /// Gives this node a new cluster id, for a node about to initialize a new cluster (whose
    /// Raft state is empty). An id it adopted from a stranger's message before is replaced:
    /// initializing means starting a cluster of its own. Returns the id.
    pub fn create(&self) -> io::Result<String> {
        let mut cluster = crate::sync::lock_anyway(&self.cluster);
        // Two independently seeded std hashers: 128 bits from the OS's randomness.
        let half = || {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        let id = format!("{:016x}{:016x}", half(), half());
        self.persist(&id)?;
        *cluster = Some(id.clone());
        Ok(id)
    }

    fn persist(&self, id: &str) -> io::Result<()> {
        let tmp = self.file.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)?;
        if let Some(dir) = self.file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Adds this node's cluster id and the target node to an outgoing request.
    pub fn stamp(&self, metadata: &mut MetadataMap, target: NodeId) {
        metadata.insert(TARGET_HEADER, MetadataValue::from(target));
        if let Some(token) = &self.tokens.cluster
            && let Ok(v) = crate::auth::bearer(token)
        {
            metadata.insert(crate::auth::HEADER, v);
        }
        if let Some(id) = self.cluster()
            && let Ok(v) = id.parse()
        {
            metadata.insert(CLUSTER_HEADER, v);
        }
        if let Some(index) = self.matched(target) {
            metadata.insert(MATCHED_HEADER, MetadataValue::from(index));
        }
    }

    /// Checks an incoming Raft request: it must be meant for this node and come from this
    /// node's cluster (adopting the sender's cluster if this node has none yet, unless the
    /// message shows this node lost its data: see the module documentation).
    #[allow(clippy::result_large_err)]
    pub fn admit(&self, metadata: &MetadataMap, message: Message) -> Result<(), Status> {
        self.tokens.check_peer(metadata)?;
        if let Some(target) = metadata.get(TARGET_HEADER) {
            let target = target.to_str().ok().and_then(|t| t.parse::<NodeId>().ok());
            if target != Some(self.node) {
                return Err(Status::failed_precondition(format!(
                    "this is node {}, not node {}: the address the sender has for that node now \
                     belongs to another node; refusing the Raft message",
                    self.node,
                    target.map_or("(unreadable)".to_owned(), |t| t.to_string())
                )));
            }
        }
        let theirs = match metadata.get(CLUSTER_HEADER) {
            None => None,
            Some(theirs) => {
                let theirs = theirs.to_str().unwrap_or("").to_owned();
                if !valid(&theirs) {
                    return Err(Status::invalid_argument(format!(
                        "malformed cluster id {theirs:?} in a Raft message"
                    )));
                }
                Some(theirs)
            }
        };
        let mut cluster = crate::sync::lock_anyway(&self.cluster);
        if cluster.is_none() {
            self.check_not_lost(metadata, message)?;
        }
        let Some(theirs) = theirs else {
            return Ok(());
        };
        match cluster.as_ref() {
            Some(ours) if *ours == theirs => Ok(()),
            Some(ours) => Err(Status::failed_precondition(format!(
                "node {} belongs to cluster {ours}, the Raft message came from cluster {theirs}; \
                 refusing it (an address was reused by another cluster?)",
                self.node
            ))),
            None => {
                self.persist(&theirs).map_err(|e| {
                    Status::unavailable(format!("cannot record the cluster id: {e}"))
                })?;
                tracing::info!(cluster = %theirs, "this node joined a cluster");
                *cluster = Some(theirs);
                Ok(())
            }
        }
    }

    /// Refuses a message that shows this node, which has no cluster id and an empty log, was
    /// a member before and lost its data.
    #[allow(clippy::result_large_err)]
    fn check_not_lost(&self, metadata: &MetadataMap, message: Message) -> Result<(), Status> {
        if !self.empty() {
            // Data from before cluster ids: it adopts the first cluster it hears from.
            return Ok(());
        }
        let matched = metadata
            .get(MATCHED_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let evidence = match message {
            // Index 0 is the initial membership: a cluster's first election asks every initial
            // member, all of them empty but the one that initialized it.
            Message::Vote {
                candidate_last: Some(last),
            } if last > 0 => format!("a candidate's log reaches index {last}"),
            Message::Vote { .. } => return Ok(()),
            Message::Replication => match matched {
                Some(index) => {
                    format!("the leader had it acknowledged as holding the log up to index {index}")
                }
                None => return Ok(()),
            },
            Message::TransferLeader => "the leader asked it to take over".to_owned(),
            Message::Audit => return Ok(()),
        };
        let node = self.node;
        let why = format!(
            "node {node} holds no Raft log and belongs to no cluster, but {evidence}: its data \
             directory was lost or replaced. A member that lost its data must not vote or take \
             entries as if it were new; remove node {node} from the cluster (waft cluster remove \
             {node}) and add it back (waft node --join), and it will copy the log again"
        );
        // Said once, then every 64th refusal (the leader retries about twice a second).
        if self
            .refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(64)
        {
            tracing::warn!("{why}");
        }
        Err(Status::failed_precondition(why))
    }
}
