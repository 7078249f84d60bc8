//! Generates the etcd message types from waft's `proto/etcd.proto` (the same file the host
//! serves), with a vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../../../proto/etcd.proto");
    prost_build::Config::new()
        .btree_map(["."])
        .compile_protos(&["../../../proto/etcd.proto"], &["../../../proto"])?;
    Ok(())
}
