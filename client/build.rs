//! Generates waft's client API (`proto/api.proto`) with a vendored protoc, so a fresh machine
//! needs nothing but the Rust toolchain. Servers are generated too: the node serves this API
//! from these very types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../proto/api.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec answers a malformed message with INTERNAL; ours says INVALID_ARGUMENT.
        .codec_path("crate::codec::WaftCodec")
        // For gRPC server reflection on the node, so grpcurl can list and call everything.
        .file_descriptor_set_path(out.join("waft_api_descriptor.bin"))
        .compile_protos(&["../proto/api.proto"], &["../proto"])?;
    Ok(())
}
