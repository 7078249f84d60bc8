//! Client commands on services: submit, query, watch, deploy, rollback, services.

use super::connect::{Client, Output, retrying};
use super::output;
use crate::pb::api::{self, waft_client::WaftClient};
use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use std::io::Read;
use std::process::ExitCode;

/// Arguments of `waft submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The service to send the command to.
    #[arg(long, short)]
    pub service: String,
    /// The command: literal text, `@FILE` for a file's bytes, or `-` for stdin.
    pub payload: String,
    /// Treat the input as one command per line (empty lines skipped) and submit them all, in
    /// order, in batches pipelined over one `Session` stream: a bulk load. Prints one result
    /// per command, in order; exits non-zero if any was rejected or trapped.
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
    /// Only the events guests emit (waft:fsm@0.2.0), of topics that start with PREFIX ("" for
    /// every topic). Without it: commands, version changes, timers and events.
    #[arg(long, value_name = "PREFIX")]
    pub events: Option<String>,
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

/// `waft submit`: through `waft-client` (it finds the leader and retries with an exactly-once
/// client session, so the command is applied at most once).
pub async fn submit(client: &Client, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let payload = read_payload(&args.payload)?;
    let waft = client.connector.client(&client.endpoints).await?;
    if args.lines {
        return submit_lines(client, args, &waft, &payload).await;
    }
    let applied = waft
        .submit(&args.service, payload)
        .await
        .map_err(|e| client.connector.client_error(e))?;
    use waft_client::Outcome;
    let (ok, err) = match &applied.outcome {
        Outcome::Ok(r) => (Some(r.as_slice()), None),
        Outcome::Rejected(m) => (None, Some(("rejected", m.as_str()))),
        Outcome::Trapped(m) => (None, Some(("trapped", m.as_str()))),
    };
    Ok(output::print_outcome(
        client.output,
        "index",
        applied.index,
        ok,
        err,
    ))
}

/// Batches of `waft submit --lines` in flight at once.
const LINES_IN_FLIGHT: usize = 8;

/// `waft submit --lines`: every line a command, sent in batches pipelined over one `Session`
/// stream ([`LINES_IN_FLIGHT`] at a time; results print in line order). Each batch in flight
/// has a client session of its own (`waft-client` reuses them), so a batch sent again after an
/// unknown outcome (the leader changed, the connection dropped) applies each of its commands
/// at most once.
async fn submit_lines(
    client: &Client,
    args: &SubmitArgs,
    waft: &waft_client::Client,
    input: &[u8],
) -> anyhow::Result<ExitCode> {
    let lines: Vec<&[u8]> = input
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let total = lines.len();
    let session = waft.session();
    let batches: Vec<(u64, Vec<Vec<u8>>)> = lines
        .chunks(args.batch as usize)
        .scan(0u64, |line, chunk| {
            let first_line = *line + 1;
            *line += chunk.len() as u64;
            Some((first_line, chunk.iter().map(|l| l.to_vec()).collect()))
        })
        .collect();
    let mut answered = futures::stream::iter(batches)
        .map(|(first_line, commands)| {
            let session = session.clone();
            let service = args.service.clone();
            async move { (first_line, session.submit(&service, commands).await) }
        })
        .buffered(LINES_IN_FLIGHT);
    let mut failed = 0usize;
    while let Some((first_line, answers)) = answered.next().await {
        let answers = answers.map_err(|e| client.connector.client_error(e))?;
        for (line, answer) in (first_line..).zip(answers) {
            failed += usize::from(print_line_result(client, line, answer));
        }
    }
    if client.output == Output::Text && failed > 0 {
        eprintln!("{failed} of {total} commands failed");
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints one command's result of `submit --lines`; true if it failed.
fn print_line_result(
    client: &Client,
    line: u64,
    answer: Result<waft_client::Applied, waft_client::Error>,
) -> bool {
    use waft_client::Outcome;
    let (index, ok, err) = match answer {
        Ok(r) => match r.outcome {
            Outcome::Ok(b) => (r.index, Some(output::show_bytes(&b)), None),
            Outcome::Rejected(m) => (r.index, None, Some(("rejected", m))),
            Outcome::Trapped(m) => (r.index, None, Some(("trapped", m))),
        },
        Err(e) => (
            0,
            None,
            Some(("error", client.connector.client_error(e).to_string())),
        ),
    };
    match client.output {
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
pub async fn query(client: &Client, args: &QueryArgs) -> anyhow::Result<ExitCode> {
    let payload = read_payload(&args.payload)?;
    // The node given answers (a stale read is its own copy); it forwards what needs the leader.
    let waft = client.connector.client_on(&client.endpoints).await?;
    let consistency = match args.consistency {
        Consistency::Linearizable => waft_client::Consistency::Linearizable,
        Consistency::Lease => waft_client::Consistency::Lease,
        Consistency::Stale => waft_client::Consistency::Stale,
    };
    let answer = waft
        .query(&args.service, payload, consistency)
        .await
        .map_err(|e| client.connector.client_error(e))?;
    use waft_client::Outcome;
    let (ok, err) = match &answer.outcome {
        Outcome::Ok(r) => (Some(r.as_slice()), None),
        Outcome::Rejected(m) => (None, Some(("rejected", m.as_str()))),
        Outcome::Trapped(m) => (None, Some(("trapped", m.as_str()))),
    };
    Ok(output::print_outcome(
        client.output,
        "applied_index",
        answer.applied_index,
        ok,
        err,
    ))
}

/// `waft watch`: one line (or JSON object) per event, until `--count` events or the stream
/// ends; an interrupted watch says where to resume.
pub async fn watch(client: &Client, args: &WatchArgs) -> anyhow::Result<ExitCode> {
    use api::watch_event::Outcome;
    // Through waft-client: a watch whose node goes away resumes on another from the next index.
    let waft = client.connector.client_on(&client.endpoints).await?;
    let mut stream = match &args.events {
        Some(prefix) => waft.watch_events(args.service.as_deref(), prefix, args.from),
        None => waft.watch(args.service.as_deref(), args.from),
    };
    let mut seen = 0u64;
    let mut next = args.from;
    while args.count.is_none_or(|c| seen < c) {
        let event = match stream.next().await {
            Some(Ok(e)) => e,
            None => break,
            Some(Err(e)) => {
                let resume = next.map_or(String::new(), |n| format!(" (resume with --from {n})"));
                return Err(client
                    .connector
                    .client_error(e)
                    .context(format!("the watch ended{resume}")));
            }
        };
        seen += 1;
        next = Some(event.index + 1);
        let (kind, detail) = match &event.outcome {
            Some(Outcome::Reply(r)) => ("reply", output::show_bytes(r)),
            Some(Outcome::Rejected(m)) => ("rejected", m.clone()),
            Some(Outcome::Failed(m)) => ("failed", m.clone()),
            Some(Outcome::Version(v)) => ("version", v.to_string()),
            Some(Outcome::Emitted(topic)) => ("event", topic.clone()),
            Some(Outcome::Fired(key)) => ("timer", key.clone()),
            None => ("unknown", String::new()),
        };
        match client.output {
            Output::Json => {
                let mut doc = serde_json::Map::new();
                doc.insert("index".into(), event.index.into());
                doc.insert("service".into(), event.service.clone().into());
                doc.insert("timestamp_ms".into(), event.timestamp_ms.into());
                if !event.payload.is_empty() {
                    doc.insert("payload".into(), output::show_bytes(&event.payload).into());
                }
                doc.insert(kind.into(), detail.into());
                println!("{}", serde_json::Value::Object(doc));
            }
            Output::Text => {
                let payload = output::show_bytes(&event.payload);
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
pub async fn deploy(client: &Client, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let module = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let waft = client.connector.client(&client.endpoints).await?;
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
    let header = api::DeployHeader {
        service: args.service.clone(),
        size,
        dry_run: args.dry_run,
        fuel_per_apply: args.fuel.unwrap_or(0),
        max_memory_bytes: args.max_memory_mib.map_or(0, |m| m.saturating_mul(1 << 20)),
        verify: args.verify,
        force: args.force,
        replay,
    };
    // On a terminal in text mode: a spinner that counts the upload, then a line for each step
    // on the leader (each member's compile, the check, the proposal).
    let spinner = super::progress::spinner(client.output, "uploading");
    // Through waft-client: to the leader, retried while the cluster cannot take it.
    let reply = match &spinner {
        Some(s) => {
            let progress = super::progress::upload(s.clone(), size);
            let told = super::progress::deploy_steps(s.clone());
            waft.deploy_watched(header, &module, Some(progress), told)
                .await
        }
        None => waft.deploy_reply(header, &module, None).await,
    }
    .map_err(|e| client.connector.client_error(e));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let reply = reply?;
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
                output::print_trial(t);
            }
            if args.verify {
                output::print_findings(&reply.findings);
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

/// `waft rollback`.
pub async fn rollback(client: &Client, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let waft = WaftClient::new(client.connect().await?);
    let request = api::RollbackRequest {
        service: args.service.clone(),
        to_version: args.to.unwrap_or(0),
    };
    // On a terminal: the leader's check of the version, each member's compile of its module and
    // the proposal, as they happen (RollbackWatched; a node of an earlier release does not
    // know it: then a spinner alone).
    let spinner = super::progress::spinner(client.output, "rolling back");
    let told = spinner.clone().map(super::progress::deploy_steps);
    let reply = retrying(|| {
        let mut w = waft.clone();
        let r = request.clone();
        let told = told.clone();
        async move {
            let Some(told) = told else {
                return w.rollback(r).await.map(tonic::Response::into_inner);
            };
            let mut stream = match w.rollback_watched(r.clone()).await {
                Ok(s) => s.into_inner(),
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    return w.rollback(r).await.map(tonic::Response::into_inner);
                }
                Err(s) => return Err(s),
            };
            while let Some(m) = stream.message().await? {
                match m.kind {
                    Some(api::deploy_progress::Kind::Step(s)) => told(&s),
                    Some(api::deploy_progress::Kind::Done(reply)) => return Ok(reply),
                    None => {}
                }
            }
            Err(tonic::Status::unavailable(
                "the rollback's progress ended before its reply; it may have gone through: \
                 look at waft services",
            ))
        }
    })
    .await
    .map_err(|s| client.status_error(s));
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let reply = reply?;
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
pub async fn services(client: &Client) -> anyhow::Result<ExitCode> {
    let mut waft = WaftClient::new(client.connect().await?);
    let reply = waft
        .list_services(api::ListServicesRequest {})
        .await
        .map_err(|s| client.status_error(s))?
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
                        "max_memory_bytes": s.max_memory_bytes, "memory_bytes": s.memory_bytes,
                        "code_bytes": s.code_bytes, "history": history, "fsm_version": s.fsm_version,
                        "pending_timers": s.pending_timers, "next_timer_ms": s.next_timer_ms})
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        Output::Text => {
            println!(
                "{:<16} {:>7} {:<14} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
                "SERVICE",
                "VERSION",
                "MODULE",
                "SIZE",
                "DEPLOYED@",
                "STATE",
                "FUEL/APPLY",
                "MEMORY",
                "CODE"
            );
            for s in &reply.services {
                let fuel = if s.fuel_per_apply == 0 {
                    "default".to_owned()
                } else {
                    s.fuel_per_apply.to_string()
                };
                println!(
                    "{:<16} {:>7} {:<14} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
                    s.name,
                    s.version,
                    &s.module_sha256[..12.min(s.module_sha256.len())],
                    output::size(s.module_size),
                    s.deployed_at_index,
                    output::size(s.state_bytes),
                    fuel,
                    output::size(s.memory_bytes),
                    output::size(s.code_bytes)
                );
                if s.pending_timers > 0 {
                    let held = if s.fsm_version == "0.1.0" {
                        format!(
                            "; not delivered while version {} (waft:fsm@0.1.0, no timers) serves",
                            s.version
                        )
                    } else {
                        String::new()
                    };
                    println!(
                        "  TIMERS: {} pending, the next due at {} ms{held}",
                        s.pending_timers, s.next_timer_ms
                    );
                }
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
