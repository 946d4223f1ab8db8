//! The agent must refuse to act as init anywhere but PID 1 of a VM.

use std::process::Command;

#[test]
fn refuses_to_run_when_not_pid1() {
    let output = Command::new(env!("CARGO_BIN_EXE_microvm-agent"))
        .output()
        .expect("spawn microvm-agent");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PID 1"), "stderr: {stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("ready"),
        "must not print the ready line"
    );
}
