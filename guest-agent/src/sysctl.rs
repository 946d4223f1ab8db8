//! Pod and container sysctls: which names a pod may set, and where they
//! live under /proc/sys.
//!
//! Only namespaced sysctls are accepted, the list runc and kubelet use:
//! the IPC namespace's `kernel.shm*`, `kernel.msg*`, `kernel.sem` and
//! `fs.mqueue.*`, and the network namespace's `net.*`. Anything else
//! (`kernel.panic`, `vm.*`, ...) is refused with an error naming every
//! refused key. In a pod VM the pod's network and IPC namespaces are the
//! VM's, so a pod sysctl is written from the agent's own namespaces
//! ([`crate::sandbox`]) and a container's from the container's namespaces
//! before its /proc/sys goes read-only ([`crate::spawn`]).
//!
//! Because the pod's network namespace is the VM's initial one, every
//! `net.*` file exists there, including the ones the kernel does not
//! namespace (`net.core.bpf_jit_enable`, `net.core.netdev_max_backlog`,
//! ...): on a host runc would not even see them in the pod's namespace.
//! [`check`] therefore asks the kernel: a `net.*` sysctl passes only if it
//! exists in a fresh network namespace ([`global_net`]), so the allowlist
//! is exactly this kernel's namespaced set, not a list that ages.

/// The namespace a sysctl belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    Ipc,
    Net,
}

/// The longest value accepted (a /proc/sys write is at most a page).
pub const MAX_VALUE_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysctlError {
    #[error("{} not a sysctl name", quoted_list(.0, "is", "are"))]
    BadName(Vec<String>),
    #[error(
        "{} not namespaced (only kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.* and net.* \
         are): refused",
        quoted_list(.0, "is", "are")
    )]
    NotNamespaced(Vec<String>),
    #[error(
        "{} global in the VM: the kernel keeps {} for the initial network namespace only, \
         which here is the VM's own: refused",
        quoted_list(.0, "is", "are"),
        if .0.len() == 1 { "it" } else { "them" }
    )]
    GlobalNet(Vec<String>),
    #[error("the value of sysctl {0} is longer than {MAX_VALUE_LEN} bytes or contains a NUL")]
    BadValue(String),
    #[error("cannot create a network namespace to tell namespaced net.* sysctls apart")]
    Probe(#[source] nix::Error),
}

fn quoted_list(names: &[String], one: &str, many: &str) -> String {
    let list = names
        .iter()
        .map(|name| format!("{name:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (noun, verb) = if names.len() == 1 {
        ("sysctl", one)
    } else {
        ("sysctls", many)
    };
    format!("{noun} {list} {verb}")
}

/// The components of a sysctl name. Two spellings exist: dotted
/// (`net.ipv4.ip_forward`; a `/` inside a component stands for a dot, as
/// kubelet writes `net.ipv4.conf.eth0/100.forwarding` for the interface
/// `eth0.100`) and slashed (`net/ipv4/conf/eth0.100/forwarding`); the first
/// separator tells which. `None` for anything that is not plain words.
pub fn components(key: &str) -> Option<Vec<String>> {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !plain {
        return None;
    }
    let dotted = key.find(['.', '/']).map(|at| key.as_bytes()[at]) != Some(b'/');
    let (separator, inner) = if dotted { ('.', '/') } else { ('/', '.') };
    let parts: Vec<String> = key
        .split(separator)
        .map(|part| part.replace(inner, "."))
        .collect();
    let valid = parts
        .iter()
        .all(|part| !part.is_empty() && !part.starts_with('.') && !part.contains(".."));
    valid.then_some(parts)
}

/// "net.ipv4.ip_forward" -> "/proc/sys/net/ipv4/ip_forward".
pub fn proc_path(key: &str) -> Option<String> {
    components(key).map(|parts| format!("/proc/sys/{}", parts.join("/")))
}

/// The namespace of `key`, or `None` for a sysctl that is not namespaced.
pub fn namespace_of(key: &str) -> Option<SysctlNamespace> {
    let parts = components(key)?;
    let first = parts.first().map(String::as_str);
    let second = parts.get(1).map(String::as_str);
    match (first, second, parts.len()) {
        (Some("net"), Some(_), _) => Some(SysctlNamespace::Net),
        (Some("fs"), Some("mqueue"), 3) => Some(SysctlNamespace::Ipc),
        (Some("kernel"), Some(name), 2)
            if name == "sem" || name.starts_with("shm") || name.starts_with("msg") =>
        {
            Some(SysctlNamespace::Ipc)
        }
        _ => None,
    }
}

/// The file that stands for `parts` in a fresh network namespace: there
/// only `lo` exists, so a per-interface directory (`net.ipv4.conf.eth0.*`,
/// `net.ipv6.neigh.eth0.*`) is probed as `default`, which every namespace
/// has and which has the same entries.
fn probe_path(parts: &[String]) -> String {
    let mut parts = parts.to_vec();
    let per_interface = parts.len() >= 5
        && parts[0] == "net"
        && matches!(parts[1].as_str(), "ipv4" | "ipv6")
        && matches!(parts[2].as_str(), "conf" | "neigh")
        && parts[3] != "all";
    if per_interface {
        parts[3] = "default".into();
    }
    format!("/proc/sys/{}", parts.join("/"))
}

/// Which of the `net.*` sysctls `keys` exist here but not in a fresh
/// network namespace: the kernel registers them for the initial namespace
/// only, so they are global (a key that exists nowhere is left for the
/// writer to report as missing). A thread of its own unshares its network namespace (a thread's
/// /proc/sys is that of its own namespace) and looks; the namespace goes
/// away with the thread.
pub fn global_net(keys: &[&str]) -> Result<Vec<String>, SysctlError> {
    let probes: Vec<(String, String)> = keys
        .iter()
        .filter(|key| proc_path(key).is_some_and(|path| std::path::Path::new(&path).exists()))
        .filter_map(|key| Some(((*key).to_owned(), probe_path(&components(key)?))))
        .collect();
    if probes.is_empty() {
        return Ok(Vec::new());
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(SysctlError::Probe)?;
                Ok(probes
                    .iter()
                    .filter(|(_, path)| !std::path::Path::new(path).exists())
                    .map(|(key, _)| key.clone())
                    .collect())
            })
            .join()
            .unwrap_or(Err(SysctlError::Probe(nix::Error::EIO)))
    })
}

/// Every sysctl of `sysctls` checked: names first (all bad ones named at
/// once), then namespaces, then values, then whether each `net.*` one is
/// namespaced in this kernel ([`global_net`]). Returns (path, value) pairs
/// in the given order.
pub fn check<'a>(
    sysctls: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<(String, String)>, SysctlError> {
    let sysctls: Vec<(&str, &str)> = sysctls.into_iter().collect();
    let bad_names: Vec<String> = sysctls
        .iter()
        .filter(|(key, _)| components(key).is_none())
        .map(|(key, _)| (*key).to_owned())
        .collect();
    if !bad_names.is_empty() {
        return Err(SysctlError::BadName(bad_names));
    }
    let global: Vec<String> = sysctls
        .iter()
        .filter(|(key, _)| namespace_of(key).is_none())
        .map(|(key, _)| (*key).to_owned())
        .collect();
    if !global.is_empty() {
        return Err(SysctlError::NotNamespaced(global));
    }
    let checked = sysctls
        .iter()
        .map(|(key, value)| {
            if value.len() > MAX_VALUE_LEN || value.contains('\0') {
                return Err(SysctlError::BadValue((*key).to_owned()));
            }
            let path =
                proc_path(key).ok_or_else(|| SysctlError::BadName(vec![(*key).to_owned()]))?;
            Ok((path, (*value).to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let net: Vec<&str> = sysctls
        .iter()
        .map(|(key, _)| *key)
        .filter(|key| namespace_of(key) == Some(SysctlNamespace::Net))
        .collect();
    let global = global_net(&net)?;
    if !global.is_empty() {
        return Err(SysctlError::GlobalNet(global));
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_sysctls_are_runcs_and_kubelets_list() {
        for key in [
            "net.ipv4.ip_unprivileged_port_start",
            "net.ipv4.ip_forward",
            "net.core.somaxconn",
            "net.ipv6.conf.all.disable_ipv6",
        ] {
            assert_eq!(namespace_of(key), Some(SysctlNamespace::Net), "{key}");
        }
        for key in [
            "kernel.shm_rmid_forced",
            "kernel.shmmax",
            "kernel.shmall",
            "kernel.shmmni",
            "kernel.msgmax",
            "kernel.msgmnb",
            "kernel.msgmni",
            "kernel.sem",
            "fs.mqueue.msg_max",
            "fs.mqueue.queues_max",
        ] {
            assert_eq!(namespace_of(key), Some(SysctlNamespace::Ipc), "{key}");
        }
        for key in [
            "kernel.panic",
            "kernel.hostname",
            "kernel.semx.y",
            "vm.overcommit_memory",
            "fs.file-max",
            "fs.mqueue",
            "net",
            "kernel",
        ] {
            assert_eq!(namespace_of(key), None, "{key}");
        }
    }

    #[test]
    fn both_spellings_map_to_proc_sys() {
        assert_eq!(
            proc_path("net.ipv4.ip_forward").as_deref(),
            Some("/proc/sys/net/ipv4/ip_forward")
        );
        // kubelet's dotted form of the interface eth0.100, and the slashed form.
        assert_eq!(
            proc_path("net.ipv4.conf.eth0/100.forwarding").as_deref(),
            Some("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(
            proc_path("net/ipv4/conf/eth0.100/forwarding").as_deref(),
            Some("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(
            namespace_of("net/ipv4/ip_forward"),
            Some(SysctlNamespace::Net)
        );
        for bad in [
            "",
            "../../etc/passwd",
            "net/../../etc",
            "kernel..x",
            "a b",
            "net.ipv4.conf./.x",
            "net.x//y",
            "net/ipv4/..",
            "net.\u{e9}",
        ] {
            assert_eq!(proc_path(bad), None, "{bad:?}");
        }
    }

    /// Needs CAP_SYS_ADMIN (the tests run as root, as the agent does).
    #[test]
    fn net_sysctls_the_kernel_keeps_global_are_refused() {
        // net.core.netdev_max_backlog and bpf_jit_enable have been
        // init_net-only for as long as net namespaces exist.
        let err = check([
            ("net.core.somaxconn", "1024"),
            ("net.core.netdev_max_backlog", "1"),
            ("net.ipv4.conf.lo.forwarding", "1"),
            ("net.core.bpf_jit_enable", "0"),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            SysctlError::GlobalNet(vec![
                "net.core.netdev_max_backlog".into(),
                "net.core.bpf_jit_enable".into()
            ])
        );
        assert!(err.to_string().contains("are global in the VM"), "{err}");
        // Per-interface files are probed as `default`.
        assert_eq!(
            probe_path(&components("net.ipv4.conf.eth0/100.forwarding").unwrap()),
            "/proc/sys/net/ipv4/conf/default/forwarding"
        );
        assert_eq!(
            probe_path(&components("net.ipv4.conf.all.forwarding").unwrap()),
            "/proc/sys/net/ipv4/conf/all/forwarding"
        );
        assert!(global_net(&[
            "net.ipv4.conf.lo.forwarding",
            "net.ipv4.ip_forward",
            "net.no.such.sysctl"
        ])
        .unwrap()
        .is_empty());
    }

    #[test]
    fn check_names_every_refused_key() {
        let ok = check([
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("kernel.shm_rmid_forced", "1"),
        ])
        .unwrap();
        assert_eq!(
            ok,
            vec![
                (
                    "/proc/sys/net/ipv4/ip_unprivileged_port_start".to_owned(),
                    "0".to_owned()
                ),
                (
                    "/proc/sys/kernel/shm_rmid_forced".to_owned(),
                    "1".to_owned()
                ),
            ]
        );
        let err = check([
            ("kernel.panic", "1"),
            ("net.ipv4.ip_forward", "1"),
            ("vm.swappiness", "10"),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            SysctlError::NotNamespaced(vec!["kernel.panic".into(), "vm.swappiness".into()])
        );
        let text = err.to_string();
        assert!(
            text.starts_with("sysctls \"kernel.panic\", \"vm.swappiness\" are not namespaced"),
            "{text}"
        );
        let one = check([("kernel.panic", "1")]).unwrap_err().to_string();
        assert!(
            one.starts_with("sysctl \"kernel.panic\" is not namespaced"),
            "{one}"
        );
        assert!(matches!(
            check([("../x", "1")]),
            Err(SysctlError::BadName(names)) if names == ["../x"]
        ));
        let long = "1".repeat(MAX_VALUE_LEN + 1);
        assert!(matches!(
            check([("net.ipv4.ip_forward", long.as_str())]),
            Err(SysctlError::BadValue(_))
        ));
    }
}
