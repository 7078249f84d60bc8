//! TLS on every gRPC endpoint of a node, mutual TLS between nodes, and a small certificate
//! authority for trying it (`waft certs`, `waft dev --tls`).
//!
//! A node started with a certificate, its key and the cluster CA serves TLS only (client API,
//! Raft, etcd endpoint). It asks everyone who connects for a certificate signed by the cluster
//! CA: a peer must present one (a Raft message over a connection without a verified client
//! certificate is refused with `UNAUTHENTICATED`), a client may (tokens decide what a client
//! may do). A certificate signed by another CA, expired or not yet valid fails the handshake,
//! so its holder never reaches a handler. The node dials its peers over TLS with its own
//! certificate as the client certificate.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS setting that cannot be used, with what is wrong in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn err(msg: impl Into<String>) -> TlsError {
    TlsError(msg.into())
}

/// Trust (the cluster CA) and, for a node or a client that authenticates, its own certificate.
#[derive(Clone)]
pub struct Tls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Tls")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Checks PEM text: the CA bundle (at least one certificate, each valid now) and the
    /// optional certificate chain + private key (a key of a known kind, a leaf valid now).
    pub fn from_pem(
        ca_pem: Vec<u8>,
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Tls, TlsError> {
        let cas = certificates("the CA file", &ca_pem)?;
        for ca in &cas {
            check_validity("a CA certificate", ca)?;
        }
        if let Some((cert, key)) = &identity {
            let chain = certificates("the certificate file", cert)?;
            check_validity("the certificate", &chain[0])?;
            PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                err(format!(
                    "the key file holds no usable private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}"
                ))
            })?;
        }
        Ok(Tls { ca_pem, identity })
    }

    /// Reads and checks the files (see [`Tls::from_pem`]). The certificate and key come
    /// together or not at all.
    pub fn load(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Tls, TlsError> {
        let read = |what: &str, p: &Path| {
            std::fs::read(p).map_err(|e| err(format!("cannot read {what} {}: {e}", p.display())))
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read("the certificate", c)?, read("the key", k)?)),
            (None, None) => None,
            _ => return Err(err("a certificate needs its key and a key its certificate")),
        };
        let ca_pem = read("the CA certificate", ca)?;
        Tls::from_pem(ca_pem, identity).map_err(|e| err(format!("{}: {e}", ca.display())))
    }

    /// Whether this holds a certificate of its own (a node needs one).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The server side: our certificate; clients' certificates checked against the CA when
    /// presented.
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        let (cert, key) = self
            .identity
            .as_ref()
            .ok_or_else(|| err("a node serving TLS needs a certificate and its key"))?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true))
    }

    /// The same settings for the client crate.
    pub fn for_client_crate(&self) -> waft_client::Tls {
        let tls = waft_client::Tls::new(self.ca_pem.clone());
        match &self.identity {
            Some((cert, key)) => tls.with_identity(cert.clone(), key.clone()),
            None => tls,
        }
    }

    /// The client side: servers checked against the CA; our certificate, if any, presented.
    pub fn client(&self) -> ClientTlsConfig {
        self.for_client_crate().client_config()
    }
}

/// Whether the request came over a TLS connection whose client presented a certificate (which
/// the handshake has already checked against the cluster CA).
pub fn has_peer_certificate<T>(request: &tonic::Request<T>) -> bool {
    request.peer_certs().is_some_and(|c| !c.is_empty())
}

fn certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("{what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(format!("{what} holds no PEM certificate")));
    }
    Ok(certs)
}

fn check_validity(what: &str, der: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| err(format!("{what} cannot be parsed: {e}")))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        return Err(err(format!(
            "{what} ({}) is not valid before {}",
            cert.subject(),
            validity.not_before
        )));
    }
    if now > validity.not_after {
        return Err(err(format!(
            "{what} ({}) expired on {}",
            cert.subject(),
            validity.not_after
        )));
    }
    Ok(())
}

/// A certificate and its key, PEM-encoded.
#[derive(Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind ours.
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    )
}

/// A new certificate authority, valid for `days`.
pub fn new_ca(name: &str, days: u32) -> Result<Pem, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate().map_err(rc)?;
    let cert = params.self_signed(&key).map_err(rc)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A certificate for `names` (host names or IP addresses), signed by `ca`, usable as server
/// and client certificate (a node is both), valid for `days`.
pub fn issue(ca: &Pem, common_name: &str, names: &[String], days: u32) -> Result<Pem, TlsError> {
    issue_between(ca, common_name, names, validity(days))
}

/// [`issue`] with explicit validity bounds (tests make expired certificates with it).
pub fn issue_between(
    ca: &Pem,
    common_name: &str,
    names: &[String],
    (not_before, not_after): (time::OffsetDateTime, time::OffsetDateTime),
) -> Result<Pem, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(rc)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(rc)?;
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|e| err(format!("bad host name in {names:?}: {e}")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(rc)?;
    let cert = params.signed_by(&key, &issuer).map_err(rc)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn rc(e: rcgen::Error) -> TlsError {
    err(format!("certificate generation failed: {e}"))
}

/// Files written by [`write_certs`].
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The CA certificate (give it to every node and client).
    pub ca: PathBuf,
    /// The issued certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// Issues `<name>.pem` / `<name>-key.pem` in `dir` for `names`, signed by the CA in `dir`
/// (`ca.pem`, `ca-key.pem`), which is created first if missing. Keys are written mode 0600.
pub fn write_certs(
    dir: &Path,
    name: &str,
    names: &[String],
    days: u32,
) -> Result<CertFiles, TlsError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        err(format!("cannot {what} {}: {e}", p.display()))
    };
    if name.is_empty() || name == "ca" || name.contains(['/', '\\']) {
        return Err(err(format!("{name:?} cannot name a certificate file")));
    }
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let (ca_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca = if ca_path.exists() {
        Pem {
            cert: std::fs::read_to_string(&ca_path).map_err(|e| io("read", &ca_path, e))?,
            key: std::fs::read_to_string(&ca_key_path)
                .map_err(|e| io("read (the CA's key)", &ca_key_path, e))?,
        }
    } else {
        let ca = new_ca("waft cluster CA", days.max(1))?;
        write_private(&ca_key_path, &ca.key).map_err(|e| io("write", &ca_key_path, e))?;
        std::fs::write(&ca_path, &ca.cert).map_err(|e| io("write", &ca_path, e))?;
        ca
    };
    let issued = issue(&ca, name, names, days)?;
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    write_private(&key, &issued.key).map_err(|e| io("write", &key, e))?;
    std::fs::write(&cert, &issued.cert).map_err(|e| io("write", &cert, e))?;
    Ok(CertFiles {
        ca: ca_path,
        cert,
        key,
    })
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_load_and_bad_ones_are_refused_in_words() {
        let ca = new_ca("test CA", 1).expect("ca");
        let node = issue(&ca, "n1", &["127.0.0.1".into()], 1).expect("issue");
        let ok = Tls::from_pem(
            ca.cert.clone().into_bytes(),
            Some((
                node.cert.clone().into_bytes(),
                node.key.clone().into_bytes(),
            )),
        )
        .expect("valid");
        assert!(ok.has_identity());
        assert!(ok.server().is_ok());

        let e = Tls::from_pem(b"not pem".to_vec(), None).expect_err("garbage CA");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let now = time::OffsetDateTime::now_utc();
        let old = issue_between(
            &ca,
            "old",
            &["127.0.0.1".into()],
            (
                now - time::Duration::days(10),
                now - time::Duration::days(1),
            ),
        )
        .expect("issue");
        let e = Tls::from_pem(
            ca.cert.clone().into_bytes(),
            Some((old.cert.into_bytes(), old.key.into_bytes())),
        )
        .expect_err("expired");
        assert!(e.to_string().contains("expired on"), "{e}");

        let e = Tls::from_pem(
            ca.cert.into_bytes(),
            Some((node.cert.into_bytes(), b"-----BEGIN NOTHING-----".to_vec())),
        )
        .expect_err("bad key");
        assert!(e.to_string().contains("no usable private key"), "{e}");
    }
}
