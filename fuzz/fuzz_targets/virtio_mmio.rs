//! Fuzz target: the virtio-mmio register file (with a virtio-blk device behind it).
//! Input layout: see `microvm_devices::fuzz::mmio_registers`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::mmio_registers(data);
});
