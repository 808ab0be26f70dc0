//! Compiles the protobuf contract with protox (pure Rust, no system `protoc`)
//! and generates the prost messages and tonic client and server, and a
//! second `NodeConfig` server whose updates are encoded by the caller
//! ([`crate::parts`]): the control plane assembles each message from parts
//! it encoded once for every node.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/weft/v1/weft.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors.clone())?;

    let encoded = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("encoded");
    std::fs::create_dir_all(&encoded)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&encoded)
        // Every message is the one above, except the update, which the
        // server writes as bytes.
        .extern_path(".weft.v1", "crate::v1")
        .extern_path(".weft.v1.ConfigUpdate", "crate::parts::EncodedUpdate")
        .compile_fds(descriptors)?;
    Ok(())
}
