//! The pod VM. A [`Backend`] turns a [`PodVmSpec`] into the host processes
//! to run, in order (a pure function, unit-tested per backend); the
//! [`supervisor`] runs them, waits for each one's socket, records their pids
//! for the crash cleanup, watches them and reaps them. Both backends give
//! the shim the same agent channel: hybrid vsock on
//! [`layout::PodLayout::agent_socket`].

pub mod cgroup;
pub mod console;
pub mod layout;
pub mod supervisor;

use crate::config::{Accel, BackendKind, Config};
use layout::{PodLayout, SHARED_FS_TAG};
use microvm_proto::abi::{cmdline, image};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("guest kernel {0} is missing (set vm.kernel, or build the guest image with `microvm-image all`)")]
    MissingKernel(PathBuf),
    #[error("guest initramfs {0} is missing (set vm.initramfs, or build the guest image with `microvm-image all`)")]
    MissingInitramfs(PathBuf),
    #[error("no cached guest image under {0}: build it with `microvm-image all`, or set vm.kernel and vm.initramfs")]
    NoCachedImage(PathBuf),
}

/// What every backend needs to know about the VM to boot.
#[derive(Debug, Clone)]
pub struct PodVmSpec {
    pub layout: PodLayout,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The image's command line plus config extras, before the backend's
    /// own adjustments.
    pub kernel_args: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub debug_console: bool,
    pub virtiofsd: PathBuf,
    /// The pod's network: the VMM runs in this netns, on this tap.
    pub nic: Option<VmNic>,
    /// The pod's host cgroup below each hierarchy's root: the jailed VMM
    /// makes its own cgroup, [`cgroup::VMM`], in it.
    pub host_cgroup: Option<PathBuf>,
}

/// The VM's network interface: a tap in the pod's network namespace, with
/// the MAC of the pod's veth (so the guest answers for the pod's address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    pub netns: PathBuf,
    pub tap: String,
    pub mac: String,
}

/// One host process of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Short name: the pid file's name and the log prefix.
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The next process starts only once this socket exists.
    pub ready_socket: Option<PathBuf>,
    /// This process is the VM itself: its exit is the VM's exit.
    pub is_vmm: bool,
    /// Start it in this network namespace (the pod's, for the VMM).
    pub netns: Option<PathBuf>,
    /// The supervisor makes this empty, unwritable dir before the start:
    /// the process chroots into it.
    pub empty_root: Option<PathBuf>,
    /// `(uid, gid)`: before the start, the pod's socket dir and the sockets
    /// already in it go to this owner (a VMM that drops to it must create
    /// and connect to them).
    pub socket_owner: Option<(Option<u32>, Option<u32>)>,
    /// The pod cgroup leaf it starts in.
    pub cgroup: cgroup::Leaf,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The processes to run, in start order.
    fn plan(&self, spec: &PodVmSpec) -> Vec<ProcessSpec>;
}

pub fn backend_for(config: &Config) -> Box<dyn Backend> {
    match config.backend {
        BackendKind::Builtin => {
            let (uid, gid) = config.builtin.jail_ids();
            Box::new(BuiltinBackend {
                vmm: config.builtin.vmm.clone(),
                jail: config.builtin.jail.then_some(Jail { uid, gid }),
            })
        }
        BackendKind::Qemu => Box::new(QemuBackend {
            qemu: config.qemu.binary.clone(),
            accel: config.qemu.accel,
            vhost_device_vsock: config.qemu.vhost_device_vsock.clone(),
            jail: config.qemu.jail.then_some(QemuJail {
                uid: config.qemu.jail_uid,
                gid: config.qemu.jail_gid,
            }),
        }),
    }
}

/// The guest kernel and initramfs: the config's, else the newest cached
/// guest image. Missing files are errors that say which.
pub fn guest_image(config: &Config) -> Result<(PathBuf, PathBuf), BackendError> {
    let cache = image::cache_root();
    let kernel = if config.vm.kernel.as_os_str().is_empty() {
        newest(&cache.join(image::KERNEL_DIR), |dir| {
            let vmlinux = dir.join(image::VMLINUX);
            vmlinux.is_file().then_some(vmlinux)
        })
        .ok_or_else(|| BackendError::NoCachedImage(cache.join(image::KERNEL_DIR)))?
    } else {
        config.vm.kernel.clone()
    };
    let initramfs = if config.vm.initramfs.as_os_str().is_empty() {
        let prefix = if config.vm.debug_console {
            image::DEBUG_PREFIX
        } else {
            image::RELEASE_PREFIX
        };
        newest(&cache.join(image::INITRAMFS_DIR), |file| {
            let name = file.file_name()?.to_str()?;
            (name.starts_with(prefix) && name.ends_with(image::INITRAMFS_SUFFIX))
                .then(|| file.to_path_buf())
        })
        .ok_or_else(|| BackendError::NoCachedImage(cache.join(image::INITRAMFS_DIR)))?
    } else {
        config.vm.initramfs.clone()
    };
    if !kernel.is_file() {
        return Err(BackendError::MissingKernel(kernel));
    }
    if !initramfs.is_file() {
        return Err(BackendError::MissingInitramfs(initramfs));
    }
    Ok((kernel, initramfs))
}

/// The most recently modified entry of `dir` that `pick` accepts.
fn newest(
    dir: &std::path::Path,
    pick: impl Fn(&std::path::Path) -> Option<PathBuf>,
) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let picked = pick(&entry.path())?;
            let modified = std::fs::metadata(&picked).ok()?.modified().ok()?;
            Some((modified, picked))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, path)| path)
}

fn os(text: impl Into<OsString>) -> OsString {
    text.into()
}

fn cmdline(base: String, spec: &PodVmSpec) -> String {
    let mut words = base;
    if !spec.kernel_args.trim().is_empty() {
        words.push(' ');
        words.push_str(spec.kernel_args.trim());
    }
    if spec.debug_console {
        words.push(' ');
        words.push_str(cmdline::DEBUG_SHELL);
        words.push_str("=1");
    }
    words
}

fn virtiofsd(spec: &PodVmSpec) -> ProcessSpec {
    let layout = &spec.layout;
    ProcessSpec {
        name: "virtiofsd",
        program: spec.virtiofsd.clone(),
        args: vec![
            os("--socket-path"),
            layout.virtiofs_socket().into(),
            os("--shared-dir"),
            layout.shared_dir().into(),
            // Container rootfs are mounts under the shared dir: give each
            // its own device number in the guest.
            os("--announce-submounts"),
            // The shim mounts rootfs after virtiofsd started; its mount
            // namespace must see them (the shared dir is a shared mount).
            os("--sandbox"),
            os("namespace"),
            os("--cache"),
            os("auto"),
            // The guest is hostile: no device nodes (CAP_MKNOD) and no file
            // capabilities (CAP_SETFCAP) in the share. Extended attributes
            // stay off (no `--xattr`). Setuid bits cannot be refused by a
            // virtiofsd option: the host mounts under the share are all
            // `nosuid,nodev` instead (rootfs.rs).
            os("--modcaps=-mknod:-setfcap"),
            os("--log-level"),
            os("warn"),
        ],
        ready_socket: Some(layout.virtiofs_socket()),
        is_vmm: false,
        netns: None,
        empty_root: None,
        socket_owner: None,
        cgroup: cgroup::Leaf::Helpers,
    }
}

/// `virtiofsd`, then `microvm-vmm`, which serves hybrid vsock itself and
/// reaches virtiofsd over vhost-user.
#[derive(Debug, Clone)]
pub struct BuiltinBackend {
    pub vmm: PathBuf,
    /// `None`: `builtin.jail = false`.
    pub jail: Option<Jail>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jail {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Backend for BuiltinBackend {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn plan(&self, spec: &PodVmSpec) -> Vec<ProcessSpec> {
        let layout = &spec.layout;
        let mut args = Vec::new();
        if let Some(jail) = &self.jail {
            // microvm-vmm's jail: the root is made fresh under the pod dir,
            // and its cgroup is named after it: `<pod cgroup>/vmm`.
            args.extend([os("--jail"), layout.jail_root().into()]);
            if let Some(cgroup) = &spec.host_cgroup {
                args.extend([os("--cgroup-parent"), cgroup.clone().into_os_string()]);
            }
            if let Some(uid) = jail.uid {
                args.extend([os("--uid"), os(uid.to_string())]);
            }
            if let Some(gid) = jail.gid {
                args.extend([os("--gid"), os(gid.to_string())]);
            }
        }
        args.extend([
            os("--kernel"),
            spec.kernel.clone().into(),
            os("--initrd"),
            spec.initramfs.clone().into(),
            os("--cmdline"),
            os(cmdline(cmdline::KERNEL_CMDLINE.to_owned(), spec)),
            os("--vcpus"),
            os(spec.vcpus.to_string()),
            os("--memory-mib"),
            os(spec.memory_mib.to_string()),
            os("--vsock-uds"),
            layout.agent_socket().into(),
            os("--api-sock"),
            layout.vmm_api_socket().into(),
        ]);
        // No --serial-output: the console goes to stdout, which the
        // supervisor points at the pod's log. A jailed VMM that dropped its
        // uid could not open that root-only file itself.
        // virtio-fs through virtiofsd (vhost-user), as with QEMU.
        let mut fs = OsString::from(layout.virtiofs_socket());
        fs.push(format!(",tag={SHARED_FS_TAG}"));
        args.extend([os("--fs"), fs]);
        if let Some(nic) = &spec.nic {
            args.push(os("--tap"));
            args.push(os(format!("{},mac={}", nic.tap, nic.mac)));
        }
        let vmm = ProcessSpec {
            name: "vmm",
            program: self.vmm.clone(),
            args,
            ready_socket: Some(layout.agent_socket()),
            is_vmm: true,
            netns: spec.nic.as_ref().map(|nic| nic.netns.clone()),
            empty_root: None,
            socket_owner: self
                .jail
                .filter(|jail| jail.uid.is_some() || jail.gid.is_some())
                .map(|jail| (jail.uid, jail.gid)),
            // A jailed VMM's supervisor stays with the helpers and moves
            // the VMM into `<pod>/vmm` itself.
            cgroup: if self.jail.is_some() {
                cgroup::Leaf::Helpers
            } else {
                cgroup::Leaf::Vmm
            },
        };
        vec![virtiofsd(spec), vmm]
    }
}

/// `qemu-system-x86_64 -M microvm` with vhost-user vsock
/// (`vhost-device-vsock`) and vhost-user-fs (`virtiofsd`). vhost-user needs
/// the guest RAM in a shared memfd.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub vhost_device_vsock: PathBuf,
    /// `None`: `qemu.jail = false`.
    pub jail: Option<QemuJail>,
}

/// The ids QEMU drops to once it has opened its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuJail {
    pub uid: u32,
    pub gid: u32,
}

/// QEMU's seccomp filter. elevateprivileges stays `allow`: QEMU 7.2 loads
/// the filter before it opens its devices and drops to `-runas` last, so
/// with `deny` (or `children`) its own setgid() dies of SIGSYS (seen here:
/// exit by signal 31 on syscall 106). Once it has dropped, QEMU holds no
/// capability, the filter has set no_new_privs and spawn=deny forbids
/// exec, so set*id can no longer get root back.
const QEMU_SECCOMP: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn plan(&self, spec: &PodVmSpec) -> Vec<ProcessSpec> {
        let layout = &spec.layout;
        let vsock = ProcessSpec {
            name: "vhost-device-vsock",
            program: self.vhost_device_vsock.clone(),
            args: vec![
                os("--guest-cid"),
                os("3"),
                os("--socket"),
                layout.vhost_vsock_socket().into(),
                os("--uds-path"),
                layout.agent_socket().into(),
            ],
            ready_socket: Some(layout.vhost_vsock_socket()),
            is_vmm: false,
            netns: None,
            empty_root: None,
            socket_owner: None,
            cgroup: cgroup::Leaf::Helpers,
        };
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let memory = format!("{}M", spec.memory_mib);
        // The console on QEMU's stdout, which the shim relays into the
        // pod's log (whole lines, capped).
        let serial = OsString::from("stdio,id=serial,signal=off");
        let mut vsock_chardev = OsString::from("socket,id=vsock,path=");
        vsock_chardev.push(layout.vhost_vsock_socket());
        let mut fs_chardev = OsString::from("socket,id=fs,path=");
        fs_chardev.push(layout.virtiofs_socket());
        let qemu =
            ProcessSpec {
                name: "qemu",
                program: self.qemu.clone(),
                args: vec![
                os("-M"),
                // acpi=off: QEMU then lists the virtio-mmio devices on the
                // kernel command line, which our ACPI-less kernel needs.
                os("microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=off,memory-backend=mem"),
                os("-object"),
                os(format!("memory-backend-memfd,id=mem,size={memory},share=on")),
                os("-accel"),
                os(accel),
                os("-cpu"),
                os(cpu),
                os("-m"),
                os(memory),
                os("-smp"),
                os(spec.vcpus.to_string()),
                os("-nodefaults"),
                os("-no-user-config"),
                os("-display"),
                os("none"),
                os("-no-reboot"),
                os("-chardev"),
                serial,
                os("-serial"),
                os("chardev:serial"),
                os("-kernel"),
                spec.kernel.clone().into(),
                os("-initrd"),
                spec.initramfs.clone().into(),
                os("-append"),
                os(cmdline(cmdline::qemu(), spec)),
                os("-chardev"),
                vsock_chardev,
                os("-device"),
                os("vhost-user-vsock-device,chardev=vsock"),
                os("-chardev"),
                fs_chardev,
                os("-device"),
                os(format!("vhost-user-fs-device,chardev=fs,tag={SHARED_FS_TAG}")),
            ],
                ready_socket: None,
                is_vmm: true,
                netns: None,
                empty_root: None,
                socket_owner: None,
                cgroup: cgroup::Leaf::Vmm,
            };
        let mut qemu = qemu;
        if let Some(nic) = &spec.nic {
            // QEMU runs in the pod's netns and opens the tap the shim made
            // there by name; vhost=off: this host has no /dev/vhost-net.
            qemu.args.extend([
                os("-netdev"),
                os(format!(
                    "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
                    nic.tap
                )),
                os("-device"),
                os(format!("virtio-net-device,netdev=net0,mac={}", nic.mac)),
            ]);
            qemu.netns = Some(nic.netns.clone());
        }
        if let Some(jail) = &self.jail {
            // QEMU opens every file it needs (kernel, initrd, console log,
            // vhost-user sockets, tap, memfd) during init; only then does it
            // chroot into an empty dir and drop its uid (QEMU 7.2 syntax).
            let root = layout.qemu_root();
            qemu.args.extend([
                os("-sandbox"),
                os(QEMU_SECCOMP),
                os("-chroot"),
                root.clone().into(),
                os("-runas"),
                os(format!("{}:{}", jail.uid, jail.gid)),
            ]);
            qemu.empty_root = Some(root);
        }
        vec![virtiofsd(spec), vsock, qemu]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec() -> PodVmSpec {
        PodVmSpec {
            layout: PodLayout::new(Path::new("/run/mv"), Path::new("/var/log/mv"), "ns", "pod"),
            kernel: "/img/vmlinux".into(),
            initramfs: "/img/initrd".into(),
            kernel_args: "loglevel=7".into(),
            vcpus: 2,
            memory_mib: 256,
            debug_console: false,
            virtiofsd: "virtiofsd".into(),
            nic: None,
            host_cgroup: None,
        }
    }

    fn with_nic() -> PodVmSpec {
        let mut spec = spec();
        spec.nic = Some(VmNic {
            netns: "/var/run/netns/cni-1".into(),
            tap: "tap0_microvm".into(),
            mac: "0a:58:0a:58:5b:02".into(),
        });
        spec
    }

    #[test]
    fn the_vmm_alone_runs_in_the_pod_netns_on_its_tap() {
        let qemu = QemuBackend {
            qemu: "q".into(),
            accel: Accel::Tcg,
            vhost_device_vsock: "v".into(),
            jail: None,
        };
        let plan = qemu.plan(&with_nic());
        assert_eq!(plan[0].netns, None);
        assert_eq!(plan[1].netns, None);
        assert_eq!(plan[2].netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        let args = joined(&plan[2]);
        assert!(args.contains(
            "-netdev tap,id=net0,ifname=tap0_microvm,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=net0,mac=0a:58:0a:58:5b:02"
        ), "{args}");
        assert!(!joined(&qemu.plan(&spec())[2]).contains("-netdev"));
        let builtin = BuiltinBackend {
            vmm: "m".into(),
            jail: None,
        };
        let plan = builtin.plan(&with_nic());
        assert_eq!(plan[0].netns, None, "virtiofsd stays in the host netns");
        assert_eq!(plan[1].netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert!(joined(&plan[1]).contains("--tap tap0_microvm,mac=0a:58:0a:58:5b:02"));
    }

    #[test]
    fn virtiofsd_refuses_device_nodes_file_caps_and_xattrs() {
        let args = joined(&virtiofsd(&spec()));
        assert!(args.contains("--modcaps=-mknod:-setfcap"), "{args}");
        assert!(
            !args.contains("xattr") && !args.contains("posix-acl"),
            "{args}"
        );
    }

    fn joined(process: &ProcessSpec) -> String {
        process
            .args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn qemu_plan_starts_the_vhost_user_backends_first() {
        let backend = QemuBackend {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            vhost_device_vsock: "vhost-device-vsock".into(),
            jail: None,
        };
        let plan = backend.plan(&spec());
        let names: Vec<_> = plan.iter().map(|p| p.name).collect();
        assert_eq!(names, ["virtiofsd", "vhost-device-vsock", "qemu"]);
        assert_eq!(
            plan[0].ready_socket.as_deref(),
            Some(Path::new("/run/mv/ns/pod/s/fs.sock"))
        );
        assert!(joined(&plan[0]).contains("--shared-dir /run/mv/ns/pod/shared"));
        assert_eq!(
            joined(&plan[1]),
            "--guest-cid 3 --socket /run/mv/ns/pod/s/vu.sock --uds-path /run/mv/ns/pod/s/vs.sock"
        );
        let qemu = joined(&plan[2]);
        assert!(plan[2].is_vmm && !plan[0].is_vmm && !plan[1].is_vmm);
        for expected in [
            "-M microvm,acpi=off,",
            "memory-backend=mem",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-accel tcg -cpu max -m 256M -smp 2",
            "-chardev stdio,id=serial,signal=off -serial chardev:serial",
            "-kernel /img/vmlinux -initrd /img/initrd",
            "reboot=t",
            "loglevel=7",
            "-chardev socket,id=vsock,path=/run/mv/ns/pod/s/vu.sock -device vhost-user-vsock-device,chardev=vsock",
            "-chardev socket,id=fs,path=/run/mv/ns/pod/s/fs.sock -device vhost-user-fs-device,chardev=fs,tag=microvm-shared",
        ] {
            assert!(qemu.contains(expected), "{expected} missing from {qemu}");
        }
        assert!(!qemu.contains("reboot=k"));
    }

    #[test]
    fn qemu_is_jailed_by_default_as_nobody_in_an_empty_root() {
        let mut config = Config {
            backend: BackendKind::Qemu,
            ..Config::default()
        };
        let plan = backend_for(&config).plan(&with_nic());
        let qemu = joined(&plan[2]);
        assert!(
            qemu.ends_with(
                " -sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny \
                 -chroot /run/mv/ns/pod/qemu-root -runas 65534:65534"
            ),
            "{qemu}"
        );
        assert_eq!(
            plan[2].empty_root.as_deref(),
            Some(Path::new("/run/mv/ns/pod/qemu-root"))
        );
        assert!(plan[..2].iter().all(|helper| helper.empty_root.is_none()));
        // The jail changes neither the netns join nor the tap.
        assert_eq!(plan[2].netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert!(qemu.contains("-netdev tap,id=net0,ifname=tap0_microvm,"));

        config.qemu.jail_uid = 1000;
        config.qemu.jail_gid = 1001;
        let qemu = joined(&backend_for(&config).plan(&spec())[2]);
        assert!(qemu.ends_with("-runas 1000:1001"), "{qemu}");

        config.qemu.jail = false;
        let plan = backend_for(&config).plan(&spec());
        let qemu = joined(&plan[2]);
        for flag in ["-sandbox", "-chroot", "-runas"] {
            assert!(!qemu.contains(flag), "{flag} in {qemu}");
        }
        assert!(plan.iter().all(|process| process.empty_root.is_none()));
    }

    #[test]
    fn qemu_kvm_uses_the_host_cpu() {
        let backend = QemuBackend {
            qemu: "q".into(),
            accel: Accel::Kvm,
            vhost_device_vsock: "v".into(),
            jail: None,
        };
        let plan = backend.plan(&spec());
        assert!(joined(&plan[2]).contains("-accel kvm -cpu host"));
    }

    #[test]
    fn builtin_plan_is_one_vmm_serving_hybrid_vsock() {
        let backend = BuiltinBackend {
            vmm: "/bin/microvm-vmm".into(),
            jail: None,
        };
        let mut spec = spec();
        spec.debug_console = true;
        let plan = backend.plan(&spec);
        let names: Vec<_> = plan.iter().map(|p| p.name).collect();
        assert_eq!(names, ["virtiofsd", "vmm"]);
        assert!(plan[1].is_vmm && !plan[0].is_vmm);
        assert_eq!(plan[1].program, PathBuf::from("/bin/microvm-vmm"));
        let args = joined(&plan[1]);
        assert!(args.contains("--vsock-uds /run/mv/ns/pod/s/vs.sock"));
        assert!(!args.contains("--serial-output"), "{args}");
        assert!(args.contains("--vcpus 2 --memory-mib 256"));
        assert!(args.contains("reboot=k"));
        assert!(args.contains("microvm_debug_shell=1"));
        assert!(args.contains("--fs /run/mv/ns/pod/s/fs.sock,tag=microvm-shared"));
    }

    #[test]
    fn builtin_jails_the_vmm_by_default_under_the_pod_cgroup() {
        let config = Config::default();
        assert!(config.builtin.jail);
        let backend = backend_for(&config);
        let mut in_pod_cgroup = spec();
        in_pod_cgroup.host_cgroup = Some("kubepods/pod1/sandbox".into());
        let plan = backend.plan(&in_pod_cgroup);
        let args = joined(&plan[1]);
        assert!(
            args.starts_with(
                "--jail /run/mv/ns/pod/vmm --cgroup-parent kubepods/pod1/sandbox --uid 65534 --gid 65534 --kernel"
            ),
            "{args}"
        );
        let mut as_root = Config::default();
        as_root.builtin.jail_uid = 0;
        as_root.builtin.jail_gid = 0;
        let as_root = backend_for(&as_root).plan(&spec());
        assert!(joined(&as_root[1]).starts_with("--jail /run/mv/ns/pod/vmm --kernel"));
        assert!(as_root[1].socket_owner.is_none());
        let jailed_as_user = BuiltinBackend {
            vmm: "m".into(),
            jail: Some(Jail {
                uid: Some(1000),
                gid: Some(1000),
            }),
        };
        let as_user = jailed_as_user.plan(&spec());
        assert!(joined(&as_user[1])
            .starts_with("--jail /run/mv/ns/pod/vmm --uid 1000 --gid 1000 --kernel"));
        // Its sockets (its own and virtiofsd's) become that user's; a VMM
        // that stays root needs no such handover.
        assert_eq!(as_user[1].socket_owner, Some((Some(1000), Some(1000))));
        assert!(as_user[0].socket_owner.is_none());
        let mut unjailed = Config::default();
        unjailed.builtin.jail = false;
        assert!(joined(&backend_for(&unjailed).plan(&spec())[1]).starts_with("--kernel"));
    }

    #[test]
    fn guest_image_names_the_missing_file() {
        let mut config = Config::default();
        config.vm.kernel = "/nonexistent/vmlinux".into();
        config.vm.initramfs = "/nonexistent/initrd".into();
        let err = guest_image(&config).unwrap_err();
        assert!(matches!(err, BackendError::MissingKernel(_)));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }
}
