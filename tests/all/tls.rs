//! TLS: a cluster whose nodes serve TLS and talk mutual TLS to each other; clients and peers
//! with the wrong certificates never get in.

use crate::support::cluster::{TestCluster, kv, test_settings};
use std::sync::OnceLock;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft::pb::raft::raft_client::RaftClient;
use waft::tls::{Pem, Tls, issue, issue_between, new_ca};
use waft::types::{TypeConfig, Vote};
use waft_testkit::guests::EXAMPLE_KV;

pub(crate) struct Pki {
    pub(crate) ca: Pem,
    pub(crate) node: Pem,
    /// Another CA and a certificate it signed: a stranger's.
    foreign_ca: Pem,
    foreign: Pem,
    /// Signed by the cluster CA, but expired yesterday.
    expired: Pem,
}

pub(crate) fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
        let ca = new_ca("test cluster CA", 2).expect("ca");
        let node = issue(&ca, "node", &hosts, 2).expect("node cert");
        let foreign_ca = new_ca("someone else's CA", 2).expect("ca");
        let foreign = issue(&foreign_ca, "stranger", &hosts, 2).expect("cert");
        let now = time::OffsetDateTime::now_utc();
        let expired = issue_between(
            &ca,
            "expired",
            &hosts,
            (now - time::Duration::days(3), now - time::Duration::days(1)),
        )
        .expect("cert");
        Pki {
            ca,
            node,
            foreign_ca,
            foreign,
            expired,
        }
    })
}

pub(crate) fn node_tls() -> Tls {
    let p = pki();
    Tls::from_pem(
        p.ca.cert.clone().into_bytes(),
        Some((
            p.node.cert.clone().into_bytes(),
            p.node.key.clone().into_bytes(),
        )),
    )
    .expect("valid")
}

/// A client TLS setting: trusting `ca`, presenting `identity` if any.
pub(crate) fn client_tls(ca: &Pem, identity: Option<&Pem>) -> ClientTlsConfig {
    let c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.cert));
    match identity {
        Some(id) => c.identity(Identity::from_pem(&id.cert, &id.key)),
        None => c,
    }
}

pub(crate) async fn connect(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}")).expect("uri");
    if let Some(tls) = tls {
        e = e.tls_config(tls).expect("tls config");
    }
    e.connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A status call over a fresh connection with the given settings.
async fn status(addr: &str, tls: Option<ClientTlsConfig>) -> Result<api::StatusReply, String> {
    let ch = connect(addr, tls).await?;
    ClusterClient::new(ch)
        .status(api::StatusRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// A vote request for node `target` with a huge term over a fresh connection.
async fn vote(addr: &str, target: u64, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let ch = connect(addr, tls).await?;
    let rpc = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(1_000, 9), None);
    let mut req = tonic::Request::new(waft::pb::encode(&rpc).expect("encode"));
    req.metadata_mut().insert(
        waft::raft::identity::TARGET_HEADER,
        target.to_string().parse().expect("header"),
    );
    RaftClient::new(ch)
        .vote(req)
        .await
        .map(drop)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mutual_tls_cluster_serves_clients_and_keeps_strangers_out() {
    let cluster = TestCluster::start_with(3, test_settings(), |c| {
        c.net.tls = Some(node_tls());
    })
    .await;
    // Forming the cluster makes the nodes replicate to each other: over mutual TLS.
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    cluster.write(kv("put a 1")).await;
    let p = pki();

    tracing::info!("a client that trusts the CA submits through a follower (forwarded over TLS)");
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let ch = connect(&cluster.addrs[follower], Some(client_tls(&p.ca, None)))
        .await
        .expect("TLS connection");
    let reply = WaftClient::new(ch.clone())
        .submit(api::SubmitRequest {
            service: "kv".into(),
            payload: b"put b 2".to_vec(),
            client_id: 0,
            sequence: 0,
        })
        .await
        .expect("submit over TLS")
        .into_inner();
    assert!(
        matches!(reply.outcome, Some(api::submit_reply::Outcome::Ok(_))),
        "{reply:?}"
    );
    let reply = WaftClient::new(ch)
        .query(api::QueryRequest {
            service: "kv".into(),
            payload: b"get b".to_vec(),
            consistency: api::Consistency::Linearizable as i32,
        })
        .await
        .expect("query over TLS")
        .into_inner();
    assert_eq!(
        reply.outcome,
        Some(api::query_reply::Outcome::Ok(b"2".to_vec()))
    );
    let term = status(&cluster.addrs[leader], Some(client_tls(&p.ca, None)))
        .await
        .expect("status")
        .term;

    tracing::info!("plain text, a client that does not trust our CA: nothing");
    let addr = cluster.addrs[follower].clone();
    status(&addr, None)
        .await
        .expect_err("a plain-text client is not served");
    status(&addr, Some(client_tls(&p.foreign_ca, None)))
        .await
        .expect_err("the node's certificate is not trusted by a stranger's CA");

    tracing::info!("client certificates from another CA, or expired, fail the handshake");
    let e = status(&addr, Some(client_tls(&p.ca, Some(&p.foreign))))
        .await
        .expect_err("a foreign client certificate");
    tracing::info!(error = %e, "foreign certificate refused");
    status(&addr, Some(client_tls(&p.ca, Some(&p.expired))))
        .await
        .expect_err("an expired client certificate");

    tracing::info!("Raft messages: a client certificate of the cluster CA is required");
    let target = follower as u64;
    let e = vote(&addr, target, Some(client_tls(&p.ca, None)))
        .await
        .expect_err("no client certificate");
    assert!(e.starts_with("Unauthenticated"), "{e}");
    assert!(e.contains("mutual TLS"), "{e}");
    vote(&addr, target, Some(client_tls(&p.ca, Some(&p.foreign))))
        .await
        .expect_err("a stranger's certificate");
    vote(&addr, target, Some(client_tls(&p.ca, Some(&p.expired))))
        .await
        .expect_err("an expired certificate");
    vote(&addr, target, None).await.expect_err("plain text");

    tracing::info!("a node with a stranger's certificate cannot join");
    let stranger_tls = Tls::from_pem(
        p.foreign_ca.cert.clone().into_bytes(),
        Some((
            p.foreign.cert.clone().into_bytes(),
            p.foreign.key.clone().into_bytes(),
        )),
    )
    .expect("valid, for another cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = waft::node::NodeConfig::new(7, dir.path());
    config.raft = test_settings();
    config.net.tls = Some(stranger_tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stranger = waft::node::Node::start(config, listener)
        .await
        .expect("starts");
    // Its peers cannot verify it, nor it them: added as a learner, it never receives an entry.
    cluster
        .node(leader)
        .raft()
        .add_learner(
            7,
            openraft::BasicNode {
                addr: stranger.addr().to_owned(),
            },
            false,
        )
        .await
        .expect("the membership change itself commits");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stranger.metrics().last_log_index,
        None,
        "the stranger received entries"
    );
    let matched = cluster
        .node(leader)
        .metrics()
        .replication
        .and_then(|r| r.get(&7).cloned().flatten());
    assert_eq!(matched, None, "the leader replicated to the stranger");
    stranger.shutdown().await.expect("shutdown");

    tracing::info!("none of it disturbed the cluster");
    let after = status(&cluster.addrs[leader], Some(client_tls(&p.ca, None)))
        .await
        .expect("status");
    assert_eq!(after.term, term, "refused votes changed no term");
    let (index, _) = cluster.write(kv("put c 3")).await;
    cluster.wait_applied(index).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_speaks_tls_and_says_so_when_it_is_missing() {
    let cluster = TestCluster::start_with(1, test_settings(), |c| {
        c.net.tls = Some(node_tls());
    })
    .await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki().ca.cert).expect("write");
    let ca = ca.to_str().expect("utf-8");
    let addr = cluster.addrs[0].as_str();

    let out = crate::support::waft_cli(&[
        "--endpoint",
        addr,
        "--tls-ca",
        ca,
        "submit",
        "-s",
        "kv",
        "put x 9",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = crate::support::waft_cli(&[
        "--endpoint",
        addr,
        "--tls-ca",
        ca,
        "query",
        "-s",
        "kv",
        "get x",
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "9", "{out:?}");

    let out = crate::support::waft_cli(&["--endpoint", addr, "query", "-s", "kv", "get x"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-ca"), "{err}");

    // `waft certs` makes a CA and certificates the node accepts as a client's.
    let out = crate::support::waft_cli(&[
        "certs",
        "--dir",
        dir.path().join("own").to_str().expect("utf-8"),
        "--name",
        "me",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let own = dir.path().join("own");
    for f in ["ca.pem", "ca-key.pem", "me.pem", "me-key.pem"] {
        assert!(own.join(f).exists(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(own.join("me-key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");
    }
    // Its certificate is from another CA than the node's: refused at the handshake.
    let out = crate::support::waft_cli(&[
        "--endpoint",
        addr,
        "--tls-ca",
        ca,
        "--tls-cert",
        own.join("me.pem").to_str().expect("utf-8"),
        "--tls-key",
        own.join("me-key.pem").to_str().expect("utf-8"),
        "query",
        "-s",
        "kv",
        "get x",
    ])
    .await;
    assert!(!out.status.success(), "{out:?}");

    // A node refuses to start on an expired certificate, in words.
    let expired = dir.path().join("expired.pem");
    let expired_key = dir.path().join("expired-key.pem");
    std::fs::write(&expired, &pki().expired.cert).expect("write");
    std::fs::write(&expired_key, &pki().expired.key).expect("write");
    let out = crate::support::waft_cli(&[
        "--tls-ca",
        ca,
        "--tls-cert",
        expired.to_str().expect("utf-8"),
        "--tls-key",
        expired_key.to_str().expect("utf-8"),
        "node",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("data").to_str().expect("utf-8"),
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired on"), "{err}");
    cluster.shutdown().await;
}

/// A peer that is down is retried with growing pauses, not in a tight loop: openraft's own
/// backoff never applies to a replication stream that fails to open, and the leader used to
/// retry thousands of times a second (found while trying `waft dev --tls`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_is_down_is_retried_with_pauses() {
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    // A "peer" that accepts connections and drops them at once, noting when.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            record.lock().expect("lock").push(std::time::Instant::now());
            drop(conn);
        }
    });
    cluster
        .node(0)
        .raft()
        .add_learner(5, openraft::BasicNode { addr }, false)
        .await
        .expect("add learner");
    tokio::time::sleep(Duration::from_secs(4)).await;
    acceptor.abort();
    let seen = seen.lock().expect("lock").clone();
    // Connections opened within 40 ms of each other (the pool's, a stream and a heartbeat)
    // are one attempt.
    let mut attempts: Vec<std::time::Instant> = Vec::new();
    for t in &seen {
        if attempts
            .last()
            .is_none_or(|last| t.duration_since(*last) > Duration::from_millis(40))
        {
            attempts.push(*t);
        }
    }
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    tracing::info!(?gaps, "pauses between attempts");
    // It keeps trying...
    assert!(attempts.len() >= 3, "the leader gave up: {gaps:?}");
    // ...never in a tight loop: each attempt opens a few connections, not hundreds (a tight
    // loop would also run every attempt into one and fail the other checks)...
    assert!(
        seen.len() <= 4 * attempts.len(),
        "{} connections in {} attempts: {gaps:?}",
        seen.len(),
        attempts.len()
    );
    // ...and the pause grows towards its cap (0.5 s) while the peer stays down.
    assert!(
        gaps.iter().any(|g| *g >= Duration::from_millis(250)),
        "the pause never grew: {gaps:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_works_over_tls() {
    crate::support::require_tool("etcdctl", &["version"], "apt-get install etcd-client");
    let cluster = TestCluster::start_with(1, test_settings(), |c| {
        c.net.tls = Some(node_tls());
        c.etcd_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    cluster.form().await;
    cluster
        .deploy(
            "etcd",
            waft_testkit::wasm(waft_testkit::guests::EXAMPLE_ETCD_KV),
        )
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki().ca.cert).expect("write");
    let at = cluster.node(0).etcd_addr().expect("etcd endpoint");
    let https = format!("https://{at}");
    let cacert = format!("--cacert={}", ca.display());
    let (ok, out, err) = crate::etcd::etcdctl(&https, &[&cacert, "put", "k", "v"], None).await;
    assert!(ok, "{err}");
    assert_eq!(out, "OK\n");
    let (_, out, _) = crate::etcd::etcdctl(&https, &[&cacert, "get", "k"], None).await;
    assert_eq!(out, "k\nv\n");
    // Without the CA, etcdctl cannot verify the node and gives up.
    let (ok, _, _) = crate::etcd::etcdctl(&https, &["get", "k"], None).await;
    assert!(!ok);
    cluster.shutdown().await;
}
