//! Test binaries with cases that need a real KVM (a Linux guest under
//! `microvm-vmm`, QEMU with `accel = "kvm"`, cgroup v2). [`Suite`] runs
//! them where KVM can boot Linux: here when this host can, else all of
//! them together in one nested run of this same binary under
//! `microvm-kvm-harness` (one L1 boot per binary, not per case). Each case
//! is still reported on its own, passed or failed, never ignored.
//!
//! The nested run selects its cases through [`TRIALS_ENV`] and prints one
//! [`RESULT_MARKER`] line per case, which the outer run reads back.

use crate::containerd::{test_guest_image, TEST_INITRAMFS_ENV, TEST_KERNEL_ENV};
use crate::harness::binary;
use libtest_mimic::{Arguments, Failed, Trial};
use microvm_kvm_harness::protocol::NESTED_ENV;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The cases a nested run is to run, one name per line.
pub const TRIALS_ENV: &str = "MICROVM_KVM_TRIALS";
/// Starts the line a nested case prints with its outcome (JSON follows).
pub const RESULT_MARKER: &str = "@@microvm-kvm-result ";

type Body = Box<dyn FnOnce() -> Result<(), Failed> + Send>;
/// An environment variable and how the host resolves its path.
type Forwarded = (&'static str, fn() -> PathBuf);

/// Where this process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// KVM here boots Linux: every case runs here.
    RealKvm,
    /// This is the nested run: only the listed KVM cases run.
    Nested,
    /// KVM cases go to one nested run.
    Host,
}

fn place() -> Place {
    if std::env::var_os(TRIALS_ENV).is_some() {
        Place::Nested
    } else if microvm_kvm_harness::host::detect().boots_linux() {
        Place::RealKvm
    } else {
        Place::Host
    }
}

/// One test binary's cases: `host` ones run on this host as they are,
/// `kvm` ones under real KVM.
pub struct Suite {
    name: &'static str,
    host: Vec<Trial>,
    kvm: Vec<(String, Body)>,
    /// The whole nested run's bound.
    timeout: Duration,
    memory_mib: u32,
    /// Paths the host resolves once for the nested run, as `key=path`.
    forwarded: Vec<Forwarded>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Outcome {
    name: String,
    passed: bool,
    message: String,
    /// The case's time in L1, for CI's log.
    #[serde(default)]
    seconds: u64,
}

/// What the one nested run gave: each case's outcome, and what to say
/// about a case it never reported.
struct NestedRun {
    outcomes: HashMap<String, Outcome>,
    summary: String,
    /// L1's own kernel wedged (the harness's exit status says so).
    wedged: bool,
}

impl Suite {
    /// `timeout` bounds the nested run of all KVM cases together.
    pub fn new(name: &'static str, timeout: Duration) -> Self {
        Self {
            name,
            host: Vec::new(),
            kvm: Vec::new(),
            timeout,
            memory_mib: 4096,
            forwarded: Vec::new(),
        }
    }

    /// Resolves `key` on the host for the nested run (a build the host
    /// has cached costs minutes under emulation). The guest image is
    /// always forwarded.
    pub fn forward_env(mut self, key: &'static str, resolve: fn() -> PathBuf) -> Self {
        self.forwarded.push((key, resolve));
        self
    }

    /// L1's memory for the nested run (the default is 4 GiB).
    pub fn memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// A case for this host (not run in the nested run).
    pub fn host(&mut self, trial: Trial) {
        self.host.push(trial);
    }

    /// A case that needs real KVM.
    pub fn kvm(
        &mut self,
        name: impl Into<String>,
        body: impl FnOnce() -> Result<(), Failed> + Send + 'static,
    ) {
        self.kvm.push((name.into(), Box::new(body)));
    }

    /// Runs the cases libtest's arguments select and exits.
    pub fn run(self) -> ! {
        let args = Arguments::from_args();
        let trials = match place() {
            Place::RealKvm => self.trials_here(),
            Place::Nested => self.trials_nested(),
            Place::Host => self.trials_with_proxies(&args),
        };
        libtest_mimic::run(&args, trials).exit()
    }

    fn trials_here(self) -> Vec<Trial> {
        let mut trials = self.host;
        trials.extend(
            self.kvm
                .into_iter()
                .map(|(name, body)| Trial::test(name, body)),
        );
        trials
    }

    /// In L1: the listed KVM cases, each printing its outcome marker.
    fn trials_nested(self) -> Vec<Trial> {
        let wanted: Vec<String> = std::env::var(TRIALS_ENV)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        self.kvm
            .into_iter()
            .filter(|(name, _)| wanted.contains(name))
            .map(|(name, body)| {
                let marker_name = name.clone();
                Trial::test(name, move || {
                    let started = std::time::Instant::now();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
                        .unwrap_or_else(|panic| Err(panic_message(&panic).into()));
                    let outcome = Outcome {
                        name: marker_name,
                        passed: result.is_ok(),
                        message: result
                            .as_ref()
                            .err()
                            .and_then(Failed::message)
                            .unwrap_or_default()
                            .to_owned(),
                        seconds: started.elapsed().as_secs(),
                    };
                    let line = serde_json::to_string(&outcome).unwrap_or_default();
                    println!("{RESULT_MARKER}{line}");
                    result
                })
            })
            .collect()
    }

    /// On a host without real KVM: the host cases, plus one stand-in per
    /// KVM case that takes its outcome from the shared nested run.
    fn trials_with_proxies(self, args: &Arguments) -> Vec<Trial> {
        let selected: Vec<String> = self
            .kvm
            .iter()
            .map(|(name, _)| name.clone())
            .filter(|name| is_selected(args, name))
            .collect();
        let shared: Arc<OnceLock<NestedRun>> = Arc::new(OnceLock::new());
        let mut trials = self.host;
        let (name, timeout, memory) = (self.name, self.timeout, self.memory_mib);
        let forwarded = self.forwarded;
        for (case, _) in self.kvm {
            let shared = shared.clone();
            let selected = selected.clone();
            let forwarded = forwarded.clone();
            trials.push(Trial::test(case.clone(), move || {
                let run =
                    shared.get_or_init(|| nested_run(name, &selected, timeout, memory, &forwarded));
                match run.outcomes.get(&case) {
                    Some(outcome) if outcome.passed => Ok(()),
                    Some(outcome) => Err(format!("in L1: {}", outcome.message).into()),
                    None => {
                        Err(format!("the nested run did not report {case}: {}", run.summary).into())
                    }
                }
            }));
        }
        trials
    }
}

/// libtest's selection: the filter (substring, or whole name with
/// `--exact`) and `--skip`.
fn is_selected(args: &Arguments, name: &str) -> bool {
    let matches = |filter: &str| {
        if args.exact {
            name == filter
        } else {
            name.contains(filter)
        }
    };
    args.filter.as_deref().is_none_or(matches) && !args.skip.iter().any(|skip| matches(skip))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".into())
}

/// Runs `cases` of this binary in one nested run. If L1's own kernel wedged
/// (a fault of nested KVM under TCG, seen once in CI, not of the cases),
/// the cases it had not finished run once more in a fresh L1; the cases it
/// did finish keep their outcome, failures included.
fn nested_run(
    suite: &'static str,
    cases: &[String],
    timeout: Duration,
    memory_mib: u32,
    forwarded: &[Forwarded],
) -> NestedRun {
    let mut run = nested_run_once(suite, cases, timeout, memory_mib, forwarded);
    let unfinished: Vec<String> = cases
        .iter()
        .filter(|case| !run.outcomes.contains_key(*case))
        .cloned()
        .collect();
    if run.wedged && !unfinished.is_empty() {
        eprintln!(
            "{suite}: L1's kernel wedged (above); the {} unfinished case(s) run once more in a fresh L1",
            unfinished.len()
        );
        let retry = nested_run_once(suite, &unfinished, timeout, memory_mib, forwarded);
        run.outcomes.extend(retry.outcomes);
        run.summary = format!(
            "first L1 wedged: {}\nthen, in a fresh L1: {}",
            run.summary, retry.summary
        );
        run.wedged = retry.wedged;
    }
    run
}

/// Runs `cases` of this binary in one L1, echoing its output to stderr as
/// it comes (prefixed `[L1]`).
fn nested_run_once(
    suite: &'static str,
    cases: &[String],
    timeout: Duration,
    memory_mib: u32,
    forwarded: &[Forwarded],
) -> NestedRun {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => return failed_run(format!("cannot find this test binary: {err}")),
    };
    eprintln!(
        "{suite}: running {} case(s) under real KVM in one nested-KVM L1",
        cases.len()
    );
    let mut command = Command::new(binary(microvm_kvm_harness::BINARY));
    // The guest image as the host resolves it: checking its inputs again
    // under emulation (a cargo build of the agent, the kernel script) would
    // cost a minute per run. A failure here is the cases' to report.
    if let Ok((kernel, initramfs)) = std::panic::catch_unwind(test_guest_image) {
        command
            .env(TEST_KERNEL_ENV, kernel)
            .env(TEST_INITRAMFS_ENV, initramfs);
    }
    for (key, resolve) in forwarded {
        if let Ok(path) = std::panic::catch_unwind(resolve) {
            command.env(key, path);
        }
    }
    command
        .args(["run", "--quiet", "--timeout"])
        .arg(timeout.as_secs().to_string())
        .arg("--memory-mib")
        .arg(memory_mib.to_string())
        .arg("--")
        .arg(&exe)
        // One case at a time in L1: its two vCPUs are emulated.
        .args(["--test-threads", "1"])
        .env(TRIALS_ENV, cases.join("\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = std::time::Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => return failed_run(format!("cannot start the KVM harness: {err}")),
    };
    let stderr = child.stderr.take().map(|pipe| echo(pipe, suite));
    let mut outcomes = HashMap::new();
    let mut tail = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints `test <name> ... ` before the case runs, so
            // the marker may follow it on the same line.
            if let Some((before, json)) = line.split_once(RESULT_MARKER) {
                if let Ok(outcome) = serde_json::from_str::<Outcome>(json) {
                    eprintln!(
                        "[L1 {suite}] {}: {} in {} s",
                        outcome.name,
                        if outcome.passed { "passed" } else { "FAILED" },
                        outcome.seconds
                    );
                    outcomes.insert(outcome.name.clone(), outcome);
                }
                if !before.trim().is_empty() {
                    eprintln!("[L1 {suite}] {before}");
                }
                continue;
            }
            eprintln!("[L1 {suite}] {line}");
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait();
    let stderr_tail = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    eprintln!(
        "{suite}: the nested run took {} s",
        started.elapsed().as_secs()
    );
    let wedged = matches!(&status, Ok(status)
        if status.code() == Some(microvm_kvm_harness::nested::WEDGED_EXIT_STATUS));
    NestedRun {
        outcomes,
        wedged,
        summary: format!(
            "harness exit {status:?}\nlast output:\n{}\nstderr:\n{stderr_tail}",
            tail.join("\n")
        ),
    }
}

/// Echoes a pipe to stderr; returns its last lines.
fn echo(pipe: impl Read + Send + 'static, suite: &str) -> std::thread::JoinHandle<String> {
    let suite = suite.to_owned();
    std::thread::spawn(move || {
        let mut last = Vec::new();
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            eprintln!("[L1 {suite}] {line}");
            last.push(line);
            if last.len() > 40 {
                last.remove(0);
            }
        }
        last.join("\n")
    })
}

fn failed_run(summary: String) -> NestedRun {
    NestedRun {
        outcomes: HashMap::new(),
        summary,
        wedged: false,
    }
}

/// Whether this process runs inside the harness's L1.
pub fn in_nested_kvm() -> bool {
    std::env::var(NESTED_ENV).is_ok_and(|value| value == "nested")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_libtest_filters() {
        let mut args = Arguments::from_iter(["test"]);
        assert!(is_selected(&args, "builtin::pod_runs"));
        args.filter = Some("builtin".into());
        assert!(is_selected(&args, "builtin::pod_runs"));
        assert!(!is_selected(&args, "qemu::pod_runs"));
        args.exact = true;
        assert!(!is_selected(&args, "builtin::pod_runs"));
        args.filter = Some("builtin::pod_runs".into());
        assert!(is_selected(&args, "builtin::pod_runs"));
        args.exact = false;
        args.filter = None;
        args.skip = vec!["pod".into()];
        assert!(!is_selected(&args, "builtin::pod_runs"));
    }
}
