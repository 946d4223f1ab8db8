fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "microvm/agent/v1/health.proto",
        "microvm/agent/v1/sandbox.proto",
        "microvm/agent/v1/container.proto",
        "microvm/agent/v1/process.proto",
        "microvm/agent/v1/events.proto",
        "microvm/agent/v1/storage.proto",
        "microvm/agent/v1/network.proto",
        // microvm-ctl: guest metrics and the debug console.
        "microvm/agent/v1/debug.proto",
        // API 1.1: the guest clock (issue #15).
        "microvm/agent/v1/clock.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // No generated `connect(url)` helpers: the shim dials the agent over
    // hybrid vsock (a unix socket), with its own connector.
    tonic_prost_build::configure()
        .build_transport(false)
        // `bytes` fields as `Bytes`: stdio chunks are passed on without a copy.
        .bytes(".")
        .compile_protos(&protos, &["."])?;
    Ok(())
}
