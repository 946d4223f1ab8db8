//! Fuzz target: the hybrid-vsock `CONNECT <port>` line from a host connection.
//! Input layout: see `microvm_devices::fuzz::vsock_connect_line`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    microvm_devices::fuzz::vsock_connect_line(data);
});
