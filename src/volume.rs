//! Per-user ext4 volumes: the kernel's cap on what native tools write into
//! `/data`.
//!
//! WASM components and the files API are charged at every write by the
//! user's [`crate::quota::Ledger`]. A native tool writes with plain system
//! calls that no ledger sees, and `RLIMIT_FSIZE` caps each file, not their
//! sum; the host's filesystem has no project quotas here (root ext4 is
//! mounted without `prjquota`). So, where the host allows it (root,
//! `/dev/loop-control`, `mkfs.ext4`), each user's directory is a small ext4
//! filesystem in a sparse image file, `volumes/<user>.ext4`, loop-mounted on
//! `users/<user>` while the user is active:
//!
//! - its size is the tier's quota: blocks past the tier's bytes are reserved
//!   for root (`tune2fs -r`), and tools run as an unprivileged uid, so a
//!   tool's writes stop with `ENOSPC` at the quota, to the block;
//! - its inodes are the tier's `data_files` (as made; the ledger keeps a
//!   lower tier's cap for WASM calls);
//! - the image is sparse: the host's disk holds what the user wrote, plus
//!   the journal and the metadata actually written (about 1 MiB empty);
//! - made once, at the user's first call or file request (~50 ms), with the
//!   files already in the user's plain directory copied in; mounted at the
//!   first use after start or after idling (~25 ms); never per call;
//! - a tier change resizes it at its next mount (offline `resize2fs`).
//!
//! The server keeps these mounts in its own mount namespace when it can
//! (`serve` and `run` as root: see [`private_mounts`]): they go away with the
//! process however it ends, and the host's namespace never holds them. A
//! server in the host's namespace (the tests') unmounts them when its data
//! directory is dropped.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The lock file in `volumes/` (`@`: no user id has one).
const LOCK: &str = "@lock";

/// Filesystem block: the unit the kernel caps in.
const BLOCK: u64 = 4096;

/// Blocks a tool may write past the quota (1 MiB): ext4 refuses about this
/// many before a volume is full (measured: 60 to 255 blocks on this 2-core
/// host), so without them a tool could not write all of its quota.
const SLACK_BLOCKS: u64 = 256;

/// A volume unused for this long is unmounted (its next use mounts it again).
pub const IDLE_UNMOUNT: Duration = Duration::from_secs(300);

/// Which mechanism caps native tools' writes into `/data` (`[server] data_volumes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeMode {
    /// Per-user ext4 images where the host can mount them, else none (logged).
    #[default]
    Auto,
    /// Per-user ext4 images; the server does not start without them.
    Ext4Image,
    /// None: native tools' writes are checked before each call only.
    Off,
}

/// How users' images hold their blocks on the host's disk (`[server]
/// data_volume_space`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeSpace {
    /// Sparse images: the host's disk holds what users' files hold (and
    /// gets it back when they delete: the volumes are mounted with
    /// `discard`). The quotas may add up to more than the disk. When the
    /// disk fills, writes into volumes fail at the kernel's writeback, some
    /// after the tool was told they succeeded, and a volume whose journal
    /// cannot be written turns read-only; it is checked (`e2fsck`) and
    /// mounted again at its user's next call once space is back.
    #[default]
    Sparse,
    /// Each image's whole size is allocated on the host's disk when it is
    /// made, grown or mounted (`fallocate`): a user's quota is theirs
    /// whatever fills the disk (on a host filesystem that keeps allocated
    /// blocks allocated: not a copy-on-write one). Costs the quota of every
    /// user who has a volume, idle or not; a volume for which the disk has
    /// no room is refused, with that said.
    Reserved,
}

/// What a user's volume must hold: the tier's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSize {
    pub bytes: u64,
    pub files: u64,
}

/// Why a volume could not be made or mounted: the host's problem.
#[derive(Debug, thiserror::Error)]
#[error("volume of `{user}`: {what}")]
pub struct VolumeError {
    user: String,
    what: String,
    /// The host's disk had no room for it.
    no_space: bool,
}

impl VolumeError {
    /// Whether the host's disk had no room for the volume.
    pub fn is_no_space(&self) -> bool {
        self.no_space
    }
}

/// Every user's volume in one data directory.
#[derive(Debug)]
pub struct Volumes {
    /// `<data-dir>/volumes`: the images.
    images: PathBuf,
    /// `<data-dir>/users`: their mount points.
    users: PathBuf,
    volumes: Mutex<HashMap<String, Arc<UserVolume>>>,
    /// Volumes mounted now.
    mounted: AtomicUsize,
    /// Set by [`Volumes::unmount_all`]: nothing is mounted again.
    closed: std::sync::atomic::AtomicBool,
    /// Whether images are sparse or reserved on the host's disk.
    space: VolumeSpace,
    /// Said once: a volume without an ext4 error counter in sysfs.
    no_error_counter: std::sync::atomic::AtomicBool,
    /// `volumes/@lock`, held while this lives: one process at a time mounts
    /// a data directory's volumes (two mounts of one image corrupt it).
    _lock: nix::fcntl::Flock<std::fs::File>,
}

#[derive(Debug, Default)]
struct UserVolume {
    /// Held while the volume is made, mounted or unmounted.
    state: Mutex<State>,
    /// Holds handed out and not dropped yet.
    holds: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    mounted: bool,
    /// The size it was mounted for (`None`: as it was, for a measurement).
    size: Option<DiskSize>,
    /// When the last hold was dropped (or the volume mounted).
    last_used: Option<Instant>,
    /// The mounted filesystem's error count (`/sys/fs/ext4/<device>/errors_count`)
    /// and its figure when mounted: one more error and ext4 has stopped
    /// writing it (`errors=remount-ro`).
    errors: Option<(PathBuf, u64)>,
}

impl State {
    /// Whether the mounted volume stopped taking writes: ext4 does at an
    /// error (a journal it cannot write: the host's disk full under a sparse
    /// image, a failing disk). Older kernels mark the mount read-only; newer
    /// ones (6.x: `emergency_ro`) do not, but count the error.
    fn broken(&self, dir: &Path) -> bool {
        let read_only =
            nix::sys::statvfs::statvfs(dir).is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
        read_only
            || self.errors.as_ref().is_some_and(|(path, at_mount)| read_count(path).is_some_and(|n| n > *at_mount))
    }
}

/// The ext4 error counter in sysfs of the filesystem mounted on `dir`.
fn errors_counter(dir: &Path) -> Option<PathBuf> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let link = std::fs::read_link(format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev))).ok()?;
    Some(Path::new("/sys/fs/ext4").join(link.file_name()?).join("errors_count"))
}

fn read_count(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Keeps a user's volume mounted while it lives: take one before touching
/// the user's directory. Holds nothing for a user without a volume.
#[derive(Debug)]
pub struct VolumeHold {
    volume: Option<Arc<UserVolume>>,
}

impl VolumeHold {
    /// A hold on nothing: for a data directory without volumes.
    pub fn none() -> Self {
        Self { volume: None }
    }
}

impl Drop for VolumeHold {
    fn drop(&mut self) {
        if let Some(volume) = self.volume.take() {
            // Stamp first: an unmount sweep that sees no holds must also see the time.
            volume.state.lock().unwrap_or_else(PoisonError::into_inner).last_used = Some(Instant::now());
            volume.holds.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Volumes {
    /// Volumes for the data directory at `root` when `mode` asks for them
    /// and the host can make them: checked by making, mounting and
    /// unmounting a small one. `Ok(None)` when `mode` is `auto` and it cannot
    /// (the reason is logged), an error when it is `ext4-image`.
    ///
    /// # Errors
    ///
    /// What failed, when `mode` is [`VolumeMode::Ext4Image`].
    pub fn open(root: &Path, mode: VolumeMode, space: VolumeSpace) -> Result<Option<Self>, String> {
        if mode == VolumeMode::Off {
            return Ok(None);
        }
        let images = root.join("volumes");
        // Another process mounts these volumes: no mode may run beside it.
        let lock = Self::lock(&images)?;
        let volumes = Self {
            images,
            users: root.join("users"),
            volumes: Mutex::default(),
            mounted: AtomicUsize::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            space,
            no_error_counter: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        };
        match volumes.probe() {
            Ok(()) => Ok(Some(volumes)),
            Err(why) if mode == VolumeMode::Auto => {
                tracing::warn!(
                    why = %why,
                    "per-user data volumes are unavailable: native tools' writes into /data are checked \
                     before each call only, so one such call can write past the user's quota"
                );
                Ok(None)
            }
            Err(why) => Err(format!("per-user data volumes (data_volumes = \"ext4-image\"): {why}")),
        }
    }

    /// The data directory's volume lock, or why it cannot be had.
    fn lock(images: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
        use crate::data_dir::PidLockError;
        std::fs::create_dir_all(images).map_err(|e| format!("creating {}: {e}", images.display()))?;
        let path = images.join(LOCK);
        // The holder's pid in it: a backup reads the mounted volumes through
        // this process's mount namespace (`/proc/<pid>/root`).
        crate::data_dir::lock_with_pid(&path).map_err(|e| match e {
            PidLockError::Open(e) => format!("opening {}: {e}", path.display()),
            PidLockError::Lock(e) => format!(
                "another imagentx-sandbox process serves this data directory's volumes ({}: {e}); give each \
                 process its own --data-dir",
                path.display()
            ),
        })
    }

    /// Makes, mounts and unmounts a 16 MiB volume.
    fn probe(&self) -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the server is not root (mounting needs it)".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("/dev/loop-control is missing (no loop devices)".into());
        }
        std::fs::create_dir_all(&self.images).map_err(|e| format!("creating {}: {e}", self.images.display()))?;
        // Names with `@`, which no user id has.
        let image = self.images.join("@probe.ext4");
        let at = self.images.join("@probe");
        let _ = unmount(&at);
        let _ = std::fs::remove_dir(&at);
        let result = (|| {
            make_image(&image, DiskSize { bytes: 1 << 20, files: 16 }, self.space)?;
            std::fs::create_dir(&at)?;
            self.mount(&image, &at)?;
            unmount(&at)
        })();
        let _ = std::fs::remove_dir(&at);
        let _ = std::fs::remove_file(&image);
        result.map_err(|e| e.to_string())
    }

    fn volume(&self, user: &str) -> Arc<UserVolume> {
        let mut volumes = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(volumes.entry(user.to_owned()).or_default())
    }

    fn image(&self, user: &str) -> PathBuf {
        self.images.join(format!("{user}.ext4"))
    }

    /// A hold on `user`'s volume, mounted. With `size` (a call or a file
    /// request, which may write), the volume is made first if the user has
    /// none, and a made one is resized to `size` when it is mounted. Without
    /// (a measurement), a user without a volume gets an empty hold: their
    /// plain directory is what there is. Blocking when it mounts.
    ///
    /// # Errors
    ///
    /// [`VolumeError`] when the volume cannot be made or mounted.
    pub fn hold(&self, user: &str, size: Option<DiskSize>) -> Result<VolumeHold, VolumeError> {
        let volume = self.volume(user);
        let mut state = volume.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Mounted as it was for a walk of the directory, which is short: let
        // it finish, so that the volume can be mounted again at `size`.
        let deadline = Instant::now() + Duration::from_secs(2);
        while size.is_some()
            && state.mounted
            && state.size.is_none()
            && volume.holds.load(Ordering::Acquire) > 0
            && Instant::now() < deadline
        {
            drop(state);
            std::thread::sleep(Duration::from_millis(5));
            state = volume.state.lock().unwrap_or_else(PoisonError::into_inner);
        }
        // Mounted for another size (a tier change, or a measurement), or
        // turned read-only by an I/O error: mount again (resized, checked)
        // when nothing holds it; else at a later call.
        let unused = volume.holds.load(Ordering::Acquire) == 0;
        let other_size = size.is_some() && state.size != size;
        if state.mounted && unused && (other_size || state.broken(&self.users.join(user))) {
            if !other_size {
                tracing::warn!(
                    user,
                    "the user's data volume stopped taking writes after an error (was the host's disk full?): \
                     checking it and mounting it again"
                );
            }
            match unmount(&self.users.join(user)) {
                Ok(()) => {
                    state.mounted = false;
                    self.mounted.fetch_sub(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(user, error = %e, "could not unmount a data volume to mount it again"),
            }
        }
        if !state.mounted {
            let image = self.image(user);
            let fail = |what: String, e: &io::Error| VolumeError {
                user: user.to_owned(),
                what: format!("{what}: {e}"),
                no_space: is_no_space(e),
            };
            if self.closed.load(Ordering::Acquire) {
                return Err(VolumeError {
                    user: user.to_owned(),
                    what: "the data directory is closing".into(),
                    no_space: false,
                });
            }
            let dir = self.users.join(user);
            match size {
                None if !image.exists() => return Ok(VolumeHold { volume: None }),
                // Mounted already (by this process before, in this namespace): never touch a live image.
                _ if is_mount_point(&dir).unwrap_or(false) => {}
                None => {}
                Some(size) => {
                    self.recover(user).map_err(|e| fail("finishing an interrupted migration".into(), &e))?;
                    if image.exists() {
                        // Resizing reads and rewrites the superblock's counts: repaired first.
                        check(&image).map_err(|e| fail(format!("checking {}", image.display()), &e))?;
                        let staging = self.images.join(format!("{user}.staging"));
                        resize(&image, size, &staging, self.space)
                            .map_err(|e| fail(format!("resizing {}", image.display()), &e))?;
                    } else {
                        self.create(user, size).map_err(|e| fail(format!("making {}", image.display()), &e))?;
                    }
                }
            }
            self.mount_on(&image, &dir).map_err(|e| fail(format!("mounting on {}", dir.display()), &e))?;
            state.errors = errors_counter(&dir).and_then(|path| read_count(&path).map(|n| (path, n)));
            if state.errors.is_none() && !self.no_error_counter.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    user,
                    "no ext4 error counter in /sys/fs/ext4 for this volume: on kernels that keep a failed \
                     volume mounted read-write (6.x, emergency_ro), one that stopped taking writes is noticed \
                     only at its next mount"
                );
            }
            state.mounted = true;
            state.size = size;
            self.mounted.fetch_add(1, Ordering::Relaxed);
        }
        state.last_used = Some(Instant::now());
        volume.holds.fetch_add(1, Ordering::AcqRel);
        drop(state);
        Ok(VolumeHold { volume: Some(volume) })
    }

    /// A hold on `user`'s volume if it is mounted for `size` and nobody is
    /// mounting or unmounting it right now: never blocks.
    pub fn hold_if_mounted(&self, user: &str, size: DiskSize) -> Option<VolumeHold> {
        let volume = self.volume(user);
        let mut state = volume.state.try_lock().ok()?;
        if !state.mounted || state.size != Some(size) || state.broken(&self.users.join(user)) {
            return None;
        }
        state.last_used = Some(Instant::now());
        volume.holds.fetch_add(1, Ordering::AcqRel);
        drop(state);
        Some(VolumeHold { volume: Some(volume) })
    }

    /// Mounts `image` on `dir` (made if missing), unless this process already
    /// did (a data directory opened again in the same namespace).
    fn mount_on(&self, image: &Path, dir: &Path) -> io::Result<()> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            return Err(io::Error::other("not a directory (a symlink or a file)"));
        }
        if is_mount_point(dir)? {
            return Ok(());
        }
        if std::fs::read_dir(dir)?.next().is_some() {
            return Err(io::Error::other(format!(
                "the directory holds files and {} exists too: move one of them away",
                image.display()
            )));
        }
        self.mount(image, dir)
    }

    /// Checks `image` (`e2fsck`), reserves its blocks on the host's disk
    /// when volumes are [`VolumeSpace::Reserved`], and mounts it on `at`.
    fn mount(&self, image: &Path, at: &Path) -> io::Result<()> {
        check(image)?;
        if self.space == VolumeSpace::Reserved {
            reserve(image)?;
        }
        mount(image, at, self.space)
    }

    /// Makes `user`'s volume, with the files of their plain directory in it.
    fn create(&self, user: &str, size: DiskSize) -> io::Result<()> {
        std::fs::create_dir_all(&self.images)?;
        let dir = self.users.join(user);
        let plain = match std::fs::symlink_metadata(&dir) {
            Ok(meta) if !meta.is_dir() => return Err(io::Error::other("not a directory (a symlink or a file)")),
            Ok(_) => std::fs::read_dir(&dir)?.next().is_some(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        // A user already past the tier's caps (files written before volumes)
        // gets room for what they hold; the reserve then leaves tools none.
        let size = if plain {
            let (bytes, files) = crate::userfs::UserFs::open(&dir)
                .and_then(|fs| fs.usage())
                .map_err(|e| io::Error::other(e.to_string()))?;
            DiskSize {
                bytes: size.bytes.max(bytes + bytes / 16 + (files + 16) * BLOCK),
                files: size.files.max(files + 16),
            }
        } else {
            size
        };
        let fresh = self.images.join(format!("{user}.ext4.new"));
        make_image(&fresh, size, self.space)?;
        if plain {
            let staging = self.images.join(format!("{user}.staging"));
            let _ = unmount(&staging);
            std::fs::create_dir_all(&staging)?;
            self.mount(&fresh, &staging)?;
            let copied = copy_tree(&dir, &staging);
            unmount(&staging)?;
            std::fs::remove_dir(&staging)?;
            copied?;
            // Atomic steps from here; `recover` finishes them after a crash.
            let aside = self.images.join(format!("{user}.migrated"));
            std::fs::rename(&dir, &aside)?;
            std::fs::create_dir(&dir)?;
            std::fs::rename(&fresh, self.image(user))?;
            std::fs::remove_dir_all(&aside)?;
            tracing::info!(user, "moved the user's files into their new data volume");
        } else {
            std::fs::rename(&fresh, self.image(user))?;
        }
        Ok(())
    }

    /// Finishes a migration that a crash interrupted: the old files were set
    /// aside before the image took their place, and are removed after.
    fn recover(&self, user: &str) -> io::Result<()> {
        let aside = self.images.join(format!("{user}.migrated"));
        let _ = std::fs::remove_file(self.images.join(format!("{user}.ext4.new")));
        if !aside.exists() {
            return Ok(());
        }
        if self.image(user).exists() {
            return std::fs::remove_dir_all(&aside);
        }
        // The image never took their place: put the files back.
        let dir = self.users.join(user);
        let _ = std::fs::remove_dir(&dir);
        std::fs::rename(&aside, &dir)
    }

    /// Unmounts the volumes that nothing holds and that were last used more
    /// than `idle` ago; answers how many. Blocking.
    pub fn unmount_idle(&self, idle: Duration) -> usize {
        let volumes: Vec<_> = self
            .volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(user, v)| (user.clone(), Arc::clone(v)))
            .collect();
        let mut unmounted = 0;
        for (user, volume) in volumes {
            let mut state = volume.state.lock().unwrap_or_else(PoisonError::into_inner);
            // Holds are taken under `state`: none can appear while it is locked.
            let unused = volume.holds.load(Ordering::Acquire) == 0;
            if state.mounted && unused && state.last_used.is_none_or(|t| t.elapsed() >= idle) {
                match unmount(&self.users.join(&user)) {
                    Ok(()) => {
                        state.mounted = false;
                        self.mounted.fetch_sub(1, Ordering::Relaxed);
                        unmounted += 1;
                    }
                    Err(e) => tracing::warn!(user, error = %e, "could not unmount an idle data volume"),
                }
            }
        }
        unmounted
    }

    /// Unmounts every volume (at shutdown): lazily where one is still busy.
    /// None is mounted again afterwards: a late hold is refused.
    pub fn unmount_all(&self) {
        self.closed.store(true, Ordering::Release);
        let volumes: Vec<_> = self.volumes.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
        for (user, volume) in volumes {
            let mut state = volume.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.mounted {
                let at = self.users.join(&user);
                if unmount(&at).is_err() {
                    let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
                }
                state.mounted = false;
                self.mounted.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether `user`'s mounted volume is out of blocks or inodes for tools
    /// (`data_quota`, `data_files`): after a native call, what it ran into.
    pub fn full(&self, user: &str) -> Vec<&'static str> {
        let volume = self.volume(user);
        let state = volume.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.mounted {
            return Vec::new();
        }
        let Ok(stat) = nix::sys::statvfs::statvfs(&self.users.join(user)) else { return Vec::new() };
        let mut full = Vec::new();
        // ext4 refuses the last few hundred blocks of a nearly full volume
        // (it stops delaying allocation there): within SLACK of the quota is full.
        if stat.blocks_available() <= 2 * SLACK_BLOCKS {
            full.push("data_quota");
        }
        if stat.files_available() == 0 {
            full.push("data_files");
        }
        full
    }

    /// Users with a volume mounted now.
    pub fn mounted(&self) -> usize {
        self.mounted.load(Ordering::Relaxed)
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// The blocks an image for `size` has: the quota, its inodes' tables, the
/// journal, ext4's own reserve for delayed allocation (2 %, at most 4096
/// blocks), and room for group metadata. What tools may use of it is set by
/// [`set_reserve`], not by this.
fn image_blocks(size: DiskSize) -> u64 {
    let data = size.bytes.div_ceil(BLOCK);
    let inode_tables = inodes(size).saturating_mul(256).div_ceil(BLOCK);
    let journal = journal_mib(size) * (1 << 20) / BLOCK;
    let base = data + inode_tables + journal + data / 32 + 1024;
    base + (base / 50).min(4096)
}

fn inodes(size: DiskSize) -> u64 {
    // The reserved inodes (1 to 10, root's directory among them) come on top.
    size.files.saturating_add(10)
}

fn journal_mib(size: DiskSize) -> u64 {
    if size.bytes < (1 << 30) { 4 } else { 16 }
}

/// A sparse file formatted as ext4 for `size`, with its tool-usable blocks set.
fn make_image(path: &Path, size: DiskSize, space: VolumeSpace) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)?.set_len(image_blocks(size) * BLOCK)?;
    // Reserved first: a disk without room for it refuses before any work.
    let reserved = if space == VolumeSpace::Reserved { reserve(path) } else { Ok(()) };
    let made = reserved.and_then(|()| {
        run(command("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-b", "4096", "-N"])
            .arg(inodes(size).to_string())
            .arg("-J")
            .arg(format!("size={}", journal_mib(size)))
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-L", "imagentx-data"])
            .arg(path))
    });
    // mkfs's lost+found would show in the user's /data (and cost 4 blocks).
    let made = made.and_then(|()| run(command("debugfs").args(["-w", "-R", "rmdir lost+found"]).arg(path)));
    made.and_then(|()| set_reserve(path, size)).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Resizes an unmounted image to `size` if it was made for another one.
/// `staging`: an empty directory to mount it on once, for the kernel to
/// write the figure that `resize2fs` drops (the filesystem's overhead).
fn resize(path: &Path, size: DiskSize, staging: &Path, space: VolumeSpace) -> io::Result<()> {
    let blocks = image_blocks(size);
    let sb = Superblock::read(path)?;
    if sb.blocks == blocks {
        return set_reserve(path, size);
    }
    if blocks > sb.blocks {
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(blocks * BLOCK)?;
        // Reserved first, as when made: a disk without room refuses before resize2fs writes.
        if space == VolumeSpace::Reserved {
            reserve(path)?;
        }
    }
    // resize2fs wants a freshly checked filesystem. Exit 1: errors corrected
    // (free counts that the kernel leaves to be recounted): fine.
    let checked = command("e2fsck").args(["-f", "-p"]).arg(path).output()?;
    if !matches!(checked.status.code(), Some(0 | 1)) {
        let said = String::from_utf8_lossy(&checked.stdout).into_owned() + &String::from_utf8_lossy(&checked.stderr);
        return Err(io::Error::other(format!("e2fsck: {}", said.trim())));
    }
    let resized = run(command("resize2fs").arg(path).arg(blocks.to_string()));
    if let Err(e) = resized {
        // A shrink below what the user holds: keep the size; the ledger and the
        // reserve below hold them to the new quota.
        tracing::warn!(image = %path.display(), error = %e, "data volume not resized");
    } else if blocks < sb.blocks {
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(blocks * BLOCK)?;
    }
    // e2fsck makes a lost+found again, which would show in /data.
    let _ = run(command("debugfs").args(["-w", "-R", "rmdir lost+found"]).arg(path));
    // resize2fs leaves "Overhead clusters" out; the kernel counts it again
    // at a mount and writes it back. Without it every block of metadata
    // would count as the user's.
    if Superblock::read(path)?.overhead == 0 {
        std::fs::create_dir_all(staging)?;
        mount(path, staging, space)?;
        unmount(staging)?;
        let _ = std::fs::remove_dir(staging);
    }
    set_reserve(path, size)
}

/// Reserves for root every block past what a tool may use: the quota (and
/// [`SLACK_BLOCKS`]) less what the user's files hold already. Tools run unprivileged, so they stop
/// at the quota; the sandbox's own writes (WASM calls, the files API) are
/// held to it by the ledger.
fn set_reserve(path: &Path, size: DiskSize) -> io::Result<()> {
    let sb = Superblock::read(path)?;
    let usable = sb.blocks.saturating_sub(sb.overhead);
    // The root directory's own block is the volume's, not the user's.
    let used = usable.saturating_sub(sb.free).saturating_sub(1);
    let ext4_reserve = (sb.blocks / 50).min(4096);
    let room = (size.bytes.div_ceil(BLOCK) + SLACK_BLOCKS).saturating_sub(used);
    let reserve = sb.free.saturating_sub(ext4_reserve).saturating_sub(room);
    if reserve == sb.reserved {
        return Ok(());
    }
    run(command("tune2fs").arg("-r").arg(reserve.to_string()).arg(path))
}

/// The figures of an unmounted image's superblock that sizing needs.
#[derive(Debug)]
struct Superblock {
    blocks: u64,
    free: u64,
    reserved: u64,
    overhead: u64,
}

impl Superblock {
    fn read(path: &Path) -> io::Result<Self> {
        let out = command("dumpe2fs").arg("-h").arg(path).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("dumpe2fs: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> io::Result<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
                .ok_or_else(|| io::Error::other(format!("dumpe2fs printed no `{name}`")))
        };
        Ok(Self {
            blocks: field("Block count")?,
            free: field("Free blocks")?,
            reserved: field("Reserved block count")?,
            overhead: field("Overhead clusters").unwrap_or(0),
        })
    }
}

/// Checks an unmounted image with `e2fsck`: a clean one in milliseconds
/// (its superblock's state), fully one that the kernel marked with errors
/// (a journal that could not be written: a full host disk under a sparse
/// image, a failing disk), repairing what it finds. Logged when it repaired.
/// Never repaired while the host's disk refuses writes: `e2fsck -y` would
/// ignore the write errors and mark the image clean, half repaired; it is
/// refused (no space) until there is room, and checked then.
fn check(image: &Path) -> io::Result<()> {
    wait_released(image)?;
    let said = |out: &std::process::Output| {
        (String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)).trim().to_owned()
    };
    let failed = |out: &std::process::Output, what: &str| {
        let said = said(out);
        let kind = if said.contains("Error writing") || said.contains("No space left on device") {
            io::ErrorKind::StorageFull
        } else {
            io::ErrorKind::Other
        };
        io::Error::new(kind, format!("{what}: {said}"))
    };
    let preen = command("e2fsck").arg("-p").arg(image).output()?;
    // Exit bits: 1 errors corrected, 2 corrected ("reboot", for a root
    // filesystem), 4 errors left, 8 and up: e2fsck itself failed.
    let code = preen.status.code().unwrap_or(8);
    let (code, repair) = if code & !3 == 0 {
        (code, preen)
    } else if code & !7 == 0 {
        if failed(&preen, "").kind() == io::ErrorKind::StorageFull {
            return Err(failed(&preen, "e2fsck could not write its repairs"));
        }
        // Errors `-p` may not repair on its own.
        let fixed = command("e2fsck").args(["-f", "-y"]).arg(image).output()?;
        match fixed.status.code() {
            Some(code @ 0..=3) => (code, fixed),
            _ => return Err(failed(&fixed, "e2fsck could not repair it")),
        }
    } else {
        return Err(failed(&preen, "e2fsck"));
    };
    if code != 0 {
        tracing::warn!(image = %image.display(), said = %said(&repair), "a data volume had errors: e2fsck repaired it");
        // A full check makes a lost+found, which would show in the user's /data.
        let _ = run(command("debugfs").args(["-w", "-R", "rmdir lost+found"]).arg(image));
    }
    Ok(())
}

/// How long an image may stay attached to a loop device after its last
/// mount here is gone.
const RELEASE_WITHIN: Duration = Duration::from_secs(10);

/// Waits until no loop device is backed by `image`. Our unmount is not the
/// last word: a native tool's jail had the volume mounted in its own mount
/// namespace, which the kernel tears down after the jail's last process
/// exits. Until then the filesystem is live, and an offline `e2fsck` or
/// `resize2fs` would work on a live image (and its changes be overwritten
/// when the kernel lets go of it).
fn wait_released(image: &Path) -> io::Result<()> {
    let image = std::fs::canonicalize(image)?;
    let deadline = Instant::now() + RELEASE_WITHIN;
    while attached(&image) {
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "still attached to a loop device {}s after its last mount here (a jail that has not ended?)",
                RELEASE_WITHIN.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Whether a loop device is backed by the file at `image` (a canonical path).
fn attached(image: &Path) -> bool {
    let Ok(devices) = std::fs::read_dir("/sys/block") else { return false };
    devices.flatten().filter(|d| d.file_name().as_encoded_bytes().starts_with(b"loop")).any(|d| {
        std::fs::read(d.path().join("loop/backing_file"))
            .is_ok_and(|file| file.strip_suffix(b"\n").unwrap_or(&file) == image.as_os_str().as_encoded_bytes())
    })
}

/// Allocates every block of `image` on the host's disk ([`VolumeSpace::Reserved`]):
/// the filesystem's own writes into it can then never find the disk full.
/// Quick where they are allocated already.
fn reserve(image: &Path) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(image)?;
    let len = i64::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len).map_err(|e| {
        io::Error::new(io::Error::from(e).kind(), format!("reserving its {} MiB on the host's disk: {e}", len >> 20))
    })
}

/// Whether `e` says the host's disk is full (the error of a system call,
/// or the message of a program that ran into it).
fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
        || e.kind() == io::ErrorKind::StorageFull
        || e.to_string().contains("No space left on device")
}

fn mount(image: &Path, at: &Path, space: VolumeSpace) -> io::Result<()> {
    // A loop device in direct-I/O mode: the image's data is cached once (in
    // the volume), not a second time as the image file's pages.
    let attached = command("losetup").args(["--find", "--show", "--direct-io=on"]).arg(image).output()?;
    if !attached.status.success() {
        return Err(io::Error::other(format!("losetup: {}", String::from_utf8_lossy(&attached.stderr).trim())));
    }
    let device = String::from_utf8_lossy(&attached.stdout).trim().to_owned();
    // Sparse images get the blocks of deleted files back (the loop device
    // punches holes); reserved ones must keep them.
    let options = match space {
        VolumeSpace::Sparse => "nosuid,nodev,noatime,noinit_itable,errors=remount-ro,discard",
        VolumeSpace::Reserved => "nosuid,nodev,noatime,noinit_itable,errors=remount-ro",
    };
    let mounted = run(command("mount").args(["-t", "ext4", "-o", options, &device]).arg(at));
    // Detached at once: the device goes away with the mount (or now, if the
    // mount failed), however the process ends.
    if let Err(e) = run(command("losetup").arg("-d").arg(&device)) {
        tracing::warn!(device, error = %e, "loop device not set to go away with its mount");
    }
    mounted
}

fn unmount(at: &Path) -> io::Result<()> {
    nix::mount::umount2(at, nix::mount::MntFlags::empty()).map_err(io::Error::from)
}

fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let parent = dir.parent().ok_or_else(|| io::Error::other("no parent"))?;
    Ok(std::fs::metadata(dir)?.dev() != std::fs::metadata(parent)?.dev())
}

/// Copies a user's plain directory into their new volume (`cp -a`: modes,
/// times, links, holes).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let mut source = from.as_os_str().to_owned();
    source.push("/.");
    run(Command::new("cp").arg("-a").arg("--").arg(source).arg(to))
}

/// A command of e2fsprogs or util-linux, speaking English whatever the
/// locale (its errors are read: see [`is_no_space`]).
fn command(name: &str) -> Command {
    let mut command = Command::new(tool(name));
    command.env("LC_ALL", "C");
    command
}

/// The program at /sbin or /usr/sbin when PATH (a service's may be short) lacks it.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(command: &mut Command) -> io::Result<()> {
    let out = command.output()?;
    if out.status.success() {
        Ok(())
    } else {
        let program = command.get_program().to_string_lossy().into_owned();
        Err(io::Error::other(format!("{program}: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Puts the process in a mount namespace of its own whose mounts do not
/// reach the host's (new host mounts still reach it): volumes mounted here
/// vanish with the process, even when it is killed. Must run before any
/// other thread starts (the namespace is per thread until then). Answers
/// why not when it cannot (not root: no volumes either).
///
/// # Errors
///
/// The system call that failed.
pub fn private_mounts() -> Result<(), String> {
    use nix::mount::MsFlags;
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(|e| format!("making / a slave mount: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_leave_room_for_the_quota_and_ext4s_reserve() {
        for (bytes, files) in [(1 << 20, 100), (100 << 20, 10_000), (1 << 30, 100_000), (10 << 30, 1_000_000)] {
            let size = DiskSize { bytes, files };
            let blocks = image_blocks(size);
            let needed = bytes / BLOCK + inodes(size) * 256 / BLOCK + journal_mib(size) * 256;
            assert!(blocks > needed + (blocks / 50).min(4096), "{size:?}: {blocks} blocks");
            // Not wildly more than asked: the apparent size shows in `ls`.
            assert!(blocks * BLOCK < bytes + bytes / 8 + (64 << 20) + inodes(size) * 256, "{size:?}");
        }
    }
}
