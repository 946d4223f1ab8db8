//! `shim-bench`: `ctr run` to first output through
//! `containerd-shim-microvm-v2` (backend qemu under TCG) next to
//! `io.containerd.runc.v2` in the same run, the shim's own time per pod
//! apart from the VM boot, and resident memory.
//!
//! `cargo build --release -p containerd-shim-microvm-v2 &&
//!  cargo run --release -p microvm-tests --bin shim-bench -- --runs 5`
//!
//! SIGINT or SIGTERM stops a run: the `ctr` in flight is killed and the
//! bench tears down what it started (tasks, shims, VMs, containerd, mounts)
//! before it exits with 128 + the signal number.

use anyhow::{bail, Context, Result};
use microvm_guest_image::kernel;
use microvm_tests::bench::{
    self, count, initramfs_from_env, initramfs_or_release, is_zombie, kib_line, millis, ms,
    next_value, print_table, ratio, row, signal_if_same, start_time, stat_fields, unmount_under,
    upper_median as median, Columns,
};
use microvm_tests::containerd::{pids_matching, Containerd};
use microvm_tests::harness::{binary, TempDir};
use microvm_tests::oci_image::write_busybox_image;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/library/busybox:microvm-bench";
const SHIM: &str = "containerd-shim-microvm-v2";
const RUNC_SHIM: &str = "containerd-shim-runc-v2";
const MICROVM_RUNTIME: &str = "io.containerd.microvm.v2";
const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The container prints, then lives on long enough for its shim to be
/// sampled before teardown.
const CONTAINER_COMMAND: [&str; 3] = ["sh", "-c", "echo hi; sleep 1"];
/// One pod under TCG boots in seconds; this bounds a hung one.
const CTR_TIMEOUT: Duration = Duration::from_secs(300);
/// Targets from the issue tracker (#5).
const SHIM_OWN_TIME_TARGET_MS: f64 = 30.0;
const SHIM_RSS_TARGET_KIB: u64 = 8 << 10;

const USAGE: &str = "\
usage: shim-bench [--runs N] [--initramfs PATH]

Runs `ctr run` N times (default 5) through containerd-shim-microvm-v2
(backend qemu, TCG) and through io.containerd.runc.v2 in the same private
containerd, then starts one long-running container of each and reads the
resident memory of the shims and the VM's host processes.

Prints, as medians over the runs: time from `ctr run` to the container's
first output; its split into the VM's host processes, guest boot and agent
answer (from the shim's `pod <id>: ready (...)` log line); and the shim's
own time per pod, as CPU time of the serving shim process sampled right
after the first output (before teardown).

options:
  --runs N          runs per runtime (default 5)
  --initramfs PATH  guest initramfs (default: $MICROVM_TEST_INITRAMFS, else
                    the release image, built and cached on first use)
  -h, --help        this text

Needs root, containerd, ctr, runc, qemu-system-x86_64, virtiofsd and
vhost-device-vsock, and release builds of the shim. SIGINT/SIGTERM stop
the run and clean everything up.";

#[derive(Debug, PartialEq)]
struct Options {
    runs: usize,
    initramfs: Option<PathBuf>,
}

/// `None` when help was asked for.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>> {
    let mut options = Options {
        runs: 5,
        initramfs: initramfs_from_env(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--runs" => options.runs = count(&arg, &next_value(&mut args, &arg, "a number")?)?,
            "--initramfs" => {
                options.initramfs = Some(next_value(&mut args, &arg, "a path")?.into());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(Some(options))
}

/// SIGINT/SIGTERM: the first one kills the `ctr` in flight, so the main
/// thread returns through the normal drops (which tear everything down).
type Interrupt = bench::Interrupt<Mutex<Option<Child>>>;

fn watch_signals() -> Result<std::sync::Arc<Interrupt>> {
    Interrupt::watch(
        "shim-bench",
        "cleaning up what the run started",
        Mutex::new(None),
        |in_flight| {
            if let Some(child) = lock(in_flight).as_mut() {
                let _ = child.kill();
            }
        },
    )
}

/// The `ctr` in flight.
fn lock(in_flight: &Mutex<Option<Child>>) -> MutexGuard<'_, Option<Child>> {
    in_flight.lock().unwrap_or_else(PoisonError::into_inner)
}

struct CtrRun<T> {
    status: ExitStatus,
    /// From spawn to the first byte on stdout.
    first_output: Option<Duration>,
    /// What `on_first_output` returned, called as the first byte arrived.
    sampled: Option<T>,
    stderr: String,
}

/// Runs `command` (a `ctr`), killable by the signal watcher and bounded by
/// [`CTR_TIMEOUT`]; calls `on_first_output` once its stdout has a byte.
fn run_ctr<T>(
    interrupt: &Interrupt,
    mut command: Command,
    mut on_first_output: impl FnMut() -> T,
) -> Result<CtrRun<T>> {
    interrupt.check()?;
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ctr")?;
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let mut stdout = child.stdout.take().context("ctr stdout")?;
    let stdout_reader = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        if matches!(stdout.read(&mut byte), Ok(1)) {
            let _ = first_tx.send(started.elapsed());
        }
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
    });
    let mut stderr = child.stderr.take().context("ctr stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    *lock(&interrupt.stop) = Some(child);
    let (mut first_output, mut sampled) = (None, None);
    let status = loop {
        if first_output.is_none() {
            if let Ok(elapsed) = first_rx.try_recv() {
                first_output = Some(elapsed);
                sampled = Some(on_first_output());
            }
        }
        {
            let mut slot = lock(&interrupt.stop);
            let Some(child) = slot.as_mut() else {
                bail!("ctr vanished from the in-flight slot");
            };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                break status;
            }
            if started.elapsed() > CTR_TIMEOUT {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = stdout_reader.join();
    let stderr = stderr_reader.join().unwrap_or_default();
    interrupt.check()?;
    Ok(CtrRun {
        status,
        first_output,
        sampled,
        stderr,
    })
}

/// One sample of a process: CPU time and memory.
#[derive(Debug, Clone, Copy, Default)]
struct ProcessSample {
    /// Sum of `se.sum_exec_runtime` over its live threads (µs precision;
    /// utime + stime in /proc/<pid>/stat count in 10 ms ticks). Tokio's
    /// blocking threads idle 10 s before they exit, so within a pod's
    /// first seconds no thread of the shim has exited yet.
    cpu_live_threads_ms: f64,
    /// cutime + cstime: its reaped children (runc for the runc shim).
    cpu_children_ms: f64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

fn clock_tick_ms() -> f64 {
    // SAFETY: sysconf with a constant name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        1000.0 / ticks as f64
    } else {
        10.0
    }
}

/// `se.sum_exec_runtime` (milliseconds) from a /proc/.../sched text.
fn sum_exec_runtime_ms(sched: &str) -> Option<f64> {
    sched
        .lines()
        .find(|line| line.trim_start().starts_with("se.sum_exec_runtime"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

fn status_kib(status: &str, key: &str) -> u64 {
    kib_line(status, key).unwrap_or(0)
}

fn sample(pid: u32) -> Option<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&stat);
    // cutime and cstime are fields 16 and 17.
    let ticks = |index: usize| -> f64 {
        fields
            .get(index - 3)
            .and_then(|field| field.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let tick = clock_tick_ms();
    let mut live = 0.0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.filter_map(Result::ok) {
            let sched = std::fs::read_to_string(task.path().join("sched")).unwrap_or_default();
            live += sum_exec_runtime_ms(&sched).unwrap_or(0.0);
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Some(ProcessSample {
        cpu_live_threads_ms: live,
        cpu_children_ms: (ticks(16) + ticks(17)) * tick,
        rss_kib: status_kib(&status, "VmRSS:"),
        anon_kib: status_kib(&status, "RssAnon:"),
        file_kib: status_kib(&status, "RssFile:"),
        threads: status_kib(&status, "Threads:"),
    })
}

/// Resident KiB of `pid` per mapping (file name and permissions, or
/// `[heap]`, `[anon]`, ...), largest first.
fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let perms = words.next().unwrap_or("");
            let path = words.nth(3).unwrap_or("[anon]");
            let name = path.rsplit('/').next().unwrap_or(path);
            current = format!("{name} {perms}");
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            *totals.entry(current.clone()).or_default() += kib;
        }
    }
    let mut sorted: Vec<(String, u64)> = totals.into_iter().filter(|(_, kib)| *kib > 0).collect();
    sorted.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    sorted
}

/// The serving shim of container `id` (its command line names the first
/// container with `-id`), by binary name.
fn shim_of(id: &str, shim: &str) -> Option<u32> {
    let needle = format!(" -id {id} ");
    pids_matching(&needle)
        .into_iter()
        .find(|(_, cmdline)| {
            cmdline
                .split_whitespace()
                .next()
                .is_some_and(|program| program.ends_with(shim))
        })
        .map(|(pid, _)| pid)
}

/// `(host processes, guest boot, agent)` in ms from the shim's
/// `pod <id>: ready (host processes A, guest boot B, agent C)` line.
fn boot_split(log: &str, pod: &str) -> Option<(f64, f64, f64)> {
    let marker = format!("pod {pod}: ready (host processes");
    let line = log.lines().rev().find(|line| line.contains(&marker))?;
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

/// Sends `signal` to each recorded process that is still the same one,
/// then waits (up to `timeout`) until each is gone or a zombie.
fn signal_and_wait(pids: &[(u32, u64)], signal: i32, timeout: Duration) {
    for &(pid, started) in pids {
        signal_if_same(pid, started, signal);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|&(pid, started)| start_time(pid) == Some(started) && !is_zombie(pid))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes whose command line holds `needle`, with their start times.
fn processes_naming(needle: &str) -> Vec<(u32, u64)> {
    pids_matching(needle)
        .into_iter()
        .filter_map(|(pid, _)| Some((pid, start_time(pid)?)))
        .collect()
}

/// Everything one bench run starts. Dropping it (on success, error or
/// signal) removes the tasks through containerd, stops containerd, then
/// kills and unmounts whatever is left under the work dir.
struct Bench {
    containerd: Option<Containerd>,
    work: TempDir,
    bin_dir: TempDir,
    config: PathBuf,
}

impl Bench {
    fn start(initramfs: Option<PathBuf>) -> Result<Self> {
        let kernel = kernel::kernel().context("guest kernel")?;
        let initramfs = initramfs_or_release(initramfs).context("initramfs")?;
        let bin = TempDir::new("bench-bin");
        std::os::unix::fs::symlink(binary(SHIM), bin.join(SHIM))?;
        let work = TempDir::new("bench-work");
        let config = work.join("microvm.toml");
        std::fs::write(
            &config,
            format!(
                "backend = \"qemu\"\nlog_level = \"info\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n\
                 [timeouts]\nboot_seconds = 180\nagent_seconds = 60\n\
                 [paths]\nstate_dir = \"{}\"\nlog_dir = \"{}\"\n[qemu]\naccel = \"tcg\"\n",
                kernel.vmlinux.display(),
                initramfs.display(),
                work.join("state").display(),
                work.join("logs").display()
            ),
        )?;
        let mut bench = Self {
            containerd: None,
            work,
            bin_dir: bin,
            config,
        };
        let containerd =
            Containerd::start("bench", bench.bin_dir.path(), &[]).map_err(anyhow::Error::msg)?;
        let archive = write_busybox_image(bench.work.path(), IMAGE).map_err(anyhow::Error::msg)?;
        containerd.import(&archive).map_err(anyhow::Error::msg)?;
        bench.containerd = Some(containerd);
        Ok(bench)
    }

    fn containerd(&self) -> Result<&Containerd> {
        self.containerd.as_ref().context("containerd is stopped")
    }

    /// The `ctr run` command for `runtime`.
    fn ctr_run(&self, runtime: &str, id: &str, detach: bool, command: &[&str]) -> Result<Command> {
        let mut args = vec!["run"];
        args.push(if detach { "-d" } else { "--rm" });
        args.extend(["--runtime", runtime]);
        let config = self.config.to_string_lossy().into_owned();
        if runtime == MICROVM_RUNTIME {
            args.extend(["--runtime-config-path", &config]);
        }
        args.extend([IMAGE, id]);
        args.extend(command);
        Ok(self.containerd()?.ctr_command(&args))
    }

    /// Pids (and start times) of runc containers' init processes: if
    /// containerd is gone, its runc shims are killed and these would
    /// outlive them.
    fn runc_task_pids(&self) -> Vec<(u32, u64)> {
        let Some(containerd) = &self.containerd else {
            return Vec::new();
        };
        let tasks = containerd.dir.join("state/io.containerd.runtime.v2.task");
        let mut found = Vec::new();
        for namespace in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(namespace.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let pid = std::fs::read_to_string(task.path().join("init.pid"))
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok());
                if let Some(pid) = pid {
                    if let Some(started) = start_time(pid) {
                        found.push((pid, started));
                    }
                }
            }
        }
        found
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let runc_tasks = self.runc_task_pids();
        // A Ctrl-C reaches containerd too (same process group); with it
        // gone nothing asks the shims to shut down, and a SIGTERM makes
        // each stop its pod VM and exit.
        if let Some(containerd) = &self.containerd {
            if std::os::unix::net::UnixStream::connect(&containerd.socket).is_err() {
                let socket = containerd.socket.to_string_lossy().into_owned();
                let shims: Vec<(u32, u64)> = pids_matching(&socket)
                    .into_iter()
                    .filter(|(_, cmdline)| {
                        cmdline
                            .split_whitespace()
                            .next()
                            .is_some_and(|program| program.ends_with(SHIM))
                    })
                    .filter_map(|(pid, _)| Some((pid, start_time(pid)?)))
                    .collect();
                eprintln!(
                    "shim-bench: containerd is gone; stopping {} shim(s) with SIGTERM",
                    shims.len()
                );
                signal_and_wait(&shims, libc::SIGTERM, Duration::from_secs(5));
            }
        }
        // Tasks removed through containerd (the shims stop their VMs),
        // containerd stopped, shims that outlived it killed.
        drop(self.containerd.take());
        signal_and_wait(&runc_tasks, libc::SIGKILL, Duration::from_secs(10));
        // A shim killed without its containerd leaves its VM's mounts and,
        // for a moment, its host processes (they die with it): everything
        // that names the work dir goes.
        let work = self.work.path().to_string_lossy().into_owned();
        let leftovers = processes_naming(&work);
        if !leftovers.is_empty() {
            eprintln!(
                "shim-bench: killing {} leftover process(es)",
                leftovers.len()
            );
            signal_and_wait(&leftovers, libc::SIGKILL, Duration::from_secs(10));
        }
        unmount_under(self.work.path());
    }
}

#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    launch: Vec<f64>,
    boot: Vec<f64>,
    agent: Vec<f64>,
    rest: Vec<f64>,
    cpu_live: Vec<f64>,
    cpu_children: Vec<f64>,
}

impl Samples {
    fn cpu(&self) -> f64 {
        median(&self.cpu_live)
    }
}

/// One `ctr run --rm` of `runtime`; the shim is sampled at first output.
fn one_run(
    bench: &Bench,
    interrupt: &Interrupt,
    runtime: &str,
    id: &str,
    samples: &mut Samples,
) -> Result<()> {
    let shim = if runtime == MICROVM_RUNTIME {
        SHIM
    } else {
        RUNC_SHIM
    };
    let command = bench.ctr_run(runtime, id, false, &CONTAINER_COMMAND)?;
    let run = run_ctr(interrupt, command, || shim_of(id, shim).and_then(sample))?;
    let Some(first_output) = run.first_output else {
        bail!(
            "ctr run {id} printed nothing ({}): {}",
            run.status,
            run.stderr.trim()
        );
    };
    if !run.status.success() {
        bail!(
            "ctr run {id} failed ({}): {}",
            run.status,
            run.stderr.trim()
        );
    }
    let total = millis(first_output);
    samples.total.push(total);
    match run.sampled.flatten() {
        Some(shim) => {
            samples.cpu_live.push(shim.cpu_live_threads_ms);
            samples.cpu_children.push(shim.cpu_children_ms);
        }
        None => eprintln!("shim-bench: {id}: its shim was gone before it could be sampled"),
    }
    if runtime == MICROVM_RUNTIME {
        match boot_split(&bench.containerd()?.log(), id) {
            Some((launch, boot, agent)) => {
                samples.launch.push(launch);
                samples.boot.push(boot);
                samples.agent.push(agent);
                samples.rest.push(total - launch - boot - agent);
            }
            None => eprintln!("shim-bench: {id}: no `ready` line from the shim in the log"),
        }
    }
    eprintln!("shim-bench: {id}: first output after {total:.1} ms");
    Ok(())
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "ok"
    } else {
        "MISSED"
    }
}

const COLUMNS: Columns = Columns {
    metric: "metric (median)",
    metric_width: 52,
    ratio_width: 8,
    target: "target",
};

fn kib(value: u64) -> String {
    format!("{:.2} MiB", value as f64 / 1024.0)
}

fn run(options: &Options, interrupt: &Interrupt) -> Result<()> {
    let bench = Bench::start(options.initramfs.clone())?;
    interrupt.check()?;
    let (mut microvm, mut runc) = (Samples::default(), Samples::default());
    for index in 0..options.runs {
        one_run(
            &bench,
            interrupt,
            MICROVM_RUNTIME,
            &format!("bench-mv-{index}"),
            &mut microvm,
        )?;
        one_run(
            &bench,
            interrupt,
            RUNC_RUNTIME,
            &format!("bench-runc-{index}"),
            &mut runc,
        )?;
    }

    let (total, runc_total) = (median(&microvm.total), median(&runc.total));
    let (cpu, runc_cpu) = (microvm.cpu(), runc.cpu());
    let rest = median(&microvm.rest);
    let none = String::new;
    let mut rows = vec![
        row(
            "ctr run to first output",
            ms(total),
            ms(runc_total),
            ratio(total, runc_total, 2),
            none(),
        ),
        row(
            "  VM host processes started (virtiofsd, vsock, qemu)",
            ms(median(&microvm.launch)),
            none(),
            none(),
            none(),
        ),
        row(
            "  guest boot (to the agent's ready line)",
            ms(median(&microvm.boot)),
            none(),
            none(),
            none(),
        ),
        row(
            "  agent health check answered",
            ms(median(&microvm.agent)),
            none(),
            none(),
            none(),
        ),
        row(
            "  rest: containerd, ctr, shim, container create+start",
            ms(rest),
            ms(runc_total),
            ratio(rest, runc_total, 2),
            none(),
        ),
        row(
            "shim own time: CPU of the serving shim per pod",
            ms(cpu),
            ms(runc_cpu),
            ratio(cpu, runc_cpu, 2),
            format!(
                "<= {SHIM_OWN_TIME_TARGET_MS} ms {}",
                verdict(cpu <= SHIM_OWN_TIME_TARGET_MS)
            ),
        ),
        row(
            "  its reaped children (runc create/start for runc)",
            ms(median(&microvm.cpu_children)),
            ms(median(&runc.cpu_children)),
            none(),
            none(),
        ),
    ];
    println!();
    println!(
        "shim-bench: {} runs per runtime, `{}` in a busybox container, qemu under TCG",
        options.runs,
        CONTAINER_COMMAND.join(" ")
    );
    print_table(&COLUMNS, &rows);
    println!(
        "(\"rest\" is the wall time outside the VM boot: an upper bound on the shim's own time \
         on the critical path, since it also holds containerd, ctr and the guest's container \
         create/start. CPU is sampled at the first output, so it covers the shim's start, \
         Create with the VM boot, Start and the output so far; the short-lived `start` \
         invocation of either shim is not counted.)"
    );

    // Memory: one long-running container of each runtime.
    let sleeper = |runtime: &str, id: &str| -> Result<()> {
        let command = bench.ctr_run(runtime, id, true, &["sleep", "600"])?;
        let run = run_ctr(interrupt, command, || ())?;
        if !run.status.success() {
            bail!(
                "ctr run -d {id} failed ({}): {}",
                run.status,
                run.stderr.trim()
            );
        }
        Ok(())
    };
    sleeper(MICROVM_RUNTIME, "rss-mv")?;
    sleeper(RUNC_RUNTIME, "rss-runc")?;
    std::thread::sleep(Duration::from_secs(2));
    interrupt.check()?;
    let shim = shim_of("rss-mv", SHIM)
        .and_then(sample)
        .context("sampling the microvm shim")?;
    let runc_shim = shim_of("rss-runc", RUNC_SHIM)
        .and_then(sample)
        .unwrap_or_default();
    rows = vec![
        row(
            "shim RSS, one pod running",
            kib(shim.rss_kib),
            kib(runc_shim.rss_kib),
            ratio(shim.rss_kib as f64, runc_shim.rss_kib as f64, 2),
            format!(
                "<= {} MiB {}",
                SHIM_RSS_TARGET_KIB >> 10,
                verdict(shim.rss_kib <= SHIM_RSS_TARGET_KIB)
            ),
        ),
        row(
            "  anonymous (heap, stacks, relocated data)",
            kib(shim.anon_kib),
            kib(runc_shim.anon_kib),
            none(),
            none(),
        ),
        row(
            "  file-backed (binary and library pages)",
            kib(shim.file_kib),
            kib(runc_shim.file_kib),
            none(),
            none(),
        ),
        row(
            "  threads",
            shim.threads.to_string(),
            runc_shim.threads.to_string(),
            none(),
            none(),
        ),
    ];
    for (mapping, kib) in rss_by_mapping(shim_of("rss-mv", SHIM).unwrap_or(0))
        .into_iter()
        .take(8)
    {
        rows.push(row(
            format!("  shim mapping {mapping}"),
            format!("{kib} KiB"),
            none(),
            none(),
            none(),
        ));
    }
    let state = bench.work.join("state").to_string_lossy().into_owned();
    for (pid, cmdline) in pids_matching(&state) {
        let program = cmdline.split_whitespace().next().unwrap_or("?");
        let name = program.rsplit('/').next().unwrap_or(program);
        if name == SHIM {
            continue;
        }
        let rss = sample(pid).map_or(0, |sample| sample.rss_kib);
        rows.push(row(
            format!("VM host process {name} RSS"),
            kib(rss),
            none(),
            none(),
            none(),
        ));
    }
    println!();
    print_table(&COLUMNS, &rows);
    Ok(())
}

fn main() -> ExitCode {
    bench::main("shim-bench", USAGE, parse_args, watch_signals, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| (*word).to_owned()).collect()
    }

    #[test]
    fn arguments_parse_and_help_is_not_a_run() {
        assert_eq!(parse_args(args(&["--help"])).unwrap(), None);
        assert_eq!(parse_args(args(&["-h"])).unwrap(), None);
        let options = parse_args(args(&["--runs", "3", "--initramfs", "/x.cpio"]))
            .unwrap()
            .unwrap();
        assert_eq!(options.runs, 3);
        assert_eq!(options.initramfs, Some(PathBuf::from("/x.cpio")));
        for bad in [
            &["--runs"][..],
            &["--runs", "many"],
            &["--runs", "0"],
            &["run"],
            &["--initramfs"],
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn the_boot_split_comes_from_the_pods_ready_line() {
        let log = "time=\"...\" level=info msg=\"pod other: ready (host processes 9ms, guest boot 9s, agent 9ms)\"\n\
                   2026-11-21T22:00:00Z  INFO pod bench-mv-1: ready (host processes 53.2ms, guest boot 1.9s, agent 46µs)\n";
        let (launch, boot, agent) = boot_split(log, "bench-mv-1").unwrap();
        assert!((launch - 53.2).abs() < 1e-9);
        assert!((boot - 1900.0).abs() < 1e-9);
        assert!((agent - 0.046).abs() < 1e-9);
        assert!(boot_split(log, "bench-mv-2").is_none());
    }

    #[test]
    fn cpu_time_is_read_from_proc() {
        assert_eq!(
            sum_exec_runtime_ms("se.vruntime : 1.0\nse.sum_exec_runtime   :   12.345678\n"),
            Some(12.345678)
        );
        // This process has run, so both CPU figures are positive.
        let busy = Instant::now();
        while busy.elapsed() < Duration::from_millis(30) {}
        let own = sample(std::process::id()).unwrap();
        assert!(own.cpu_live_threads_ms > 0.0, "{own:?}");
        assert!(own.rss_kib > 0 && own.rss_kib >= own.anon_kib, "{own:?}");
        let mappings = rss_by_mapping(std::process::id());
        assert!(
            mappings
                .iter()
                .any(|(name, _)| name.starts_with("shim_bench")),
            "{mappings:?}"
        );
        let total: u64 = mappings.iter().map(|(_, kib)| kib).sum();
        assert!(
            total.abs_diff(own.rss_kib) < own.rss_kib / 4,
            "{mappings:?} vs {own:?}"
        );
    }
}
