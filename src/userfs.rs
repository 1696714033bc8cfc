//! A user's data directory as the files API sees it: the directory their
//! tools see as `/data`, which those tools may have filled with symlinks,
//! FIFOs and deep trees on purpose.
//!
//! Every path is resolved from a descriptor of the user's directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: no `..`, no absolute
//! path and no symlink (planted anywhere along the path) leads outside it or
//! is followed at all. Nothing is opened by a path string from the host's
//! root. Writes go to a temporary file beside the target and are renamed
//! over it, so a reader sees the old file or the new one, never half.
//!
//! Why not `cap-std` (which the engine uses, through wasmtime-wasi, for the
//! guests' own preopens): a `cap_std::fs::Dir` keeps a path beneath its
//! directory, but follows symlinks on the way as long as they resolve inside
//! it; `cap_fs_ext`'s `FollowSymlinks::No` covers only a path's last
//! component ("if `foo` or `bar` are symlinks, they will always be
//! followed", its documentation says). Here no symlink may be followed at
//! all: a tool can plant `a -> b` in `/data`, and the files API must not
//! let a request for `a/x` read or replace `b/x` behind its quota walk or
//! its listing. Keeping that with cap-std would mean opening each
//! component apart with `open_dir_nofollow`, a syscall per component
//! rewriting by hand what one `openat2` with `RESOLVE_NO_SYMLINKS` has the
//! kernel enforce. Either way a FIFO is opened without blocking
//! (`O_NONBLOCK`) and nothing but files and directories is read (the type is
//! checked on the descriptor).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::quota::{Budget, Exceeded};

/// Longest path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Deepest directory nesting walked when measuring usage.
const MAX_DEPTH: usize = 64;
const UPLOAD_PREFIX: &str = ".imagentx-upload-";

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("bad path: {0}")]
    BadPath(String),
    /// A path that would leave the user's directory (`..`, absolute, or
    /// through a link out): refused, and an escape attempt.
    #[error("bad path: {0}")]
    Escape(String),
    #[error("no such file or directory")]
    NotFound,
    #[error("the path passes through a symbolic link, which is never followed")]
    Symlink,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("file system: {0}")]
    Io(String),
    /// The filesystem holding the directory is full (ENOSPC).
    #[error("{0}: no space left on the device")]
    NoSpace(String),
}

fn io_error(what: &str, e: Errno) -> FsError {
    match e {
        Errno::ENOENT => FsError::NotFound,
        Errno::ELOOP => FsError::Symlink,
        Errno::ENOTDIR => FsError::Conflict("a parent in the path is not a directory".into()),
        Errno::EXDEV => FsError::Escape("the path leaves the data directory".into()),
        Errno::EISDIR => FsError::Conflict("the path is a directory".into()),
        Errno::ENOTEMPTY => FsError::Conflict("the directory is not empty".into()),
        Errno::ENOSPC => FsError::NoSpace(what.to_owned()),
        e => FsError::Io(format!("{what}: {e}")),
    }
}

/// The components of a client's relative path, refused if any could
/// escape or confuse: `..`, `.`, empty parts (`a//b`), NUL, absolute paths.
///
/// # Errors
///
/// [`FsError::BadPath`] or [`FsError::Escape`] naming what is wrong.
pub fn components(path: &str) -> Result<Vec<&str>, FsError> {
    let bad = |m: &str| Err(FsError::BadPath(m.into()));
    if path.len() > MAX_PATH_BYTES {
        return bad("longer than 1024 bytes");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path.starts_with('/') {
        return Err(FsError::Escape("absolute paths are not allowed".into()));
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts {
        match *part {
            "" => return bad("empty path component"),
            "." => return bad("`.` is not allowed"),
            ".." => return Err(FsError::Escape("`..` is not allowed".into())),
            p if p.len() > 255 => return bad("a component is longer than 255 bytes"),
            p if p.starts_with(UPLOAD_PREFIX) => return bad("names starting with .imagentx-upload- are reserved"),
            _ => {}
        }
    }
    Ok(parts)
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

fn open_beneath(dir: impl AsFd, path: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
    let mut how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW).resolve(beneath());
    if flags.contains(OFlag::O_CREAT) {
        // openat2 takes the mode as given (no default): without it a new file is 0000.
        how = how.mode(Mode::from_bits_truncate(0o644));
    }
    openat2(dir, path, how)
}

fn open_dir(dir: impl AsFd, path: &str) -> Result<OwnedFd, Errno> {
    open_beneath(dir, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// What is at a path.
#[derive(Debug)]
pub enum Node {
    File { file: File, size: u64 },
    Dir(Vec<DirEntry>),
}

/// One entry of a directory listing. Symlinks are listed, never followed.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
}

fn kind_of(stat: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "file",
        SFlag::S_IFDIR => "dir",
        SFlag::S_IFLNK => "symlink",
        _ => "other",
    }
}

/// One user's data directory, held open.
pub struct UserFs {
    root: OwnedFd,
    /// Who the files and directories this creates should belong to (the
    /// native jail's host ids, when the server is root), so that native tools
    /// can write them too.
    owner: Option<(u32, u32)>,
}

impl UserFs {
    /// Opens the directory `root` (itself not a symlink).
    ///
    /// # Errors
    ///
    /// [`FsError::Io`] when it cannot be opened.
    pub fn open(root: &Path) -> Result<Self, FsError> {
        let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC);
        let root = openat2(nix::fcntl::AT_FDCWD, root, how).map_err(|e| io_error("opening the data directory", e))?;
        Ok(Self { root, owner: None })
    }

    /// Makes what this creates belong to `owner` (uid, gid), when given.
    #[must_use]
    pub fn owned_by(mut self, owner: Option<(u32, u32)>) -> Self {
        self.owner = owner;
        self
    }

    fn chown(&self, fd: impl AsFd) -> Result<(), FsError> {
        let Some((uid, gid)) = self.owner else { return Ok(()) };
        nix::unistd::fchown(fd, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io_error("changing the owner", e))
    }

    /// A regular file's content, or a directory's listing. `path` empty is the root.
    ///
    /// # Errors
    ///
    /// [`FsError`]: not found, through a symlink, or not a file or directory.
    pub fn get(&self, path: &str) -> Result<Node, FsError> {
        let parts = components(path)?;
        let rel = if parts.is_empty() { ".".to_owned() } else { parts.join("/") };
        // O_NONBLOCK: a FIFO a tool planted must not hang the server.
        let fd =
            open_beneath(&self.root, &rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK).map_err(|e| io_error("opening", e))?;
        let stat = fstat(&fd).map_err(|e| io_error("inspecting", e))?;
        match kind_of(&stat) {
            "file" => Ok(Node::File { file: File::from(fd), size: stat.st_size as u64 }),
            "dir" => Ok(Node::Dir(list(fd)?)),
            _ => Err(FsError::Conflict("not a regular file or directory".into())),
        }
    }

    /// Writes `bytes` to `path` atomically, creating parent directories,
    /// charging what it adds to `budget` before writing (the user's ledger,
    /// shared with their calls in flight: a write racing a tool's cannot
    /// take the same bytes). Answers the bytes written.
    ///
    /// # Errors
    ///
    /// [`FsError::QuotaExceeded`], or a path error.
    pub fn put(&self, path: &str, bytes: &[u8], budget: &Budget) -> Result<u64, FsError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(FsError::BadPath("a file path is needed".into()));
        };
        let parent = self.make_parents(parents, budget)?;
        let _names = budget.ledger().names().blocking_lock();
        // The size of a file replaced; `None` when a new entry is made.
        let old = match fstatat(&parent, *name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) if kind_of(&stat) == "dir" => return Err(FsError::Conflict("the path is a directory".into())),
            Ok(stat) if kind_of(&stat) == "file" && stat.st_nlink <= 1 => Some(stat.st_size as u64),
            Ok(_) => Some(0),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(io_error("inspecting", e)),
        };
        let new = bytes.len() as u64;
        let growth = new.saturating_sub(old.unwrap_or(0));
        let over = |e: Exceeded| FsError::QuotaExceeded(format!("writing {new} bytes to the data directory: {e}"));
        budget.grow(growth).map_err(over)?;
        if old.is_none()
            && let Err(e) = budget.add_entry()
        {
            budget.shrink(growth);
            return Err(over(e));
        }
        let refund = || {
            budget.shrink(growth);
            if old.is_none() {
                budget.remove_entry();
            }
        };
        let tmp = format!("{UPLOAD_PREFIX}{}", uuid::Uuid::now_v7().simple());
        let fd = match open_beneath(&parent, &tmp, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL) {
            Ok(fd) => fd,
            Err(e) => {
                refund();
                return Err(io_error("creating", e));
            }
        };
        let mut file = File::from(fd);
        let written = self.chown(file.as_fd()).and_then(|()| {
            file.write_all(bytes).and_then(|()| file.sync_data()).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) => FsError::NoSpace("writing".to_owned()),
                _ => FsError::Io(format!("writing: {e}")),
            })
        });
        drop(file);
        let renamed =
            written.and_then(|()| renameat(&parent, tmp.as_str(), &parent, *name).map_err(|e| io_error("renaming", e)));
        if let Err(e) = renamed {
            let _ = unlinkat(&parent, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            refund();
            return Err(e);
        }
        budget.shrink(old.unwrap_or(0).saturating_sub(new));
        Ok(new)
    }

    /// Removes a file, a symlink (not what it points at) or an empty directory.
    ///
    /// # Errors
    ///
    /// [`FsError::NotFound`], [`FsError::Conflict`] for a non-empty directory.
    pub fn delete(&self, path: &str, budget: &Budget) -> Result<(), FsError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(FsError::BadPath("the data directory itself cannot be deleted".into()));
        };
        let parent =
            if parents.is_empty() { open_dir(&self.root, ".") } else { open_dir(&self.root, &parents.join("/")) }
                .map_err(|e| io_error("opening", e))?;
        let _names = budget.ledger().names().blocking_lock();
        let stat = fstatat(&parent, *name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| io_error("inspecting", e))?;
        let flag = if kind_of(&stat) == "dir" { UnlinkatFlags::RemoveDir } else { UnlinkatFlags::NoRemoveDir };
        unlinkat(&parent, *name, flag).map_err(|e| io_error("removing", e))?;
        budget.remove_entry();
        if kind_of(&stat) == "file" && stat.st_nlink <= 1 {
            budget.shrink(stat.st_size as u64);
        }
        Ok(())
    }

    /// Bytes in regular files under the directory (symlinks not followed),
    /// and the entries (files, directories, links) under it.
    ///
    /// # Errors
    ///
    /// [`FsError::Io`] when the tree cannot be read.
    pub fn usage(&self) -> Result<(u64, u64), FsError> {
        let fd = open_dir(&self.root, ".").map_err(|e| io_error("opening", e))?;
        tree_size(fd, 0)
    }

    fn make_parents(&self, parents: &[&str], budget: &Budget) -> Result<OwnedFd, FsError> {
        let mut dir = open_dir(&self.root, ".").map_err(|e| io_error("opening", e))?;
        for part in parents {
            budget.add_entry().map_err(|e| FsError::QuotaExceeded(format!("creating a directory: {e}")))?;
            let created = match mkdirat(&dir, *part, Mode::from_bits_truncate(0o755)) {
                Ok(()) => true,
                Err(Errno::EEXIST) => {
                    budget.remove_entry();
                    let stat =
                        fstatat(&dir, *part, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| io_error("inspecting", e))?;
                    if kind_of(&stat) == "symlink" {
                        return Err(FsError::Symlink);
                    }
                    false
                }
                Err(e) => {
                    budget.remove_entry();
                    return Err(io_error("creating a directory", e));
                }
            };
            dir = open_dir(&dir, part).map_err(|e| io_error("opening a directory", e))?;
            if created {
                self.chown(&dir)?;
            }
        }
        Ok(dir)
    }
}

fn list(fd: OwnedFd) -> Result<Vec<DirEntry>, FsError> {
    let stat_fd = fd.try_clone().map_err(|e| FsError::Io(format!("listing: {e}")))?;
    let mut dir = Dir::from_fd(fd).map_err(|e| io_error("listing", e))?;
    let mut entries = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(|e| io_error("listing", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." || name.starts_with(UPLOAD_PREFIX) {
            continue;
        }
        let Ok(stat) = fstatat(&stat_fd, entry.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW) else { continue };
        let kind = kind_of(&stat);
        let size = if kind == "file" { stat.st_size as u64 } else { 0 };
        entries.push(DirEntry { name, kind, size });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn tree_size(fd: OwnedFd, depth: usize) -> Result<(u64, u64), FsError> {
    if depth > MAX_DEPTH {
        return Err(FsError::Conflict(format!("directories nested deeper than {MAX_DEPTH}")));
    }
    let stat_fd = fd.try_clone().map_err(|e| FsError::Io(format!("measuring: {e}")))?;
    let mut dir = Dir::from_fd(fd).map_err(|e| io_error("measuring", e))?;
    let (mut total, mut entries) = (0u64, 0u64);
    for entry in dir.iter() {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        entries += 1;
        match entry.file_type() {
            Some(Type::Directory) => {
                if let Ok(child) = openat2(
                    &stat_fd,
                    name,
                    OpenHow::new()
                        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                        .resolve(beneath()),
                ) {
                    let (bytes, below) = tree_size(child, depth + 1)?;
                    total = total.saturating_add(bytes);
                    entries = entries.saturating_add(below);
                }
            }
            Some(Type::Symlink) => {}
            _ => {
                if let Ok(stat) = fstatat(&stat_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    && kind_of(&stat) == "file"
                {
                    total = total.saturating_add(stat.st_size as u64);
                }
            }
        }
    }
    Ok((total, entries))
}

/// Reads a whole file (for small files the API returns in one body).
///
/// # Errors
///
/// The read's failure.
pub fn read_all(mut file: File, size: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 << 20));
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_paths_are_refused_before_any_lookup() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\0b", ".imagentx-upload-x"] {
            assert!(matches!(components(bad), Err(FsError::BadPath(_) | FsError::Escape(_))), "{bad:?}");
        }
        assert_eq!(components("a/b.txt").unwrap(), ["a", "b.txt"]);
        assert!(components("").unwrap().is_empty());
    }

    #[test]
    fn symlinks_are_never_followed_and_writes_respect_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s3cret").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("file-link")).unwrap();
        let fs = UserFs::open(dir.path()).unwrap();
        let roomy = Budget::new(crate::quota::Ledger::new(0, 2), 1 << 20, 100);
        assert!(matches!(fs.get("link/secret"), Err(FsError::Symlink)));
        assert!(matches!(fs.get("file-link"), Err(FsError::Symlink)));
        assert!(matches!(fs.put("link/new", b"x", &roomy), Err(FsError::Symlink)));
        assert!(!outside.path().join("new").exists());
        // Writing over a symlink replaces the link, not its target.
        fs.put("file-link", b"mine", &roomy).unwrap();
        assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "s3cret");
        fs.put("a/b/c.txt", b"hello", &roomy).unwrap();
        // link, file-link (now a file of 4 bytes), a, a/b, a/b/c.txt
        assert_eq!(fs.usage().unwrap(), (9, 5));
        assert_eq!(roomy.ledger().used(), (9, 5), "the ledger and a walk disagree");
        let tight = Budget::new(crate::quota::Ledger::new(9, 5), 50, 100);
        assert!(matches!(fs.put("big", &[0u8; 100], &tight), Err(FsError::QuotaExceeded(_))));
        assert_eq!(tight.ledger().used(), (9, 5), "a refused write kept its charge");
        // Replacing a file counts only the difference.
        fs.put("a/b/c.txt", &[1u8; 40], &tight).unwrap();
        assert_eq!(tight.ledger().used(), (44, 5));
        match fs.get("a").unwrap() {
            Node::Dir(entries) => assert_eq!(entries[0].name, "b"),
            Node::File { .. } => panic!("a is a directory"),
        }
        fs.delete("link", &tight).unwrap();
        assert!(outside.path().join("secret").exists());
        assert!(matches!(fs.delete("a", &tight), Err(FsError::Conflict(_))));
        fs.delete("a/b/c.txt", &tight).unwrap();
        assert_eq!(tight.ledger().used(), (4, 3), "a delete did not give back what it freed");
        assert_eq!(fs.usage().unwrap(), (4, 3));
    }
}
