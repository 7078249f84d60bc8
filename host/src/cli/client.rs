//! Client commands: submit, query, deploy, services and cluster administration.

use crate::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::Channel;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// Where the client connects and how it prints.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Address of any node (`host:port`). Followers forward to the leader.
    #[arg(
        long,
        global = true,
        env = "WAFT_ENDPOINT",
        default_value = "127.0.0.1:7001"
    )]
    pub endpoint: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The token to present (see `waft node --token`); for `waft node`, the cluster token it
    /// requires of admin calls and peers.
    #[arg(long, global = true, env = "WAFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA certificate (PEM): connect over TLS and trust nodes it signed. For
    /// `waft node`, also the CA its peers' certificates must be signed by (mutual TLS).
    #[arg(long, global = true, env = "WAFT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A certificate (PEM) to present: a node's own (required with --tls-ca for `waft node`),
    /// or a client's.
    #[arg(
        long,
        global = true,
        env = "WAFT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "WAFT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ClientArgs {
    /// The TLS settings these flags describe (None: plain TCP).
    pub fn tls(&self) -> anyhow::Result<Option<crate::tls::Tls>> {
        match &self.tls_ca {
            None if self.tls_cert.is_some() => {
                bail!("--tls-cert needs --tls-ca (the CA that signed the nodes' certificates)")
            }
            None => Ok(None),
            Some(ca) => {
                crate::tls::Tls::load(ca, self.tls_cert.as_deref(), self.tls_key.as_deref())
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("TLS: {e}"))
            }
        }
    }
}

/// The TLS every connection of this process uses, set once from the flags.
static TLS: std::sync::OnceLock<Option<crate::tls::Tls>> = std::sync::OnceLock::new();

/// Records the TLS settings every connection uses.
pub fn use_tls(tls: Option<crate::tls::Tls>) {
    let _ = TLS.set(tls);
}

/// The client TLS settings of this process, if any.
pub fn client_tls() -> Option<tonic::transport::ClientTlsConfig> {
    TLS.get().cloned().flatten().map(|t| t.client())
}

/// An endpoint for `addr` (`host:port` or a URI), over TLS when `--tls-ca` was given.
pub fn endpoint(addr: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    let tls = TLS.get().cloned().flatten();
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .with_context(|| format!("bad endpoint {addr:?}"))?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.client())
            .with_context(|| format!("TLS settings for {addr}")),
        None => Ok(endpoint),
    }
}

/// Words for a failed connection: the transport error's whole chain (a TLS handshake failure
/// hides under "transport error").
pub fn connect_error(e: &tonic::transport::Error) -> String {
    crate::node::source_chain(e)
}

/// The token every connection of this process presents, set once from `--token`.
static TOKEN: std::sync::OnceLock<Option<tonic::metadata::AsciiMetadataValue>> =
    std::sync::OnceLock::new();

/// Records the token to present on every call.
pub fn use_token(token: Option<&str>) -> anyhow::Result<()> {
    let value = token
        .map(crate::auth::bearer)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    let _ = TOKEN.set(value);
    Ok(())
}

/// Adds the process's token to every request.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request
                .metadata_mut()
                .insert(crate::auth::HEADER, v.clone());
        }
        Ok(request)
    }
}

/// A connection to a node that presents the process's token.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Wraps a channel so it presents the process's token.
pub fn authorized(channel: Channel) -> Conn {
    let token = TOKEN.get().cloned().flatten();
    tonic::service::interceptor::InterceptedService::new(channel, Bearer(token))
}

/// Arguments of `waft submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The service to send the command to.
    #[arg(long, short)]
    pub service: String,
    /// The command: literal text, `@FILE` for a file's bytes, or `-` for stdin.
    pub payload: String,
    /// Treat the input as one command per line (empty lines skipped) and submit them all, in
    /// order, in batches (`SubmitBatch`): a bulk load. Prints one result per command; exits
    /// non-zero if any was rejected or trapped.
    #[arg(long)]
    pub lines: bool,
    /// With --lines: commands per batch.
    #[arg(long, default_value_t = 256, requires = "lines", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub batch: u64,
}

/// Read consistency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Confirmed with a quorum: sees every acknowledged write.
    Linearizable,
    /// The leader's lease, no round trip.
    Lease,
    /// The contacted node's own state; may lag.
    Stale,
}

/// Arguments of `waft query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The service to query.
    #[arg(long, short)]
    pub service: String,
    /// The query: literal text, `@FILE`, or `-` for stdin.
    pub payload: String,
    /// Read consistency.
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    pub consistency: Consistency,
}

/// Arguments of `waft watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The service to watch (every service if left out).
    #[arg(long, short)]
    pub service: Option<String>,
    /// Start at this log index, replaying what the node still keeps of it (default: from now).
    #[arg(long, value_name = "INDEX", value_parser = clap::value_parser!(u64).range(1..))]
    pub from: Option<u64>,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// Arguments of `waft deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The guest component (`.wasm`).
    pub file: std::path::PathBuf,
    /// The service it will serve.
    #[arg(long, short)]
    pub service: String,
    /// Validate only: compile, check the world, check that the module accepts the service's
    /// current state, and replay the commands the service applied since its last rebase through
    /// the running module and the new one, reporting the replies that differ. Nothing is
    /// deployed.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: replay the commands in FILE (one per line) from the state now instead.
    #[arg(long, value_name = "FILE", requires = "dry_run")]
    pub replay: Option<std::path::PathBuf>,
    /// Also run the determinism verifier (as `waft exec --verify`) on the new module with the
    /// replayed commands; a finding refuses the deploy unless --force.
    #[arg(long)]
    pub verify: bool,
    /// Deploy even if the verifier found something (the deploy is logged as forced).
    #[arg(long, requires = "verify")]
    pub force: bool,
    /// Fuel per apply for this service (default: the nodes' default).
    #[arg(long, value_name = "UNITS")]
    pub fuel: Option<u64>,
    /// Largest guest memory for this service, in MiB (default: the nodes' default).
    #[arg(long, value_name = "MIB")]
    pub max_memory_mib: Option<u64>,
}

/// Arguments of `waft rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The service to roll back.
    #[arg(long, short)]
    pub service: String,
    /// The version to make active again (default: the one before the current version).
    #[arg(long)]
    pub to: Option<u32>,
}

/// `waft cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make the contacted node the first member of a new cluster.
    Init,
    /// Add a node as a learner; it catches up before the call returns.
    AddLearner {
        /// The new node's id.
        id: u64,
        /// The new node's address (`host:port`).
        addr: String,
    },
    /// Set the voters (learners listed here are promoted).
    ChangeMembership {
        /// Node ids of the voters.
        #[arg(required = true)]
        voters: Vec<u64>,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        /// The voter to lead.
        to: u64,
    },
    /// Show roles, terms, log and apply progress, and member lag.
    Status,
    /// Build a snapshot now.
    Snapshot,
    /// Check now that every replica holds byte-identical state, and show each node's verdict
    /// (exits non-zero on a divergence or an unreachable node).
    Audit,
}

async fn channel(addr: &str) -> anyhow::Result<Conn> {
    endpoint(addr)?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map(authorized)
        .map_err(|e| anyhow::anyhow!(
            "cannot reach a waft node at {addr} (is it running? set --endpoint or WAFT_ENDPOINT; \
             --tls-ca if it serves TLS): {}",
            connect_error(&e)
        ))
}

fn read_payload(arg: &str) -> anyhow::Result<Vec<u8>> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        Ok(buf)
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read(path).with_context(|| format!("cannot read {path}"))
    } else {
        Ok(arg.as_bytes().to_vec())
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let sources = std::error::Error::source(&s)
        .map(|e| format!(": {}", crate::node::source_chain(e)))
        .unwrap_or_default();
    // A plain-text client talking to a TLS node sees HTTP/2 garbage or a dropped connection.
    let hint = if TLS.get().is_none_or(Option::is_none)
        && matches!(
            s.code(),
            tonic::Code::Internal | tonic::Code::Cancelled | tonic::Code::Unknown
        )
        && (s.message().contains("h2 protocol error")
            || s.message().contains("operation was canceled")
            || s.message().contains("transport error"))
    {
        " (if the node serves TLS, pass --tls-ca or set WAFT_TLS_CA)"
    } else {
        ""
    };
    // For a fault on the server's side, the id to look for in the nodes' logs.
    let id = s
        .metadata()
        .get(crate::api::trace::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|_| {
            matches!(
                s.code(),
                tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss
            )
        })
        .map(|id| format!(" [request id {id}: look for it in the nodes' logs]"))
        .unwrap_or_default();
    anyhow::anyhow!("{}{sources} ({:?}){hint}{id}", s.message(), s.code())
}

/// Retries a call while the cluster says "unavailable" (no leader yet, leader changed).
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..8 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
    call().await
}

fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(t) => t.to_owned(),
        Err(_) => format!("0x{}", hex::encode(bytes)),
    }
}

fn print_outcome(
    out: Output,
    index_name: &str,
    index: u64,
    ok: Option<&[u8]>,
    err: Option<(&str, &str)>,
) -> ExitCode {
    match out {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            doc.insert(index_name.to_owned(), index.into());
            if let Some(ok) = ok {
                doc.insert("ok".into(), show_bytes(ok).into());
            }
            if let Some((kind, msg)) = err {
                doc.insert(kind.into(), msg.into());
            }
            println!("{}", serde_json::Value::Object(doc));
        }
        Output::Text => {
            if let Some(ok) = ok {
                let text = show_bytes(ok);
                if text.ends_with('\n') {
                    print!("{text}");
                } else {
                    println!("{text}");
                }
            }
            if let Some((kind, msg)) = err {
                eprintln!("error: {kind}: {msg}");
            }
        }
    }
    if err.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A client id for exactly-once retries of this invocation's command.
fn client_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (nanos ^ (u64::from(std::process::id()) << 40)) | 1
}

/// `waft submit`.
pub async fn submit(client: &ClientArgs, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let payload = read_payload(&args.payload)?;
    let waft = WaftClient::new(channel(&client.endpoint).await?);
    if args.lines {
        return submit_lines(client, args, waft, &payload).await;
    }
    // One client id and sequence for every retry: the command is applied at most once.
    let request = api::SubmitRequest {
        service: args.service.clone(),
        payload,
        client_id: client_id(),
        sequence: 1,
    };
    let reply = retrying(|| {
        let mut w = waft.clone();
        let r = request.clone();
        async move { w.submit(r).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    use api::submit_reply::Outcome;
    Ok(match reply.outcome {
        Some(Outcome::Ok(r)) => print_outcome(client.output, "index", reply.index, Some(&r), None),
        Some(Outcome::Rejected(m)) => print_outcome(
            client.output,
            "index",
            reply.index,
            None,
            Some(("rejected", &m)),
        ),
        Some(Outcome::Trapped(m)) => print_outcome(
            client.output,
            "index",
            reply.index,
            None,
            Some(("trapped", &m)),
        ),
        None => bail!("the node sent an empty reply"),
    })
}

/// `waft submit --lines`: every line a command, sent in batches. Each command has its own
/// sequence number in one client session, so a batch retried after an unknown outcome (the
/// leader changed, a connection dropped) applies each of its commands at most once; commands
/// a batch reply says to retry (UNAVAILABLE) are sent again with their numbers.
async fn submit_lines(
    client: &ClientArgs,
    args: &SubmitArgs,
    waft: WaftClient<Conn>,
    input: &[u8],
) -> anyhow::Result<ExitCode> {
    let session = client_id();
    let commands: Vec<api::SubmitRequest> = input
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .zip(1..)
        .map(|(line, sequence)| api::SubmitRequest {
            service: args.service.clone(),
            payload: line.to_vec(),
            client_id: session,
            sequence,
        })
        .collect();
    let mut failed = 0usize;
    for chunk in commands.chunks(args.batch as usize) {
        let mut todo: Vec<api::SubmitRequest> = chunk.to_vec();
        let mut done = std::collections::BTreeMap::new();
        let mut delay = Duration::from_millis(100);
        for attempt in 0.. {
            let sent = todo.clone();
            let results = retrying(|| {
                let mut w = waft.clone();
                let r = api::SubmitBatchRequest {
                    commands: sent.clone(),
                };
                async move { w.submit_batch(r).await }
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .results;
            anyhow::ensure!(
                results.len() == sent.len(),
                "the node answered {} results for {} commands",
                results.len(),
                sent.len()
            );
            todo.clear();
            for (command, result) in sent.into_iter().zip(results) {
                match crate::api::forward::from_result(result) {
                    Err(s) if s.code() == tonic::Code::Unavailable && attempt < 8 => {
                        todo.push(command)
                    }
                    other => {
                        done.insert(command.sequence, other);
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        for (sequence, answer) in done {
            failed += usize::from(print_line_result(client.output, sequence, answer));
        }
    }
    if client.output == Output::Text && failed > 0 {
        eprintln!("{failed} of {} commands failed", commands.len());
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints one command's result of `submit --lines`; true if it failed.
fn print_line_result(
    out: Output,
    line: u64,
    answer: Result<api::SubmitReply, tonic::Status>,
) -> bool {
    use api::submit_reply::Outcome;
    let (index, ok, err) = match answer {
        Ok(r) => match r.outcome {
            Some(Outcome::Ok(b)) => (r.index, Some(show_bytes(&b)), None),
            Some(Outcome::Rejected(m)) => (r.index, None, Some(("rejected", m))),
            Some(Outcome::Trapped(m)) => (r.index, None, Some(("trapped", m))),
            None => (r.index, None, Some(("error", "an empty reply".to_owned()))),
        },
        Err(s) => (0, None, Some(("error", status_error(s).to_string()))),
    };
    match out {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            doc.insert("command".into(), line.into());
            doc.insert("index".into(), index.into());
            if let Some(ok) = &ok {
                doc.insert("ok".into(), ok.clone().into());
            }
            if let Some((kind, msg)) = &err {
                doc.insert((*kind).into(), msg.clone().into());
            }
            println!("{}", serde_json::Value::Object(doc));
        }
        Output::Text => {
            if let Some(ok) = ok {
                println!("{}", ok.trim_end_matches('\n'));
            }
            if let Some((kind, msg)) = &err {
                println!("error: command {line}: {kind}: {msg}");
            }
        }
    }
    err.is_some()
}

/// `waft query`.
pub async fn query(client: &ClientArgs, args: &QueryArgs) -> anyhow::Result<ExitCode> {
    let payload = read_payload(&args.payload)?;
    let waft = WaftClient::new(channel(&client.endpoint).await?);
    let consistency = match args.consistency {
        Consistency::Linearizable => api::Consistency::Linearizable,
        Consistency::Lease => api::Consistency::Lease,
        Consistency::Stale => api::Consistency::Stale,
    };
    let request = api::QueryRequest {
        service: args.service.clone(),
        payload,
        consistency: consistency as i32,
    };
    let reply = retrying(|| {
        let r = request.clone();
        let mut w = waft.clone();
        async move { w.query(r).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    use api::query_reply::Outcome;
    Ok(match reply.outcome {
        Some(Outcome::Ok(r)) => print_outcome(
            client.output,
            "applied_index",
            reply.applied_index,
            Some(&r),
            None,
        ),
        Some(Outcome::Rejected(m)) => print_outcome(
            client.output,
            "applied_index",
            reply.applied_index,
            None,
            Some(("rejected", &m)),
        ),
        Some(Outcome::Trapped(m)) => print_outcome(
            client.output,
            "applied_index",
            reply.applied_index,
            None,
            Some(("trapped", &m)),
        ),
        None => bail!("the node sent an empty reply"),
    })
}

/// `waft watch`: one line (or JSON object) per event, until `--count` events or the stream
/// ends; an interrupted watch says where to resume.
pub async fn watch(client: &ClientArgs, args: &WatchArgs) -> anyhow::Result<ExitCode> {
    use api::watch_event::Outcome;
    let mut waft = WaftClient::new(channel(&client.endpoint).await?);
    let request = api::WatchRequest {
        service: args.service.clone().unwrap_or_default(),
        start_index: args.from.unwrap_or(0),
    };
    let mut stream = waft
        .watch(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut seen = 0u64;
    let mut next = args.from;
    while args.count.is_none_or(|c| seen < c) {
        let event = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(s) => {
                let resume = next.map_or(String::new(), |n| format!(" (resume with --from {n})"));
                return Err(status_error(s).context(format!("the watch ended{resume}")));
            }
        };
        seen += 1;
        next = Some(event.index + 1);
        let (kind, detail) = match &event.outcome {
            Some(Outcome::Reply(r)) => ("reply", show_bytes(r)),
            Some(Outcome::Rejected(m)) => ("rejected", m.clone()),
            Some(Outcome::Failed(m)) => ("failed", m.clone()),
            Some(Outcome::Version(v)) => ("version", v.to_string()),
            None => ("unknown", String::new()),
        };
        match client.output {
            Output::Json => {
                let mut doc = serde_json::Map::new();
                doc.insert("index".into(), event.index.into());
                doc.insert("service".into(), event.service.clone().into());
                doc.insert("timestamp_ms".into(), event.timestamp_ms.into());
                if !event.payload.is_empty() {
                    doc.insert("payload".into(), show_bytes(&event.payload).into());
                }
                doc.insert(kind.into(), detail.into());
                println!("{}", serde_json::Value::Object(doc));
            }
            Output::Text => {
                let payload = show_bytes(&event.payload);
                let line = format!(
                    "{}\t{}\t{}\t{kind}: {}",
                    event.index,
                    event.service,
                    payload.trim_end(),
                    detail.trim_end()
                );
                println!("{}", line.replace('\n', "\\n"));
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    Ok(ExitCode::SUCCESS)
}

/// `waft deploy`.
pub async fn deploy(client: &ClientArgs, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let module = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let waft = WaftClient::new(channel(&client.endpoint).await?)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let size = module.len() as u64;
    let replay: Vec<Vec<u8>> = match &args.replay {
        None => Vec::new(),
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.as_bytes().to_vec())
            .collect(),
    };
    if args.replay.is_some() && replay.is_empty() {
        anyhow::bail!(
            "{} holds no commands",
            args.replay
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        );
    }
    // A progress bar for uploads worth watching, on a terminal, in text mode.
    let bar = (size > (4 << 20)
        && client.output == Output::Text
        && std::io::IsTerminal::is_terminal(&std::io::stderr()))
    .then(|| {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let reply = retrying(|| {
        let mut w = waft.clone();
        let header = api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Header(api::DeployHeader {
                service: args.service.clone(),
                size,
                dry_run: args.dry_run,
                fuel_per_apply: args.fuel.unwrap_or(0),
                max_memory_bytes: args.max_memory_mib.map_or(0, |m| m.saturating_mul(1 << 20)),
                verify: args.verify,
                force: args.force,
                replay: replay.clone(),
            })),
        };
        let bar = bar.clone();
        if let Some(b) = &bar {
            b.set_position(0);
        }
        let data: Vec<Vec<u8>> = module.chunks(1 << 20).map(<[u8]>::to_vec).collect();
        let chunks = futures::stream::iter(std::iter::once(header)).chain(
            futures::stream::iter(data).map(move |c| {
                if let Some(b) = &bar {
                    b.inc(c.len() as u64);
                }
                api::DeployChunk {
                    kind: Some(api::deploy_chunk::Kind::Data(c)),
                }
            }),
        );
        async move { w.deploy(chunks).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let trial = reply.trial.as_ref().map(|t| {
        serde_json::json!({"source": t.source, "commands": t.commands, "differing": t.differing,
            "from_index": t.from_index, "to_index": t.to_index,
            "first": t.first.iter().map(|d| serde_json::json!({"at": d.at, "command": d.command,
                "running": d.running, "new": d.new})).collect::<Vec<_>>()})
    });
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"service": args.service, "module_sha256": reply.module_sha256,
                "index": reply.index, "dry_run": reply.dry_run, "version": reply.version,
                "unchanged": reply.unchanged, "trial": trial, "findings": reply.findings})
        ),
        Output::Text if reply.dry_run => {
            println!(
                "dry run: {} ({} bytes, sha256 {}) would be accepted as service {:?}; nothing was deployed",
                args.file.display(),
                size,
                reply.module_sha256,
                args.service
            );
            if let Some(t) = &reply.trial {
                print_trial(t);
            }
            if args.verify {
                print_findings(&reply.findings);
            }
        }
        Output::Text if reply.unchanged => println!(
            "{:?} already runs {} (sha256 {}) as version {} since index {}; nothing changed",
            args.service,
            args.file.display(),
            reply.module_sha256,
            reply.version,
            reply.index
        ),
        Output::Text => println!(
            "deployed {} ({} bytes, sha256 {}) as service {:?} version {} at index {}",
            args.file.display(),
            size,
            reply.module_sha256,
            args.service,
            reply.version,
            reply.index
        ),
    }
    if !reply.findings.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_trial(t: &api::TrialReport) {
    let what = if t.source == "history" {
        format!(
            "the {} command(s) applied at indexes {}..={} (since the service's last rebase)",
            t.commands, t.from_index, t.to_index
        )
    } else {
        format!(
            "{} command(s) from the file, from the state now",
            t.commands
        )
    };
    println!(
        "replayed {what} through the running module and the new one: {} {}",
        t.differing,
        if t.differing == 1 {
            "reply differs"
        } else {
            "replies differ"
        }
    );
    for d in &t.first {
        println!(
            "  {} {} {:?}: running {:?}, new {:?}",
            if t.source == "history" {
                "index"
            } else {
                "command"
            },
            d.at,
            d.command,
            d.running,
            d.new
        );
    }
}

fn print_findings(findings: &[String]) {
    if findings.is_empty() {
        println!("determinism verifier: no findings");
    } else {
        println!(
            "determinism verifier: NOT DETERMINISTIC ({} finding(s)); a deploy needs --force:",
            findings.len()
        );
        for f in findings {
            println!("  {f}");
        }
    }
}

/// `waft rollback`.
pub async fn rollback(client: &ClientArgs, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let waft = WaftClient::new(channel(&client.endpoint).await?);
    let request = api::RollbackRequest {
        service: args.service.clone(),
        to_version: args.to.unwrap_or(0),
    };
    let reply = retrying(|| {
        let mut w = waft.clone();
        let r = request.clone();
        async move { w.rollback(r).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"service": args.service, "module_sha256": reply.module_sha256,
                "index": reply.index, "version": reply.version})
        ),
        Output::Text => println!(
            "service {:?} now runs module {} as version {} (since index {})",
            args.service, reply.module_sha256, reply.version, reply.index
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `waft services`.
pub async fn services(client: &ClientArgs) -> anyhow::Result<ExitCode> {
    let mut waft = WaftClient::new(channel(&client.endpoint).await?);
    let reply = waft
        .list_services(api::ListServicesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    match client.output {
        Output::Json => {
            let list: Vec<_> = reply
                .services
                .iter()
                .map(|s| {
                    let history: Vec<_> = s
                        .history
                        .iter()
                        .map(|v| serde_json::json!({"version": v.version, "module_sha256": v.module_sha256,
                            "deployed_at_index": v.deployed_at_index, "forced": v.forced}))
                        .collect();
                    serde_json::json!({"name": s.name, "version": s.version, "module_sha256": s.module_sha256,
                        "module_size": s.module_size, "deployed_at_index": s.deployed_at_index,
                        "state_bytes": s.state_bytes, "fuel_per_apply": s.fuel_per_apply,
                        "max_memory_bytes": s.max_memory_bytes, "history": history})
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        Output::Text => {
            println!(
                "{:<16} {:>7} {:<14} {:>10} {:>10} {:>10} {:>12}",
                "SERVICE", "VERSION", "MODULE", "SIZE", "DEPLOYED@", "STATE", "FUEL/APPLY"
            );
            for s in &reply.services {
                let fuel = if s.fuel_per_apply == 0 {
                    "default".to_owned()
                } else {
                    s.fuel_per_apply.to_string()
                };
                println!(
                    "{:<16} {:>7} {:<14} {:>10} {:>10} {:>10} {:>12}",
                    s.name,
                    s.version,
                    &s.module_sha256[..12.min(s.module_sha256.len())],
                    s.module_size,
                    s.deployed_at_index,
                    s.state_bytes,
                    fuel
                );
                let active = s.history.iter().find(|v| v.version == s.version);
                if let Some(v) = active.filter(|v| !v.forced.is_empty()) {
                    println!(
                        "  FORCED: version {} was deployed with --force although the determinism verifier found {} problem(s); first: {}",
                        v.version,
                        v.forced.lines().count(),
                        v.forced.lines().next().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_members(out: Output, reply: &api::MembershipReply) {
    match out {
        Output::Json => {
            let list: Vec<_> = reply
                .members
                .iter()
                .map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"index": reply.index, "members": list})
            );
        }
        Output::Text => {
            for m in &reply.members {
                println!(
                    "{:>4}  {:<22} {}",
                    m.id,
                    m.addr,
                    if m.voter { "voter" } else { "learner" }
                );
            }
        }
    }
}

/// `waft cluster ...`.
pub async fn cluster(client: &ClientArgs, command: &ClusterCommand) -> anyhow::Result<ExitCode> {
    let mut c = ClusterClient::new(channel(&client.endpoint).await?);
    match command {
        ClusterCommand::Init => {
            let r = c
                .init(api::InitRequest { members: vec![] })
                .await
                .map_err(status_error)?;
            print_members(client.output, r.get_ref());
        }
        ClusterCommand::AddLearner { id, addr } => {
            let req = api::AddLearnerRequest {
                id: *id,
                addr: addr.clone(),
            };
            let r = retrying(|| {
                let mut c = c.clone();
                let req = req.clone();
                async move { c.add_learner(req).await }
            })
            .await
            .map_err(status_error)?;
            print_members(client.output, r.get_ref());
        }
        ClusterCommand::ChangeMembership { voters } => {
            let req = api::ChangeMembershipRequest {
                voters: voters.clone(),
                retain: false,
                add_voters: vec![],
            };
            let r = retrying(|| {
                let mut c = c.clone();
                let req = req.clone();
                async move { c.change_membership(req).await }
            })
            .await
            .map_err(status_error)?;
            print_members(client.output, r.get_ref());
        }
        ClusterCommand::Remove { id } => {
            let r = c
                .remove_node(api::RemoveNodeRequest { id: *id })
                .await
                .map_err(status_error)?;
            print_members(client.output, r.get_ref());
        }
        ClusterCommand::TransferLeader { to } => {
            c.transfer_leader(api::TransferLeaderRequest { to: *to })
                .await
                .map_err(status_error)?;
            if client.output == Output::Text {
                println!("leadership transfer to node {to} requested");
            }
        }
        ClusterCommand::Snapshot => {
            c.trigger_snapshot(api::TriggerSnapshotRequest {})
                .await
                .map_err(status_error)?;
            if client.output == Output::Text {
                println!("snapshot requested");
            }
        }
        ClusterCommand::Status => {
            let s = c
                .status(api::StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_status(client.output, &s);
        }
        ClusterCommand::Audit => return audit(client, &mut c).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// A divergence in words: what differs, this node's value and the reference.
fn divergence_text(d: &api::Divergence) -> String {
    if d.majority {
        format!("{}: local {} / majority {}", d.what, d.local, d.expected)
    } else {
        format!(
            "{}: local {} / leader {} (no majority: reported only)",
            d.what, d.local, d.expected
        )
    }
}

/// A heal in words.
fn heal_text(h: &api::Heal) -> String {
    match (&h.source, h.error.is_empty()) {
        (Some(source), true) => format!(
            "healed {} from node {source} as of index {}",
            h.items.join(", "),
            h.at_index
        ),
        _ => format!("heal of {} FAILED: {}", h.items.join(", "), h.error),
    }
}

/// One node's verdict on an audit.
fn audit_verdict(audit: &api::AuditStatus, index: u64) -> (&'static str, String) {
    let diverged: Vec<String> = audit
        .divergences
        .iter()
        .filter(|d| d.index == index)
        .map(divergence_text)
        .chain(
            audit
                .heals
                .iter()
                .filter(|h| h.audit_index == index)
                .map(heal_text),
        )
        .collect();
    if !diverged.is_empty() {
        ("DIVERGED", diverged.join("; "))
    } else if audit.last_checked_index.is_some_and(|i| i >= index) {
        ("match", String::new())
    } else {
        (
            "skipped",
            "no digest at that index (caught up by snapshot or restarted)".to_owned(),
        )
    }
}

async fn audit(client: &ClientArgs, c: &mut ClusterClient<Conn>) -> anyhow::Result<ExitCode> {
    let reply = retrying(|| {
        let mut c = c.clone();
        async move { c.audit(api::AuditRequest {}).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    let members = c
        .status(api::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .members;
    let mut rows = Vec::new();
    let mut ok = true;
    for m in &members {
        // Each node compares when it applies the report entry: wait for that, briefly.
        let mut verdict = ("unreachable", String::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut node: Option<ClusterClient<Conn>> = None;
        while std::time::Instant::now() < deadline {
            if node.is_none() {
                node = channel(&m.addr).await.ok().map(ClusterClient::new);
            }
            let status = match node.as_mut() {
                Some(c) => c.status(api::StatusRequest {}).await,
                None => Err(tonic::Status::unavailable(format!(
                    "cannot reach {}",
                    m.addr
                ))),
            };
            match status {
                Ok(s) if s.get_ref().applied_index >= reply.report_index => {
                    verdict =
                        audit_verdict(&s.get_ref().audit.clone().unwrap_or_default(), reply.index);
                    break;
                }
                Ok(_) => verdict = ("behind", "has not applied the report yet".to_owned()),
                Err(e) => verdict = ("unreachable", e.message().to_owned()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok &= verdict.0 == "match" || verdict.0 == "skipped";
        rows.push((m.id, m.addr.clone(), verdict));
    }
    match client.output {
        Output::Json => {
            let nodes: Vec<_> = rows
                .iter()
                .map(|(id, addr, (v, detail))| serde_json::json!({"id": id, "addr": addr, "verdict": v, "detail": detail}))
                .collect();
            let services: Vec<_> = reply
                .services
                .iter()
                .map(|d| serde_json::json!({"service": d.service, "version": d.version, "module_sha256": d.module_sha256,
                    "state_sha256": d.state_sha256, "state_bytes": d.state_bytes}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"index": reply.index, "report_index": reply.report_index, "services": services,
                    "sessions_sha256": reply.sessions_sha256, "nodes": nodes, "consistent": ok})
            );
        }
        Output::Text => {
            println!("audit at log index {}", reply.index);
            for d in &reply.services {
                println!(
                    "  {:<16} v{:<3} state sha256 {} ({} bytes)",
                    d.service, d.version, d.state_sha256, d.state_bytes
                );
            }
            println!("{:>4}  {:<22} {:<11} DETAIL", "ID", "ADDRESS", "VERDICT");
            for (id, addr, (v, detail)) in &rows {
                println!("{id:>4}  {addr:<22} {v:<11} {detail}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_status(out: Output, s: &api::StatusReply) {
    match out {
        Output::Json => {
            let members: Vec<_> = s
                .members
                .iter()
                .map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter, "matched_index": m.matched_index, "lag": m.lag}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"node_id": s.node_id, "role": s.role, "term": s.term, "leader_id": s.leader_id,
                    "leader_addr": s.leader_addr, "last_log_index": s.last_log_index, "committed_index": s.committed_index,
                    "applied_index": s.applied_index, "snapshot_index": s.snapshot_index, "engine": s.engine, "members": members,
                    "cluster_id": s.cluster_id, "audit": s.audit.as_ref().map(|a| serde_json::json!({"checks": a.checks, "skipped": a.skipped,
                        "last_checked_index": a.last_checked_index,
                        "divergences": a.divergences.iter().map(|d| serde_json::json!({"index": d.index, "what": d.what,
                            "local": d.local, "expected": d.expected, "majority": d.majority})).collect::<Vec<_>>(),
                        "heals": a.heals.iter().map(|h| serde_json::json!({"audit_index": h.audit_index, "at_index": h.at_index,
                            "items": h.items, "source": h.source, "error": h.error})).collect::<Vec<_>>(),
                        "unavailable": a.unavailable.iter().map(|u| serde_json::json!({"service": u.service,
                            "reason": u.reason})).collect::<Vec<_>>()}))})
            );
        }
        Output::Text => {
            println!(
                "node {} is {} in term {}; leader: {}",
                s.node_id,
                s.role,
                s.term,
                s.leader_id
                    .map_or("none".to_owned(), |l| format!("{l} ({})", s.leader_addr))
            );
            println!(
                "log: last {}  committed {}  applied {}  snapshot {}",
                s.last_log_index,
                s.committed_index,
                s.applied_index,
                s.snapshot_index.map_or("-".to_owned(), |i| i.to_string())
            );
            println!("engine: {}", s.engine);
            if !s.cluster_id.is_empty() {
                println!("cluster: {}", s.cluster_id);
            }
            let audit = s.audit.clone().unwrap_or_default();
            match audit.divergences.last() {
                Some(d) => println!(
                    "state audit: DIVERGED at index {} ({}); {} checks",
                    d.index,
                    divergence_text(d),
                    audit.checks
                ),
                None => println!(
                    "state audit: {} checks, all matched{}",
                    audit.checks,
                    audit
                        .last_checked_index
                        .map_or(String::new(), |i| format!(" (last at index {i})"))
                ),
            }
            if let Some(h) = audit.heals.last() {
                println!(
                    "heals: {} (last: {}, found at audit index {})",
                    audit.heals.len(),
                    heal_text(h),
                    h.audit_index
                );
            }
            for u in &audit.unavailable {
                println!("UNAVAILABLE for reads: {}: {}", u.service, u.reason);
            }
            println!(
                "{:>4}  {:<22} {:<8} {:>8} {:>6}",
                "ID", "ADDRESS", "ROLE", "MATCHED", "LAG"
            );
            for m in &s.members {
                println!(
                    "{:>4}  {:<22} {:<8} {:>8} {:>6}",
                    m.id,
                    m.addr,
                    if m.voter { "voter" } else { "learner" },
                    m.matched_index.map_or("-".to_owned(), |i| i.to_string()),
                    m.lag.map_or("-".to_owned(), |i| i.to_string())
                );
            }
        }
    }
}

/// Arguments of `waft backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Write the backup here (written to FILE.partial, renamed once complete and verified).
    #[arg(short = 'o', long = "file", id = "backup_file", value_name = "FILE")]
    pub file: std::path::PathBuf,
}

/// Arguments of `waft restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A file written by `waft backup`.
    pub file: std::path::PathBuf,
    /// Replace the services the cluster runs now.
    #[arg(long, conflicts_with = "data_dir")]
    pub force: bool,
    /// Offline: seed this empty data directory with the backup instead, as node --id of a new
    /// one-node cluster; start `waft node` on it, then add nodes with --join.
    #[arg(long, value_name = "DIR", requires = "id")]
    pub data_dir: Option<std::path::PathBuf>,
    /// With --data-dir: the node id the directory is for.
    #[arg(long, requires = "data_dir")]
    pub id: Option<u64>,
    /// With --data-dir: the address the node will be reached at (its --advertise, or its
    /// --listen address).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:7001",
        requires = "data_dir"
    )]
    pub advertise: String,
}

/// `waft backup`.
pub async fn backup(client: &ClientArgs, args: &BackupArgs) -> anyhow::Result<ExitCode> {
    use api::backup_chunk::Kind;
    let c =
        ClusterClient::new(channel(&client.endpoint).await?).max_decoding_message_size(usize::MAX);
    let mut stream = retrying(|| {
        let mut c = c.clone();
        async move { c.backup(api::BackupRequest {}).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    let header = match stream
        .message()
        .await
        .map_err(status_error)?
        .and_then(|m| m.kind)
    {
        Some(Kind::Header(h)) => h,
        _ => anyhow::bail!("the node sent a backup without a header"),
    };
    let bar = (header.size > (4 << 20)
        && client.output == Output::Text
        && std::io::IsTerminal::is_terminal(&std::io::stderr()))
    .then(|| {
        let bar = indicatif::ProgressBar::new(header.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "backup {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut bytes = Vec::with_capacity(header.size as usize);
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        if let Some(Kind::Data(d)) = chunk.kind {
            bytes.extend_from_slice(&d);
            if let Some(b) = &bar {
                b.set_position(bytes.len() as u64);
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    anyhow::ensure!(
        bytes.len() as u64 == header.size,
        "the backup stream ended after {} of {} bytes",
        bytes.len(),
        header.size
    );
    let summary = crate::storage::snapshot::Reader::from_bytes(&bytes)
        .context("the backup received does not verify")?;
    let partial = args.file.with_extension("partial");
    std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &args.file)
        .with_context(|| format!("renaming to {}", args.file.display()))?;
    let services: Vec<String> = summary
        .header
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect();
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"file": args.file, "bytes": bytes.len(), "index": header.index, "services": services})
        ),
        Output::Text => println!(
            "backup of {} service(s) [{}] at log index {} written to {} ({} bytes)",
            services.len(),
            services.join(", "),
            header.index,
            args.file.display(),
            bytes.len()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `waft restore --data-dir`: seeds a data directory offline.
async fn seed(
    client: &ClientArgs,
    args: &RestoreArgs,
    dir: &std::path::Path,
    id: u64,
    bytes: Vec<u8>,
) -> anyhow::Result<ExitCode> {
    let config = crate::node::NodeConfig::new(id, dir);
    let (index, services) =
        crate::node::Node::seed_from_backup(config, args.advertise.clone(), bytes).await?;
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"index": index, "services": services, "data_dir": dir, "id": id})
        ),
        Output::Text => {
            println!(
                "seeded {} as node {id} of a new cluster: {} service(s) [{}] at log index {index}",
                dir.display(),
                services.len(),
                services.join(", "),
            );
            println!(
                "start it with `waft node --id {id} --data-dir {} --listen {}`, then add nodes \
                 with `--join {}`",
                dir.display(),
                args.advertise,
                args.advertise
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `waft restore`.
pub async fn restore(client: &ClientArgs, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    crate::storage::snapshot::Reader::from_bytes(&bytes)
        .with_context(|| format!("{} is not a usable backup", args.file.display()))?;
    if let (Some(dir), Some(id)) = (&args.data_dir, args.id) {
        return seed(client, args, dir, id, bytes).await;
    }
    let c =
        ClusterClient::new(channel(&client.endpoint).await?).max_encoding_message_size(usize::MAX);
    let chunks = crate::api::restore_chunks(&bytes, args.force);
    let reply = retrying(|| {
        let mut c = c.clone();
        let chunks = chunks.clone();
        async move { c.restore(futures::stream::iter(chunks)).await }
    })
    .await
    .map_err(status_error)?
    .into_inner();
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"index": reply.index, "services": reply.services})
        ),
        Output::Text => println!(
            "restored {} service(s) [{}] at log index {}",
            reply.services.len(),
            reply.services.join(", "),
            reply.index
        ),
    }
    Ok(ExitCode::SUCCESS)
}
