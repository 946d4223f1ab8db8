//! Fuzz target: the virtio-rng request queue.
//! Input layout: see `microvm_devices::fuzz::rng_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::rng_queue(data);
});
