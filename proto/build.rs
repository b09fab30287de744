//! Compiles proto/bastide/v1/*.proto with a vendored protoc, so no protoc is needed on the host.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        // Smaller starting buffers per stream (src/codec.rs).
        .codec_path("crate::codec::SmallCodec")
        .compile_protos(&["proto/bastide/v1/agent.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
