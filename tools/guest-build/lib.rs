//! Building waft's Rust guests from a build script: the example guests that `waft dev`
//! carries inside the binary (host/build.rs) and every guest the tests use (tests/build.rs).
//!
//! The guests build with a nested cargo into `target/guests`, a target directory of their own,
//! so the nested build never waits on the lock of the outer one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target every guest is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// The repository root, from a build script of a crate one level below it.
pub fn root() -> PathBuf {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the crate sits one level below the repository root")
        .to_path_buf()
}

/// Where the guests are built: `target/guests`.
pub fn target_dir(root: &Path) -> PathBuf {
    root.join("target").join("guests")
}

/// Builds the guest workspace `ws` (release, [`TARGET`]) into `target_dir`, asking cargo to
/// rebuild the caller when the workspace, the SDK or the WIT change. Returns each member's
/// crate name (with `_`) and the path of its component.
pub fn build_workspace(root: &Path, ws: &Path, target_dir: &Path) -> Vec<(String, PathBuf)> {
    for dir in ["guest-sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    ensure_target(root);
    watch_workspace(ws);
    build(root, ws, target_dir);
    members(ws)
        .into_iter()
        .map(|member| {
            let crate_name = member.replace('-', "_");
            let wasm = target_dir
                .join(TARGET)
                .join("release")
                .join(format!("{crate_name}.wasm"));
            assert!(
                wasm.exists(),
                "guest build did not produce {}",
                wasm.display()
            );
            (crate_name, wasm)
        })
        .collect()
}

/// The members of a guest workspace: its subdirectories holding a Cargo.toml.
pub fn members(ws: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ws)
        .expect("read guest workspace")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asks cargo to rerun the build script when the workspace or one of its members changes.
fn watch_workspace(ws: &Path) {
    println!("cargo:rerun-if-changed={}", ws.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", ws.join("Cargo.lock").display());
    for member in members(ws) {
        println!("cargo:rerun-if-changed={}", ws.join(&member).display());
    }
}

/// A cargo command with the outer build's settings removed: the outer cargo's flags, target
/// dir and jobserver are not meant for a wasm build.
fn clean_cargo(root: &Path) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
            || key == "MAKEFLAGS"
            || key == "MFLAGS";
        if outer {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Builds the workspace `ws` for [`TARGET`], release.
fn build(root: &Path, ws: &Path, target_dir: &Path) {
    let status = clean_cargo(root)
        .env("CARGO_ENCODED_RUSTFLAGS", remapped_paths(root))
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(ws.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("run cargo to build the guests");
    assert!(
        status.success(),
        "building the guests in {} failed (see the output above)",
        ws.display()
    );
}

/// Flags that take the checkout's and cargo's own directories out of the components (panic
/// messages name source files). Builds in two checkouts still differ in a few bytes (cargo's
/// crate hashes depend on where the packages are), so tests never compare a fresh build with
/// a module written by an earlier one.
fn remapped_paths(root: &Path) -> String {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let mut flags = vec![format!("--remap-path-prefix={}=/waft", root.display())];
    if let Some(home) = cargo_home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    flags.join("\x1f")
}

/// Installs the wasm32-wasip2 target when it is missing (the toolchain file cannot: these
/// machines set RUSTUP_AUTO_INSTALL=0), or fails saying exactly what to run.
fn ensure_target(root: &Path) {
    let sysroot = Command::new("rustc")
        .current_dir(root)
        .args(["--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).exists()) {
        return;
    }
    let added = Command::new("rustup")
        .current_dir(root)
        .args(["target", "add", TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        added,
        "the {TARGET} target is missing and `rustup target add {TARGET}` failed; run it by hand"
    );
}
