//! Bytes that are not what a method expects, sent to every gRPC method of a live node: each
//! gets a clear error, the node keeps serving, and nothing changes.

use crate::support::channel;
use crate::support::cluster::{TestCluster, kv, test_settings};
use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use waft::pb::api::{self, cluster_client::ClusterClient};
use waft_testkit::guests::EXAMPLE_KV;

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

async fn unary(ch: &Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone()).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|r| r.into_inner())
}

async fn streaming(ch: &Channel, path: &'static str, body: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.expect("ready");
    let mut replies = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter(vec![body])),
            http::uri::PathAndQuery::from_static(path),
            Raw,
        )
        .await?
        .into_inner();
    loop {
        match replies.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

const UNARY: &[&str] = &[
    "/waft.v1.Waft/Submit",
    "/waft.v1.Waft/SubmitBatch",
    "/waft.v1.Waft/Query",
    // Server streams: a request that does not decode is refused before any reply.
    "/waft.v1.Waft/Watch",
    "/waft.v1.Cluster/Backup",
    "/waft.v1.Waft/ListServices",
    "/waft.v1.Waft/Rollback",
    "/waft.v1.Cluster/Init",
    "/waft.v1.Cluster/AddLearner",
    "/waft.v1.Cluster/ChangeMembership",
    "/waft.v1.Cluster/RemoveNode",
    "/waft.v1.Cluster/TransferLeader",
    "/waft.v1.Cluster/Status",
    "/waft.v1.Cluster/TriggerSnapshot",
    "/waft.v1.Cluster/Audit",
    "/waft.raft.v1.Raft/Vote",
    "/waft.raft.v1.Raft/PreVote",
    "/waft.raft.v1.Raft/TransferLeader",
];

const STREAMING: &[&str] = &[
    "/waft.v1.Waft/Deploy",
    "/waft.v1.Waft/Session",
    "/waft.v1.Cluster/Restore",
    "/waft.raft.v1.Raft/Append",
    "/waft.raft.v1.Raft/InstallSnapshot",
];

/// Bytes no message of any type decodes from: an overlong varint, and a field that claims
/// more bytes than follow.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("an overlong varint", vec![0xFF; 12]),
        ("a truncated field", vec![0x0A, 0x10, b'a', b'b']),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_every_grpc_method_is_refused_and_changes_nothing() {
    let cluster = TestCluster::start(3, test_settings()).await;
    cluster.form().await;
    cluster.deploy("kv", waft_testkit::wasm(EXAMPLE_KV)).await;
    let (index, _) = cluster.write(kv("put a 1")).await;
    cluster.wait_applied(index).await;
    let leader = cluster.wait_leader().await;
    let before = cluster.node(leader).metrics();
    for target in 0..3 {
        let ch = channel(&cluster.addrs[target]).await;
        for path in UNARY {
            for (what, body) in garbage() {
                let e = unary(&ch, path, body)
                    .await
                    .expect_err("garbage is refused");
                assert_eq!(
                    e.code(),
                    tonic::Code::InvalidArgument,
                    "{path} with {what}: {e}"
                );
                assert!(e.message().contains("malformed"), "{path}: {e}");
            }
        }
        for path in STREAMING {
            for (what, body) in garbage() {
                let e = streaming(&ch, path, body)
                    .await
                    .expect_err("garbage is refused");
                assert!(
                    matches!(
                        e.code(),
                        tonic::Code::InvalidArgument | tonic::Code::Unavailable
                    ),
                    "{path} with {what}: {e}"
                );
            }
        }
        tracing::info!("random bytes on the read-only methods: refused, or read as a request");
        let mut seed = 0x1234_5678_u64 + target as u64;
        for _ in 0..200 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 56) as usize;
            let body: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 * 7) >> 13) as u8)
                .collect();
            for path in [
                "/waft.v1.Cluster/Status",
                "/waft.v1.Waft/ListServices",
                "/waft.v1.Waft/Query",
            ] {
                if let Err(e) = unary(&ch, path, body.clone()).await {
                    assert!(
                        matches!(
                            e.code(),
                            tonic::Code::InvalidArgument | tonic::Code::NotFound
                        ),
                        "{path}: {e}"
                    );
                }
            }
        }
    }

    tracing::info!("a message over the size limit is refused before it is read");
    let ch = channel(&cluster.addrs[0]).await;
    let e = unary(&ch, "/waft.v1.Cluster/Status", vec![0; 6 << 20])
        .await
        .expect_err("too large");
    assert!(
        matches!(
            e.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{e}"
    );

    tracing::info!("the cluster is as it was: same leader and term, still serving, identical");
    let after = cluster.node(leader).metrics();
    assert_eq!(after.current_term, before.current_term);
    assert_eq!(after.current_leader, before.current_leader);
    let s = ClusterClient::new(ch)
        .status(api::StatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.members.len(), 3);
    let (index, _) = cluster.write(kv("put b 2")).await;
    cluster.wait_applied(index).await;
    let states = cluster.assert_identical().await;
    assert_eq!(states.len(), 1);
    cluster.shutdown().await;
}
