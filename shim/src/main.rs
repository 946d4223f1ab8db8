//! `containerd-shim-microvm-v2`: containerd runs it as
//! `--runtime io.containerd.microvm.v2`. See docs/shim.md.

use microvm_shim::shim::{MicrovmShim, RUNTIME_ID};

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // Logging is ours (tracing, to containerd's log FIFO).
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<MicrovmShim>(RUNTIME_ID, Some(config)).await;
}
