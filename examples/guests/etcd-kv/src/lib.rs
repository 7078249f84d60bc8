//! etcd's v3 key-value semantics as a waft guest: the state machine behind
//! `waft node --etcd-listen` (see docs/etcd.md).
//!
//! It speaks etcd's own protobuf messages (generated from waft's `proto/etcd.proto`). A command
//! or query is one tag byte and an encoded request; the reply is the encoded response, with
//! `header.revision` filled in (the host adds the cluster, member and term):
//!
//! | tag | request | how the host sends it |
//! |---|---|---|
//! | `R` | `RangeRequest` | query (linearizable, or stale when `serializable`) |
//! | `P` | `PutRequest` | command |
//! | `D` | `DeleteRangeRequest` | command |
//! | `T` | `TxnRequest` | command, or query when it only reads |
//! | `G` | `LeaseGrantRequest` | command |
//! | `V` | `LeaseRevokeRequest` | command |
//! | `K` | `LeaseKeepAliveRequest` | command (one per keep-alive) |
//! | `L` | `LeaseTimeToLiveRequest` | command (it reads the log's clock) |
//! | `Q` | `LeaseLeasesRequest` | query |
//! | `C` | `CompactionRequest` | command |
//! | `S` | (nothing) | query: a `WatchResponse` with the revision and the compaction revision |
//!
//! Revisions follow etcd: the store starts at revision 1; every request that changes something
//! (a put, a delete that deletes, a transaction with writes) advances it by one, and each key
//! keeps its `create_revision`, `mod_revision` and `version` (1 at creation, +1 per put, reset
//! by a delete). Writes are atomic: a request that fails changes nothing.
//!
//! Leases (`waft:fsm@0.2.0` timers): a lease is granted for a TTL in seconds (at least 2, as
//! etcd's default minimum), kept alive by keep-alives, and when its timer fires (the TTL after
//! the last grant or keep-alive, by the log's clock) it is revoked: every key attached to it is
//! deleted in one revision.
//!
//! Events: every key a write changes is emitted (topic `kv`) as etcd's `mvccpb.Event` (type,
//! the key-value after, the one before), in the order the request changed them; the endpoint's
//! `Watch` serves them.
//!
//! Not kept: history. A read at an older revision is refused as compacted, as etcd refuses one
//! before its compaction point (watches can start at an older revision while the node's event
//! history still holds it).
//!
//! Errors are `CODE|message`, CODE a gRPC status name, message etcd's own wording.

use prost::Message;
use std::collections::BTreeMap;
use std::ops::Bound;
use waft_guest::{Context, StateMachine, events, timers};

#[allow(clippy::all, missing_docs)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::range_request::{SortOrder, SortTarget};
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResponse;
use pb::*;

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// The shortest lease etcd grants with its default timings (1.5 s rounded up).
const MIN_LEASE_TTL: i64 = 2;
/// etcd's longest lease TTL.
const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// The topic of key-value change events.
const KV_TOPIC: &str = "kv";
const SNAPSHOT_MAGIC: &[u8] = b"WETCD1";

/// A refusal: a gRPC status name and etcd's message.
struct Fail(&'static str, String);

type Res<T> = Result<T, Fail>;

fn invalid(msg: &str) -> Fail {
    Fail("InvalidArgument", format!("etcdserver: {msg}"))
}

/// The store: every live key, the current revision, the leases.
struct Store {
    revision: i64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    leases: BTreeMap<i64, Lease>,
    /// The id the next lease granted without one gets (ids are never reused).
    next_lease: i64,
    /// The last compaction's revision: watches may not start before it.
    compacted: i64,
}

/// A lease: its TTL, when it expires (the log's clock), the keys attached to it.
#[derive(Clone, PartialEq, Message)]
struct Lease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(uint64, tag = "3")]
    expires_ms: u64,
    /// Attached keys, in order (a set in memory; a sorted list in the image).
    #[prost(bytes = "vec", repeated, tag = "4")]
    keys: Vec<Vec<u8>>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            revision: 1,
            kvs: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease: 1,
            compacted: 0,
        }
    }
}

/// The snapshot image (a message of our own, encoded canonically: keys in order).
#[derive(Clone, PartialEq, Message)]
struct Image {
    #[prost(int64, tag = "1")]
    revision: i64,
    #[prost(message, repeated, tag = "2")]
    kvs: Vec<KeyValue>,
    /// Leases by id (images written before leases existed have none).
    #[prost(message, repeated, tag = "3")]
    leases: Vec<Lease>,
    #[prost(int64, tag = "4")]
    next_lease: i64,
    #[prost(int64, tag = "5")]
    compacted: i64,
}

fn lease_timer(id: i64) -> String {
    format!("lease/{id}")
}

fn lease_not_found() -> Fail {
    Fail("NotFound", "etcdserver: requested lease not found".into())
}

/// The key range a request names, as etcd reads `key` and `range_end`.
fn bounds<'a>(key: &'a [u8], end: &'a [u8]) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    match end {
        [] => (Bound::Included(key), Bound::Included(key)),
        [0] => (Bound::Included(key), Bound::Unbounded),
        end => (Bound::Included(key), Bound::Excluded(end)),
    }
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        end => k >= key && k < end,
    }
}

/// An empty range (`end` at or before `key`) must not reach `BTreeMap::range`, which panics.
fn empty(key: &[u8], end: &[u8]) -> bool {
    !end.is_empty() && end != [0] && end <= key
}

/// A request in progress: reads see its own earlier writes; nothing reaches the store unless
/// the whole request succeeds.
struct Work<'a> {
    base: &'a BTreeMap<Vec<u8>, KeyValue>,
    leases: &'a BTreeMap<i64, Lease>,
    changes: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// The keys changed, in the order the request changed them (for the events).
    order: Vec<Vec<u8>>,
    /// The store's revision before this request.
    revision: i64,
    wrote: bool,
}

impl<'a> Work<'a> {
    fn new(store: &'a Store) -> Work<'a> {
        Work {
            base: &store.kvs,
            leases: &store.leases,
            changes: BTreeMap::new(),
            order: Vec::new(),
            revision: store.revision,
            wrote: false,
        }
    }

    /// The revision this request's writes carry.
    fn write_revision(&self) -> i64 {
        self.revision + 1
    }

    /// The revision a reader sees now.
    fn current(&self) -> i64 {
        if self.wrote {
            self.revision + 1
        } else {
            self.revision
        }
    }

    fn get(&self, key: &[u8]) -> Option<KeyValue> {
        match self.changes.get(key) {
            Some(change) => change.clone(),
            None => self.base.get(key).cloned(),
        }
    }

    /// Every live key in the range, in key order.
    fn range(&self, key: &[u8], end: &[u8]) -> Vec<KeyValue> {
        if empty(key, end) {
            return Vec::new();
        }
        let mut found: BTreeMap<&[u8], KeyValue> = self
            .base
            .range::<[u8], _>(bounds(key, end))
            .map(|(k, v)| (k.as_slice(), v.clone()))
            .collect();
        for (k, change) in self.changes.range::<[u8], _>(bounds(key, end)) {
            match change {
                Some(kv) => found.insert(k.as_slice(), kv.clone()),
                None => found.remove(k.as_slice()),
            };
        }
        found.into_values().collect()
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision: self.current(),
            ..Default::default()
        })
    }

    fn do_range(&self, r: &RangeRequest) -> Res<RangeResponse> {
        if r.key.is_empty() {
            return Err(invalid("key is not provided"));
        }
        if r.revision > self.current() {
            return Err(Fail(
                "OutOfRange",
                "etcdserver: mvcc: required revision is a future revision".into(),
            ));
        }
        if r.revision > 0 && r.revision < self.current() {
            return Err(Fail(
                "OutOfRange",
                "etcdserver: mvcc: required revision has been compacted".into(),
            ));
        }
        let all = self.range(&r.key, &r.range_end);
        let count = all.len() as i64;
        let mut kvs: Vec<KeyValue> = all
            .into_iter()
            .filter(|kv| {
                (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                    && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                    && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
                    && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
            })
            .collect();
        if r.count_only {
            return Ok(RangeResponse {
                header: self.header(),
                kvs: Vec::new(),
                more: false,
                count,
            });
        }
        let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
        let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
        if order == SortOrder::None && target != SortTarget::Key {
            order = SortOrder::Ascend;
        }
        if order != SortOrder::None {
            // Stable, over key-ordered input: ties keep key order.
            kvs.sort_by(|a, b| {
                let ord = match target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Version => a.version.cmp(&b.version),
                    SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                    SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortTarget::Value => a.value.cmp(&b.value),
                };
                if order == SortOrder::Descend {
                    ord.reverse()
                } else {
                    ord
                }
            });
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() > r.limit as usize {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        Ok(RangeResponse {
            header: self.header(),
            kvs,
            more,
            count,
        })
    }

    fn do_put(&mut self, p: &PutRequest) -> Res<PutResponse> {
        if p.key.is_empty() {
            return Err(invalid("key is not provided"));
        }
        if p.lease != 0 && !self.leases.contains_key(&p.lease) {
            return Err(lease_not_found());
        }
        let prev = self.get(&p.key);
        let value = if p.ignore_value {
            match &prev {
                Some(kv) => kv.value.clone(),
                None => return Err(invalid("key not found")),
            }
        } else {
            p.value.clone()
        };
        let rev = self.write_revision();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |kv| kv.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |kv| kv.version + 1),
            value,
            lease: if p.ignore_lease {
                prev.as_ref().map_or(0, |kv| kv.lease)
            } else {
                p.lease
            },
        };
        self.order.push(p.key.clone());
        self.changes.insert(p.key.clone(), Some(kv));
        self.wrote = true;
        Ok(PutResponse {
            header: self.header(),
            prev_kv: prev.filter(|_| p.prev_kv),
        })
    }

    fn do_delete(&mut self, d: &DeleteRangeRequest) -> Res<DeleteRangeResponse> {
        if d.key.is_empty() {
            return Err(invalid("key is not provided"));
        }
        let doomed = self.range(&d.key, &d.range_end);
        for kv in &doomed {
            self.order.push(kv.key.clone());
            self.changes.insert(kv.key.clone(), None);
        }
        if !doomed.is_empty() {
            self.wrote = true;
        }
        Ok(DeleteRangeResponse {
            header: self.header(),
            deleted: doomed.len() as i64,
            prev_kvs: if d.prev_kv { doomed } else { Vec::new() },
        })
    }

    fn holds(&self, c: &Compare) -> bool {
        let kvs = self.range(&c.key, &c.range_end);
        let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
        if kvs.is_empty() {
            // etcd: comparing the value of a missing key always fails; other targets compare
            // against zero.
            if target == CompareTarget::Value {
                return false;
            }
            return compare_kv(c, target, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(c, target, kv))
    }

    fn do_txn(&mut self, t: &TxnRequest) -> Res<TxnResponse> {
        let succeeded = t.compare.iter().all(|c| self.holds(c));
        let ops = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(Op::RequestRange(r)) => OpResponse::ResponseRange(self.do_range(r)?),
                Some(Op::RequestPut(p)) => OpResponse::ResponsePut(self.do_put(p)?),
                Some(Op::RequestDeleteRange(d)) => {
                    OpResponse::ResponseDeleteRange(self.do_delete(d)?)
                }
                Some(Op::RequestTxn(t)) => OpResponse::ResponseTxn(self.do_txn(t)?),
                None => return Err(invalid("empty operation in txn request")),
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        Ok(TxnResponse {
            header: self.header(),
            succeeded,
            responses,
        })
    }
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord = match (target, &c.target_union) {
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => kv.create_revision.cmp(v),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value.as_slice().cmp(v),
        (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
        // A target without its value compares against zero, as in etcd.
        (CompareTarget::Value, _) => kv.value.as_slice().cmp(&[][..]),
        (CompareTarget::Version, _) => kv.version.cmp(&0),
        (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
        (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
        (CompareTarget::Lease, _) => kv.lease.cmp(&0),
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// The checks etcd makes before a transaction runs: sizes, keys given, no key written twice
/// in one branch.
fn check_txn(t: &TxnRequest) -> Res<()> {
    if t.compare.len() > MAX_TXN_OPS
        || t.success.len() > MAX_TXN_OPS
        || t.failure.len() > MAX_TXN_OPS
    {
        return Err(invalid("too many operations in txn request"));
    }
    for c in &t.compare {
        if c.key.is_empty() {
            return Err(invalid("key is not provided"));
        }
    }
    for branch in [&t.success, &t.failure] {
        let mut puts: Vec<&[u8]> = Vec::new();
        let mut deletes: Vec<(&[u8], &[u8])> = Vec::new();
        for op in branch {
            match &op.request {
                Some(Op::RequestRange(r)) if r.key.is_empty() => {
                    return Err(invalid("key is not provided"));
                }
                Some(Op::RequestPut(p)) => {
                    if p.key.is_empty() {
                        return Err(invalid("key is not provided"));
                    }
                    if puts.contains(&p.key.as_slice()) {
                        return Err(invalid("duplicate key given in txn request"));
                    }
                    puts.push(&p.key);
                }
                Some(Op::RequestDeleteRange(d)) => {
                    if d.key.is_empty() {
                        return Err(invalid("key is not provided"));
                    }
                    deletes.push((&d.key, &d.range_end));
                }
                Some(Op::RequestTxn(nested)) => check_txn(nested)?,
                _ => {}
            }
        }
        if puts
            .iter()
            .any(|k| deletes.iter().any(|(key, end)| in_range(k, key, end)))
        {
            return Err(invalid("duplicate key given in txn request"));
        }
    }
    Ok(())
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Res<M> {
    M::decode(bytes).map_err(|e| Fail("InvalidArgument", format!("malformed request: {e}")))
}

impl Store {
    /// Applies one tagged request: all of its writes take effect, or none.
    fn run(&mut self, ctx: &Context, input: &[u8]) -> Res<Vec<u8>> {
        let (&tag, body) = input
            .split_first()
            .ok_or_else(|| Fail("InvalidArgument", "empty request".into()))?;
        match tag {
            b'G' => return self.grant(ctx, &decode(body)?).map(|r| r.encode_to_vec()),
            b'V' => return self.revoke(decode::<LeaseRevokeRequest>(body)?.id),
            b'K' => return Ok(self.keep_alive(ctx, &decode(body)?).encode_to_vec()),
            b'L' => return Ok(self.time_to_live(ctx, &decode(body)?).encode_to_vec()),
            b'C' => return self.compact(&decode(body)?).map(|r| r.encode_to_vec()),
            _ => {}
        }
        let mut work = Work::new(self);
        let reply = match tag {
            b'R' => work.do_range(&decode(body)?)?.encode_to_vec(),
            b'P' => work.do_put(&decode(body)?)?.encode_to_vec(),
            b'D' => work.do_delete(&decode(body)?)?.encode_to_vec(),
            b'T' => {
                let t: TxnRequest = decode(body)?;
                check_txn(&t)?;
                work.do_txn(&t)?.encode_to_vec()
            }
            other => {
                return Err(Fail(
                    "InvalidArgument",
                    format!("unknown request tag {other:#04x}; expected R, P, D, T, G, V, K or L"),
                ));
            }
        };
        if !work.wrote {
            return Ok(reply);
        }
        let Work { changes, order, .. } = work;
        self.commit(changes, order);
        Ok(reply)
    }

    /// Makes a request's changes at the next revision: keys, the keys' leases, and one event
    /// per key changed, in the order the request changed them.
    fn commit(&mut self, mut changes: BTreeMap<Vec<u8>, Option<KeyValue>>, order: Vec<Vec<u8>>) {
        let revision = self.revision + 1;
        let mut emitted = Vec::with_capacity(order.len());
        for key in order {
            let Some(change) = changes.remove(&key) else {
                continue; // changed twice in one request: its one event is out already
            };
            let prev = match &change {
                Some(kv) => self.kvs.insert(key.clone(), kv.clone()),
                None => self.kvs.remove(&key),
            };
            if let Some(old) = prev.as_ref().filter(|kv| kv.lease != 0)
                && let Some(lease) = self.leases.get_mut(&old.lease)
                && let Ok(at) = lease.keys.binary_search(&key)
            {
                lease.keys.remove(at);
            }
            if let Some(new) = change.as_ref().filter(|kv| kv.lease != 0)
                && let Some(lease) = self.leases.get_mut(&new.lease)
                && let Err(at) = lease.keys.binary_search(&key)
            {
                lease.keys.insert(at, key.clone());
            }
            let event = match change {
                Some(kv) => Event {
                    r#type: event::EventType::Put as i32,
                    kv: Some(kv),
                    prev_kv: prev,
                },
                None => Event {
                    r#type: event::EventType::Delete as i32,
                    kv: Some(KeyValue {
                        key,
                        mod_revision: revision,
                        ..Default::default()
                    }),
                    prev_kv: prev,
                },
            };
            emitted.push(event.encode_to_vec());
        }
        self.revision = revision;
        for data in emitted {
            events::emit(KV_TOPIC, &data);
        }
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision: self.revision,
            ..Default::default()
        })
    }

    /// Records a compaction: no history is kept anyway, but watches may no longer start
    /// before it, as in etcd.
    fn compact(&mut self, c: &CompactionRequest) -> Res<CompactionResponse> {
        if c.revision > self.revision {
            return Err(Fail(
                "OutOfRange",
                "etcdserver: mvcc: required revision is a future revision".into(),
            ));
        }
        if c.revision <= self.compacted {
            return Err(Fail(
                "OutOfRange",
                "etcdserver: mvcc: required revision has been compacted".into(),
            ));
        }
        self.compacted = c.revision;
        Ok(CompactionResponse {
            header: self.header(),
        })
    }

    fn grant(&mut self, ctx: &Context, g: &LeaseGrantRequest) -> Res<LeaseGrantResponse> {
        if g.ttl > MAX_LEASE_TTL {
            return Err(Fail("OutOfRange", "etcdserver: too large lease TTL".into()));
        }
        if g.id < 0 {
            return Err(invalid("lease ID must be positive"));
        }
        let id = if g.id != 0 {
            if self.leases.contains_key(&g.id) {
                return Err(Fail(
                    "FailedPrecondition",
                    "etcdserver: lease already exists".into(),
                ));
            }
            g.id
        } else {
            // Large, increasing and never reused, like etcd's: bit 62, then the entry's index.
            let mut id = self
                .next_lease
                .max((1 << 62) | ((ctx.index as i64 & ((1 << 46) - 1)) << 16));
            while self.leases.contains_key(&id) {
                id += 1;
            }
            self.next_lease = id + 1;
            id
        };
        let ttl = g.ttl.max(MIN_LEASE_TTL);
        let expires_ms = ctx.timestamp_ms.saturating_add(ttl as u64 * 1000);
        self.leases.insert(
            id,
            Lease {
                id,
                ttl,
                expires_ms,
                keys: Vec::new(),
            },
        );
        timers::set(&lease_timer(id), expires_ms, b"");
        Ok(LeaseGrantResponse {
            header: self.header(),
            id,
            ttl,
            error: String::new(),
        })
    }

    /// Revokes lease `id`: its keys go in one revision.
    fn revoke(&mut self, id: i64) -> Res<Vec<u8>> {
        let lease = self.leases.remove(&id).ok_or_else(lease_not_found)?;
        timers::cancel(&lease_timer(id));
        if !lease.keys.is_empty() {
            let changes = lease.keys.iter().map(|k| (k.clone(), None)).collect();
            self.commit(changes, lease.keys);
        }
        Ok(LeaseRevokeResponse {
            header: self.header(),
        }
        .encode_to_vec())
    }

    fn keep_alive(&mut self, ctx: &Context, k: &LeaseKeepAliveRequest) -> LeaseKeepAliveResponse {
        let header = self.header();
        let Some(lease) = self.leases.get_mut(&k.id) else {
            // etcd answers a keep-alive for an unknown (expired) lease with TTL 0.
            return LeaseKeepAliveResponse {
                header,
                id: k.id,
                ttl: 0,
            };
        };
        lease.expires_ms = ctx.timestamp_ms.saturating_add(lease.ttl as u64 * 1000);
        timers::set(&lease_timer(k.id), lease.expires_ms, b"");
        LeaseKeepAliveResponse {
            header,
            id: k.id,
            ttl: lease.ttl,
        }
    }

    fn time_to_live(&self, ctx: &Context, t: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
        match self.leases.get(&t.id) {
            // etcd answers TTL -1 for a lease it does not have.
            None => LeaseTimeToLiveResponse {
                header: self.header(),
                id: t.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
            Some(lease) => LeaseTimeToLiveResponse {
                header: self.header(),
                id: t.id,
                ttl: (lease.expires_ms.saturating_sub(ctx.timestamp_ms) / 1000) as i64,
                granted_ttl: lease.ttl,
                keys: if t.keys {
                    lease.keys.clone()
                } else {
                    Vec::new()
                },
            },
        }
    }
}

fn failure(Fail(code, msg): Fail) -> String {
    format!("{code}|{msg}")
}

impl StateMachine for Store {
    fn apply(&mut self, ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        self.run(ctx, command).map_err(failure)
    }

    fn fire(&mut self, ctx: &Context, key: &str, _payload: &[u8]) -> Result<(), String> {
        let id: i64 = key
            .strip_prefix("lease/")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| format!("unknown timer {key:?}"))?;
        match self.leases.get(&id) {
            Some(lease) if lease.expires_ms <= ctx.timestamp_ms => {
                self.revoke(id).map(drop).map_err(failure)
            }
            // Kept alive since (its timer was set again) or revoked: nothing to do.
            _ => Ok(()),
        }
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        // Runs like a command over a borrowed store; a request that would write is refused.
        let mut work = Work::new(self);
        let (&tag, body) = request
            .split_first()
            .ok_or_else(|| failure(Fail("InvalidArgument", "empty request".into())))?;
        let reply = match tag {
            b'R' => work
                .do_range(&decode(body).map_err(failure)?)
                .map(|r| r.encode_to_vec()),
            b'T' => {
                let t: TxnRequest = decode(body).map_err(failure)?;
                check_txn(&t)
                    .and_then(|()| work.do_txn(&t))
                    .map(|r| r.encode_to_vec())
            }
            b'S' => Ok(WatchResponse {
                header: self.header(),
                compact_revision: self.compacted,
                ..Default::default()
            }
            .encode_to_vec()),
            b'Q' => Ok(LeaseLeasesResponse {
                header: self.header(),
                leases: self
                    .leases
                    .keys()
                    .map(|id| LeaseStatus { id: *id })
                    .collect(),
            }
            .encode_to_vec()),
            _ => Err(Fail(
                "InvalidArgument",
                "only ranges and read-only transactions are queries".into(),
            )),
        }
        .map_err(failure)?;
        if work.wrote {
            return Err(failure(Fail(
                "FailedPrecondition",
                "a request that writes must go through the log, not a query".into(),
            )));
        }
        Ok(reply)
    }

    fn snapshot(&self) -> Vec<u8> {
        let image = Image {
            revision: self.revision,
            kvs: self.kvs.values().cloned().collect(),
            leases: self.leases.values().cloned().collect(),
            next_lease: self.next_lease,
            compacted: self.compacted,
        };
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend(image.encode_to_vec());
        out
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        let body = snapshot
            .strip_prefix(SNAPSHOT_MAGIC)
            .ok_or("not an etcd-kv snapshot (bad magic)")?;
        let image = Image::decode(body).map_err(|e| format!("etcd-kv snapshot: {e}"))?;
        let mut kvs = BTreeMap::new();
        for kv in image.kvs {
            if kv.key.is_empty() || kv.mod_revision > image.revision {
                return Err("etcd-kv snapshot holds an impossible key".into());
            }
            if kvs.insert(kv.key.clone(), kv).is_some() {
                return Err("etcd-kv snapshot holds a key twice".into());
            }
        }
        let mut leases = BTreeMap::new();
        for lease in image.leases {
            let sorted = lease.keys.windows(2).all(|w| w[0] < w[1]);
            let attached = lease
                .keys
                .iter()
                .all(|k| kvs.get(k).is_some_and(|kv: &KeyValue| kv.lease == lease.id));
            if !sorted || !attached || leases.insert(lease.id, lease).is_some() {
                return Err("etcd-kv snapshot holds an impossible lease".into());
            }
        }
        if kvs
            .values()
            .any(|kv| kv.lease != 0 && !leases.contains_key(&kv.lease))
        {
            return Err("etcd-kv snapshot holds a key of a missing lease".into());
        }
        Ok(Store {
            revision: image.revision,
            kvs,
            leases,
            next_lease: image.next_lease.max(1),
            compacted: image.compacted,
        })
    }
}

waft_guest::export!(Store);
