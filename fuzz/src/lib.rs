//! Fuzz target bodies for the agent's request decoding and the shim's
//! spec and config parsing. The device targets live in
//! `microvm_devices::fuzz` (replayed by `cargo test -p microvm-devices`);
//! these need the agent and shim libraries, which the devices crate does
//! not depend on, so they live here, and the tests below replay their
//! seeds and saved crash inputs: `cargo test --manifest-path fuzz/Cargo.toml`.
//!
//! Each body asserts properties besides "no panic": a decoded message
//! re-encodes to itself, and what the parsers accept stays inside its
//! bounds (mount targets inside the rootfs, resolv.conf lines of three
//! kinds, sysctl paths under /proc/sys).

use microvm_agent::{network, oci, sandbox};
use microvm_proto::agent::v1 as api;
use prost::Message;
use std::collections::HashMap;
use std::ffi::CStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The last capability the agent's kernel knows (CAP_CHECKPOINT_RESTORE).
const LAST_CAPABILITY: u32 = 40;

/// An empty directory standing in for every spec's rootfs: `container_setup`
/// needs root.path to exist, and an empty one resolves no symlinks.
fn empty_rootfs() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // Under fuzz/target (local, not committed): one fixed empty
        // directory instead of a new temp dir per fuzzing process.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/empty-rootfs");
        // Fuzzing cannot go on without it: a setup failure, not a finding.
        std::fs::create_dir_all(&root).expect("create the fuzz rootfs");
        root
    })
}

fn assert_inside(root: &Path, path: &CStr, what: &str) {
    let path = Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()));
    assert!(
        path.starts_with(root)
            && !path
                .components()
                .any(|part| matches!(part, std::path::Component::ParentDir)),
        "{what} {} escapes the rootfs {}",
        path.display(),
        root.display()
    );
}

/// The agent's CreateContainer path up to the child: parse, namespace plan,
/// mounts/devices/seccomp/sysctls, process. Every path the child would
/// mount on or create lies inside the rootfs.
pub fn agent_oci_spec(data: &[u8]) {
    let Ok(mut spec) = oci::parse_spec(data) else {
        return;
    };
    let root = empty_rootfs();
    if let Some(mut spec_root) = spec.root().clone() {
        spec_root.set_path(root.to_path_buf());
        spec.set_root(Some(spec_root));
    }
    for pod_pid in [false, true] {
        let Ok(namespaces) = oci::namespace_plan(&spec, pod_pid) else {
            continue;
        };
        let Ok(setup) =
            oci::container_setup(&spec, None, &namespaces, Path::new("/sys/fs/cgroup/fuzz"))
        else {
            continue;
        };
        let plan = &setup.rootfs;
        assert_eq!(plan.mounts.len(), setup.labels.mounts.len());
        assert_eq!(plan.devices.len(), setup.labels.devices.len());
        for step in &plan.mounts {
            assert_inside(root, &step.target, "mount target");
            for dir in &step.mkdirs {
                assert_inside(root, dir, "mount mkdir");
            }
            if let Some(file) = &step.create_file {
                assert_inside(root, file, "mount target file");
            }
        }
        for device in &plan.devices {
            assert_inside(root, &device.path, "device node");
        }
        for (_, link) in &plan.symlinks {
            assert_inside(root, link, "symlink");
        }
        for (key, _) in &setup.sysctls {
            assert!(key.to_bytes().starts_with(b"/proc/sys/"), "{key:?}");
        }
        if let Some(process) = spec.process() {
            let _ = oci::process::prepare(process, Some(root), LAST_CAPABILITY);
        }
    }
}

/// decode(encode(m)) == m for a message prost accepted.
fn decodes<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let message = M::decode(data).ok()?;
    let again = M::decode(message.encode_to_vec().as_slice());
    assert_eq!(
        again.as_ref().ok(),
        Some(&message),
        "re-encoding changed it"
    );
    Some(message)
}

fn check_cidr(field: &str, text: &str) {
    if let Ok((address, prefix)) = network::parse_cidr(field, text) {
        assert!(prefix <= if address.is_ipv4() { 32 } else { 128 });
    }
}

fn check_mac(text: &str) {
    if let Ok(mac) = network::parse_mac(text) {
        assert_eq!(mac.len(), 6);
    }
}

/// Byte 0 picks one of the agent's request messages, the rest is its
/// protobuf encoding; whatever the message embeds (OCI JSON, addresses,
/// DNS, sysctls) goes through the agent's own parser for it.
pub fn agent_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 25 {
        0 => drop(decodes::<api::CheckRequest>(body)),
        1 => drop(decodes::<api::SubscribeEventsRequest>(body)),
        2 => {
            if let Some(request) = decodes::<api::UpdateInterfaceRequest>(body) {
                check_mac(&request.mac);
                for address in &request.addresses {
                    check_cidr("addresses", address);
                }
            }
        }
        3 => {
            for route in decodes::<api::UpdateRoutesRequest>(body)
                .map(|request| request.routes)
                .unwrap_or_default()
            {
                if !route.destination.is_empty() {
                    check_cidr("destination", &route.destination);
                }
            }
        }
        4 => {
            for neighbor in decodes::<api::AddNeighborsRequest>(body)
                .map(|request| request.neighbors)
                .unwrap_or_default()
            {
                check_mac(&neighbor.mac);
            }
        }
        5 => {
            if let Some(request) = decodes::<api::ExecProcessRequest>(body) {
                if let Ok(process) =
                    serde_json::from_slice::<oci_spec::runtime::Process>(&request.oci_process_json)
                {
                    let _ = oci::process::prepare(&process, Some(empty_rootfs()), LAST_CAPABILITY);
                }
            }
        }
        6 => drop(decodes::<api::SignalProcessRequest>(body)),
        7 => drop(decodes::<api::WaitProcessRequest>(body)),
        8 => drop(decodes::<api::ResizeTtyRequest>(body)),
        9 => drop(decodes::<api::CloseStdinRequest>(body)),
        10 => drop(decodes::<api::StdinChunk>(body)),
        11 => drop(decodes::<api::ReadOutputRequest>(body)),
        12 => {
            if let Some(request) = decodes::<api::CreateSandboxRequest>(body) {
                let dns = request.dns.unwrap_or_default();
                let dns = sandbox::Dns {
                    servers: dns.servers,
                    searches: dns.searches,
                    options: dns.options,
                };
                if let Ok(text) = sandbox::resolv_conf(&dns) {
                    for line in text.lines() {
                        assert!(
                            ["nameserver ", "search ", "options "]
                                .iter()
                                .any(|kind| line.starts_with(kind)),
                            "resolv.conf line {line:?}"
                        );
                    }
                }
                for key in request.sysctls.keys() {
                    if let Some(path) = microvm_agent::sysctl::proc_path(key) {
                        assert!(path.starts_with("/proc/sys/") && !path.contains(".."));
                    }
                }
            }
        }
        13 => drop(decodes::<api::DestroySandboxRequest>(body)),
        14 => drop(decodes::<api::GetGuestDetailsRequest>(body)),
        15 => drop(decodes::<api::PowerOffRequest>(body)),
        16 => drop(decodes::<api::MountStorageRequest>(body)),
        17 => drop(decodes::<api::UnmountStorageRequest>(body)),
        18 => {
            if let Some(request) = decodes::<api::CreateContainerRequest>(body) {
                agent_oci_spec(&request.oci_spec_json);
            }
        }
        19 => drop(decodes::<api::StartContainerRequest>(body)),
        20 => drop(decodes::<api::RemoveContainerRequest>(body)),
        21 => {
            if let Some(request) = decodes::<api::UpdateContainerRequest>(body) {
                let _ = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(
                    &request.oci_resources_json,
                );
            }
        }
        22 => drop(decodes::<api::ContainerStatsRequest>(body)),
        23 => drop(decodes::<api::ListPidsRequest>(body)),
        _ => drop(decodes::<api::ListContainersRequest>(body)),
    }
}

/// The shim's view of a bundle's config.json: which pod a container joins.
/// An id it accepts is the annotation (else the container id) and can name
/// a path component only: never empty, `.`/`..`, or holding a `/`.
pub fn shim_spec(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(data) else {
        return;
    };
    let pod = microvm_shim::service::pod_id_of(&spec, "fallback-container");
    let annotation = spec
        .annotations()
        .as_ref()
        .and_then(|annotations| annotations.get(microvm_shim::service::SANDBOX_ID_ANNOTATION))
        .filter(|id| !id.is_empty());
    let wanted = annotation.map_or("fallback-container", String::as_str);
    match pod {
        Ok(pod) => {
            assert_eq!(pod, wanted);
            assert!(pod.len() <= 76 && !pod.contains('/') && pod != "." && pod != "..");
            assert!(pod
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        }
        Err(err) => assert_eq!(err.0, wanted),
    }
}

/// The shim's TOML config file.
pub fn shim_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    if let Ok(config) = microvm_shim::config::Config::parse(text, path) {
        assert!(
            config.validate(path).is_ok(),
            "parse accepted an invalid config"
        );
    }
}

/// `key=value` lines as pod annotations.
fn annotation_lines(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// The default config with every overridable key allowed as an annotation.
fn config_allowing_every_annotation() -> microvm_shim::config::Config {
    let mut config = microvm_shim::config::Config::default();
    config.annotations.allowed = microvm_shim::annotations::OVERRIDABLE_KEYS
        .iter()
        .map(|key| (*key).to_owned())
        .collect();
    config
}

/// The shim's pod annotations over the default config, with every key
/// allowed. Input: `key=value` lines. What `apply` accepts must pass the
/// config's own validation, and kernel_args get only plain characters.
pub fn shim_annotations(data: &[u8]) {
    let annotations = annotation_lines(&String::from_utf8_lossy(data));
    let mut config = config_allowing_every_annotation();
    if microvm_shim::annotations::apply(&mut config, &annotations).is_ok() {
        let path = Path::new("fuzz.toml");
        if let Err(err) = config.validate(path) {
            panic!("annotations {annotations:?} gave an invalid config: {err}");
        }
        let plain = |c: char| c.is_ascii_alphanumeric() || " =._,:/+-".contains(c);
        assert!(
            config.vm.kernel_args.chars().all(plain),
            "kernel_args {:?}",
            config.vm.kernel_args
        );
    }
}

pub type Target = fn(&[u8]);

/// Every target here, by the name its cargo-fuzz binary and its seed and
/// regression folders use.
pub const TARGETS: &[(&str, Target)] = &[
    ("agent_request", agent_request),
    ("agent_oci_spec", agent_oci_spec),
    ("shim_spec", shim_spec),
    ("shim_config", shim_config),
    ("shim_annotations", shim_annotations),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_inputs(kind: &str, target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(kind)
            .join(target);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.path().is_file())
            .map(|entry| std::fs::read(entry.path()).unwrap())
            .collect()
    }

    /// Every saved crash input and every seed still runs cleanly.
    #[test]
    fn saved_crash_inputs_and_seeds_do_not_crash() {
        for (name, target) in TARGETS {
            let seeds = saved_inputs("seeds", name);
            assert!(!seeds.is_empty(), "no seeds for {name}");
            for input in saved_inputs("regressions", name).into_iter().chain(seeds) {
                target(&input);
            }
        }
    }

    /// The seeds get past the first parser, so fuzzing starts from real work.
    #[test]
    fn seeds_are_accepted_by_the_parsers() {
        for seed in saved_inputs("seeds", "agent_oci_spec") {
            let spec = oci::parse_spec(&seed).unwrap();
            let namespaces = oci::namespace_plan(&spec, false).unwrap();
            let mut spec = spec;
            let mut root = spec.root().clone().unwrap();
            root.set_path(empty_rootfs().to_path_buf());
            spec.set_root(Some(root));
            let setup = oci::container_setup(&spec, None, &namespaces, Path::new("/cg")).unwrap();
            assert!(!setup.rootfs.mounts.is_empty());
            assert!(setup.seccomp.is_some(), "the seed has a seccomp profile");
        }
        for seed in saved_inputs("seeds", "agent_request") {
            assert!(api::CreateContainerRequest::decode(&seed[1..]).is_ok() || seed[0] != 18);
        }
        for seed in saved_inputs("seeds", "shim_config") {
            let text = std::str::from_utf8(&seed).unwrap();
            microvm_shim::config::Config::parse(text, Path::new("seed.toml")).unwrap();
        }
        for seed in saved_inputs("seeds", "shim_annotations") {
            let annotations = annotation_lines(&String::from_utf8(seed).unwrap());
            let mut config = config_allowing_every_annotation();
            microvm_shim::annotations::apply(&mut config, &annotations).unwrap();
            assert_eq!(config.vm.vcpus, 2);
        }
        for seed in saved_inputs("seeds", "shim_spec") {
            let spec: oci_spec::runtime::Spec = serde_json::from_slice(&seed).unwrap();
            assert_eq!(
                microvm_shim::service::pod_id_of(&spec, "c").unwrap(),
                "pod-1"
            );
        }
    }

    /// The escape check itself can fail.
    #[test]
    #[should_panic(expected = "escapes the rootfs")]
    fn a_target_outside_the_rootfs_is_caught() {
        let outside = std::ffi::CString::new("/etc/passwd").unwrap();
        assert_inside(empty_rootfs(), &outside, "mount target");
    }

    /// Writes the seeds (run by hand after changing them):
    /// `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds`.
    #[test]
    #[ignore]
    fn write_seeds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        let save = |target: &str, name: &str, data: &[u8]| {
            std::fs::create_dir_all(dir.join(target)).unwrap();
            std::fs::write(dir.join(target).join(name), data).unwrap();
        };
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "args": ["sh", "-c", "echo hi"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                "env": ["PATH=/bin"], "noNewPrivileges": true,
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                 "permitted": ["CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "c",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "mode=755"]},
                {"destination": "/etc/../etc/hosts", "type": "bind", "source": "/etc/hosts",
                 "options": ["rbind", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}],
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
                            "architectures": ["SCMP_ARCH_X86_64"],
                            "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]}
            }
        });
        let spec_json = serde_json::to_vec(&spec).unwrap();
        save("agent_oci_spec", "runc-like", &spec_json);
        let create = api::CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: spec_json.into(),
            bundle_path: String::new(),
            stdin: false,
        };
        save(
            "agent_request",
            "create-container",
            &[&[18u8][..], &create.encode_to_vec()].concat(),
        );
        let sandbox = api::CreateSandboxRequest {
            sandbox_id: "pod-1".into(),
            hostname: "pod".into(),
            dns: Some(api::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            sysctls: [("net.ipv4.ip_forward".to_owned(), "1".to_owned())].into(),
            share_pid_namespace: true,
        };
        save(
            "agent_request",
            "create-sandbox",
            &[&[12u8][..], &sandbox.encode_to_vec()].concat(),
        );
        let interface = api::UpdateInterfaceRequest {
            mac: "02:00:00:00:00:01".into(),
            name: "eth0".into(),
            addresses: vec!["10.0.0.2/24".into(), "fd00::2/64".into()],
            mtu: 1500,
            up: true,
        };
        save(
            "agent_request",
            "update-interface",
            &[&[2u8][..], &interface.encode_to_vec()].concat(),
        );

        let mut shim_spec = spec.clone();
        shim_spec["annotations"] = serde_json::json!({
            "io.kubernetes.cri.sandbox-id": "pod-1",
            "io.kubernetes.cri.container-type": "container"
        });
        save(
            "shim_spec",
            "cri-container",
            &serde_json::to_vec(&shim_spec).unwrap(),
        );
        save(
            "shim_annotations",
            "cri-sizing-and-overrides",
            b"io.kubernetes.cri.sandbox-cpu-quota=150000\n\
              io.kubernetes.cri.sandbox-cpu-period=100000\n\
              io.kubernetes.cri.sandbox-memory=268435456\n\
              io.microvm.config.vm.kernel_args=quiet loglevel=3\n\
              io.microvm.config.timeouts.boot_seconds=30\n",
        );
        save(
            "shim_config",
            "small",
            b"[vm]\nvcpus = 2\nmemory_mib = 256\n\n[timeouts]\nboot_seconds = 30.0\n",
        );
    }
}
