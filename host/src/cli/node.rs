//! `waft node` (one node) and `waft dev` (a local cluster in one process).

use super::connect::Connector;
use crate::node::join::Joined;
use crate::node::{Node, NodeConfig};
use crate::pb::api::{self, waft_client::WaftClient};
use anyhow::{Context, bail};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpListener;

/// Arguments of `waft node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This node's id: a number unique in the cluster.
    #[arg(long, env = "WAFT_NODE_ID")]
    pub id: u64,
    /// Address to listen on for peers and clients.
    #[arg(long, env = "WAFT_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: String,
    /// Address others use to reach this node (default: the listen address).
    #[arg(long, env = "WAFT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where the log, snapshots and compiled modules live.
    #[arg(long, env = "WAFT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Join the cluster that the node at this address belongs to: become a learner, catch up,
    /// then become a voter. Not needed when restarting a node that is already a member. A
    /// comma-separated list of seeds, and host names that resolve to several addresses (a
    /// Kubernetes headless service), are tried in turn until one knows a leader (for up to a
    /// minute: members may still be starting). `mdns:NAME` stands for the nodes announcing
    /// cluster NAME on the local network (see --mdns).
    #[arg(long, env = "WAFT_JOIN", value_name = "HOST:PORT|mdns:NAME[,...]")]
    pub join: Option<String>,
    /// Build a snapshot (and compact the log) after this many entries.
    #[arg(long, default_value_t = 10_000, value_name = "ENTRIES")]
    pub snapshot_every: u64,
    /// Entries kept in the log after a snapshot, for followers that lag by less.
    #[arg(long, default_value_t = 1_000, value_name = "ENTRIES")]
    pub keep_after_snapshot: u64,
    /// While leading, also keep the entries members that lag behind need (one being sent a
    /// snapshot needs those after it), up to this many before the latest snapshot.
    #[arg(long, default_value_t = 200_000, value_name = "ENTRIES")]
    pub keep_for_lagging: u64,
    /// While leading, check this often that every replica holds the same state (0: never on
    /// its own; `waft cluster audit` runs one on demand).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub audit_interval: f64,
    /// While leading, remove a voter that has acknowledged nothing for this long (off unless
    /// set). Never below --min-voters voters, one at a time, and only while the leader hears
    /// from a majority. A removed node rejoins with --join.
    #[arg(long, env = "WAFT_REMOVE_UNREACHABLE_AFTER", value_name = "SECONDS")]
    pub remove_unreachable_after: Option<f64>,
    /// How to store the Raft log: `wal` (an append-only file, one fdatasync per batch) or
    /// `redb` (a database). A data directory keeps the engine it was created with; without
    /// this option a node uses its directory's engine, and `wal` for a new directory.
    #[arg(long, value_enum, env = "WAFT_LOG_ENGINE")]
    pub log_engine: Option<crate::node::LogEngine>,
    /// Announce this node on the local network with mDNS as a member of cluster NAME, so
    /// that nodes started with `--join mdns:NAME` find it.
    #[arg(long, env = "WAFT_MDNS", value_name = "NAME")]
    pub mdns: Option<String>,
    /// The fewest voters --remove-unreachable-after may leave.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub min_voters: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "WAFT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve etcd's v3 gRPC services (KV, Watch, Lease, Cluster, Maintenance) on ADDR, for
    /// etcdctl and etcd clients, backed by the service named by --etcd-service (deploy
    /// examples/guests/etcd-kv; docs/etcd.md says what is served).
    #[arg(long, env = "WAFT_ETCD_LISTEN", value_name = "ADDR")]
    pub etcd_listen: Option<std::net::SocketAddr>,
    /// Require this token of submit, query, services and status (the cluster token, --token,
    /// is accepted too). Without it those calls are open.
    #[arg(
        long,
        env = "WAFT_CLIENT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub client_token: Option<String>,
    /// The service behind --etcd-listen.
    #[arg(long, default_value = "etcd", value_name = "NAME")]
    pub etcd_service: String,
    /// Reach the peer advertised at ADVERTISED through ADDR instead (NAT, a proxy). Repeatable.
    #[arg(long, value_name = "ADVERTISED=ADDR", value_parser = parse_dial)]
    pub dial: Vec<(String, String)>,
    /// HTTP/2 connections kept to each peer and used in turn (Raft messages, snapshots and
    /// forwarded client requests), so that one busy stream does not hold up the others.
    #[arg(long, env = "WAFT_PEER_CONNECTIONS", default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=crate::raft::network::MAX_CONNECTIONS as u64))]
    pub peer_connections: u64,
    /// As leader, hold entries proposed while an append to a follower awaits its reply for
    /// that reply (then they go together, with the commit index), but at most this many
    /// microseconds. Fewer, fuller appends under many small writes; 0 sends every append at
    /// once. Raise it towards the round trip on links slower than a LAN's.
    #[arg(long, env = "WAFT_APPEND_HOLD_US", default_value_t = crate::raft::network::DEFAULT_APPEND_HOLD.as_micros() as u64,
          value_name = "MICROSECONDS", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub append_hold_us: u64,
    /// Applied commands kept in memory for `waft watch --from INDEX` (at most 64 MiB of
    /// payloads and replies); a watcher that asks for older ones is told to read afresh.
    #[arg(long, env = "WAFT_WATCH_HISTORY", default_value_t = 10_000, value_name = "EVENTS",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub watch_history: u64,
    /// Asked to hold a new module, fetch the code the leader compiled for it instead of
    /// compiling it again (a new version serves in seconds, not after every member's compile),
    /// and serve this node's compiled code to the other members. Every member then runs machine
    /// code another member made: it needs mutual TLS between the nodes (--tls-ca, --tls-cert,
    /// --tls-key), and every member should be started with it. A member whose CPU or release
    /// differs gets no code it cannot use, and compiles.
    #[arg(long, env = "WAFT_SHARE_COMPILED")]
    pub share_compiled: bool,
    /// The most guest memory this node's services may reserve, in MiB: each service reserves
    /// its memory limit (`waft deploy --max-memory-mib`, or the default) and its module's
    /// compiled code. A deploy or rollback that would go over it is refused before anything is
    /// proposed (checked by the leader and by each member asked to hold the module). Default:
    /// none.
    #[arg(long, env = "WAFT_MAX_GUEST_MEMORY", value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_guest_memory: Option<u64>,
    /// Keep the compiled code of modules nothing runs any more in memory, up to this many MiB,
    /// the least recently used leaving first, so that a rollback to them skips reading their
    /// compiled code from DATA_DIR/cache (milliseconds for small guests, about a second for
    /// an 18 MiB Python one). Default 0: only what serves stays in memory.
    #[arg(
        long,
        env = "WAFT_COMPILED_CACHE_MIB",
        default_value_t = 0,
        value_name = "MIB"
    )]
    pub compiled_cache_mib: u64,
    /// Rebuild each guest instance from its own snapshot (a rebase) after it has journaled
    /// this many entries. Hidden: for tests that want rebases to happen often. Every member
    /// must use the same value, since it decides where each instance's history restarts: it is
    /// part of the engine fingerprint, so a member with another value stops at the next deploy
    /// rather than diverge.
    #[arg(long, env = "WAFT_REBASE_EVERY", hide = true, default_value_t = crate::runtime::CheckpointPolicy::default().entries as u64,
          value_name = "ENTRIES", value_parser = clap::value_parser!(u64).range(1..))]
    pub rebase_every: u64,
    /// Apply cheap batches on the async worker that receives them (the inline path) rather
    /// than on a blocking thread. Hidden: off only to measure what the inline path saves
    /// (`scripts/bench-inline-apply.sh`); replies and state do not depend on it.
    #[arg(long, env = "WAFT_INLINE_APPLY", hide = true, default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub inline_apply: bool,
    /// Fault injection: panic in waft's own apply code (outside any guest call) at every
    /// command whose payload is exactly this text, as a bug there would. Hidden: only
    /// `tests/all/chaos/apply_fault.rs` uses it, to show such a fault stops a node loudly.
    #[arg(long, hide = true, value_name = "PAYLOAD")]
    pub inject_apply_panic: Option<String>,
    /// Records the first node-to-node messages of each kind this node receives and answers
    /// into DIR. Hidden: only `scripts/make-fixtures` uses it, for compatibility fixtures.
    #[arg(long, hide = true, value_name = "DIR")]
    pub record_messages: Option<PathBuf>,
    /// Raise the cluster version only by `waft cluster finalize-upgrade`, not by itself once
    /// every member runs a newer build. Give it to every node during an upgrade you may want
    /// to undo: a node can go back to its previous build while the version has not risen
    /// (docs/operations.md, "Upgrading waft").
    #[arg(long, env = "WAFT_MANUAL_FINALIZE")]
    pub manual_finalize: bool,
    /// Run as a build that runs these cluster versions (`N` or `A-B`) instead of this one's.
    /// Hidden: only tests use it, to play a mixed cluster of two releases.
    #[arg(long, hide = true, value_name = "RANGE", value_parser = crate::version::Runs::parse)]
    pub cluster_versions: Option<crate::version::Runs>,
}

fn parse_dial(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!("expected ADVERTISED=ADDR, got {s:?}")),
    }
}

/// Arguments of `waft dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Node i listens on LISTEN_HOST:(base-port + i).
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// The address the nodes listen on. The nodes reach each other, and advertise themselves,
    /// at 127.0.0.1 whatever this is; 0.0.0.0 also serves clients from outside (in a
    /// container: `docker run -p 7001:7001 IMAGE dev --listen-host 0.0.0.0`).
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    pub listen_host: std::net::IpAddr,
    /// Keep the cluster's data here (default: a temporary directory removed at exit). Running
    /// `waft dev` again with the same directory restarts the same cluster.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The guest to deploy as service `kv` (default: the example kv guest, built if needed).
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Also serve etcd's v3 API (KV, Watch, Lease): node i on 127.0.0.1:(PORT + i), backed by the example
    /// etcd-kv guest deployed as service `etcd` (try `etcdctl --endpoints=127.0.0.1:PORT put a 1`).
    #[arg(long, value_name = "PORT")]
    pub etcd_base_port: Option<u16>,
    /// Also serve Prometheus metrics: node i at http://LISTEN_HOST:(PORT + i)/metrics
    /// (deploy/prometheus/prometheus.yml scrapes 9101-9103: `--metrics-base-port 9101`).
    #[arg(long, value_name = "PORT")]
    pub metrics_base_port: Option<u16>,
    /// Serve TLS (mutual TLS between the nodes) with a throwaway CA and certificates made in
    /// DATA_DIR/tls; clients then need `--tls-ca DATA_DIR/tls/ca.pem` (printed at start).
    #[arg(long)]
    pub tls: bool,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The configuration `waft node`'s flags describe (no side effects: nothing is bound or read).
fn node_config(
    args: &NodeArgs,
    token: Option<String>,
    tls: Option<crate::tls::Tls>,
) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::new(args.id, &args.data_dir);
    config.advertise = args.advertise.clone();
    config.raft.snapshot_every = args.snapshot_every.max(1);
    config.raft.keep_after_snapshot = args.keep_after_snapshot;
    config.raft.keep_for_lagging = args.keep_for_lagging;
    config.raft.audit_interval = (args.audit_interval > 0.0)
        .then(|| Duration::try_from_secs_f64(args.audit_interval).ok())
        .flatten();
    if let Some(after) = args.remove_unreachable_after {
        let after = Duration::try_from_secs_f64(after)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--remove-unreachable-after must be a positive number of seconds")?;
        config.raft.remove_unreachable = Some(crate::autoremove::RemovalPolicy {
            after,
            min_voters: args.min_voters as usize,
        });
    }
    config.log_engine = args.log_engine;
    config.net.dial = args.dial.iter().cloned().collect();
    config.net.connections = args.peer_connections as usize;
    config.net.append_hold = std::time::Duration::from_micros(args.append_hold_us);
    config.watch_history.events = args.watch_history as usize;
    config.inline_apply = args.inline_apply;
    config.inject_apply_panic = args.inject_apply_panic.clone().map(String::into_bytes);
    config.record_messages = args.record_messages.clone();
    config.auto_finalize = !args.manual_finalize;
    if let Some(runs) = args.cluster_versions {
        config.cluster_versions = runs;
    }
    config.net.tls = tls;
    config.net.share_compiled = args.share_compiled;
    config.runtime.compiled_cache_bytes =
        usize::try_from(args.compiled_cache_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    config.runtime.checkpoints.entries = usize::try_from(args.rebase_every).unwrap_or(usize::MAX);
    config.api.max_guest_memory = args.max_guest_memory.map(|m| m.saturating_mul(1 << 20));
    config.metrics_listen = args.metrics_listen;
    config.etcd_listen = args.etcd_listen;
    config.etcd_service = args.etcd_service.clone();
    config.tokens = crate::auth::Tokens {
        cluster: token,
        client: args.client_token.clone(),
    };
    Ok(config)
}

/// `waft node`.
pub async fn node(
    args: &NodeArgs,
    token: Option<String>,
    tls: Option<crate::tls::Tls>,
) -> anyhow::Result<ExitCode> {
    if tls.as_ref().is_some_and(|t| !t.has_identity()) {
        bail!("a node serving TLS needs its own certificate: add --tls-cert and --tls-key");
    }
    // How `--join` reaches its seeds: this node's TLS and token.
    let connector = Connector::new(tls.clone(), token.as_deref())?;
    if let Some(name) = &args.mdns {
        crate::discovery::check_name(name)?;
    }
    let config = node_config(args, token, tls)?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let node = Node::start(config, listener).await?;
    eprintln!(
        "waft node {} serving on {} (data in {})",
        args.id,
        node.addr(),
        args.data_dir.display()
    );
    if let Some(at) = node.etcd_addr() {
        eprintln!(
            "waft node {} serves the etcd v3 KV API on {at} (service {:?})",
            args.id, args.etcd_service
        );
    }
    let _announced = match &args.mdns {
        None => None,
        Some(name) => match crate::discovery::announce(mdns_port(), name, args.id, node.addr()) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("error: {e}");
                node.shutdown().await?;
                return Ok(ExitCode::FAILURE);
            }
        },
    };
    if let Some(seed) = &args.join
        && let Err(e) = tokio::select! {
            joined = join(
                &connector,
                seed,
                args.id,
                node.addr(),
                crate::node::join::is_fresh(&node),
                node.state().runs(),
            ) => joined,
            never = report_catch_up(&node) => match never {},
        }
    {
        eprintln!("error: joining through {seed} failed: {e:#}");
        node.shutdown().await?;
        return Ok(ExitCode::FAILURE);
    }
    if args.join.is_some() {
        let m = node.metrics();
        eprintln!(
            "node {} caught up: log to index {}, applied to {}",
            args.id,
            m.last_log_index.unwrap_or(0),
            m.last_applied.map_or(0, |l| l.index)
        );
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        why = node.fatal() => {
            // Storage failed (a full disk, an I/O error) or the log asked for something this
            // node must not do: it stops taking part rather than risk serving wrong answers.
            // Its data stays as it was at the last durable write; restart it once fixed.
            eprintln!("error: node {} stopped: {why}", args.id);
            let _ = node.shutdown().await;
            return Ok(ExitCode::FAILURE);
        }
    }
    eprintln!("shutting down");
    node.shutdown().await?;
    eprintln!("node {} stopped", args.id);
    Ok(ExitCode::SUCCESS)
}

/// Every address the seeds name: each `host:port`, resolved to all its addresses (a headless
/// service name gives every pod), paired with the host name (the TLS server name to check).
async fn seed_addrs(seeds: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for seed in seeds.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some(cluster) = seed.strip_prefix("mdns:") {
            match crate::discovery::discover(mdns_port(), cluster, Duration::from_secs(3)).await {
                Ok(found) => {
                    for addr in found {
                        let host = addr
                            .rsplit_once(':')
                            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
                            .filter(|h| h.parse::<std::net::IpAddr>().is_err());
                        out.push((addr, host));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "mDNS discovery failed"),
            }
            continue;
        }
        let host = seed
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']));
        let named = host.filter(|h| h.parse::<std::net::IpAddr>().is_err());
        match tokio::net::lookup_host(seed).await {
            Ok(found) => {
                let mut found: Vec<String> = found.map(|a| a.to_string()).collect();
                found.sort();
                found.dedup();
                if found.is_empty() {
                    out.push((seed.to_owned(), None));
                }
                for a in found {
                    out.push((a, named.map(str::to_owned)));
                }
            }
            Err(_) => out.push((seed.to_owned(), None)),
        }
    }
    out
}

/// While a node joins (the leader adds it as a learner and waits for it to catch up), says
/// every few seconds how far its log and state machine have come, and when a snapshot was
/// installed: a big state takes a while to arrive.
async fn report_catch_up(node: &Node) -> std::convert::Infallible {
    let mut told = (0, 0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = node.metrics();
        let now = (
            m.last_log_index.unwrap_or(0),
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map_or(0, |l| l.index),
        );
        if now == told {
            continue;
        }
        let snapshot = if now.2 > told.2 {
            format!(", snapshot at index {}", now.2)
        } else {
            String::new()
        };
        eprintln!(
            "node {} catching up: log to index {}, applied to {}{snapshot}",
            node.id(),
            now.0,
            now.1
        );
        told = now;
    }
}

/// Joins node `id` (at `addr`) through `seeds`, saying what happened.
async fn join(
    connector: &Connector,
    seeds: &str,
    id: u64,
    addr: &str,
    fresh: bool,
    runs: crate::version::Runs,
) -> anyhow::Result<()> {
    let connect = async |addr: &str, name: Option<&str>| -> Result<super::connect::Conn, String> {
        let mut e = connector
            .endpoint(addr)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3));
        if let Some(name) = name
            && let Some(tls) = connector.client_tls()
        {
            e = e
                .tls_config(tls.domain_name(name.to_owned()))
                .map_err(|e| e.to_string())?;
        }
        let channel = e
            .connect()
            .await
            .map_err(|e| super::connect::connect_error(&e))?;
        Ok(connector.authorized(channel))
    };
    let seeds = async || seed_addrs(seeds).await;
    match crate::node::join::join(seeds, connect, id, addr, fresh, runs).await? {
        Joined::AlreadyVoter => eprintln!("node {id} is already a voter; nothing to join"),
        Joined::Voter {
            leader_addr,
            readded,
        } => {
            if let Some(was_voter) = readded {
                eprintln!(
                    "node {id} was a {} of that cluster, but this data directory was new: node \
                     {id} lost its data, so it was removed from the cluster and added back",
                    if was_voter { "voter" } else { "learner" }
                );
            }
            eprintln!("node {id} joined the cluster (leader {leader_addr}) and is a voter");
        }
    }
    Ok(())
}

/// The example guests, built with this binary (host/build.rs).
mod examples {
    include!(concat!(env!("OUT_DIR"), "/examples.rs"));
}

/// An example guest (`kv`, `etcd_kv`) from inside the binary.
fn example_guest(name: &str) -> anyhow::Result<Vec<u8>> {
    match name {
        "kv" => Ok(examples::KV.to_vec()),
        "etcd_kv" => Ok(examples::ETCD_KV.to_vec()),
        other => bail!("no example guest named {other:?}"),
    }
}

/// Deploys `module` as `service` unless a service of that name exists (a restarted dev cluster),
/// retrying while no leader is elected yet.
async fn deploy_once(
    waft: &mut WaftClient<tonic::transport::Channel>,
    service: &str,
    module: &[u8],
) -> anyhow::Result<()> {
    for _ in 0..100 {
        let existing = waft
            .list_services(api::ListServicesRequest {})
            .await?
            .into_inner();
        if existing.services.iter().any(|s| s.name == service) {
            return Ok(());
        }
        let chunks = crate::pb::deploy_chunks(service, module, false);
        match waft.deploy(futures::stream::iter(chunks)).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => bail!("deploying the {service} guest failed: {}", s.message()),
        }
    }
    bail!("the cluster did not elect a leader in time to deploy the {service} guest")
}

/// `waft dev`.
/// Node `i`'s address for a `waft dev` base port (`base` + i on the listen host), if the base
/// port is given.
fn dev_addr(
    args: &DevArgs,
    base: Option<u16>,
    i: u64,
    flag: &str,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(base) = base else { return Ok(None) };
    let port = u16::try_from(u64::from(base) + i)
        .with_context(|| format!("{flag} plus --nodes goes past port 65535"))?;
    Ok(Some(std::net::SocketAddr::new(args.listen_host, port)))
}

pub async fn dev(args: &DevArgs, token: Option<&str>) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let module = match &args.guest {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => example_guest("kv")?,
    };
    let etcd_module = match args.etcd_base_port {
        Some(_) => Some(example_guest("etcd_kv")?),
        None => None,
    };
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir().context("cannot create a temporary data directory")?),
    };
    let base = args.data_dir.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    let tls = if args.tls {
        let hosts = ["localhost", "127.0.0.1", "::1"].map(str::to_owned);
        let files = crate::tls::write_certs(&base.join("tls"), "node", &hosts, 30)?;
        let tls = crate::tls::Tls::load(&files.ca, Some(&files.cert), Some(&files.key))?;
        Some((files, tls))
    } else {
        None
    };
    let connector = Connector::new(tls.as_ref().map(|(_, t)| t.clone()), token)?;
    let mut nodes = Vec::new();
    let mut members = BTreeMap::new();
    for i in 0..args.nodes {
        let at = dev_addr(args, Some(args.base_port), i, "--base-port")?
            .context("a base port is given")?;
        let listener = TcpListener::bind(at)
            .await
            .with_context(|| format!("cannot listen on {at} (pick another --base-port?)"))?;
        let mut config = NodeConfig::new(i + 1, base.join(format!("node{}", i + 1)));
        config.advertise = Some(format!("127.0.0.1:{}", at.port()));
        config.net.tls = tls.as_ref().map(|(_, t)| t.clone());
        config.etcd_listen = dev_addr(args, args.etcd_base_port, i, "--etcd-base-port")?;
        config.metrics_listen = dev_addr(args, args.metrics_base_port, i, "--metrics-base-port")?;
        let node = Node::start(config, listener).await?;
        members.insert(
            i + 1,
            openraft::BasicNode {
                addr: node.addr().to_owned(),
            },
        );
        nodes.push(node);
    }
    let first = nodes[0].addr().to_owned();
    if !nodes[0]
        .raft()
        .is_initialized()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        nodes[0].initialize(members).await?;
    }
    let channel = connector.endpoint(&first)?.connect().await?;
    let mut waft = WaftClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    deploy_once(&mut waft, "kv", &module).await?;
    if let Some(etcd) = &etcd_module {
        deploy_once(&mut waft, "etcd", etcd).await?;
    }
    println!(
        "waft dev: {} nodes, service `kv`{} deployed. Data in {}.",
        nodes.len(),
        if etcd_module.is_some() {
            " (and `etcd`)"
        } else {
            ""
        },
        base.display()
    );
    for n in &nodes {
        match n.metrics_addr() {
            Some(m) => println!(
                "  node {}  {}  metrics http://{m}/metrics",
                n.id(),
                n.addr()
            ),
            None => println!("  node {}  {}", n.id(), n.addr()),
        }
    }
    println!();
    if let Some((files, _)) = &tls {
        println!("TLS is on (mutual TLS between the nodes). Clients need the CA:");
        println!("  export WAFT_TLS_CA={}", files.ca.display());
        println!(
            "  (a client certificate, if wanted: waft certs --dir {} --name me)",
            base.join("tls").display()
        );
    }
    println!("Try (from another terminal):");
    println!("  waft submit --service kv 'put greeting hello'");
    println!("  waft query --service kv 'get greeting'");
    if let Some(n) = nodes.get(1) {
        println!(
            "  waft --endpoint {} submit --service kv 'put from follower'",
            n.addr()
        );
    }
    println!("  waft cluster status");
    println!("  waft services");
    for n in &nodes {
        if let Some(at) = n.etcd_addr() {
            let cacert = tls
                .as_ref()
                .map(|(f, _)| format!(" --cacert={}", f.ca.display()))
                .unwrap_or_default();
            let scheme = if tls.is_some() { "https://" } else { "" };
            println!(
                "  etcdctl --endpoints={scheme}{at}{cacert} put foo bar    # node {}'s etcd API",
                n.id()
            );
        }
    }
    println!("Press Ctrl-C to stop.");
    shutdown_signal().await;
    eprintln!("stopping {} nodes", nodes.len());
    // Every node goes: what openraft says about peers and cores stopping is noise now.
    super::quiet_openraft();
    let mut failed = None;
    for (id, stopped) in crate::node::Node::shutdown_together(nodes).await {
        match stopped {
            Ok(()) => eprintln!("node {id} stopped"),
            Err(e) => {
                eprintln!("node {id} stopped: {e}");
                failed = Some(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    drop(temp);
    Ok(ExitCode::SUCCESS)
}

/// The mDNS port: `WAFT_MDNS_PORT` (tests run their own), or the standard one.
fn mdns_port() -> u16 {
    std::env::var("WAFT_MDNS_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(crate::discovery::MDNS_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn node_args(argv: &[&str]) -> NodeArgs {
        let all = ["waft", "node"].iter().chain(argv);
        match crate::cli::Cli::try_parse_from(all)
            .expect("parses")
            .command
        {
            crate::cli::Command::Node(args) => *args,
            other => panic!("not a node command: {other:?}"),
        }
    }

    #[test]
    fn the_flags_become_the_node_config() {
        let args = node_args(&[
            "--id",
            "2",
            "--data-dir",
            "d2",
            "--advertise",
            "n2:7001",
            "--audit-interval",
            "0",
            "--remove-unreachable-after",
            "5",
            "--min-voters",
            "2",
            "--dial",
            "n3:7001=127.0.0.1:9003",
            "--client-token",
            "c",
        ]);
        let config = node_config(&args, Some("cluster".into()), None).expect("a config");
        assert_eq!(config.id, 2);
        assert_eq!(config.data_dir, PathBuf::from("d2"));
        assert_eq!(config.advertise.as_deref(), Some("n2:7001"));
        assert_eq!(config.raft.audit_interval, None, "0 turns audits off");
        let policy = config.raft.remove_unreachable.expect("a removal policy");
        assert_eq!(
            (policy.after, policy.min_voters),
            (Duration::from_secs(5), 2)
        );
        assert_eq!(
            config.net.dial.get("n3:7001").map(String::as_str),
            Some("127.0.0.1:9003")
        );
        assert_eq!(config.tokens.cluster.as_deref(), Some("cluster"));
        assert_eq!(config.tokens.client.as_deref(), Some("c"));
        // Defaults: audits every 30 s, no removal.
        let plain = node_config(&node_args(&["--id", "1", "--data-dir", "d"]), None, None)
            .expect("a config");
        assert_eq!(plain.raft.audit_interval, Some(Duration::from_secs(30)));
        assert!(plain.raft.remove_unreachable.is_none());
        // A bad value is an error in words, before anything starts.
        let bad = node_args(&[
            "--id",
            "1",
            "--data-dir",
            "d",
            "--remove-unreachable-after",
            "0",
        ]);
        let e = node_config(&bad, None, None).expect_err("0 s is refused");
        assert!(e.to_string().contains("positive"), "{e}");
    }
}
