//! Token authentication.
//!
//! Two shared secrets, both optional, presented as `authorization: Bearer TOKEN`:
//!
//! - the **cluster token** (`waft node --token`): required for everything that changes what
//!   the cluster runs or who is in it (deploy, rollback, backup, restore, membership, leader
//!   transfer, snapshots, audits) and, between nodes, for every Raft message. Every node of a
//!   cluster is started with the same one.
//! - the **client token** (`waft node --client-token`): when set, required for submit, query,
//!   listing services and status (the cluster token is accepted there too). When unset, those
//!   calls are open.
//!
//! A call without a token where one is needed is `UNAUTHENTICATED`; a wrong token is
//! `UNAUTHENTICATED`; the client token on an admin call is `PERMISSION_DENIED`. Health checks and
//! reflection stay open. A follower forwards the caller's token with the call, so the leader
//! checks it again.
//!
//! Tokens travel in clear text unless the node serves TLS (`--tls-ca`, see [`crate::tls`]): off a
//! trusted network, use both.

use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// The gRPC metadata key holding the token.
pub const HEADER: &str = "authorization";

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Data-plane calls: submit, query, list, status.
    Client,
    /// Everything that changes the cluster's code, data wholesale, or membership.
    Admin,
}

/// The tokens a node accepts.
#[derive(Clone, Default)]
pub struct Tokens {
    /// Required for admin calls and Raft messages, when set.
    pub cluster: Option<String>,
    /// Required for client calls, when set.
    pub client: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.debug_struct("Tokens")
            .field("cluster", &self.cluster.as_ref().map(|_| "<set>"))
            .field("client", &self.client.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The bearer token a request carries, if any.
fn presented(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get(HEADER)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

/// The header value carrying `token`, for a client (the client crate's).
pub fn bearer(token: &str) -> Result<AsciiMetadataValue, String> {
    waft_client::connect::bearer(token).map_err(|e| e.to_string())
}

impl Tokens {
    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        self.cluster.is_some() || self.client.is_some()
    }

    /// Checks a client-facing call; returns the authorization header to forward with it.
    #[allow(clippy::result_large_err)]
    pub fn check(
        &self,
        metadata: &MetadataMap,
        role: Role,
    ) -> Result<Option<AsciiMetadataValue>, Status> {
        let header = metadata.get(HEADER).cloned();
        let token = presented(metadata);
        let is = |t: &Option<String>| match (t, token) {
            (Some(t), Some(p)) => same(t, p),
            _ => false,
        };
        match role {
            Role::Admin => {
                if self.cluster.is_none() || is(&self.cluster) {
                    return Ok(header);
                }
                if token.is_none() {
                    return Err(Status::unauthenticated(
                        "this call needs the cluster token (waft --token or WAFT_TOKEN)",
                    ));
                }
                if is(&self.client) {
                    return Err(Status::permission_denied(
                        "the client token only allows submit, query, services and status; this \
                         call needs the cluster token",
                    ));
                }
                Err(Status::unauthenticated("wrong token"))
            }
            Role::Client => {
                if self.client.is_none() || is(&self.client) || is(&self.cluster) {
                    return Ok(header);
                }
                if token.is_none() {
                    return Err(Status::unauthenticated(
                        "this node requires a token (waft --token or WAFT_TOKEN)",
                    ));
                }
                Err(Status::unauthenticated("wrong token"))
            }
        }
    }

    /// Checks a Raft message from a peer: it must carry the cluster token, when one is set.
    #[allow(clippy::result_large_err)]
    pub fn check_peer(&self, metadata: &MetadataMap) -> Result<(), Status> {
        match (&self.cluster, presented(metadata)) {
            (None, _) => Ok(()),
            (Some(t), Some(p)) if same(t, p) => Ok(()),
            (Some(_), None) => Err(Status::unauthenticated(
                "Raft messages to this node need the cluster token (start every node with the \
                 same --token)",
            )),
            (Some(_), Some(_)) => Err(Status::unauthenticated(
                "wrong cluster token in a Raft message",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert(HEADER, bearer(t).expect("ascii"));
        }
        m
    }

    #[test]
    fn roles_and_tokens() {
        let open = Tokens::default();
        assert!(open.check(&md(None), Role::Admin).is_ok());
        assert!(open.check_peer(&md(None)).is_ok());
        let t = Tokens {
            cluster: Some("admin-secret".into()),
            client: Some("client-secret".into()),
        };
        let code = |r: Result<_, Status>| r.map(|_| ()).map_err(|s| s.code());
        use tonic::Code::{PermissionDenied, Unauthenticated};
        assert_eq!(code(t.check(&md(None), Role::Admin)), Err(Unauthenticated));
        assert_eq!(
            code(t.check(&md(Some("x")), Role::Admin)),
            Err(Unauthenticated)
        );
        assert_eq!(
            code(t.check(&md(Some("client-secret")), Role::Admin)),
            Err(PermissionDenied)
        );
        assert_eq!(
            code(t.check(&md(Some("admin-secret")), Role::Admin)),
            Ok(())
        );
        assert_eq!(code(t.check(&md(None), Role::Client)), Err(Unauthenticated));
        assert_eq!(
            code(t.check(&md(Some("client-secret")), Role::Client)),
            Ok(())
        );
        assert_eq!(
            code(t.check(&md(Some("admin-secret")), Role::Client)),
            Ok(())
        );
        assert_eq!(
            code(t.check(&md(Some("admin-secre")), Role::Client)),
            Err(Unauthenticated)
        );
        assert!(t.check_peer(&md(Some("client-secret"))).is_err());
        assert!(t.check_peer(&md(None)).is_err());
        assert!(t.check_peer(&md(Some("admin-secret"))).is_ok());
        let admin_only = Tokens {
            cluster: Some("a".into()),
            client: None,
        };
        assert!(admin_only.check(&md(None), Role::Client).is_ok());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
