//! `microvm-ctl install` and `uninstall`. Install copies the binaries and
//! the guest image, writes a default shim config (never over an edited
//! one), and registers the runtime in containerd's config (backing the
//! original up). Every step goes into a manifest, and uninstall undoes
//! exactly those steps, last first. `--root DIR` installs into a tree
//! (tests, packagers, the DaemonSet's `/host`).

use crate::containerd_config;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const BINARIES: [&str; 3] = ["containerd-shim-microvm-v2", "microvm-vmm", "microvm-ctl"];
const MANIFEST: &str = "var/lib/microvm/install-manifest.json";
const BACKUP_SUFFIX: &str = ".microvm-backup";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Where binaries and the guest image go (bin/, share/microvm/).
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Install into this tree instead of / (paths written into configs stay
    /// the node's).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Where the binaries are taken from; default: beside this binary.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Guest kernel to install; default: the cached guest image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs to install; default: the cached release initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// The backend the default shim config selects (qemu on hosts without
    /// real KVM: see `microvm-ctl check`).
    #[arg(long, default_value = "builtin", value_parser = ["builtin", "qemu"])]
    backend: String,
    /// containerd's config, merged in place.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The tree install wrote into.
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest image is not built: {0} (run `cargo run -p microvm-guest-image --bin microvm-image -- all`, or pass --kernel and --initramfs)")]
    GuestImage(String),
    #[error("{path}")]
    Containerd {
        path: PathBuf,
        #[source]
        source: containerd_config::MergeError,
    },
    #[error("an install is recorded already ({0}); run `microvm-ctl uninstall` first")]
    AlreadyInstalled(PathBuf),
    #[error("nothing to uninstall: no manifest at {0}")]
    NoManifest(PathBuf),
    #[error("the manifest {path} is not valid")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One step install took, as uninstall undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Step {
    CreatedDir {
        path: PathBuf,
    },
    CreatedFile {
        path: PathBuf,
    },
    /// The file existed; the original is at `backup`.
    ReplacedFile {
        path: PathBuf,
        backup: PathBuf,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub steps: Vec<Step>,
}

/// `path` (a node path) inside `root`.
pub fn in_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

struct Installer {
    steps: Vec<Step>,
}

impl Installer {
    fn create_dirs(&mut self, dir: &Path) -> Result<(), InstallError> {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(dir) = at {
            if dir.exists() {
                break;
            }
            missing.push(dir.to_path_buf());
            at = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            std::fs::create_dir(&dir).map_err(io("creating", &dir))?;
            self.steps.push(Step::CreatedDir { path: dir });
        }
        Ok(())
    }

    /// Writes `contents` at `path`, backing up what was there.
    fn write(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(parent) = path.parent() {
            self.create_dirs(parent)?;
        }
        let step = if path.exists() {
            let mut backup = path.as_os_str().to_owned();
            backup.push(BACKUP_SUFFIX);
            let backup = PathBuf::from(backup);
            std::fs::rename(path, &backup).map_err(io("backing up", path))?;
            Step::ReplacedFile {
                path: path.to_path_buf(),
                backup,
            }
        } else {
            Step::CreatedFile {
                path: path.to_path_buf(),
            }
        };
        self.steps.push(step);
        let temporary = path.with_extension("microvm-tmp");
        std::fs::write(&temporary, contents).map_err(io("writing", &temporary))?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
            .map_err(io("setting the mode of", &temporary))?;
        std::fs::rename(&temporary, path).map_err(io("writing", path))
    }

    fn copy(&mut self, from: &Path, to: &Path, mode: u32) -> Result<(), InstallError> {
        let contents = std::fs::read(from).map_err(io("reading", from))?;
        if std::fs::read(to).ok().as_deref() == Some(contents.as_slice()) {
            println!("unchanged  {}", to.display());
            return Ok(());
        }
        self.write(to, &contents, mode)?;
        println!("installed  {}", to.display());
        Ok(())
    }
}

/// The shim config install writes: the installed image and VMM.
pub fn default_config(prefix: &Path, backend: &str) -> String {
    let share = prefix.join("share/microvm");
    let qemu = if backend == "qemu" {
        "\n# No real KVM on this node (see `microvm-ctl check`): QEMU with TCG.\n[qemu]\naccel = \"tcg\"\n"
    } else {
        ""
    };
    format!(
        r#"# Written by `microvm-ctl install`. Every key: docs/shim.md, config/microvm.toml.
# Edit freely: install never overwrites an edited file.
backend = "{backend}"

[vm]
kernel = "{kernel}"
initramfs = "{initramfs}"

[builtin]
vmm = "{vmm}"

# `microvm-ctl console POD`: a shell in a pod's VM. Off: it is a door into
# the guest.
[console]
enabled = false
shell = "/bin/busybox"
{qemu}"#,
        kernel = share.join("vmlinux").display(),
        initramfs = share.join("initramfs.cpio").display(),
        vmm = prefix.join("bin/microvm-vmm").display(),
    )
}

fn guest_image(args: &InstallArgs) -> Result<(PathBuf, PathBuf), InstallError> {
    let cached = || {
        microvm_shim::vm::guest_image(&microvm_shim::config::Config::default())
            .map_err(|err| InstallError::GuestImage(microvm_shim::pod::error_chain(&err)))
    };
    match (&args.kernel, &args.initramfs) {
        (Some(kernel), Some(initramfs)) => Ok((kernel.clone(), initramfs.clone())),
        (Some(kernel), None) => Ok((kernel.clone(), cached()?.1)),
        (None, Some(initramfs)) => Ok((cached()?.0, initramfs.clone())),
        (None, None) => cached(),
    }
}

pub fn install(shim_config: &Path, args: &InstallArgs) -> anyhow::Result<()> {
    let manifest_path = in_root(&args.root, Path::new("/").join(MANIFEST).as_path());
    if manifest_path.exists() {
        return Err(InstallError::AlreadyInstalled(manifest_path).into());
    }
    let from = match &args.from {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let (kernel, initramfs) = guest_image(args)?;
    let mut installer = Installer { steps: Vec::new() };
    let result = (|| -> anyhow::Result<bool> {
        let bin = in_root(&args.root, &args.prefix.join("bin"));
        for name in BINARIES {
            installer.copy(&from.join(name), &bin.join(name), 0o755)?;
        }
        let share = in_root(&args.root, &args.prefix.join("share/microvm"));
        installer.copy(&kernel, &share.join("vmlinux"), 0o644)?;
        installer.copy(&initramfs, &share.join("initramfs.cpio"), 0o644)?;

        let config_path = in_root(&args.root, shim_config);
        let wanted = default_config(&args.prefix, &args.backend);
        match std::fs::read_to_string(&config_path) {
            Ok(existing) if existing == wanted => println!("unchanged  {}", config_path.display()),
            Ok(existing) => {
                println!(
                    "kept       {} (edited; not overwritten). The default differs:",
                    config_path.display()
                );
                let diff = similar::TextDiff::from_lines(&existing, &wanted);
                print!(
                    "{}",
                    diff.unified_diff()
                        .header(&config_path.display().to_string(), "default")
                );
            }
            Err(_) => {
                installer.write(&config_path, wanted.as_bytes(), 0o644)?;
                println!("wrote      {}", config_path.display());
            }
        }

        let containerd = in_root(&args.root, &args.containerd_config);
        let text = std::fs::read_to_string(&containerd).unwrap_or_default();
        let merged = containerd_config::merge(&text, &shim_config.display().to_string()).map_err(
            |source| InstallError::Containerd {
                path: containerd.clone(),
                source,
            },
        )?;
        Ok(match merged {
            Some(merged) => {
                installer.write(&containerd, merged.as_bytes(), 0o644)?;
                println!("merged     {} (runtime `microvm`)", containerd.display());
                true
            }
            None => {
                println!(
                    "unchanged  {} (runtime `microvm` registered)",
                    containerd.display()
                );
                false
            }
        })
    })();
    let changed_containerd = match result {
        Ok(changed) => changed,
        Err(err) => {
            // Undo the partial install.
            undo(&installer.steps);
            return Err(err);
        }
    };
    let mut manifest_installer = Installer { steps: Vec::new() };
    if let Some(parent) = manifest_path.parent() {
        manifest_installer.create_dirs(parent)?;
    }
    let mut steps = manifest_installer.steps;
    steps.extend(installer.steps);
    let manifest = Manifest { steps };
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)
        .map_err(io("writing", &manifest_path))?;
    println!("manifest   {}", manifest_path.display());
    if changed_containerd {
        println!("containerd must be restarted to load the runtime: systemctl restart containerd");
    } else {
        println!("containerd need not be restarted");
    }
    println!("next: microvm-ctl check");
    Ok(())
}

fn undo(steps: &[Step]) {
    for step in steps.iter().rev() {
        let result = match step {
            Step::CreatedFile { path } => std::fs::remove_file(path),
            Step::ReplacedFile { path, backup } => std::fs::rename(backup, path),
            Step::CreatedDir { path } => std::fs::remove_dir(path),
        };
        match result {
            Ok(()) => println!("undone     {step:?}"),
            Err(err) => eprintln!("microvm-ctl: cannot undo {step:?}: {err}"),
        }
    }
}

pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let manifest_path = in_root(&args.root, Path::new("/").join(MANIFEST).as_path());
    let text = std::fs::read(&manifest_path)
        .map_err(|_| InstallError::NoManifest(manifest_path.clone()))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|source| InstallError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
    std::fs::remove_file(&manifest_path).map_err(io("removing", &manifest_path))?;
    undo(&manifest.steps);
    println!("restart containerd if it loaded the runtime: systemctl restart containerd");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_a_valid_shim_config() {
        let text = default_config(Path::new("/usr/local"), "qemu");
        let config = microvm_shim::config::Config::parse(&text, Path::new("t")).unwrap();
        assert_eq!(
            config.vm.kernel,
            Path::new("/usr/local/share/microvm/vmlinux")
        );
        assert!(!config.console.enabled);
        assert_eq!(
            in_root(Path::new("/host"), Path::new("/etc/x")),
            Path::new("/host/etc/x")
        );
    }
}
