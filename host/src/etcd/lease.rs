//! etcd's `Lease` service on the etcd-kv guest: grant, revoke, keep-alive (a stream), time to
//! live, list. A lease's expiry is a guest timer (`waft:fsm@0.2.0`): when it fires, every
//! replica revokes the lease at the same log entry and deletes its keys in one revision.
//!
//! Each keep-alive is a log entry (etcd keeps leases on its leader and checkpoints them); so is
//! a time-to-live request, which reads the log's clock.

use super::EtcdKv;
use crate::pb::etcd::lease_server::Lease;
use crate::pb::etcd::*;
use futures::Stream;
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

/// Keep-alive responses a stream sends ahead of a slow reader.
const KEEPALIVE_BUFFER: usize = 64;

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for EtcdKv {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let bytes = self
            .write(
                &self.authorize(request.metadata())?,
                b'G',
                request.get_ref(),
            )
            .await?;
        self.finish(bytes, |m: &mut LeaseGrantResponse| &mut m.header)
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let bytes = self
            .write(
                &self.authorize(request.metadata())?,
                b'V',
                request.get_ref(),
            )
            .await?;
        self.finish(bytes, |m: &mut LeaseRevokeResponse| &mut m.header)
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let caller = self.authorize(request.metadata())?;
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = incoming.message() => next,
                    () = tx.closed() => return,
                };
                let reply = match next {
                    Ok(Some(keep)) => match this.write(&caller, b'K', &keep).await {
                        Ok(bytes) => {
                            this.complete(bytes, |m: &mut LeaseKeepAliveResponse| &mut m.header)
                        }
                        Err(status) => Err(status),
                    },
                    Ok(None) => return,
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let bytes = self
            .write(
                &self.authorize(request.metadata())?,
                b'L',
                request.get_ref(),
            )
            .await?;
        self.finish(bytes, |m: &mut LeaseTimeToLiveResponse| &mut m.header)
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let bytes = self
            .read(
                &self.authorize(request.metadata())?,
                b'Q',
                request.get_ref(),
                false,
            )
            .await?;
        self.finish(bytes, |m: &mut LeaseLeasesResponse| &mut m.header)
    }
}
