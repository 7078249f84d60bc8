//! The sandbox holds on any thread: a guest call never waits and never enters the async
//! runtime, so what a guest does with WASI's streams, clocks, stdin and sockets answers the
//! same on an async worker as on a plain thread (issue 36: a Python guest's flushed `print`
//! panicked every node at once on the inline apply path, which runs on a tokio worker).

use crate::support::{ctx, guest, runtime_with};
use waft::runtime::{CheckpointPolicy, Guest, GuestError, Limits, RuntimeConfig};
use waft_testkit::guests::{
    TEST_HOSTILE, TEST_HOSTILE_C, TEST_HOSTILE_JS, TEST_HOSTILE_PYTHON, TEST_NET,
};

/// Every misbehaviour with WASI a guest can reach, and the same words as queries.
const MISBEHAVIOUR: &[&str] = &[
    "print-flush 50",
    "print-mb 3",
    "stdin",
    "recurse",
    "panic-stderr",
    "set a 1",
];

fn hostile() -> Guest {
    let rt = runtime_with(RuntimeConfig {
        limits: Limits {
            fuel_per_apply: 200_000_000,
            fuel_per_query: 200_000_000,
            max_memory_bytes: 64 << 20,
            ..Limits::default()
        },
        checkpoints: CheckpointPolicy::default(),
        ..RuntimeConfig::default()
    });
    guest(&rt, TEST_HOSTILE)
}

/// Outcomes of every misbehaviour applied, then queried, then applied in one batch, and the
/// state after.
fn run_all(g: &mut Guest) -> Vec<String> {
    run_all_of(g, MISBEHAVIOUR)
}

/// [`run_all`] with these commands.
fn run_all_of(g: &mut Guest, commands: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (n, cmd) in (10..).zip(commands) {
        out.push(format!(
            "apply {cmd}: {:?}",
            outcome(g.apply(ctx(n), cmd.as_bytes()))
        ));
        out.push(format!(
            "query {cmd}: {:?}",
            outcome(g.query(cmd.as_bytes()))
        ));
    }
    let batch: Vec<_> = (100..)
        .zip(commands)
        .map(|(n, c)| (ctx(n), c.as_bytes()))
        .collect();
    for (cmd, r) in commands.iter().zip(g.apply_batch(&batch)) {
        out.push(format!("batched {cmd}: {:?}", outcome(r)));
    }
    out.push(format!("state: {:?}", g.snapshot().map(String::from_utf8)));
    out
}

/// An outcome without the parts that legitimately vary (none should).
fn outcome(r: Result<Vec<u8>, GuestError>) -> Result<String, String> {
    r.map(|b| String::from_utf8_lossy(&b).chars().take(64).collect())
        .map_err(|e| e.to_string())
}

#[test]
fn every_wasi_misbehaviour_answers_in_words_on_a_plain_thread() {
    let mut g = hostile();
    let out = run_all(&mut g);
    let find = |prefix: &str| {
        out.iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {out:#?}"))
            .clone()
    };
    tracing::info!("flushed output, megabytes of it and stdin answer normally");
    assert!(find("apply print-flush").contains("Ok(\"OK\")"), "{out:#?}");
    assert!(find("apply print-mb").contains("Ok(\"OK\")"), "{out:#?}");
    assert!(find("apply stdin").contains("read 0 bytes"), "{out:#?}");
    tracing::info!("a stack overflow and a panic trap");
    assert!(find("apply recurse").contains("trapped"), "{out:#?}");
    assert!(
        find("apply panic-stderr").contains("deliberate panic"),
        "{out:#?}"
    );
    assert!(find("state").contains("a=1"), "{out:#?}");
    assert_eq!(g.host_faults(), 0, "no host fault: {out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_socket_is_refused_alike_on_an_async_worker_and_a_plain_thread() {
    let bind = || {
        let rt = runtime_with(RuntimeConfig::default());
        let mut g = guest(&rt, TEST_NET);
        outcome(g.apply(ctx(1), b"udp"))
    };
    let plain = std::thread::spawn(bind).join().expect("plain thread");
    let on_worker = bind();
    assert_eq!(plain, on_worker);
    assert!(
        matches!(&on_worker, Err(e) if e.contains("udp:")),
        "{on_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_calls_on_an_async_worker_answer_exactly_as_on_a_plain_thread() {
    tracing::info!(
        "the same calls on a plain thread and on a tokio worker (the inline apply path)"
    );
    let plain = std::thread::spawn(|| run_all(&mut hostile()))
        .join()
        .expect("plain thread");
    // Directly on this worker: no spawn_blocking, no block_in_place.
    let on_worker = run_all(&mut hostile());
    assert_eq!(plain, on_worker);
}

/// What the Python guest is asked: its misbehaviour (issue 36's two: a flushed print and an
/// uncaught exception) among ordinary commands.
const PYTHON_MISBEHAVIOUR: &[&str] = &[
    "set a 1",
    "print",
    "print-flush",
    "raise",
    "raise-after-set a 2",
    "sleep 3600",
    "stdin",
    "recurse",
    "set b 2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_guest_that_prints_flushed_and_raises_answers_alike_on_a_worker_and_a_thread() {
    let path = TEST_HOSTILE_PYTHON.unwrap_or_else(|e| panic!("{e}"));
    let has = misbehaves_alike(path, PYTHON_MISBEHAVIOUR);
    has("apply print-flush", "printed");
    has(
        "apply raise:",
        "guest panicked: uncaught ValueError: deliberate uncaught exception",
    );
    has("query raise:", "guest panicked: uncaught ValueError");
    has("apply recurse", "RecursionError");
    has("apply raise-after-set", "RuntimeError");
    has("apply sleep", "slept");
    has("apply stdin", "read 0 bytes");
    has("state", "\\\"a\\\": \\\"1\\\"");
}

/// Runs `commands` (see [`run_all_of`]) on the guest at `path` on a plain thread and directly
/// on a tokio worker (the inline apply path), asserts the answers are the same and no host
/// fault was contained; returns a check that some answer starting with a prefix mentions a
/// text.
fn misbehaves_alike(path: &str, commands: &[&str]) -> impl Fn(&str, &str) {
    let rt = runtime_with(RuntimeConfig::default());
    let module = rt.load(&waft_testkit::wasm(path)).expect("loads");
    let run = |rt: &waft::runtime::Runtime| {
        let mut g = rt.instantiate(&module, "guest").expect("instantiates");
        let out = run_all_of(&mut g, commands);
        (out, g.host_faults())
    };
    tracing::info!("on a plain thread");
    let plain = std::thread::scope(|s| s.spawn(|| run(&rt)).join().expect("plain thread"));
    tracing::info!("directly on a tokio worker (the inline apply path)");
    let on_worker = run(&rt);
    assert_eq!(plain, on_worker);
    let (out, faults) = on_worker;
    assert_eq!(faults, 0, "{out:#?}");
    move |prefix: &str, part: &str| {
        assert!(
            out.iter()
                .any(|l| l.starts_with(prefix) && l.contains(part)),
            "{prefix:?} should mention {part:?}: {out:#?}"
        )
    }
}

/// What the hostile JavaScript guest is told, in order: the same calls on a worker and a thread.
const JS_MISBEHAVIOUR: &[&str] = &[
    "set a 1",
    "print",
    "print-flush",
    "print-mb 1",
    "throw",
    "recurse",
    "set b 2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_guest_that_prints_and_throws_answers_alike_on_a_worker_and_a_thread() {
    let path = TEST_HOSTILE_JS.unwrap_or_else(|e| panic!("{e}"));
    let has = misbehaves_alike(path, JS_MISBEHAVIOUR);
    has("apply print-flush", "printed");
    has("apply print-mb", "printed");
    has("batched print-flush", "printed");
    // An uncaught Error is a trap (a thrown string would be the WIT `err`); so is a stack
    // overflow. Either way the call is answered and the guest goes on.
    has("apply throw:", "guest panicked");
    has("query throw:", "guest panicked");
    has("batched throw:", "guest panicked");
    has("apply recurse:", "guest panicked");
    has("apply set b 2", "OK");
    has("state", "\\\"a\\\":\\\"1\\\"");
    has("state", "\\\"b\\\":\\\"2\\\"");
}

/// What the hostile C guest is told, in order.
const C_MISBEHAVIOUR: &[&str] = &[
    "set a 1",
    "print",
    "print-flush",
    "print-mb 1",
    "abort",
    "recurse",
    "huge 1000",
    "set b 2",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_guest_that_prints_and_aborts_answers_alike_on_a_worker_and_a_thread() {
    let path = TEST_HOSTILE_C.unwrap_or_else(|e| panic!("{e}"));
    let has = misbehaves_alike(path, C_MISBEHAVIOUR);
    has("apply print-flush", "printed");
    has("apply print-mb", "printed");
    has("batched print-flush", "printed");
    has("apply abort:", "deliberate abort");
    has("query abort:", "deliberate abort");
    has("batched abort:", "deliberate abort");
    has("apply recurse:", "trap");
    has("apply huge 1000", "xxxx");
    has("apply set b 2", "OK");
    has("state", "a=1\\nb=2\\n");
}
