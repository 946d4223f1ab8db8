//! A busybox rootfs for container tests, built from Debian's static
//! busybox (`busybox-static`, installed by scripts/install-deps.sh): the
//! binary, one symlink per applet, the usual directories, and passwd/group
//! files with a root, a plain user and nobody.

use std::io;
use std::path::Path;
use std::process::Command;

pub const BUSYBOX: &str = "/bin/busybox";

/// uid/gid of the plain user in the fixture's /etc/passwd.
pub const USER_UID: u32 = 1000;
pub const USER_GID: u32 = 1000;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      user:x:1000:1000:user:/home/user:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nwheel:x:10:user\naudio:x:29:user\nuser:x:1000:\nnogroup:x:65534:\n";

/// The applets the static busybox knows (`busybox --list`).
pub fn applets() -> io::Result<Vec<String>> {
    let output = Command::new(BUSYBOX).arg("--list").output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{BUSYBOX} --list failed: {}",
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(str::to_owned)
        .collect())
}

/// Makes a rootfs at `dir` (created if missing).
pub fn build_busybox_rootfs(dir: &Path) -> io::Result<()> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{BUSYBOX} is missing: apt-get install busybox-static (scripts/install-deps.sh)"
            ),
        ));
    }
    for sub in [
        "bin",
        "dev",
        "etc",
        "home/user",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
        "var",
    ] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    std::os::unix::fs::chown(dir.join("home/user"), Some(USER_UID), Some(USER_GID))?;
    let target = dir.join("bin/busybox");
    // A hard link when /tmp and /bin share a filesystem, else a copy.
    if std::fs::hard_link(BUSYBOX, &target).is_err() {
        std::fs::copy(BUSYBOX, &target)?;
    }
    for applet in applets()? {
        if applet == "busybox" {
            continue;
        }
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(&applet))?;
    }
    std::fs::write(dir.join("etc/passwd"), PASSWD)?;
    std::fs::write(dir.join("etc/group"), GROUP)?;
    std::fs::write(dir.join("etc/hostname"), "busybox\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_has_busybox_applets_and_users() {
        let dir = crate::harness::TempDir::new("rootfs");
        build_busybox_rootfs(dir.path()).unwrap();
        assert!(dir.join("bin/busybox").is_file());
        assert_eq!(
            std::fs::read_link(dir.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(std::fs::read_to_string(dir.join("etc/passwd"))
            .unwrap()
            .contains("user:x:1000:1000"));
        let output = Command::new(dir.join("bin/sh"))
            .args(["-c", "echo ok"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    }
}
