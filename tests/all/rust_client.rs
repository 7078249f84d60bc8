//! The Rust client crate (`waft-client`) against real in-process clusters: the scenario every
//! client runs (submit with retry across a leader change, query at each consistency, deploy,
//! watch with resume) and the bad input a client must name (a down node, a wrong token, TLS on
//! one side only, a command too large, an unknown service): typed errors, never a hang.

use crate::support::cluster::{TestCluster, test_settings};
use crate::tls::{node_tls, pki};
use futures::StreamExt;
use std::time::Duration;
use waft::node::NodeConfig;
use waft_client::{Client, Consistency, Error, Outcome, Tls};
use waft_testkit::guests::EXAMPLE_KV;

fn ok(text: &str) -> Outcome {
    Outcome::Ok(text.as_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_client_follows_the_leader_across_a_change_applies_once_and_resumes_its_watch() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    // Given a follower first: the client asks it for the leader and talks to the leader.
    let endpoints = [follower, leader, (leader + 2) % 3].map(|i| cluster.addrs[i].clone());
    let client = Client::builder(endpoints.clone())
        .connect()
        .await
        .expect("connects");
    assert_eq!(
        client.current_endpoint().await.as_deref(),
        Some(cluster.addrs[leader].as_str()),
        "the client found the leader"
    );

    let module = waft_testkit::wasm(EXAMPLE_KV);
    let deployed = client.deploy("kv", &module).await.expect("deploys");
    assert_eq!(deployed.version, 1);
    assert!(!deployed.unchanged);
    let again = client.deploy("kv", &module).await.expect("deploys again");
    assert!(
        again.unchanged,
        "the same module again changes nothing: {again:?}"
    );

    // A watch from the start, on the leader.
    let mut watch = client.watch(Some("kv"), Some(1));
    let first = client.submit("kv", "put a 1").await.expect("submits");
    assert_eq!(first.outcome, ok("OK"));
    // Read up to that command: the watch is open on the leader.
    let mut seen = Vec::new();
    while seen.last().is_none_or(|&(i, _)| i < first.index) {
        let event = watch.next().await.expect("not ended").expect("an event");
        seen.push((
            event.index,
            String::from_utf8_lossy(&event.payload).into_owned(),
        ));
    }

    tracing::info!("the leader stops; the next submit finds the new leader");
    cluster.stop(leader).await;
    let second = client
        .submit("kv", "put b 2")
        .await
        .expect("submits after the leader stopped");
    assert_eq!(second.outcome, ok("OK"));
    assert!(second.index > first.index);
    let now = client.current_endpoint().await.expect("connected");
    assert_ne!(now, cluster.addrs[leader], "moved off the stopped leader");

    // Reads at every consistency see the write.
    for consistency in [Consistency::Linearizable, Consistency::Lease] {
        let answer = client
            .query("kv", "get b", consistency)
            .await
            .expect("query");
        assert_eq!(answer.outcome, ok("2"), "{consistency:?}");
        assert!(answer.applied_index >= second.index);
    }
    cluster.wait_applied(second.index).await;
    let stale = client
        .query("kv", "get a", Consistency::Stale)
        .await
        .expect("stale query");
    assert_eq!(stale.outcome, ok("1"));

    // Many at once: a batch and a pipelined session, each command applied once.
    let batch = client
        .submit_batch("kv", (0..50).map(|i| format!("put k{i} {i}")))
        .await
        .expect("batch");
    assert!(
        batch
            .iter()
            .all(|r| r.as_ref().is_ok_and(|a| a.outcome == ok("OK")))
    );
    let session = client.session();
    let sent = futures::future::join_all((0..4).map(|lane| {
        let session = session.clone();
        async move {
            session
                .submit("kv", (0..25).map(|i| format!("put s{lane}-{i} {i}")))
                .await
        }
    }))
    .await;
    for results in sent {
        for r in results.expect("session round") {
            assert_eq!(r.expect("applied").outcome, ok("OK"));
        }
    }
    // Concurrent callers on clones: each call in flight has a client session of its own.
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut indexes = Vec::new();
                for i in 0..10 {
                    let one = client.submit("kv", format!("put c{t}-{i} {i}")).await;
                    indexes.push(one.expect("submit").index);
                    let two = client
                        .submit_batch("kv", [format!("put d{t}-{i} {i}"), format!("get d{t}-{i}")])
                        .await
                        .expect("batch");
                    assert!(two.iter().all(|r| r.is_ok()), "{two:?}");
                }
                indexes
            })
        })
        .collect();
    let mut indexes = Vec::new();
    for t in tasks {
        indexes.extend(t.await.expect("join"));
    }
    indexes.sort_unstable();
    indexes.dedup();
    assert_eq!(indexes.len(), 40, "every submit its own entry");
    // A rejected command is an outcome, not an error.
    let refused = client.submit("kv", "frobnicate").await.expect("answered");
    assert!(
        matches!(refused.outcome, Outcome::Rejected(_)),
        "{refused:?}"
    );

    tracing::info!("the watch resumed on another node: every command once, in order");
    let last = refused.index;
    while seen.last().is_none_or(|&(i, _)| i < last) {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("the watch goes on")
            .expect("not ended")
            .expect("an event");
        seen.push((
            event.index,
            String::from_utf8_lossy(&event.payload).into_owned(),
        ));
    }
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "in order, once each: {seen:?}"
    );
    for put in ["put a 1", "put b 2", "put k49 49", "put s3-24 24"] {
        assert_eq!(
            seen.iter().filter(|(_, p)| p == put).count(),
            1,
            "{put} once in {seen:?}"
        );
    }
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

fn with_tokens(c: &mut NodeConfig) {
    c.tokens = waft::auth::Tokens {
        cluster: Some("cluster-token-1".to_owned()),
        client: Some("client-token-2".to_owned()),
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_client_names_what_is_wrong() {
    // Nothing listens: unreachable, after its attempts, naming the endpoint.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    match Client::builder([dead.clone()]).attempts(2).connect().await {
        Err(Error::Unreachable { endpoint, .. }) => assert_eq!(endpoint, dead),
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert!(matches!(
        Client::builder(["not an address"]).connect().await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Tls::from_ca_file("/no/such/ca.pem"),
        Err(Error::Config(m)) if m.contains("/no/such/ca.pem")
    ));

    let cluster = TestCluster::start_with(1, test_settings(), with_tokens).await;
    cluster.form().await;
    let addr = cluster.addrs[0].clone();
    // No token, a wrong one: unauthenticated, from the call (which says what it needs).
    for token in [None, Some("wrong")] {
        let mut b = Client::builder([addr.clone()]);
        if let Some(t) = token {
            b = b.token(t);
        }
        let c = b.connect().await.expect("the node is reachable");
        match c.submit("kv", "put a 1").await {
            Err(Error::Unauthenticated(m)) => assert!(m.contains("token"), "{m}"),
            other => panic!("token {token:?}: expected unauthenticated, got {other:?}"),
        }
        match c.deploy("kv", b"\0asm").await {
            Err(Error::Unauthenticated(m)) => assert!(m.contains("token"), "{m}"),
            other => panic!("token {token:?}: expected unauthenticated, got {other:?}"),
        }
    }
    // The client token may submit but not deploy.
    let client = Client::builder([addr.clone()])
        .token("client-token-2")
        .connect()
        .await
        .expect("connects with the client token");
    match client.deploy("kv", &waft_testkit::wasm(EXAMPLE_KV)).await {
        Err(Error::PermissionDenied(_)) => {}
        other => panic!("expected permission denied, got {other:?}"),
    }
    let admin = Client::builder([addr.clone()])
        .token("cluster-token-1")
        .connect()
        .await
        .expect("connects with the cluster token");
    admin
        .deploy("kv", &waft_testkit::wasm(EXAMPLE_KV))
        .await
        .expect("the cluster token deploys");
    // A command over the node's message limit, a service that does not exist.
    match client.submit("kv", vec![b'x'; 5 << 20]).await {
        Err(Error::TooLarge(_)) => {}
        other => panic!("expected too large, got {other:?}"),
    }
    match client.submit("nope", "put a 1").await {
        Err(Error::NotFound(_) | Error::InvalidArgument(_)) => {}
        other => panic!("expected an unknown service, got {other:?}"),
    }
    // A watch from before what the node keeps... is not the case on a fresh node; a query
    // the guest refuses is an outcome.
    let refused = client
        .query("kv", "frobnicate", Consistency::Linearizable)
        .await
        .expect("answered");
    assert!(
        matches!(refused.outcome, Outcome::Rejected(_)),
        "{refused:?}"
    );

    // TLS on the client only: the plain-text node is unreachable over TLS, quickly.
    let tls = Tls::new(pki().ca.cert.clone());
    match Client::builder([addr.clone()])
        .tls(tls.clone())
        .attempts(1)
        .connect()
        .await
    {
        Err(Error::Unreachable { cause, .. }) => assert!(cause.contains("TLS"), "{cause}"),
        other => panic!("expected unreachable over TLS, got {other:?}"),
    }
    cluster.shutdown().await;

    // TLS on the node only: a plain-text client gets an error, not a hang.
    let secure =
        TestCluster::start_with(1, test_settings(), |c| c.net.tls = Some(node_tls())).await;
    secure.form().await;
    let plain = tokio::time::timeout(
        Duration::from_secs(30),
        Client::builder([secure.addrs[0].clone()])
            .attempts(1)
            .connect(),
    )
    .await
    .expect("no hang");
    assert!(
        plain.is_err(),
        "a plain-text client of a TLS node fails: {plain:?}"
    );
    // And with the CA, it works.
    let trusted = Client::builder([secure.addrs[0].clone()])
        .tls(tls)
        .connect()
        .await
        .expect("connects over TLS");
    trusted.status().await.expect("status over TLS");
    secure.shutdown().await;
}
