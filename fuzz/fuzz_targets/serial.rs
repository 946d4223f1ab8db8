//! Fuzz target: the 8250 serial port registers and the console output limit.
//! Input layout: see `microvm_devices::fuzz::serial`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::serial(data);
});
