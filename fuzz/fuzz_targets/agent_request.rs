//! Fuzz target: the agent's gRPC request messages (byte 0 picks the type)
//! and the OCI JSON, addresses and DNS they carry.
//! Body and invariants: `microvm_fuzz::agent_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_fuzz::agent_request(data);
});
