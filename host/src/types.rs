//! The Raft vocabulary every layer above the runtime shares: the openraft type configuration,
//! what a log entry carries ([`Request`]), what applying one returns ([`Response`]), and the
//! leader clock. The `Raft` handle over our storage is [`crate::Raft`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// The leader clock: milliseconds since the Unix epoch on this node's clock, what an entry this
/// node proposes carries as its timestamp (the state machine never lets it go backwards).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A Raft node id.
pub type NodeId = u64;
/// A node's address book entry: its gRPC address (`host:port`).
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// waft's Raft types: entries carry a [`Request`], applying one yields a [`Response`].
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
);

/// Which client sent a command and its sequence number: the key for exactly-once retries.
/// A client numbers its commands 1, 2, 3, ...; a command whose sequence is not above the last
/// one applied for that client is not applied again, and gets the reply it got the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSeq {
    /// Chosen by the client, unique per client (a random 64-bit number does).
    pub client_id: u64,
    /// Increases by one per command of that client.
    pub seq: u64,
}

/// Resource limits one service runs under, set at deploy time and replicated with the deploy
/// (so every node applies the same ones). `None` keeps the node's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLimits {
    /// Fuel for one apply (and one query).
    pub fuel_per_apply: Option<u64>,
    /// Largest guest memory, in bytes.
    pub max_memory_bytes: Option<u64>,
}

impl ServiceLimits {
    /// The node's limits with these overrides applied.
    pub fn apply_to(&self, mut limits: crate::runtime::Limits) -> crate::runtime::Limits {
        if let Some(f) = self.fuel_per_apply {
            limits.fuel_per_apply = f;
            limits.fuel_per_query = f;
        }
        if let Some(m) = self.max_memory_bytes {
            limits.max_memory_bytes = usize::try_from(m).unwrap_or(usize::MAX);
        }
        limits
    }
}

/// What a log entry asks the state machine to do.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Apply `payload` to the guest serving `service`.
    Command {
        /// The service (named guest) the command is for.
        service: String,
        /// The command bytes, passed to the guest's `apply` as they are.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// For exactly-once retries; `None` applies unconditionally.
        client: Option<ClientSeq>,
        /// Milliseconds since the Unix epoch, from the leader's clock when it proposed the entry.
        /// The state machine never lets time go backwards: a guest sees the larger of this and
        /// the previous entry's time.
        timestamp_ms: u64,
    },
    /// Run `module` (a component's bytes) as `service`, replacing any module serving it.
    Deploy {
        /// The service name.
        service: String,
        /// The component bytes.
        #[serde(with = "serde_bytes")]
        module: Vec<u8>,
        /// The engine fingerprint of the leader that validated the module. A node whose own
        /// fingerprint differs refuses to apply the entry (and stops) rather than risk running
        /// the guest differently from its peers.
        engine: String,
        /// Limits for this service's guest.
        limits: ServiceLimits,
        /// As for commands.
        timestamp_ms: u64,
    },
    /// Make an earlier version of `service` serve it again, carrying the current state over.
    /// The module bytes are already on every node (kept with the version history), so the entry
    /// carries none.
    Rollback {
        /// The service name.
        service: String,
        /// The version to go back to; `None` means the version before the current one.
        to: Option<u32>,
        /// As for commands.
        timestamp_ms: u64,
    },
    /// Every replica records a digest of its replicated state as of this entry (the
    /// divergence check, first half). Changes nothing; the proposer gets its own digest back.
    Audit {
        /// As for commands.
        timestamp_ms: u64,
    },
    /// Written by earlier releases (still applied): the proposer's digest at an earlier
    /// [`Request::Audit`] entry (second half): every replica
    /// that recorded its own digest at that index compares the two and reports a mismatch
    /// loudly. Changes nothing.
    AuditReport {
        /// The proposer's digest.
        digest: StateDigest,
    },
    /// Replace the services (modules, versions, states) and exactly-once sessions with those of
    /// a backup (a snapshot file's bytes); the log position and membership stay this cluster's.
    Restore {
        /// The backup file's bytes (checksummed snapshot format).
        #[serde(with = "serde_bytes")]
        backup: Vec<u8>,
        /// Replace existing services; without it a cluster that runs any service refuses.
        force: bool,
        /// As for commands.
        timestamp_ms: u64,
    },
    // New variants go last: entries are postcard-encoded by variant index.
    /// Every voter's digest at an earlier [`Request::Audit`] entry, as the proposer collected
    /// them (second half of an audit; replaces [`Request::AuditReport`]). Every replica that
    /// recorded its own digest at that index compares it with the majority's: a replica in the
    /// minority for a service stops serving reads of it and rebuilds it from a replica in the
    /// majority (see `crate::storage::state_machine::heal`). Changes no replicated state on a
    /// replica that agrees with the majority.
    AuditVotes {
        /// The audit entry's index.
        index: u64,
        /// The node that collected the votes (the leader when it proposed this entry).
        proposer: NodeId,
        /// Each voter's digest at `index`, by node id; voters that did not answer in time are
        /// absent.
        votes: Vec<(NodeId, StateDigest)>,
    },
    /// A deploy the determinism verifier flagged, forced by the operator (`waft deploy --verify
    /// --force`): applied exactly as [`Request::Deploy`], and the findings are kept with the new
    /// version (`waft services` shows them).
    ForcedDeploy {
        /// As for [`Request::Deploy`].
        service: String,
        /// As for [`Request::Deploy`].
        #[serde(with = "serde_bytes")]
        module: Vec<u8>,
        /// As for [`Request::Deploy`].
        engine: String,
        /// As for [`Request::Deploy`].
        limits: ServiceLimits,
        /// As for [`Request::Deploy`].
        timestamp_ms: u64,
        /// What the verifier found, one finding per line.
        findings: String,
    },
    /// Run the module with sha256 `module` as `service`, replacing any module serving it. The
    /// entry carries the module's hash, not its bytes: every node keeps modules in its module
    /// store (`crate::storage::modules`), the leader proposes this once a majority of the
    /// voters holds the module, and a node that lacks it fetches it from a peer before it
    /// applies the entry. Otherwise as [`Request::Deploy`] (and [`Request::ForcedDeploy`] when
    /// `findings` is set), which earlier releases wrote with the bytes inline.
    DeployStored {
        /// The service name.
        service: String,
        /// sha256 of the component, hex.
        module: String,
        /// Its size in bytes.
        size: u64,
        /// As for [`Request::Deploy`].
        engine: String,
        /// As for [`Request::Deploy`].
        limits: ServiceLimits,
        /// As for [`Request::Deploy`].
        timestamp_ms: u64,
        /// For a forced deploy, what the determinism verifier found, one finding per line.
        findings: Option<String>,
    },
    /// Delivers the guest timers due by `timestamp_ms` on the log's clock, oldest first. Only
    /// read from logs of older builds: timers fall due by `FireDue` now (the leader's wall
    /// clock let leases end early when it ran ahead).
    FireTimers {
        /// The leader's clock.
        timestamp_ms: u64,
    },
    /// Delivers the named guest timers, in this order: those whose deadlines passed on the
    /// proposing leader's monotonic clock (see `crate::timers`). A timer no longer pending as
    /// the setting named is skipped.
    FireDue {
        /// The leader's wall clock (the entry's clock is moved up to the timers' due times).
        timestamp_ms: u64,
        /// The timers to deliver.
        timers: Vec<TimerRef>,
    },
    /// Raises the cluster version (see `crate::version`): from the next entry on, nodes may
    /// write the formats of every gate up to `version`. Proposed by the leader once every
    /// member runs a build that runs it (`crate::upgrade`). A replica whose build cannot run
    /// `version` stops rather than go on without reading what its peers will write; a lower
    /// or equal version changes nothing (the version never goes down).
    ClusterVersion {
        /// The new active cluster version.
        version: u32,
    },
}

/// One setting of one pending guest timer: what a [`Request::FireDue`] entry names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerRef {
    /// The service whose timer it is.
    pub service: String,
    /// The timer's key.
    pub key: String,
    /// The log index of the entry that set it (a timer set again since is another setting).
    pub set_index: u64,
}

/// A digest of the replicated state at one log index: what replicas compare to prove they hold
/// byte-identical state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    /// The index of the [`Request::Audit`] entry the digest was taken at.
    pub index: u64,
    /// One digest per service, in name order.
    pub services: Vec<ServiceDigest>,
    /// sha256 (hex) of the exactly-once session table.
    pub sessions: String,
}

/// One service's part of a [`StateDigest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDigest {
    /// Service name.
    pub name: String,
    /// Active version.
    pub version: u32,
    /// sha256 (hex) of the active module.
    pub module: String,
    /// sha256 (hex) of the guest's snapshot, or why the snapshot failed.
    pub state: String,
    /// Length of the guest's snapshot in bytes.
    pub state_len: u64,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Command {
                service,
                payload,
                client,
                timestamp_ms,
            } => f
                .debug_struct("Command")
                .field("service", service)
                .field("payload_len", &payload.len())
                .field("client", client)
                .field("timestamp_ms", timestamp_ms)
                .finish(),
            Request::Deploy {
                service, module, ..
            } => f
                .debug_struct("Deploy")
                .field("service", service)
                .field("module_len", &module.len())
                .finish(),
            Request::ForcedDeploy {
                service, module, ..
            } => f
                .debug_struct("ForcedDeploy")
                .field("service", service)
                .field("module_len", &module.len())
                .finish(),
            Request::DeployStored {
                service,
                module,
                size,
                ..
            } => f
                .debug_struct("DeployStored")
                .field("service", service)
                .field("module", module)
                .field("size", size)
                .finish(),
            Request::Rollback { service, to, .. } => f
                .debug_struct("Rollback")
                .field("service", service)
                .field("to", to)
                .finish(),
            Request::Audit { .. } => f.write_str("Audit"),
            Request::FireTimers { timestamp_ms } => f
                .debug_struct("FireTimers")
                .field("timestamp_ms", timestamp_ms)
                .finish(),
            Request::FireDue {
                timestamp_ms,
                timers,
            } => f
                .debug_struct("FireDue")
                .field("timestamp_ms", timestamp_ms)
                .field("timers", &timers.len())
                .finish(),
            Request::Restore { backup, force, .. } => f
                .debug_struct("Restore")
                .field("backup_len", &backup.len())
                .field("force", force)
                .finish(),
            Request::AuditReport { digest } => f
                .debug_struct("AuditReport")
                .field("index", &digest.index)
                .finish(),
            Request::ClusterVersion { version } => f
                .debug_struct("ClusterVersion")
                .field("version", version)
                .finish(),
            Request::AuditVotes {
                index,
                proposer,
                votes,
            } => f
                .debug_struct("AuditVotes")
                .field("index", index)
                .field("proposer", proposer)
                .field("voters", &votes.iter().map(|(n, _)| *n).collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The outcome of applying one entry: identical on every replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The guest's reply.
    Reply(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The guest rejected the command (its `err`); nothing changed.
    Rejected(String),
    /// The guest trapped; the host rolled the call back, nothing changed.
    Trapped(String),
    /// The command named a service that does not exist; nothing changed.
    NoSuchService(String),
    /// A deploy took effect: the service now runs the module with this sha256 (hex).
    Deployed {
        /// sha256 of the module, hex.
        module: String,
        /// The service's version number now active (1 for the first deploy; every deploy and
        /// rollback adds one).
        version: u32,
    },
    /// A deploy was refused (the module did not load or did not accept the state); nothing
    /// changed.
    DeployFailed(String),
    /// Entries with no payload (blank entries, membership changes, audit reports).
    #[default]
    Empty,
    /// An audit entry was applied: this replica's digest at it.
    Audited(StateDigest),
    /// A backup was restored: the services it brought.
    Restored(Vec<String>),
    /// A `FireDue` (or `FireTimers`) entry was applied: timers delivered, and those whose delivery failed.
    TimersFired {
        /// Delivered (`fire` answered `ok`).
        fired: u32,
        /// Dropped (a trap, `err`, effects refused).
        failed: u32,
    },
}

/// A log id (leader id + index).
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// The membership as stored by the state machine.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry types as they were before their byte fields were marked `serde_bytes`.
    #[derive(Serialize, Deserialize)]
    enum OldRequest {
        Command {
            service: String,
            payload: Vec<u8>,
            client: Option<ClientSeq>,
            timestamp_ms: u64,
        },
    }

    #[derive(Serialize, Deserialize)]
    enum OldResponse {
        Reply(Vec<u8>),
    }

    #[test]
    fn byte_fields_encode_as_before_so_old_logs_and_snapshots_read() {
        let payload: Vec<u8> = (0..=255u8).chain(0..40).collect();
        let client = Some(ClientSeq {
            client_id: 7,
            seq: 300,
        });
        let new = postcard::to_allocvec(&Request::Command {
            service: "kv".into(),
            payload: payload.clone(),
            client,
            timestamp_ms: 1_700_000_000_000,
        })
        .expect("encode");
        let old = postcard::to_allocvec(&OldRequest::Command {
            service: "kv".into(),
            payload: payload.clone(),
            client,
            timestamp_ms: 1_700_000_000_000,
        })
        .expect("encode");
        assert_eq!(new, old);
        let back: Request = postcard::from_bytes(&old).expect("an old entry decodes");
        assert!(matches!(back, Request::Command { payload: p, .. } if p == payload));
        let new = postcard::to_allocvec(&Response::Reply(payload.clone())).expect("encode");
        let old = postcard::to_allocvec(&OldResponse::Reply(payload.clone())).expect("encode");
        assert_eq!(new, old);
    }
}
