//! Fuzz target: CreateContainer's OCI spec through the agent's parse,
//! namespace plan, container setup and process preparation.
//! Body and invariants: `microvm_fuzz::agent_oci_spec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_fuzz::agent_oci_spec(data);
});
