//! The client API over gRPC on an in-process cluster: forwarding, consistency levels,
//! exactly-once retries, errors, membership and status.

use crate::support::cluster::{TestCluster, test_settings};
use tonic::transport::Channel;
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft_testkit::guests::{EXAMPLE_KV, TEST_WRONG_WORLD};

pub(crate) async fn waft(addr: &str) -> WaftClient<Channel> {
    WaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
}

async fn cluster_client(addr: &str) -> ClusterClient<Channel> {
    ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

fn deploy_stream(
    service: &str,
    module: Vec<u8>,
    size: u64,
) -> impl futures::Stream<Item = api::DeployChunk> {
    futures::stream::iter(vec![
        api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Header(api::DeployHeader {
                service: service.to_owned(),
                size,
                dry_run: false,
                fuel_per_apply: 0,
                max_memory_bytes: 0,
                ..Default::default()
            })),
        },
        api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Data(module)),
        },
    ])
}

pub(crate) fn submit(
    service: &str,
    payload: &str,
    client_id: u64,
    sequence: u64,
) -> api::SubmitRequest {
    api::SubmitRequest {
        service: service.to_owned(),
        payload: payload.as_bytes().to_vec(),
        client_id,
        sequence,
    }
}

fn ok(reply: &api::SubmitReply) -> &[u8] {
    match &reply.outcome {
        Some(api::submit_reply::Outcome::Ok(r)) => r,
        other => panic!("expected ok, got {other:?}"),
    }
}

fn query_ok(reply: &api::QueryReply) -> &[u8] {
    match &reply.outcome {
        Some(api::query_reply::Outcome::Ok(r)) => r,
        other => panic!("expected ok, got {other:?}"),
    }
}

fn query(service: &str, payload: &str, consistency: api::Consistency) -> api::QueryRequest {
    api::QueryRequest {
        service: service.to_owned(),
        payload: payload.as_bytes().to_vec(),
        consistency: consistency as i32,
    }
}

/// Forms a 3-node cluster through the API alone: init, add learners, change membership.
async fn form_via_api(cluster: &TestCluster) {
    let mut c0 = cluster_client(&cluster.addrs[0]).await;
    c0.init(api::InitRequest { members: vec![] })
        .await
        .expect("init");
    cluster.wait_leader().await;
    for i in 1..3 {
        // Through a follower-to-be? No: through node 0, the only member so far.
        c0.add_learner(api::AddLearnerRequest {
            id: i,
            addr: cluster.addrs[i as usize].clone(),
        })
        .await
        .expect("add learner");
    }
    // Adding a member again at its own address is fine; its id from another address is not.
    c0.add_learner(api::AddLearnerRequest {
        id: 1,
        addr: cluster.addrs[1].clone(),
    })
    .await
    .expect("the same learner again");
    let e = c0
        .add_learner(api::AddLearnerRequest {
            id: 1,
            addr: "127.0.0.1:1".into(),
        })
        .await
        .expect_err("a conflicting id");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert!(
        e.message()
            .contains(&format!("already a member, at {}", cluster.addrs[1])),
        "{e}"
    );
    let reply = c0
        .change_membership(api::ChangeMembershipRequest {
            voters: vec![0, 1, 2],
            retain: false,
            add_voters: vec![],
        })
        .await
        .expect("change membership")
        .into_inner();
    assert_eq!(reply.members.iter().filter(|m| m.voter).count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_works_from_any_node() {
    let cluster = TestCluster::start(3, test_settings()).await;
    tracing::info!("a node that is not in a cluster says so: no leader, retry");
    let e = waft(&cluster.addrs[1])
        .await
        .submit(submit("kv", "put a 1", 0, 0))
        .await
        .expect_err("no leader");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");

    form_via_api(&cluster).await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    let other = cluster.addrs[(leader + 2) % 3].clone();

    tracing::info!("deploy through a follower (forwarded, validated on the leader)");
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let size = module.len() as u64;
    let d = waft(&follower)
        .await
        .deploy(deploy_stream("kv", module, size))
        .await
        .expect("deploy")
        .into_inner();
    assert_eq!(d.module_sha256.len(), 64);

    tracing::info!("submit on a follower; read it back with each consistency level");
    let mut f = waft(&follower).await;
    let mut req = tonic::Request::new(submit("kv", "put greeting hello-there", 0, 0));
    req.metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().expect("ascii"));
    let r = f.submit(req).await.expect("submit");
    // The request id went along to the leader, which served the write and says so.
    fn header(m: &tonic::metadata::MetadataMap, name: &str) -> Option<String> {
        m.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
    let m = r.metadata();
    assert_eq!(header(m, "x-request-id").as_deref(), Some("trace-me-42"));
    assert_eq!(header(m, "waft-served-by"), Some(leader.to_string()));
    let r = r.into_inner();
    assert_eq!(ok(&r), b"OK");
    // Without one, the node makes one up; a stale read is served where it lands.
    let q = f
        .query(query("kv", "get greeting", api::Consistency::Stale))
        .await
        .expect("query");
    let id = header(q.metadata(), "x-request-id").expect("a request id");
    assert!(id.starts_with(&format!("{}-", (leader + 1) % 3)), "{id}");
    assert_eq!(
        header(q.metadata(), "waft-served-by"),
        Some(((leader + 1) % 3).to_string())
    );
    for (addr, level) in [
        (&follower, api::Consistency::Linearizable),
        (&other, api::Consistency::Linearizable),
        (&other, api::Consistency::Lease),
        (&cluster.addrs[leader], api::Consistency::Lease),
    ] {
        let q = waft(addr)
            .await
            .query(query("kv", "get greeting", level))
            .await
            .expect("query")
            .into_inner();
        assert_eq!(query_ok(&q), b"hello-there", "{level:?} at {addr}");
        assert!(q.applied_index >= r.index);
    }
    cluster.wait_applied(r.index).await;
    let q = waft(&other)
        .await
        .query(query("kv", "get greeting", api::Consistency::Stale))
        .await
        .expect("stale");
    assert_eq!(query_ok(q.get_ref()), b"hello-there");

    tracing::info!("a retried submit (same client id and sequence) is applied once");
    let first = f
        .submit(submit("kv", "cas greeting hello-there bye", 42, 1))
        .await
        .expect("cas")
        .into_inner();
    assert_eq!(ok(&first), b"OK");
    let retry = waft(&other)
        .await
        .submit(submit("kv", "cas greeting hello-there bye", 42, 1))
        .await
        .expect("retry");
    assert_eq!(
        retry.get_ref().outcome,
        first.outcome,
        "the retry gets the first reply"
    );
    let q = f
        .query(query("kv", "get greeting", api::Consistency::Linearizable))
        .await
        .expect("q")
        .into_inner();
    assert_eq!(query_ok(&q), b"bye");

    tracing::info!("rejections are replies, not transport errors");
    let r = f
        .submit(submit("kv", "get missing", 0, 0))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(
        r.outcome,
        Some(api::submit_reply::Outcome::Rejected(
            "key not found: missing".into()
        ))
    );

    tracing::info!("services lists kv on every node");
    for addr in &cluster.addrs {
        let list = waft(addr)
            .await
            .list_services(api::ListServicesRequest {})
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.services.len(), 1);
        assert_eq!(list.services[0].name, "kv");
        assert_eq!(list.services[0].module_sha256, d.module_sha256);
    }

    tracing::info!("status from a follower names the leader and every member");
    let s = cluster_client(&follower)
        .await
        .status(api::StatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.role, "follower");
    assert_eq!(s.leader_id, Some(leader as u64));
    assert_eq!(s.members.len(), 3);
    let s = cluster_client(&cluster.addrs[leader])
        .await
        .status(api::StatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.role, "leader");
    assert!(
        s.members.iter().all(|m| m.lag.is_some()),
        "the leader reports lag: {:?}",
        s.members
    );

    tracing::info!("leadership transfer through a follower");
    let target = ((leader + 1) % 3) as u64;
    cluster_client(&other)
        .await
        .transfer_leader(api::TransferLeaderRequest { to: target })
        .await
        .expect("transfer");
    cluster.wait_leader_is(target as usize).await;
    cluster_client(&follower)
        .await
        .trigger_snapshot(api::TriggerSnapshotRequest {})
        .await
        .expect("snapshot");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let cluster = TestCluster::start(3, test_settings()).await;
    form_via_api(&cluster).await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    let mut w = waft(&follower).await;
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let size = module.len() as u64;
    w.deploy(deploy_stream("kv", module, size))
        .await
        .expect("deploy");

    let code =
        |r: Result<tonic::Response<api::DeployReply>, tonic::Status>| r.expect_err("must fail");
    tracing::info!("deploys: not wasm, wrong world, empty, over the cap, short, headerless");
    let e = code(
        w.deploy(deploy_stream("x", b"not wasm at all".to_vec(), 15))
            .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("not a WebAssembly file"), "{e}");
    let ww = waft_testkit::wasm(TEST_WRONG_WORLD);
    let n = ww.len() as u64;
    let e = code(w.deploy(deploy_stream("x", ww, n)).await);
    assert!(
        e.message()
            .contains("does not export waft:fsm/state-machine"),
        "{e}"
    );
    let e = code(w.deploy(deploy_stream("x", vec![], 0)).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("0 bytes"), "{e}");
    let e = code(w.deploy(deploy_stream("x", vec![], 1 << 40)).await);
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    let e = code(w.deploy(deploy_stream("x", vec![0; 10], 20)).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = code(
        w.deploy(futures::stream::iter(vec![api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Data(vec![1])),
        }]))
        .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    tracing::info!("submits and queries: unknown service, oversized payload, no service name");
    let e = w
        .submit(submit("nope", "put a 1", 0, 0))
        .await
        .expect_err("unknown service");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let big = "x".repeat(2 << 20);
    let e = w
        .submit(submit("kv", &big, 0, 0))
        .await
        .expect_err("too large");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    let e = w
        .submit(submit("", "put a 1", 0, 0))
        .await
        .expect_err("no service");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = w
        .query(query("nope", "get a", api::Consistency::Stale))
        .await
        .expect_err("unknown service");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let mut bad = query("kv", "get a", api::Consistency::Stale);
    bad.consistency = 17;
    let e = w.query(bad).await.expect_err("bad consistency");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    tracing::info!(
        "membership: removing a non-member, transferring to a non-voter, empty voter set"
    );
    let mut c = cluster_client(&follower).await;
    let e = c
        .remove_node(api::RemoveNodeRequest { id: 99 })
        .await
        .expect_err("not a member");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = c
        .transfer_leader(api::TransferLeaderRequest { to: 99 })
        .await
        .expect_err("not a voter");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = c
        .change_membership(api::ChangeMembershipRequest {
            voters: vec![],
            retain: false,
            add_voters: vec![],
        })
        .await
        .expect_err("empty");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c
        .init(api::InitRequest { members: vec![] })
        .await
        .expect_err("already initialized");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");

    tracing::info!("nothing above changed the state: still only kv, still empty");
    let list = w
        .list_services(api::ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.services.len(), 1);
    let q = w
        .query(query("kv", "scan", api::Consistency::Linearizable))
        .await
        .expect("scan")
        .into_inner();
    assert_eq!(query_ok(&q), b"");

    tracing::info!("removing a node, then refusing to remove the last voter");
    let victim = ((leader + 2) % 3) as u64;
    let r = c
        .remove_node(api::RemoveNodeRequest { id: victim })
        .await
        .expect("remove")
        .into_inner();
    assert!(r.members.iter().all(|m| m.id != victim), "{:?}", r.members);
    cluster.shutdown().await;

    let single = TestCluster::start(1, test_settings()).await;
    let mut c = cluster_client(&single.addrs[0]).await;
    c.init(api::InitRequest { members: vec![] })
        .await
        .expect("init");
    single.wait_leader().await;
    let e = c
        .remove_node(api::RemoveNodeRequest { id: 0 })
        .await
        .expect_err("last voter");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("last voter"), "{e}");
    single.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let cluster = TestCluster::start(1, test_settings()).await;
    let channel = Channel::from_shared(format!("http://{}", cluster.addrs[0]))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "waft.v1.Waft".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["waft.v1.Waft", "waft.v1.Cluster", "waft.raft.v1.Raft"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    cluster.shutdown().await;
}

/// A formed 3-node cluster running the kv example; its leader's index and a follower's address.
pub(crate) async fn kv_cluster() -> (TestCluster, usize, String) {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    (cluster, leader, follower)
}

fn outcome(r: &api::SubmitResult) -> Result<&api::SubmitReply, (tonic::Code, &str)> {
    match &r.result {
        Some(api::submit_result::Result::Reply(reply)) => Ok(reply),
        Some(api::submit_result::Result::Failure(f)) => {
            Err((tonic::Code::from(f.code), f.message.as_str()))
        }
        None => panic!("an empty result"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_batch_proposes_in_order_and_answers_each_command_like_a_submit() {
    let (cluster, leader, follower) = kv_cluster().await;

    for (round, addr) in [&cluster.addrs[leader], &follower].into_iter().enumerate() {
        tracing::info!(%addr, "a batch with good and bad commands, sent to the leader and a follower");
        let big = "x".repeat(2 << 20);
        let commands = vec![
            submit("kv", "put a 1", 0, 0),
            submit("kv", "cas a 1 2", 0, 0),
            submit("kv", "frobnicate", 0, 0),
            submit("", "put a 3", 0, 0),
            submit("nope", "put a 4", 0, 0),
            submit("kv", &format!("put big {big}"), 0, 0),
            submit("kv", "get a", 0, 0),
            // The same session command twice: applied once (applied again, the cas would
            // fail), the retry gets the first reply.
            submit("kv", "cas a 2 3", 77 + round as u64, 1),
            submit("kv", "cas a 2 3", 77 + round as u64, 1),
            submit("kv", "get a", 0, 0),
        ];
        let results = waft(addr)
            .await
            .submit_batch(api::SubmitBatchRequest { commands })
            .await
            .expect("batch")
            .into_inner()
            .results;
        assert_eq!(results.len(), 10);
        assert_eq!(ok(outcome(&results[0]).expect("put")), b"OK");
        assert_eq!(ok(outcome(&results[1]).expect("cas")), b"OK");
        assert!(matches!(
            outcome(&results[2]).expect("proposed").outcome,
            Some(api::submit_reply::Outcome::Rejected(_))
        ));
        assert_eq!(
            outcome(&results[3]).expect_err("no service").0,
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            outcome(&results[4]).expect_err("unknown").0,
            tonic::Code::NotFound
        );
        let (code, message) = outcome(&results[5]).expect_err("too big");
        assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        // Applied in order: the get sees the cas before it.
        assert_eq!(ok(outcome(&results[6]).expect("get")), b"2");
        assert_eq!(ok(outcome(&results[7]).expect("session")), b"OK");
        assert_eq!(ok(outcome(&results[8]).expect("session retry")), b"OK");
        assert_eq!(ok(outcome(&results[9]).expect("get")), b"3");
        // The proposed commands sit at consecutive indexes, in the order given (the one for
        // the unknown service too: it was proposed, and refused when applied).
        let index = |i: usize| outcome(&results[i]).expect("proposed").index;
        assert_eq!(index(1), index(0) + 1);
        assert_eq!(index(2), index(0) + 2);
        assert_eq!(index(6), index(0) + 4);
        assert_eq!(index(9), index(0) + 7);
    }

    tracing::info!("a batch over the limits is refused whole, before anything is proposed");
    let before = cluster.node(leader).metrics().last_log_index;
    let many = (0..1025)
        .map(|i| submit("kv", &format!("put k{i} v"), 0, 0))
        .collect();
    let e = waft(&follower)
        .await
        .submit_batch(api::SubmitBatchRequest { commands: many })
        .await
        .expect_err("too many");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    let heavy = (0..20)
        .map(|i| submit("kv", &format!("put h{i} {}", "y".repeat(1 << 20)), 0, 0))
        .collect();
    let e = waft(&follower)
        .await
        .submit_batch(api::SubmitBatchRequest { commands: heavy })
        .await
        .expect_err("too heavy");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert_eq!(cluster.node(leader).metrics().last_log_index, before);
    let (last, _) = cluster
        .write(crate::support::cluster::kv("put end 1"))
        .await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_through_a_follower_each_get_their_own_answer() {
    let (cluster, leader, follower) = kv_cluster().await;
    // 32 clients on the follower at once: their submits share forwarded batches, and each
    // still gets the reply to its own command (a cas that only succeeds for the right value).
    let mut tasks = Vec::new();
    for w in 0..32u64 {
        let follower = follower.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = waft(&follower).await;
            let mut indexes = Vec::new();
            for seq in 1..=20u64 {
                let cmd = if seq == 1 {
                    format!("put w{w} 1")
                } else {
                    format!("cas w{w} {} {seq}", seq - 1)
                };
                let r = c
                    .submit(submit("kv", &cmd, 500 + w, seq))
                    .await
                    .expect("submit")
                    .into_inner();
                assert_eq!(ok(&r), b"OK", "{cmd}");
                indexes.push(r.index);
            }
            indexes
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let indexes = t.await.expect("client");
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
        all.extend(indexes);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 32 * 20, "every command has an index of its own");
    let mut q = waft(&cluster.addrs[leader]).await;
    for w in 0..32 {
        let r = q
            .query(query(
                "kv",
                &format!("get w{w}"),
                api::Consistency::Linearizable,
            ))
            .await
            .expect("query")
            .into_inner();
        assert_eq!(query_ok(&r), b"20");
    }
    let (last, _) = cluster
        .write(crate::support::cluster::kv("put end 1"))
        .await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waft_submit_lines_bulk_loads_a_file_in_batches_with_a_result_per_command() {
    use crate::support::waft_cli;
    let (cluster, _, follower) = kv_cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("commands.txt");
    std::fs::write(
        &file,
        "put a 1\nput b 2\n\n   \ndel nothing\r\nput c 3\ncas a 1 10\nget a\nput d 4\n",
    )
    .expect("write");
    let at = format!("@{}", file.display());
    let o = waft_cli(&[
        "--endpoint",
        &follower,
        "submit",
        "--service",
        "kv",
        "--lines",
        &at,
        "--batch",
        "3",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout,
        "OK\nOK\nerror: command 3: rejected: key not found: nothing\nOK\nOK\n10\nOK\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "a rejected command fails the run");
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 of 7 commands failed"));

    tracing::info!("JSON: one object per command, with its number and log index");
    let o = waft_cli(&[
        "--endpoint",
        &follower,
        "--output",
        "json",
        "submit",
        "--service",
        "kv",
        "--lines",
        &at,
    ])
    .await;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[0]["command"], 1);
    assert_eq!(lines[2]["rejected"], "key not found: nothing");
    // The second run applied everything again, in order (a new session).
    assert_eq!(lines[4]["ok"], "OK", "{}", lines[4]);
    assert_eq!(lines[5]["ok"], "10", "{}", lines[5]);
    let indexes: Vec<u64> = lines
        .iter()
        .map(|l| l["index"].as_u64().expect("index"))
        .collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
    let (last, _) = cluster
        .write(crate::support::cluster::kv("put end 1"))
        .await;
    cluster.wait_applied(last).await;
    let states = cluster.assert_identical().await;
    assert!(!states["kv"].is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploying_what_a_service_already_runs_changes_nothing() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    let module = waft_testkit::wasm(EXAMPLE_KV);
    let size = module.len() as u64;
    let first = waft(&follower)
        .await
        .deploy(deploy_stream("kv", module.clone(), size))
        .await
        .expect("deploy")
        .into_inner();
    assert!(!first.unchanged);
    let before = cluster.node(leader).metrics().last_log_index;
    // A retry of a deploy that went through (say, its connection dropped): same answer, no
    // entry, no new version.
    let again = waft(&follower)
        .await
        .deploy(deploy_stream("kv", module.clone(), size))
        .await
        .expect("again")
        .into_inner();
    assert!(again.unchanged);
    assert_eq!(
        (again.version, again.index, &again.module_sha256),
        (first.version, first.index, &first.module_sha256)
    );
    assert_eq!(
        cluster.node(leader).metrics().last_log_index,
        before,
        "nothing was proposed"
    );
    // The same module under other limits is a new version.
    let limited = waft(&follower)
        .await
        .deploy(futures::stream::iter(vec![
            api::DeployChunk {
                kind: Some(api::deploy_chunk::Kind::Header(api::DeployHeader {
                    service: "kv".into(),
                    size,
                    dry_run: false,
                    fuel_per_apply: 50_000_000,
                    max_memory_bytes: 0,
                    ..Default::default()
                })),
            },
            api::DeployChunk {
                kind: Some(api::deploy_chunk::Kind::Data(module)),
            },
        ]))
        .await
        .expect("limited")
        .into_inner();
    assert!(!limited.unchanged);
    assert_eq!(limited.version, first.version + 1);

    // Identical deploys at once (a retry racing the first attempt, on the leader and on a
    // follower): one new version; the others wait for it and change nothing.
    let other = waft_testkit::wasm(waft_testkit::guests::EXAMPLE_COUNTER);
    let other_size = other.len() as u64;
    let before = cluster.node(leader).metrics().last_log_index;
    let targets = [
        cluster.addrs[leader].clone(),
        cluster.addrs[leader].clone(),
        follower.clone(),
    ];
    let replies = futures::future::join_all(targets.iter().map(|addr| {
        let module = other.clone();
        async move {
            waft(addr)
                .await
                .deploy(deploy_stream("counter", module, other_size))
                .await
                .expect("concurrent deploy")
                .into_inner()
        }
    }))
    .await;
    let new: Vec<_> = replies.iter().filter(|r| !r.unchanged).collect();
    assert_eq!(new.len(), 1, "one deploy went in: {replies:?}");
    assert_eq!(new[0].version, 1);
    for r in &replies {
        assert_eq!((r.version, r.index), (new[0].version, new[0].index));
    }
    let after = cluster.node(leader).metrics().last_log_index;
    assert_eq!(
        after.map(|a| a - before.unwrap_or(0)),
        Some(1),
        "one entry proposed"
    );
    cluster.shutdown().await;
}
