//! Fuzz target: the virtio-blk request queue.
//! Input layout: see `microvm_devices::fuzz::block_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::block_queue(data);
});
