fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["microvm/agent/v1/health.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // No generated `connect(url)` helpers: the shim dials the agent over
    // hybrid vsock (a unix socket), with its own connector.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
