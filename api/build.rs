//! Compiles the protobuf contract with protox (pure Rust, no system `protoc`)
//! and generates the prost messages and tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weft/v1/weft.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
