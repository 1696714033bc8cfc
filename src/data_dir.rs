//! The data directory's layout:
//!
//! ```text
//! <data-dir>/
//!   users/<user>/     a user's files; their tools see it as /data (the
//!                     mount point of their volume, where there are volumes)
//!   volumes/<user>.ext4  a user's volume (see crate::volume)
//!   scratch/<id>/     one call's /tmp: emptied when the call ends, then reused
//!   cache/            precompiled artifacts (the sandbox's own; never shown to tools)
//!   serve.lock        held by the one process serving the directory (see [`lock`])
//! ```

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::policy::UserId;
use crate::quota::Ledger;
use crate::volume::{DiskSize, VolumeHold, VolumeMode, VolumeSpace, Volumes};

/// A failure to prepare a directory: always the host's problem.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct DataDirError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

impl DataDirError {
    /// Whether the host's disk had no room (for a user's volume, say).
    pub fn is_no_space(&self) -> bool {
        self.source.kind() == io::ErrorKind::StorageFull || self.source.raw_os_error() == Some(libc::ENOSPC)
    }
}

/// Why the data directory's lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Io(String),
}

/// The data directory's lock file.
pub const LOCK_FILE: &str = "serve.lock";

/// Takes `<dir>/serve.lock` (an exclusive `flock`, the holder's pid
/// written in it) for as long as the answer lives: one process serves or
/// restores a data directory at a time. Two servers would sweep each
/// other's scratch directories, restore over each other and count quotas
/// apart. On a filesystem that takes no locks (NFS without its lock
/// service, some FUSE), a warning and `None`: nothing would refuse a second
/// process there.
///
/// # Errors
///
/// [`LockError::InUse`] naming the holder's pid, or what could not be done
/// with its path.
pub fn lock(dir: &Path) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, LockError> {
    use nix::errno::Errno;
    std::fs::create_dir_all(dir).map_err(|e| LockError::Io(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(LOCK_FILE);
    match lock_with_pid(&path) {
        Ok(lock) => Ok(Some(lock)),
        Err(PidLockError::Open(e)) => Err(LockError::Io(format!("opening {}: {e}", path.display()))),
        Err(PidLockError::Lock(Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let pid = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            Err(LockError::InUse(format!(
                "another imagentx-sandbox process{pid} is using the data directory {}: stop it first, or give \
                 this one its own --data-dir",
                dir.display()
            )))
        }
        Err(PidLockError::Lock(e @ (Errno::ENOLCK | Errno::EOPNOTSUPP))) => {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "the data directory's filesystem takes no locks: a second server on it would not be refused"
            );
            Ok(None)
        }
        Err(PidLockError::Lock(e)) => Err(LockError::Io(format!("locking {}: {e}", path.display()))),
    }
}

/// Why [`lock_with_pid`] could not lock.
pub(crate) enum PidLockError {
    Open(std::io::Error),
    Lock(nix::errno::Errno),
}

/// `path` (created if need be) locked exclusively, without waiting, with this
/// process's pid written in it: for the message of the next process refused,
/// and for a backup that reads the holder's mounts (`/proc/<pid>/root`).
/// Writing the pid is best effort (a full disk does not fail the lock).
pub(crate) fn lock_with_pid(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, PidLockError> {
    use std::io::Write;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(PidLockError::Open)?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| PidLockError::Lock(e))?;
    let _ = lock.set_len(0);
    let _ = (&*lock).write_all(format!("{}\n", std::process::id()).as_bytes());
    Ok(lock)
}

/// The sandbox's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// Users' directories: `<root>/users`, or a shared filesystem's
    /// ([`DataDir::with_users_dir`]).
    users: PathBuf,
    /// Emptied scratch directories ready for another call. Creating and
    /// removing a directory per call cost ~250 µs on ext4 with discard
    /// (BENCHMARKS.md); checking that one is empty costs a few.
    spare_scratch: Arc<Mutex<Vec<PathBuf>>>,
    /// Each user's disk ledger (see [`DataDir::ledger`]).
    disks: Arc<Mutex<HashMap<String, UserDisk>>>,
    /// Users' volumes, where the host can mount them.
    volumes: Option<Arc<Volumes>>,
    /// Without volumes: `volumes/` holds images (another process's, or from
    /// a server with volumes), so a user's plain directory may be a mount
    /// point that must not be written here.
    images_present: bool,
}

/// A user's directory, kept usable (their volume mounted) while this lives.
#[derive(Debug)]
pub struct UserDir {
    path: PathBuf,
    _hold: VolumeHold,
}

impl UserDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A user's ledger and the state of its re-measurement.
#[derive(Debug, Default)]
struct UserDisk {
    /// `None` until first measured.
    ledger: Option<Arc<Ledger>>,
    /// A background re-measurement is running.
    measuring: bool,
    /// Something may have written since that re-measurement started.
    stale: bool,
}

/// Shortest time between two measurements of one user's directory.
const RE_MEASURE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Spare scratch directories kept at most; beyond that they are removed.
const MAX_SPARE_SCRATCH: usize = 256;

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
        let images_present = std::fs::read_dir(root.join("volumes"))
            .map(|entries| entries.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".ext4")))
            .unwrap_or(false);
        let users = root.join("users");
        Ok(Self { root, users, spare_scratch: Arc::default(), disks: Arc::default(), volumes: None, images_present })
    }

    /// Opens the data directory at `root` with users' volumes as `mode` asks
    /// and the host allows (see [`Volumes::open`]).
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when a directory cannot be created, or when `mode`
    /// demands volumes that the host cannot make.
    pub fn open_with_volumes(
        root: impl Into<PathBuf>,
        mode: VolumeMode,
        space: VolumeSpace,
    ) -> Result<Self, DataDirError> {
        let mut this = Self::open(root)?;
        let volumes = Volumes::open(&this.root, mode, space).map_err(|why| DataDirError {
            what: "opening",
            path: this.root.join("volumes"),
            source: io::Error::other(why),
        })?;
        this.volumes = volumes.map(Arc::new);
        Ok(this)
    }

    /// Keeps users' directories in `users` (created if needed) rather than
    /// under the data directory: a filesystem every node mounts.
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when it cannot be created, or the data directory
    /// has volumes (one host's: they cannot be shared).
    pub fn with_users_dir(mut self, users: PathBuf) -> Result<Self, DataDirError> {
        if self.volumes.is_some() {
            let source = io::Error::other("users' volumes are one host's: they cannot be on a shared directory");
            return Err(DataDirError { what: "sharing", path: users, source });
        }
        std::fs::create_dir_all(&users).map_err(|source| DataDirError {
            what: "creating",
            path: users.clone(),
            source,
        })?;
        self.users = users;
        Ok(self)
    }

    /// The users' volumes, when there are.
    pub fn volumes(&self) -> Option<&Arc<Volumes>> {
        self.volumes.as_ref()
    }

    /// The user's directory for a call or a file request that may write
    /// into it up to `size`: their volume made and mounted first, where
    /// there are volumes.
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when the directory or the volume cannot be made.
    pub async fn open_user(&self, user: &UserId, size: DiskSize) -> Result<UserDir, DataDirError> {
        let hold = match &self.volumes {
            None => VolumeHold::none(),
            Some(volumes) => match volumes.hold_if_mounted(user.as_str(), size) {
                Some(hold) => hold,
                None => {
                    let (volumes, name) = (Arc::clone(volumes), user.as_str().to_owned());
                    tokio::task::spawn_blocking(move || volumes.hold(&name, Some(size)))
                        .await
                        .map_err(io::Error::other)
                        .and_then(|held| {
                            held.map_err(|e| {
                                let kind =
                                    if e.is_no_space() { io::ErrorKind::StorageFull } else { io::ErrorKind::Other };
                                io::Error::new(kind, e)
                            })
                        })
                        .map_err(|source| DataDirError {
                            what: "preparing the volume of",
                            path: self.users.join(user.as_str()),
                            source,
                        })?
                }
            },
        };
        Ok(UserDir { path: self.user_dir(user)?, _hold: hold })
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
        let path = self.users.join(user.as_str());
        if self.volumes.is_none() && self.images_present {
            let image = self.root.join("volumes").join(format!("{user}.ext4"));
            if image.exists() {
                let source = io::Error::other(format!(
                    "this user's files are in their volume {}, which only a server with data volumes \
                     mounts (`serve` as root): use them through it",
                    image.display()
                ));
                return Err(DataDirError { what: "using user directory", path, source });
            }
        }
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

    /// The user's disk ledger: what their directory holds, charged at every
    /// write by their calls and the files API (see [`crate::quota`]). Measured
    /// now (on a blocking thread) the first time. `None` when the directory
    /// cannot be measured (then treat the quota as used up).
    pub async fn ledger(&self, user: &UserId) -> Option<Arc<Ledger>> {
        let cached =
            self.disks.lock().unwrap_or_else(PoisonError::into_inner).get(user.as_str()).and_then(|d| d.ledger.clone());
        if cached.is_some() {
            return cached;
        }
        let this = self.clone();
        let user = user.clone();
        tokio::task::spawn_blocking(move || this.measure(&user)).await.ok().flatten()
    }

    /// Bytes in the user's directory as charged now.
    pub async fn usage(&self, user: &UserId) -> Option<u64> {
        self.ledger(user).await.map(|l| l.used().0)
    }

    /// Marks the user's directory as changed behind the ledger's back (a
    /// native call writes past it), or possibly over-counted (a call ran into
    /// its quota): it is walked again in the background, and the result is
    /// taken when nothing charged the ledger meanwhile. One walk per user at a
    /// time; a change during one runs another.
    pub fn usage_changed(&self, user: &UserId) {
        {
            let mut disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = disks.entry(user.as_str().to_owned()).or_default();
            if entry.measuring {
                entry.stale = true;
                return;
            }
            entry.measuring = true;
            entry.stale = false;
        }
        let this = self.clone();
        let user = user.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                this.measure(&user);
                let mut disks = this.disks.lock().unwrap_or_else(PoisonError::into_inner);
                let entry = disks.entry(user.as_str().to_owned()).or_default();
                if !entry.stale {
                    entry.measuring = false;
                    return;
                }
                entry.stale = false;
                drop(disks);
                // A busy user's calls keep marking it stale: walk at most
                // every RE_MEASURE_INTERVAL rather than back to back.
                std::thread::sleep(RE_MEASURE_INTERVAL);
            }
        });
    }

    /// Walks the user's directory now and records the result: a new ledger
    /// the first time; afterwards the walk's figures replace the ledger's only
    /// when nothing charged it while the walk ran (see [`Ledger::replace_if_quiet`]).
    fn measure(&self, user: &UserId) -> Option<Arc<Ledger>> {
        let existing =
            self.disks.lock().unwrap_or_else(PoisonError::into_inner).get(user.as_str()).and_then(|d| d.ledger.clone());
        let changes_before = existing.as_ref().map(|l| l.changes());
        // The volume mounted for the walk (an unmounted one reads as empty).
        let hold = match &self.volumes {
            Some(volumes) => match volumes.hold(user.as_str(), None) {
                Ok(hold) => hold,
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "cannot measure the data directory; treating its quota as used up");
                    return existing;
                }
            },
            None => VolumeHold::none(),
        };
        let walked = self
            .user_dir(user)
            .map_err(|e| e.to_string())
            .and_then(|dir| crate::userfs::UserFs::open(&dir).and_then(|fs| fs.usage()).map_err(|e| e.to_string()));
        drop(hold);
        let (bytes, entries) = match walked {
            Ok(figures) => figures,
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "cannot measure the data directory; treating its quota as used up");
                return existing;
            }
        };
        if let (Some(ledger), Some(before)) = (&existing, changes_before) {
            if !ledger.replace_if_quiet(before, bytes, entries) {
                tracing::debug!(user = %user, "data directory written during its walk; the ledger's figures stand");
            }
            return existing;
        }
        let mut disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = disks.entry(user.as_str().to_owned()).or_default();
        // Another walk may have made it first: keep that one, it may hold charges.
        Some(Arc::clone(entry.ledger.get_or_insert_with(|| Ledger::new(bytes, entries))))
    }

    /// Removes every scratch directory: left by an earlier process that was
    /// killed mid-call. Only for a server starting on its own data directory.
    /// Answers how many were removed.
    pub fn sweep_scratch(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.root.join("scratch")) else { return 0 };
        entries.filter_map(Result::ok).filter(|e| std::fs::remove_dir_all(e.path()).is_ok()).count()
    }

    /// An empty scratch directory for one call: a spare one, or a new one.
    /// Dropping it removes it; [`Scratch::recycle`] keeps it for another call.
    ///
    /// # Errors
    ///
    /// [`DataDirError`] when a new one cannot be created.
    pub fn scratch(&self) -> Result<Scratch, DataDirError> {
        let spare = self.spare_scratch.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let path = match spare {
            Some(path) => path,
            None => {
                let path = self.root.join("scratch").join(uuid::Uuid::now_v7().simple().to_string());
                std::fs::create_dir(&path).map_err(|source| DataDirError {
                    what: "creating",
                    path: path.clone(),
                    source,
                })?;
                path
            }
        };
        Ok(Scratch { path: Some(path), spares: self.spare_scratch.clone() })
    }
}

/// A call's `/tmp`. Dropped, it is removed with everything the tool left there
/// (`remove_dir_all` does not follow symlinks the tool may have planted).
#[derive(Debug)]
pub struct Scratch {
    path: Option<PathBuf>,
    spares: Arc<Mutex<Vec<PathBuf>>>,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Empties the directory and keeps it for another call, which may be
    /// another user's. Only call this when nothing of the finished call can
    /// still write into it: no host call of the tool may still be running.
    /// A directory that cannot be emptied, or is not empty afterwards, is
    /// removed instead.
    pub fn recycle(mut self) {
        let Some(path) = self.path.take() else { return };
        match empty_dir(&path) {
            Ok(true) => {
                let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
                if spares.len() < MAX_SPARE_SCRATCH {
                    spares.push(path);
                    return;
                }
            }
            Ok(false) => tracing::warn!(path = %path.display(), "scratch directory not empty after clearing"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "scratch directory not cleared"),
        }
        remove(&path);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            remove(&path);
        }
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "scratch directory not removed");
    }
}

/// Removes everything inside `dir` without following symlinks, and says
/// whether it is empty afterwards.
fn empty_dir(dir: &Path) -> io::Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(std::fs::read_dir(dir)?.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leave_things_in(path: &Path) {
        std::fs::create_dir(path.join("sub")).unwrap();
        std::fs::write(path.join("sub/file"), b"left over").unwrap();
        std::fs::write(path.join(".hidden"), b"left over").unwrap();
        std::os::unix::fs::symlink("/etc", path.join("etc")).unwrap();
    }

    #[test]
    fn a_recycled_scratch_comes_back_empty_and_symlinks_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        let scratch = dir.scratch().unwrap();
        let path = scratch.path().to_owned();
        leave_things_in(&path);
        scratch.recycle();
        let again = dir.scratch().unwrap();
        assert_eq!(again.path(), path, "the spare directory was not reused");
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        assert!(Path::new("/etc/passwd").exists(), "clearing followed a planted symlink");
        // Two calls at once get two directories.
        let other = dir.scratch().unwrap();
        assert_ne!(other.path(), again.path());
    }

    #[test]
    fn scratch_is_removed_with_what_was_left_in_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        let scratch = dir.scratch().unwrap();
        let path = scratch.path().to_owned();
        leave_things_in(&path);
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
