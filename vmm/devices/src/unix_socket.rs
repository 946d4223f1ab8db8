//! Listening unix sockets that are safe to publish: a live socket is never
//! stolen, a stale one is replaced, a non-socket file is never touched, and
//! ours is removed on drop (only if the path still names our inode).
//!
//! The socket is bound and listening under a temporary name and then
//! hard-linked into place. A client that sees the path therefore always
//! finds a listener (a plain `bind` publishes the file before `listen`, so a
//! fast client gets ECONNREFUSED), and `link` fails instead of replacing a
//! socket that another process published meanwhile.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error("socket path {} is already in use by a running process", .0.display())]
    InUse(PathBuf),
    #[error("path {} exists and is not a unix socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot bind unix socket {}: {source}", .path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot remove stale socket {}: {source}", .path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
}

#[derive(Debug)]
pub struct OwnedListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we published.
    file_id: (u64, u64),
}

/// A short, unique sibling name: unix socket paths are limited to 108 bytes.
fn temporary_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{}.{n}.sock", std::process::id()))
}

impl OwnedListener {
    pub fn bind(path: &Path) -> Result<Self, UnixSocketError> {
        let bind_error = |source| UnixSocketError::Bind {
            path: path.to_owned(),
            source,
        };
        let temporary = temporary_sibling(path);
        let _ = fs::remove_file(&temporary);
        let listener = UnixListener::bind(&temporary).map_err(bind_error)?;
        let published = Self::publish(&temporary, path);
        // The listener stays bound to the inode; the temporary name goes.
        let _ = fs::remove_file(&temporary);
        published?;
        let meta = fs::symlink_metadata(path).map_err(bind_error)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            file_id: (meta.dev(), meta.ino()),
        })
    }

    fn publish(temporary: &Path, path: &Path) -> Result<(), UnixSocketError> {
        match fs::hard_link(temporary, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                reclaim_stale(path)?;
                fs::hard_link(temporary, path).map_err(|source| match source.kind() {
                    // Someone published a socket between our check and link.
                    io::ErrorKind::AlreadyExists => UnixSocketError::InUse(path.to_owned()),
                    _ => UnixSocketError::Bind {
                        path: path.to_owned(),
                        source,
                    },
                })
            }
            Err(source) => Err(UnixSocketError::Bind {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes `path` if it is a socket nobody listens on.
fn reclaim_stale(path: &Path) -> Result<(), UnixSocketError> {
    let meta = fs::symlink_metadata(path).map_err(|source| UnixSocketError::Bind {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_socket() {
        return Err(UnixSocketError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(UnixSocketError::InUse(path.to_owned())),
        // A full backlog also means someone is listening.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(UnixSocketError::InUse(path.to_owned()))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing stale socket");
            fs::remove_file(path).map_err(|source| UnixSocketError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(UnixSocketError::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Drop for OwnedListener {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file_id)
            .unwrap_or(false);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("mvd-sock-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn published_socket_accepts_at_once_and_is_removed_on_drop() {
        let dir = Dir::new("publish");
        let path = dir.0.join("api.sock");
        let owned = OwnedListener::bind(&path).unwrap();
        drop(UnixStream::connect(&path).unwrap());
        owned.listener().accept().unwrap();
        let names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("api.sock")],
            "temporary name left behind"
        );
        drop(owned);
        assert!(!path.exists());
    }

    #[test]
    fn live_socket_is_refused_and_kept() {
        let dir = Dir::new("live");
        let path = dir.0.join("v.sock");
        let live = UnixListener::bind(&path).unwrap();
        let err = OwnedListener::bind(&path).unwrap_err();
        assert!(
            matches!(err, UnixSocketError::InUse(ref p) if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("already in use"), "{err}");
        drop(UnixStream::connect(&path).unwrap());
        live.accept().unwrap();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = Dir::new("stale");
        let path = dir.0.join("v.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "std leaves the socket file behind");
        let owned = OwnedListener::bind(&path).unwrap();
        drop(UnixStream::connect(&path).unwrap());
        owned.listener().accept().unwrap();
    }

    #[test]
    fn regular_file_is_never_touched() {
        let dir = Dir::new("file");
        let path = dir.0.join("v.sock");
        fs::write(&path, b"keep me").unwrap();
        assert!(matches!(
            OwnedListener::bind(&path),
            Err(UnixSocketError::NotASocket(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn a_replaced_path_is_not_removed_on_drop() {
        let dir = Dir::new("replaced");
        let path = dir.0.join("v.sock");
        let owned = OwnedListener::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"someone else's").unwrap();
        drop(owned);
        assert_eq!(fs::read(&path).unwrap(), b"someone else's");
    }
}
