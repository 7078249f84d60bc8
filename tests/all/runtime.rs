//! The guest runtime: example guests, snapshots, determinism, hostile guests, bad modules.

use crate::support::{apply_all, ctx, guest, query, runtime, runtime_with, text};
use waft::runtime::{CheckpointPolicy, GuestError, Limits, LoadError, RuntimeConfig, TrapKind};
use waft_testkit::guests::*;

fn ok(s: &str) -> Result<String, String> {
    Ok(s.to_owned())
}

fn err(s: &str) -> Result<String, String> {
    Err(s.to_owned())
}

#[test]
fn kv_guest_applies_text_commands() {
    let rt = runtime();
    let mut kv = guest(&rt, EXAMPLE_KV);
    tracing::info!("each kv command gives its documented reply or error");
    let replies = apply_all(
        &mut kv,
        1,
        &[
            "put a 1",
            "get a",
            "put greeting hello big world",
            "get greeting",
            "cas a 1 2",
            "cas a 1 3",
            "get a",
            "del a",
            "del a",
            "get a",
            "put app/x 1",
            "put app/y 2",
            "put b 3",
            "scan app/",
            "frobnicate",
            "put",
            "",
        ],
    );
    assert_eq!(
        replies,
        vec![
            ok("OK"),
            ok("1"),
            ok("OK"),
            ok("hello big world"),
            ok("OK"),
            err("compare failed: a is 2"),
            ok("2"),
            ok("OK"),
            err("key not found: a"),
            err("key not found: a"),
            ok("OK"),
            ok("OK"),
            ok("OK"),
            ok("app/x 1\napp/y 2\n"),
            err("unknown command \"frobnicate\"; expected put, get, del, cas or scan"),
            err("missing KEY; usage: put KEY VALUE"),
            err("empty command; try: put KEY VALUE"),
        ]
    );
    tracing::info!("queries read the same state without changing it");
    assert_eq!(query(&mut kv, "get greeting"), ok("hello big world"));
    assert_eq!(
        query(&mut kv, "scan"),
        ok("app/x 1\napp/y 2\nb 3\ngreeting hello big world\n")
    );
    assert_eq!(
        query(&mut kv, "put z 1"),
        err("unknown query \"put\"; queries are get KEY and scan [PREFIX]")
    );
    assert!(
        matches!(kv.apply(ctx(100), b"\xff\xfe"), Err(GuestError::Rejected(m)) if m.contains("UTF-8"))
    );
}

#[test]
fn counter_guest_takes_typed_json_and_reads_the_entry_context() {
    let rt = runtime();
    let mut counter = guest(&rt, EXAMPLE_COUNTER);
    let replies = apply_all(
        &mut counter,
        10,
        &[
            r#"{"add":{"name":"hits","by":5}}"#,
            r#"{"add":{"name":"hits","by":-2}}"#,
            r#"{"add":{"name":"big","by":9223372036854775807}}"#,
            r#"{"add":{"name":"big","by":1}}"#,
            r#"{"reset":{"name":"nope"}}"#,
            r#"{"explode":{}}"#,
        ],
    );
    assert_eq!(
        replies[..5],
        [
            ok("3").map(|_| "5".to_owned()),
            ok("3"),
            ok("9223372036854775807"),
            err("counter big would overflow"),
            err("no counter named nope")
        ]
    );
    assert!(
        replies[5]
            .as_ref()
            .is_err_and(|e| e.starts_with("malformed command")),
        "{:?}",
        replies[5]
    );
    tracing::info!("the counter records the index and leader timestamp of its last change");
    let hits = query(&mut counter, r#"{"get":{"name":"hits"}}"#).expect("hits exists");
    let expected_ms = ctx(11).timestamp_ms;
    assert_eq!(
        hits,
        format!(r#"{{"value":3,"changed_at_index":11,"changed_at_ms":{expected_ms}}}"#)
    );
    assert_eq!(
        query(&mut counter, r#""list""#),
        ok(r#"{"big":9223372036854775807,"hits":3}"#)
    );
}

#[test]
fn snapshot_restores_into_a_fresh_instance_byte_for_byte() {
    let rt = runtime();
    let mut a = guest(&rt, EXAMPLE_KV);
    for i in 0..500u64 {
        a.apply(ctx(i + 1), format!("put key{i:04} value {i}").as_bytes())
            .expect("put");
    }
    let snap = a.snapshot().expect("snapshot");
    let mut b = guest(&rt, EXAMPLE_KV);
    b.restore(&snap).expect("restore");
    assert_eq!(b.snapshot().expect("snapshot"), snap);
    assert_eq!(query(&mut b, "get key0042"), ok("value 42"));
    assert_eq!(query(&mut a, "scan key04"), query(&mut b, "scan key04"));
}

#[test]
fn corrupt_snapshots_are_rejected_and_leave_state_alone() {
    let rt = runtime();
    let mut kv = guest(&rt, EXAMPLE_KV);
    apply_all(&mut kv, 1, &["put a 1", "put b 2"]);
    let good = kv.snapshot().expect("snapshot");
    for (bad, why) in [
        (b"garbage".to_vec(), "bad magic"),
        (good[..good.len() - 3].to_vec(), "truncated"),
        ([good.as_slice(), b"extra"].concat(), "trailing bytes"),
    ] {
        let e = kv
            .restore(&bad)
            .expect_err("corrupt snapshot must be refused");
        assert!(
            matches!(&e, GuestError::Rejected(m) if m.contains(why)),
            "{why}: {e}"
        );
        assert_eq!(
            kv.snapshot().expect("snapshot"),
            good,
            "state changed after a refused restore ({why})"
        );
    }
}

/// The replies and the final snapshot of one instance.
type Run = (Vec<Result<String, String>>, Vec<u8>);

/// Applies the same entries to two instances built by two separate runtimes.
fn twins(path: &str, commands: &[String]) -> (Run, Run) {
    let mut out = Vec::new();
    for _ in 0..2 {
        let rt = runtime();
        let mut g = guest(&rt, path);
        let replies: Vec<_> = commands
            .iter()
            .zip(1u64..)
            .map(|(c, n)| text(g.apply(ctx(n), c.as_bytes())))
            .collect();
        out.push((replies, g.snapshot().expect("snapshot")));
    }
    let (b, a) = (out.pop().expect("two"), out.pop().expect("two"));
    (a, b)
}

#[test]
fn same_entries_give_byte_identical_state_even_when_the_guest_reads_clocks_random_and_hashmaps() {
    let commands: Vec<String> = (0..50)
        .map(|i| format!("event-{}", (i * 7919) % 97))
        .collect();
    tracing::info!("nondet guest: clocks, randomness and HashMap order must all be deterministic");
    let ((ra, sa), (rb, sb)) = twins(TEST_NONDET, &commands);
    assert_eq!(ra, rb);
    assert_eq!(sa, sb);
    tracing::info!("its clocks read the entry's timestamp, not the host's clock");
    let first = ra[0].as_ref().expect("applies");
    let ms = ctx(1).timestamp_ms;
    assert!(
        first.contains(&format!("ctx_ms={ms} wall_ms={ms} mono_ms=0")),
        "{first}"
    );
    let later = ra[10].as_ref().expect("applies");
    assert!(
        later.contains(&format!("mono_ms={}", ctx(11).timestamp_ms - ms)),
        "{later}"
    );

    for path in [EXAMPLE_KV, EXAMPLE_COUNTER] {
        let commands: Vec<String> = if path == EXAMPLE_KV {
            (0..200).map(|i| format!("put k{} v{i}", i % 37)).collect()
        } else {
            (0..200)
                .map(|i| format!(r#"{{"add":{{"name":"c{}","by":{i}}}}}"#, i % 11))
                .collect()
        };
        let ((ra, sa), (rb, sb)) = twins(path, &commands);
        assert_eq!(ra, rb);
        assert_eq!(sa, sb);
    }
}

#[test]
fn batches_give_the_same_replies_and_state_as_single_applies() {
    let rt = runtime();
    let commands: Vec<String> = (0..300)
        .map(|i| match i % 5 {
            0 | 1 => format!("put k{} v{i}", i % 13),
            2 => format!("get k{}", i % 17),
            3 => format!("del k{}", i % 19),
            _ => format!("cas k{} v{} v{i}", i % 13, i - 5),
        })
        .collect();
    let entries: Vec<_> = commands
        .iter()
        .zip(1u64..)
        .map(|(c, n)| (ctx(n), c.as_bytes()))
        .collect();
    let mut single = guest(&rt, EXAMPLE_KV);
    let mut batched = guest(&rt, EXAMPLE_KV);
    assert!(batched.module().info().can_batch());
    let a: Vec<_> = entries
        .iter()
        .map(|(c, cmd)| text(single.apply(*c, cmd)))
        .collect();
    let mut b = Vec::new();
    for chunk in entries.chunks(64) {
        b.extend(batched.apply_batch(chunk).into_iter().map(text));
    }
    assert_eq!(a, b);
    assert_eq!(
        single.snapshot().expect("snapshot"),
        batched.snapshot().expect("snapshot")
    );
}

fn hostile(limits: Limits, checkpoints: CheckpointPolicy) -> waft::runtime::Guest {
    let rt = runtime_with(RuntimeConfig {
        limits,
        checkpoints,
        ..RuntimeConfig::default()
    });
    guest(&rt, TEST_HOSTILE)
}

fn small_limits() -> Limits {
    Limits {
        fuel_per_apply: 20_000_000,
        fuel_per_query: 20_000_000,
        max_memory_bytes: 32 << 20,
        max_reply_bytes: 1 << 20,
        ..Limits::default()
    }
}

fn trap_kind(e: &GuestError) -> Option<TrapKind> {
    match e {
        GuestError::Trap { kind, .. } => Some(*kind),
        _ => None,
    }
}

#[test]
fn hostile_guests_trap_with_a_clear_cause_and_their_effects_are_rolled_back() {
    let mut g = hostile(small_limits(), CheckpointPolicy::default());
    apply_all(&mut g, 1, &["set a 1", "set b 2"]);
    let before = g.snapshot().expect("snapshot");

    tracing::info!("an endless loop runs out of fuel");
    let e = g.apply(ctx(3), b"loop").expect_err("loop must trap");
    assert_eq!(trap_kind(&e), Some(TrapKind::OutOfFuel), "{e}");
    assert!(e.to_string().contains("ran out of fuel"), "{e}");
    assert_eq!(g.snapshot().expect("snapshot"), before);

    tracing::info!("a memory bomb hits the memory limit");
    let e = g.apply(ctx(4), b"bomb").expect_err("bomb must trap");
    assert_eq!(trap_kind(&e), Some(TrapKind::OutOfMemory), "{e}");
    assert!(e.to_string().contains("memory"), "{e}");
    assert_eq!(g.snapshot().expect("snapshot"), before);

    tracing::info!("a panic after a mutation leaves no trace of the mutation");
    let e = g
        .apply(ctx(5), b"panic-after-set a 999")
        .expect_err("panic must trap");
    assert_eq!(trap_kind(&e), Some(TrapKind::Panic), "{e}");
    assert!(
        e.to_string().contains("deliberate panic after setting a"),
        "stderr tail names the panic: {e}"
    );
    assert_eq!(query(&mut g, "get a"), ok("1"));
    assert_eq!(g.snapshot().expect("snapshot"), before);

    tracing::info!("a reply over the cap is refused and rolled back; one under it is fine");
    let e = g
        .apply(ctx(6), format!("huge {}", 2 << 20).as_bytes())
        .expect_err("huge reply must fail");
    assert_eq!(trap_kind(&e), Some(TrapKind::ReplyTooLarge), "{e}");
    assert_eq!(
        g.apply(ctx(7), b"huge 1000").expect("small enough").len(),
        1000
    );

    tracing::info!("a query that loops traps too, and the state survives");
    let e = g.query(b"loop").expect_err("query loop must trap");
    assert_eq!(trap_kind(&e), Some(TrapKind::OutOfFuel));
    assert_eq!(query(&mut g, "get b"), ok("2"));

    tracing::info!("a chatty guest is rate-limited, not failed");
    assert_eq!(text(g.apply(ctx(8), b"log 500")), ok("OK"));

    tracing::info!("after all that, the guest still applies commands");
    assert_eq!(text(g.apply(ctx(9), b"set c 3")), ok("OK"));
    assert_eq!(query(&mut g, "get c"), ok("3"));
    assert!(g.recoveries() >= 5);
}

#[test]
fn a_large_state_is_checkpointed_less_often_and_recovery_still_replays_it() {
    let policy = CheckpointPolicy {
        entries: 4,
        bytes: 1 << 30,
    };
    let mut g = hostile(small_limits(), policy);
    let big = "b".repeat(64 << 10);
    g.apply(ctx(1), format!("set big {big}").as_bytes())
        .expect("set");
    for i in 2..=4u64 {
        g.apply(ctx(i), format!("set k{i} v").as_bytes())
            .expect("set");
    }
    assert!(
        g.replay_form().journal.is_empty(),
        "a small state: checkpointed after 4 entries"
    );
    let checkpoint = g.replay_form().base.expect("rebased").len();
    assert_eq!(g.rebases(), 1);
    assert!(checkpoint >= 64 << 10);
    // The next checkpoint waits for one entry per 64 bytes of this one, not for 4 entries.
    let wait = checkpoint / waft::runtime::CHECKPOINT_BYTES_PER_ENTRY;
    let mut index = 5u64;
    for _ in 0..wait - 1 {
        g.apply(ctx(index), format!("set k{index} v").as_bytes())
            .expect("set");
        index += 1;
    }
    assert_eq!(g.replay_form().journal.len(), wait - 1);
    // A trap now replays the whole journal on top of the checkpoint: nothing is lost.
    g.apply(ctx(index), b"panic-after-set big gone")
        .expect_err("panics");
    index += 1;
    assert_eq!(query(&mut g, "get big"), ok(&big));
    assert_eq!(query(&mut g, &format!("get k{}", index - 2)), ok("v"));
    g.apply(ctx(index), b"set last v").expect("set");
    assert!(
        g.replay_form().journal.len() < 2,
        "checkpointed once the journal was long enough"
    );
}

#[test]
fn recovery_replays_from_the_latest_checkpoint() {
    let policy = CheckpointPolicy {
        entries: 4,
        bytes: 1 << 20,
    };
    let mut g = hostile(small_limits(), policy);
    for i in 0..11u64 {
        g.apply(ctx(i + 1), format!("set k{i} v{i}").as_bytes())
            .expect("set");
    }
    tracing::info!(
        "a guest that breaks the contract (mutates, then rejects) is replayed faithfully"
    );
    let e = g
        .apply(ctx(12), b"reject-after-set sneaky yes")
        .expect_err("rejects");
    assert!(matches!(e, GuestError::Rejected(_)));
    let before = g.snapshot().expect("snapshot");
    g.apply(ctx(13), b"set k11 v11").expect("set");
    g.apply(ctx(14), b"panic-after-set k0 broken")
        .expect_err("panics");
    assert_eq!(query(&mut g, "get k0"), ok("v0"));
    assert_eq!(query(&mut g, "get k11"), ok("v11"));
    assert_eq!(
        query(&mut g, "get sneaky"),
        ok("yes"),
        "the replica must match the ones that never trapped"
    );
    assert!(g.snapshot().expect("snapshot").starts_with(&before[..4]));
}

#[test]
fn a_trap_inside_a_batch_fails_only_that_entry() {
    let mut g = hostile(small_limits(), CheckpointPolicy::default());
    assert!(
        g.module().info().can_batch(),
        "hostile guest reads no clock or randomness"
    );
    let cmds: [&[u8]; 4] = [b"set a 1", b"loop", b"set b 2", b"panic-after-set c 3"];
    let entries: Vec<_> = cmds.iter().zip(1u64..).map(|(c, n)| (ctx(n), *c)).collect();
    let results = g.apply_batch(&entries);
    assert_eq!(text(results[0].clone()), ok("OK"));
    assert_eq!(
        results[1].as_ref().err().and_then(trap_kind),
        Some(TrapKind::OutOfFuel)
    );
    assert_eq!(text(results[2].clone()), ok("OK"));
    assert_eq!(
        results[3].as_ref().err().and_then(trap_kind),
        Some(TrapKind::Panic)
    );
    assert_eq!(query(&mut g, "get a"), ok("1"));
    assert_eq!(query(&mut g, "get b"), ok("2"));
    assert!(query(&mut g, "get c").is_err());
}

#[test]
fn restore_and_snapshot_failures_leave_state_unchanged() {
    let mut g = hostile(small_limits(), CheckpointPolicy::default());
    apply_all(&mut g, 1, &["set a 1"]);
    let before = g.snapshot().expect("snapshot");
    let e = g.restore(b"TRAP").expect_err("restore traps");
    assert_eq!(trap_kind(&e), Some(TrapKind::Panic), "{e}");
    assert_eq!(g.snapshot().expect("snapshot"), before);
    let e = g.restore(b"BAD").expect_err("restore rejects");
    assert_eq!(e, GuestError::Rejected("snapshot rejected: BAD".to_owned()));
    assert_eq!(g.snapshot().expect("snapshot"), before);

    tracing::info!("a snapshot that traps is an error, and the guest keeps working");
    apply_all(&mut g, 2, &["set trap-on-snapshot 1"]);
    let e = g.snapshot().expect_err("snapshot traps");
    assert_eq!(trap_kind(&e), Some(TrapKind::Panic), "{e}");
    assert_eq!(query(&mut g, "get a"), ok("1"));
    assert_eq!(query(&mut g, "get trap-on-snapshot"), ok("1"));
}

#[test]
fn bad_modules_fail_to_load_with_one_clear_line() {
    let rt = runtime_with(RuntimeConfig {
        limits: Limits {
            max_module_bytes: 1 << 20,
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    });
    let kv = waft_testkit::wasm(EXAMPLE_KV);
    type Case = (&'static str, Vec<u8>, fn(&LoadError) -> bool, &'static str);
    let cases: Vec<Case> = vec![
        (
            "empty",
            vec![],
            |e| matches!(e, LoadError::NotWasm),
            "not a WebAssembly file",
        ),
        (
            "text",
            b"hello world, not wasm".to_vec(),
            |e| matches!(e, LoadError::NotWasm),
            "not a WebAssembly file",
        ),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            |e| matches!(e, LoadError::CoreModule),
            "wasm32-wasip2",
        ),
        (
            "truncated",
            kv[..kv.len() / 2].to_vec(),
            |e| matches!(e, LoadError::Invalid(_)),
            "invalid component",
        ),
        (
            "wrong world",
            waft_testkit::wasm(TEST_WRONG_WORLD),
            |e| matches!(e, LoadError::WrongWorld(_)),
            "example:greeter/greet@1.0.0",
        ),
        (
            "unprovided import",
            waft_testkit::wasm(TEST_DIAL),
            |e| matches!(e, LoadError::UnsupportedImport(_)),
            "test:dial/dialer",
        ),
        (
            "too large",
            vec![0; 2 << 20],
            |e| matches!(e, LoadError::TooLarge { .. }),
            "over the 1048576-byte limit",
        ),
    ];
    for (name, bytes, is_kind, says) in cases {
        let e = rt.load(&bytes).expect_err(name);
        let msg = e.to_string();
        assert!(is_kind(&e), "{name}: wrong kind: {e:?}");
        assert!(msg.contains(says), "{name}: {msg}");
        assert!(
            !msg.contains('\n'),
            "{name}: the message should be one line: {msg}"
        );
    }
}

#[test]
fn sockets_are_linked_but_every_connection_and_lookup_is_refused_alike() {
    // Language runtimes import wasi:sockets whether or not they use it; waft links it so such
    // guests load, and refuses every use the same way on every replica.
    let rt = runtime();
    let mut a = guest(&rt, TEST_NET);
    let mut b = guest(&rt, TEST_NET);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let open = listener.local_addr().expect("addr").to_string();
    for target in [open.as_str(), "localhost:80", "example.com:443", "[::1]:22"] {
        let first = text(a.apply(ctx(1), target.as_bytes()));
        let second = text(b.apply(ctx(1), target.as_bytes()));
        assert_eq!(first, second, "{target}");
        let e = first.expect_err("no connection is ever made");
        eprintln!("{target}: {e}");
        assert!(!e.contains("trapped"), "{target}: {e}");
    }
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "a guest reached a real socket");
}

#[test]
fn compiled_modules_are_cached_on_disk_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let bytes = waft_testkit::wasm(EXAMPLE_KV);
    let first = runtime_with(config.clone()).load(&bytes).expect("loads");
    assert!(!first.info().from_disk_cache);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read")
        .filter_map(Result::ok)
        .filter(|f| f.path().extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(files.len(), 1, "one artifact written");
    tracing::info!("a new runtime (a restarted node) loads the artifact instead of compiling");
    let rt = runtime_with(config.clone());
    let second = rt.load(&bytes).expect("loads");
    assert!(second.info().from_disk_cache);
    let mut g = rt.instantiate(&second, "cached").expect("instantiates");
    assert_eq!(text(g.apply(ctx(1), b"put a 1")), ok("OK"));
    tracing::info!("a corrupt artifact is ignored and replaced");
    std::fs::write(files[0].path(), b"not a compiled module").expect("corrupt it");
    let third = runtime_with(config.clone())
        .load(&bytes)
        .expect("recompiles");
    assert!(!third.info().from_disk_cache);
    assert!(
        runtime_with(config)
            .load(&bytes)
            .expect("loads")
            .info()
            .from_disk_cache
    );
}

/// With a disk cache, a module nothing uses leaves memory (loading it again reads its compiled
/// code from disk), unless it fits in the recently-used budget, where the oldest leaves first.
#[test]
fn only_modules_in_use_or_in_the_recent_budget_stay_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kv, kv2) = (waft_testkit::wasm(EXAMPLE_KV), waft_testkit::wasm(TEST_KV2));
    let without = runtime_with(RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    });
    let code = without.load(&kv).expect("loads").info().code_bytes;
    assert!(code > 0);
    assert_eq!(
        without.compile_stats().resident_code_bytes,
        0,
        "dropped: not resident"
    );
    let in_use = without.load(&kv).expect("loads");
    assert_eq!(without.compile_stats().loaded, 1, "read back from the disk");
    assert_eq!(without.compile_stats().resident_code_bytes, code as u64);
    drop(in_use);

    // Room for one of the two: the most recently loaded stays.
    let code2 = without.load(&kv2).expect("loads").info().code_bytes;
    let rt = runtime_with(RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        compiled_cache_bytes: code.max(code2),
        ..RuntimeConfig::default()
    });
    drop(rt.load(&kv).expect("loads"));
    assert_eq!(rt.compile_stats().resident_code_bytes, code as u64, "kept");
    drop(rt.load(&kv).expect("loads"));
    assert_eq!(
        rt.compile_stats().loaded,
        1,
        "the second load came from memory"
    );
    drop(rt.load(&kv2).expect("loads"));
    assert_eq!(
        rt.compile_stats().resident_code_bytes,
        code2 as u64,
        "kv left for kv2"
    );
    drop(rt.load(&kv).expect("loads"));
    assert_eq!(rt.compile_stats().loaded, 3, "kv came back from the disk");
}

fn bytes_in(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    })
}

/// A new version of a module compiles only the functions the cache has not seen (the second
/// kv guest shares most of its code with the first); what it compiles to behaves exactly as a
/// compile from scratch; a damaged cache entry is a miss, never wrong code.
#[test]
fn a_new_version_compiles_only_new_functions_and_runs_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let functions = dir.path().join("functions");
    runtime_with(config.clone())
        .load(&waft_testkit::wasm(EXAMPLE_KV))
        .expect("v1 loads");
    let first = bytes_in(&functions);
    assert!(
        first > 100_000,
        "the first compile fills the cache ({first} bytes)"
    );
    let v2 = waft_testkit::wasm(TEST_KV2);
    runtime_with(config.clone()).load(&v2).expect("v2 loads");
    let added = bytes_in(&functions) - first;
    assert!(
        added < first * 3 / 4,
        "v2 added {added} bytes of functions of its own, the cache had {first}"
    );
    // Damage the packs here and there (values and headers): the next compile misses what is
    // damaged, and still runs right.
    let mut damaged = 0;
    for pack in std::fs::read_dir(&functions).expect("packs").flatten() {
        let mut bytes = std::fs::read(pack.path()).expect("read pack");
        for i in (100..bytes.len()).step_by(4096) {
            bytes[i] ^= 0x5a;
            damaged += 1;
        }
        std::fs::write(pack.path(), bytes).expect("damage");
    }
    assert!(damaged > 10);
    let fresh_dir = tempfile::tempdir().expect("tempdir");
    let runs = [
        runtime_with(config.clone()),
        runtime_with(RuntimeConfig {
            cache_dir: Some(fresh_dir.path().to_path_buf()),
            ..RuntimeConfig::default()
        }),
        runtime(),
    ];
    let mut results = Vec::new();
    for rt in &runs {
        // No artifact to load: each case compiles.
        for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
            if f.path().extension().is_some_and(|e| e == "cwasm") {
                std::fs::remove_file(f.path()).expect("remove artifact");
            }
        }
        let module = rt.load(&v2).expect("loads");
        assert!(!module.info().from_disk_cache);
        let mut g = rt.instantiate(&module, "v2").expect("instantiates");
        let replies: Vec<_> = ["put a 1", "put b 2", "del a", "get b"]
            .iter()
            .enumerate()
            .map(|(i, c)| text(g.apply(ctx(i as u64 + 1), c.as_bytes())))
            .collect();
        results.push((replies, g.snapshot().expect("snapshot")));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[1], results[2]);
}

#[test]
fn the_fingerprint_names_the_limits_that_change_outcomes() {
    let a = runtime();
    let b = runtime();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert!(
        a.fingerprint()
            .starts_with(&format!("wasmtime-{}-", waft::runtime::WASMTIME_VERSION))
    );
    let c = runtime_with(RuntimeConfig {
        limits: Limits {
            fuel_per_apply: 1,
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    });
    assert_ne!(a.fingerprint(), c.fingerprint());
}

#[test]
fn a_guest_whose_snapshot_traps_can_still_be_moved_as_its_history() {
    let rt = runtime_with(RuntimeConfig {
        limits: small_limits(),
        checkpoints: CheckpointPolicy::default(),
        ..RuntimeConfig::default()
    });
    let module = rt
        .load(&waft_testkit::wasm(TEST_HOSTILE))
        .expect("guest loads");
    let mut g = rt.instantiate(&module, "test").expect("instantiates");
    apply_all(&mut g, 1, &["set a 1"]);
    g.snapshot().expect("a replicated snapshot call");
    apply_all(
        &mut g,
        2,
        &["set b 2", "set trap-on-snapshot yes", "set c 3"],
    );
    assert!(g.snapshot().is_err(), "its snapshot traps");
    let form = g.replay_form();
    assert!(form.base.is_none(), "never rebased");
    // Three commands, the snapshot call that worked (it is part of the history), and the
    // first command; the trapped snapshot call was undone, so it is not.
    assert_eq!(form.journal.len(), 5);
    let mut copy = rt
        .from_replay(&module, "test", small_limits(), &form)
        .expect("replay");
    for (k, v) in [
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("trap-on-snapshot", "yes"),
    ] {
        assert_eq!(query(&mut copy, &format!("get {k}")), ok(v));
    }
    assert_eq!(
        copy.replay_form(),
        form,
        "the copy can be moved on the same way"
    );
}

/// A guest whose state is larger than wasmtime's default allowance for what a guest hands the
/// host in one call (128 MiB) still snapshots (rebase, hot-swap, backup all need it), within
/// its memory limit.
#[test]
fn a_state_over_128_mib_snapshots() {
    let rt = runtime_with(RuntimeConfig {
        limits: Limits {
            max_memory_bytes: 1 << 30,
            fuel_per_snapshot: u64::MAX / 4,
            ..Limits::default()
        },
        ..RuntimeConfig::default()
    });
    let mut g = guest(&rt, EXAMPLE_KV);
    let value = "x".repeat(1 << 20);
    for i in 0..136u64 {
        let put = format!("put k{i} {value}");
        assert_eq!(
            text(g.apply(ctx(i + 1), put.as_bytes())),
            ok("OK"),
            "put {i}"
        );
    }
    let snapshot = g.snapshot().expect("a 136 MiB state snapshots");
    assert!(snapshot.len() > 136 << 20, "{} bytes", snapshot.len());
}
