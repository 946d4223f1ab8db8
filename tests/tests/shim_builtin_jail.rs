//! The shim's `builtin` backend for real: the plan the shim makes for a pod,
//! run by the shim's own supervisor, starts virtiofsd and then microvm-vmm
//! in its jail, under the pod's host cgroup, with the jail's limits, in the
//! pod's netns on a tap the shim made for the jail's ids. A Linux
//! guest cannot boot under KVM on a PVM host, so the probe guest stands in
//! for the guest kernel (`probe.idle=1` on the shim's command line);
//! everything on the host side is what a pod gets. Then the pod is stopped the way the shim stops a pod
//! whose agent does not answer, and nothing may be left.
//!
//! It runs twice: on this host (cgroup v1 here) and in the KVM harness's
//! L1 (cgroup v2, real KVM).
//!
//! Needs /dev/kvm and virtiofsd (scripts/install-deps.sh installs it).

use microvm_shim::network::{PodNetwork, TapOwner};
use microvm_shim::vm::cgroup::{PodCgroups, HELPERS, VMM};
use microvm_shim::vm::console::PodLog;
use microvm_shim::vm::layout::PodLayout;
use microvm_shim::vm::supervisor::PodVm;
use microvm_shim::vm::{Backend, BuiltinBackend, Jail, PodVmSpec, VmNic};
use microvm_tests::agent_qemu::find_tool;
use microvm_tests::harness::{binary, wait_for_text, TempDir};
use microvm_tests::kvm::Suite;
use microvm_tests::probe::probe_guest_elf;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `nobody` on Debian.
const JAIL_ID: u32 = 65534;

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The jail supervisor's only child: the VMM itself.
fn jailed_child(supervisor: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().expect("a pid");
        }
        assert!(
            Instant::now() < deadline,
            "the jail supervisor {supervisor} has no child"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pod cgroup goes even when an assertion fails.
struct RemovedOnDrop(PodCgroups);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        self.0.remove();
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pod's host cgroup in the pids hierarchy (v1 here, v2 elsewhere).
fn pids_cgroup(relative: &str) -> PathBuf {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Path::new("/sys/fs/cgroup").join(relative)
    } else {
        Path::new("/sys/fs/cgroup/pids").join(relative)
    }
}

fn main() {
    let mut suite = Suite::new("shim_builtin_jail", Duration::from_secs(600));
    let name = "shim_starts_the_jailed_vmm_under_the_pod_cgroup_and_stops_it_without_leftovers";
    suite.host(libtest_mimic::Trial::test(format!("host::{name}"), || {
        jailed_vmm_under_the_pod_cgroup();
        Ok(())
    }));
    suite.kvm(format!("kvm::{name}"), || {
        jailed_vmm_under_the_pod_cgroup();
        Ok(())
    });
    suite.run()
}

fn jailed_vmm_under_the_pod_cgroup() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test runs the probe guest under KVM"
    );
    let virtiofsd = find_tool("virtiofsd").expect(
        "virtiofsd not found: scripts/install-deps.sh installs it (cargo install virtiofsd)",
    );
    let dir = TempDir::new("shim-jail");
    let layout = PodLayout::new(&dir.join("state"), &dir.join("logs"), "ns", "pod1");
    std::fs::create_dir_all(layout.shared_dir()).unwrap();
    let initramfs = dir.join("empty.cpio");
    std::fs::write(&initramfs, b"").unwrap();
    // A CNI-like pod netns: one veth with an address. The shim makes the
    // tap there, owned by the jail's ids (so no other unprivileged process
    // may attach to it), and the VMM starts in it.
    let netns = PodNetns::new();
    let network = PodNetwork::attach_owned_by(
        &netns.path(),
        "tap0",
        TapOwner {
            uid: Some(JAIL_ID),
            gid: Some(JAIL_ID),
        },
    )
    .unwrap();
    let tap_details = netns.ip(&["-d", "link", "show", "tap0"]);
    assert!(
        tap_details.contains("user nobody group nogroup")
            || tap_details.contains(&format!("user {JAIL_ID} group {JAIL_ID}")),
        "{tap_details}"
    );
    let cgroup_path = format!("/mvt-pods-{}/pod1", std::process::id());
    let cgroup = RemovedOnDrop(PodCgroups::create(Some(&cgroup_path), "ns", "pod1").unwrap());

    let spec = PodVmSpec {
        layout: layout.clone(),
        kernel: probe_guest_elf().unwrap(),
        initramfs,
        kernel_args: "probe.idle=1".into(),
        vcpus: 1,
        memory_mib: 64,
        debug_console: false,
        virtiofsd: virtiofsd.clone(),
        nic: Some(VmNic {
            netns: network.netns.clone(),
            tap: network.tap.clone(),
            mac: network.interface.mac.clone(),
        }),
        host_cgroup: Some(cgroup.0.pod_relative().to_path_buf()),
    };
    let backend = BuiltinBackend {
        vmm: binary("microvm-vmm"),
        jail: Some(Jail {
            uid: Some(JAIL_ID),
            gid: Some(JAIL_ID),
        }),
    };
    // A worker thread of its own: the pod log's relay tasks must keep
    // running while this thread blocks between `block_on`s.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut vm = runtime
        .block_on(PodVm::launch(
            backend.plan(&spec),
            &layout,
            Duration::from_secs(20),
            Some(&cgroup.0),
            PodLog::open(&layout.log_file, 1 << 20).unwrap(),
        ))
        .unwrap_or_else(|err| {
            panic!(
                "launch: {err}\nconsole:\n{}",
                std::fs::read_to_string(&layout.log_file).unwrap_or_default()
            )
        });
    let pids = vm.pids();
    let pid_of = |name: &str| {
        pids.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, pid)| *pid)
            .unwrap_or_else(|| panic!("no {name} in {pids:?}"))
    };
    let (supervisor, virtiofsd_pid) = (pid_of("vmm"), pid_of("virtiofsd"));
    let vmm = jailed_child(supervisor);
    // The unprivileged VMM holds the tap.
    assert!(
        std::fs::read_dir(format!("/proc/{vmm}/fd"))
            .unwrap()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path())
                .is_ok_and(|target| target == Path::new("/dev/net/tun"))),
        "the jailed VMM has no tap open"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{vmm}/ns/net")).unwrap(),
        netns_inode(&netns.path()),
        "the VMM is not in the pod netns"
    );

    // The guest runs: the probe got through its vsock and idles.
    assert!(
        wait_for_text(&layout.log_file, "probe: idle", Duration::from_secs(30)),
        "console:\n{}",
        std::fs::read_to_string(&layout.log_file).unwrap_or_default()
    );

    // The jail the shim asked for: root is <pod dir>/vmm, own mount and
    // PID namespaces, the configured uid/gid, seccomp, empty environment.
    let jail_root = layout.jail_root();
    let root = std::fs::metadata(format!("/proc/{vmm}/root/.")).unwrap();
    let expected_root = std::fs::metadata(&jail_root).unwrap();
    assert_eq!(
        (root.dev(), root.ino()),
        (expected_root.dev(), expected_root.ino()),
        "the VMM's root is not {}",
        jail_root.display()
    );
    for kind in ["mnt", "pid"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{vmm}/ns/{kind}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap(),
            "{kind} namespace"
        );
    }
    let ids = format!("{JAIL_ID}\t{JAIL_ID}\t{JAIL_ID}\t{JAIL_ID}");
    assert_eq!(status_field(vmm, "Uid:"), ids);
    assert_eq!(status_field(vmm, "Gid:"), ids);
    assert_eq!(status_field(vmm, "Seccomp:"), "2");
    assert!(std::fs::read(format!("/proc/{vmm}/environ"))
        .unwrap()
        .is_empty());

    // Host cgroups: virtiofsd and the jail supervisor in the pod's helpers
    // leaf, the VMM in the jail's cgroup, the pod's vmm leaf.
    let pod_cgroup = pids_cgroup(cgroup_path.trim_start_matches('/'));
    let members = |cgroup: &Path| std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    for (pid, leaf) in [(virtiofsd_pid, HELPERS), (supervisor, HELPERS), (vmm, VMM)] {
        assert!(
            members(&pod_cgroup.join(leaf))
                .lines()
                .any(|member| member == pid.to_string()),
            "{pid} is not in {}/{leaf}",
            pod_cgroup.display()
        );
    }
    assert!(
        members(&pod_cgroup).trim().is_empty(),
        "processes in the pod cgroup itself"
    );

    // The jail's default limit on the VMM's threads (64 + vCPUs).
    let pids_max = std::fs::read_to_string(pod_cgroup.join(VMM).join("pids.max")).unwrap();
    assert_eq!(pids_max.trim(), "65", "pids.max of the VMM's cgroup");

    // The shim's side of hybrid vsock: its socket in the pod dir reaches the
    // VMM's muxer, which answers a CONNECT to a port nobody serves by
    // closing the connection, never with an OK.
    let mut stream = UnixStream::connect(layout.agent_socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"CONNECT 1024\n").unwrap();
    let mut reply = String::new();
    let _ = BufReader::new(&stream).read_line(&mut reply);
    assert!(!reply.starts_with("OK"), "{reply:?}");
    drop(stream);

    // The stop the shim falls back to when the agent cannot power the VM
    // off: nothing of the pod may survive it.
    runtime.block_on(vm.shutdown());
    for (name, pid) in [
        ("jail supervisor", supervisor),
        ("jailed VMM", vmm),
        ("virtiofsd", virtiofsd_pid),
    ] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "{name} (pid {pid}) survived the shutdown");
    }
    assert!(!jail_root.exists(), "{} left behind", jail_root.display());
    assert!(
        members(&pod_cgroup.join(VMM)).trim().is_empty(),
        "processes left in the VMM's cgroup"
    );
    cgroup.0.remove();
    assert!(!pod_cgroup.exists(), "{} left behind", pod_cgroup.display());
    assert!(!layout.agent_socket().exists());
    network.detach().unwrap();
}

/// `net:[inode]` of a netns bind mount, as /proc/<pid>/ns/net reads.
fn netns_inode(path: &Path) -> PathBuf {
    PathBuf::from(format!("net:[{}]", std::fs::metadata(path).unwrap().ino()))
}

/// A named netns with one addressed veth (its peer beside it, unaddressed),
/// deleted on drop.
struct PodNetns(String);

impl PodNetns {
    fn new() -> Self {
        let netns = Self(format!("mvt-bj-{}", std::process::id()));
        // A leftover of a killed run.
        let _ = Command::new("ip")
            .args(["netns", "del", &netns.0])
            .stderr(std::process::Stdio::null())
            .status();
        run("ip", &["netns", "add", &netns.0]);
        netns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        netns.ip(&["addr", "add", "10.99.7.2/24", "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
