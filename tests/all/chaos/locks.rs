//! A lock on etcd leases, taken the way `etcdctl lock` users rely on, and a checker that no two
//! clients ever held it at once.
//!
//! Workers, each on random nodes' etcd endpoints, loop: grant a lease of [`TTL_SECS`], then a
//! transaction "if the lock key does not exist, put it with that lease". Nobody deletes the key
//! and nobody keeps a lease alive: the lock changes hands only when its holder's lease expires.
//! A holder counts on the lock from the moment it *sent* its grant until that plus the TTL
//! (the lease cannot have been granted earlier). So for two successive holders in commit order
//! (the revision of their puts), the later one's reply must arrive at or after the earlier
//! one's grant was sent plus the TTL: if it arrived sooner, both held the lock at once. The
//! check is sound (it never blames a correct run): a reply arrives after its commit, and that
//! commit comes after the previous holder's lease expired.

use super::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use waft::pb::etcd::{
    self as pb, compare, kv_client::KvClient, lease_client::LeaseClient, request_op,
};

/// The leases' time to live (the etcd-kv guest's minimum is 2 s).
pub const TTL_SECS: i64 = 2;
const LOCK: &[u8] = b"chaos-lock";

/// One successful acquisition.
#[derive(Debug, Clone)]
pub struct Hold {
    pub worker: usize,
    /// When its lease grant was sent.
    pub sent: Instant,
    /// When the transaction that took the lock answered.
    pub took: Instant,
    /// The revision of its put: the order of the acquisitions.
    pub revision: i64,
}

/// Runs until `stop`, then returns the acquisitions it made.
pub async fn worker(
    worker: usize,
    nodes: Vec<Channel>,
    mut rng: Rng,
    stop: Arc<AtomicBool>,
) -> Vec<Hold> {
    let mut holds = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let ch = nodes[rng.below(nodes.len() as u64) as usize].clone();
        let mut lease = LeaseClient::new(ch.clone());
        let mut kv = KvClient::new(ch);
        let sent = Instant::now();
        let Ok(granted) = lease
            .lease_grant(pb::LeaseGrantRequest {
                ttl: TTL_SECS,
                id: 0,
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let id = granted.into_inner().id;
        let take = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: LOCK.to_vec(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(request_op::Request::RequestPut(pb::PutRequest {
                    key: LOCK.to_vec(),
                    value: worker.to_string().into_bytes(),
                    lease: id,
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        // An error is an unknown outcome: if the put was made, its lease expires like any
        // other; a hold the checker does not know of can only hide a violation, never invent
        // one.
        if let Ok(r) = kv.txn(take).await {
            let r = r.into_inner();
            if r.succeeded {
                holds.push(Hold {
                    worker,
                    sent,
                    took: Instant::now(),
                    revision: r.header.map_or(0, |h| h.revision),
                });
            } else {
                // Not taken: the lease has no key; let it go (best effort).
                let _ = lease.lease_revoke(pb::LeaseRevokeRequest { id }).await;
            }
        }
        tokio::time::sleep(rng.millis(20, 120)).await;
    }
    holds
}

/// Pairs of successive holders that held the lock at once, in words (empty: none did), and
/// the holds in commit order.
pub fn overlaps(mut holds: Vec<Hold>) -> (Vec<String>, Vec<Hold>) {
    holds.sort_by_key(|h| h.revision);
    let ttl = Duration::from_secs(TTL_SECS as u64);
    let mut bad = Vec::new();
    for w in holds.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let safe_from = a.sent + ttl;
        if b.took < safe_from {
            bad.push(format!(
                "worker {} took the lock (revision {}) {:?} before worker {}'s lease (revision \
                 {}, granted at most {ttl:?} before) could have expired",
                b.worker,
                b.revision,
                safe_from - b.took,
                a.worker,
                a.revision
            ));
        }
    }
    (bad, holds)
}
