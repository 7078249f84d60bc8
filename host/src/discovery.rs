//! Finding a cluster on the local network with mDNS / DNS-SD (`waft node --mdns NAME`,
//! `--join mdns:NAME`).
//!
//! A node started with `--mdns NAME` announces itself as an instance of `_waft._tcp.local.`
//! whose TXT record names the cluster (`cluster=NAME`), the node id and the address it
//! advertises to peers (`addr=HOST:PORT`, used as is, so a DNS name works too). A node joining
//! with `--join mdns:NAME` browses for such instances for a few seconds and uses the addresses
//! of those of cluster NAME as its seed list (see `cli::node`). Discovery only finds seeds: the
//! join itself, and everything after it, goes through the normal API, with its tokens and TLS.
//!
//! The mDNS port is 5353; `WAFT_MDNS_PORT` changes it (tests, or networks where 5353 is taken),
//! and every node of a cluster must then use the same one.

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use std::collections::BTreeSet;
use std::time::Duration;

/// The DNS-SD service type waft nodes announce.
pub const SERVICE_TYPE: &str = "_waft._tcp.local.";

/// Why discovery could not run.
#[derive(Debug, thiserror::Error)]
#[error("mDNS: {0}")]
pub struct DiscoveryError(String);

/// The standard mDNS port.
pub const MDNS_PORT: u16 = 5353;

fn daemon(port: u16) -> Result<ServiceDaemon, DiscoveryError> {
    ServiceDaemon::new_with_port(port).map_err(|e| DiscoveryError(e.to_string()))
}

/// A node's announcement; withdrawn when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Announcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcement")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

/// Checks a cluster name for mDNS: 1 to 40 letters, digits, `-` or `_`.
pub fn check_name(name: &str) -> Result<(), DiscoveryError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DiscoveryError(format!(
            "{name:?} is not a usable cluster name (1 to 40 letters, digits, '-' or '_')"
        )))
    }
}

/// Announces node `id` of cluster `cluster`, reached at `advertise` (`HOST:PORT`), on mDNS port
/// `mdns_port` ([`MDNS_PORT`] but in tests).
pub fn announce(
    mdns_port: u16,
    cluster: &str,
    id: u64,
    advertise: &str,
) -> Result<Announcement, DiscoveryError> {
    check_name(cluster)?;
    let (host, port) = advertise
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| DiscoveryError(format!("{advertise:?} is not HOST:PORT")))?;
    let daemon = daemon(mdns_port)?;
    let instance = format!("{cluster}-node-{id}");
    let properties = [
        ("cluster", cluster.to_owned()),
        ("id", id.to_string()),
        ("addr", advertise.to_owned()),
    ];
    let ip: Vec<std::net::IpAddr> = host
        .parse::<std::net::IpAddr>()
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .into_iter()
        .collect();
    let auto = ip.is_empty();
    let mut info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &format!("{instance}.local."),
        &ip[..],
        port,
        &properties[..],
    )
    .map_err(|e| DiscoveryError(e.to_string()))?;
    if auto {
        // A host name or 0.0.0.0: announce this machine's addresses (peers use `addr`).
        info = info.enable_addr_auto();
    }
    let fullname = info.get_fullname().to_owned();
    daemon
        .register(info)
        .map_err(|e| DiscoveryError(e.to_string()))?;
    tracing::info!(cluster, id, advertise, "announced on mDNS as {fullname}");
    Ok(Announcement { daemon, fullname })
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

/// The addresses announced by nodes of `cluster`, gathered for up to `wait` (returning as soon
/// as some were found and nothing new came for half a second). Sorted, without duplicates.
pub async fn discover(
    mdns_port: u16,
    cluster: &str,
    wait: Duration,
) -> Result<Vec<String>, DiscoveryError> {
    check_name(cluster)?;
    let daemon = daemon(mdns_port)?;
    let events = daemon
        .browse(SERVICE_TYPE)
        .map_err(|e| DiscoveryError(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut found = BTreeSet::new();
    loop {
        let patience = if found.is_empty() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_millis(500)
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()))
        };
        match tokio::time::timeout(patience, events.recv_async()).await {
            Ok(Ok(ServiceEvent::ServiceResolved(s))) => {
                if s.get_property_val_str("cluster") == Some(cluster)
                    && let Some(addr) = s.get_property_val_str("addr")
                {
                    found.insert(addr.to_owned());
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_checked() {
        assert!(check_name("prod-ledger_2").is_ok());
        for bad in ["", "a.b", "with space", &"x".repeat(41), "ünï"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
