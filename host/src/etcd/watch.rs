//! etcd's `Watch` service on the etcd-kv guest's events.
//!
//! The guest emits one `mvccpb.Event` per key a write changes (topic `kv`,
//! `waft:fsm@0.2.0` events), identical on every replica; this node keeps them in its event
//! history (`storage::events`) with everything else it applied. A watch stream carries many
//! watchers, each created and cancelled by the client on the stream: a key, a range or a prefix,
//! from a start revision (default: the next one), with `prev_kv`, the NOPUT / NODELETE filters,
//! progress notifications (asked for, or every [`PROGRESS_EVERY`] when `progress_notify` is set
//! and nothing happened) and fragmented responses.
//!
//! A start revision older than what the history holds is answered as etcd answers a compacted
//! one: the watcher is created, then cancelled with `compact_revision` set to the oldest
//! revision still kept. The history starts afresh when the node restarts or installs a snapshot,
//! so a watcher resuming across that on this node is told the same; another node may hold more.

use super::EtcdKv;
use crate::api::Caller;
use crate::pb::Message as _;
use crate::pb::etcd::watch_create_request::FilterType;
use crate::pb::etcd::watch_request::RequestUnion;
use crate::pb::etcd::watch_server::Watch;
use crate::pb::etcd::*;
use crate::storage::events::{Event as Applied, Filter, Outcome, Since};
use futures::Stream;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// Responses a stream sends ahead of a slow reader.
const WATCH_BUFFER: usize = 256;
/// History events one watcher reads at a time.
const READ_AHEAD: usize = 512;
/// How often a watcher with `progress_notify` hears of progress when nothing happened (etcd's
/// default is 10 minutes).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(600);
/// The most event bytes in one response when the watcher asked for fragments (etcd fragments at
/// its request size limit, 1.5 MiB by default).
const FRAGMENT_BYTES: usize = 1536 << 10;
/// The guest's topic for key-value changes.
const KV_TOPIC: &str = "kv";

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// One watcher of a stream.
struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// Events of revisions below this are not wanted.
    start: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// The next log index to read from this node's history.
    cursor: u64,
    /// The last revision sent (for progress notifications).
    sent: i64,
    last_sent: tokio::time::Instant,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        let Some(kv) = &e.kv else { return false };
        let put = e.r#type == event::EventType::Put as i32;
        kv.mod_revision >= self.start
            && !(put && self.no_put)
            && (put || !self.no_delete)
            && in_range(&kv.key, &self.key, &self.range_end)
    }
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        end => k >= key && k < end,
    }
}

/// The guest's key-value events in `found`, decoded: once per node, the first watcher to read
/// an event leaves the decoded form in its memo for every other.
fn decode(found: &[Arc<Applied>]) -> Vec<Arc<Option<Event>>> {
    found
        .iter()
        .filter(|e| matches!(&e.outcome, Outcome::Emitted(t) if t == KV_TOPIC))
        .map(|e| {
            let decode = || Event::decode(e.payload.as_slice()).ok();
            e.memo
                .get_or_init(decode)
                .unwrap_or_else(|| Arc::new(decode()))
        })
        .collect()
}

impl EtcdKv {
    fn kv_filter(&self) -> Filter {
        Filter {
            service: self.service.clone(),
            topic_prefix: Some(KV_TOPIC.to_owned()),
        }
    }

    /// The store's revision now and its last compaction's (a linearizable read).
    async fn revisions(&self, caller: &Caller) -> Result<(i64, i64), Status> {
        let bytes = self
            .read(caller, b'S', &WatchProgressRequest {}, false)
            .await?;
        let r = WatchResponse::decode(bytes.as_slice())
            .map_err(|e| Status::internal(format!("the etcd guest's reply is malformed: {e}")))?;
        Ok((r.header.map_or(0, |h| h.revision), r.compact_revision))
    }

    /// The store's revision now.
    async fn current_revision(&self, caller: &Caller) -> Result<i64, Status> {
        Ok(self.revisions(caller).await?.0)
    }

    /// The oldest revision whose events this node's history still holds, given the revision
    /// now: every one (1) when the history reaches back to the service's first deploy, else the
    /// first event's, or the next revision when it holds none.
    fn oldest_kept(&self, current: i64) -> i64 {
        let events = self.state.events();
        let first = events.first();
        let whole = self
            .state
            .services()
            .into_iter()
            .find(|s| s.name == self.service)
            .and_then(|s| s.history.first().cloned())
            .is_some_and(|v| v.version == 1 && first <= v.deployed_at);
        if whole {
            return 1;
        }
        match events.since(first, &self.kv_filter(), 1) {
            Since::Events { events, .. } => decode(&events)
                .iter()
                .find_map(|e| e.as_ref().as_ref().and_then(|e| e.kv.as_ref()))
                .map_or(current + 1, |kv| kv.mod_revision),
            Since::Gone { .. } => current + 1,
        }
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: Some(ResponseHeader {
                revision,
                ..self.header()
            }),
            watch_id,
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl Watch for EtcdKv {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = self.authorize(request.metadata())?;
        let incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(status) = serve(this, caller, incoming, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

type Out = tokio::sync::mpsc::Sender<Result<WatchResponse, Status>>;

/// Serves one watch stream until the client ends it or goes away.
async fn serve(
    kv: EtcdKv,
    caller: Caller,
    mut incoming: Streaming<WatchRequest>,
    tx: &Out,
) -> Result<(), Status> {
    let history = kv.state.events();
    let filter = kv.kv_filter();
    let mut grew = history.subscribe();
    let mut watchers: BTreeMap<i64, Watcher> = BTreeMap::new();
    let mut next_id: i64 = 0;
    let mut progress = tokio::time::interval(PROGRESS_EVERY.min(Duration::from_secs(5)));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Send what the watchers have not seen yet.
        grew.borrow_and_update();
        let mut cancelled = Vec::new();
        for (id, w) in watchers.iter_mut() {
            if !deliver(&kv, &filter, *id, w, tx).await? {
                cancelled.push(*id);
            }
        }
        for id in cancelled {
            watchers.remove(&id);
        }
        if history.is_closed() {
            return Err(Status::unavailable(
                "etcdserver: the node is stopping; watch through another member",
            ));
        }
        tokio::select! {
            message = incoming.message() => {
                let Some(message) = message? else { return Ok(()) };
                match message.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let id = if c.watch_id != 0 { c.watch_id } else {
                            while watchers.contains_key(&next_id) { next_id += 1; }
                            next_id
                        };
                        if watchers.contains_key(&id) {
                            // etcd refuses a watch id in use on the stream.
                            let mut r = kv.response(id, 0);
                            r.created = true;
                            r.canceled = true;
                            r.cancel_reason = "etcdserver: duplicate watch ID".into();
                            send(tx, r).await?;
                            continue;
                        }
                        if c.key.is_empty() {
                            let mut r = kv.response(id, 0);
                            r.created = true;
                            r.canceled = true;
                            r.cancel_reason = "etcdserver: key is not provided".into();
                            send(tx, r).await?;
                            continue;
                        }
                        let (current, compacted) = kv.revisions(&caller).await?;
                        let mut created = kv.response(id, current);
                        created.created = true;
                        send(tx, created).await?;
                        let start = if c.start_revision > 0 { c.start_revision } else { current + 1 };
                        // Before the last compaction, or before what this node's history holds.
                        let oldest = kv.oldest_kept(current).max(compacted);
                        if start < oldest && start <= current {
                            let mut r = kv.response(id, current);
                            r.canceled = true;
                            r.compact_revision = oldest;
                            r.cancel_reason =
                                "etcdserver: mvcc: required revision has been compacted".into();
                            send(tx, r).await?;
                            continue;
                        }
                        watchers.insert(id, Watcher {
                            key: c.key,
                            range_end: c.range_end,
                            start,
                            no_put: c.filters.contains(&(FilterType::Noput as i32)),
                            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
                            prev_kv: c.prev_kv,
                            fragment: c.fragment,
                            progress_notify: c.progress_notify,
                            cursor: history.first(),
                            sent: current,
                            last_sent: tokio::time::Instant::now(),
                        });
                    }
                    Some(RequestUnion::CancelRequest(c)) if watchers.remove(&c.watch_id).is_some() => {
                        let mut r = kv.response(c.watch_id, 0);
                        r.canceled = true;
                        send(tx, r).await?;
                    }
                    Some(RequestUnion::CancelRequest(_)) => {}
                    Some(RequestUnion::ProgressRequest(_)) => {
                        // To every watcher of the stream (etcd's id -1 means "broadcast").
                        let current = kv.current_revision(&caller).await?;
                        send(tx, kv.response(-1, current)).await?;
                    }
                    None => {}
                }
            }
            changed = grew.changed() => if changed.is_err() { return Ok(()) },
            _ = progress.tick() => {
                let due: Vec<i64> = watchers
                    .iter()
                    .filter(|(_, w)| w.progress_notify && w.last_sent.elapsed() >= PROGRESS_EVERY)
                    .map(|(id, _)| *id)
                    .collect();
                if !due.is_empty() {
                    let current = kv.current_revision(&caller).await?;
                    for id in due {
                        if let Some(w) = watchers.get_mut(&id) {
                            w.last_sent = tokio::time::Instant::now();
                            send(tx, kv.response(id, current)).await?;
                        }
                    }
                }
            }
            () = tx.closed() => return Ok(()),
        }
    }
}

async fn send(tx: &Out, r: WatchResponse) -> Result<(), Status> {
    tx.send(Ok(r))
        .await
        .map_err(|_| Status::cancelled("the client went away"))
}

/// Sends watcher `id` the events of the history it has not read; false when the history no
/// longer holds them (the watcher is cancelled, as etcd cancels a compacted one).
async fn deliver(
    kv: &EtcdKv,
    filter: &Filter,
    id: i64,
    w: &mut Watcher,
    tx: &Out,
) -> Result<bool, Status> {
    let history = kv.state.events();
    loop {
        let (found, upto) = match history.since(w.cursor, filter, READ_AHEAD) {
            Since::Events { events, upto } => (events, upto),
            Since::Gone { first } => {
                let mut r = kv.response(id, w.sent);
                r.canceled = true;
                r.compact_revision = kv.oldest_kept(w.sent).max(1);
                r.cancel_reason = format!(
                    "etcdserver: mvcc: required revision has been compacted (this node's \
                     history now starts at log index {first})"
                );
                send(tx, r).await?;
                return Ok(false);
            }
        };
        let more = found.len() == READ_AHEAD;
        w.cursor = w.cursor.max(upto + 1);
        let mut events: Vec<Event> = decode(&found)
            .iter()
            .filter_map(|e| e.as_ref().as_ref().filter(|e| w.wants(e)).cloned())
            .collect();
        if !w.prev_kv {
            for e in &mut events {
                e.prev_kv = None;
            }
        }
        if let Some(last) = events.last().and_then(|e| e.kv.as_ref()) {
            w.sent = last.mod_revision;
            w.last_sent = tokio::time::Instant::now();
            for (chunk, fragment) in chunks(events, w.fragment) {
                let mut r = kv.response(id, w.sent);
                r.events = chunk;
                r.fragment = fragment;
                send(tx, r).await?;
            }
        }
        if !more {
            return Ok(true);
        }
    }
}

/// Splits events into responses: one, or (for a watcher that asked for fragments) pieces of at
/// most [`FRAGMENT_BYTES`], all but the last marked as fragments.
fn chunks(events: Vec<Event>, fragment: bool) -> Vec<(Vec<Event>, bool)> {
    if !fragment {
        return vec![(events, false)];
    }
    let mut out: Vec<(Vec<Event>, bool)> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for e in events {
        let size = e.encoded_len();
        if !current.is_empty() && bytes + size > FRAGMENT_BYTES {
            out.push((std::mem::take(&mut current), true));
            bytes = 0;
        }
        bytes += size;
        current.push(e);
    }
    out.push((current, false));
    out
}
