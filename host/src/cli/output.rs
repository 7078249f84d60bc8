//! How client commands print: text for people, one JSON document for scripts.

use super::connect::Output;
use crate::pb::api;
use std::process::ExitCode;

/// A size for people: bytes below 1 KiB, else KiB, MiB or GiB with one decimal below 10
/// (`--output json` keeps exact bytes).
pub(super) fn size(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

pub(super) fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(t) => t.to_owned(),
        Err(_) => format!("0x{}", hex::encode(bytes)),
    }
}

pub(super) fn print_outcome(
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

pub(super) fn print_trial(t: &api::TrialReport) {
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

pub(super) fn print_findings(findings: &[String]) {
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

pub(super) fn print_members(out: Output, reply: &api::MembershipReply) {
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

/// A divergence in words: what differs, this node's value and the reference.
pub(super) fn divergence_text(d: &api::Divergence) -> String {
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
pub(super) fn heal_text(h: &api::Heal) -> String {
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
pub(super) fn audit_verdict(audit: &api::AuditStatus, index: u64) -> (&'static str, String) {
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

pub(super) fn print_status(out: Output, s: &api::StatusReply) {
    match out {
        Output::Json => {
            let members: Vec<_> = s
                .members
                .iter()
                .map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter, "matched_index": m.matched_index, "lag": m.lag,
                    "version": (!m.version.is_empty()).then_some(&m.version),
                    "runs": (m.runs_newest > 0).then_some([m.runs_oldest, m.runs_newest])}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"node_id": s.node_id, "role": s.role, "term": s.term, "leader_id": s.leader_id,
                    "leader_addr": s.leader_addr, "last_log_index": s.last_log_index, "committed_index": s.committed_index,
                    "applied_index": s.applied_index, "snapshot_index": s.snapshot_index, "engine": s.engine, "members": members,
                    "version": s.version, "commit": s.commit, "cluster_version": s.cluster_version,
                    "runs": [s.runs_oldest, s.runs_newest],
                    "cluster_id": s.cluster_id, "guest_memory": s.guest_memory.as_ref().map(|g| serde_json::json!({
                        "memory_bytes": g.memory_bytes, "code_bytes": g.code_bytes, "reserved_bytes": g.reserved_bytes,
                        "budget_bytes": g.budget_bytes})), "audit": s.audit.as_ref().map(|a| serde_json::json!({"checks": a.checks, "skipped": a.skipped,
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
            if s.version.is_empty() {
                println!("build: an earlier waft (it reports no version)");
            } else {
                println!("build: waft {} (commit {})", s.version, s.commit);
            }
            if s.cluster_version > 0 {
                let runs = crate::version::Runs {
                    oldest: s.runs_oldest,
                    newest: s.runs_newest,
                };
                println!(
                    "cluster version: {} (this build runs {runs})",
                    s.cluster_version
                );
            }
            println!("engine: {}", s.engine);
            if let Some(g) = &s.guest_memory {
                use crate::budget::mib;
                let budget = if g.budget_bytes == 0 {
                    "no budget".to_owned()
                } else if g.reserved_bytes > g.budget_bytes {
                    format!("OVER the budget of {} MiB", mib(g.budget_bytes))
                } else {
                    format!("budget {} MiB", mib(g.budget_bytes))
                };
                println!(
                    "guest memory: {} MiB in use, {} MiB of compiled code; {} MiB reserved, {budget}",
                    mib(g.memory_bytes),
                    mib(g.code_bytes),
                    mib(g.reserved_bytes)
                );
            }
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
                "{:>4}  {:<22} {:<8} {:>8} {:>6}  BUILD",
                "ID", "ADDRESS", "ROLE", "MATCHED", "LAG"
            );
            for m in &s.members {
                println!(
                    "{:>4}  {:<22} {:<8} {:>8} {:>6}  {}",
                    m.id,
                    m.addr,
                    if m.voter { "voter" } else { "learner" },
                    m.matched_index.map_or("-".to_owned(), |i| i.to_string()),
                    m.lag.map_or("-".to_owned(), |i| i.to_string()),
                    match (m.version.is_empty(), s.version.is_empty()) {
                        (false, _) if m.runs_newest > 0 => format!(
                            "{}, runs {}",
                            m.version,
                            crate::version::Runs {
                                oldest: m.runs_oldest,
                                newest: m.runs_newest
                            }
                        ),
                        (false, _) => m.version.clone(),
                        (true, false) => "(did not answer)".to_owned(),
                        (true, true) => "(unknown)".to_owned(),
                    }
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_in_the_unit_that_fits() {
        use super::size;
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(451_848), "441 KiB");
        assert_eq!(size(1_114_112), "1.1 MiB");
        assert_eq!(size(18 << 20), "18 MiB");
        assert_eq!(size(5 << 30), "5.0 GiB");
        assert_eq!(size(3 << 40), "3072 GiB");
    }
}
