//! The agent's command line.
//!
//! Hand-written rather than clap: the agent is PID 1 of every pod VM, and
//! clap's builder and parser ran at every boot for six flags, faulting in
//! scattered code pages and heap (perf showed clap_builder in three of the
//! idle agent's 64 KiB text windows) that stay resident for the VM's life.
//! The grammar is clap's for these flags: `--flag value` or `--flag=value`,
//! `--listen` repeatable, `--log` falling back to `$MICROVM_AGENT_LOG`.

use crate::server::Listen;
use std::path::PathBuf;

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Where to serve; empty means the PID 1 default, vsock:1024.
    pub listen: Vec<Listen>,
    /// The cgroup v2 directory containers' cgroups go under.
    pub cgroup_root: PathBuf,
    /// Where the agent keeps the sandbox's files (resolv.conf, hosts).
    pub run_dir: PathBuf,
    /// sysfs, where virtio-blk disks are looked up (tests use a fake tree).
    pub sysfs: PathBuf,
    /// Where device nodes are.
    pub dev_dir: PathBuf,
    /// Log filter (tracing `Targets` syntax).
    pub log: Option<String>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            run_dir: PathBuf::from("/run/microvm-agent"),
            sysfs: PathBuf::from("/sys"),
            dev_dir: PathBuf::from("/dev"),
            log: None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("unexpected argument {0:?}")]
    Unexpected(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("invalid value for --listen: {0}")]
    Listen(String),
}

pub const USAGE: &str = "\
PID 1 of a pod VM: OCI runtime behind a gRPC API

Usage: microvm-agent [OPTIONS]

Options:
      --listen <LISTEN>            Where to serve: unix:<path> or vsock:<port>; repeatable.
                                   As PID 1 the default is vsock:1024
      --cgroup-root <CGROUP_ROOT>  The cgroup v2 directory containers' cgroups go under
                                   [default: /sys/fs/cgroup]
      --run-dir <RUN_DIR>          Where the agent keeps the sandbox's files (resolv.conf,
                                   hosts) [default: /run/microvm-agent]
      --log <LOG>                  Log filter (tracing Targets syntax). As PID 1 the kernel
                                   command line word `microvm_agent_log=<filter>` sets it
                                   [env: MICROVM_AGENT_LOG=]
  -h, --help                       Print help
  -V, --version                    Print version
";

/// Parses the arguments after the program name. `env_log` is
/// `$MICROVM_AGENT_LOG`, used when `--log` is absent.
pub fn parse(args: &[String], env_log: Option<String>) -> Result<Command, CliError> {
    let mut parsed = Args::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| rest.next().cloned())
                .ok_or(CliError::MissingValue(name))
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" => {
                let text = value("--listen")?;
                parsed.listen.push(text.parse().map_err(CliError::Listen)?);
            }
            "--cgroup-root" => parsed.cgroup_root = value("--cgroup-root")?.into(),
            "--run-dir" => parsed.run_dir = value("--run-dir")?.into(),
            "--sysfs" => parsed.sysfs = value("--sysfs")?.into(),
            "--dev-dir" => parsed.dev_dir = value("--dev-dir")?.into(),
            "--log" => parsed.log = Some(value("--log")?),
            _ => return Err(CliError::Unexpected(arg.clone())),
        }
    }
    if parsed.log.is_none() {
        parsed.log = env_log;
    }
    Ok(Command::Run(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| arg.to_string()).collect()
    }

    fn run(list: &[&str], env_log: Option<&str>) -> Args {
        match parse(&args(list), env_log.map(str::to_owned)) {
            Ok(Command::Run(parsed)) => parsed,
            other => panic!("{list:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn no_arguments_give_the_pid1_defaults() {
        assert_eq!(run(&[], None), Args::default());
        assert_eq!(Args::default().cgroup_root, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn every_flag_takes_a_separate_or_inline_value() {
        let parsed = run(
            &[
                "--listen",
                "unix:/tmp/a.sock",
                "--listen=vsock:1024",
                "--cgroup-root",
                "/cg",
                "--run-dir=/run/x",
                "--sysfs",
                "/fake/sys",
                "--dev-dir=/fake/dev",
                "--log",
                "debug",
            ],
            Some("warn"),
        );
        assert_eq!(
            parsed.listen,
            vec![Listen::Unix("/tmp/a.sock".into()), Listen::Vsock(1024)]
        );
        assert_eq!(parsed.cgroup_root, PathBuf::from("/cg"));
        assert_eq!(parsed.run_dir, PathBuf::from("/run/x"));
        assert_eq!(parsed.sysfs, PathBuf::from("/fake/sys"));
        assert_eq!(parsed.dev_dir, PathBuf::from("/fake/dev"));
        // The flag wins over the environment.
        assert_eq!(parsed.log.as_deref(), Some("debug"));
    }

    #[test]
    fn the_environment_sets_the_log_filter_when_the_flag_is_absent() {
        assert_eq!(run(&[], Some("info")).log.as_deref(), Some("info"));
    }

    #[test]
    fn a_filter_with_equals_signs_survives_inline() {
        let parsed = run(&["--log=info,microvm_agent=debug"], None);
        assert_eq!(parsed.log.as_deref(), Some("info,microvm_agent=debug"));
    }

    #[test]
    fn help_and_version_win() {
        assert_eq!(parse(&args(&["--help"]), None), Ok(Command::Help));
        assert_eq!(parse(&args(&["-h", "--bogus"]), None), Ok(Command::Help));
        assert_eq!(parse(&args(&["-V"]), None), Ok(Command::Version));
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert_eq!(
            parse(&args(&["console=ttyS0"]), None),
            Err(CliError::Unexpected("console=ttyS0".into()))
        );
        assert_eq!(
            parse(&args(&["--run-dir"]), None),
            Err(CliError::MissingValue("--run-dir"))
        );
        assert!(matches!(
            parse(&args(&["--listen", "tcp:1"]), None),
            Err(CliError::Listen(_))
        ));
    }
}
