//! The README's tour with the Rust client instead of the CLI. Leave `waft dev` running, then:
//! `cargo run -p waft-client --example tour` (or pass the nodes' addresses as arguments).

use futures::StreamExt;
use waft_client::{Client, Consistency, Outcome};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut endpoints: Vec<String> = std::env::args().skip(1).collect();
    if endpoints.is_empty() {
        endpoints = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
            .map(String::from)
            .to_vec();
    }
    let client = Client::builder(endpoints.clone()).connect().await?;
    println!("talking to {:?}", client.current_endpoint().await);

    // waft submit --service kv 'put greeting hello'
    let put = client.submit("kv", "put greeting hello").await?;
    println!("put greeting: {:?} at index {}", put.outcome, put.index);
    // waft query --service kv 'get greeting'
    let got = client
        .query("kv", "get greeting", Consistency::Linearizable)
        .await?;
    println!("get greeting: {}", show(&got.outcome));
    // waft --endpoint 127.0.0.1:7003 query --service kv 'scan' --consistency stale
    if let Some(third) = endpoints.get(2) {
        let node3 = Client::builder([third.clone()])
            .follow_leader(false)
            .connect()
            .await?;
        let scan = node3.query("kv", "scan", Consistency::Stale).await?;
        println!("node 3's copy: {}", show(&scan.outcome));
    }
    // waft submit --service kv 'cas colour red blue': refused by the guest, not an error
    let cas = client.submit("kv", "cas colour red blue").await?;
    println!("cas: {}", show(&cas.outcome));
    // waft cluster status
    let status = client.status().await?;
    println!(
        "node {} is {} in term {}, leader {:?}",
        status.node_id, status.role, status.term, status.leader_id
    );
    // waft watch --service kv --from 1 --count 3
    let mut events = client.watch(Some("kv"), Some(1)).take(3);
    while let Some(event) = events.next().await {
        let event = event?;
        println!(
            "{} {}",
            event.index,
            String::from_utf8_lossy(&event.payload)
        );
    }
    // waft services
    for s in client.services().await? {
        println!(
            "{} version {} ({} bytes of state)",
            s.name, s.version, s.state_bytes
        );
    }
    Ok(())
}

fn show(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(b) => String::from_utf8_lossy(b).into_owned(),
        Outcome::Rejected(m) => format!("rejected: {m}"),
        Outcome::Trapped(m) => format!("trapped: {m}"),
    }
}
