//! Fuzz target: the shim's TOML config file.
//! Body and invariants: `microvm_fuzz::shim_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_fuzz::shim_config(data);
});
