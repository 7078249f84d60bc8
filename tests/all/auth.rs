//! Token authentication: admin calls need the cluster token, data calls the client token (or
//! the cluster token), Raft messages between nodes the cluster token; health stays open.

use crate::support::channel;
use crate::support::cluster::{TestCluster, test_settings};
use crate::support::waft_cli;
use waft::node::NodeConfig;
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft::pb::session::Pipe;
use waft::types::{TypeConfig, Vote};
use waft_testkit::guests::EXAMPLE_KV;

const CLUSTER: &str = "cluster-secret-0123";
const CLIENT: &str = "client-secret-4567";

fn with_tokens(c: &mut NodeConfig) {
    c.tokens = waft::auth::Tokens {
        cluster: Some(CLUSTER.to_owned()),
        client: Some(CLIENT.to_owned()),
    };
}

fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", waft::auth::bearer(t).expect("ascii"));
    }
    r
}

fn submit(cmd: &str) -> api::SubmitRequest {
    api::SubmitRequest {
        service: "kv".into(),
        payload: cmd.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_need_the_right_token_and_peers_the_cluster_token() {
    // Forming the cluster at all shows the nodes authenticate to each other.
    let cluster = TestCluster::start_with(3, test_settings(), with_tokens).await;
    cluster.form().await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.addrs[(leader + 1) % 3].clone();
    let kv = EXAMPLE_KV;

    // Deploy through a follower: refused without or with the wrong token, allowed with the
    // cluster token (the follower forwards it and the leader checks it again).
    let deploy = |token: Option<&'static str>| {
        let follower = follower.clone();
        async move {
            let mut args = vec!["--endpoint", follower.as_str()];
            if let Some(t) = token {
                args.extend(["--token", t]);
            }
            args.extend(["deploy", kv, "--service", "kv"]);
            waft_cli(&args).await
        }
    };
    let o = deploy(None).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("needs the cluster token"),
        "{err}"
    );
    let o = deploy(Some(CLIENT)).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("client token only allows"),
        "{err}"
    );
    let o = deploy(Some("guess")).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("wrong token"), "{err}");
    let o = deploy(Some(CLUSTER)).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Data calls: the client token or the cluster token.
    let mut w = WaftClient::new(channel(&follower).await);
    let e = w
        .submit(with(submit("put a 1"), None))
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let e = w
        .submit(with(submit("put a 1"), Some("nope")))
        .await
        .expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    for token in [CLIENT, CLUSTER] {
        let r = w
            .submit(with(submit("put a 1"), Some(token)))
            .await
            .expect("submit with a token")
            .into_inner();
        assert!(matches!(r.outcome, Some(api::submit_reply::Outcome::Ok(_))));
    }
    tracing::info!("a session: the token is checked when it opens, and again by the leader");
    for token in [None, Some("nope")] {
        let mut s = w.clone();
        let e = Pipe::open(|r| async move { s.session(with(r, token)).await })
            .await
            .expect_err("no session without the right token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }
    let mut s = w.clone();
    let pipe = Pipe::open(|r| async move { s.session(with(r, Some(CLIENT))).await })
        .await
        .expect("a session with the client token");
    let reply = pipe
        .send(api::SessionRequest {
            commands: vec![submit("put s 1")],
        })
        .await
        .expect("answered");
    assert!(
        matches!(
            &reply.results[0].result,
            Some(api::submit_result::Result::Reply(api::SubmitReply {
                outcome: Some(api::submit_reply::Outcome::Ok(_)),
                ..
            }))
        ),
        "{reply:?}"
    );
    let mut c = ClusterClient::new(channel(&follower).await);
    let e = c
        .status(with(api::StatusRequest::default(), None))
        .await
        .expect_err("status");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        c.status(with(api::StatusRequest::default(), Some(CLIENT)))
            .await
            .is_ok()
    );
    let e = c
        .trigger_snapshot(with(api::TriggerSnapshotRequest {}, Some(CLIENT)))
        .await
        .expect_err("admin call with the client token");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // Health checks stay open (load balancers and probes carry no token).
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(&follower).await);
    let s = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "waft.v1.Waft".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Raft messages: the cluster token, nothing less.
    let before = cluster.node(1).metrics().vote;
    let rpc = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(1_000, 9), None);
    for token in [None, Some(CLIENT), Some("guess")] {
        let req = with(waft::pb::encode(&rpc).expect("encode"), token);
        let e = waft::pb::raft::raft_client::RaftClient::new(channel(&cluster.addrs[1]).await)
            .vote(req)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e}");
    }
    assert_eq!(
        cluster.node(1).metrics().vote,
        before,
        "a refused vote changed nothing"
    );
    cluster.shutdown().await;
}
