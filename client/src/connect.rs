//! Connections to nodes: TLS settings, the token every request presents, endpoints.

use crate::Error;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The metadata key a token travels in.
pub const TOKEN_HEADER: &str = "authorization";

/// TLS to the nodes: the CA that signed their certificates, and optionally a certificate of the
/// client's own (for nodes that require mutual TLS).
#[derive(Clone)]
pub struct Tls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Trusts the nodes whose certificates `ca_pem` (PEM) signed.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Tls {
        Tls {
            ca_pem: ca_pem.into(),
            identity: None,
        }
    }

    /// Reads the CA certificate from a PEM file.
    pub fn from_ca_file(path: impl AsRef<std::path::Path>) -> Result<Tls, Error> {
        Ok(Tls::new(read(path.as_ref(), "the CA certificate")?))
    }

    /// Presents `cert_pem` with its private key `key_pem` (both PEM).
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Tls {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Presents the certificate and key in these PEM files.
    pub fn with_identity_files(
        self,
        cert: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Result<Tls, Error> {
        let cert = read(cert.as_ref(), "the certificate")?;
        let key = read(key.as_ref(), "the key")?;
        Ok(self.with_identity(cert, key))
    }

    /// tonic's client settings for these.
    pub fn client_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
}

/// The `authorization` value for `token`.
pub fn bearer(token: &str) -> Result<AsciiMetadataValue, Error> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Error::Config("a token must be printable ASCII".to_owned()))
}

/// Adds a token (if any) to every request.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// Presents `token` (None: no token).
    pub fn new(token: Option<AsciiMetadataValue>) -> Bearer {
        Bearer(token)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(TOKEN_HEADER, v.clone());
        }
        Ok(request)
    }
}

/// A connection to a node that presents the client's token.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// An endpoint for `addr` (`host:port` or a URI), over TLS when `tls` is set.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, Error> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| Error::Config(format!("bad endpoint {addr:?}: {e}")))?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.client_config()).map_err(|e| {
            Error::Config(format!(
                "TLS settings for {addr}: {}",
                crate::error::chain(&e)
            ))
        }),
        None => Ok(endpoint),
    }
}

/// Connects to `addr` within `timeout`; the error names the endpoint and the transport's cause
/// (with a hint when it looks like TLS on one side only).
pub async fn connect(addr: &str, tls: Option<&Tls>, timeout: Duration) -> Result<Channel, Error> {
    let endpoint = endpoint(addr, tls)?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => {
            let mut cause = crate::error::chain(&e);
            if tls.is_some() && !cause.contains("refused") {
                cause.push_str(" (does the node serve TLS, and did this CA sign its certificate?)");
            }
            Err(Error::Unreachable {
                endpoint: addr.to_owned(),
                cause,
            })
        }
        Err(_) => Err(Error::Unreachable {
            endpoint: addr.to_owned(),
            cause: format!("no connection within {timeout:?}"),
        }),
    }
}
