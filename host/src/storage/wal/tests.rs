//! The WAL's unit tests: recovery from torn and corrupt tails, purges, rewrites.

use super::*;
use openraft::type_config::TypeConfigExt;

fn entry(index: u64) -> Entry {
    proposed_by(0, index)
}

fn proposed_by(leader: NodeId, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: leader,
            },
            index,
        ),
        payload: openraft::EntryPayload::Normal(crate::types::Request::Command {
            service: "kv".into(),
            payload: vec![7; 200],
            client: None,
            timestamp_ms: index,
        }),
    }
}

/// The indexes of the entry records in the file at `path`, in file order.
fn indexes_in_file(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).expect("read");
    let (records, _) = replay(&bytes, path).expect("replay");
    records
        .into_iter()
        .filter_map(|(r, _)| match r {
            Record::Entry(e) => Some(e.index()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_followers_entries_are_synced_before_append_returns_and_stay_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.wal");
    let mut log = WalLog::open(&path).expect("open").of_node(1);
    // Entries node 2 proposed: written and synced in place, the callback already fired.
    let (tx, mut rx) = TypeConfig::oneshot();
    log.append((1..=5).map(|i| proposed_by(2, i)), IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed = rx.try_recv().expect("flushed before append returned");
    flushed.expect("written");
    assert_eq!(indexes_in_file(&path), [1, 2, 3, 4, 5]);
    // This node's own entries go to the writer thread, and so do more than a megabyte of
    // another's; others' right behind them wait their turn there instead of overtaking them
    // in the file.
    let mut waits = Vec::new();
    for (leader, range) in [
        (1, 6..=400),
        (2, 401..=405),
        (2, 406..=6000),
        (1, 6001..=6005),
        (2, 6006..=6010),
    ] {
        let (tx, rx) = TypeConfig::oneshot();
        log.append(range.map(|i| proposed_by(leader, i)), IOFlushed::signal(tx))
            .await
            .expect("append");
        waits.push(rx);
    }
    for rx in waits {
        let flushed: Result<(), io::Error> = rx.await.expect("callback");
        flushed.expect("written");
    }
    assert_eq!(indexes_in_file(&path), (1..=6010).collect::<Vec<_>>());
    // A truncation (through the writer) and then a follower's append in place.
    log.truncate_after(Some(proposed_by(2, 6007).log_id))
        .await
        .expect("truncate");
    append(&mut log, (6008..=6015).map(|i| proposed_by(3, i))).await;
    drop(log);
    let reopened = WalLog::open(&path).expect("reopen");
    let m = lock_or_stop(&reopened.mem);
    assert_eq!(
        m.entries.keys().copied().collect::<Vec<_>>(),
        (1..=6015).collect::<Vec<_>>()
    );
    assert!(
        m.entries
            .range(6008..)
            .all(|(_, (e, _))| e.log_id.leader_id.node_id == 3)
    );
}

#[tokio::test]
async fn a_mostly_purged_file_is_compacted_and_reopens_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.wal");
    let mut log = WalLog::open_compacting_above(&path, 64 << 10).expect("open");
    let vote = Vote::new(3, 1);
    log.save_vote(&vote).await.expect("vote");
    let (tx, rx) = TypeConfig::oneshot();
    log.append((1..=1000).map(entry), IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed: Result<(), io::Error> = rx.await.expect("callback");
    flushed.expect("flushed");
    let before = std::fs::metadata(&path).expect("meta").len();
    log.purge(entry(950).log_id).await.expect("purge");
    let after = std::fs::metadata(&path).expect("meta").len();
    assert!(after * 4 < before, "{before} -> {after} bytes");
    drop(log);
    let mut log = WalLog::open(&path).expect("reopen");
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(entry(950).log_id));
    assert_eq!(state.last_log_id, Some(entry(1000).log_id));
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    let kept = log.try_get_log_entries(0..).await.expect("read");
    assert_eq!(kept, (951..=1000).map(entry).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_memory_held_follows_appends_truncations_purges_and_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.wal");
    let mut log = WalLog::open(&path).expect("open");
    let memory = log.memory();
    assert_eq!(memory.held(), (0, 0));
    let (tx, rx) = TypeConfig::oneshot();
    log.append((1..=100).map(entry), IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed: Result<(), io::Error> = rx.await.expect("callback");
    flushed.expect("flushed");
    let one = encode(&entry(1)).expect("encode").len() as u64;
    // A record is its entry and the record's tag: a few bytes more than the entry.
    let (n, bytes) = memory.held();
    assert_eq!(n, 100);
    assert!(bytes >= 100 * 200 && bytes <= 100 * (one + 8), "{bytes}");
    // The file holds the same records plus their frame headers, then zeros written ahead.
    let file = std::fs::metadata(&path).expect("meta").len();
    assert_eq!(file, bytes + 100 * FRAME_HEADER as u64 + PREALLOCATE);
    log.truncate_after(Some(entry(80).log_id))
        .await
        .expect("truncate");
    let after_truncate = memory.held();
    assert_eq!(after_truncate.0, 80);
    log.purge(entry(30).log_id).await.expect("purge");
    let after_purge = memory.held();
    assert_eq!(after_purge.0, 50);
    assert!(after_purge.1 < after_truncate.1 && after_truncate.1 < bytes);
    drop(log);
    let log = WalLog::open(&path).expect("reopen");
    assert_eq!(log.memory().held(), after_purge);
}

fn framed(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        frame(r, &mut out).expect("frame");
    }
    out
}

async fn append(log: &mut WalLog, entries: impl IntoIterator<Item = Entry, IntoIter: Send> + Send) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx))
        .await
        .expect("append");
    let flushed: Result<(), io::Error> = rx.await.expect("callback");
    flushed.expect("flushed");
}

#[tokio::test]
async fn appends_go_into_zeros_written_ahead_and_a_record_torn_among_them_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.wal");
    let mut log = WalLog::open(&path).expect("open");
    append(&mut log, (1..=10).map(entry)).await;
    let len = std::fs::metadata(&path).expect("meta").len();
    // A second append stays inside the space written ahead: the file does not grow.
    append(&mut log, (11..=20).map(entry)).await;
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), len);
    drop(log);
    // Reopened: the zeros are kept, and the next append goes right after the records.
    let mut log = WalLog::open(&path).expect("reopen");
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), len);
    append(&mut log, (21..=30).map(entry)).await;
    drop(log);
    let bytes = std::fs::read(&path).expect("read");
    let (records, valid) = replay(&bytes, &path).expect("replay");
    assert_eq!(records.len(), 30);
    assert!(bytes[valid..].iter().all(|b| *b == 0));
    // A crash in the middle of the next record: its header and half its body among zeros.
    let mut torn = bytes.clone();
    let next = framed(&[Record::Entry(entry(31))]);
    torn[valid..valid + next.len() / 2].copy_from_slice(&next[..next.len() / 2]);
    std::fs::write(&path, &torn).expect("write");
    let mut log = WalLog::open(&path).expect("a torn record among zeros is cut");
    let kept = log.try_get_log_entries(0..).await.expect("read");
    assert_eq!(kept, (1..=30).map(entry).collect::<Vec<_>>());
    append(&mut log, [entry(31)]).await;
    drop(log);
    let log = WalLog::open(&path).expect("reopen");
    assert_eq!(log.memory().held().0, 31);
}

#[test]
fn a_torn_tail_is_cut_and_corruption_before_it_is_refused() {
    let p = Path::new("test.wal");
    let good = framed(&[Record::Truncate(5), Record::Committed(None)]);
    let (r, valid) = replay(&good, p).expect("replay");
    assert_eq!((r.len(), valid), (2, good.len()));
    // A short last record, or zeros after the last one: torn.
    for tail in [
        &good[..good.len() - 3],
        &[good.as_slice(), &[0u8; 64]].concat()[..],
    ] {
        let (r, valid) = replay(tail, p).expect("torn tails are cut");
        assert!(r.len() < 2 || valid == good.len());
    }
    // A bad checksum on the last record: torn; on an earlier one: corruption.
    let mut last_bad = good.clone();
    let n = last_bad.len();
    last_bad[n - 1] ^= 1;
    let (r, _) = replay(&last_bad, p).expect("torn");
    assert_eq!(r.len(), 1);
    let mut first_bad = good.clone();
    first_bad[9] ^= 1;
    let e = replay(&first_bad, p).err().expect("corrupt");
    assert!(e.to_string().contains("corrupt at byte 0"), "{e}");
}

/// Issue 36: a write that failed on a full disk left a bad record and, after it, the rest
/// of that write (not zeros); the node refused to start. Nothing valid follows the bad
/// record, so it is the torn tail of a write never acknowledged: cut.
#[test]
fn the_rest_of_a_failed_write_after_a_bad_record_is_a_torn_tail() {
    let p = Path::new("test.wal");
    let kept = framed(&[Record::Truncate(5), Record::Committed(None)]);
    let failed = framed(&[Record::Entry(entry(6)), Record::Entry(entry(7))]);
    // The failed write: its first record's body damaged, the rest of it garbage.
    let mut torn = [kept.as_slice(), &failed[..]].concat();
    torn[kept.len() + FRAME_HEADER + 1] ^= 0x55;
    let n = torn.len();
    for (i, b) in torn[kept.len() + failed.len() / 2..n]
        .iter_mut()
        .enumerate()
    {
        *b = (i as u8).wrapping_mul(31) | 1;
    }
    let (r, valid) = replay(&torn, p).expect("a torn tail, not corruption");
    assert_eq!((r.len(), valid), (2, kept.len()));
    // The same bad record with a whole valid record after it: corruption, refused.
    let mut damaged = [kept.as_slice(), &failed[..]].concat();
    damaged[kept.len() + FRAME_HEADER + 1] ^= 0x55;
    let e = replay(&damaged, p).err().expect("corrupt");
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
}
