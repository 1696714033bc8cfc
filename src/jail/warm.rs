//! Warm jails: a jail whose program has started (and paid its imports)
//! before its call arrives, used for exactly one call.
//!
//! A warm jail is an ordinary run (`supervise`) whose `/data` is an empty
//! directory and whose program, once ready, writes [`READY_LINE`] on
//! stderr and blocks reading its input. When a call comes:
//!
//! 1. the run's cgroup gets the call's limits (refused when the jail
//!    already holds more memory than the call may have);
//! 2. the user's directory is attached at `/data`: a detached copy of its
//!    mount (`open_tree(OPEN_TREE_CLONE)`, with `nosuid,nodev,noexec` and
//!    `ro` when read-only) is moved onto the jail's `/data` by a thread
//!    that entered the jail's mount namespace (after `unshare(CLONE_FS)`);
//! 3. the input is written, after a first line with the call's resource
//!    limits (`rlimits::header`): the program reads it, lowers its limits to
//!    the call's, changes into `/data`, applies the jail's Landlock rules to itself ([`Jail::deferred_landlock`];
//!    a rule made at the exec would name the empty directory underneath,
//!    and Landlock never looks at a covered mount point), then runs the call.
//!
//! The call's wall-clock budget runs from its arrival; its CPU time is what
//! the cgroup counted after the attach. Nothing of a user is in a jail
//! before its call, and a jail serves one call: it ends with it. A jail that
//! cannot take its call (it died, its limits cannot be set, the attach
//! failed) hands it back, and the call runs in a fresh jail.
//!
//! Attaching needs `CAP_SYS_ADMIN` over the jail's mount namespace from
//! this process's own user namespace: pools run only when the server is
//! root ([`Jail::warm_size`]).

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use super::supervise::{self, WarmCall};
use super::{Jail, Layout, NativeOutcome, NativeRun, sys};
use crate::policy::Limits;

pub use super::supervise::READY_LINE;

/// The cgroup owner of warm jails (not a valid user id).
const OWNER: &str = "@warm";

/// How long a warm jail's program may take to get ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Attaches the user's directory `dir` at `/data` of the jail whose init is
/// `init` (a child of this process, not reaped).
pub(super) fn attach(init: libc::pid_t, dir: &Path, writable: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| "a NUL in the data directory's path".to_owned())?;
    let tree = sys::open_tree_clone(&path).map_err(errno("copying the user's directory's mount"))?;
    let tree = owned(tree);
    let mut attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC;
    if !writable {
        attrs |= sys::MOUNT_ATTR_RDONLY;
    }
    sys::mount_setattr(tree.as_raw_fd(), attrs).map_err(errno("setting /data's mount flags"))?;
    let open = |path: String, flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|e| format!("opening {path}: {e}"))
    };
    // The jail's /data, resolved in its root; never a symlink.
    let target = open(format!("/proc/{init}/root/data"), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)?;
    let mount_ns = open(format!("/proc/{init}/ns/mnt"), 0)?;
    // A thread of its own enters the jail's mount namespace and ends there.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                sys::unshare_fs().map_err(errno("unshare(CLONE_FS)"))?;
                sys::setns(mount_ns.as_raw_fd(), libc::CLONE_NEWNS).map_err(errno("entering the jail's mounts"))?;
                sys::move_mount_onto(tree.as_raw_fd(), target.as_raw_fd()).map_err(errno("attaching /data"))
            })
            .join()
            .unwrap_or_else(|_| Err("the attaching thread panicked".to_owned()))
    })
}

fn errno(what: &'static str) -> impl Fn(i32) -> String {
    move |e| format!("{what}: {}", std::io::Error::from_raw_os_error(e))
}

#[allow(unsafe_code)]
fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What every jail of a pool runs.
#[derive(Debug, Clone)]
pub struct WarmSpec {
    /// The tool's name (for logs).
    pub tool: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub layout: Option<Arc<Layout>>,
    /// The limits while warming and waiting (a call's replace them): the
    /// memory the warm-up needs, and resource limits at least those of every
    /// call it may serve (the program lowers them), the `/tmp` size every
    /// call gets.
    pub limits: Limits,
}

/// What a pool has done, for metrics.
#[derive(Debug, Default)]
pub struct WarmStats {
    /// Calls served by a warm jail.
    pub served: AtomicU64,
    /// Calls that found no warm jail (or one that could not take them).
    pub missed: AtomicU64,
    /// Warm jails started.
    pub started: AtomicU64,
    /// Warm jails that ended before a call (failed warm-ups).
    pub failed: AtomicU64,
}

/// A pool of warm jails for one tool, refilled as jails are taken.
pub struct WarmPool {
    jail: Arc<Jail>,
    spec: WarmSpec,
    size: usize,
    idle: Mutex<VecDeque<WarmJail>>,
    /// No more jails are started once set.
    stopped: AtomicBool,
    pub stats: WarmStats,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool").field("tool", &self.spec.tool).field("size", &self.size).finish_non_exhaustive()
    }
}

/// One warm jail, owned by the pool until it is taken.
struct WarmJail {
    calls: mpsc::Sender<Job>,
    ready: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    /// Set to let it go (while it warms up, too).
    cancel: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    /// Memory it held when it became ready.
    memory: Arc<AtomicU64>,
}

struct Job {
    call: WarmCall,
    answer: tokio::sync::oneshot::Sender<Result<NativeOutcome, String>>,
}

impl WarmPool {
    /// A pool that keeps `size` jails of `spec` warm (started now).
    pub fn new(jail: Arc<Jail>, mut spec: WarmSpec, size: usize) -> Arc<Self> {
        if let Some(rules) = jail.deferred_landlock() {
            spec.env.push(("IMAGENTX_LANDLOCK".to_owned(), rules));
        }
        // Warm jails of a process that died before it could remove them.
        jail.cgroups.sweep_stale("warm-", Duration::from_secs(120));
        let pool = Arc::new(Self {
            jail,
            spec,
            size,
            idle: Mutex::default(),
            stopped: AtomicBool::new(false),
            stats: WarmStats::default(),
        });
        pool.refill();
        pool
    }

    /// Lets every warm jail go and waits (up to `within`) until they are
    /// gone with their cgroups; starts no more. For the server's stop.
    pub fn stop(&self, within: Duration) {
        self.stopped.store(true, Ordering::Release);
        let jails: Vec<WarmJail> = self.idle.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        let deadline = Instant::now() + within;
        let threads: Vec<_> = jails
            .into_iter()
            .map(|jail| {
                jail.cancel.store(true, Ordering::Release);
                jail.thread
            })
            .collect();
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }

    /// Jails kept warm.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The tool's name.
    pub fn tool(&self) -> &str {
        &self.spec.tool
    }

    /// Warm jails now: ready to serve, still warming up, and the memory the
    /// ready ones held when they became ready.
    pub fn counts(&self) -> (usize, usize, u64) {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let ready: Vec<_> =
            idle.iter().filter(|j| j.alive.load(Ordering::Acquire) && j.ready.load(Ordering::Acquire)).collect();
        let memory = ready.iter().map(|j| j.memory.load(Ordering::Relaxed)).sum();
        let warming = idle.iter().filter(|j| j.alive.load(Ordering::Acquire)).count() - ready.len();
        (ready.len(), warming, memory)
    }

    /// Runs `call` in a warm jail: `None` when none could take it (then run
    /// it in a fresh jail). Blocking while the jail runs.
    pub async fn serve(
        self: &Arc<Self>,
        data_dir: &Path,
        data_writable: bool,
        limits: &Limits,
        input: &[u8],
        arrived: Instant,
    ) -> Option<NativeOutcome> {
        // The jail's /tmp was made at its start, and its program can only
        // lower its resource limits: other calls start fresh.
        let fits = limits.tmp_bytes == self.spec.limits.tmp_bytes
            && limits.tmp_files == self.spec.limits.tmp_files
            && super::rlimits::within(
                &super::rlimits::for_limits(limits),
                &super::rlimits::for_limits(&self.spec.limits),
            );
        if !fits {
            self.stats.missed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Some(jail) = self.take() else {
            self.stats.missed.fetch_add(1, Ordering::Relaxed);
            self.refill();
            return None;
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let call = WarmCall {
            data_dir: data_dir.to_owned(),
            data_writable,
            limits: limits.clone(),
            input: input.to_vec(),
            arrived,
        };
        let sent = jail.calls.send(Job { call, answer }).is_ok();
        drop(jail);
        let outcome = if sent { answered.await.ok() } else { None };
        // The jail in its place warms up now: while the call ran, a warm-up
        // (a core's worth of imports) would have competed with it for the CPU.
        self.refill();
        match outcome {
            Some(Ok(outcome)) => {
                self.stats.served.fetch_add(1, Ordering::Relaxed);
                Some(outcome)
            }
            Some(Err(why)) => {
                tracing::warn!(tool = %self.spec.tool, reason = %why, "a warm jail could not take its call; running it fresh");
                self.stats.missed.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                self.stats.missed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The oldest live warm jail, ready ones first (its replacement is
    /// started once the call is done: [`WarmPool::serve`]).
    fn take(self: &Arc<Self>) -> Option<WarmJail> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|j| j.alive.load(Ordering::Acquire));
        let at =
            idle.iter().position(|j| j.ready.load(Ordering::Acquire)).or(if idle.is_empty() { None } else { Some(0) });
        at.and_then(|i| idle.remove(i))
    }

    /// Starts warm jails until `size` are idle.
    fn refill(self: &Arc<Self>) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|j| j.alive.load(Ordering::Acquire));
        while idle.len() < self.size {
            match self.start() {
                Ok(jail) => idle.push_back(jail),
                Err(e) => {
                    tracing::error!(tool = %self.spec.tool, error = %e, "starting a warm jail failed");
                    break;
                }
            }
        }
    }

    /// Starts one warm jail on a thread of its own, which supervises it for
    /// its whole life (its init's parent-death signal is tied to it).
    fn start(self: &Arc<Self>) -> std::io::Result<WarmJail> {
        let (calls, jobs) = mpsc::channel::<Job>();
        let ready = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let memory = Arc::new(AtomicU64::new(0));
        let cancel = Arc::new(AtomicBool::new(false));
        let (jail, spec) = (Arc::clone(&self.jail), self.spec.clone());
        let (ready_flag, alive_flag, memory_held) = (Arc::clone(&ready), Arc::clone(&alive), Arc::clone(&memory));
        let cancelled = Arc::clone(&cancel);
        let pool = Arc::downgrade(self);
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::Builder::new().name("warm-jail".into()).spawn(move || {
            let id = format!("warm-{}", uuid::Uuid::new_v4().simple());
            let mut answer = None;
            let mut next = || loop {
                match jobs.recv_timeout(Duration::from_millis(100)) {
                    Ok(job) => {
                        answer = Some(job.answer);
                        return Some(job.call);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if !cancelled.load(Ordering::Acquire) => {}
                    Err(_) => return None,
                }
            };
            let mut warm = supervise::Warm {
                ready: &ready_flag,
                memory: &memory_held,
                cancelled: &cancelled,
                ready_within: READY_WITHIN,
                next: &mut next,
            };
            let run = NativeRun {
                id: &id,
                owner: OWNER,
                argv: &spec.argv,
                env: &spec.env,
                input: &[],
                data_dir: Path::new("/"),
                data_writable: false,
                limits: &spec.limits,
                layout: spec.layout.as_deref(),
            };
            let result = supervise::run_warm(&jail, &run, &mut warm);
            alive_flag.store(false, Ordering::Release);
            match (result, answer) {
                (Ok(outcome), Some(answer)) => {
                    let _ = answer.send(Ok(outcome));
                }
                (Err(why), Some(answer)) => {
                    let _ = answer.send(Err(why));
                }
                (Err(why), None) if !cancelled.load(Ordering::Acquire) => {
                    tracing::warn!(tool = %spec.tool, reason = %why, "a warm jail ended before its call");
                    if let Some(pool) = pool.upgrade() {
                        pool.stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
            // A call sent while it ended: hand it back.
            while let Ok(job) = jobs.try_recv() {
                let _ = job.answer.send(Err("the warm jail had ended".to_owned()));
            }
        })?;
        Ok(WarmJail { calls, ready, alive, cancel, thread, memory })
    }
}

impl Drop for WarmPool {
    /// A pool dropped (its tool replaced or retired) lets its jails go; their
    /// threads remove them.
    fn drop(&mut self) {
        for jail in self.idle.get_mut().unwrap_or_else(PoisonError::into_inner).drain(..) {
            jail.cancel.store(true, Ordering::Release);
        }
    }
}
