//! Where artifacts are cached and where the repo's inputs are.

use std::path::PathBuf;

pub use microvm_abi::image::{cache_root, CACHE_DIR_ENV, DEFAULT_CACHE_DIR};
/// Overrides the repo root (where `kernel-config/` and `guest-image/` are).
pub const REPO_DIR_ENV: &str = "MICROVM_REPO_DIR";

/// The workspace root this crate was compiled from (the build scripts and
/// the agent's sources live there), unless [`REPO_DIR_ENV`] says otherwise.
pub fn repo_root() -> PathBuf {
    match std::env::var_os(REPO_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            manifest_dir
                .parent()
                .map(PathBuf::from)
                .unwrap_or(manifest_dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_root_holds_the_kernel_fragments() {
        // Compiled-in default (the test does not set the override).
        if std::env::var_os(REPO_DIR_ENV).is_none() {
            assert!(repo_root()
                .join("kernel-config")
                .join("base.config")
                .is_file());
            assert!(repo_root().join("guest-agent").join("Cargo.toml").is_file());
        }
    }
}
