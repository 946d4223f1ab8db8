//! Fuzz target: the virtio-net rx and tx queues.
//! Input layout: see `microvm_devices::fuzz::net_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::net_queue(data);
});
