//! `microvm-ctl check`: can this node run microVM pods? One line per
//! requirement: ok, warn (pods run, but something is off) or fail (pods
//! cannot run), with what to do. Exit status 0 only without a fail.

use crate::{containerd_config, pods};
use microvm_shim::config::{Accel, BackendKind, Config};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per requirement, for tooling.
    #[arg(long)]
    json: bool,
    /// containerd's config.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// Where the CNI plugins are looked for (the first that exists).
    #[arg(long, default_values = ["/opt/cni/bin", "/usr/lib/cni"])]
    cni_bin_dir: Vec<PathBuf>,
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do; empty when ok.
    pub fix: String,
}

fn finding(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        name,
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// What kind of KVM this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kvm {
    None,
    /// kvm_pvm: paravirtualized, cannot boot a stock guest kernel.
    Pvm,
    /// VT-x/AMD-V under a hypervisor (nested).
    Nested,
    Real,
}

/// Classifies from the loaded modules and /proc/cpuinfo's flags.
pub fn classify_kvm(dev_kvm: bool, modules: &[&str], cpu_flags: &[&str]) -> Kvm {
    if !dev_kvm {
        return Kvm::None;
    }
    if modules.contains(&"kvm_pvm") {
        return Kvm::Pvm;
    }
    let hardware = cpu_flags.contains(&"vmx") || cpu_flags.contains(&"svm");
    let module = modules.contains(&"kvm_intel") || modules.contains(&"kvm_amd");
    match (hardware && module, cpu_flags.contains(&"hypervisor")) {
        (true, true) => Kvm::Nested,
        (true, false) => Kvm::Real,
        (false, _) => Kvm::None,
    }
}

fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("flags")
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, flags)| flags.to_owned())
        })
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn module_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

fn check_kvm(config: &Config) -> Finding {
    let modules: Vec<&str> = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .filter(|m| module_loaded(m))
        .collect();
    let flags = cpu_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let kvm = classify_kvm(Path::new("/dev/kvm").exists(), &modules, &flags);
    let tcg_fallback = config.backend == BackendKind::Qemu && config.qemu.accel == Accel::Tcg;
    let fallback = "set backend = \"qemu\" and [qemu] accel = \"tcg\" in the shim config (QEMU emulates the CPU: boots work, 10-50x slower)";
    match kvm {
        Kvm::Real => finding("kvm", Status::Ok, "/dev/kvm: real KVM (VT-x/AMD-V); boots a stock guest", ""),
        Kvm::Nested => finding("kvm", Status::Ok, "/dev/kvm: nested KVM (VT-x/AMD-V under a hypervisor); boots a stock guest", ""),
        Kvm::Pvm if tcg_fallback => finding("kvm", Status::Warn, "/dev/kvm is PVM (kvm_pvm): it cannot boot a stock guest kernel; the shim config uses QEMU with TCG, the fallback", "for speed, a node with real KVM"),
        Kvm::Pvm => finding("kvm", Status::Fail, format!("/dev/kvm is PVM (kvm_pvm): it cannot boot a stock guest kernel, so the {} backend cannot run pods", config.backend.name()), fallback),
        Kvm::None if tcg_fallback => finding("kvm", Status::Warn, "no usable /dev/kvm; the shim config uses QEMU with TCG", "load kvm_intel or kvm_amd for speed"),
        Kvm::None => finding("kvm", Status::Fail, "no usable /dev/kvm (no VT-x/AMD-V with kvm_intel or kvm_amd)", format!("enable virtualization and load kvm_intel/kvm_amd, or {fallback}")),
    }
}

fn check_host_devices() -> Vec<Finding> {
    let mut found = Vec::new();
    if Path::new("/dev/net/tun").exists() {
        found.push(finding(
            "tun",
            Status::Ok,
            "/dev/net/tun exists (pod network taps)",
            "",
        ));
    } else {
        found.push(finding(
            "tun",
            Status::Fail,
            "/dev/net/tun is missing: the pod's tap cannot be made",
            "modprobe tun",
        ));
    }
    // Both backends speak vsock over vhost-user/hybrid unix sockets: the
    // kernel's vhost modules help only other runtimes.
    for (module, device) in [
        ("vhost_vsock", "/dev/vhost-vsock"),
        ("vhost_net", "/dev/vhost-net"),
    ] {
        let loaded = module_loaded(module) || Path::new(device).exists();
        let state = if loaded {
            "loaded"
        } else {
            "not loaded; not needed (vsock is vhost-user or hybrid unix sockets, net is a tap)"
        };
        found.push(finding(
            "vhost",
            Status::Ok,
            format!("{module}: {state}"),
            "",
        ));
    }
    found
}

fn check_cgroups(containerd_text: Option<&str>) -> Finding {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let driver = containerd_text
        .map(containerd_config::runc_cgroup_driver)
        .unwrap_or("cgroupfs");
    let version = if v2 { "v2 (unified)" } else { "v1" };
    if driver == "systemd" {
        finding("cgroups", Status::Warn, format!("cgroup {version}; containerd's runc runtime uses the systemd driver"), "the microvm shim places VMs under cgroupfs paths only; with systemd paths a pod's VM stays in the shim's cgroup (set SystemdCgroup = false for the kubelet's cgroupfs driver)")
    } else {
        finding(
            "cgroups",
            Status::Ok,
            format!("cgroup {version}, driver {driver}"),
            "",
        )
    }
}

fn command_version(program: &Path, arg: &str) -> Option<String> {
    let output = std::process::Command::new(program).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines()
        .find(|line| !line.trim().is_empty())
        .map(|line| line.trim().to_owned())
}

fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// containerd 1.6/1.7 read config version 2.
pub fn containerd_supported(version_line: &str) -> Option<bool> {
    // "containerd containerd.io v1.7.13 ..." or Debian's "... 1.6.20~ds1 ...".
    let version = version_line
        .split_whitespace()
        .map(|word| word.strip_prefix('v').unwrap_or(word))
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()) && word.contains('.'))?;
    let mut parts = version.split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some(major == 1 && (6..=7).contains(&minor))
}

fn check_containerd(args: &Args, text: Option<&str>) -> Vec<Finding> {
    let mut found = Vec::new();
    match which(Path::new("containerd")).and_then(|path| command_version(&path, "--version")) {
        Some(line) => {
            let status = match containerd_supported(&line) {
                Some(true) => Status::Ok,
                _ => Status::Warn,
            };
            found.push(finding(
                "containerd",
                status,
                line,
                if status == Status::Ok {
                    ""
                } else {
                    "tested with containerd 1.6/1.7 (config version 2)"
                },
            ));
        }
        None => found.push(finding(
            "containerd",
            Status::Fail,
            "containerd is not in PATH",
            "apt-get install containerd",
        )),
    }
    match text.map(containerd_config::registered) {
        Some(Some(runtime_type)) if runtime_type == containerd_config::RUNTIME_TYPE => {
            found.push(finding(
                "runtime",
                Status::Ok,
                format!(
                    "runtime `microvm` ({runtime_type}) registered in {}",
                    args.containerd_config.display()
                ),
                "",
            ))
        }
        Some(Some(other)) => found.push(finding(
            "runtime",
            Status::Fail,
            format!(
                "runtime `microvm` in {} has runtime_type {other}",
                args.containerd_config.display()
            ),
            "microvm-ctl install",
        )),
        _ => found.push(finding(
            "runtime",
            Status::Fail,
            format!(
                "runtime `microvm` is not registered in {}",
                args.containerd_config.display()
            ),
            "microvm-ctl install, then restart containerd",
        )),
    }
    match which(Path::new("containerd-shim-microvm-v2")) {
        Some(path) => found.push(finding(
            "shim",
            Status::Ok,
            format!(
                "{} ({})",
                path.display(),
                command_version(&path, "-v")
                    .map(|_| ())
                    .map_or("no version", |()| "answers -v")
            ),
            "",
        )),
        None => found.push(finding(
            "shim",
            Status::Fail,
            "containerd-shim-microvm-v2 is not in PATH",
            "microvm-ctl install",
        )),
    }
    found
}

fn check_cni(args: &Args) -> Finding {
    let bin = args.cni_bin_dir.iter().find(|dir| dir.is_dir());
    let missing: Vec<&str> = match bin {
        Some(dir) => ["bridge", "host-local", "loopback"]
            .into_iter()
            .filter(|plugin| !dir.join(plugin).is_file())
            .collect(),
        None => vec!["bridge", "host-local", "loopback"],
    };
    let configs = std::fs::read_dir(&args.cni_conf_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| {
                    entry.file_name().to_string_lossy().ends_with("conf")
                        || entry.file_name().to_string_lossy().ends_with("conflist")
                })
                .count()
        })
        .unwrap_or(0);
    if missing.is_empty() && configs > 0 {
        finding(
            "cni",
            Status::Ok,
            format!(
                "plugins in {}; {configs} config(s) in {}",
                bin.map_or(String::new(), |dir| dir.display().to_string()),
                args.cni_conf_dir.display()
            ),
            "",
        )
    } else {
        finding("cni", Status::Warn, format!("CNI plugins missing: {missing:?}; configs in {}: {configs}", args.cni_conf_dir.display()), "CRI pods need a CNI network: apt-get install containernetworking-plugins and add a conflist (ctr pods run without)")
    }
}

fn check_helpers(config: &Config) -> Vec<Finding> {
    let mut tools = vec![(
        "virtiofsd",
        config.paths.virtiofsd.clone(),
        "paths.virtiofsd",
        "apt-get install virtiofsd",
    )];
    match config.backend {
        BackendKind::Builtin => tools.push((
            "microvm-vmm",
            config.builtin.vmm.clone(),
            "builtin.vmm",
            "microvm-ctl install",
        )),
        BackendKind::Qemu => {
            tools.push((
                "qemu",
                config.qemu.binary.clone(),
                "qemu.binary",
                "apt-get install qemu-system-x86",
            ));
            tools.push((
                "vhost-device-vsock",
                config.qemu.vhost_device_vsock.clone(),
                "qemu.vhost_device_vsock",
                "install vhost-device-vsock (rust-vmm vhost-device)",
            ));
        }
    }
    tools
        .into_iter()
        .map(|(name, path, key, fix)| match which(&path) {
            Some(found) => finding(
                "helper",
                Status::Ok,
                format!(
                    "{name}: {} ({})",
                    found.display(),
                    command_version(&found, "--version")
                        .unwrap_or_else(|| "version unknown".into())
                ),
                "",
            ),
            None => finding(
                "helper",
                Status::Fail,
                format!("{name}: {} not found ({key})", path.display()),
                format!("{fix}, or point {key} at it"),
            ),
        })
        .collect()
}

fn check_guest_image(config: &Config) -> Finding {
    match microvm_shim::vm::guest_image(config) {
        Ok((kernel, initramfs)) => finding(
            "guest-image",
            Status::Ok,
            format!(
                "kernel {}, initramfs {}",
                kernel.display(),
                initramfs.display()
            ),
            "",
        ),
        Err(err) => finding(
            "guest-image",
            Status::Fail,
            microvm_shim::pod::error_chain(&err),
            "microvm-ctl install (or `microvm-image all`), or set vm.kernel and vm.initramfs",
        ),
    }
}

/// Run as `microvm-ctl __probe-pivot-root` in a child: a new mount
/// namespace, a tmpfs, pivot_root into it. Exit 0 when it worked.
pub fn probe_pivot_root() -> ExitCode {
    use nix::mount::{mount, MsFlags};
    let attempt = || -> nix::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )?;
        let dir = std::env::temp_dir().join(format!("microvm-ctl-pivot-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )?;
        std::fs::create_dir(dir.join("old")).map_err(|_| nix::Error::EIO)?;
        let pivoted = nix::unistd::pivot_root(&dir, &dir.join("old"));
        // The namespace dies with this process; the dir is removed by the parent.
        pivoted
    };
    match attempt() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

fn check_jail() -> Vec<Finding> {
    let mut found = Vec::new();
    let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    match max_userns {
        Some(0) => found.push(finding(
            "jail",
            Status::Fail,
            "user namespaces are disabled (user.max_user_namespaces = 0)",
            "sysctl -w user.max_user_namespaces=15000",
        )),
        _ if Path::new("/proc/self/ns/user").exists()
            && Path::new("/proc/self/ns/mnt").exists() =>
        {
            found.push(finding(
                "jail",
                Status::Ok,
                "user and mount namespaces available",
                "",
            ))
        }
        _ => found.push(finding(
            "jail",
            Status::Fail,
            "the kernel lacks user or mount namespaces",
            "a kernel with CONFIG_USER_NS and CONFIG_NAMESPACES",
        )),
    }
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|line| line.starts_with("Seccomp:"));
    if seccomp && Path::new("/proc/sys/kernel/seccomp/actions_avail").exists() {
        found.push(finding("jail", Status::Ok, "seccomp filters available", ""));
    } else {
        found.push(finding(
            "jail",
            Status::Fail,
            "seccomp filters are not available",
            "a kernel with CONFIG_SECCOMP_FILTER",
        ));
    }
    let probe = std::env::current_exe().ok().and_then(|exe| {
        std::process::Command::new(exe)
            .arg("__probe-pivot-root")
            .output()
            .ok()
    });
    let dir = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("microvm-ctl-pivot-")
            {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    match probe {
        Some(output) if output.status.success() => found.push(finding(
            "jail",
            Status::Ok,
            "pivot_root into a new mount namespace works",
            "",
        )),
        Some(output) => found.push(finding(
            "jail",
            Status::Fail,
            format!(
                "pivot_root failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            "run as root on a kernel with mount namespaces",
        )),
        None => found.push(finding(
            "jail",
            Status::Warn,
            "could not run the pivot_root probe",
            "",
        )),
    }
    found
}

fn check_memory(config: &Config) -> Finding {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let available_mib = available_kib / 1024;
    // A pod costs its guest memory plus the VMM's and helpers' overhead.
    let per_pod = u64::from(config.vm.memory_mib) + 64;
    let pods = available_mib / per_pod.max(1);
    if pods == 0 {
        finding("memory", Status::Fail, format!("{available_mib} MiB available; one pod needs about {per_pod} MiB (vm.memory_mib {} + overhead)", config.vm.memory_mib), "free memory or lower vm.memory_mib")
    } else {
        finding(
            "memory",
            if pods < 2 { Status::Warn } else { Status::Ok },
            format!(
                "{available_mib} MiB available: room for about {pods} pods of vm.memory_mib {}",
                config.vm.memory_mib
            ),
            if pods < 2 {
                "free memory or lower vm.memory_mib"
            } else {
                ""
            },
        )
    }
}

pub fn findings(config: &Config, args: &Args) -> Vec<Finding> {
    let containerd_text = std::fs::read_to_string(&args.containerd_config).ok();
    let mut all = vec![check_kvm(config)];
    all.extend(check_host_devices());
    all.push(check_cgroups(containerd_text.as_deref()));
    all.extend(check_containerd(args, containerd_text.as_deref()));
    all.push(check_cni(args));
    all.extend(check_helpers(config));
    all.push(check_guest_image(config));
    all.extend(check_jail());
    all.push(check_memory(config));
    all
}

pub fn run(config_path: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let config = pods::load_config(config_path)?;
    let all = findings(&config, args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for item in &all {
            let status = match item.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let fix = if item.fix.is_empty() {
                String::new()
            } else {
                format!(" -> {}", item.fix)
            };
            println!("{status} {:<12} {}{fix}", item.name, item.detail);
        }
    }
    let failed = all
        .iter()
        .filter(|item| item.status == Status::Fail)
        .count();
    if !args.json {
        println!(
            "{}",
            if failed == 0 {
                "pods can run on this node".to_owned()
            } else {
                format!("{failed} requirement(s) failed: pods cannot run until they are fixed")
            }
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_kinds_are_told_apart() {
        assert_eq!(classify_kvm(true, &["kvm_pvm"], &["svm"]), Kvm::Pvm);
        assert_eq!(
            classify_kvm(true, &["kvm_amd"], &["svm", "hypervisor"]),
            Kvm::Nested
        );
        assert_eq!(classify_kvm(true, &["kvm_intel"], &["vmx"]), Kvm::Real);
        assert_eq!(classify_kvm(false, &["kvm_intel"], &["vmx"]), Kvm::None);
        assert_eq!(classify_kvm(true, &[], &["vmx"]), Kvm::None);
    }

    #[test]
    fn containerd_versions_parse() {
        assert_eq!(
            containerd_supported(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1"
            ),
            Some(true)
        );
        assert_eq!(
            containerd_supported("containerd containerd.io v1.7.13 7c3aca7"),
            Some(true)
        );
        assert_eq!(containerd_supported("containerd v2.0.0 abc"), Some(false));
    }
}
