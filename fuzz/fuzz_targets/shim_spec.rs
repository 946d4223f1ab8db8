//! Fuzz target: a bundle's config.json as the shim reads it: the pod a container joins.
//! Body and invariants: `microvm_fuzz::shim_spec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_fuzz::shim_spec(data);
});
