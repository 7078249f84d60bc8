//! Builds every guest (examples/guests and tests/guests) for wasm32-wasip2 and emits one path
//! constant per component, so no test hard-codes a path and every build is fresh.
//!
//! The guests build with a nested cargo into `target/guests`, a target directory of their own,
//! so the nested build never waits on the lock of the outer one.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const WORKSPACES: &[&str] = &["examples/guests", "tests/guests"];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("tests/ sits in the repository root")
        .to_path_buf();
    let target_dir = root.join("target").join("guests");
    for dir in ["guest-sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    ensure_target(&root);
    let mut constants = String::new();
    for ws in WORKSPACES {
        let ws_dir = root.join(ws);
        watch_workspace(&ws_dir);
        build(&root, &ws_dir, &target_dir);
        for member in members(&ws_dir) {
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
            let prefix = if ws.starts_with("examples") {
                "EXAMPLE"
            } else {
                "TEST"
            };
            constants.push_str(&format!(
                "/// `{ws}/{member}`, built for {TARGET}.\npub const {prefix}_{}: &str = {:?};\n",
                crate_name.to_uppercase(),
                wasm.display().to_string()
            ));
        }
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests.rs");
    std::fs::write(&out, constants).expect("write guests.rs");
}

/// The members of a guest workspace: its subdirectories holding a Cargo.toml.
fn members(ws: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ws)
        .expect("read guest workspace")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

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

fn build(root: &Path, ws: &Path, target_dir: &Path) {
    let status = clean_cargo(root)
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
