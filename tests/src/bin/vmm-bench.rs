//! Start-up and memory benchmark: `microvm-vmm` against QEMU (`-M microvm`)
//! booting the same probe guest in the same run. Prints a table of medians
//! and the ours/QEMU ratio, since absolute figures on these machines are
//! noisy.
//!
//! Usage: vmm-bench [--runs N] [--accel kvm|tcg] [--no-qemu]

use anyhow::{bail, Context, Result};
use microvm_tests::harness::{binary, ChildGuard, TempDir};
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    runs: usize,
    accel: String,
    qemu: bool,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        runs: 20,
        accel: "kvm".into(),
        qemu: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => options.runs = args.next().context("--runs needs a number")?.parse()?,
            "--accel" => options.accel = args.next().context("--accel needs kvm or tcg")?,
            "--no-qemu" => options.qemu = false,
            "-h" | "--help" => {
                println!("usage: vmm-bench [--runs N] [--accel kvm|tcg] [--no-qemu]");
                println!("Medians over N runs (default 20) of: process start to the probe guest's");
                println!("first serial byte, process start to control socket ready, and the VMM's");
                println!("RSS outside guest memory (1 vCPU, 128 MiB), for microvm-vmm and QEMU.");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(options)
}

fn mkfifo(path: &Path) -> Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: `c_path` is a valid NUL-terminated path; mkfifo does not keep it.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        bail!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Spawns `cmd` with its serial console on a fifo and returns the time from
/// spawn to the first byte the guest printed.
fn time_to_first_serial_byte(mut cmd: Command, fifo: &Path) -> Result<Duration> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _guard = ChildGuard(Some(child));
    // Opening blocks until the VMM opens the write side.
    let mut reader = File::open(fifo)?;
    let mut byte = [0u8; 1];
    let n = reader.read(&mut byte)?;
    let elapsed = start.elapsed();
    if n == 0 {
        bail!("guest printed nothing: {cmd:?}");
    }
    Ok(elapsed)
}

fn time_to_socket(mut cmd: Command, sock: &Path) -> Result<Duration> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _guard = ChildGuard(Some(child));
    let deadline = start + Duration::from_secs(10);
    while Instant::now() < deadline {
        if UnixStream::connect(sock).is_ok() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    bail!("socket {} never became ready: {cmd:?}", sock.display())
}

/// RSS of `pid` outside guest memory: every mapping except the memfd that
/// backs guest RAM (ours is `memfd:microvm-guest-ram`, QEMU's `memfd:mem`).
fn rss_outside_guest_kib(pid: u32) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_mapping_header =
            first.contains('-') && first.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
        if is_mapping_header {
            in_guest_ram =
                line.contains("/memfd:microvm-guest-ram") || line.contains("/memfd:mem ");
        } else if let Some(kib) = line.strip_prefix("Rss:") {
            if !in_guest_ram {
                total += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    Ok(total)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Builds the command for one measurement, with its files in the given dir.
type CommandFor = Box<dyn Fn(&TempDir) -> Command>;

struct Subject {
    name: &'static str,
    first_byte: CommandFor,
    socket: CommandFor,
    idle: CommandFor,
}

fn ours(probe: PathBuf) -> Subject {
    let vmm = binary("microvm-vmm");
    let (p1, p2) = (probe.clone(), probe);
    let (v1, v2, v3) = (vmm.clone(), vmm.clone(), vmm);
    Subject {
        name: "microvm-vmm",
        first_byte: Box::new(move |dir| {
            let mut cmd = Command::new(&v1);
            cmd.args([OsString::from("--kernel"), p1.clone().into()])
                .args([
                    "--cmdline",
                    "probe.quick=1",
                    "--no-rng",
                    "--log-level",
                    "error",
                ])
                .args([OsString::from("--serial-output"), dir.join("serial").into()]);
            cmd
        }),
        socket: Box::new(move |dir| {
            let mut cmd = Command::new(&v2);
            cmd.args([OsString::from("--api-sock"), dir.join("api.sock").into()]);
            cmd.args(["--log-level", "error"]);
            cmd
        }),
        idle: Box::new(move |dir| {
            let mut cmd = Command::new(&v3);
            cmd.args([OsString::from("--kernel"), p2.clone().into()])
                .args([
                    "--cmdline",
                    "probe.quick=1 probe.idle=1",
                    "--no-rng",
                    "--log-level",
                    "error",
                ])
                .args(["--memory-mib", "128", "--vcpus", "1"])
                .args([
                    OsString::from("--serial-output"),
                    dir.join("idle.log").into(),
                ]);
            cmd
        }),
    }
}

fn qemu(probe: PathBuf, accel: String) -> Subject {
    let base = move |probe: &Path, cmdline: &str, serial: &Path| {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem",
            "-object",
            "memory-backend-memfd,id=mem,size=128M,share=on",
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0x441,iosize=1",
        ]);
        cmd.args(["-accel", &accel]);
        // `-cpu host` aborts on PVM hosts ("failed to set MSR 0x10a").
        cmd.args([
            "-cpu",
            if accel == "kvm" {
                "host,-arch-capabilities"
            } else {
                "max"
            },
        ]);
        cmd.args([
            OsString::from("-kernel"),
            probe.into(),
            "-append".into(),
            cmdline.into(),
        ]);
        cmd.args([
            OsString::from("-chardev"),
            format!("file,id=s0,path={}", serial.display()).into(),
        ]);
        cmd.args(["-serial", "chardev:s0"]);
        cmd
    };
    let base = std::rc::Rc::new(base);
    let (b1, b2, b3) = (base.clone(), base.clone(), base);
    let (p1, p2, p3) = (probe.clone(), probe.clone(), probe);
    Subject {
        name: "qemu",
        first_byte: Box::new(move |dir| b1(&p1, "probe.quick=1", &dir.join("serial"))),
        socket: Box::new(move |dir| {
            let mut cmd = b2(
                &p2,
                "probe.quick=1 probe.idle=1",
                &dir.join("qemu-serial.log"),
            );
            cmd.args([
                OsString::from("-qmp"),
                format!("unix:{},server=on,wait=off", dir.join("api.sock").display()).into(),
            ]);
            cmd
        }),
        idle: Box::new(move |dir| b3(&p3, "probe.quick=1 probe.idle=1", &dir.join("idle.log"))),
    }
}

struct Figures {
    first_byte_ms: f64,
    socket_ms: f64,
    rss_kib: u64,
}

fn measure(subject: &Subject, runs: usize) -> Result<Figures> {
    let mut first = Vec::new();
    let mut socket = Vec::new();
    for _ in 0..runs {
        let dir = TempDir::new("bench");
        mkfifo(&dir.join("serial"))?;
        first.push(
            time_to_first_serial_byte((subject.first_byte)(&dir), &dir.join("serial"))?
                .as_secs_f64()
                * 1e3,
        );
        socket.push(
            time_to_socket((subject.socket)(&dir), &dir.join("api.sock"))?.as_secs_f64() * 1e3,
        );
    }
    let dir = TempDir::new("bench-rss");
    let child = (subject.idle)(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let _guard = ChildGuard(Some(child));
    let log = dir.join("idle.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("probe: idle")
    {
        if Instant::now() > deadline {
            bail!("{}: the probe never reached its idle loop", subject.name);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss_kib = rss_outside_guest_kib(pid)?;
    Ok(Figures {
        first_byte_ms: median(first),
        socket_ms: median(socket),
        rss_kib,
    })
}

fn main() -> Result<()> {
    let options = parse_args()?;
    let probe = microvm_tests::probe::probe_guest_elf().context("building the probe guest")?;
    let ours_figures = measure(&ours(probe.clone()), options.runs)?;
    let qemu_figures = if options.qemu {
        match measure(&qemu(probe, options.accel.clone()), options.runs) {
            Ok(figures) => Some(figures),
            Err(e) => {
                println!("qemu ({}) could not be measured: {e:#}", options.accel);
                None
            }
        }
    } else {
        None
    };
    println!();
    println!(
        "probe guest, {} runs each, medians; QEMU with -M microvm -accel {}",
        options.runs, options.accel
    );
    println!(
        "{:<42} {:>14} {:>14} {:>10}",
        "metric", "microvm-vmm", "qemu", "ours/qemu"
    );
    let row = |name: &str, ours: f64, qemu: Option<f64>, unit: &str| {
        let q = qemu
            .map(|q| format!("{q:.2} {unit}"))
            .unwrap_or_else(|| "-".into());
        let ratio = qemu
            .map(|q| format!("{:.3}", ours / q))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<42} {:>14} {:>14} {:>10}",
            name,
            format!("{ours:.2} {unit}"),
            q,
            ratio
        );
    };
    row(
        "start to first guest serial byte",
        ours_figures.first_byte_ms,
        qemu_figures.as_ref().map(|q| q.first_byte_ms),
        "ms",
    );
    row(
        "start to control socket ready",
        ours_figures.socket_ms,
        qemu_figures.as_ref().map(|q| q.socket_ms),
        "ms",
    );
    row(
        "RSS outside guest memory (1 vCPU, 128 MiB)",
        ours_figures.rss_kib as f64 / 1024.0,
        qemu_figures.as_ref().map(|q| q.rss_kib as f64 / 1024.0),
        "MiB",
    );
    Ok(())
}
