//! Connecting to a node: the client flags (`--endpoint`, `--token`, TLS), a [`Connector`] value
//! that carries the TLS settings and token every connection of a command uses, and the words for
//! failed calls. No process-global state: each command builds its connector from its flags.

use anyhow::bail;
use clap::{Args, ValueEnum};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// Where the client connects and how it prints.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Addresses of nodes (`host:port`, comma-separated, or the flag given again): the first
    /// that answers is used, the next when one cannot be reached. Followers forward to the
    /// leader.
    #[arg(
        long,
        global = true,
        env = "WAFT_ENDPOINT",
        default_value = "127.0.0.1:7001",
        value_delimiter = ',',
        value_name = "ADDR[,ADDR...]"
    )]
    pub endpoint: Vec<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The token to present (see `waft node --token`); for `waft node`, the cluster token it
    /// requires of admin calls and peers.
    #[arg(long, global = true, env = "WAFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA certificate (PEM): connect over TLS and trust nodes it signed. For
    /// `waft node`, also the CA its peers' certificates must be signed by (mutual TLS).
    #[arg(long, global = true, env = "WAFT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A certificate (PEM) to present: a node's own (required with --tls-ca for `waft node`),
    /// or a client's.
    #[arg(
        long,
        global = true,
        env = "WAFT_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "WAFT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ClientArgs {
    /// The TLS settings these flags describe (None: plain TCP).
    pub fn tls(&self) -> anyhow::Result<Option<crate::tls::Tls>> {
        match &self.tls_ca {
            None if self.tls_cert.is_some() => {
                bail!("--tls-cert needs --tls-ca (the CA that signed the nodes' certificates)")
            }
            None => Ok(None),
            Some(ca) => {
                crate::tls::Tls::load(ca, self.tls_cert.as_deref(), self.tls_key.as_deref())
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("TLS: {e}"))
            }
        }
    }
}

/// The TLS settings and token a command connects with.
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<crate::tls::Tls>,
    /// Checked printable ASCII when the connector was made.
    token: Option<String>,
}

impl Connector {
    /// Connects with `tls` (None: plain TCP) and presents `token` (None: no token).
    pub fn new(tls: Option<crate::tls::Tls>, token: Option<&str>) -> anyhow::Result<Connector> {
        if let Some(t) = token {
            crate::auth::bearer(t).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
        }
        Ok(Connector {
            tls,
            token: token.map(str::to_owned),
        })
    }

    /// The client TLS settings, if any.
    pub fn client_tls(&self) -> Option<ClientTlsConfig> {
        self.tls.as_ref().map(crate::tls::Tls::client)
    }

    /// An endpoint for `addr` (`host:port` or a URI), over TLS when the connector has TLS.
    pub fn endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let tls = self.tls.as_ref().map(crate::tls::Tls::for_client_crate);
        waft_client::connect::endpoint(addr, tls.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Wraps a channel so that it presents the token.
    pub fn authorized(&self, channel: Channel) -> Conn {
        // Checked when the connector was made, so this parse succeeds.
        let token = self
            .token
            .as_deref()
            .and_then(|t| crate::auth::bearer(t).ok());
        tonic::service::interceptor::InterceptedService::new(channel, Bearer::new(token))
    }

    /// A `waft-client` client of the cluster at `endpoints` with these settings: it finds the
    /// leader, tries the next endpoint when one cannot be reached, and retries with
    /// exactly-once client sessions.
    pub async fn client(&self, endpoints: &[String]) -> anyhow::Result<waft_client::Client> {
        self.build(endpoints, true).await
    }

    /// Like [`Connector::client`], staying on the first node of `endpoints` that answers
    /// (reads answered by that node; it forwards what needs the leader).
    pub async fn client_on(&self, endpoints: &[String]) -> anyhow::Result<waft_client::Client> {
        self.build(endpoints, false).await
    }

    async fn build(
        &self,
        endpoints: &[String],
        follow: bool,
    ) -> anyhow::Result<waft_client::Client> {
        let mut builder = waft_client::Client::builder(endpoints).follow_leader(follow);
        if let Some(tls) = &self.tls {
            builder = builder.tls(tls.for_client_crate());
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        builder.connect().await.map_err(|e| self.client_error(e))
    }

    /// Words for a `waft-client` failure, with the CLI's hints.
    pub fn client_error(&self, e: waft_client::Error) -> anyhow::Error {
        match e {
            waft_client::Error::Unreachable { endpoint, cause } => anyhow::anyhow!(
                "cannot reach a waft node at {endpoint} (is it running? set --endpoint or \
                 WAFT_ENDPOINT; --tls-ca if it serves TLS): {cause}"
            ),
            e => anyhow::anyhow!("{e}"),
        }
    }

    /// A connection to the node at `addr` (3 s to connect), presenting the token.
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Conn> {
        self.dial(addr).await.map_err(|why| {
            anyhow::anyhow!(
                "cannot reach a waft node at {addr} (is it running? set --endpoint or \
                 WAFT_ENDPOINT; --tls-ca if it serves TLS): {why}"
            )
        })
    }

    /// A connection to the node at `addr`, or why there is none.
    async fn dial(&self, addr: &str) -> Result<Conn, String> {
        self.endpoint(addr)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map(|c| self.authorized(c))
            .map_err(|e| connect_error(&e))
    }

    /// Words for a failed call: the status, its causes, a hint when a plain-text client seems
    /// to talk to a TLS node, and the request id to look for in the nodes' logs.
    pub fn status_error(&self, s: tonic::Status) -> anyhow::Error {
        let sources = std::error::Error::source(&s)
            .map(|e| format!(": {}", crate::node::source_chain(e)))
            .unwrap_or_default();
        // A plain-text client talking to a TLS node sees HTTP/2 garbage or a dropped connection.
        let hint = if self.tls.is_none()
            && matches!(
                s.code(),
                tonic::Code::Internal | tonic::Code::Cancelled | tonic::Code::Unknown
            )
            && (s.message().contains("h2 protocol error")
                || s.message().contains("operation was canceled")
                || s.message().contains("transport error"))
        {
            " (if the node serves TLS, pass --tls-ca or set WAFT_TLS_CA)"
        } else {
            ""
        };
        // For a fault on the server's side, the id to look for in the nodes' logs.
        let id = s
            .metadata()
            .get(crate::api::trace::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|_| {
                matches!(
                    s.code(),
                    tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss
                )
            })
            .map(|id| format!(" [request id {id}: look for it in the nodes' logs]"))
            .unwrap_or_default();
        anyhow::anyhow!("{}{sources} ({:?}){hint}{id}", s.message(), s.code())
    }
}

/// A client command's connection settings: the nodes to contact, the output format and the
/// connector.
#[derive(Clone)]
pub struct Client {
    /// The nodes to contact (`host:port`), in the order they are tried.
    pub endpoints: Vec<String>,
    /// How results are printed.
    pub output: Output,
    /// TLS and token.
    pub connector: Connector,
}

impl Client {
    /// The client the flags describe.
    pub fn from_args(args: &ClientArgs) -> anyhow::Result<Client> {
        let endpoints: Vec<String> = args
            .endpoint
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            bail!("--endpoint (or WAFT_ENDPOINT) names no node; give host:port[,host:port...]");
        }
        let connector = Connector::new(args.tls()?, args.token.as_deref())?;
        for e in &endpoints {
            if let Err(why) = connector.endpoint(e) {
                bail!("--endpoint: {e:?} is not a node's address (host:port): {why}");
            }
        }
        Ok(Client {
            endpoints,
            output: args.output,
            connector,
        })
    }

    /// A connection to the first node of `--endpoint` that answers.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let mut failures = Vec::new();
        for addr in &self.endpoints {
            match self.connector.dial(addr).await {
                Ok(conn) => return Ok(conn),
                Err(why) => failures.push((addr, why)),
            }
        }
        Err(match failures.as_slice() {
            [(addr, why)] => anyhow::anyhow!(
                "cannot reach a waft node at {addr} (is it running? set --endpoint or \
                 WAFT_ENDPOINT; --tls-ca if it serves TLS): {why}"
            ),
            each => anyhow::anyhow!(
                "cannot reach any of the {} nodes given in --endpoint (are they running? set \
                 --endpoint or WAFT_ENDPOINT; --tls-ca if they serve TLS): {}",
                each.len(),
                each.iter()
                    .map(|(addr, why)| format!("{addr}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        })
    }

    /// See [`Connector::status_error`].
    pub fn status_error(&self, s: tonic::Status) -> anyhow::Error {
        self.connector.status_error(s)
    }
}

/// Words for a failed connection: the transport error's whole chain (a TLS handshake failure
/// hides under "transport error").
pub fn connect_error(e: &tonic::transport::Error) -> String {
    crate::node::source_chain(e)
}

/// A connection to a node that presents the connector's token (the client crate's).
pub use waft_client::Conn;
use waft_client::connect::Bearer;

/// Retries a call while the cluster says "unavailable" (no leader yet, leader changed).
pub async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..8 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
    call().await
}
