//! The guest's `wasi:filesystem`, charged: wasmtime-wasi's implementation with
//! every operation that can take disk or a host descriptor counted first.
//!
//! - Growth of a file (a positional `write`, a write through a stream, an
//!   append, `set-size`, a write past the end that leaves a hole) is charged
//!   to the budget of the preopen the file lives under: the user's ledger for
//!   `/data` (shared with their other calls and the files API), the call's own
//!   for `/tmp`. A write that does not fit is refused before it happens with
//!   `quota` (EDQUOT) under `/data` and `insufficient-space` (ENOSPC) under
//!   `/tmp`, so a tool can catch the error and carry on. A positional write that
//!   fits in part is shortened to what fits, as POSIX `write` does. Writes
//!   through a stream (what wasi-libc's `write` uses for files) are charged and
//!   refused the same way, but reach a C or Python program as EIO: see
//!   [`ChargedStream`].
//! - New files, directories and links are charged one entry each; unlinking
//!   and truncating give back what they free.
//! - Every file or directory the guest opens holds a host descriptor until
//!   the last handle to it (the descriptor, or a stream made from it) is
//!   dropped. A call holds at most its tier's soft `nofile` limit of them, one
//!   user's calls together at most the hard one, and all calls together at
//!   most what the process keeps for guests ([`DescriptorPool`]). WASI 0.2 has no EMFILE; a refused open answers
//!   `insufficient-memory` (ENOMEM), and the report's `limits_hit` says `nofile`.
//! - Renames and hard links between `/data` and `/tmp` answer `cross-device`
//!   (EXDEV), as they would between two mounts: a file cannot change budgets
//!   by being moved.
//!
//! WASI preview 1 modules reach this code too: they run as components, through
//! wasmtime's preview 1 adapter (see [`super::preview1`]), which asks
//! `filesystem-error-code` for a refused stream write, so a preview 1 program
//! sees EDQUOT or ENOSPC where wasi-libc's WASI 0.2 programs see EIO.
//!
//! Everything else is wasmtime-wasi's code, called as it is.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::bindings::filesystem::types::{self, ErrorCode, HostDescriptor, HostDirectoryEntryStream};
use wasmtime_wasi::p2::{FsError, FsResult};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream, OutputStream, StreamError, StreamResult};

use super::limiter::{PerOwner, give_back};
use super::wasi::{DATA_DIR, TMP_DIR};
use crate::quota::Budget;

/// Which preopen a descriptor lives under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Data,
    Tmp,
}

/// Limits a call ran into, as bits of [`CallCounters::hit`].
pub(crate) mod hit {
    pub const DATA_QUOTA: u32 = 1;
    pub const DATA_FILES: u32 = 1 << 1;
    pub const TMP: u32 = 1 << 2;
    pub const NOFILE: u32 = 1 << 3;
}

/// What a call's file-system use came to; shared with its streams.
#[derive(Debug, Default)]
pub(crate) struct CallCounters {
    /// Bytes the call added to files under `/data` and `/tmp`.
    pub written: AtomicU64,
    /// [`hit`] bits.
    pub hit: AtomicU32,
}

impl CallCounters {
    fn hit(&self, bit: u32) {
        self.hit.fetch_or(bit, Ordering::Relaxed);
    }

    /// The names of the limits hit, as `usage.limits_hit` spells them.
    pub(crate) fn limits_hit(&self) -> Vec<&'static str> {
        let bits = self.hit.load(Ordering::Relaxed);
        [(hit::DATA_QUOTA, "data_quota"), (hit::DATA_FILES, "data_files"), (hit::TMP, "tmp"), (hit::NOFILE, "nofile")]
            .into_iter()
            .filter(|(bit, _)| bits & bit != 0)
            .map(|(_, name)| name)
            .collect()
    }
}

/// Host descriptors that guests may hold at once, over all calls: the
/// process's own limit less a reserve for the server (its listener, its
/// connections, the database, logs), which no set of calls can take; and
/// what each user's calls hold together.
#[derive(Debug)]
pub struct DescriptorPool {
    in_use: AtomicU64,
    max: u64,
    /// Descriptors each user's calls in flight hold together.
    users: PerOwner,
}

impl DescriptorPool {
    /// A pool of `max` descriptors.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self { in_use: AtomicU64::new(0), max, users: PerOwner::default() })
    }

    /// A pool sized from the process's `RLIMIT_NOFILE` (soft) as it is now:
    /// all of it but a quarter, and at least `min_reserve`, for the server.
    pub fn for_this_process(min_reserve: u64) -> Arc<Self> {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(s, _)| s);
        Self::new(soft.saturating_sub((soft / 4).max(min_reserve)))
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// The counter of `owner`'s descriptors, shared by all their calls.
    pub(crate) fn owner(&self, owner: &str) -> Arc<AtomicU64> {
        self.users.get(owner)
    }

    fn take(&self) -> bool {
        take_one(&self.in_use, self.max)
    }

    fn give_back(&self, n: u64) {
        give_back(&self.in_use, n);
    }
}

fn take_one(counter: &AtomicU64, max: u64) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
}

/// What one call may hold: its own cap, its owner's, the process's.
pub(crate) struct DescriptorCaps {
    pub per_call: usize,
    pub per_owner: u64,
    pub owner: Arc<AtomicU64>,
    pub pool: Arc<DescriptorPool>,
}

impl DescriptorCaps {
    /// What a call of `owner` under `limits` may hold out of `pool`.
    pub(crate) fn for_call(pool: &Arc<DescriptorPool>, limits: &crate::policy::Limits, owner: &str) -> Self {
        Self {
            per_call: usize::try_from(limits.nofile_soft).unwrap_or(usize::MAX),
            per_owner: limits.nofile_hard,
            owner: pool.owner(owner),
            pool: Arc::clone(pool),
        }
    }
}

/// The host descriptors one call holds.
struct HeldFiles {
    /// One per open the guest made; dead once every handle to it is dropped.
    held: Vec<Weak<std::fs::File>>,
    caps: DescriptorCaps,
}

impl HeldFiles {
    /// Reserves a descriptor for one more open, or answers false.
    fn reserve(&mut self) -> bool {
        if self.try_take() {
            return true;
        }
        // Closed ones are only noticed here: count again, then retry.
        let before = self.held.len();
        self.held.retain(|f| f.strong_count() > 0);
        self.give_back((before - self.held.len()) as u64);
        self.try_take()
    }

    fn try_take(&self) -> bool {
        let caps = &self.caps;
        if self.held.len() >= caps.per_call || !take_one(&caps.owner, caps.per_owner) {
            return false;
        }
        if !caps.pool.take() {
            give_back(&caps.owner, 1);
            return false;
        }
        true
    }

    fn give_back(&self, n: u64) {
        give_back(&self.caps.owner, n);
        self.caps.pool.give_back(n);
    }

    fn opened(&mut self, file: &Arc<std::fs::File>) {
        self.held.push(Arc::downgrade(file));
    }

    fn cancel(&self) {
        self.give_back(1);
    }
}

impl Drop for HeldFiles {
    fn drop(&mut self) {
        self.give_back(self.held.len() as u64);
    }
}

/// One call's file-system accounting, kept in its store.
pub(crate) struct CallFs {
    data: Budget,
    tmp: Budget,
    /// The area of each live descriptor, by its resource handle.
    areas: HashMap<u32, Area>,
    /// Descriptors of files this call created and has not yet written
    /// through: their size is known to be 0 without asking the kernel
    /// (growth through another handle meanwhile is charged again, the safe
    /// side, as for any stream).
    fresh: HashSet<u32>,
    files: HeldFiles,
    counters: Arc<CallCounters>,
}

impl CallFs {
    pub(crate) fn new(data: Budget, tmp: Budget, files: DescriptorCaps, counters: Arc<CallCounters>) -> Self {
        let files = HeldFiles { held: Vec::new(), caps: files };
        Self { data, tmp, areas: HashMap::new(), fresh: HashSet::new(), files, counters }
    }
}

/// Why a write was refused, carried in a stream's error so that
/// `filesystem-error-code` can name it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DiskFull(&'static str, #[source] std::io::Error);

/// The `HasData` marker under which the linker reaches [`ChargedFs`].
pub(crate) struct ChargedFilesystem;

impl HasData for ChargedFilesystem {
    type Data<'a> = ChargedFs<'a>;
}

/// wasmtime-wasi's file-system view and the call's accounting, side by side.
pub(crate) struct ChargedFs<'a> {
    pub fs: WasiFilesystemCtxView<'a>,
    pub call: &'a mut CallFs,
}

/// Another handle to the same resource, to pass to wasmtime-wasi while
/// keeping the guest's for our own bookkeeping.
fn again<T: 'static>(r: &Resource<T>) -> Resource<T> {
    if r.owned() { Resource::new_own(r.rep()) } else { Resource::new_borrow(r.rep()) }
}

impl ChargedFs<'_> {
    fn area(&self, fd: &Resource<Descriptor>) -> Area {
        self.call.areas.get(&fd.rep()).copied().unwrap_or(Area::Data)
    }

    fn budget(&self, area: Area) -> &Budget {
        match area {
            Area::Data => &self.call.data,
            Area::Tmp => &self.call.tmp,
        }
    }

    /// Records the refusal and answers the error a POSIX program expects.
    fn refuse(&self, area: Area, entries: bool) -> FsError {
        let (bit, code) = match (area, entries) {
            (Area::Data, false) => (hit::DATA_QUOTA, ErrorCode::Quota),
            (Area::Data, true) => (hit::DATA_FILES, ErrorCode::Quota),
            (Area::Tmp, _) => (hit::TMP, ErrorCode::InsufficientSpace),
        };
        self.call.counters.hit(bit);
        code.into()
    }

    fn file(&self, fd: &Resource<Descriptor>) -> FsResult<Arc<std::fs::File>> {
        match self.fs.table.get(fd)? {
            Descriptor::File(f) => Ok(Arc::clone(&f.file)),
            Descriptor::Dir(_) => Err(ErrorCode::BadDescriptor.into()),
        }
    }

    /// What stands at `path` now (not following a final symlink unless asked).
    async fn existing(
        &mut self,
        fd: &Resource<Descriptor>,
        flags: types::PathFlags,
        path: &str,
    ) -> Option<types::DescriptorStat> {
        HostDescriptor::stat_at(&mut self.fs, again(fd), flags, path.to_owned()).await.ok()
    }

    /// Gives back what removing `gone` freed: its entry, and its bytes when it
    /// was a file's last link.
    fn freed(&self, area: Area, gone: &types::DescriptorStat) {
        let budget = self.budget(area);
        budget.remove_entry();
        if gone.type_ == types::DescriptorType::RegularFile && gone.link_count <= 1 {
            budget.shrink(gone.size);
        }
    }

    /// Charges one new entry under `fd`, runs `op`, and refunds it if `op` failed.
    async fn with_new_entry<R>(
        &mut self,
        fd: &Resource<Descriptor>,
        op: impl AsyncFnOnce(&mut WasiFilesystemCtxView<'_>) -> FsResult<R>,
    ) -> FsResult<R> {
        let area = self.area(fd);
        if self.budget(area).add_entry().is_err() {
            return Err(self.refuse(area, true));
        }
        let result = op(&mut self.fs).await;
        if result.is_err() {
            self.budget(area).remove_entry();
        }
        result
    }

    fn same_area(&self, a: &Resource<Descriptor>, b: &Resource<Descriptor>) -> FsResult<Area> {
        let area = self.area(a);
        if area == self.area(b) { Ok(area) } else { Err(ErrorCode::CrossDevice.into()) }
    }

    /// Refuses a stream that could only grow a file when nothing is left to
    /// grow it by: here WASI can still answer an error code, once the stream
    /// exists it cannot (see [`ChargedStream`]). The same for a stream that
    /// starts past the end, when the hole alone (a sparse write at 100 GiB)
    /// could never fit. Answers the file's size.
    fn refuse_a_full_stream(
        &mut self,
        fd: &Resource<Descriptor>,
        file: &std::fs::File,
        offset: Option<u64>,
    ) -> FsResult<u64> {
        let area = self.area(fd);
        let size = if self.call.fresh.remove(&fd.rep()) { 0 } else { file.metadata().map_err(ErrorCode::from)?.len() };
        // The growth of the stream's first byte.
        let first_byte = offset.map_or(1, |offset| (offset + 1).saturating_sub(size));
        if first_byte > self.budget(area).room() { Err(self.refuse(area, false)) } else { Ok(size) }
    }

    /// Wraps a stream wasmtime-wasi made so that its writes are charged.
    fn charged_stream(
        &mut self,
        stream: Resource<DynOutputStream>,
        (file, size): (Arc<std::fs::File>, u64),
        area: Area,
        position: Option<u64>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let inner = self.fs.table.delete(stream)?;
        let shrinks_seen = self.budget(area).ledger().shrinks();
        let charged: DynOutputStream = Box::new(ChargedStream {
            inner,
            file,
            budget: self.budget(area).clone(),
            refusal: match area {
                Area::Data => (hit::DATA_QUOTA, "disk quota of /data exceeded", libc::EDQUOT),
                Area::Tmp => (hit::TMP, "no space left in /tmp", libc::ENOSPC),
            },
            counters: Arc::clone(&self.call.counters),
            position,
            size,
            shrinks_seen,
        });
        Ok(self.fs.table.push(charged)?)
    }
}

impl preopens::Host for ChargedFs<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        let dirs = preopens::Host::get_directories(&mut self.fs)?;
        for (fd, name) in &dirs {
            let area = if name == TMP_DIR { Area::Tmp } else { Area::Data };
            debug_assert!(name == TMP_DIR || name == DATA_DIR, "unknown preopen {name}");
            self.call.areas.insert(fd.rep(), area);
        }
        Ok(dirs)
    }
}

impl types::Host for ChargedFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.fs, err)
    }

    fn filesystem_error_code(&mut self, err: Resource<wasmtime::Error>) -> wasmtime::Result<Option<ErrorCode>> {
        if let Some(full) = self.fs.table.get(&err)?.downcast_ref::<DiskFull>() {
            return Ok(Some(if full.1.raw_os_error() == Some(libc::EDQUOT) {
                ErrorCode::Quota
            } else {
                ErrorCode::InsufficientSpace
            }));
        }
        types::Host::filesystem_error_code(&mut self.fs, err)
    }
}

impl HostDescriptor for ChargedFs<'_> {
    async fn advise(
        &mut self,
        fd: Resource<Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        HostDescriptor::advise(&mut self.fs, fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<Descriptor>) -> FsResult<()> {
        HostDescriptor::sync_data(&mut self.fs, fd).await
    }

    async fn get_flags(&mut self, fd: Resource<Descriptor>) -> FsResult<types::DescriptorFlags> {
        HostDescriptor::get_flags(&mut self.fs, fd).await
    }

    async fn get_type(&mut self, fd: Resource<Descriptor>) -> FsResult<types::DescriptorType> {
        HostDescriptor::get_type(&mut self.fs, fd).await
    }

    async fn set_size(&mut self, fd: Resource<Descriptor>, size: types::Filesize) -> FsResult<()> {
        self.call.fresh.remove(&fd.rep());
        let area = self.area(&fd);
        let current = self.file(&fd)?.metadata().map_err(ErrorCode::from)?.len();
        if size > current {
            if self.budget(area).grow(size - current).is_err() {
                return Err(self.refuse(area, false));
            }
            let set = HostDescriptor::set_size(&mut self.fs, fd, size).await;
            match &set {
                Ok(()) => {
                    self.call.counters.written.fetch_add(size - current, Ordering::Relaxed);
                }
                Err(_) => self.budget(area).shrink(size - current),
            }
            set
        } else {
            // Shrinks of one file by two calls at once must not both refund
            // what only one freed: read the size again under the name lock.
            let ledger = Arc::clone(self.budget(area).ledger());
            let _names = ledger.names().lock().await;
            let current = self.file(&fd)?.metadata().map_err(ErrorCode::from)?.len();
            HostDescriptor::set_size(&mut self.fs, fd, size).await?;
            ledger.note_shrink();
            self.budget(area).shrink(current.saturating_sub(size));
            Ok(())
        }
    }

    async fn set_times(
        &mut self,
        fd: Resource<Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times(&mut self.fs, fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        HostDescriptor::read(&mut self.fs, fd, len, offset).await
    }

    async fn write(
        &mut self,
        fd: Resource<Descriptor>,
        mut buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        self.call.fresh.remove(&fd.rep());
        let area = self.area(&fd);
        let size = self.file(&fd)?.metadata().map_err(ErrorCode::from)?.len();
        let end = offset.saturating_add(buf.len() as u64);
        let growth = end.saturating_sub(size);
        let granted = self.budget(area).grow_up_to(growth);
        if granted < growth {
            // Shorten the write to what fits; refuse it when nothing does.
            let cut = growth - granted;
            if cut >= buf.len() as u64 {
                self.budget(area).shrink(granted);
                return Err(self.refuse(area, false));
            }
            buf.truncate(buf.len() - cut as usize);
            self.refuse(area, false);
        }
        match HostDescriptor::write(&mut self.fs, fd, buf, offset).await {
            Ok(n) => {
                let grew = offset.saturating_add(n).saturating_sub(size);
                self.budget(area).shrink(granted.saturating_sub(grew));
                self.call.counters.written.fetch_add(grew.min(granted), Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.budget(area).shrink(granted);
                Err(e)
            }
        }
    }

    async fn read_directory(&mut self, fd: Resource<Descriptor>) -> FsResult<Resource<types::DirectoryEntryStream>> {
        HostDescriptor::read_directory(&mut self.fs, fd).await
    }

    async fn sync(&mut self, fd: Resource<Descriptor>) -> FsResult<()> {
        HostDescriptor::sync(&mut self.fs, fd).await
    }

    async fn create_directory_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        let inner = again(&fd);
        self.with_new_entry(&fd, async |fs| HostDescriptor::create_directory_at(fs, inner, path).await).await
    }

    async fn stat(&mut self, fd: Resource<Descriptor>) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat(&mut self.fs, fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat_at(&mut self.fs, fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times_at(&mut self.fs, fd, path_flags, path, atim, mtim).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.same_area(&fd, &new_descriptor)?;
        let inner = again(&fd);
        self.with_new_entry(&fd, async |fs| {
            HostDescriptor::link_at(fs, inner, old_path_flags, old_path, new_descriptor, new_path).await
        })
        .await
    }

    /// Race-free accounting: whether the open made a new file is learnt from
    /// an exclusive create (not from a `stat` another call could overtake),
    /// and what a truncation frees from the opened file itself.
    async fn open_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<Descriptor>> {
        let area = self.area(&fd);
        let creating = oflags.contains(types::OpenFlags::CREATE);
        let truncating = oflags.contains(types::OpenFlags::TRUNCATE);
        if creating && self.budget(area).add_entry().is_err() {
            return Err(self.refuse(area, true));
        }
        if !self.call.files.reserve() {
            if creating {
                self.budget(area).remove_entry();
            }
            self.call.counters.hit(hit::NOFILE);
            return Err(ErrorCode::InsufficientMemory.into());
        }
        let plain = oflags & !types::OpenFlags::TRUNCATE;
        let mut opened = HostDescriptor::open_at(
            &mut self.fs,
            again(&fd),
            path_flags,
            path.clone(),
            if creating { plain | types::OpenFlags::EXCLUSIVE } else { plain },
            flags,
        )
        .await;
        let exists = matches!(&opened, Err(e) if e.downcast_ref() == Some(&ErrorCode::Exist));
        let created = creating && opened.is_ok();
        if creating && !created {
            self.budget(area).remove_entry();
        }
        if exists && !oflags.contains(types::OpenFlags::EXCLUSIVE) {
            // There already: open it as asked, without creating.
            opened = HostDescriptor::open_at(&mut self.fs, fd, path_flags, path, plain, flags).await;
        }
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.call.files.cancel();
                return Err(e);
            }
        };
        let file = match self.fs.table.get(&opened)? {
            Descriptor::File(f) => Arc::clone(&f.file),
            Descriptor::Dir(d) => Arc::clone(&d.dir),
        };
        self.call.files.opened(&file);
        self.call.areas.insert(opened.rep(), area);
        if created {
            self.call.fresh.insert(opened.rep());
        }
        if truncating && !created {
            // As for `set-size`: one truncation's refund at a time.
            let ledger = Arc::clone(self.budget(area).ledger());
            let _names = ledger.names().lock().await;
            let freed =
                file.metadata().and_then(|m| if m.is_file() { file.set_len(0).map(|()| m.len()) } else { Ok(0) });
            match freed {
                Ok(bytes) => {
                    self.budget(area).ledger().note_shrink();
                    self.budget(area).shrink(bytes);
                }
                Err(e) => {
                    HostDescriptor::drop(self, opened).map_err(FsError::trap)?;
                    return Err(ErrorCode::from(e).into());
                }
            }
        }
        Ok(opened)
    }

    fn drop(&mut self, fd: Resource<Descriptor>) -> wasmtime::Result<()> {
        self.call.areas.remove(&fd.rep());
        self.call.fresh.remove(&fd.rep());
        HostDescriptor::drop(&mut self.fs, fd)
    }

    async fn readlink_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<String> {
        HostDescriptor::readlink_at(&mut self.fs, fd, path).await
    }

    async fn remove_directory_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        let area = self.area(&fd);
        HostDescriptor::remove_directory_at(&mut self.fs, fd, path).await?;
        self.budget(area).remove_entry();
        Ok(())
    }

    async fn rename_at(
        &mut self,
        fd: Resource<Descriptor>,
        old_path: String,
        new_fd: Resource<Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        let area = self.same_area(&fd, &new_fd)?;
        let ledger = Arc::clone(self.budget(area).ledger());
        let _names = ledger.names().lock().await;
        let replaced = self.existing(&new_fd, types::PathFlags::empty(), &new_path).await;
        // A rename onto itself, or onto another link of the same file, frees
        // nothing (POSIX makes it a no-op): refunding it would be a way to
        // grow the quota in a loop.
        let same_file = match replaced {
            Some(_) => {
                let no_follow = types::PathFlags::empty();
                let old = HostDescriptor::metadata_hash_at(&mut self.fs, again(&fd), no_follow, old_path.clone()).await;
                let new =
                    HostDescriptor::metadata_hash_at(&mut self.fs, again(&new_fd), no_follow, new_path.clone()).await;
                matches!((old, new), (Ok(a), Ok(b)) if a.lower == b.lower && a.upper == b.upper)
            }
            None => false,
        };
        HostDescriptor::rename_at(&mut self.fs, fd, old_path, new_fd, new_path).await?;
        if let Some(replaced) = replaced.filter(|_| !same_file) {
            self.freed(area, &replaced);
        }
        Ok(())
    }

    async fn symlink_at(&mut self, fd: Resource<Descriptor>, src_path: String, dest_path: String) -> FsResult<()> {
        let inner = again(&fd);
        self.with_new_entry(&fd, async |fs| HostDescriptor::symlink_at(fs, inner, src_path, dest_path).await).await
    }

    async fn unlink_file_at(&mut self, fd: Resource<Descriptor>, path: String) -> FsResult<()> {
        let area = self.area(&fd);
        let ledger = Arc::clone(self.budget(area).ledger());
        let _names = ledger.names().lock().await;
        let gone = self.existing(&fd, types::PathFlags::empty(), &path).await;
        HostDescriptor::unlink_file_at(&mut self.fs, fd, path).await?;
        if let Some(gone) = gone {
            self.freed(area, &gone);
        }
        Ok(())
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        HostDescriptor::read_via_stream(&mut self.fs, fd, offset)
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let (area, file) = (self.area(&fd), self.file(&fd)?);
        let size = self.refuse_a_full_stream(&fd, &file, Some(offset))?;
        let stream = HostDescriptor::write_via_stream(&mut self.fs, fd, offset)?;
        self.charged_stream(stream, (file, size), area, Some(offset))
    }

    fn append_via_stream(&mut self, fd: Resource<Descriptor>) -> FsResult<Resource<DynOutputStream>> {
        let (area, file) = (self.area(&fd), self.file(&fd)?);
        let size = self.refuse_a_full_stream(&fd, &file, None)?;
        let stream = HostDescriptor::append_via_stream(&mut self.fs, fd)?;
        self.charged_stream(stream, (file, size), area, None)
    }

    async fn is_same_object(&mut self, a: Resource<Descriptor>, b: Resource<Descriptor>) -> wasmtime::Result<bool> {
        HostDescriptor::is_same_object(&mut self.fs, a, b).await
    }

    async fn metadata_hash(&mut self, fd: Resource<Descriptor>) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash(&mut self.fs, fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash_at(&mut self.fs, fd, path_flags, path).await
    }
}

impl HostDirectoryEntryStream for ChargedFs<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        HostDirectoryEntryStream::read_directory_entry(&mut self.fs, stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        HostDirectoryEntryStream::drop(&mut self.fs, stream)
    }
}

/// A file's output stream whose writes are charged before they are handed on.
///
/// `check-write` offers no more than fits, so a writer fills a budget exactly
/// with a short write. A write past it is refused with `last-operation-failed`
/// carrying EDQUOT or ENOSPC; `filesystem-error-code` answers `quota` or
/// `insufficient-space` for it, but wasi-libc (what C, Rust and CPython use)
/// never asks and turns every stream error into EIO. The report's
/// `limits_hit` names the limit all the same, and the file's next stream (after
/// an `open` or a seek) is refused with the code itself.
struct ChargedStream {
    inner: DynOutputStream,
    file: Arc<std::fs::File>,
    budget: Budget,
    /// The limit bit, message and errno of a refusal here.
    refusal: (u32, &'static str, i32),
    counters: Arc<CallCounters>,
    /// Where the next write lands; `None` for an appending stream.
    position: Option<u64>,
    /// Where the file ends as far as this stream knows: its size when the
    /// stream was made, grown by the stream's own writes (which run in the
    /// background, so an `fstat` may not show them yet). Growth by other
    /// handles is charged again here (the safe side); a shrink anywhere
    /// under the ledger makes the stream read the size afresh.
    size: u64,
    /// The ledger's shrink count when `size` was last read.
    shrinks_seen: u64,
}

impl ChargedStream {
    /// Where the next write starts, and where the file ends as far as we know.
    fn extent(&mut self) -> (u64, u64) {
        let shrinks = self.budget.ledger().shrinks();
        if shrinks != self.shrinks_seen {
            self.shrinks_seen = shrinks;
            self.size = self.file.metadata().map_or(0, |m| m.len());
        }
        (self.position.unwrap_or(self.size), self.size)
    }
}

#[async_trait::async_trait]
impl Pollable for ChargedStream {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[async_trait::async_trait]
impl OutputStream for ChargedStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let len = bytes.len() as u64;
        let (start, end_before) = self.extent();
        let end = start.saturating_add(len);
        let growth = end.saturating_sub(end_before);
        if self.budget.grow(growth).is_err() {
            let (bit, message, errno) = self.refusal;
            self.counters.hit(bit);
            let error = DiskFull(message, std::io::Error::from_raw_os_error(errno));
            return Err(StreamError::LastOperationFailed(wasmtime::Error::new(error)));
        }
        if let Err(e) = self.inner.write(bytes) {
            self.budget.shrink(growth);
            return Err(e);
        }
        self.counters.written.fetch_add(growth, Ordering::Relaxed);
        self.size = self.size.max(end);
        if let Some(position) = &mut self.position {
            *position = end;
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let permit = self.inner.check_write()?;
        if permit == 0 {
            return Ok(0);
        }
        // Offer what fits, so that a writer fills the budget exactly; with
        // nothing left, offer the stream's own permit and refuse the write.
        let (start, end_before) = self.extent();
        let room = self.budget.room().saturating_add(end_before.saturating_sub(start));
        Ok(if room == 0 { permit } else { permit.min(usize::try_from(room).unwrap_or(usize::MAX)) })
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}
