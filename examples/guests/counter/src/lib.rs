//! Named counters with typed JSON commands, written with `waft_guest::json`.
//!
//! Commands: `{"add": {"name": "hits", "by": 5}}`, `{"reset": {"name": "hits"}}`.
//! Queries: `{"get": {"name": "hits"}}`, `"list"`.
//! Each counter remembers the log index and the leader timestamp of its last change, which shows
//! how a guest reads deterministic time from the apply context.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use waft_guest::Context;
use waft_guest::json::{Json, JsonStateMachine};

#[derive(Default, Serialize, Deserialize)]
struct Counters {
    counters: BTreeMap<String, Counter>,
}

#[derive(Default, Clone, Serialize, Deserialize)]
struct Counter {
    value: i64,
    changed_at_index: u64,
    changed_at_ms: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Command {
    Add { name: String, by: i64 },
    Reset { name: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Query {
    Get { name: String },
    List,
}

#[derive(Serialize)]
#[serde(untagged)]
enum QueryReply {
    One(Counter),
    All(BTreeMap<String, i64>),
}

impl JsonStateMachine for Counters {
    type Command = Command;
    type Reply = i64;
    type Query = Query;
    type QueryReply = QueryReply;

    fn apply(&mut self, ctx: &Context, command: Command) -> Result<i64, String> {
        match command {
            Command::Add { name, by } => {
                let counter = self.counters.entry(name.clone()).or_default();
                // Check before changing anything: a rejected command must leave no trace.
                let value = counter
                    .value
                    .checked_add(by)
                    .ok_or_else(|| format!("counter {name} would overflow"))?;
                *counter = Counter {
                    value,
                    changed_at_index: ctx.index,
                    changed_at_ms: ctx.timestamp_ms,
                };
                Ok(value)
            }
            Command::Reset { name } => match self.counters.remove(&name) {
                Some(old) => Ok(old.value),
                None => Err(format!("no counter named {name}")),
            },
        }
    }

    fn query(&self, query: Query) -> Result<QueryReply, String> {
        match query {
            Query::Get { name } => self
                .counters
                .get(&name)
                .cloned()
                .map(QueryReply::One)
                .ok_or_else(|| format!("no counter named {name}")),
            Query::List => Ok(QueryReply::All(
                self.counters
                    .iter()
                    .map(|(k, c)| (k.clone(), c.value))
                    .collect(),
            )),
        }
    }
}

waft_guest::export!(Json<Counters>);
