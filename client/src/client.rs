//! [`Client`]: connections that find and follow the leader, and the calls of `waft.v1.Waft`
//! with retries that never apply a command twice.

use crate::connect::Bearer;
use crate::pool::{ClientBuilder, Pool, waft};
use crate::proto::{self, cluster_client::ClusterClient};
use crate::reply::{Answer, Applied, Consistency, Deployed, Outcome};
use crate::{Error, Session};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Told of a deploy's upload: `None` when it (re)starts, `Some(bytes)` for each chunk sent.
pub type Progress = Arc<dyn Fn(Option<u64>) + Send + Sync>;

/// Told of each step of a deploy on the leader (see [`Client::deploy_watched`]).
pub type Steps = Arc<dyn Fn(&proto::DeployStep) + Send + Sync>;

/// A deploy's upload as a request: `chunks`, each told to `progress` as it goes out (from
/// zero again on each attempt), under the deploy's deadline.
fn upload(
    chunks: &[proto::DeployChunk],
    progress: Option<Progress>,
    deadline: Duration,
) -> tonic::Request<impl futures::Stream<Item = proto::DeployChunk> + use<>> {
    if let Some(p) = &progress {
        p(None);
    }
    let outgoing = futures::stream::iter(chunks.to_vec()).inspect(move |chunk| {
        if let (Some(p), Some(proto::deploy_chunk::Kind::Data(d))) = (&progress, &chunk.kind) {
            p(Some(d.len() as u64));
        }
    });
    let mut r = tonic::Request::new(outgoing);
    r.set_timeout(deadline);
    r
}

impl ClientBuilder {
    /// Connects to the first endpoint that answers (then to the leader it names).
    pub async fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".to_owned()));
        }
        for e in &self.endpoints {
            crate::connect::endpoint(e, self.tls.as_ref())?;
        }
        let bearer = Bearer::new(
            self.token
                .as_deref()
                .map(crate::connect::bearer)
                .transpose()?,
        );
        let client = Client {
            pool: Arc::new(Pool::new(self, bearer)),
        };
        client.pool.conn().await?;
        Ok(client)
    }
}

/// A client of a waft cluster. Cheap to clone; clones share connections and client sessions.
///
/// Every call has a deadline, and a call the cluster cannot take now (no leader yet, the
/// leader changed, the node went down) is made again on another node, a little later each
/// time. Commands are submitted with an exactly-once client session: one made again after an
/// unknown outcome is applied at most once and answered with its first reply.
#[derive(Debug, Clone)]
pub struct Client {
    pool: Arc<Pool>,
}

impl Client {
    /// A client of the cluster that `endpoints` (`host:port` of any nodes) belong to.
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            token: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            deploy_timeout: Duration::from_secs(300),
            attempts: 10,
            follow_leader: true,
        }
    }

    /// Connects with the default settings.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client, Error> {
        Client::builder([endpoint.into()]).connect().await
    }

    /// The address calls go to now.
    pub async fn current_endpoint(&self) -> Option<String> {
        self.pool.current_endpoint().await
    }

    /// Submits one command to `service`, exactly once: made again (with the same client
    /// session and sequence number) while the outcome is unknown.
    pub async fn submit(
        &self,
        service: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Applied, Error> {
        let (id, seq) = self.pool.take_lane();
        let request = proto::SubmitRequest {
            service: service.to_owned(),
            payload: payload.into(),
            client_id: id,
            sequence: seq,
        };
        let result = self
            .pool
            .retrying(|c| {
                let r = self.pool.request(request.clone());
                async move { waft(c).submit(r).await }
            })
            .await;
        // Used up whether or not it was applied: an unknown outcome may still apply it.
        self.pool.put_lane((id, seq + 1));
        Applied::from_reply(result?.into_inner())
    }

    /// Submits `payloads` to `service` as one batch (proposed together, in order): one result
    /// per command. Commands the cluster could not take are sent again, with their numbers.
    pub async fn submit_batch<P>(
        &self,
        service: &str,
        payloads: P,
    ) -> Result<Vec<Result<Applied, Error>>, Error>
    where
        P: IntoIterator,
        P::Item: Into<Vec<u8>>,
    {
        let (id, first) = self.pool.take_lane();
        let commands = crate::session::numbered(service, payloads, id, first);
        let next = first + commands.len() as u64;
        let session = BatchCall(self.pool.clone());
        let result =
            crate::session::send_until_answered(&session, commands, self.pool.settings().attempts)
                .await;
        // Given back only now: one batch in flight per client session.
        self.pool.put_lane((id, next));
        result
    }

    /// A pipelined `Session` stream on the current connection (see [`Session`]).
    pub fn session(&self) -> Session {
        Session::new(self.pool.clone())
    }

    /// Asks `service` `payload` at `consistency`.
    pub async fn query(
        &self,
        service: &str,
        payload: impl Into<Vec<u8>>,
        consistency: Consistency,
    ) -> Result<Answer, Error> {
        let request = proto::QueryRequest {
            service: service.to_owned(),
            payload: payload.into(),
            consistency: match consistency {
                Consistency::Linearizable => proto::Consistency::Linearizable,
                Consistency::Lease => proto::Consistency::Lease,
                Consistency::Stale => proto::Consistency::Stale,
            } as i32,
        };
        let reply = self
            .pool
            .retrying(|c| {
                let r = self.pool.request(request.clone());
                async move { waft(c).query(r).await }
            })
            .await?
            .into_inner();
        use proto::query_reply::Outcome as O;
        let outcome = match reply.outcome {
            Some(O::Ok(b)) => Outcome::Ok(b),
            Some(O::Rejected(m)) => Outcome::Rejected(m),
            Some(O::Trapped(m)) => Outcome::Trapped(m),
            None => return Err(crate::reply::empty()),
        };
        Ok(Answer {
            applied_index: reply.applied_index,
            outcome,
        })
    }

    /// Deploys the component `module` (a `.wasm`) as `service`, streamed in 1 MiB chunks.
    /// Needs the cluster (admin) token when the cluster has one.
    pub async fn deploy(&self, service: &str, module: &[u8]) -> Result<Deployed, Error> {
        self.deploy_with(
            proto::DeployHeader {
                service: service.to_owned(),
                size: module.len() as u64,
                ..Default::default()
            },
            module,
        )
        .await
    }

    /// Deploys with every setting of the header (a dry run, limits, a forced swap).
    pub async fn deploy_with(
        &self,
        header: proto::DeployHeader,
        module: &[u8],
    ) -> Result<Deployed, Error> {
        let reply = self.deploy_reply(header, module, None).await?;
        Ok(Deployed {
            module_sha256: reply.module_sha256,
            index: reply.index,
            version: reply.version,
            unchanged: reply.unchanged,
        })
    }

    /// Deploys and returns the node's whole reply (a dry run's trial report, the verifier's
    /// findings); `progress` is told the bytes of each chunk as it goes out (it starts again
    /// from zero when the upload is retried).
    pub async fn deploy_reply(
        &self,
        header: proto::DeployHeader,
        module: &[u8],
        progress: Option<Progress>,
    ) -> Result<proto::DeployReply, Error> {
        let chunks = deploy_chunks(header, module);
        let deadline = self.pool.settings().deploy_timeout;
        let reply = self
            .pool
            .retrying(|c| {
                let r = upload(&chunks, progress.clone(), deadline);
                async move { waft(c).deploy(r).await }
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// [`Client::deploy_reply`], with `steps` told of each step on the leader as it happens:
    /// which members compile the module, each one's compile, the leader's check, the proposal
    /// (`Waft.DeployWatched`). Against a node of an earlier release, which does not know that
    /// call, the deploy goes on without steps.
    pub async fn deploy_watched(
        &self,
        header: proto::DeployHeader,
        module: &[u8],
        progress: Option<Progress>,
        steps: Steps,
    ) -> Result<proto::DeployReply, Error> {
        use proto::deploy_progress::Kind;
        let chunks = deploy_chunks(header, module);
        let deadline = self.pool.settings().deploy_timeout;
        self.pool
            .retrying(|c| {
                let r = upload(&chunks, progress.clone(), deadline);
                let (chunks, progress, steps) = (chunks.clone(), progress.clone(), steps.clone());
                async move {
                    let mut stream = match waft(c.clone()).deploy_watched(r).await {
                        Ok(s) => s.into_inner(),
                        Err(s) if s.code() == tonic::Code::Unimplemented => {
                            let r = upload(&chunks, progress, deadline);
                            return waft(c).deploy(r).await.map(tonic::Response::into_inner);
                        }
                        Err(s) => return Err(s),
                    };
                    while let Some(m) = stream.message().await? {
                        match m.kind {
                            Some(Kind::Step(s)) => steps(&s),
                            Some(Kind::Done(reply)) => return Ok(reply),
                            None => {}
                        }
                    }
                    Err(tonic::Status::unavailable(
                        "the deploy's progress ended before its reply (the connection or the \
                         leader went away); the deploy may have gone through: retry (deploying \
                         what already runs changes nothing)",
                    ))
                }
            })
            .await
    }

    /// The services the cluster runs.
    pub async fn services(&self) -> Result<Vec<proto::ServiceInfo>, Error> {
        Ok(self
            .pool
            .retrying(|c| {
                let r = self.pool.request(proto::ListServicesRequest {});
                async move { waft(c).list_services(r).await }
            })
            .await?
            .into_inner()
            .services)
    }

    /// The contacted node's view of the cluster.
    pub async fn status(&self) -> Result<proto::StatusReply, Error> {
        Ok(self
            .pool
            .retrying(|c| {
                let r = self.pool.request(proto::StatusRequest::default());
                async move { ClusterClient::new(c).status(r).await }
            })
            .await?
            .into_inner())
    }

    /// The events of `service` (every service if None) from log index `from` (None: from
    /// now on), resumed after the last one seen when the connection breaks (see
    /// [`crate::Watch`]).
    pub fn watch(&self, service: Option<&str>, from: Option<u64>) -> crate::Watch {
        crate::Watch::new(
            self.pool.clone(),
            service.unwrap_or_default().to_owned(),
            None,
            from.unwrap_or(0),
        )
    }

    /// Like [`Client::watch`], for the events guests emit (`waft:fsm@0.2.0`'s `events.emit`)
    /// under topics that start with `topic_prefix` (every topic if empty): each arrives with
    /// its topic in the `Emitted` outcome and its data in `payload`.
    pub fn watch_events(
        &self,
        service: Option<&str>,
        topic_prefix: &str,
        from: Option<u64>,
    ) -> crate::Watch {
        crate::Watch::new(
            self.pool.clone(),
            service.unwrap_or_default().to_owned(),
            Some(topic_prefix.to_owned()),
            from.unwrap_or(0),
        )
    }
}

/// A deploy upload: the header, then the module in 1 MiB chunks.
pub fn deploy_chunks(header: proto::DeployHeader, module: &[u8]) -> Vec<proto::DeployChunk> {
    use proto::deploy_chunk::Kind;
    std::iter::once(proto::DeployChunk {
        kind: Some(Kind::Header(header)),
    })
    .chain(module.chunks(1 << 20).map(|c| proto::DeployChunk {
        kind: Some(Kind::Data(c.to_vec())),
    }))
    .collect()
}

/// A SubmitBatch as one round of [`crate::session::send_until_answered`].
struct BatchCall(Arc<Pool>);

impl crate::session::Round for BatchCall {
    async fn round(
        &self,
        commands: Vec<proto::SubmitRequest>,
    ) -> Result<Vec<proto::SubmitResult>, Error> {
        let n = commands.len();
        let reply = self
            .0
            .retrying(|c| {
                let r = self.0.request(proto::SubmitBatchRequest {
                    commands: commands.clone(),
                });
                async move { waft(c).submit_batch(r).await }
            })
            .await?
            .into_inner();
        crate::session::check_count(reply.results, n)
    }
}
