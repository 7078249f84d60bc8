//! Releases and cluster versions.
//!
//! A build is a release (a semantic version, CHANGELOG.md) built from a commit. A **cluster
//! version** is a number naming a set of formats: the log entries, snapshot files and
//! node-to-node messages its nodes write. Each build runs a range of cluster versions
//! ([`Runs::THIS_BUILD`]): it reads the formats of every version in the range and writes those
//! of the cluster's *active* version, which is replicated (a log entry raises it, snapshots
//! carry it). So nodes of two builds can run side by side while the active version is one both
//! run, and a downgrade works until the version is raised past what the older build runs.
//!
//! The active version rises only when every member runs a build that runs the new one
//! (`crate::upgrade` asks them, then proposes the entry): automatically, or with
//! `waft cluster finalize-upgrade`. It never goes down. A change of any format is a
//! [`Gate`]: written only once the active version reaches the gate's, and refused before
//! then in words that name the members still on a build that cannot read it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// This build's release.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");
/// The commit this build was made from (`unknown` outside a git checkout).
pub const COMMIT: &str = env!("WAFT_COMMIT");

/// The version of a cluster whose version was never raised, and of every data directory,
/// snapshot and backup written before cluster versions existed.
pub const FIRST: u32 = 1;

/// The first release that runs each cluster version, oldest first (for messages that tell an
/// operator which build to run).
pub const RELEASES: &[(u32, &str)] = &[(1, "0.1.0")];

/// A format change, and the cluster version from which nodes may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// What the change lets a node write, in words ("deploying a guest that sets timers").
    pub what: &'static str,
    /// The cluster version from which it is written.
    pub since: u32,
}

/// Every gate of this build, oldest first. Empty in 0.1.0, the first release: its formats are
/// cluster version 1's. A release that changes a format adds a gate here, a cluster version
/// to [`RELEASES`] and to [`Runs::THIS_BUILD`], and checks the gate where the format is written
/// (`crate::upgrade::require`).
pub const GATES: &[Gate] = &[];

/// A range of cluster versions a build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runs {
    /// The oldest version it can run (and so downgrade to).
    pub oldest: u32,
    /// The newest version it can run.
    pub newest: u32,
}

impl Runs {
    /// The cluster versions this build runs.
    pub const THIS_BUILD: Runs = Runs {
        oldest: FIRST,
        newest: FIRST,
    };

    /// Whether a node of this range can run a cluster at `version`.
    pub fn runs(&self, version: u32) -> bool {
        (self.oldest..=self.newest).contains(&version)
    }

    /// Parses `N` or `A-B` (the hidden node flag `--cluster-versions`, with which a test plays
    /// a build of another range).
    pub fn parse(s: &str) -> Result<Runs, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|v| *v >= FIRST)
                .ok_or_else(|| format!("{t:?} is not a cluster version (1 or more)"))
        };
        let (oldest, newest) = match s.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(s)?, number(s)?),
        };
        if oldest > newest {
            return Err(format!("{s:?}: the oldest version is above the newest"));
        }
        Ok(Runs { oldest, newest })
    }

    /// Why a node of this range cannot run a cluster at `active` (`None`: it can).
    pub fn refusal(&self, active: u32) -> Option<String> {
        if self.runs(active) {
            return None;
        }
        Some(if active > self.newest {
            format!(
                "the cluster runs cluster version {active}, and this build ({RELEASE}) runs {self}: \
                 it cannot read what the other members write. Run {} on this node",
                release_for(active)
            )
        } else {
            format!(
                "the cluster runs cluster version {active}, and this build ({RELEASE}) runs {self}: \
                 it no longer reads that version's formats. Upgrade the cluster through {} first, \
                 or run that release on this node",
                release_for(self.oldest - 1)
            )
        })
    }
}

impl fmt::Display for Runs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oldest == self.newest {
            write!(f, "cluster version {}", self.oldest)
        } else {
            write!(f, "cluster versions {} to {}", self.oldest, self.newest)
        }
    }
}

/// Which release to run for cluster version `version`: the first that runs it, or "a later
/// release" for a version this build does not know.
pub fn release_for(version: u32) -> String {
    RELEASES.iter().find(|(v, _)| *v == version).map_or_else(
        || format!("a release that runs cluster version {version}"),
        |(_, r)| format!("waft {r} or later"),
    )
}

/// What `gate` needs of the cluster at `active`: `Ok` once it is open, else a refusal naming
/// the members (`(id, what each runs, or None when it did not answer)`) that keep it closed.
pub fn check_gate(gate: Gate, active: u32, members: &[(u64, Option<Runs>)]) -> Result<(), String> {
    if active >= gate.since {
        return Ok(());
    }
    let blocking: Vec<String> = members
        .iter()
        .filter_map(|(id, runs)| match runs {
            None => Some(format!("node {id} (did not answer)")),
            Some(r) if r.newest < gate.since => Some(format!("node {id} (runs {r})")),
            Some(_) => None,
        })
        .collect();
    let why = if blocking.is_empty() {
        "every member runs it: finalize the upgrade (`waft cluster finalize-upgrade`) or wait \
         for the leader to"
            .to_owned()
    } else {
        format!(
            "upgrade {} to {}, then finalize",
            blocking.join(", "),
            release_for(gate.since)
        )
    };
    Err(format!(
        "{} needs cluster version {}, and the cluster runs {active}: {why}",
        gate.what, gate.since
    ))
}

/// The version every member can run: the lowest newest version among `members`, if all
/// answered; otherwise the members that did not, as an error.
pub fn highest_common(members: &[(u64, Option<Runs>)]) -> Result<u32, Vec<u64>> {
    let silent: Vec<u64> = members
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(id, _)| *id)
        .collect();
    if !silent.is_empty() {
        return Err(silent);
    }
    Ok(members
        .iter()
        .filter_map(|(_, r)| r.map(|r| r.newest))
        .min()
        .unwrap_or(FIRST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_in_words() {
        assert_eq!(
            Runs::parse("2").expect("given"),
            Runs {
                oldest: 2,
                newest: 2
            }
        );
        assert_eq!(
            Runs::parse("1-3").expect("given"),
            Runs {
                oldest: 1,
                newest: 3
            }
        );
        assert!(Runs::parse("3-1").expect_err("refused").contains("above"));
        assert!(Runs::parse("0").expect_err("refused").contains("1 or more"));
        assert!(Runs::parse("x").is_err());
        let one = Runs::parse("1").expect("given");
        assert!(one.refusal(1).is_none());
        let too_old = one.refusal(2).expect("given");
        assert!(too_old.contains("runs cluster version 2"), "{too_old}");
        assert!(too_old.contains("cluster version 1"), "{too_old}");
        let too_new = Runs::parse("2-3")
            .expect("given")
            .refusal(1)
            .expect("given");
        assert!(too_new.contains("no longer reads"), "{too_new}");
        assert!(too_new.contains("waft 0.1.0 or later"), "{too_new}");
    }

    #[test]
    fn a_closed_gate_names_the_members_that_keep_it_closed() {
        let gate = Gate {
            what: "deploying a guest that sets timers",
            since: 2,
        };
        let members = [
            (
                1,
                Some(Runs {
                    oldest: 1,
                    newest: 2,
                }),
            ),
            (
                2,
                Some(Runs {
                    oldest: 1,
                    newest: 1,
                }),
            ),
            (3, None),
        ];
        assert!(check_gate(gate, 2, &members).is_ok());
        let e = check_gate(gate, 1, &members).expect_err("refused");
        assert!(
            e.starts_with("deploying a guest that sets timers needs cluster version 2"),
            "{e}"
        );
        assert!(e.contains("node 2 (runs cluster version 1)"), "{e}");
        assert!(e.contains("node 3 (did not answer)"), "{e}");
        assert!(!e.contains("node 1"), "{e}");
        let all_new = [(
            1,
            Some(Runs {
                oldest: 1,
                newest: 2,
            }),
        )];
        assert!(
            check_gate(gate, 1, &all_new)
                .expect_err("refused")
                .contains("finalize-upgrade")
        );
        assert_eq!(highest_common(&members), Err(vec![3]));
        assert_eq!(highest_common(&members[..2]), Ok(1));
        assert_eq!(highest_common(&all_new), Ok(2));
    }

    #[test]
    fn this_build_runs_its_releases_versions() {
        assert!(Runs::THIS_BUILD.runs(FIRST));
        let newest = RELEASES.last().expect("given").0;
        assert_eq!(Runs::THIS_BUILD.newest, newest);
        for g in GATES {
            assert!(Runs::THIS_BUILD.runs(g.since), "{g:?}");
        }
    }
}
