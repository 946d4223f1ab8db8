//! The README's main job, until the shim exists: boot the probe guest under
//! `microvm-vmm` with a disk and a vsock echo peer, then show its serial
//! output, the VMM's log (boot timer included) and the stop reason.

use anyhow::{bail, Context, Result};
use microvm_tests::harness::{binary, run_with_timeout, TempDir};
use microvm_tests::probe::{echo_socket_path, spawn_echo, write_disk};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

fn main() -> Result<()> {
    let probe = microvm_tests::probe::probe_guest_elf().context("building the probe guest")?;
    let dir = TempDir::new("demo");
    let disk = dir.join("disk.img");
    write_disk(&disk)?;
    let uds = dir.join("v.sock");
    let _echo = spawn_echo(UnixListener::bind(echo_socket_path(&uds))?);
    let console = dir.join("console.log");
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.args(["--kernel".as_ref(), probe.as_os_str()])
        .args(["--disk".as_ref(), disk.as_os_str()])
        .args(["--vsock-uds".as_ref(), uds.as_os_str()])
        .args(["--serial-output".as_ref(), console.as_os_str()]);
    println!("$ {cmd:?}");
    let done = run_with_timeout(&mut cmd, Duration::from_secs(60)).map_err(anyhow::Error::msg)?;
    println!("--- guest serial console ---");
    print!("{}", std::fs::read_to_string(&console).unwrap_or_default());
    println!("--- microvm-vmm log ---");
    print!("{}", done.stderr);
    println!(
        "--- exit status {:?} after {:.1} ms ---",
        done.code(),
        done.elapsed.as_secs_f64() * 1e3
    );
    let written = std::fs::read(&disk)?;
    println!(
        "disk sector 1 now starts with {:?}",
        String::from_utf8_lossy(&written[512..512 + 18])
    );
    if done.code() != Some(0) {
        bail!("the probe guest did not shut down cleanly");
    }
    Ok(())
}
