//! Asking a member for its status (`waft.v1.Cluster/Status`) over the node-to-node network,
//! as a member identified by this node's cluster identity: what the leader asks each member of
//! its build and the cluster versions it runs (`crate::upgrade`).

use super::network::NetworkFactory;
use crate::pb::api;
use crate::types::NodeId;
use std::time::Duration;

/// Node `id`'s status, or `None` when it does not answer within `timeout`.
pub async fn member_status(
    net: &NetworkFactory,
    id: NodeId,
    addr: &str,
    timeout: Duration,
) -> Option<api::StatusReply> {
    let channel = net.channel(addr).ok()?;
    let mut req = tonic::Request::new(api::StatusRequest::default());
    net.identity().stamp(req.metadata_mut(), id);
    req.set_timeout(timeout);
    let mut client = api::cluster_client::ClusterClient::new(channel);
    Some(
        tokio::time::timeout(timeout, client.status(req))
            .await
            .ok()?
            .ok()?
            .into_inner(),
    )
}
