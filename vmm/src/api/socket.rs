//! Binding unix sockets safely: never steal a live socket, reclaim a stale
//! one, and remove ours when done.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {0} is already in use by a running process")]
    InUse(PathBuf),
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bound listener whose socket file is removed on drop.
pub struct OwnedListener {
    pub listener: UnixListener,
    path: PathBuf,
}

impl OwnedListener {
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OwnedListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_socket_is_refused_stale_one_reclaimed_and_ours_removed() {
        let dir = std::env::temp_dir().join(format!("microvm-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let first = OwnedListener::bind(&path).unwrap();
        assert!(matches!(
            OwnedListener::bind(&path),
            Err(SocketError::InUse(_))
        ));
        assert!(
            path.exists(),
            "a refused bind must not remove the live socket"
        );
        drop(first);
        assert!(!path.exists());
        // A stale socket: bound, then the listener closed without unlinking.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let reclaimed = OwnedListener::bind(&path).unwrap();
        drop(reclaimed);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
