//! The file system a jailed program sees, as a list of mount steps built
//! ahead of time (in the parent, where allocating is allowed) and replayed in
//! the child, which may not allocate.
//!
//! The new root is a small tmpfs mounted over `/sys` of the child's private
//! mount namespace (a place no bind source lives under; the jail gets no
//! `/sys`). Into it go read-only binds of the host's system directories (or
//! of a rootfs directory's entries), a minimal `/etc`, a minimal `/dev`,
//! fresh tmpfs `/tmp` and `/var/tmp`, the user's `/data`, and a fresh procfs;
//! then `pivot_root` moves onto it and the old root is detached.
//!
//! Sources are bound by path, resolved in the child's copy of the mount
//! table: the kernel refuses to bind a mount of another namespace, which is
//! what a descriptor opened by the parent would be.

use std::ffi::{CStr, CString};
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::sys::{self, SysResult};

/// Where the new root is assembled, inside the child's mount namespace.
const STAGE: &str = "/sys";

/// Device nodes a program may use; bound from the host's `/dev`.
const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// Top-level names a rootfs may not provide: the jail makes these itself.
const RESERVED: [&str; 6] = ["proc", "dev", "tmp", "data", "sys", "run"];

/// One step of building the root. Paths are absolute, under [`STAGE`].
#[derive(Debug)]
pub(super) enum Step {
    Mkdir(CString),
    /// An empty file to bind a file onto.
    Touch(CString),
    Symlink {
        target: CString,
        at: CString,
    },
    /// A recursive bind of a host path, then a remount with `flags`.
    Bind {
        source: CString,
        at: CString,
        flags: libc::c_ulong,
    },
    Tmpfs {
        at: CString,
        flags: libc::c_ulong,
        options: CString,
    },
    Proc {
        at: CString,
    },
    Write {
        at: CString,
        content: Vec<u8>,
    },
    /// Remounts a tmpfs read-only once it is populated.
    ReadOnly {
        at: CString,
        flags: libc::c_ulong,
    },
}

/// Which step failed, for the error the parent reports.
pub(super) fn describe(step: &Step) -> &CStr {
    match step {
        Step::Mkdir(p) | Step::Touch(p) => p,
        Step::Symlink { at, .. }
        | Step::Bind { at, .. }
        | Step::Tmpfs { at, .. }
        | Step::Proc { at }
        | Step::Write { at, .. }
        | Step::ReadOnly { at, .. } => at,
    }
}

/// Runs one step. Allocation-free.
pub(super) fn apply(step: &Step) -> SysResult {
    const BIND: libc::c_ulong = libc::MS_BIND | libc::MS_REC;
    match step {
        Step::Mkdir(path) => sys::mkdir(path, 0o755),
        Step::Touch(path) => sys::write_file(path, &[], 0o644),
        Step::Symlink { target, at } => sys::symlink(target, at),
        Step::Bind { source, at, flags } => {
            sys::mount(Some(source), at, None, BIND, None)?;
            sys::mount(None, at, None, libc::MS_BIND | libc::MS_REMOUNT | flags, None)
        }
        Step::Tmpfs { at, flags, options } => sys::mount(Some(c"tmpfs"), at, Some(c"tmpfs"), *flags, Some(options)),
        Step::Proc { at } => sys::mount(
            Some(c"proc"),
            at,
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            Some(c"hidepid=invisible"),
        ),
        Step::Write { at, content } => sys::write_file(at, content, 0o644),
        Step::ReadOnly { at, flags } => sys::mount(None, at, None, libc::MS_REMOUNT | libc::MS_RDONLY | flags, None),
    }
}

/// Moves onto the staged root and detaches the old one.
pub(super) fn enter() -> SysResult {
    sys::chdir(c"/sys")?;
    sys::pivot_root(c".", c".")?;
    sys::umount_detach(c".")?;
    sys::chdir(c"/")?;
    sys::mount(None, c"/", None, libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV, None)
}

/// The read-only part of a root: built once, reused by every run.
#[derive(Debug)]
pub struct Layout {
    pub(super) steps: Vec<Step>,
    /// What the layout was built from, for messages.
    pub(super) origin: String,
}

/// Why a layout could not be built.
#[derive(Debug, thiserror::Error)]
#[error("jail root from {origin}: {what} {path}: {source}")]
pub struct LayoutError {
    origin: String,
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

struct Builder {
    steps: Vec<Step>,
    origin: String,
}

fn cstring(path: &str) -> CString {
    // Paths here come from `Path`s and string constants without NUL bytes;
    // a NUL (impossible from the file system) would end the string early.
    CString::new(path.replace('\0', "")).unwrap_or_default()
}

fn path_cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn staged(inside: &str) -> CString {
    cstring(&format!("{STAGE}{inside}"))
}

/// Mount flags of the file system holding `fd` that a bind must keep: in a
/// user namespace, a remount may not clear them (the kernel locks them).
fn locked_flags(fd: &OwnedFd) -> libc::c_ulong {
    match nix::sys::statvfs::fstatvfs(fd) {
        Ok(stat) => {
            use nix::sys::statvfs::FsFlags;
            let f = stat.flags();
            let mut flags = 0;
            for (have, keep) in [
                (FsFlags::ST_NOSUID, libc::MS_NOSUID),
                (FsFlags::ST_NODEV, libc::MS_NODEV),
                (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
                (FsFlags::ST_NOATIME, libc::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
                (FsFlags::ST_RELATIME, libc::MS_RELATIME),
            ] {
                if f.contains(have) {
                    flags |= keep;
                }
            }
            flags
        }
        Err(_) => 0,
    }
}

impl Builder {
    fn new(origin: String) -> Self {
        let mut b = Self { steps: Vec::new(), origin };
        b.steps.push(Step::Tmpfs {
            at: cstring(STAGE),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            options: cstring("size=1m,nr_inodes=4096,mode=0755"),
        });
        b
    }

    fn error(&self, what: &'static str, path: &Path, source: std::io::Error) -> LayoutError {
        LayoutError { origin: self.origin.clone(), what, path: path.to_owned(), source }
    }

    fn mkdir_all(&mut self, inside: &str) {
        let mut at = String::new();
        for part in inside.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            self.steps.push(Step::Mkdir(staged(&at)));
        }
    }

    /// Binds host `source` (a directory or file) read-only at `inside`, or
    /// recreates it when it is a symlink. `extra` adds mount flags.
    fn bind(&mut self, source: &Path, inside: &str, extra: libc::c_ulong) -> Result<(), LayoutError> {
        let meta = fs::symlink_metadata(source).map_err(|e| self.error("inspecting", source, e))?;
        if let Some(parent) = Path::new(inside).parent().and_then(Path::to_str) {
            self.mkdir_all(parent);
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(source).map_err(|e| self.error("reading link", source, e))?;
            let target = CString::new(target.as_os_str().as_bytes()).unwrap_or_default();
            self.steps.push(Step::Symlink { target, at: staged(inside) });
            return Ok(());
        }
        let fd: OwnedFd = fs::File::open(source).map_err(|e| self.error("opening", source, e))?.into();
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | extra | locked_flags(&fd);
        self.steps.push(if meta.is_dir() { Step::Mkdir(staged(inside)) } else { Step::Touch(staged(inside)) });
        self.steps.push(Step::Bind { source: path_cstring(source), at: staged(inside), flags });
        Ok(())
    }

    fn tmpfs(&mut self, inside: &str, flags: libc::c_ulong, options: &str) {
        self.mkdir_all(inside);
        self.steps.push(Step::Tmpfs { at: staged(inside), flags, options: cstring(options) });
    }

    fn dev(&mut self) -> Result<(), LayoutError> {
        self.tmpfs("/dev", libc::MS_NOSUID | libc::MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755");
        for name in DEVICES {
            // Device nodes stay usable: no `nodev` on their binds.
            let source = PathBuf::from(format!("/dev/{name}"));
            fs::metadata(&source).map_err(|e| self.error("inspecting", &source, e))?;
            self.steps.push(Step::Touch(staged(&format!("/dev/{name}"))));
            self.steps.push(Step::Bind {
                source: path_cstring(&source),
                at: staged(&format!("/dev/{name}")),
                flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            });
        }
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            self.steps.push(Step::Symlink { target: cstring(target), at: staged(&format!("/dev/{name}")) });
        }
        self.tmpfs("/dev/shm", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "size=16m,nr_inodes=1024,mode=1777");
        self.steps.push(Step::ReadOnly { at: staged("/dev"), flags: libc::MS_NOSUID | libc::MS_NOEXEC });
        Ok(())
    }

    /// A minimal `/etc`: generated identity files plus read-only binds of the
    /// named host entries that exist.
    fn etc(&mut self, host_entries: &[String]) -> Result<(), LayoutError> {
        self.tmpfs("/etc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "size=1m,nr_inodes=1024,mode=0755");
        let files: [(&str, &str); 4] = [
            ("passwd", "root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:sandbox:/tmp:/usr/sbin/nologin\n"),
            ("group", "root:x:0:\nnogroup:x:65534:\n"),
            ("hostname", "sandbox\n"),
            ("hosts", "127.0.0.1 localhost sandbox\n::1 localhost\n"),
        ];
        for (name, content) in files {
            self.steps.push(Step::Write { at: staged(&format!("/etc/{name}")), content: content.as_bytes().to_vec() });
        }
        for name in host_entries {
            let source = Path::new("/etc").join(name);
            if fs::symlink_metadata(&source).is_ok() {
                self.bind(&source, &format!("/etc/{name}"), 0)?;
            }
        }
        self.steps
            .push(Step::ReadOnly { at: staged("/etc"), flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC });
        Ok(())
    }

    fn finish(self) -> Layout {
        Layout { steps: self.steps, origin: self.origin }
    }
}

impl Layout {
    /// A root of the host's system directories (`system`, absolute paths;
    /// those missing on this host are skipped), extra read-only `binds`
    /// (host path, path inside), and a minimal `/etc` with the named host
    /// entries. Paths inside must be checked by the caller (`check_inside`).
    ///
    /// # Errors
    ///
    /// When a source exists but cannot be opened or inspected.
    pub fn host(system: &[PathBuf], etc: &[String], binds: &[(PathBuf, String)]) -> Result<Self, LayoutError> {
        let mut b = Builder::new("the host".to_owned());
        for path in system {
            let Some(inside) = path.to_str() else { continue };
            if fs::symlink_metadata(path).is_ok() {
                b.bind(path, inside, 0)?;
            }
        }
        for (source, inside) in binds {
            b.bind(source, inside, 0)?;
        }
        b.etc(etc)?;
        b.dev()?;
        Ok(b.finish())
    }

    /// A root made of the entries of directory `rootfs` (each bound
    /// read-only, symlinks recreated), with the jail's own `/dev`.
    ///
    /// # Errors
    ///
    /// When `rootfs` cannot be listed or an entry cannot be opened.
    pub fn rootfs(rootfs: &Path) -> Result<Self, LayoutError> {
        let mut b = Builder::new(rootfs.display().to_string());
        let entries = fs::read_dir(rootfs).map_err(|e| b.error("listing", rootfs, e))?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|name| !RESERVED.contains(&name.as_str()))
            .collect();
        names.sort();
        // The jail mounts its own /var/tmp: a read-only var must have the mount point.
        let var = rootfs.join("var");
        if var.is_dir() && !var.join("tmp").is_dir() {
            let source = std::io::Error::other("the jail mounts /var/tmp there, and var is read-only in the jail");
            return Err(b.error("missing directory", &var.join("tmp"), source));
        }
        for name in names {
            b.bind(&rootfs.join(&name), &format!("/{name}"), 0)?;
        }
        b.dev()?;
        Ok(b.finish())
    }
}

/// Why `inside` cannot be a path of a bind in the jail, if it cannot: it
/// must be absolute, without `..`, and not where the jail mounts its own
/// file systems (it would be hidden, or hide them).
pub(super) fn check_inside(inside: &Path) -> Result<(), String> {
    use std::path::Component;
    if !inside.is_absolute() || inside.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{} must be an absolute path without `..`", inside.display()));
    }
    if inside == Path::new("/") || inside.to_str().is_none() {
        return Err(format!("{} cannot be bound into the jail", inside.display()));
    }
    let taken = ["/tmp", "/var/tmp", "/data", "/proc", "/dev", "/etc", "/sys"];
    if let Some(t) = taken.iter().find(|t| inside.starts_with(t) || Path::new(t).starts_with(inside)) {
        return Err(format!("{} would overlap the jail's own {t}", inside.display()));
    }
    Ok(())
}

/// The per-run part: `/tmp`, `/var/tmp`, `/data` and `/proc`.
/// The mounts of one run: its `/tmp`, `/var/tmp` and `/proc`, and the
/// user's directory at `/data` — or, for a warm jail (`data` is `None`), an
/// empty `/data` that the user's directory is attached onto when a call
/// comes (`super::warm`).
pub(super) fn run_steps(tmp_bytes: u64, data: Option<(&Path, &OwnedFd, bool)>) -> Vec<Step> {
    let scratch = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut steps = vec![
        Step::Mkdir(staged("/tmp")),
        Step::Tmpfs {
            at: staged("/tmp"),
            flags: scratch,
            options: cstring(&format!("size={tmp_bytes},nr_inodes={},mode=1777", crate::policy::TMP_FILES)),
        },
        Step::Mkdir(staged("/var")),
        Step::Mkdir(staged("/var/tmp")),
        Step::Tmpfs { at: staged("/var/tmp"), flags: scratch, options: cstring("size=50m,nr_inodes=4096,mode=1777") },
        Step::Mkdir(staged("/data")),
    ];
    if let Some((data_dir, fd, writable)) = data {
        let mut data_flags = scratch;
        if !writable {
            data_flags |= libc::MS_RDONLY;
        }
        steps.push(Step::Bind {
            source: path_cstring(data_dir),
            at: staged("/data"),
            flags: data_flags | locked_flags(fd),
        });
    }
    steps.push(Step::Mkdir(staged("/proc")));
    steps.push(Step::Proc { at: staged("/proc") });
    steps
}

/// Opens a user's directory as the source of `/data`, never through a symlink.
pub(super) fn open_data(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_may_not_land_on_the_jails_own_mounts() {
        for ok in ["/usr", "/opt/tools", "/var/lib/x", "/srv"] {
            assert_eq!(check_inside(Path::new(ok)), Ok(()), "{ok}");
        }
        for bad in
            ["usr", "/opt/../tmp", "/", "/tmp", "/tmp/x", "/var", "/var/tmp/y", "/data", "/proc/1", "/dev", "/etc/x"]
        {
            assert!(check_inside(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
