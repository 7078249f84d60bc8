//! The node's guest memory budget (`waft node --max-guest-memory`): what the services on a
//! node may take, counted before a deploy is proposed.
//!
//! A service reserves its memory limit (the most linear memory its guest may grow to: its own
//! `--max-memory-mib`, or the node's default) plus the compiled code of its module, counted
//! once for every service running that module. A deploy or rollback that would take the
//! reservation over the budget of the leader, or of a member asked to hold the module, is
//! refused before anything is proposed. The
//! budget is this node's rule, never the log's: a node restarted with a smaller budget than
//! its services reserve keeps applying and serving them (replicas must stay identical) and
//! says so in its log and `cluster status`.

use crate::runtime::ModuleHash;
use crate::storage::{ServiceInfo, StateHandle};
use std::collections::BTreeMap;

/// What one service reserves on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// The service.
    pub name: String,
    /// Its memory limit, bytes.
    pub memory_limit: u64,
    /// Its module, and that module's compiled code in bytes.
    pub module: ModuleHash,
    pub code_bytes: u64,
}

/// The reservations of a node's services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservations(pub Vec<Reserved>);

impl Reservations {
    /// The active versions of `services`; `default_limit` is the node's memory limit for a
    /// service without its own.
    pub fn of(services: &[ServiceInfo], default_limit: u64) -> Reservations {
        Reservations(
            services
                .iter()
                .map(|s| Reserved {
                    name: s.name.clone(),
                    memory_limit: s
                        .history
                        .last()
                        .and_then(|v| v.limits.max_memory_bytes)
                        .unwrap_or(default_limit),
                    module: s.module.hash,
                    code_bytes: s.module.code_bytes as u64,
                })
                .collect(),
        )
    }

    /// What the services of `state`'s node reserve now.
    pub fn of_node(state: &StateHandle) -> Reservations {
        Reservations::of(&state.services(), state.default_memory_limit())
    }

    /// Bytes of compiled code: each module's once.
    pub fn code(&self) -> u64 {
        let code: BTreeMap<ModuleHash, u64> =
            self.0.iter().map(|r| (r.module, r.code_bytes)).collect();
        code.values().sum()
    }

    /// Bytes reserved: every memory limit, and each module's code once.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|r| r.memory_limit).sum::<u64>() + self.code()
    }

    /// The reservations once `next` replaces the service of the same name (or joins them).
    pub fn with(&self, next: Reserved) -> Reservations {
        let mut all: Vec<Reserved> = self
            .0
            .iter()
            .filter(|r| r.name != next.name)
            .cloned()
            .collect();
        all.push(next);
        Reservations(all)
    }

    /// Refuses, in words, a change that takes the reservation over `budget` bytes. A change
    /// that does not add to the reservation is always allowed (a node already over its budget
    /// can still roll a service back to something smaller).
    pub fn check(&self, next: Reserved, budget: Option<u64>) -> Result<(), String> {
        let Some(budget) = budget else {
            return Ok(());
        };
        let (before, name) = (self.total(), next.name.clone());
        let after = self.with(next);
        let total = after.total();
        if total <= budget || total <= before {
            return Ok(());
        }
        let each: Vec<String> = after
            .0
            .iter()
            .map(|r| {
                format!(
                    "{} {} MiB + {} MiB of code",
                    r.name,
                    mib(r.memory_limit),
                    mib(r.code_bytes)
                )
            })
            .collect();
        Err(format!(
            "this would reserve {} MiB of guest memory on node's budget of {} MiB \
             (--max-guest-memory; each service reserves its memory limit and its module's \
             compiled code: {}); give {name:?} a smaller --max-memory-mib, remove a service, or \
             raise the budget",
            mib(total),
            mib(budget),
            each.join(", ")
        ))
    }
}

/// Refuses, in words, running `module` (`code_bytes` of compiled code) as `service` with
/// `memory_limit` on the node of `state` if that takes its reservation over `budget`: the
/// check of the leader before a deploy or rollback, and of each member asked to hold the module.
pub fn check_change(
    state: &StateHandle,
    service: &str,
    memory_limit: u64,
    module: ModuleHash,
    code_bytes: u64,
    budget: Option<u64>,
) -> Result<(), String> {
    let next = Reserved {
        name: service.to_owned(),
        memory_limit,
        module,
        code_bytes,
    };
    Reservations::of_node(state).check(next, budget)
}

/// Whole MiB from 10 on, one decimal below.
pub fn mib(bytes: u64) -> String {
    let m = bytes as f64 / f64::from(1u32 << 20);
    if m >= 10.0 || m.fract() == 0.0 {
        format!("{m:.0}")
    } else {
        format!("{m:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, limit_mib: u64, module: u8, code_mib: u64) -> Reserved {
        Reserved {
            name: name.into(),
            memory_limit: limit_mib << 20,
            module: ModuleHash([module; 32]),
            code_bytes: code_mib << 20,
        }
    }

    #[test]
    fn a_service_reserves_its_limit_and_each_module_counts_once() {
        let all = Reservations(vec![
            r("a", 256, 1, 36),
            r("b", 64, 1, 36),
            r("c", 64, 2, 1),
        ]);
        assert_eq!(all.total(), (256 + 64 + 64 + 36 + 1) << 20);
    }

    #[test]
    fn a_deploy_over_the_budget_is_refused_in_words_and_one_within_it_passes() {
        let all = Reservations(vec![r("a", 256, 1, 36)]);
        // No budget: anything goes.
        assert!(all.check(r("b", 4096, 2, 100), None).is_ok());
        // Within: 256 + 36 + 128 + 10 = 430 MiB of 512.
        assert!(all.check(r("b", 128, 2, 10), Some(512 << 20)).is_ok());
        let e = all
            .check(r("b", 256, 2, 10), Some(512 << 20))
            .expect_err("over");
        assert!(e.contains("558 MiB"), "{e}");
        assert!(e.contains("512 MiB"), "{e}");
        assert!(e.contains("\"b\""), "{e}");
        assert!(e.contains("a 256 MiB + 36 MiB of code"), "{e}");
        // A new version of a service replaces its reservation.
        assert!(all.check(r("a", 400, 3, 36), Some(512 << 20)).is_ok());
        // Running the same module as another service costs no more code.
        assert!(all.check(r("b", 200, 1, 36), Some(512 << 20)).is_ok());
    }

    #[test]
    fn a_node_over_its_budget_may_still_shrink() {
        let all = Reservations(vec![r("a", 256, 1, 36), r("b", 256, 2, 36)]);
        let budget = Some(256 << 20);
        assert!(all.check(r("b", 64, 2, 36), budget).is_ok(), "smaller");
        assert!(all.check(r("b", 300, 2, 36), budget).is_err(), "larger");
    }
}
