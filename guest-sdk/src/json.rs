//! Typed commands, replies and snapshots as JSON, through serde.
//!
//! Implement [`JsonStateMachine`] for a `Serialize + Deserialize` type and export
//! `waft_guest::json::Json<YourType>`. Commands and queries arrive as JSON documents and replies
//! leave as JSON; a command that does not parse is rejected with serde's message. The snapshot
//! is the state serialized as JSON, which is canonical as long as the state holds ordered
//! collections (`BTreeMap`, `Vec`), never a `HashMap`.
//!
//! ```ignore
//! use serde::{Deserialize, Serialize};
//! use waft_guest::{json::{Json, JsonStateMachine}, Context};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Counter { value: i64 }
//!
//! #[derive(Deserialize)]
//! enum Command { Add(i64) }
//!
//! impl JsonStateMachine for Counter {
//!     type Command = Command;
//!     type Reply = i64;
//!     type Query = ();
//!     type QueryReply = i64;
//!     fn apply(&mut self, _ctx: &Context, command: Command) -> Result<i64, String> {
//!         let Command::Add(n) = command;
//!         self.value = self.value.checked_add(n).ok_or("overflow")?;
//!         Ok(self.value)
//!     }
//!     fn query(&self, _query: ()) -> Result<i64, String> { Ok(self.value) }
//! }
//!
//! waft_guest::export!(Json<Counter>);
//! ```

use crate::{Context, StateMachine};
use serde::{Serialize, de::DeserializeOwned};

/// A state machine whose commands, queries, replies and snapshots are JSON documents.
pub trait JsonStateMachine: Default + Serialize + DeserializeOwned + 'static {
    /// The command type, parsed from the submitted payload.
    type Command: DeserializeOwned;
    /// The reply to a command, serialized back to the client.
    type Reply: Serialize;
    /// The query type, parsed from the query payload.
    type Query: DeserializeOwned;
    /// The reply to a query.
    type QueryReply: Serialize;

    /// Applies a parsed command; on `Err` the state must be unchanged.
    fn apply(&mut self, ctx: &Context, command: Self::Command) -> Result<Self::Reply, String>;

    /// Answers a parsed query without changing state.
    fn query(&self, query: Self::Query) -> Result<Self::QueryReply, String>;

    /// Takes a due timer (see [`StateMachine::fire`]); the default refuses.
    fn fire(&mut self, ctx: &Context, key: &str, payload: &[u8]) -> Result<(), String> {
        let _ = (ctx, payload);
        Err(format!("this guest sets no timers (timer {key:?})"))
    }
}

/// Adapts a [`JsonStateMachine`] to the byte-level [`StateMachine`] that `export!` takes.
#[derive(Debug, Default)]
pub struct Json<T>(pub T);

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed {what}: {e}"))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("cannot encode reply: {e}"))
}

impl<T: JsonStateMachine> StateMachine for Json<T> {
    fn apply(&mut self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        let command = decode("command", command)?;
        encode(&self.0.apply(ctx, command)?)
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let query = decode("query", request)?;
        encode(&self.0.query(query)?)
    }

    fn fire(&mut self, ctx: &Context, key: &str, payload: &[u8]) -> Result<(), String> {
        self.0.fire(ctx, key, payload)
    }

    fn snapshot(&self) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail unless a Serialize impl errors on purpose,
        // in which case a trap (and the host's rollback) is the right outcome.
        serde_json::to_vec(&self.0).expect("state serializes to JSON")
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        decode("snapshot", snapshot).map(Json)
    }
}
