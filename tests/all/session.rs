//! `Session`: commands pipelined on one stream, to the leader and through a follower, in order,
//! with limits, exactly-once lanes and a leader change under way.

use crate::support::cluster::{TestCluster, kv, test_settings};
use std::time::Duration;
use tonic::transport::Channel;
use waft::pb::api::{self, cluster_client::ClusterClient, waft_client::WaftClient};
use waft::pb::session::Pipe;
use waft_testkit::guests::EXAMPLE_KV;

async fn waft(addr: &str) -> WaftClient<Channel> {
    WaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
}

async fn open(addr: &str) -> Pipe {
    let mut c = waft(addr).await;
    Pipe::open(|requests| async move { c.session(requests).await })
        .await
        .expect("open a session")
}

/// A linearizable `get KEY` on the kv service through `addr`.
async fn get(addr: &str, key: &str) -> Option<api::query_reply::Outcome> {
    waft(addr)
        .await
        .query(api::QueryRequest {
            service: "kv".into(),
            payload: format!("get {key}").into_bytes(),
            consistency: api::Consistency::Linearizable as i32,
        })
        .await
        .expect("query")
        .into_inner()
        .outcome
}

fn command(payload: &str, client_id: u64, sequence: u64) -> api::SubmitRequest {
    api::SubmitRequest {
        service: "kv".to_owned(),
        payload: payload.as_bytes().to_vec(),
        client_id,
        sequence,
    }
}

fn one(commands: Vec<api::SubmitRequest>) -> api::SessionRequest {
    api::SessionRequest { commands }
}

fn outcome(r: &api::SubmitResult) -> Result<(&[u8], u64), (tonic::Code, String)> {
    match &r.result {
        Some(api::submit_result::Result::Reply(api::SubmitReply {
            outcome: Some(api::submit_reply::Outcome::Ok(b)),
            index,
        })) => Ok((b, *index)),
        Some(api::submit_result::Result::Reply(other)) => {
            Err((tonic::Code::Ok, format!("{other:?}")))
        }
        Some(api::submit_result::Result::Failure(f)) => {
            Err((tonic::Code::from(f.code), f.message.clone()))
        }
        None => panic!("an empty result"),
    }
}

async fn kv_cluster() -> (TestCluster, usize) {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let leader = cluster.wait_leader().await;
    (cluster, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_pipelines_requests_and_answers_each_in_order_on_the_leader_and_a_follower() {
    let (cluster, leader) = kv_cluster().await;
    let follower = (leader + 1) % 3;
    for node in [leader, follower] {
        let pipe = open(&cluster.addrs[node]).await;
        let key = format!("chain{node}");
        // 300 requests sent before any answer is awaited: a chain of compare-and-swaps, which
        // only all succeed if they are applied in the order sent.
        let mut sent = vec![pipe.send(one(vec![command(&format!("put {key} 0"), 0, 0)]))];
        for i in 1..300 {
            sent.push(pipe.send(one(vec![command(
                &format!("cas {key} {} {i}", i - 1),
                0,
                0,
            )])));
        }
        // Requests with several commands, bad ones among them, in the same pipeline.
        let big = "x".repeat(2 << 20);
        sent.push(pipe.send(one(vec![
            command(&format!("cas {key} 299 300"), 0, 0),
            api::SubmitRequest {
                service: String::new(),
                ..command("put a 1", 0, 0)
            },
            api::SubmitRequest {
                service: "nope".into(),
                ..command("put a 1", 0, 0)
            },
            command(&format!("put big {big}"), 0, 0),
            // One client command twice: applied once, the retry gets the first reply.
            command(&format!("cas {key} 300 301"), 4242 + node as u64, 1),
            command(&format!("cas {key} 300 301"), 4242 + node as u64, 1),
        ])));
        // A request over a batch's limit is refused whole; the next one is served.
        let many = (0..1025).map(|i| command(&format!("put m{i} v"), 0, 0));
        sent.push(pipe.send(one(many.collect())));
        sent.push(pipe.send(one(vec![command(&format!("get {key}"), 0, 0)])));
        let replies = futures::future::join_all(sent).await;
        let mut last_index = 0;
        for (i, reply) in replies[..300].iter().enumerate() {
            let reply = reply.as_ref().expect("answered");
            assert_eq!(reply.results.len(), 1);
            let (ok, index) = outcome(&reply.results[0]).expect("applied");
            assert_eq!(ok, b"OK", "request {i}");
            assert!(
                index > last_index,
                "request {i} at {index} after {last_index}"
            );
            last_index = index;
        }
        let mixed = &replies[300].as_ref().expect("answered").results;
        assert_eq!(mixed.len(), 6);
        assert_eq!(outcome(&mixed[0]).expect("cas").0, b"OK");
        assert_eq!(
            outcome(&mixed[1]).expect_err("no service").0,
            tonic::Code::InvalidArgument
        );
        assert!(outcome(&mixed[2]).is_err(), "unknown service");
        let (code, message) = outcome(&mixed[3]).expect_err("too big");
        assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        let first = outcome(&mixed[4]).expect("session command").0;
        assert_eq!(outcome(&mixed[5]).expect("its retry").0, first);
        let over = &replies[301].as_ref().expect("answered").results;
        assert_eq!(over.len(), 1025);
        for r in over {
            let (code, message) = outcome(r).expect_err("over the limit");
            assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        }
        let get = &replies[302].as_ref().expect("answered").results;
        assert_eq!(outcome(&get[0]).expect("get").0, b"301");
    }
    // Nothing of the refused request was proposed.
    let r = get(&cluster.addrs[leader], "m0").await;
    assert!(
        matches!(r, Some(api::query_reply::Outcome::Rejected(_))),
        "{r:?}"
    );
    let (last, _) = cluster.write(kv("put end 1")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_that_the_client_ends_is_answered_in_full_first() {
    let (cluster, leader) = kv_cluster().await;
    let follower = (leader + 2) % 3;
    let requests: Vec<api::SessionRequest> = (0..200)
        .map(|i| one(vec![command(&format!("put end{i} {i}"), 0, 0)]))
        .collect();
    // The whole request stream is written and closed at once.
    let mut replies = waft(&cluster.addrs[follower])
        .await
        .session(futures::stream::iter(requests))
        .await
        .expect("session")
        .into_inner();
    let mut n = 0;
    while let Some(reply) = replies.message().await.expect("a reply, then the end") {
        assert_eq!(outcome(&reply.results[0]).expect("applied").0, b"OK");
        n += 1;
    }
    assert_eq!(n, 200, "every request answered before the stream ended");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_lanes_through_a_follower_apply_each_command_once_across_a_leader_change() {
    let (cluster, leader) = kv_cluster().await;
    let follower = (leader + 1) % 3;
    let addr = cluster.addrs[follower].clone();
    let pipe = std::sync::Arc::new(tokio::sync::Mutex::new(open(&addr).await));
    // 8 lanes, each a client id with one command in flight: a chain of compare-and-swaps on
    // its own key, each retried with its sequence number until it has an answer. Applied
    // twice, a cas would answer an error; skipped, the next would.
    const STEPS: u64 = 150;
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut lanes = Vec::new();
    for lane in 0..8u64 {
        let (pipe, addr, progress) = (pipe.clone(), addr.clone(), progress.clone());
        lanes.push(tokio::spawn(async move {
            let mut retried = 0;
            for seq in 1..=STEPS {
                let cmd = if seq == 1 {
                    format!("put lane{lane} 1")
                } else {
                    format!("cas lane{lane} {} {seq}", seq - 1)
                };
                loop {
                    let current = pipe.lock().await.clone();
                    let answer = current
                        .send(one(vec![command(&cmd, 9000 + lane, seq)]))
                        .await;
                    let result = match answer {
                        Ok(reply) => outcome(&reply.results[0]).map(|(ok, i)| (ok.to_vec(), i)),
                        Err(status) => {
                            // The session itself ended: open another.
                            let mut slot = pipe.lock().await;
                            if slot.is_broken() {
                                *slot = open(&addr).await;
                            }
                            Err((status.code(), status.message().to_owned()))
                        }
                    };
                    match result {
                        Ok((ok, _)) => {
                            assert_eq!(ok, b"OK".to_vec(), "lane {lane}: {cmd}");
                            progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                        Err((tonic::Code::Unavailable, _)) => {
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(other) => panic!("lane {lane}: {cmd}: {other:?}"),
                    }
                }
            }
            retried
        }));
    }
    // Leadership moves to the third node while the lanes run.
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let target = ((leader + 2) % 3) as u64;
    ClusterClient::connect(format!("http://{}", cluster.addrs[leader]))
        .await
        .expect("connect")
        .transfer_leader(api::TransferLeaderRequest { to: target })
        .await
        .expect("transfer");
    let at_transfer = progress.load(std::sync::atomic::Ordering::Relaxed);
    let mut retried = 0;
    for lane in lanes {
        retried += lane.await.expect("lane");
    }
    tracing::info!(
        retried,
        at_transfer,
        "commands retried across the leader change"
    );
    assert!(
        at_transfer < 8 * STEPS / 2,
        "the leader changed while the lanes ran"
    );
    cluster.wait_leader_is(target as usize).await;
    for lane in 0..8 {
        assert_eq!(
            get(&cluster.addrs[target as usize], &format!("lane{lane}")).await,
            Some(api::query_reply::Outcome::Ok(
                STEPS.to_string().into_bytes()
            ))
        );
    }
    let (last, _) = cluster.write(kv("put end 1")).await;
    cluster.wait_applied(last).await;
    cluster.assert_identical().await;
    cluster.shutdown().await;
}
