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
//!
//! Revisions follow etcd: the store starts at revision 1; every request that changes something
//! (a put, a delete that deletes, a transaction with writes) advances it by one, and each key
//! keeps its `create_revision`, `mod_revision` and `version` (1 at creation, +1 per put, reset
//! by a delete). Writes are atomic: a request that fails changes nothing.
//!
//! Not kept: history. A read at an older revision is refused as compacted, as etcd refuses one
//! before its compaction point. Leases do not exist, so a put with a lease is refused.
//!
//! Errors are `CODE|message`, CODE a gRPC status name, message etcd's own wording.

use prost::Message;
use std::collections::BTreeMap;
use std::ops::Bound;
use waft_guest::{Context, StateMachine};

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
const SNAPSHOT_MAGIC: &[u8] = b"WETCD1";

/// A refusal: a gRPC status name and etcd's message.
struct Fail(&'static str, String);

type Res<T> = Result<T, Fail>;

fn invalid(msg: &str) -> Fail {
    Fail("InvalidArgument", format!("etcdserver: {msg}"))
}

/// The store: every live key and the current revision.
struct Store {
    revision: i64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            revision: 1,
            kvs: BTreeMap::new(),
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
    changes: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// The store's revision before this request.
    revision: i64,
    wrote: bool,
}

impl<'a> Work<'a> {
    fn new(store: &'a Store) -> Work<'a> {
        Work {
            base: &store.kvs,
            changes: BTreeMap::new(),
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
        if p.lease != 0 {
            return Err(Fail(
                "NotFound",
                "etcdserver: requested lease not found".into(),
            ));
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
            lease: 0,
        };
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
    fn run(&mut self, input: &[u8]) -> Res<Vec<u8>> {
        let (&tag, body) = input
            .split_first()
            .ok_or_else(|| Fail("InvalidArgument", "empty request".into()))?;
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
                    format!("unknown request tag {other:#04x}; expected R, P, D or T"),
                ));
            }
        };
        if !work.wrote {
            return Ok(reply);
        }
        let Work {
            changes, revision, ..
        } = work;
        for (key, change) in changes {
            match change {
                Some(kv) => self.kvs.insert(key, kv),
                None => self.kvs.remove(&key),
            };
        }
        self.revision = revision + 1;
        Ok(reply)
    }
}

fn failure(Fail(code, msg): Fail) -> String {
    format!("{code}|{msg}")
}

impl StateMachine for Store {
    fn apply(&mut self, _ctx: &Context, command: &[u8]) -> Result<Vec<u8>, String> {
        self.run(command).map_err(failure)
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
        Ok(Store {
            revision: image.revision,
            kvs,
        })
    }
}

waft_guest::export!(Store);
