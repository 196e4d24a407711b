// protoc comes from the system (apt protobuf-compiler, installed by `cargo xtask setup`);
// PROTOC in the environment overrides it, as prost-build documents.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=tracker.proto");
    tonic_prost_build::configure().compile_protos(&["tracker.proto"], &["."])?;
    Ok(())
}
