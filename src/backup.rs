//! Backups of a data directory, taken while `serve` keeps answering, and
//! restore from them: `imagentx-sandbox backup --to FILE`, `backup verify
//! FILE`, `restore FILE --data-dir DIR`.
//!
//! A backup is one gzip-compressed tar file, written under a temporary name
//! and renamed when complete:
//!
//! ```text
//! sandbox.db        the database, a consistent snapshot (`VACUUM INTO`: a read
//!                   transaction beside the server's writer, no lock held)
//! blobs/...         registered modules and native specs
//! users/<user>/...  every user's files (from their volume when they have one)
//! audit-archive/... the audit trail's archive segments (`crate::audit`)
//! config.toml       the config file given, if any
//! manifest.json     last: versions, counts, the audit chain's head, and the
//!                   size and SHA-256 of every member before it
//! ```
//!
//! Users' volumes: where a server runs, they are mounted in its own mount
//! namespace, which the backup reads through `/proc/<pid>/root` (the pid
//! is in `volumes/@lock`); where none runs, each image is mounted read-only
//! for the copy. A restore writes users' files into plain directories; the
//! next `serve` moves them into new volumes (as for any plain directory).

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What the backup holds, as its last member says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// This file's format.
    pub format: u32,
    pub created_at: String,
    /// The version of imagentx-sandbox that made it.
    pub made_by: String,
    pub users: u64,
    pub tools: u64,
    pub executions: u64,
    pub audit_records: u64,
    /// The last audit record's sequence number and hash.
    pub audit_head: Option<(i64, String)>,
    pub members: Vec<Member>,
}

/// One member of the backup: a regular file (its size and SHA-256), or
/// (format 3 on) a directory, or a symlink (its target's length and SHA-256).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// `dir` or `symlink`; absent for a regular file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Member {
    fn file(path: &str, bytes: u64, hash: Sha256) -> Self {
        Self { path: path.to_owned(), bytes, sha256: hex::encode(hash.finalize()), kind: None }
    }

    fn dir(path: &str) -> Self {
        Self { path: path.trim_end_matches('/').to_owned(), bytes: 0, sha256: String::new(), kind: Some("dir".into()) }
    }

    /// The target is taken in the form the archive keeps it: tar stores a
    /// short target through its path components (`a//b` as `a/b`, `x/./y`
    /// as `x/y`, `/` as `//`), a long one as it is; both sides hash the
    /// components, so a good backup of any link verifies.
    fn symlink(path: &str, target: &[u8]) -> Self {
        let normal: PathBuf = Path::new(std::ffi::OsStr::from_bytes(target)).components().collect();
        let normal = normal.as_os_str().as_bytes();
        Self {
            path: path.to_owned(),
            bytes: normal.len() as u64,
            sha256: hex::encode(Sha256::digest(normal)),
            kind: Some("symlink".into()),
        }
    }
}

/// 3: the manifest lists directories and symlinks too; 2: with the audit
/// archive's segments. Formats 1 and 2 are read too (their files checked).
const FORMAT: u32 = 3;
const MANIFEST: &str = "manifest.json";
const DATABASE: &str = "sandbox.db";

/// Why a backup, a verification or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Refused(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Takes a backup of `data_dir` into `to` (and the config file `config`).
///
/// # Errors
///
/// [`BackupError`]: the data directory cannot be read, the target cannot be
/// written (a full disk, a read-only path), or another backup of this data
/// directory is running. A failed backup leaves no file at `to`.
pub fn create(data_dir: &Path, config: Option<&Path>, to: &Path) -> Result<Manifest, BackupError> {
    let db = data_dir.join(DATABASE);
    if !db.is_file() {
        return Err(BackupError::Refused(format!("no database at {}: not a data directory", db.display())));
    }
    // One backup of a data directory at a time.
    let lock_path = data_dir.join("backup.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| BackupError::Refused("another backup of this data directory is running".into()))?;
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let partial = parent.join(format!(
        ".{}.partial-{}",
        to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        uuid::Uuid::now_v7().simple()
    ));
    let result = write_backup(data_dir, config, &partial, parent);
    match result {
        Ok(manifest) => {
            std::fs::rename(&partial, to).map_err(io(format!("renaming the backup to {}", to.display())))?;
            if let Ok(dir) = std::fs::File::open(parent) {
                let _ = dir.sync_all();
            }
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write_backup(data_dir: &Path, config: Option<&Path>, out: &Path, scratch: &Path) -> Result<Manifest, BackupError> {
    // A backup holds every user's files and the database: the owner's only.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(io(format!("creating {}", out.display())))?
    };
    let file = Trickle { file, unsynced: 0 };
    let gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut members = Vec::new();

    // The database and the audit archive, taken together under the
    // archive's lock: an archiver moving records meanwhile would leave them
    // in both, or in neither.
    let archive = data_dir.join(crate::audit::ARCHIVE_DIR);
    let archive_lock =
        crate::audit::lock_archive(&archive, false).map_err(io(format!("locking {}", archive.display())))?;
    // The database: a snapshot beside the running writer.
    let snapshot = tempfile::Builder::new()
        .prefix(".imagentx-backup-db-")
        .tempdir_in(scratch)
        .map_err(io(format!("a scratch directory in {}", scratch.display())))?;
    let snap = snapshot.path().join(DATABASE);
    {
        let conn = rusqlite::Connection::open_with_flags(
            data_dir.join(DATABASE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute("VACUUM INTO ?1", [snap.to_string_lossy()])?;
    }
    let counts = Counts::of(&snap)?;
    add_file(&mut tar, &mut members, &snap, DATABASE)?;
    drop(snapshot);
    add_archive(&mut tar, &mut members, &archive)?;
    drop(archive_lock);

    // Modules and specs.
    let blobs = data_dir.join("blobs");
    if blobs.is_dir() {
        add_tree(&mut tar, &mut members, &blobs, "blobs")?;
    }
    // Users' files.
    for (user, dir) in user_dirs(data_dir)? {
        add_tree(&mut tar, &mut members, dir.path(), &format!("users/{user}"))?;
    }
    if let Some(config) = config {
        add_file(&mut tar, &mut members, config, "config.toml")?;
    }
    let manifest = Manifest {
        format: FORMAT,
        created_at: crate::report::rfc3339(std::time::SystemTime::now()),
        made_by: env!("CARGO_PKG_VERSION").to_owned(),
        users: counts.users,
        tools: counts.tools,
        executions: counts.executions,
        audit_records: counts.audit_records,
        audit_head: counts.audit_head,
        members,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Refused(e.to_string()))?;
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o600);
    header.set_cksum();
    tar.append_data(&mut header, MANIFEST, json.as_slice()).map_err(io("writing the manifest"))?;
    let gz = tar.into_inner().map_err(io("finishing the archive"))?;
    let buffered = gz.finish().map_err(io("finishing the compression"))?;
    let file =
        buffered.into_inner().map_err(|e| BackupError::Io { what: "flushing".into(), source: e.into_error() })?;
    file.file.sync_all().map_err(io("syncing the backup"))?;
    Ok(manifest)
}

/// Bytes a backup leaves unwritten to disk at most: a server's commits and
/// checkpoints beside it then wait behind this much of its writeback, not
/// behind the whole archive at its final `fsync`.
const TRICKLE_BYTES: u64 = 16 << 20;

/// The backup file, written to disk every [`TRICKLE_BYTES`].
struct Trickle {
    file: std::fs::File,
    unsynced: u64,
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= TRICKLE_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// What the database holds.
struct Counts {
    users: u64,
    tools: u64,
    executions: u64,
    audit_records: u64,
    audit_head: Option<(i64, String)>,
}

impl Counts {
    fn of(db: &Path) -> Result<Self, BackupError> {
        let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let count = |table: &str| -> Result<u64, rusqlite::Error> {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
        };
        let head = conn
            .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .ok();
        Ok(Self {
            users: count("users")?,
            tools: count("tools")?,
            executions: count("executions")?,
            audit_records: count("audit")?,
            audit_head: head,
        })
    }
}

/// A user's directory to read, and what keeps it readable (a read-only
/// mount of their volume, unmounted on drop).
struct UserSource {
    path: PathBuf,
    mount: Option<tempfile::TempDir>,
}

impl UserSource {
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UserSource {
    fn drop(&mut self) {
        if let Some(mount) = &self.mount {
            let _ = nix::mount::umount2(mount.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Every user's directory, readable now: through the running server's
/// mount namespace for a mounted volume, a read-only mount of an idle one,
/// or the plain directory.
fn user_dirs(data_dir: &Path) -> Result<Vec<(String, UserSource)>, BackupError> {
    let users = data_dir.join("users");
    let mut names: Vec<String> = match std::fs::read_dir(&users) {
        Ok(entries) => {
            entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(format!("listing {}", users.display()))(e)),
    };
    names.retain(|n| crate::policy::UserId::new(n).is_ok());
    names.sort();
    let server_root = server_root(data_dir);
    let mut dirs = Vec::new();
    for name in names {
        let image = data_dir.join("volumes").join(format!("{name}.ext4"));
        let plain = users.join(&name);
        let in_server = server_root.as_ref().and_then(|root| {
            let abs = std::fs::canonicalize(&plain).ok()?;
            let path = root.join(abs.strip_prefix("/").unwrap_or(&abs));
            // Mounted there now (its own file system): read it there. The
            // walk's open descriptors keep it from being unmounted under us.
            is_mount_point(&path).then_some(path)
        });
        let source = if !image.is_file() {
            UserSource { path: plain, mount: None }
        } else if let Some(path) = in_server {
            UserSource { path, mount: None }
        } else {
            // Not mounted anywhere (no server, or idle in the server's): a
            // read-only mount of its own, without replaying the journal
            // (`noload`): it never writes to the image.
            let at = tempfile::tempdir().map_err(io("a mount point"))?;
            let mounted = std::process::Command::new("mount")
                .args(["-o", "ro,noload,loop"])
                .arg(&image)
                .arg(at.path())
                .output()
                .map_err(io("running mount"))?;
            if !mounted.status.success() {
                return Err(BackupError::Refused(format!(
                    "mounting {} read-only: {}",
                    image.display(),
                    String::from_utf8_lossy(&mounted.stderr).trim()
                )));
            }
            UserSource { path: at.path().to_owned(), mount: Some(at) }
        };
        dirs.push((name, source));
    }
    Ok(dirs)
}

/// Whether `path` is the root of a file system other than its parent's.
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (std::fs::metadata(path), path.parent().map(std::fs::metadata)) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Detaches, in this process's own mount namespace, every mount under
/// `data_dir` it inherited: a backup started by the server inherits its
/// namespace, and copies of users' read-write volume mounts kept alive here
/// would outlive the server's unmounts (the same image could then be
/// mounted twice). The backup reads mounted volumes through the server's
/// namespace instead. Call it right after `unshare(CLONE_NEWNS)`.
pub fn detach_inherited_mounts(data_dir: &Path) {
    let Ok(root) = std::fs::canonicalize(data_dir) else { return };
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&root) && p != &root)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `/proc/<pid>/root` of the server that holds this data directory's
/// volumes, when one runs.
fn server_root(data_dir: &Path) -> Option<PathBuf> {
    let lock = data_dir.join("volumes").join("@lock");
    let file = std::fs::OpenOptions::new().write(true).open(&lock).ok()?;
    // Free: no server holds the volumes.
    if let Ok(held) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        drop(held);
        return None;
    }
    let pid: u32 = std::fs::read_to_string(&lock).ok()?.trim().parse().ok()?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    root.exists().then_some(root)
}

/// Adds the audit archive's segments (not its lock, nor a segment an
/// archiver was writing when it stopped).
fn add_archive<W: Write>(
    tar: &mut tar::Builder<W>,
    members: &mut Vec<Member>,
    archive: &Path,
) -> Result<(), BackupError> {
    let mut names: Vec<String> = match std::fs::read_dir(archive) {
        Ok(entries) => entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("listing {}", archive.display()))(e)),
    };
    names.retain(|n| n.starts_with("audit-") && n.ends_with(".jsonl.gz"));
    names.sort();
    for name in names {
        // A regular file only: never through a symlink, never waiting on a FIFO.
        use std::os::unix::fs::OpenOptionsExt;
        let path = archive.join(&name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        let stat = nix::sys::stat::fstat(&file).map_err(|e| io(format!("reading {}", path.display()))(e.into()))?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(BackupError::Refused(format!("{} is not a regular file", path.display())));
        }
        let member = format!("{}/{name}", crate::audit::ARCHIVE_DIR);
        add_file_fd(tar, members, file, &stat, &member, Path::new(&member))?;
    }
    Ok(())
}

/// Adds the file at `path` (the database snapshot, the config) as `name`.
fn add_file<W: Write>(
    tar: &mut tar::Builder<W>,
    members: &mut Vec<Member>,
    path: &Path,
    name: &str,
) -> Result<(), BackupError> {
    let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let stat = nix::sys::stat::fstat(&file).map_err(|e| io(format!("reading {}", path.display()))(e.into()))?;
    add_file_fd(tar, members, file, &stat, name, Path::new(name))
}

/// A member's header: its kind, size, and the mode, owner and time of `stat`.
fn header_for(stat: &nix::sys::stat::FileStat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(stat.st_mode & 0o777);
    header.set_uid(u64::from(stat.st_uid));
    header.set_gid(u64::from(stat.st_gid));
    header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
    header.set_size(size);
    header.set_cksum();
    header
}

/// Reads exactly `left` bytes of `inner` (zeros past its end), hashing them.
struct HashingReader<R> {
    inner: R,
    left: u64,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Adds every regular file, directory and symlink under `root` as `prefix/...`
/// (symlinks as links, never followed; other kinds left out).
///
/// Users' trees are written by their tools while the backup reads them, so
/// nothing is resolved by path below `root`: each directory is read through
/// its own descriptor and each entry opened relative to it with `O_NOFOLLOW`,
/// so that a file swapped for a symlink (to `/etc/shadow`, to another user)
/// is never followed. Sizes and kinds come from the opened descriptor.
fn add_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    members: &mut Vec<Member>,
    root: &Path,
    prefix: &str,
) -> Result<(), BackupError> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let top = nix::fcntl::open(root, flags | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|e| io(format!("opening {}", root.display()))(e.into()))?;
    // Each entry's name as the manifest lists it (UTF-8, lossy) and as the
    // archive keeps it (the bytes the file system gave: restored as they were).
    let mut stack = vec![(top, prefix.to_owned(), PathBuf::from(prefix))];
    while let Some((dir, name, raw)) = stack.pop() {
        let stat = nix::sys::stat::fstat(&dir).map_err(|e| io(format!("reading {name}"))(e.into()))?;
        let mut header = header_for(&stat, tar::EntryType::Directory, 0);
        let mut raw_dir = raw.clone().into_os_string();
        raw_dir.push("/");
        tar.append_data(&mut header, raw_dir, std::io::empty()).map_err(io(format!("writing {name}")))?;
        members.push(Member::dir(&name));
        let listing = nix::dir::Dir::from_fd(dir.try_clone().map_err(io(format!("listing {name}")))?)
            .map_err(|e| io(format!("listing {name}"))(e.into()))?;
        let mut entries: Vec<std::ffi::OsString> = listing
            .into_iter()
            .filter_map(Result::ok)
            .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        entries.sort();
        for entry in entries {
            let child = format!("{name}/{}", entry.to_string_lossy());
            let raw_child = raw.join(&entry);
            if child.ends_with("/lost+found") && name.matches('/').count() == 1 {
                continue;
            }
            match nix::fcntl::openat(&dir, entry.as_os_str(), flags, Mode::empty()) {
                Ok(fd) => {
                    let stat = nix::sys::stat::fstat(&fd).map_err(|e| io(format!("reading {child}"))(e.into()))?;
                    match stat.st_mode & libc::S_IFMT {
                        libc::S_IFDIR => stack.push((fd, child, raw_child)),
                        libc::S_IFREG => {
                            add_file_fd(tar, members, std::fs::File::from(fd), &stat, &child, &raw_child)?;
                        }
                        _ => {} // FIFOs, sockets, devices: not a user's data
                    }
                }
                // O_NOFOLLOW on a symlink: kept as the link it is.
                Err(nix::errno::Errno::ELOOP) => {
                    let Ok(target) = nix::fcntl::readlinkat(&dir, entry.as_os_str()) else { continue };
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    header.set_mode(0o777);
                    tar.append_link(&mut header, &raw_child, Path::new(&target))
                        .map_err(io(format!("writing {child}")))?;
                    members.push(Member::symlink(&child, target.as_bytes()));
                }
                // Gone meanwhile: it was not there to back up.
                Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(io(format!("opening {child}"))(e.into())),
            }
        }
    }
    Ok(())
}

/// Adds the opened regular file `file` (its `stat`) as `raw` in the archive,
/// `name` in the manifest.
fn add_file_fd<W: Write>(
    tar: &mut tar::Builder<W>,
    members: &mut Vec<Member>,
    file: std::fs::File,
    stat: &nix::sys::stat::FileStat,
    name: &str,
    raw: &Path,
) -> Result<(), BackupError> {
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    let mut header = header_for(stat, tar::EntryType::Regular, size);
    // Streamed and hashed as it goes; a file that changes while it is read
    // keeps the size it had (cut, or padded with zeros), and the hash is of
    // what the archive holds.
    let mut reader = HashingReader { inner: file.take(size), left: size, hash: Sha256::new() };
    tar.append_data(&mut header, raw, &mut reader).map_err(io(format!("writing {name}")))?;
    members.push(Member::file(name, size, reader.hash));
    Ok(())
}

/// Reads the backup at `path` through, checks every member against the
/// manifest (present, same size, same SHA-256, nothing more) and the audit
/// chain of its database; with `into`, unpacks it there as it goes.
///
/// # Errors
///
/// [`BackupError::Damaged`] naming the first member that does not match, a
/// truncated or altered file, or a broken audit chain.
pub fn verify(path: &Path) -> Result<Manifest, BackupError> {
    read(path, None, &|_| true)
}

/// Reads (and checks) the backup at `path`; with `into`, writes there the
/// members `wanted` names (all are hashed and checked either way).
fn read(path: &Path, into: Option<&Path>, wanted: &dyn Fn(&str) -> bool) -> Result<Manifest, BackupError> {
    let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut seen: Vec<Member> = Vec::new();
    let mut manifest: Option<Manifest> = None;
    let mut directories: Vec<(PathBuf, tar::Header)> = Vec::new();
    let check_dir = tempfile::tempdir().map_err(io("a scratch directory"))?;
    let damaged = |what: String| BackupError::Damaged(what);
    let entries = archive.entries().map_err(|e| damaged(format!("not a backup archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(format!("after {}: {e}", last(&seen))))?;
        // Checked by its name in UTF-8 (the manifest's), written by its bytes.
        let raw = entry.path().map_err(|e| damaged(format!("a member's name: {e}")))?.into_owned();
        let name = raw.to_string_lossy().into_owned();
        if manifest.is_some() {
            return Err(damaged(format!("{name} comes after the manifest")));
        }
        if name.split('/').any(|part| part == "..") || name.starts_with('/') {
            return Err(damaged(format!("{name} would land outside the data directory")));
        }
        let kind = entry.header().entry_type();
        let into = into.filter(|_| wanted(name.trim_end_matches('/')));
        if name == MANIFEST {
            let mut text = Vec::new();
            entry.read_to_end(&mut text).map_err(|e| damaged(format!("{MANIFEST}: {e}")))?;
            manifest = Some(serde_json::from_slice(&text).map_err(|e| damaged(format!("{MANIFEST}: {e}")))?);
            continue;
        }
        if kind.is_file() {
            // Written where it goes (the database also where it is checked), hashed on the way.
            let target = match into {
                Some(into) => Some(beneath(into, &raw)?),
                None if name == DATABASE => Some(check_dir.path().join(DATABASE)),
                // Archive segments are checked with the database, as one chain.
                None if name.starts_with(&format!("{}/", crate::audit::ARCHIVE_DIR)) => {
                    Some(beneath(check_dir.path(), &raw)?)
                }
                None => None,
            };
            let sink: Box<dyn Write> = match &target {
                Some(target) => {
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
                    }
                    let file = std::fs::File::create(target).map_err(io(format!("writing {}", target.display())))?;
                    Box::new(std::io::BufWriter::new(file))
                }
                None => Box::new(std::io::sink()),
            };
            let mut hashing = Hashing { inner: sink, hash: Sha256::new(), bytes: 0 };
            std::io::copy(&mut entry, &mut hashing).map_err(|e| damaged(format!("{name}: {e}")))?;
            hashing.flush().map_err(io(format!("writing {name}")))?;
            if let (Some(target), Some(_)) = (&target, into) {
                own(target, entry.header());
                if name == DATABASE || name.starts_with(&format!("{}/", crate::audit::ARCHIVE_DIR)) {
                    let check = beneath(check_dir.path(), &raw)?;
                    if let Some(parent) = check.parent() {
                        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
                    }
                    std::fs::copy(target, check).map_err(io("copying the database to check it"))?;
                }
            }
            seen.push(Member::file(&name, hashing.bytes, hashing.hash));
        } else if kind.is_dir() {
            seen.push(Member::dir(&name));
        } else if kind.is_symlink() {
            let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
            seen.push(Member::symlink(&name, &target));
        } else {
            return Err(damaged(format!("{name} is neither a file, a directory nor a symlink")));
        }
        if !kind.is_file()
            && let Some(into) = into
        {
            if kind.is_dir() {
                let target = beneath(into, &raw)?;
                std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
                // Its mode once everything under it is written: a read-only
                // directory would refuse its own files (to a restore not run as root).
                directories.push((target, entry.header().clone()));
            } else if kind.is_symlink()
                && let Ok(Some(link)) = entry.link_name()
            {
                let target = beneath(into, &raw)?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
                }
                std::os::unix::fs::symlink(&*link, &target).map_err(io(format!("linking {}", target.display())))?;
            }
        }
    }
    for (directory, header) in directories.iter().rev() {
        own(directory, header);
    }
    let manifest = manifest.ok_or_else(|| damaged(format!("no manifest: the file ends after {}", last(&seen))))?;
    if manifest.format == 0 || manifest.format > FORMAT {
        return Err(BackupError::Refused(format!(
            "backup format {} (made by {}); this version reads format {FORMAT}",
            manifest.format, manifest.made_by
        )));
    }
    if manifest.format < 3 {
        // Older manifests list regular files only.
        seen.retain(|m| m.kind.is_none());
    }
    for (got, want) in seen.iter().zip(&manifest.members) {
        if got.path != want.path {
            return Err(damaged(format!("{} is not in the manifest where it lists {}", got.path, want.path)));
        }
        if got != want {
            return Err(damaged(format!("{} does not match the manifest (kind, size or SHA-256)", want.path)));
        }
    }
    if seen.len() != manifest.members.len() {
        let first = seen.get(manifest.members.len()).or_else(|| manifest.members.get(seen.len()));
        return Err(damaged(format!(
            "{} members, the manifest lists {} (from {})",
            seen.len(),
            manifest.members.len(),
            first.map_or("?", |m| m.path.as_str())
        )));
    }
    let conn = rusqlite::Connection::open(check_dir.path().join(DATABASE))?;
    let archive = check_dir.path().join(crate::audit::ARCHIVE_DIR);
    let verification = crate::audit::verify_all(&conn, &archive).map_err(|e| damaged(format!("its database: {e}")))?;
    if let Some(seq) = verification.first_broken {
        return Err(damaged(format!(
            "its audit chain breaks at record {seq}: {}",
            verification.reason.unwrap_or_default()
        )));
    }
    Ok(manifest)
}

/// Where member `name` lands under `into`, refused when a symlink already
/// there (one the backup itself made) is on the way or in the place: a
/// crafted backup's `link -> /etc` then `link/passwd` must not write outside.
fn beneath(into: &Path, name: &Path) -> Result<PathBuf, BackupError> {
    let mut at = into.to_owned();
    for part in name.components() {
        match part {
            std::path::Component::Normal(part) => at.push(part),
            std::path::Component::CurDir => {}
            // `read` refuses these before anything is written; never here.
            _ => return Err(BackupError::Damaged(format!("{} would land outside", name.display()))),
        }
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(BackupError::Damaged(format!(
                "{} would be written through a symlink ({})",
                name.display(),
                at.display()
            )));
        }
    }
    Ok(at)
}

/// Gives a restored file the mode, and (as root) the owner, it had.
fn own(target: &Path, header: &tar::Header) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(mode) = header.mode() {
        let _ = std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode & 0o777));
    }
    if nix::unistd::geteuid().is_root()
        && let (Ok(uid), Ok(gid)) = (header.uid(), header.gid())
    {
        let _ = std::os::unix::fs::lchown(target, u32::try_from(uid).ok(), u32::try_from(gid).ok());
    }
}

fn last(seen: &[Member]) -> &str {
    seen.last().map_or("the start", |m| m.path.as_str())
}

/// Restores the backup at `path` into `data_dir`, which must be empty (or
/// missing) unless `force`. The whole backup is verified first: nothing is
/// written from a damaged one.
///
/// # Errors
///
/// [`BackupError`]: a damaged backup, a non-empty target, a write that failed.
pub fn restore(path: &Path, data_dir: &Path, force: bool) -> Result<Manifest, BackupError> {
    let occupied = std::fs::read_dir(data_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if occupied && !force {
        return Err(BackupError::Refused(format!(
            "{} is not empty: restore into an empty directory (or pass --force to write over it)",
            data_dir.display()
        )));
    }
    // Never under a running server (held for the whole restore, so that
    // none starts on a half-written directory), nor over users' volumes
    // (their images would be mounted over the files restored beside them).
    let _held = crate::data_dir::lock(data_dir).map_err(|e| match e {
        crate::data_dir::LockError::InUse(why) => {
            BackupError::Refused(format!("a server is running on {}: stop it first ({why})", data_dir.display()))
        }
        crate::data_dir::LockError::Io(why) => BackupError::Refused(why),
    })?;
    let lock = data_dir.join("volumes").join("@lock");
    if let Ok(file) = std::fs::OpenOptions::new().read(true).open(&lock)
        && nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
    {
        return Err(BackupError::Refused(format!("a server is running on {}: stop it first", data_dir.display())));
    }
    let has_volumes = std::fs::read_dir(data_dir.join("volumes"))
        .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".ext4")))
        .unwrap_or(false);
    if has_volumes {
        return Err(BackupError::Refused(format!(
            "{} holds users' volumes: restore into an empty directory instead",
            data_dir.display()
        )));
    }
    verify(path)?;
    std::fs::create_dir_all(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
    if force {
        // What the backup brings replaces what is there; leftovers of the old
        // database (its WAL) must not be replayed over the restored one.
        for stale in ["sandbox.db-wal", "sandbox.db-shm"] {
            let _ = std::fs::remove_file(data_dir.join(stale));
        }
    }
    read(path, Some(data_dir), &|_| true)
}

/// Where [`restore_database`] keeps what it replaced:
/// `<data-dir>/damaged-<time>/`.
pub const DAMAGED_PREFIX: &str = "damaged-";
/// The backup's members an automatic restore unpacks, before they are moved.
const RESTORING: &str = ".restoring";
/// An automatic restore under way, or done and not yet alerted.
const RESTORE_MARKER: &str = ".restoring.json";

/// An automatic restore, as its marker file records it: written once the
/// backup's members are unpacked and checked, before anything of the data
/// directory is moved, and removed only once the server has recorded its
/// alert ([`acknowledge_restore`]). A restore a crash interrupted is
/// finished by the next start ([`finish_restore`]) from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreMarker {
    /// What was wrong with the database.
    pub problem: String,
    pub backup: PathBuf,
    /// When the backup was made (its manifest's `created_at`).
    pub backup_made_at: String,
    /// Where the damaged database, its WAL and its audit archive are kept.
    pub kept: PathBuf,
    /// Whether the backup brought an audit archive.
    pub has_archive: bool,
    /// Whether the restored database is in place.
    pub swapped: bool,
}

/// Replaces the damaged database of `data_dir` (and its audit archive,
/// which goes with it) by the backup's, for `serve`'s `auto_restore`. The
/// users' files stay as they are (newer than the backup, and not what was
/// damaged); module blobs the backup has and the directory lacks are added.
/// The backup is unpacked and checked whole (and must not claim to be made
/// in the future) before anything is replaced; what is replaced is kept in
/// `<data-dir>/damaged-<time>/`. From the marker on, a crash at any step is
/// finished by [`finish_restore`] at the next start.
///
/// # Errors
///
/// [`BackupError`]: a damaged or refused backup, or a file that could not
/// be moved.
pub fn restore_database(backup: &Path, data_dir: &Path, problem: &str) -> Result<RestoreMarker, BackupError> {
    let scratch = data_dir.join(RESTORING);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
    let archive_dir = crate::audit::ARCHIVE_DIR;
    let wanted = |name: &str| {
        name == DATABASE
            || name == archive_dir
            || name.starts_with(&format!("{archive_dir}/"))
            || name == "blobs"
            || name.starts_with("blobs/")
    };
    let unpacked = read(backup, Some(&scratch), &wanted).and_then(|manifest| {
        let made = humantime::parse_rfc3339_weak(&manifest.created_at).ok();
        let soon = std::time::SystemTime::now() + std::time::Duration::from_secs(300);
        if made.is_none_or(|made| made > soon) {
            return Err(BackupError::Refused(format!(
                "it says it was made at {}, which is not a time in the past",
                manifest.created_at
            )));
        }
        // What is moved in must be on disk before the marker says to move it.
        for member in &manifest.members {
            // Files and directories: never opened through a link.
            if wanted(&member.path) && member.kind.as_deref() != Some("symlink") {
                sync(&scratch.join(&member.path));
            }
        }
        sync(&scratch.join(archive_dir));
        sync(&scratch);
        let stamp = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string().replace(':', "-");
        Ok(RestoreMarker {
            problem: problem.to_owned(),
            backup: backup.to_owned(),
            backup_made_at: manifest.created_at,
            kept: data_dir.join(format!("{DAMAGED_PREFIX}{stamp}")),
            has_archive: scratch.join(archive_dir).is_dir(),
            swapped: false,
        })
    });
    let marker = match unpacked {
        Ok(marker) => marker,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    write_marker(data_dir, &marker)?;
    finish_restore(data_dir)?.ok_or_else(|| BackupError::Refused("the restore's marker went missing".to_owned()))
}

/// Finishes an automatic restore whose marker is in `data_dir` (one a crash
/// interrupted, or the one just begun): every step is done only if it is
/// not done yet, the database's swap (a rename) last. Answers the marker
/// (`None`: no restore under way; then leftovers of an unpacking that never
/// reached its marker are removed).
///
/// # Errors
///
/// [`BackupError::Io`] naming the file that could not be moved.
pub fn finish_restore(data_dir: &Path) -> Result<Option<RestoreMarker>, BackupError> {
    let scratch = data_dir.join(RESTORING);
    let marker_path = data_dir.join(RESTORE_MARKER);
    let text = match std::fs::read(&marker_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Ok(None);
        }
        Err(e) => return Err(io(format!("reading {}", marker_path.display()))(e)),
    };
    let mut marker: RestoreMarker = serde_json::from_slice(&text).map_err(|e| {
        BackupError::Refused(format!("{} cannot be read ({e}): remove it by hand", marker_path.display()))
    })?;
    if !marker.swapped {
        let (kept, archive_dir) = (&marker.kept, crate::audit::ARCHIVE_DIR);
        let moved =
            |from: &Path, to: &Path| std::fs::rename(from, to).map_err(io(format!("moving {}", from.display())));
        std::fs::create_dir_all(kept).map_err(io(format!("creating {}", kept.display())))?;
        let database = data_dir.join(DATABASE);
        if !kept.join(DATABASE).exists() {
            // A copy: the damaged database stays in place until the swap.
            let partial = kept.join(format!("{DATABASE}.partial"));
            std::fs::copy(&database, &partial).map_err(io(format!("keeping {}", database.display())))?;
            sync(&partial);
            moved(&partial, &kept.join(DATABASE))?;
        }
        // The WAL would be replayed over the restored database: it goes first.
        for stale in ["sandbox.db-wal", "sandbox.db-shm"] {
            if std::fs::symlink_metadata(data_dir.join(stale)).is_ok() {
                moved(&data_dir.join(stale), &kept.join(stale))?;
            }
        }
        let (archive, restored_archive) = (data_dir.join(archive_dir), scratch.join(archive_dir));
        let old_archive_here = std::fs::symlink_metadata(&archive).is_ok();
        if old_archive_here && (restored_archive.exists() || !marker.has_archive) && !kept.join(archive_dir).exists() {
            moved(&archive, &kept.join(archive_dir))?;
        }
        if restored_archive.exists() {
            moved(&restored_archive, &archive)?;
        }
        let blobs = data_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(format!("creating {}", blobs.display())))?;
        if let Ok(entries) = std::fs::read_dir(scratch.join("blobs")) {
            for entry in entries.filter_map(Result::ok) {
                let target = blobs.join(entry.file_name());
                if std::fs::symlink_metadata(&target).is_err() {
                    moved(&entry.path(), &target)?;
                }
            }
        }
        sync(kept);
        sync(&blobs);
        if scratch.join(DATABASE).exists() {
            moved(&scratch.join(DATABASE), &database)?;
        }
        sync(data_dir);
        marker.swapped = true;
        write_marker(data_dir, &marker)?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Some(marker))
}

/// Removes the marker of a finished restore, once its alert is recorded.
pub fn acknowledge_restore(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(RESTORE_MARKER));
    sync(data_dir);
}

fn write_marker(data_dir: &Path, marker: &RestoreMarker) -> Result<(), BackupError> {
    let path = data_dir.join(RESTORE_MARKER);
    let temp = data_dir.join(format!("{RESTORE_MARKER}.tmp"));
    let text = serde_json::to_vec_pretty(marker).map_err(|e| BackupError::Refused(e.to_string()))?;
    std::fs::write(&temp, text).map_err(io(format!("writing {}", temp.display())))?;
    sync(&temp);
    std::fs::rename(&temp, &path).map_err(io(format!("writing {}", path.display())))?;
    sync(data_dir);
    Ok(())
}

/// `fsync` of a file or directory, where it can be opened.
fn sync(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.sync_all();
    }
}
