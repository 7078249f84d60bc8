//! The `waft check` and `waft exec` commands, run as the real binary.

use std::process::Output;
use waft_testkit::guests::*;

use crate::support::bin::run as waft;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exec_prints_one_reply_per_command() {
    let o = waft(&["exec", EXAMPLE_KV, "put a 1", "get a"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "OK\n1\n");
}

#[test]
fn exec_reports_rejections_queries_batches_and_round_trips() {
    let o = waft(&[
        "exec",
        EXAMPLE_KV,
        "put a 1",
        "put b two words",
        "get missing",
        "--query",
        "scan",
        "--snapshot-roundtrip",
        "--batch",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a rejected command makes the exit status 1"
    );
    assert_eq!(
        stdout(&o),
        "OK\nOK\nerror: key not found: missing\na 1\nb two words\nsnapshot round trip: OK\n"
    );
}

/// Every kv guest, in every language, passes `waft check` and runs under `waft exec` with a
/// snapshot round trip, giving the Rust guest's replies.
#[test]
fn guests_in_every_language_pass_check_and_exec() {
    let script = ["put a 1", "put b two words", "get missing", "del a"];
    let want = waft(
        &[
            &["exec", EXAMPLE_KV][..],
            &script,
            &["--snapshot-roundtrip"],
        ]
        .concat(),
    );
    assert_eq!(want.status.code(), Some(1), "{}", stderr(&want));
    for (name, path) in crate::languages::foreign() {
        let check = waft(&["check", path]);
        assert!(check.status.success(), "{name}: {}", stderr(&check));
        let got = waft(&[&["exec", path][..], &script, &["--snapshot-roundtrip"]].concat());
        assert_eq!(got.status.code(), Some(1), "{name}: {}", stderr(&got));
        assert_eq!(stdout(&got), stdout(&want), "{name}");
    }
}

#[test]
fn exec_names_the_trap() {
    let o = waft(&[
        "exec",
        TEST_HOSTILE,
        "set a 1",
        "loop",
        "--fuel",
        "1000000",
        "--query",
        "get a",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.starts_with("OK\nerror: guest ran out of fuel"), "{out}");
    assert!(out.ends_with("\n1\n"), "state survives the trap: {out}");
}

#[test]
fn check_describes_a_good_guest() {
    let o = waft(&["check", EXAMPLE_COUNTER]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "sha256:",
        "waft:fsm/state-machine@0.2.0",
        "wasi:cli/stdout",
        "verdict:   OK",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn check_rejects_bad_files_with_one_line_and_a_failure_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let missing = dir.path().join("missing.wasm");
    for (file, says) in [
        (
            core.to_str().expect("utf-8 path"),
            "core WebAssembly module, not a component",
        ),
        (TEST_DIAL, "which waft does not provide"),
        (
            TEST_WRONG_WORLD,
            "does not export waft:fsm/state-machine@0.2.0 or waft:fsm/state-machine@0.1.0",
        ),
        (missing.to_str().expect("utf-8 path"), "cannot read"),
    ] {
        let o = waft(&["check", file]);
        assert_eq!(o.status.code(), Some(1), "{file}");
        let err = stderr(&o);
        assert!(
            err.starts_with("error: ") && err.contains(says),
            "{file}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn a_reader_that_stops_early_ends_the_cli_quietly() {
    // `waft ... | head -1`: once the reader has gone, the next print must not panic.
    let mut child = crate::support::bin::waft()
        .args(["exec", EXAMPLE_KV, "put a 1", "get a", "put b 2", "get b"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run waft");
    // Close the reading end before the guest has even compiled.
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // 128 + SIGPIPE, what a shell reports for a writer whose reader went away.
    assert_eq!(o.status.code(), Some(141), "{:?}", o.status);
}

#[test]
fn exec_reads_commands_as_lines_hex_or_length_prefixed_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p.display().to_string()
    };
    let lines = file("lines", b"put a 1\r\n\nget a\n");
    let hex = file("hex", b"70757420612031\n0x676574206120\n");
    let mut framed = Vec::new();
    for c in [&b"put a 1"[..], b"get a"] {
        framed.extend_from_slice(&(c.len() as u32).to_be_bytes());
        framed.extend_from_slice(c);
    }
    let binary = file("framed", &framed);
    for (path, format) in [
        (&lines, "lines"),
        (&hex, "hex"),
        (&binary, "length-prefixed"),
    ] {
        let o = waft(&[
            "exec",
            EXAMPLE_KV,
            "--no-cache",
            "--commands-file",
            path,
            "--commands-format",
            format,
        ]);
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        assert_eq!(stdout(&o), "OK\n1\n", "{format}");
    }
    let bad_hex = file("bad-hex", b"zz\n");
    let o = waft(&[
        "exec",
        EXAMPLE_KV,
        "--commands-file",
        &bad_hex,
        "--commands-format",
        "hex",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("line 1: not hex"), "{}", stderr(&o));
    let cut = file("cut", &framed[..framed.len() - 2]);
    let o = waft(&[
        "exec",
        EXAMPLE_KV,
        "--commands-file",
        &cut,
        "--commands-format",
        "length-prefixed",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("announced"), "{}", stderr(&o));
}

#[test]
fn check_and_exec_keep_compiled_guests_in_their_cache() {
    let cache = tempfile::tempdir().expect("tempdir");
    let dir = cache.path().display().to_string();
    // Without a cache, nothing says it came from one.
    let o = waft(&["check", EXAMPLE_KV, "--no-cache"]);
    assert!(
        !stdout(&o).contains("loaded from the cache"),
        "{}",
        stdout(&o)
    );
    let o = waft(&["exec", EXAMPLE_KV, "put a 1", "--cache-dir", &dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let artifacts = || {
        std::fs::read_dir(cache.path())
            .expect("cache dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            })
            .count()
    };
    assert_eq!(artifacts(), 1, "the compiled guest was kept");
    // The next run loads it (`check` says where the module came from), and still works.
    let o = waft(&["check", EXAMPLE_KV, "--cache-dir", &dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("loaded from the cache of compiled guests"),
        "{}",
        stdout(&o)
    );
    let o = waft(&["exec", EXAMPLE_KV, "put a 1", "get a", "--cache-dir", &dir]);
    assert_eq!(stdout(&o), "OK\n1\n");
    assert_eq!(artifacts(), 1);
}
