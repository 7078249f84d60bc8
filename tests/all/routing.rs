//! One way through the code for a write that lands on a follower (issue 32): the follower's
//! handler asks the router, the router sends the write to the leader in one call, and nothing
//! else moves. Counted from every node's own call counters (`/metrics`: calls by method and
//! code, commands forwarded) for each way a client can write through a follower (a unary
//! `Submit`, a `SubmitBatch`, a `Session`, the etcd endpoint's `Put`), and for a linearizable
//! read, which takes the same way.

use crate::metrics::get;
use crate::support::cluster::{TestCluster, test_settings};
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::transport::Channel;
use waft::pb::api::{self, waft_client::WaftClient};
use waft::pb::etcd::{PutRequest, kv_client::KvClient};
use waft::pb::session::Pipe;
use waft_testkit::guests::{EXAMPLE_ETCD_KV, EXAMPLE_KV};

/// A node's counters: calls by method and code, and what it forwarded.
type Counts = BTreeMap<String, f64>;

async fn counts(cluster: &TestCluster, i: usize) -> Counts {
    let addr = cluster.node(i).metrics_addr().expect("metrics served");
    let response = get(addr, "/metrics").await;
    let text = response.split("\r\n\r\n").nth(1).expect("body");
    text.lines()
        .filter(|l| l.starts_with("waft_grpc_requests_total{") || l.starts_with("waft_forwarded_"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(series, v)| (series.to_owned(), v.parse().expect("a number")))
        .collect()
}

/// What changed between two readings of a node's counters.
fn delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

fn calls(method: &str) -> String {
    format!("waft_grpc_requests_total{{method=\"{method}\",code=\"OK\"}}")
}

/// Expected changes: the follower's and the leader's (series, increase); the third node's:
/// none.
fn on(follower: usize, leader: usize, f: &[(&str, f64)], l: &[(&str, f64)]) -> Vec<Counts> {
    let mut nodes = vec![Counts::new(); 3];
    let counts = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    nodes[follower] = counts(f);
    nodes[leader] = counts(l);
    nodes
}

/// Runs `write`, then waits until every node's counters have moved by `expected` (calls are
/// counted as their replies leave) and stay there; fails naming what moved instead.
async fn hops<F: Future<Output = ()>>(
    cluster: &TestCluster,
    what: &str,
    write: F,
    expected: Vec<Counts>,
) {
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(counts(cluster, i).await);
    }
    write.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let moved = moved(cluster, &before).await;
        if moved == expected {
            // Nothing more arrives later (a second hop would show up now).
            tokio::time::sleep(Duration::from_millis(300)).await;
            let again = self::moved(cluster, &before).await;
            assert_eq!(again, expected, "{what}: calls on each node");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: calls on each node\n   got {moved:?}\nwanted {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What moved on each node since `before`.
async fn moved(cluster: &TestCluster, before: &[Counts]) -> Vec<Counts> {
    let mut out = Vec::new();
    for (i, b) in before.iter().enumerate() {
        out.push(delta(b, &counts(cluster, i).await));
    }
    out
}

fn put(key: &str) -> api::SubmitRequest {
    api::SubmitRequest {
        service: "kv".into(),
        payload: format!("put {key} v").into_bytes(),
        client_id: 0,
        sequence: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_followers_write_takes_one_hop_to_the_leader_and_no_other_call() {
    let cluster = TestCluster::start_with(3, test_settings(), |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
        crate::etcd::with_etcd(c);
    })
    .await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    cluster
        .deploy("etcd", waft_testkit::wasm(EXAMPLE_ETCD_KV))
        .await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let channel = Channel::from_shared(format!("http://{}", cluster.addrs[follower]))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = WaftClient::new(channel);
    let on = |f: &[(&str, f64)], l: &[(&str, f64)]| on(follower, leader, f, l);
    let (submit, batch, session) = (
        calls("waft.v1.Waft/Submit"),
        calls("waft.v1.Waft/SubmitBatch"),
        calls("waft.v1.Waft/Session"),
    );
    let (query, etcd_put) = (calls("waft.v1.Waft/Query"), calls("etcdserverpb.KV/Put"));
    let (batches, commands) = (
        "waft_forwarded_batches_total",
        "waft_forwarded_commands_total",
    );

    // A unary Submit: the follower's handler, its batch to the leader, the leader's proposal.
    let expected = on(
        &[(batches, 1.0), (commands, 1.0), (&submit, 1.0)],
        &[(&batch, 1.0)],
    );
    hops(
        &cluster,
        "a unary Submit",
        async {
            let mut req = tonic::Request::new(put("unary"));
            req.metadata_mut()
                .insert("x-request-id", "hop-unary".parse().expect("ascii"));
            let reply = client.submit(req).await.expect("submit");
            let header = |name| reply.metadata().get(name).and_then(|v| v.to_str().ok());
            assert_eq!(header("x-request-id"), Some("hop-unary"));
            assert_eq!(header("waft-served-by"), Some(leader.to_string().as_str()));
        },
        expected,
    )
    .await;

    // A SubmitBatch goes to the leader as it is.
    let expected = on(&[(&batch, 1.0)], &[(&batch, 1.0)]);
    hops(
        &cluster,
        "a SubmitBatch",
        async {
            let commands = vec![put("b1"), put("b2"), put("b3")];
            let reply = client
                .submit_batch(api::SubmitBatchRequest { commands })
                .await
                .expect("batch")
                .into_inner();
            assert_eq!(reply.results.len(), 3);
        },
        expected,
    )
    .await;

    // A Session: the follower's own session with the leader carries the commands.
    let expected = on(
        &[(batches, 1.0), (commands, 2.0), (&session, 1.0)],
        &[(&session, 1.0)],
    );
    hops(
        &cluster,
        "a Session",
        async {
            let mut c = client.clone();
            let pipe = Pipe::open(|requests| async move { c.session(requests).await })
                .await
                .expect("open a session");
            let reply = pipe
                .send(api::SessionRequest {
                    commands: vec![put("s1"), put("s2")],
                })
                .await
                .expect("session reply");
            assert_eq!(reply.results.len(), 2);
            drop(pipe);
        },
        expected,
    )
    .await;

    // The etcd endpoint's Put: its handler calls the data handler in-process, which batches it
    // to the leader like a unary Submit (no call to the node's own gRPC API on the way).
    let expected = on(
        &[(batches, 1.0), (commands, 1.0), (&etcd_put, 1.0)],
        &[(&batch, 1.0)],
    );
    let etcd_addr = cluster.node(follower).etcd_addr().expect("etcd endpoint");
    hops(
        &cluster,
        "an etcd Put",
        async {
            let mut kv = KvClient::connect(format!("http://{etcd_addr}"))
                .await
                .expect("connect to the etcd endpoint");
            kv.put(PutRequest {
                key: b"hop".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            })
            .await
            .expect("etcd put");
        },
        expected,
    )
    .await;

    // A linearizable read is relayed to the leader the same way.
    let expected = on(&[(&query, 1.0)], &[(&query, 1.0)]);
    hops(
        &cluster,
        "a linearizable Query",
        async {
            let reply = client
                .query(api::QueryRequest {
                    service: "kv".into(),
                    payload: b"get unary".to_vec(),
                    consistency: api::Consistency::Linearizable as i32,
                })
                .await
                .expect("query")
                .into_inner();
            assert_eq!(
                reply.outcome,
                Some(api::query_reply::Outcome::Ok(b"v".to_vec()))
            );
        },
        expected,
    )
    .await;
}
