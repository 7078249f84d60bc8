//! The node's gRPC servers: Raft between peers, the client API (`waft.v1`), health and
//! reflection on one listener; the etcd endpoint on its own, if configured.

use super::accepted::Accepted;
use super::{Core, NodeConfig, NodeError};
use crate::api::{Api, ApiParts, ClusterService, WaftService};
use crate::pb::api::{cluster_server::ClusterServer, waft_server::WaftServer};
use crate::pb::raft::raft_server::RaftServer;
use crate::raft::RaftService;
use crate::runtime::Runtime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The servers a node runs, and how to stop them.
pub(super) struct Servers {
    pub(super) stop: oneshot::Sender<()>,
    pub(super) main: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The main server's open connections (closed when the node stops).
    pub(super) accepted: Accepted,
    pub(super) etcd: Option<(std::net::SocketAddr, JoinHandle<()>)>,
    /// Calls by method and code, shared by the client API, the etcd endpoint and metrics.
    pub(super) rpc: std::sync::Arc<crate::api::trace::RpcMetrics>,
}

/// Serves `core` on `listener` (and the etcd endpoint on its address).
pub(super) async fn serve(
    config: &NodeConfig,
    core: &Core,
    runtime: Runtime,
    addr: String,
    listener: TcpListener,
) -> Result<Servers, NodeError> {
    let snapshot_dir = config.data_dir.join("snapshots");
    let max_module = runtime.limits().max_module_bytes;
    let raft = core.raft.clone();
    let identity = core.identity.clone();
    let service = RaftService::new(
        raft.clone(),
        identity.clone(),
        snapshot_dir.clone(),
        config.snapshots.clone(),
    )
    .with_state(core.state.clone())
    .require_peer_certificate(config.net.tls.is_some())
    .share_compiled(config.net.share_compiled)
    .max_guest_memory(config.api.max_guest_memory)
    .record_messages(config.record_messages.clone());
    let max = config.net.max_message_bytes;
    let trace = crate::api::trace::TraceLayer::new(config.id);
    let api = Api::new(ApiParts {
        id: config.id,
        addr,
        raft: raft.clone(),
        state: core.state.clone(),
        runtime,
        peers: core.network.clone(),
        limits: config.api.clone(),
        snapshot_dir,
        tokens: config.tokens.clone(),
        rpc: trace.metrics(),
    });
    // Client messages: a payload, or a deploy chunk, plus framing.
    let api_max = config.api.max_payload_bytes.max(max_module) + (64 << 10);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WaftServer<WaftService>>()
        .await;
    health_reporter
        .set_serving::<ClusterServer<ClusterService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::pb::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| NodeError::Raft(format!("reflection: {e}")))?;
    // Older clients (grpcurl up to 1.8) only speak the v1alpha reflection protocol.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::pb::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| NodeError::Raft(format!("reflection: {e}")))?;
    let etcd = match config.etcd_listen {
        None => None,
        Some(at) => {
            let l = TcpListener::bind(at).await?;
            let bound = l.local_addr()?;
            let kv = crate::etcd::EtcdKv::new(
                api.clone(),
                raft.clone(),
                identity.clone(),
                config.etcd_service.clone(),
                core.state.clone(),
            );
            let scheme = if config.net.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let admin = crate::etcd::EtcdAdmin::new(kv.clone(), format!("{scheme}://{bound}"));
            let mut builder = server_builder(config.net.tls.as_ref())?.layer(trace.clone());
            let task = tokio::spawn(async move {
                let served = builder
                    .add_service(
                        crate::pb::etcd::kv_server::KvServer::new(kv.clone())
                            .max_decoding_message_size(api_max)
                            .max_encoding_message_size(api_max),
                    )
                    .add_service(crate::pb::etcd::cluster_server::ClusterServer::new(
                        admin.clone(),
                    ))
                    .add_service(crate::pb::etcd::maintenance_server::MaintenanceServer::new(
                        admin,
                    ))
                    .add_service(crate::pb::etcd::lease_server::LeaseServer::new(kv.clone()))
                    .add_service(
                        crate::pb::etcd::watch_server::WatchServer::new(kv.clone())
                            .max_decoding_message_size(api_max)
                            .max_encoding_message_size(api_max),
                    )
                    .serve_with_incoming(incoming(l, Accepted::default()))
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the etcd endpoint stopped");
                }
            });
            Some((bound, task))
        }
    };
    let (stop, stop_rx) = oneshot::channel::<()>();
    let rpc = trace.metrics();
    let accepted = Accepted::default();
    let main = tokio::spawn(
        server_builder(config.net.tls.as_ref())?
            .layer(trace)
            .add_service(
                RaftServer::new(service)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(tonic::service::interceptor::InterceptedService::new(
                WaftServer::new(api.waft_service())
                    .max_decoding_message_size(api_max)
                    .max_encoding_message_size(api_max),
                crate::api::forwarding_check(identity.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                ClusterServer::new(api.cluster_service()),
                crate::api::forwarding_check(identity),
            ))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .serve_with_incoming_shutdown(incoming(listener, accepted.clone()), async {
                let _ = stop_rx.await;
            }),
    );
    Ok(Servers {
        stop,
        main,
        accepted,
        etcd,
        rpc,
    })
}

/// A gRPC server builder, serving TLS when `tls` is set.
fn server_builder(tls: Option<&crate::tls::Tls>) -> Result<tonic::transport::Server, NodeError> {
    let builder = tonic::transport::Server::builder().tcp_nodelay(true);
    match tls {
        None => Ok(builder),
        Some(tls) => {
            let config = tls.server().map_err(|e| NodeError::Tls(e.to_string()))?;
            builder.tls_config(config).map_err(|e| {
                NodeError::Tls(format!(
                    "the certificate, its key or the CA cannot be used together: {}",
                    source_chain(&e)
                ))
            })
        }
    }
}

/// An error and its sources, in words (tonic's transport error alone says little).
pub(crate) fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut next = e.source();
    while let Some(s) = next {
        // A layer that repeats the one it wraps ("tcp connect error: tcp connect error") says
        // nothing new.
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        next = s.source();
    }
    out
}

/// Accepted connections with Nagle's algorithm off. tonic's own `tcp_nodelay` applies only to
/// listeners it binds itself; without this, small replies wait for delayed ACKs (~20 ms per
/// round trip on Linux).
fn incoming(
    listener: TcpListener,
    accepted: Accepted,
) -> impl futures::Stream<Item = std::io::Result<super::accepted::Tracked>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(accepted.track(conn))
    })
}
