//! `waft cluster ...`: membership, status, snapshots and audits.

use super::connect::{Client, Conn, Output, retrying};
use super::output;
use crate::pb::api::{self, cluster_client::ClusterClient};
use clap::Subcommand;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Hand leadership to another voter, and wait (up to 15 s) until the node asked sees it
    /// lead; exit 1 if it does not.
    TransferLeader {
        /// The voter to lead.
        to: u64,
    },
    /// Show roles, terms, log and apply progress, and member lag.
    Status,
    /// Raise the cluster version to the newest every member's build runs, so that nodes may
    /// write its formats (once every node runs the new release; the leader does it by itself
    /// unless nodes run with --manual-finalize). Refused, naming it, while a member does not
    /// answer. The version never goes down: after this, no node can go back to a build that
    /// does not run it.
    FinalizeUpgrade,
    /// Build a snapshot now.
    Snapshot,
    /// Check now that every replica holds byte-identical state, and show each node's verdict
    /// (exits non-zero on a divergence or an unreachable node).
    Audit,
}

/// `waft cluster ...`.
pub async fn cluster(client: &Client, command: &ClusterCommand) -> anyhow::Result<ExitCode> {
    let mut c = ClusterClient::new(client.connect().await?);
    match command {
        ClusterCommand::Init => {
            let r = c
                .init(api::InitRequest { members: vec![] })
                .await
                .map_err(|s| client.status_error(s))?;
            output::print_members(client.output, r.get_ref());
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
            .map_err(|s| client.status_error(s))?;
            output::print_members(client.output, r.get_ref());
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
            .map_err(|s| client.status_error(s))?;
            output::print_members(client.output, r.get_ref());
        }
        ClusterCommand::Remove { id } => {
            let r = c
                .remove_node(api::RemoveNodeRequest { id: *id })
                .await
                .map_err(|s| client.status_error(s))?;
            output::print_members(client.output, r.get_ref());
        }
        ClusterCommand::TransferLeader { to } => return transfer_leader(client, &mut c, *to).await,
        ClusterCommand::Snapshot => {
            c.trigger_snapshot(api::TriggerSnapshotRequest {})
                .await
                .map_err(|s| client.status_error(s))?;
            if client.output == Output::Text {
                println!("snapshot requested");
            }
        }
        ClusterCommand::Status => {
            let s = c
                .status(api::StatusRequest {
                    member_versions: true,
                })
                .await
                .map_err(|s| client.status_error(s))?
                .into_inner();
            output::print_status(client.output, &s);
        }
        ClusterCommand::Audit => return audit(client, &mut c).await,
        ClusterCommand::FinalizeUpgrade => {
            let r = c
                .finalize_upgrade(api::FinalizeUpgradeRequest {})
                .await
                .map_err(|s| client.status_error(s))?
                .into_inner();
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"previous": r.previous, "cluster_version": r.cluster_version,
                        "index": r.index, "newest_already": r.newest_already})
                ),
                Output::Text if r.index > 0 => println!(
                    "cluster version {} -> {} (entry {})",
                    r.previous, r.cluster_version, r.index
                ),
                Output::Text => println!(
                    "the cluster runs cluster version {} already, the newest {} run{}",
                    r.cluster_version,
                    match r.newest_already.as_slice() {
                        [] => "every member can".to_owned(),
                        ids => format!(
                            "node{} {}",
                            if ids.len() == 1 { "" } else { "s" },
                            ids.iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    },
                    if r.newest_already.len() == 1 { "s" } else { "" }
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `waft cluster transfer-leader` waits to see the new leader: a transfer is an
/// election, which takes a few hundred milliseconds.
const TRANSFER_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// `waft cluster transfer-leader`: asks, then waits until the node asked sees `to` lead.
async fn transfer_leader(
    client: &Client,
    c: &mut ClusterClient<Conn>,
    to: u64,
) -> anyhow::Result<ExitCode> {
    c.transfer_leader(api::TransferLeaderRequest { to })
        .await
        .map_err(|s| client.status_error(s))?;
    let spinner = super::progress::spinner(
        client.output,
        &format!("waiting for node {to} to take over"),
    );
    let started = std::time::Instant::now();
    let seen = loop {
        // A node may be between leaders for a moment: ask again.
        let status = c
            .status(api::StatusRequest::default())
            .await
            .map(|r| r.into_inner());
        let done = status.as_ref().is_ok_and(|s| s.leader_id == Some(to));
        if done || started.elapsed() >= TRANSFER_WAIT {
            break status.ok();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let (leader, term) = seen.map_or((None, 0), |s| (s.leader_id, s.term));
    let moved = leader == Some(to);
    match client.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"to": to, "leader": leader, "term": term, "moved": moved})
        ),
        Output::Text if moved => println!(
            "node {to} leads (term {term}, after {:.1} s)",
            started.elapsed().as_secs_f64()
        ),
        Output::Text => println!(
            "asked node {to} to take over, but after {} s {}",
            TRANSFER_WAIT.as_secs(),
            leader.map_or("no leader is known".to_owned(), |l| format!(
                "node {l} leads"
            ))
        ),
    }
    Ok(if moved {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn audit(client: &Client, c: &mut ClusterClient<Conn>) -> anyhow::Result<ExitCode> {
    let reply = retrying(|| {
        let mut c = c.clone();
        async move { c.audit(api::AuditRequest {}).await }
    })
    .await
    .map_err(|s| client.status_error(s))?
    .into_inner();
    let members = c
        .status(api::StatusRequest::default())
        .await
        .map_err(|s| client.status_error(s))?
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
                node = client
                    .connector
                    .connect(&m.addr)
                    .await
                    .ok()
                    .map(ClusterClient::new);
            }
            let status = match node.as_mut() {
                Some(c) => c.status(api::StatusRequest::default()).await,
                None => Err(tonic::Status::unavailable(format!(
                    "cannot reach {}",
                    m.addr
                ))),
            };
            match status {
                Ok(s) if s.get_ref().applied_index >= reply.report_index => {
                    verdict = output::audit_verdict(
                        &s.get_ref().audit.clone().unwrap_or_default(),
                        reply.index,
                    );
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
