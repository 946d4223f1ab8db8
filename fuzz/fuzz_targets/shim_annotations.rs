//! Fuzz target: pod annotations (`key=value` lines) over the shim's config.
//! Body and invariants: `microvm_fuzz::shim_annotations`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_fuzz::shim_annotations(data);
});
