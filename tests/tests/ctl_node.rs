//! microvm-ctl on this node, without pods: `check` tells PVM from real KVM
//! (PVM here on the host, real KVM in the KVM harness's L1) and reports a
//! missing piece as a fail with its fix; `install --root`
//! then `uninstall` leaves the tree as it was and keeps containerd's other
//! runtimes; the shim answers `-v` and `--help`.

use microvm_tests::harness::{binary, TempDir};
use microvm_tests::kvm::Suite;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn main() {
    let mut suite = Suite::new("ctl_node", Duration::from_secs(600));
    let host = |name: &str, test: fn()| {
        libtest_mimic::Trial::test(format!("host::{name}"), move || {
            test();
            Ok(())
        })
    };
    suite.host(host(CHECK, || {
        check_reports_kvm_and_a_missing_piece_with_its_fix(false)
    }));
    suite.host(host(
        "install_into_a_root_then_uninstall_leaves_the_tree_as_it_was",
        install_into_a_root_then_uninstall_leaves_the_tree_as_it_was,
    ));
    suite.host(host(
        "the_shim_and_ctl_print_versions_and_help",
        the_shim_and_ctl_print_versions_and_help,
    ));
    suite.kvm(format!("kvm::{CHECK}"), || {
        check_reports_kvm_and_a_missing_piece_with_its_fix(true);
        Ok(())
    });
    suite.run()
}

const CHECK: &str = "check_reports_this_hosts_kvm_and_a_missing_piece_with_its_fix";

fn ctl(args: &[&str]) -> Output {
    Command::new(binary("microvm-ctl"))
        .args(args)
        .env_remove("MICROVM_SHIM_CONFIG")
        .output()
        .expect("run microvm-ctl")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn findings(output: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("{err}: {}", text(output)))
}

fn kvm_finding(findings: &[serde_json::Value]) -> &serde_json::Value {
    findings
        .iter()
        .find(|finding| finding["name"] == "kvm")
        .expect("a kvm finding")
}

/// `in_l1`: run in the KVM harness, where /dev/kvm must be real KVM.
fn check_reports_kvm_and_a_missing_piece_with_its_fix(in_l1: bool) {
    let work = TempDir::new("ctl-check");
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if in_l1 {
        assert!(
            !pvm && Path::new("/dev/kvm").exists(),
            "the KVM harness gave no real /dev/kvm"
        );
    }
    let builtin = work.join("builtin.toml");
    std::fs::write(&builtin, "backend = \"builtin\"\n").unwrap();
    let output = ctl(&["--config", builtin.to_str().unwrap(), "check", "--json"]);
    let all = findings(&output);
    let kvm = kvm_finding(&all);
    eprintln!("kvm: {kvm}");
    if pvm {
        assert_eq!(kvm["status"], "fail", "{kvm}");
        assert!(kvm["detail"].as_str().unwrap().contains("PVM"), "{kvm}");
        assert!(kvm["fix"].as_str().unwrap().contains("tcg"), "{kvm}");
        assert!(
            !output.status.success(),
            "a failed requirement exits non-zero"
        );
    } else if Path::new("/dev/kvm").exists() {
        // The KVM harness's L1 (or a real node): real or nested KVM.
        assert_eq!(kvm["status"], "ok", "{kvm}");
        assert!(
            kvm["detail"].as_str().unwrap().contains("KVM (VT-x/AMD-V"),
            "{kvm}"
        );
    }

    // The qemu/TCG fallback turns PVM into a warning, and a virtiofsd that
    // is not there into a fail that says what to do.
    let qemu = work.join("qemu.toml");
    std::fs::write(
        &qemu,
        "backend = \"qemu\"\n[paths]\nvirtiofsd = \"/nonexistent/virtiofsd\"\n[qemu]\naccel = \"tcg\"\n",
    )
    .unwrap();
    let output = ctl(&["--config", qemu.to_str().unwrap(), "check", "--json"]);
    let all = findings(&output);
    if pvm {
        assert_eq!(kvm_finding(&all)["status"], "warn");
    }
    let virtiofsd = all
        .iter()
        .find(|finding| {
            finding["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("virtiofsd")
        })
        .expect("a virtiofsd finding");
    assert_eq!(virtiofsd["status"], "fail", "{virtiofsd}");
    assert!(virtiofsd["detail"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/virtiofsd"));
    assert!(
        virtiofsd["fix"]
            .as_str()
            .unwrap()
            .contains("paths.virtiofsd"),
        "{virtiofsd}"
    );
    assert!(!output.status.success());
    // The human form: one line per requirement, the fix after an arrow.
    let human = text(&ctl(&["--config", qemu.to_str().unwrap(), "check"]));
    assert!(
        human
            .lines()
            .any(|line| line.starts_with("FAIL helper") && line.contains("->")),
        "{human}"
    );
    assert!(human.contains("requirement(s) failed"), "{human}");
}

/// Every path under `root` with its kind, mode and contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut all = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                all.insert(relative, ("dir".into(), mode, Vec::new()));
                pending.push(path);
            } else {
                all.insert(
                    relative,
                    ("file".into(), mode, std::fs::read(&path).unwrap()),
                );
            }
        }
    }
    all
}

const CONTAINERD_CONFIG: &str = r#"# the node's own config
version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#;

fn install_into_a_root_then_uninstall_leaves_the_tree_as_it_was() {
    let work = TempDir::new("ctl-install");
    let root = work.join("root");
    std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::write(root.join("etc/containerd/config.toml"), CONTAINERD_CONFIG).unwrap();
    std::fs::write(root.join("usr/local/bin/other-tool"), "keep me").unwrap();
    let kernel = work.join("vmlinux");
    let initramfs = work.join("initramfs.cpio");
    std::fs::write(&kernel, "kernel").unwrap();
    std::fs::write(&initramfs, "initramfs").unwrap();
    let bin_dir = binary("microvm-ctl").parent().unwrap().to_path_buf();
    let before = snapshot(&root);

    let install = |extra: &[&str]| {
        let mut args = vec![
            "install",
            "--root",
            root.to_str().unwrap(),
            "--from",
            bin_dir.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ctl(&args)
    };
    let output = install(&[]);
    assert!(output.status.success(), "{}", text(&output));
    let said = text(&output);
    assert!(said.contains("containerd must be restarted"), "{said}");
    for path in [
        "usr/local/bin/containerd-shim-microvm-v2",
        "usr/local/bin/microvm-vmm",
        "usr/local/bin/microvm-ctl",
        "usr/local/share/microvm/vmlinux",
        "usr/local/share/microvm/initramfs.cpio",
        "etc/microvm/config.toml",
        "etc/containerd/config.toml.microvm-backup",
    ] {
        assert!(root.join(path).is_file(), "{path} missing after install");
    }
    let merged = std::fs::read_to_string(root.join("etc/containerd/config.toml")).unwrap();
    assert!(merged.starts_with("# the node's own config\n"), "{merged}");
    let parsed: toml::Value = toml::from_str(&merged).unwrap();
    let runtimes = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(
        runtimes["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    assert_eq!(
        runtimes["microvm"]["runtime_type"].as_str(),
        Some("io.containerd.microvm.v2")
    );
    // The written shim config is one the shim accepts.
    let shim_config = root.join("etc/microvm/config.toml");
    microvm_shim::config::Config::load(Some(&shim_config)).unwrap();
    // A second install is refused while the first is recorded.
    let again = install(&[]);
    assert!(!again.status.success());
    assert!(text(&again).contains("uninstall"), "{}", text(&again));

    let output = ctl(&["uninstall", "--root", root.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        snapshot(&root),
        before,
        "uninstall must restore the tree exactly"
    );

    // An edited shim config is kept, and install shows how the default
    // differs.
    std::fs::create_dir_all(root.join("etc/microvm")).unwrap();
    std::fs::write(&shim_config, "backend = \"qemu\"\n").unwrap();
    let before = snapshot(&root);
    let output = install(&[]);
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("not overwritten"), "{said}");
    assert!(
        said.contains("-backend = \"qemu\"") && said.contains("+backend = \"builtin\""),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&shim_config).unwrap(),
        "backend = \"qemu\"\n"
    );
    let output = ctl(&["uninstall", "--root", root.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(snapshot(&root), before);
}

fn the_shim_and_ctl_print_versions_and_help() {
    let shim = Command::new(binary("containerd-shim-microvm-v2"))
        .arg("-v")
        .output()
        .unwrap();
    assert!(shim.status.success(), "{}", text(&shim));
    let said = text(&shim);
    assert!(
        said.starts_with("containerd-shim-microvm-v2:\n  Version:  0."),
        "{said}"
    );
    let revision = said
        .lines()
        .find_map(|line| line.trim().strip_prefix("Revision:"))
        .map(str::trim)
        .unwrap_or_default();
    assert!(!revision.is_empty(), "{said}");
    let help = Command::new(binary("containerd-shim-microvm-v2"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        help.status.success() && text(&help).contains("--version"),
        "{}",
        text(&help)
    );
    for subcommand in [
        "check",
        "install",
        "uninstall",
        "ps",
        "logs",
        "console",
        "metrics",
    ] {
        let output = ctl(&[subcommand, "--help"]);
        assert!(output.status.success(), "{subcommand}: {}", text(&output));
        assert!(text(&output).contains("Usage: microvm-ctl"), "{subcommand}");
    }
    for (name, flag) in [
        ("microvm-vmm", "--version"),
        ("microvm-ctl", "--version"),
        ("microvm-agent", "--version"),
    ] {
        let output = Command::new(binary(name)).arg(flag).output().unwrap();
        assert!(output.status.success(), "{name}: {}", text(&output));
        assert!(text(&output).contains("0.1"), "{name}: {}", text(&output));
    }
    let unknown = ctl(&["logs", "no-such-pod", "--config", "/nonexistent.toml"]);
    assert!(!unknown.status.success());
    assert!(text(&unknown).contains("error"), "{}", text(&unknown));
}
