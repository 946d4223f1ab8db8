//! `shim-bench`: `ctr run` to first output through
//! `containerd-shim-microvm-v2` (backend qemu), split into shim, VM boot and
//! agent time from the shim's own log line, and the resident memory of the
//! shim, QEMU, virtiofsd and vhost-device-vsock next to
//! `io.containerd.runc.v2` in the same run.
//!
//! `cargo run --release -p microvm-tests --bin shim-bench -- --runs 5`

use anyhow::{bail, Context, Result};
use microvm_guest_image::initramfs::{self, Variant};
use microvm_guest_image::kernel;
use microvm_tests::containerd::{pids_matching, Containerd};
use microvm_tests::harness::{binary, TempDir};
use microvm_tests::oci_image::write_busybox_image;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/library/busybox:microvm-bench";
const SHIM: &str = "containerd-shim-microvm-v2";

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Kilobytes of VmRSS of `pid`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Milliseconds from `ctr run` to the first byte it prints.
fn first_output_ms(containerd: &Containerd, args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let mut child = containerd
        .ctr_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("ctr run")?;
    let mut stdout = child.stdout.take().context("ctr stdout")?;
    let mut byte = [0u8; 1];
    let read = stdout.read(&mut byte).unwrap_or(0);
    let elapsed = started.elapsed();
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait()?;
    if read == 0 || !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        bail!("ctr {args:?} printed nothing ({status}): {stderr}");
    }
    Ok(elapsed.as_secs_f64() * 1000.0)
}

/// The last "ready (host processes A, guest boot B, agent C)" line of the
/// shim log, in milliseconds.
fn last_boot_split(log: &str) -> Option<(f64, f64, f64)> {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains(": ready (host processes"))?;
    let field = |name: &str| -> Option<f64> {
        let rest = &line[line.find(name)? + name.len()..];
        let text: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == 'µ')
            .collect();
        parse_duration_ms(&text)
    };
    Some((
        field("host processes")?,
        field("guest boot")?,
        field("agent")?,
    ))
}

/// Parses Debug-printed durations: "1.08s", "224.3ms", "46µs".
fn parse_duration_ms(text: &str) -> Option<f64> {
    for (suffix, scale) in [("ms", 1.0), ("µs", 0.001), ("ns", 0.000_001), ("s", 1000.0)] {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .skip_while(|arg| arg != "--runs")
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("--runs N")?
        .unwrap_or(5);
    let kernel = kernel::kernel().context("guest kernel")?;
    let initramfs = match std::env::var_os("MICROVM_TEST_INITRAMFS") {
        Some(path) => path.into(),
        None => {
            initramfs::initramfs(Variant::Release)
                .context("initramfs")?
                .path
        }
    };
    let bin = TempDir::new("bench-bin");
    std::os::unix::fs::symlink(binary(SHIM), bin.join(SHIM))?;
    let work = TempDir::new("bench-work");
    let config = work.join("microvm.toml");
    std::fs::write(
        &config,
        format!(
            "backend = \"qemu\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n[paths]\nstate_dir = \"{}\"\nlog_dir = \"{}\"\n",
            kernel.vmlinux.display(),
            initramfs.display(),
            work.join("state").display(),
            work.join("logs").display()
        ),
    )?;
    let containerd = Containerd::start("bench", bin.path(), &[]).map_err(anyhow::Error::msg)?;
    let archive = write_busybox_image(work.path(), IMAGE).map_err(anyhow::Error::msg)?;
    containerd.import(&archive).map_err(anyhow::Error::msg)?;
    let config_arg = config.to_string_lossy().into_owned();

    let (mut microvm, mut runc) = (Vec::new(), Vec::new());
    let (mut host, mut boot, mut agent) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let id = format!("bench-mv-{run}");
        let args = [
            "run",
            "--rm",
            "--runtime",
            "io.containerd.microvm.v2",
            "--runtime-config-path",
            &config_arg,
            IMAGE,
            &id,
            "echo",
            "hi",
        ];
        microvm.push(first_output_ms(&containerd, &args)?);
        if let Some((h, b, a)) = last_boot_split(&containerd.log()) {
            host.push(h);
            boot.push(b);
            agent.push(a);
        }
        let id = format!("bench-runc-{run}");
        let args = [
            "run",
            "--rm",
            "--runtime",
            "io.containerd.runc.v2",
            IMAGE,
            &id,
            "echo",
            "hi",
        ];
        runc.push(first_output_ms(&containerd, &args)?);
    }
    let total = median(&mut microvm);
    let (host, boot, agent) = (median(&mut host), median(&mut boot), median(&mut agent));
    println!("ctr run to first output, median of {runs}:");
    println!("  microvm (qemu, tcg): {total:8.1} ms");
    println!("    host processes    {host:8.1} ms");
    println!("    guest boot        {boot:8.1} ms");
    println!("    agent answer      {agent:8.1} ms");
    println!(
        "    shim + containerd {:8.1} ms (the rest)",
        total - boot - agent - host
    );
    println!("  runc:                {:8.1} ms", median(&mut runc));

    // Memory: one long-running container of each.
    let sleeper = |runtime: &str, id: &str| -> Result<()> {
        let mut args = vec!["run", "-d", "--runtime", runtime];
        if runtime.contains("microvm") {
            args.extend(["--runtime-config-path", &config_arg]);
        }
        args.extend([IMAGE, id, "sleep", "600"]);
        containerd
            .ctr_ok(&args, Duration::from_secs(240))
            .map(|_| ())
            .map_err(anyhow::Error::msg)
    };
    sleeper("io.containerd.microvm.v2", "rss-mv")?;
    sleeper("io.containerd.runc.v2", "rss-runc")?;
    std::thread::sleep(Duration::from_secs(2));
    let state = work.join("state").to_string_lossy().into_owned();
    let socket = containerd.socket.to_string_lossy().into_owned();
    println!("resident memory (VmRSS):");
    for (pid, cmdline) in pids_matching(&socket) {
        if cmdline.contains(SHIM) || cmdline.contains("containerd-shim-runc-v2") {
            let name = cmdline.split_whitespace().next().unwrap_or("?");
            println!(
                "  {:<40} {:8} KiB",
                name.rsplit('/').next().unwrap_or(name),
                rss_kib(pid)
            );
        }
    }
    for (pid, cmdline) in pids_matching(&state) {
        let name = cmdline.split_whitespace().next().unwrap_or("?");
        println!(
            "  {:<40} {:8} KiB",
            name.rsplit('/').next().unwrap_or(name),
            rss_kib(pid)
        );
    }
    // Containerd's drop kills and deletes both.
    Ok(())
}
