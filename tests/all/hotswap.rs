//! Hot-swap: a deploy is a log entry, validated on the leader first; the state moves from the
//! old module to the new one; a module that refuses the state never takes over; a node whose
//! engine differs refuses to apply a deploy.

use crate::support::cluster::{TestCluster, kv, test_settings};
use std::time::Duration;
use tonic::transport::Channel;
use waft::pb::api::{self, waft_client::WaftClient};
use waft::types::{Request, Response};
use waft_testkit::guests::{EXAMPLE_KV, TEST_HOSTILE, TEST_KV2};

pub(crate) async fn client(addr: &str) -> WaftClient<Channel> {
    WaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
}

pub(crate) async fn deploy(
    addr: &str,
    service: &str,
    path: &str,
    dry_run: bool,
) -> Result<api::DeployReply, tonic::Status> {
    deploy_with_limits(addr, service, path, dry_run, 0, 0).await
}

/// A deploy with the service's own fuel and memory limits (0: the node's).
pub(crate) async fn deploy_with_limits(
    addr: &str,
    service: &str,
    path: &str,
    dry_run: bool,
    fuel_per_apply: u64,
    max_memory_bytes: u64,
) -> Result<api::DeployReply, tonic::Status> {
    let module = waft_testkit::wasm(path);
    let chunks = vec![
        api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Header(api::DeployHeader {
                service: service.to_owned(),
                size: module.len() as u64,
                dry_run,
                fuel_per_apply,
                max_memory_bytes,
                ..Default::default()
            })),
        },
        api::DeployChunk {
            kind: Some(api::deploy_chunk::Kind::Data(module)),
        },
    ];
    client(addr)
        .await
        .deploy(futures::stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

fn outcome(r: &api::SubmitReply) -> Result<String, String> {
    match &r.outcome {
        Some(api::submit_reply::Outcome::Ok(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(api::submit_reply::Outcome::Rejected(m))
        | Some(api::submit_reply::Outcome::Trapped(m)) => Err(m.clone()),
        None => Err("empty".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_kv_for_v2_under_load_loses_and_repeats_nothing() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let addrs = cluster.addrs.clone();
    deploy(&addrs[0], "kv", EXAMPLE_KV, false)
        .await
        .expect("deploy v1");
    let before = client(&addrs[1])
        .await
        .submit(api::SubmitRequest {
            service: "kv".into(),
            payload: b"version".to_vec(),
            client_id: 0,
            sequence: 0,
        })
        .await
        .expect("submit")
        .into_inner();
    assert!(
        outcome(&before).is_err_and(|e| e.contains("unknown command")),
        "v1 has no version command"
    );

    tracing::info!("four writers run compare-and-swap chains while v2 is deployed");
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let addr = addrs[w as usize % 3].clone();
        writers.push(tokio::spawn(async move {
            let c = client(&addr).await;
            let key = format!("w{w}");
            let mut seq = 1;
            let submit = |payload: String, seq: u64| {
                let req = api::SubmitRequest {
                    service: "kv".into(),
                    payload: payload.into_bytes(),
                    client_id: 1000 + w,
                    sequence: seq,
                };
                let mut c = c.clone();
                async move {
                    // Retry the same (client, sequence) until it goes through: at most once.
                    loop {
                        match c.submit(req.clone()).await {
                            Ok(r) => return r.into_inner(),
                            Err(s) if s.code() == tonic::Code::Unavailable => {
                                tokio::time::sleep(Duration::from_millis(20)).await
                            }
                            Err(s) => panic!("submit failed: {s}"),
                        }
                    }
                }
            };
            assert_eq!(
                outcome(&submit(format!("put {key} 0"), seq).await),
                Ok("OK".into())
            );
            let mut last = 0;
            for i in 1..=60u64 {
                seq += 1;
                let r = submit(format!("cas {key} {} {i}", i - 1), seq).await;
                assert_eq!(
                    outcome(&r),
                    Ok("OK".into()),
                    "cas {i} of {key}: a lost or doubled write breaks the chain"
                );
                last = i;
            }
            (key, last)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let swapped = deploy(&addrs[2], "kv", TEST_KV2, false)
        .await
        .expect("deploy v2");
    assert!(swapped.index > 0);
    let mut chains = Vec::new();
    for w in writers {
        chains.push(w.await.expect("writer"));
    }
    let (last_index, version) = cluster.write(kv("version")).await;
    assert_eq!(version, Response::Reply(b"kv v2".to_vec()));
    cluster.wait_applied(last_index).await;

    tracing::info!("every node: v2 active since the same index, every write present, same bytes");
    for node in cluster.nodes.iter().flatten() {
        let services = node.state().services();
        assert_eq!(services[0].deployed_at, swapped.index, "node {}", node.id());
        assert_eq!(services[0].module.hash.to_hex(), swapped.module_sha256);
        for (key, last) in &chains {
            let v = node
                .state()
                .query("kv", format!("get {key}").into_bytes())
                .await
                .expect("get");
            assert_eq!(v, last.to_string().into_bytes(), "node {} {key}", node.id());
        }
    }
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_module_that_refuses_the_state_never_takes_over() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let addrs = cluster.addrs.clone();
    deploy(&addrs[1], "kv", EXAMPLE_KV, false)
        .await
        .expect("deploy v1");
    let (index, _) = cluster.write(kv("put a 1")).await;
    let hash_before = cluster.node(0).state().services()[0].module.hash;

    tracing::info!("the hostile guest cannot read kv's snapshot: refused before it is proposed");
    let e = deploy(&addrs[2], "kv", TEST_HOSTILE, false)
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("refused the current state"), "{e}");

    tracing::info!("a dry run validates and changes nothing");
    let dry = deploy(&addrs[0], "kv", TEST_KV2, true)
        .await
        .expect("dry run");
    assert!(dry.dry_run);
    assert_eq!(dry.index, 0);
    let e = deploy(&addrs[0], "kv", TEST_HOSTILE, true)
        .await
        .expect_err("dry run refuses too");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    cluster.wait_applied(index).await;
    for node in cluster.nodes.iter().flatten() {
        assert_eq!(
            node.state().services()[0].module.hash,
            hash_before,
            "node {}",
            node.id()
        );
        let v = node
            .state()
            .query("kv", b"get a".to_vec())
            .await
            .expect("v1 still serves");
        assert_eq!(v, b"1");
    }

    tracing::info!("the state machine refuses it the same way if it gets into the log anyway");
    let (index, resp) = cluster
        .write(Request::Deploy {
            service: "kv".into(),
            module: waft_testkit::wasm(TEST_HOSTILE),
            engine: cluster.node(0).state().engine(),
            limits: Default::default(),
            timestamp_ms: 1,
        })
        .await;
    assert!(
        matches!(&resp, Response::DeployFailed(m) if m.contains("refused the current state")),
        "{resp:?}"
    );
    cluster.wait_applied(index).await;
    for node in cluster.nodes.iter().flatten() {
        assert_eq!(node.state().services()[0].module.hash, hash_before);
    }
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_during_two_deploys_rejoins_with_the_right_version() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    deploy(&cluster.addrs[0], "kv", EXAMPLE_KV, false)
        .await
        .expect("v1");
    cluster.write(kv("put a 1")).await;
    let down = (cluster.wait_leader().await + 1) % 3;
    cluster.stop(down).await;
    let up = cluster.addrs[(down + 1) % 3].clone();
    deploy(&up, "kv", TEST_KV2, false).await.expect("v2");
    cluster.write(kv("put b 2")).await;
    let last = deploy(&up, "kv", EXAMPLE_KV, false)
        .await
        .expect("back to v1");
    let (index, _) = cluster.write(kv("put c 3")).await;
    cluster.restart(down).await;
    cluster.wait_applied(index).await;
    let services = cluster.node(down).state().services();
    assert_eq!(services[0].module.hash.to_hex(), last.module_sha256);
    assert_eq!(services[0].deployed_at, last.index);
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_from_another_engine_stops_the_node_instead_of_diverging() {
    let cluster = TestCluster::start(1, test_settings()).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let result = cluster
        .node(leader)
        .raft()
        .client_write(Request::Deploy {
            service: "kv".into(),
            module: waft_testkit::wasm(EXAMPLE_KV),
            engine: "wasmtime-0.0.0-0000000000000000".into(),
            limits: Default::default(),
            timestamp_ms: 1,
        })
        .await;
    let e = result.expect_err("the node must refuse");
    assert!(e.to_string().contains("engine"), "{e}");
    assert!(
        cluster.node(leader).state().services().is_empty(),
        "nothing was deployed"
    );
    // The node stopped: Raft reports the fatal error (what `waft node` exits on) and takes
    // nothing more.
    let fatal = tokio::time::timeout(Duration::from_secs(30), cluster.node(leader).fatal())
        .await
        .expect("Raft stops on the foreign engine's deploy");
    assert!(fatal.contains("engine"), "{fatal}");
    let after = cluster
        .node(leader)
        .raft()
        .client_write(Request::Command {
            service: "kv".into(),
            payload: b"put a 1".to_vec(),
            client: None,
            timestamp_ms: 2,
        })
        .await;
    assert!(after.is_err(), "a stopped node takes no more writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_restores_earlier_behaviour_with_the_state_carried_over() {
    let mut cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let addrs = cluster.addrs.clone();
    let v1 = deploy(&addrs[0], "kv", EXAMPLE_KV, false)
        .await
        .expect("v1");
    assert_eq!(v1.version, 1);
    cluster.write(kv("put a 1")).await;
    let v2 = deploy(&addrs[1], "kv", TEST_KV2, false).await.expect("v2");
    assert_eq!(v2.version, 2);
    assert_eq!(
        cluster.write(kv("version")).await.1,
        Response::Reply(b"kv v2".to_vec())
    );
    cluster.write(kv("put b 2")).await;

    tracing::info!("roll back (to the previous version) through a follower");
    let rollback = |to_version: u32| {
        let addr = addrs[2].clone();
        async move {
            client(&addr)
                .await
                .rollback(api::RollbackRequest {
                    service: "kv".into(),
                    to_version,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let back = rollback(0).await.expect("rollback");
    assert_eq!(back.version, 3);
    assert_eq!(back.module_sha256, v1.module_sha256);
    let (index, version) = cluster.write(kv("version")).await;
    assert!(
        matches!(version, Response::Rejected(m) if m.contains("unknown command")),
        "v1 behaviour is back"
    );
    cluster.wait_applied(index).await;
    for node in cluster.nodes.iter().flatten() {
        for (k, v) in [("a", "1"), ("b", "2")] {
            let got = node
                .state()
                .query("kv", format!("get {k}").into_bytes())
                .await
                .expect("get");
            assert_eq!(
                got,
                v.as_bytes(),
                "node {} kept {k} through the swaps",
                node.id()
            );
        }
    }

    tracing::info!("services shows the version, the history and the state size");
    let list = client(&addrs[1])
        .await
        .list_services(api::ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    let kv_info = &list.services[0];
    assert_eq!(kv_info.version, 3);
    assert_eq!(
        kv_info
            .history
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(kv_info.state_bytes > 12);

    tracing::info!("roll forward to a named version; refuse unknown versions and services");
    let forward = rollback(2).await.expect("to v2");
    assert_eq!(
        (forward.version, forward.module_sha256.as_str()),
        (4, v2.module_sha256.as_str())
    );
    let e = rollback(99).await.expect_err("no such version");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = client(&addrs[0])
        .await
        .rollback(api::RollbackRequest {
            service: "nope".into(),
            to_version: 0,
        })
        .await
        .expect_err("no such service");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    tracing::info!("the history survives a snapshot and a restart");
    let leader = cluster.wait_leader().await;
    let (index, _) = cluster.write(kv("put c 3")).await;
    cluster.wait_applied(index).await;
    let restarted = (leader + 1) % 3;
    cluster
        .node(restarted)
        .raft()
        .trigger()
        .snapshot()
        .await
        .expect("snapshot");
    cluster
        .node(restarted)
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .snapshot(
            cluster
                .node(restarted)
                .metrics()
                .last_applied
                .expect("applied"),
            "snapshot built",
        )
        .await
        .expect("snapshot built");
    cluster.stop(restarted).await;
    cluster.restart(restarted).await;
    cluster.wait_applied(index).await;
    let services = cluster.node(restarted).state().services();
    assert_eq!(services[0].version, 4);
    assert_eq!(services[0].history.len(), 4);
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deploys_of_one_service_apply_in_log_order_everywhere() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let addrs = cluster.addrs.clone();
    // Version 1 runs under a fuel limit of its own, so neither racing deploy below is the
    // module-and-limits the service already runs (which would change nothing).
    deploy_with_limits(&addrs[0], "kv", EXAMPLE_KV, false, 50_000_000, 0)
        .await
        .expect("v1");
    cluster.write(kv("put a 1")).await;
    let (a, b) = tokio::join!(
        deploy(&addrs[1], "kv", TEST_KV2, false),
        deploy(&addrs[2], "kv", EXAMPLE_KV, false)
    );
    let (a, b) = (a.expect("first deploy"), b.expect("second deploy"));
    assert_ne!(a.index, b.index);
    assert_eq!(
        [a.version, b.version]
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [2, 3].into()
    );
    let last = if a.index > b.index { &a } else { &b };
    let (index, _) = cluster.write(kv("put b 2")).await;
    cluster.wait_applied(index).await;
    for node in cluster.nodes.iter().flatten() {
        let s = &node.state().services()[0];
        assert_eq!(
            (s.version, s.module.hash.to_hex()),
            (3, last.module_sha256.clone()),
            "node {}",
            node.id()
        );
    }
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_racing_a_leader_change_lands_once_or_asks_for_a_retry() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let addrs = cluster.addrs.clone();
    deploy(&addrs[0], "kv", EXAMPLE_KV, false)
        .await
        .expect("v1");
    cluster.write(kv("put a 1")).await;
    let leader = cluster.wait_leader().await;
    let target = ((leader + 1) % 3) as u64;
    tracing::info!(
        leader,
        target,
        "deploy v2 through a follower while leadership moves"
    );
    let via = addrs[(leader + 2) % 3].clone();
    let trigger = cluster.node(leader).raft().trigger();
    let (swap, moved) = tokio::join!(
        deploy(&via, "kv", TEST_KV2, false),
        trigger.transfer_leader(target)
    );
    moved.expect("transfer requested");
    let outcome = match swap {
        Ok(reply) => Some(reply),
        Err(e) => {
            assert_eq!(
                e.code(),
                tonic::Code::Unavailable,
                "only a retryable error is acceptable: {e}"
            );
            None
        }
    };
    // Whatever happened, the next deploy (a retry, or a no-op re-deploy) converges.
    let settled = match outcome {
        Some(r) => r,
        None => loop {
            match deploy(&via, "kv", TEST_KV2, false).await {
                Ok(r) => break r,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("retry failed: {e}"),
            }
        },
    };
    let (index, version) = cluster.write(kv("version")).await;
    assert_eq!(version, Response::Reply(b"kv v2".to_vec()));
    cluster.wait_applied(index).await;
    for node in cluster.nodes.iter().flatten() {
        let s = &node.state().services()[0];
        assert_eq!(
            s.module.hash.to_hex(),
            settled.module_sha256,
            "node {}",
            node.id()
        );
        let v = node
            .state()
            .query("kv", b"get a".to_vec())
            .await
            .expect("get");
        assert_eq!(v, b"1");
    }
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_runs_under_its_own_limits() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    let addrs = cluster.addrs.clone();
    let hostile = waft_testkit::wasm(TEST_HOSTILE);
    let header = |service: &str, fuel: u64| api::DeployHeader {
        service: service.into(),
        size: hostile.len() as u64,
        dry_run: false,
        fuel_per_apply: fuel,
        max_memory_bytes: 0,
        ..Default::default()
    };
    let mut c = client(&addrs[1]).await;
    for (service, fuel) in [("tight", 1_000_000), ("loose", 0)] {
        let chunks = waft::pb::deploy_chunks_with(header(service, fuel), &hostile);
        c.deploy(futures::stream::iter(chunks))
            .await
            .expect("deploy");
    }
    tracing::info!("the same command fits the default fuel and not the tight service's");
    let submit = |service: &str| api::SubmitRequest {
        service: service.into(),
        payload: b"log 3000".to_vec(),
        client_id: 0,
        sequence: 0,
    };
    let loose = c.submit(submit("loose")).await.expect("loose").into_inner();
    assert_eq!(outcome(&loose), Ok("OK".into()));
    let tight = c.submit(submit("tight")).await.expect("tight").into_inner();
    assert!(
        outcome(&tight).is_err_and(|e| e.contains("ran out of fuel")),
        "{tight:?}"
    );
    let list = c
        .list_services(api::ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    let tight_info = list
        .services
        .iter()
        .find(|s| s.name == "tight")
        .expect("tight listed");
    assert_eq!(tight_info.fuel_per_apply, 1_000_000);
    let (index, _) = cluster
        .write(Request::Command {
            service: "tight".into(),
            payload: b"set a 1".to_vec(),
            client: None,
            timestamp_ms: 1,
        })
        .await;
    cluster.wait_applied(index).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}
