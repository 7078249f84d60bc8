//! Generates the gRPC code from `proto/` with a vendored protoc, so a fresh machine needs
//! nothing but the Rust toolchain, and builds the example guests that `waft dev` carries inside
//! the binary (so it needs no source tree, and no cargo, at run time).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec answers a malformed message with INTERNAL; ours says INVALID_ARGUMENT.
        .codec_path("crate::pb::codec::WaftCodec")
        // For gRPC server reflection, so grpcurl can list and call everything.
        .file_descriptor_set_path(out.join("waft_descriptor.bin"))
        // The client API (`api.proto`) is generated in the client crate, which the node uses.
        .compile_protos(&["../proto/raft.proto"], &["../proto"])?;
    // etcd's KV API: served on `--etcd-listen` and used by the benchmark's etcd mode. Kept out
    // of waft's reflection descriptors (etcd clients do not use reflection).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::pb::codec::WaftCodec")
        .compile_protos(&["../proto/etcd.proto"], &["../proto"])?;
    example_guests(&out)?;
    commit();
    Ok(())
}

/// Names the commit this binary is built from (`WAFT_COMMIT`, for `waft --version` and
/// `waft cluster status`): from `git` in a checkout, else from the environment's `WAFT_COMMIT`
/// (a build from a source archive), else "unknown". Built again when the checkout's commit
/// changes.
fn commit() {
    println!("cargo:rerun-if-env-changed=WAFT_COMMIT");
    let root = waft_guest_build::root();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let from_git = git(&["rev-parse", "--short=12", "HEAD"]);
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = std::path::PathBuf::from(dir);
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("packed-refs").display()
        );
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", dir.join(branch).display());
        }
    }
    let commit = from_git
        .or_else(|| std::env::var("WAFT_COMMIT").ok())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=WAFT_COMMIT={commit}");
}

/// Builds examples/guests and writes `examples.rs`: the bytes of the example guests `waft dev`
/// deploys (`KV`, `ETCD_KV`).
fn example_guests(out: &std::path::Path) -> std::io::Result<()> {
    let root = waft_guest_build::root();
    let built = waft_guest_build::build_workspace(
        &root,
        &root.join("examples/guests"),
        &waft_guest_build::target_dir(&root),
    );
    let mut code = String::new();
    // The ones `waft dev` deploys.
    for (name, wasm) in built
        .into_iter()
        .filter(|(n, _)| ["kv", "etcd_kv"].contains(&n.as_str()))
    {
        code.push_str(&format!(
            "/// The example guest `{name}` (examples/guests), built with this binary.\n\
             pub const {}: &[u8] = include_bytes!({:?});\n",
            name.to_uppercase(),
            wasm.display().to_string()
        ));
    }
    std::fs::write(out.join("examples.rs"), code)
}
