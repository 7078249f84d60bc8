//! A Rust client for [waft](https://example.invalid/waft): replicated state machines in
//! WebAssembly, on Raft.
//!
//! Connect to any node; the client asks it for the leader and talks to the leader directly,
//! and finds it again when it changes. Every call has a deadline; a call the cluster cannot
//! take now (an election, a node going down) is made again on another node, a little later
//! each time. Commands carry an exactly-once client session, so a command made again after an
//! unknown outcome is applied at most once.
//!
//! ```no_run
//! use waft_client::{Client, Consistency, Outcome};
//!
//! # async fn tour() -> Result<(), waft_client::Error> {
//! let client = Client::builder(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
//!     .connect()
//!     .await?;
//! // Deploy a guest (a component implementing wit/), then use it.
//! let module = std::fs::read("kv.wasm").expect("a module");
//! let deployed = client.deploy("kv", &module).await?;
//! println!("kv is at version {} from index {}", deployed.version, deployed.index);
//!
//! let applied = client.submit("kv", "put greeting hello").await?;
//! assert_eq!(applied.outcome, Outcome::Ok(b"OK".to_vec()));
//!
//! let answer = client.query("kv", "get greeting", Consistency::Linearizable).await?;
//! assert_eq!(answer.outcome, Outcome::Ok(b"hello".to_vec()));
//! # Ok(())
//! # }
//! ```
//!
//! Many commands at once: [`Client::submit_batch`] (one request), or a [`Session`], which
//! pipelines requests over one stream:
//!
//! ```no_run
//! # async fn bulk(client: waft_client::Client) -> Result<(), waft_client::Error> {
//! let session = client.session();
//! let puts: Vec<String> = (0..1000).map(|i| format!("put k{i} v{i}")).collect();
//! let in_flight = puts.chunks(100).map(|chunk| session.submit("kv", chunk.to_vec()));
//! for results in futures::future::join_all(in_flight).await {
//!     for result in results? {
//!         result?.outcome.into_result().expect("applied");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Watching what a service applies, resumed across node failures:
//!
//! ```no_run
//! use futures::StreamExt;
//! # async fn follow(client: waft_client::Client) -> Result<(), waft_client::Error> {
//! let mut events = client.watch(Some("kv"), Some(1));
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("{} {:?}", event.index, String::from_utf8_lossy(&event.payload));
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Over TLS with a token:
//!
//! ```no_run
//! # async fn secure() -> Result<(), waft_client::Error> {
//! use waft_client::{Client, Tls};
//! let client = Client::builder(["node1.example:7001"])
//!     .tls(Tls::from_ca_file("ca.pem")?)
//!     .token(std::env::var("WAFT_TOKEN").unwrap_or_default())
//!     .connect()
//!     .await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

mod client;
pub mod codec;
pub mod connect;
mod error;
pub mod pipe;
mod pool;
pub mod proto;
mod reply;
mod session;
mod watch;

pub use client::{Client, Progress, Steps, deploy_chunks};
pub use connect::{Conn, Tls};
pub use error::Error;
pub use pool::ClientBuilder;
pub use reply::{Answer, Applied, Consistency, Deployed, Outcome};
pub use session::{Session, from_result};
pub use watch::{Event, Watch};

/// A copy of `status` (its code and message) for each of several callers it concerns.
pub fn copy_status(status: &tonic::Status) -> tonic::Status {
    tonic::Status::new(status.code(), status.message())
}
