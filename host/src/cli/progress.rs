//! Progress of long work on a terminal: bars for bytes, a spinner with a line per step for the
//! rest. Nothing is drawn when standard error is not a terminal or the output is JSON.

use super::connect::Output;
use crate::pb::api::{self, deploy_step::Kind};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Whether to draw progress: text output, standard error a terminal.
pub fn shown(output: Output) -> bool {
    output == Output::Text && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// A bar for `total` bytes labelled `what` (`uploading`, `backup`), if progress is shown and
/// there are enough bytes to watch.
pub fn bytes(output: Output, what: &str, total: u64) -> Option<indicatif::ProgressBar> {
    (total > (4 << 20) && shown(output)).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{bytes}}/{{total_bytes}} [{{bar:30}}] {{bytes_per_sec}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// A spinner showing `message` and the time since it started, if progress is shown.
pub fn spinner(output: Output, message: &str) -> Option<indicatif::ProgressBar> {
    shown(output).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    })
}

/// Counts an upload of `total` bytes in `bar`'s message (from zero again when it restarts).
pub fn upload(bar: indicatif::ProgressBar, total: u64) -> waft_client::Progress {
    let sent = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |chunk: Option<u64>| {
        use std::sync::atomic::Ordering::Relaxed;
        let now = match chunk {
            None => {
                sent.store(0, Relaxed);
                0
            }
            Some(n) => sent.fetch_add(n, Relaxed) + n,
        };
        bar.set_message(format!(
            "uploading {} of {}",
            super::output::size(now),
            super::output::size(total)
        ));
    })
}

/// A deploy's steps on the leader, as they happen: a line for each (the members asked to
/// compile, each one's compile, the leader's check, the proposal) above a spinner that names
/// what the deploy waits for.
pub fn deploy_steps(bar: indicatif::ProgressBar) -> waft_client::Steps {
    let waiting: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    Arc::new(move |step: &api::DeployStep| {
        let mut waiting = crate::sync::lock_anyway(&waiting);
        let seconds = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
        let line = match step.kind() {
            Kind::Received => format!("node {} (the leader) has the module", step.node),
            Kind::MembersAsked => {
                waiting.extend(&step.nodes);
                format!(
                    "{} fetch and compile it ({} of them must hold it, with the leader)",
                    nodes(&step.nodes),
                    step.needed
                )
            }
            Kind::MemberReady => {
                waiting.remove(&step.node);
                format!("node {} compiled it in {}", step.node, seconds(step.millis))
            }
            Kind::MemberFailed => {
                waiting.remove(&step.node);
                format!("node {} does not hold it: {}", step.node, step.detail)
            }
            Kind::Checked => format!(
                "node {} (the leader) compiled and checked it in {}",
                step.node,
                seconds(step.millis)
            ),
            Kind::Proposed => {
                waiting.clear();
                "proposed: waiting for it to be committed and applied".to_owned()
            }
            Kind::Unspecified => return,
        };
        bar.println(line);
        let waits: Vec<u64> = waiting.iter().copied().collect();
        bar.set_message(if step.kind() == Kind::Proposed {
            "committing".to_owned()
        } else if waits.is_empty() {
            "checking".to_owned()
        } else {
            format!("waiting for {} to compile", nodes(&waits))
        });
    })
}

/// `node 2`, `nodes 2, 3`.
fn nodes(ids: &[u64]) -> String {
    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
    match list.len() {
        1 => format!("node {}", list[0]),
        _ => format!("nodes {}", list.join(", ")),
    }
}
