//! Entering a network namespace without moving the shim's own threads.

use super::NetworkError;
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

fn open_netns(netns: &Path) -> Result<File, NetworkError> {
    // std opens with O_CLOEXEC: the fd does not leak into other children.
    File::open(netns).map_err(|source| NetworkError::OpenNetns {
        netns: netns.to_owned(),
        source,
    })
}

/// Runs `work` on a new thread that has joined `netns`, and waits for it.
/// The thread ends with `work`, so its namespace dies with it.
pub(super) fn run_in_netns<T, F>(netns: &Path, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(&Path) -> Result<T, NetworkError> + Send + 'static,
{
    let file = open_netns(netns)?;
    let path = netns.to_owned();
    let thread = std::thread::Builder::new()
        .name("netns-netlink".into())
        .spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                NetworkError::EnterNetns {
                    netns: path.clone(),
                    source: errno.into(),
                }
            })?;
            drop(file);
            work(&path)
        })
        .map_err(|source| NetworkError::Thread {
            netns: netns.to_owned(),
            source,
        })?;
    thread.join().map_err(|_| NetworkError::ThreadPanicked {
        netns: netns.to_owned(),
    })?
}

/// An open netns for a child process to join between fork and exec:
/// open it before spawning, call [`NetnsForChild::enter`] in `pre_exec`.
///
/// ```no_run
/// # fn spawn(command: &mut tokio::process::Command, netns: &std::path::Path)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// let target = microvm_shim::network::NetnsForChild::open(netns)?;
/// // SAFETY: enter() only calls setns(2), which is async-signal-safe.
/// unsafe { command.pre_exec(move || target.enter()) };
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NetnsForChild {
    file: File,
    netns: PathBuf,
}

impl NetnsForChild {
    pub fn open(netns: &Path) -> Result<Self, NetworkError> {
        Ok(Self {
            file: open_netns(netns)?,
            netns: netns.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.netns
    }

    /// Moves the calling thread into the netns. Async-signal-safe (one
    /// setns(2), no allocation), so fit for `pre_exec`; in any other thread
    /// of the shim it would move that thread for good.
    pub fn enter(&self) -> std::io::Result<()> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_netns_is_named() {
        let err = NetnsForChild::open(Path::new("/nonexistent/ns")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ns"), "{err}");
        let err = run_in_netns(Path::new("/nonexistent/ns"), |_| Ok(())).unwrap_err();
        assert!(matches!(err, NetworkError::OpenNetns { .. }), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_netns_cannot_be_entered() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = run_in_netns(file.path(), |_| Ok(())).unwrap_err();
        assert!(matches!(err, NetworkError::EnterNetns { .. }), "{err}");
    }

    #[test]
    fn work_runs_in_the_netns_and_the_caller_stays() {
        let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        // Our own netns, through the path of this thread: the worker thread
        // must see the same namespace and return what the closure returns.
        let seen = run_in_netns(Path::new("/proc/thread-self/ns/net"), |_| {
            Ok(std::fs::read_link("/proc/thread-self/ns/net").ok())
        })
        .unwrap();
        assert_eq!(seen, Some(own.clone()));
        assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own);
        let err = run_in_netns(Path::new("/proc/self/ns/net"), |netns| {
            Err::<(), _>(NetworkError::NoAddress {
                netns: netns.to_owned(),
                interface: "eth9".into(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("eth9"), "{err}");
    }
}
