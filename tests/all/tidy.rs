//! The architecture invariants ARCHITECTURE.md states, checked on the source so they cannot go
//! false again: which modules may use wasmtime, redb, tonic, prost and the environment, and one
//! bindgen per side.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, relative to `base`, with its code: comments removed (line
/// comments, doc comments), so that words in prose do not count.
fn sources(base: &Path, dir: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![base.join(dir)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                let code: String = text
                    .lines()
                    .map(|l| match l.find("//") {
                        // A `//` inside a string literal ("http://...") is rare in this code;
                        // cutting there only shortens the line.
                        Some(i) => &l[..i],
                        None => l,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let rel = path
                    .strip_prefix(base)
                    .expect("under base")
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, code));
            }
        }
    }
    out.sort();
    out
}

/// Files whose code names one of `crates` (a path starting `crate::`, so `use crate::...`
/// too), or reads the environment (`env`: `std::env`, `env::var`, `env::args`).
fn users(files: &[(String, String)], crates: &[&str]) -> Vec<String> {
    let uses = |code: &str, c: &str| {
        if c == "env" {
            return ["std::env", "env::var", "env::args"]
                .iter()
                .any(|n| code.contains(n));
        }
        code.match_indices(&format!("{c}::"))
            .any(|(i, _)| i == 0 || !is_ident(code.as_bytes()[i - 1]))
    };
    files
        .iter()
        .filter(|(_, code)| crates.iter().any(|c| uses(code, c)))
        .map(|(f, _)| f.clone())
        .collect()
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

fn assert_only(files: &[(String, String)], crates: &[&str], allowed: &[&str], rule: &str) {
    let offenders: Vec<String> = users(files, crates)
        .into_iter()
        .filter(|f| !allowed.iter().any(|a| f.starts_with(a)))
        .collect();
    assert!(
        offenders.is_empty(),
        "ARCHITECTURE.md says {rule}; these files break it: {offenders:?}"
    );
}

#[test]
fn the_architecture_invariants_hold() {
    let base = root().join("host");
    let files = sources(&base, "src");
    assert!(files.len() > 40, "found the host's sources");
    assert_only(
        &files,
        &["wasmtime", "wasmtime_wasi"],
        &["src/runtime/"],
        "only host/src/runtime/ imports wasmtime or wasmtime-wasi",
    );
    assert_only(
        &files,
        &["redb"],
        &["src/storage/"],
        "only storage/ imports redb",
    );
    assert_only(
        &files,
        &["tonic"],
        &[
            "src/raft/",
            "src/api/",
            "src/pb/",
            "src/cli/",
            "src/node/",
            "src/etcd/",
            "src/auth.rs",
            "src/tls.rs",
        ],
        "tonic is used only by the gRPC layers (raft/, api/, pb/, cli/, etcd/, the node's \
         server assembly in node/, auth.rs and tls.rs), never by runtime/ or storage/",
    );
    assert_only(&files, &["prost"], &["src/pb/"], "prost types stay in pb/");
    assert_only(
        &files,
        &["env"],
        &["src/cli/"],
        "only cli/ reads arguments or the environment",
    );
    let count = |files: &[(String, String)], needle: &str| -> usize {
        files.iter().map(|(_, c)| c.matches(needle).count()).sum()
    };
    // One per version of the guest contract (wit/fsm.wit, wit/v0.2/fsm.wit), both in
    // runtime/bindings.rs.
    assert_eq!(
        count(&files, "bindgen!("),
        2,
        "exactly one bindgen! per contract version in the host"
    );
    assert!(
        files
            .iter()
            .filter(|(_, c)| c.contains("bindgen!("))
            .all(|(path, _)| path.ends_with("runtime/bindings.rs")),
        "the host's bindgen!s are in runtime/bindings.rs"
    );
    // Issue 36: no wall clock decides when a timer falls due (ARCHITECTURE.md). The timer
    // task reads the wall clock only to stamp its entry; the state machine's timers never read
    // it; only older logs' `FireTimers` (due by the entry's clock) is still applied, and
    // nothing proposes it.
    let code_of = |end: &str| -> &str {
        files
            .iter()
            .find(|(p, _)| p.ends_with(end))
            .map(|(_, c)| c.as_str())
            .unwrap_or_else(|| panic!("{end} exists"))
    };
    let task = code_of("src/timers.rs");
    assert_eq!(
        task.matches("now_ms()").count(),
        1,
        "the timer task reads the wall clock once, to stamp its FireDue entry"
    );
    assert!(task.contains("timestamp_ms: now_ms(),"));
    for clock in ["now_ms()", "SystemTime"] {
        assert!(
            !code_of("storage/state_machine/timers.rs").contains(clock),
            "the state machine's timers never read a wall clock ({clock})"
        );
    }
    for (path, code) in &files {
        if code.contains("Request::FireTimers {") {
            assert!(
                path.ends_with("state_machine/apply.rs") || path.ends_with("src/types.rs"),
                "{path} proposes FireTimers, which lets a wall clock decide when timers fall due"
            );
        }
    }
    // Issue 36: a guest call never waits or enters the async runtime (ARCHITECTURE.md): the
    // WASI functions wasmtime-wasi runs with block_on are replaced wherever WASI is linked.
    for (path, code) in files
        .iter()
        .filter(|(_, c)| c.contains("add_to_linker_sync("))
    {
        let linked = code.find("add_to_linker_sync(").expect("found");
        let replaced = code.find("nonblocking::link(");
        assert!(
            replaced.is_some_and(|r| r > linked),
            "{path} links wasmtime-wasi's WASI without replacing its waiting functions after \
             it (nonblocking::link)"
        );
    }
    // Every entry into guest code goes through contain::call (a host fault is the call's).
    let entries = [".call_", "p.instantiate("];
    for (path, code) in &files {
        let calls_guest =
            entries.iter().any(|e| code.contains(e)) && code.contains("waft_fsm_state_machine()");
        if calls_guest {
            assert!(
                path.ends_with("runtime/bindings.rs"),
                "{path} calls guest exports; only runtime/bindings.rs may (through contain::call)"
            );
        }
    }
    let bindings = &files
        .iter()
        .find(|(p, _)| p.ends_with("runtime/bindings.rs"))
        .expect("runtime/bindings.rs")
        .1;
    for function in bindings.split("fn ").skip(1) {
        let body = function.split("\n    }\n").next().unwrap_or_default();
        if entries.iter().any(|e| body.contains(e)) {
            assert!(
                body.contains("contain::call("),
                "a guest call in runtime/bindings.rs outside contain::call: fn {}",
                body.lines().next().unwrap_or_default()
            );
        }
    }
    let sdk = sources(&root().join("guest-sdk"), "src");
    assert_eq!(
        count(&sdk, "generate!("),
        1,
        "exactly one generate! in the SDK"
    );
}

/// The layers of host/src, lowest first, as lib.rs lists them (its one list: each numbered
/// item of its module documentation is a layer, holding the names it links, `[`name`]`): a
/// module may use only modules of lower layers, so there is no import cycle between them.
/// `Raft` is the handle lib.rs declares over `types` and `storage`.
fn layers() -> &'static [Vec<String>] {
    static LAYERS: std::sync::OnceLock<Vec<Vec<String>>> = std::sync::OnceLock::new();
    LAYERS.get_or_init(|| {
        let lib = std::fs::read_to_string(root().join("host/src/lib.rs")).expect("lib.rs");
        let mut layers: Vec<Vec<String>> = Vec::new();
        for line in lib.lines().filter_map(|l| l.strip_prefix("//!")) {
            let text = line.trim_start();
            let numbered = text
                .split_once(". ")
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
            if numbered {
                layers.push(Vec::new());
            } else if text.is_empty() || !line.starts_with("    ") {
                // A blank line or unindented text ends the item.
                if !layers.is_empty() && !text.is_empty() {
                    break;
                }
                continue;
            }
            if let Some(layer) = layers.last_mut() {
                layer.extend(
                    text.split("[`")
                        .skip(1)
                        .filter_map(|r| r.split_once("`]").map(|(name, _)| name.to_owned())),
                );
            }
        }
        assert!(
            layers.len() >= 5 && layers.iter().all(|l| !l.is_empty()),
            "cannot read the layer list in lib.rs: {layers:?}"
        );
        layers
    })
}

fn layer(module: &str) -> Option<usize> {
    layers().iter().position(|l| l.iter().any(|m| m == module))
}

#[test]
fn architecture_md_lists_the_layers_of_lib_rs() {
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let list = arch
        .split("host/src reads, lowest first:")
        .nth(1)
        .and_then(|rest| rest.split("A module uses only").next())
        .expect("ARCHITECTURE.md has its layer list (\"host/src reads, lowest first: ...\")");
    let listed: Vec<Vec<String>> = list
        .split('→')
        .map(|layer| {
            layer
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        })
        .collect();
    assert_eq!(
        listed,
        layers(),
        "ARCHITECTURE.md's layer list differs from lib.rs's (the one source)"
    );
}

/// The top-level module a file of host/src belongs to (`src/raft/network.rs` → `raft`).
fn module_of(file: &str) -> &str {
    let rest = file.strip_prefix("src/").expect("under src/");
    let first = rest.split('/').next().expect("a component");
    first.strip_suffix(".rs").unwrap_or(first)
}

/// Every `(user, used)` pair of top-level modules where `used` is not in a lower layer.
fn layer_violations(files: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (file, code) in files {
        let user = module_of(file);
        if matches!(user, "lib" | "main") {
            continue;
        }
        let Some(from) = layer(user) else {
            out.push(format!(
                "{file}: module `{user}` is in no layer (add it to lib.rs's list)"
            ));
            continue;
        };
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name == user || name.is_empty() {
                continue;
            }
            match layer(&name) {
                Some(to) if to < from => {}
                _ => out.push(format!("{file}: `{user}` uses `crate::{name}`")),
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn modules_use_only_lower_layers() {
    let files = sources(&root().join("host"), "src");
    let violations = layer_violations(&files);
    assert!(
        violations.is_empty(),
        "the layers in lib.rs are broken (an import cycle or a use upwards): {violations:#?}"
    );
    // Every module lib.rs declares is in a layer.
    let lib = std::fs::read_to_string(root().join("host/src/lib.rs")).expect("lib.rs");
    for line in lib.lines() {
        if let Some(m) = line
            .trim_start_matches("pub ")
            .strip_prefix("mod ")
            .and_then(|m| m.strip_suffix(';'))
        {
            assert!(layer(m).is_some(), "module `{m}` is in no layer");
        }
    }
}

#[test]
fn the_checker_sees_what_it_checks() {
    let layered = vec![
        (
            "src/storage/wal.rs".to_owned(),
            "use crate::types::Entry;".to_owned(),
        ),
        (
            "src/types.rs".to_owned(),
            "use crate::storage::X;".to_owned(),
        ),
        (
            "src/raft/a.rs".to_owned(),
            "crate::Raft; crate::raft::x".to_owned(),
        ),
    ];
    assert_eq!(
        layer_violations(&layered),
        vec!["src/types.rs: `types` uses `crate::storage`".to_owned()]
    );
    let files = vec![
        ("src/a.rs".to_owned(), "use tonic::Status;".to_owned()),
        (
            "src/b.rs".to_owned(),
            "let x = monotonic::now();".to_owned(),
        ),
        ("src/c.rs".to_owned(), "std::env::var(\"X\")".to_owned()),
    ];
    assert_eq!(users(&files, &["tonic"]), vec!["src/a.rs".to_owned()]);
    assert_eq!(users(&files, &["env"]), vec!["src/c.rs".to_owned()]);
}

/// Every std lock in host/src is taken through `sync.rs`, whose names say what a poisoned lock
/// does (`lock_anyway`, `read_anyway`, `write_anyway` use it as it is; `lock_or_stop`,
/// `try_lock_or_stop` stop the node), and no file renames them: `lock(&m)` must not mean
/// "stop" in one file and "carry on" in another.
#[test]
fn every_std_lock_goes_through_sync_rs_by_its_own_name() {
    let files = sources(&root().join("host"), "src");
    let mut offenders = Vec::new();
    for (file, code) in &files {
        if file == "src/sync.rs" {
            continue;
        }
        for bad in ["PoisonError", "lock_or_stop as", "lock_anyway as"] {
            if code.contains(bad) {
                offenders.push(format!("{file}: {bad}"));
            }
        }
        // A lock taken by hand: its result unwrapped, mapped or matched on the spot (an
        // awaited lock is tokio's, which cannot be poisoned).
        for method in [".lock()", ".try_lock()", ".read()", ".write()"] {
            for (i, _) in code.match_indices(method) {
                let rest = code[i + method.len()..].trim_start();
                let before = &code[..i];
                let statement = &before[before.rfind([';', '{', '}']).map_or(0, |s| s + 1)..];
                let by_hand = [".unwrap", ".expect", ".map", ".ok()", ".is_ok", ".is_err"]
                    .iter()
                    .any(|m| rest.starts_with(m))
                    || statement.contains("let Ok(")
                    || statement.contains("let Err(");
                if by_hand {
                    offenders.push(format!("{file}: {method} taken by hand"));
                }
            }
        }
    }
    offenders.sort();
    offenders.dedup();
    assert!(
        offenders.is_empty(),
        "ARCHITECTURE.md says every lock goes through sync.rs's named policies: {offenders:?}"
    );
}

/// Functions of one screen or two, files a reader can hold: no function in the host or client
/// crates over 150 lines, no source file over 800 (a file's unit tests may live beside it, in
/// `NAME/tests.rs`).
#[test]
fn functions_and_files_stay_readable() {
    const MAX_FN_LINES: usize = 150;
    const MAX_FILE_LINES: usize = 800;
    let mut long = Vec::new();
    for dir in ["host/src", "client/src"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("read source");
                let lines: Vec<&str> = text.lines().collect();
                let name = path
                    .strip_prefix(root())
                    .expect("under root")
                    .display()
                    .to_string();
                if lines.len() > MAX_FILE_LINES {
                    long.push(format!("{name}: {} lines", lines.len()));
                }
                for (i, line) in lines.iter().enumerate() {
                    let Some((indent, name_of_fn)) = fn_start(line) else {
                        continue;
                    };
                    let close = format!("{indent}}}");
                    if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
                        let n = end + 2;
                        if n > MAX_FN_LINES {
                            long.push(format!("{name}:{}: fn {name_of_fn} is {n} lines", i + 1));
                        }
                    }
                }
            }
        }
    }
    long.sort();
    assert!(
        long.is_empty(),
        "split these along their steps (at most {MAX_FN_LINES} lines a function, \
         {MAX_FILE_LINES} a file): {long:#?}"
    );
}

/// A line that opens a function's body: its indentation and the function's name.
fn fn_start(line: &str) -> Option<(&str, &str)> {
    let body = line.trim_start();
    let indent = &line[..line.len() - body.len()];
    if body.trim_end().ends_with(';') {
        return None;
    }
    let mut rest = body;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let rest = rest.strip_prefix("async ").unwrap_or(rest);
    let name = rest.strip_prefix("fn ")?;
    let end = name
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    (end > 0).then(|| (indent, &name[..end]))
}

/// Every file and folder of the repository (tracked or not), relative to its root, with `/`
/// between components; build output and dependencies left out.
fn tree() -> Vec<String> {
    let base = root();
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            if name.starts_with('.') || name == "target" || name == "node_modules" {
                continue;
            }
            let rel = path
                .strip_prefix(&base)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            if path.is_dir() {
                out.push(format!("{rel}/"));
                stack.push(path);
            } else {
                out.push(rel);
            }
        }
    }
    out
}

#[test]
fn architecture_md_s_code_map_matches_the_tree() {
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let tree = tree();
    let exists = |named: &str| {
        tree.iter()
            .any(|p| p == named || p.ends_with(&format!("/{named}")))
    };
    // What the map names in backticks: source files (`x.rs`, `dir/x.rs`) and folders (`dir/`);
    // a placeholder in capitals (`NAME/tests.rs`) names no file.
    let named: Vec<&str> = arch
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| (t.ends_with(".rs") || t.ends_with('/')) && t.len() > 1)
        .filter(|t| !t.contains(' ') && !t.chars().any(|c| c.is_ascii_uppercase()))
        .collect();
    assert!(named.len() > 100, "the checker found only {named:?}");
    let missing: Vec<&str> = named.iter().copied().filter(|n| !exists(n)).collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names files and folders that are not in the tree: {missing:?}"
    );
    // And every source file of the host and the client is on the map, by its name.
    let unmapped: Vec<&String> = tree
        .iter()
        .filter(|p| {
            (p.starts_with("host/src/") || p.starts_with("client/src/")) && p.ends_with(".rs")
        })
        .filter(|p| {
            let file = p.rsplit('/').next().expect("a name");
            !named.iter().any(|n| n.rsplit('/').next() == Some(file))
        })
        .collect();
    assert!(
        unmapped.is_empty(),
        "these source files are not on ARCHITECTURE.md's code map: {unmapped:?}"
    );
}
