//! Fuzz target: the virtio-vsock rx/tx/event queues.
//! Input layout: see `microvm_devices::fuzz::vsock_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::vsock_queue(data);
});
