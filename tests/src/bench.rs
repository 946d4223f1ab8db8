//! What the benchmark binaries (`shim-bench`, `cri-bench`) share: a
//! signal-driven stop that lets a run tear down what it started, their
//! `main`, argument helpers, /proc readers and the result table.
//!
//! anyhow, as in `probe`: these helpers serve binaries, whose errors are
//! only ever printed.

use crate::containerd::mounts_under;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// SIGINT/SIGTERM: the first one is recorded and handed to the binary's
/// `on_first` (which makes the work in flight return early), so the run
/// returns through the normal drops (which tear everything down). Later
/// ones are reported and otherwise ignored: the cleanup must finish.
pub struct Interrupt<S> {
    signal: AtomicI32,
    /// What the first signal acts on (the `ctr` in flight, a cancel
    /// channel).
    pub stop: S,
}

impl<S: Send + Sync + 'static> Interrupt<S> {
    /// Starts watching; `stopping` says what the stop does, after
    /// "`program`: SIGINT: stopping; ".
    pub fn watch(
        program: &'static str,
        stopping: &'static str,
        stop: S,
        on_first: impl Fn(&S) + Send + 'static,
    ) -> Result<Arc<Self>> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let interrupt = Arc::new(Self {
            signal: AtomicI32::new(0),
            stop,
        });
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("watching SIGINT and SIGTERM")?;
        let watcher = Arc::clone(&interrupt);
        std::thread::spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if watcher.signal.swap(signal, Ordering::SeqCst) == 0 {
                    eprintln!("{program}: {name}: stopping; {stopping}");
                    on_first(&watcher.stop);
                } else {
                    eprintln!("{program}: {name}: still cleaning up, please wait");
                }
            }
        });
        Ok(interrupt)
    }
}

impl<S> Interrupt<S> {
    /// The first signal received, 0 while none.
    pub fn signal(&self) -> i32 {
        self.signal.load(Ordering::SeqCst)
    }

    pub fn check(&self) -> Result<()> {
        match self.signal() {
            0 => Ok(()),
            signal => bail!("interrupted by signal {signal}"),
        }
    }

    /// Sleeps, cut short by a signal.
    pub fn sleep(&self, duration: Duration) -> Result<()> {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            self.check()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        self.check()
    }
}

/// A benchmark's `main`: parses the arguments (`Ok(None)` prints `usage`),
/// starts the signal watch, runs, and exits 0, 1 on an error, 2 on bad
/// arguments, or 128 + the signal once a signal stopped the run.
pub fn main<O, S>(
    program: &str,
    usage: &str,
    parse_args: impl FnOnce(std::iter::Skip<std::env::Args>) -> Result<Option<O>>,
    watch: impl FnOnce() -> Result<Arc<Interrupt<S>>>,
    run: impl FnOnce(&O, &Interrupt<S>) -> Result<()>,
) -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("{program}: {err:#}");
            return ExitCode::from(2);
        }
    };
    let interrupt = match watch() {
        Ok(interrupt) => interrupt,
        Err(err) => {
            eprintln!("{program}: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    // Everything the run started is torn down before `run` returns.
    let result = run(&options, &interrupt);
    match (interrupt.signal(), result) {
        (0, Ok(())) => ExitCode::SUCCESS,
        (0, Err(err)) => {
            eprintln!("{program}: {err:#}");
            ExitCode::FAILURE
        }
        (signal, _) => {
            eprintln!("{program}: interrupted by signal {signal}; cleaned up");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
    }
}

/// The value of option `name`, the next argument.
pub fn next_value(
    args: &mut impl Iterator<Item = String>,
    name: &str,
    what: &str,
) -> Result<String> {
    args.next().with_context(|| format!("{name} needs {what}"))
}

/// `value` of option `name` as a count.
pub fn count(name: &str, value: &str) -> Result<usize> {
    value
        .parse()
        .with_context(|| format!("{name} {value:?} is not a number"))
}

/// The `--initramfs` default: `$MICROVM_TEST_INITRAMFS`, if set.
pub fn initramfs_from_env() -> Option<PathBuf> {
    std::env::var_os("MICROVM_TEST_INITRAMFS").map(PathBuf::from)
}

/// `initramfs`, else the release image (built and cached on first use).
pub fn initramfs_or_release(initramfs: Option<PathBuf>) -> Result<PathBuf> {
    use microvm_guest_image::initramfs::{self, Variant};
    match initramfs {
        Some(path) => Ok(path),
        None => Ok(initramfs::initramfs(Variant::Release)?.path),
    }
}

/// Fields after the command name of /proc/<pid>/stat (field 3 first).
pub fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rfind(')')
        .map(|at| stat[at + 1..].split_whitespace().collect())
        .unwrap_or_default()
}

/// Start time (field 22) of `pid`, to tell a recycled pid apart.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).get(19)?.parse().ok()
}

/// A zombie, or gone.
pub fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    matches!(stat_fields(&stat).first(), Some(&"Z") | None)
}

/// Sends `signal` to `pid` if it is still the process that started at
/// `started`.
pub fn signal_if_same(pid: u32, started: u64, signal: i32) {
    if start_time(pid) == Some(started) {
        if let Ok(raw) = i32::try_from(pid) {
            // SAFETY: kill(2) with plain integers; the start time check
            // makes sure it is still the process recorded.
            unsafe { libc::kill(raw, signal) };
        }
    }
}

/// The KiB figure of a `key value kB` line (/proc status, smaps).
pub fn kib_field(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The KiB figure of the first line of `text` that is `key value kB`.
pub fn kib_line(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| kib_field(line, key))
}

/// Lazily unmounts everything at or below `dir` (what a killed shim
/// leaves).
pub fn unmount_under(dir: &Path) {
    for point in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&point).status();
    }
}

/// The middle value; the mean of the two middle ones for an even count.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => sorted[len / 2],
        len => (sorted[len / 2 - 1] + sorted[len / 2]) / 2.0,
    }
}

/// The middle value; the upper of the two middle ones for an even count
/// (what shim-bench has always reported).
pub fn upper_median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn ms(value: f64) -> String {
    if value.is_nan() {
        "-".into()
    } else {
        format!("{value:.1} ms")
    }
}

/// `microvm / runc` with `decimals` places, `-` where there is none.
pub fn ratio(microvm: f64, runc: f64, decimals: usize) -> String {
    if runc > 0.0 && microvm.is_finite() && runc.is_finite() {
        format!("{:.decimals$}x", microvm / runc)
    } else {
        "-".into()
    }
}

/// One line of the result table.
pub struct Row {
    pub metric: String,
    pub microvm: String,
    pub runc: String,
    pub ratio: String,
    pub target: String,
}

pub fn row(
    metric: impl Into<String>,
    microvm: String,
    runc: String,
    ratio: String,
    target: String,
) -> Row {
    Row {
        metric: metric.into(),
        microvm,
        runc,
        ratio,
        target,
    }
}

/// The headings and widths of a binary's result table.
pub struct Columns {
    pub metric: &'static str,
    pub metric_width: usize,
    pub ratio_width: usize,
    pub target: &'static str,
}

pub fn print_table(columns: &Columns, rows: &[Row]) {
    let (metric_width, ratio_width) = (columns.metric_width, columns.ratio_width);
    println!(
        "{:<metric_width$} {:>11} {:>11} {:>ratio_width$}  {}",
        columns.metric, "microvm", "runc", "ratio", columns.target
    );
    for row in rows {
        println!(
            "{:<metric_width$} {:>11} {:>11} {:>ratio_width$}  {}",
            row.metric, row.microvm, row.runc, row.ratio, row.target
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_start_after_the_command_name() {
        let fields = stat_fields("42 (a (b) c) S 1 2 3");
        assert_eq!(fields.first(), Some(&"S"));
        assert_eq!(fields.len(), 4);
        assert!(stat_fields("garbage").is_empty());
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(!is_zombie(me));
    }

    #[test]
    fn kib_figures_come_from_their_line() {
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nRssAnon:\t 99 kB\n";
        assert_eq!(kib_line(status, "VmRSS:"), Some(1234));
        assert_eq!(kib_line(status, "RssAnon:"), Some(99));
        assert_eq!(kib_line(status, "RssFile:"), None);
        assert_eq!(kib_field("Pss:  49516 kB", "Pss:"), Some(49516));
        assert_eq!(kib_field("Pss: many kB", "Pss:"), None);
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(upper_median(&[4.0, 1.0, 2.0, 3.0]), 3.0);
        assert_eq!(upper_median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(upper_median(&[]).is_nan());
        assert_eq!(ratio(300.0, 100.0, 1), "3.0x");
        assert_eq!(ratio(1.0, 3.0, 2), "0.33x");
        assert_eq!(ratio(f64::NAN, 100.0, 1), "-");
        assert_eq!(ratio(1.0, 0.0, 2), "-");
        assert_eq!(ms(1.24), "1.2 ms");
        assert_eq!(ms(f64::NAN), "-");
        assert_eq!(millis(Duration::from_millis(1500)), 1500.0);
    }

    #[test]
    fn counts_and_values_of_options() {
        let mut args = ["3".to_owned()].into_iter();
        assert_eq!(next_value(&mut args, "--runs", "a number").unwrap(), "3");
        let err = next_value(&mut args, "--runs", "a number").unwrap_err();
        assert_eq!(err.to_string(), "--runs needs a number");
        assert_eq!(count("--runs", "7").unwrap(), 7);
        let err = count("--runs", "-1").unwrap_err();
        assert_eq!(err.to_string(), "--runs \"-1\" is not a number");
    }
}
