//! The kernel modules L1 loads, in dependency order.
//!
//! A package extracted with `dpkg -x` has no `modules.dep` (depmod runs in
//! the postinst) and this host has no kmod, so the dependencies come from
//! each module's own `.modinfo` section: NUL-separated `key=value` strings,
//! one of which is `depends=a,b`. Reading that one key is a few lines; a
//! whole ELF parser would be more code than the job.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What L1 needs, by module name. Dependencies are added on their own.
pub const WANTED: &[&str] = &[
    // The host's files (virtio-fs over PCI) and the channel to the harness.
    "virtio_pci",
    "virtio_console",
    "virtiofs",
    // A writable root over the read-only host files.
    "overlay",
    // The point of L1: a real /dev/kvm (QEMU's TCG emulates AMD SVM).
    "kvm_amd",
    // Pod networking: taps, veths, the CNI bridge, tc redirects and the
    // tap's frame filters.
    "tun",
    "veth",
    "bridge",
    "sch_ingress",
    "cls_u32",
    "cls_flower",
    "cls_basic",
    "cls_bpf",
    "act_mirred",
    "act_gact",
    "act_police",
    "sch_tbf",
    // The shim's port-forward rule (`iptables -t nat ... -p tcp ... -j
    // REDIRECT`, through Debian's iptables-nft).
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "xt_REDIRECT",
    "xt_tcpudp",
    // Entropy for L1 itself.
    "virtio_rng",
];

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("kernel module {name} is not in {dir} (is the L1 kernel package complete?)")]
    Missing { name: String, dir: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One module to load: its name and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// Module names treat `-` and `_` alike (`kvm-amd.ko` is `kvm_amd`).
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `*.ko` under `dir`, by canonical name.
fn index(dir: &Path) -> Result<HashMap<String, PathBuf>, ModuleError> {
    let mut found = HashMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ModuleError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".ko"))
            {
                found.insert(canonical(stem), path);
            }
        }
    }
    Ok(found)
}

/// The `depends=` list of a module file.
pub fn depends_of(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = module
        .windows(KEY.len())
        .position(|window| window == KEY)
        .map(|at| at + KEY.len())
    else {
        return Vec::new();
    };
    let rest = &module[start..];
    let end = rest
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(canonical)
        .collect()
}

/// `wanted` and everything they depend on, each after its dependencies.
pub fn load_order(dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, ModuleError> {
    let available = index(dir)?;
    let mut order = Vec::new();
    let mut placed = HashSet::new();
    for name in wanted {
        place(&canonical(name), dir, &available, &mut placed, &mut order)?;
    }
    Ok(order)
}

fn place(
    name: &str,
    dir: &Path,
    available: &HashMap<String, PathBuf>,
    placed: &mut HashSet<String>,
    order: &mut Vec<Module>,
) -> Result<(), ModuleError> {
    // Inserted before the recursion: a dependency cycle (which the kernel
    // refuses anyway) ends here instead of looping.
    if !placed.insert(name.to_owned()) {
        return Ok(());
    }
    let path = available
        .get(name)
        .ok_or_else(|| ModuleError::Missing {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
        })?
        .clone();
    let bytes = std::fs::read(&path).map_err(|source| ModuleError::Read {
        path: path.clone(),
        source,
    })?;
    for dependency in depends_of(&bytes) {
        place(&dependency, dir, available, placed, order)?;
    }
    order.push(Module {
        name: name.to_owned(),
        path,
    });
    Ok(())
}

/// The trailer `scripts/sign-file` appends to a signed module.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: five u8 fields, three pad bytes, then the
/// signature's length as a big-endian u32.
const SIGNATURE_INFO_LEN: usize = 12;

/// The module without its appended signature. Checking a signature under
/// TCG costs more than loading the module, and L1's kernel does not
/// enforce them (`CONFIG_MODULE_SIG_FORCE` is off; it only notes the
/// taint). A module without a well-formed trailer is returned whole.
pub fn without_signature(module: &[u8]) -> &[u8] {
    let Some(rest) = module.strip_suffix(SIGNATURE_MAGIC) else {
        return module;
    };
    let Some(info_at) = rest.len().checked_sub(SIGNATURE_INFO_LEN) else {
        return module;
    };
    let info = &rest[info_at..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match info_at.checked_sub(sig_len) {
        Some(end) => &module[..end],
        None => module,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(depends: &str) -> Vec<u8> {
        let mut bytes = b"\x7fELF junk\0license=GPL\0".to_vec();
        bytes.extend_from_slice(format!("depends={depends}\0name=x\0").as_bytes());
        bytes
    }

    #[test]
    fn depends_are_read_from_modinfo() {
        assert_eq!(
            depends_of(&module("virtio_ring,virtio")),
            ["virtio_ring", "virtio"]
        );
        assert!(depends_of(&module("")).is_empty());
        assert!(depends_of(b"no modinfo at all").is_empty());
        assert_eq!(depends_of(&module("kvm-intel")), ["kvm_intel"]);
    }

    #[test]
    fn signatures_are_stripped_and_anything_else_is_kept() {
        let body = b"\x7fELF module body".to_vec();
        let mut signed = body.clone();
        signed.extend_from_slice(&[0xAA; 5]);
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        signed.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&signed), body.as_slice());
        assert_eq!(without_signature(&body), body.as_slice());
        let mut bogus = b"ab".to_vec();
        bogus.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 99]);
        bogus.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&bogus), bogus.as_slice());
    }

    #[test]
    fn dependencies_load_first_once_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, depends: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, module(depends)).unwrap();
        };
        write("arch/x86/kvm/kvm-amd.ko", "kvm");
        write("arch/x86/kvm/kvm.ko", "irqbypass");
        write("virt/lib/irqbypass.ko", "");
        write("fs/overlayfs/overlay.ko", "");
        write("net/bridge/bridge.ko", "llc,stp");
        let names = |order: Vec<Module>| order.into_iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(
            names(load_order(dir.path(), &["kvm_amd", "overlay", "kvm"]).unwrap()),
            ["irqbypass", "kvm", "kvm_amd", "overlay"]
        );
        let err = load_order(dir.path(), &["bridge"]).unwrap_err();
        assert!(err.to_string().contains("kernel module llc"), "{err}");
    }
}
