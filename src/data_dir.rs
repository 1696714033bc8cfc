//! The data directory's layout:
//!
//! ```text
//! <data-dir>/
//!   users/<user>/     a user's files; their tools see it as /data
//!   scratch/<id>/     one call's /tmp, removed when the call ends
//!   cache/            precompiled artifacts (the sandbox's own; never shown to tools)
//! ```

use std::io;
use std::path::{Path, PathBuf};

use crate::policy::UserId;

/// A failure to prepare a directory: always the host's problem.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct DataDirError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

/// The sandbox's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens (creating if needed) the data directory at `root`.
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when a directory cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, DataDirError> {
        let root = root.into();
        for sub in ["users", "scratch", "cache"] {
            let path = root.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| DataDirError { what: "creating", path, source })?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// The user's directory, created on first use.
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when it cannot be created, or when something other than
    /// a directory (a symlink, a file) stands at its path.
    pub fn user_dir(&self, user: &UserId) -> Result<PathBuf, DataDirError> {
        let path = self.root.join("users").join(user.as_str());
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Never follow a symlink standing in for a user's directory.
                let meta = std::fs::symlink_metadata(&path).map_err(|source| DataDirError {
                    what: "inspecting",
                    path: path.clone(),
                    source,
                })?;
                if meta.is_dir() {
                    Ok(path)
                } else {
                    let source = io::Error::other("not a directory (a symlink or a file)");
                    Err(DataDirError { what: "using user directory", path, source })
                }
            }
            Err(source) => Err(DataDirError { what: "creating", path, source }),
        }
    }

    /// A fresh, empty scratch directory for one call; removed when dropped.
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when it cannot be created.
    pub fn scratch(&self, execution_id: &str) -> Result<Scratch, DataDirError> {
        let path = self.root.join("scratch").join(execution_id);
        std::fs::create_dir(&path).map_err(|source| DataDirError { what: "creating", path: path.clone(), source })?;
        Ok(Scratch { path })
    }
}

/// A call's `/tmp`. Dropping it removes it and everything the tool left there;
/// `remove_dir_all` does not follow symlinks the tool may have planted.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "scratch directory not removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_is_removed_with_what_was_left_in_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        let scratch = dir.scratch("x1").unwrap();
        let path = scratch.path().to_owned();
        std::fs::create_dir(path.join("sub")).unwrap();
        std::fs::write(path.join("sub/file"), b"left over").unwrap();
        std::os::unix::fs::symlink("/etc", path.join("etc")).unwrap();
        drop(scratch);
        assert!(!path.exists());
        assert!(Path::new("/etc/passwd").exists(), "removal followed a planted symlink");
    }

    #[test]
    fn a_symlink_in_place_of_a_user_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("users/mallory")).unwrap();
        let err = dir.user_dir(&UserId::new("mallory").unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(dir.user_dir(&UserId::new("alice").unwrap()).unwrap().is_dir());
    }
}
