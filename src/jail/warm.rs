//! Warm jails: a jail whose program has started (and paid its imports)
//! before its call arrives, used for exactly one call.
//!
//! A warm jail is an ordinary run (`supervise`) whose `/data` is an empty
//! directory and whose program, once ready, writes [`super::READY_LINE`] on
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
//! A call takes only a ready jail, so its wall-clock budget runs from its
//! arrival; its CPU time is what the cgroup counted after the attach, its
//! peak memory what it reached after (where the kernel can reset the peak).
//! Nothing of a user is in a jail before its call, and a jail serves one
//! call: it ends with it. A jail that cannot take its call before the input
//! is written (it died, it holds more than half the call's memory, its
//! limits cannot be set, the attach failed) hands it back, and the call runs
//! in a fresh jail; after that, whatever happens is the call's outcome.
//!
//! What differs from a fresh jail: the warm-up's memory (about 70 MB for
//! python-data) counts against the call's memory limit; the jail's CPU is
//! weighed under one owner, the pool's (`@warm`), not the caller's, so warm
//! calls of different users share one owner's weight when the host is
//! contended; and idle warm jails are not reserved in the server's memory
//! budget (their cgroups hold each to the warm-up's limit).
//!
//! Attaching needs `CAP_SYS_ADMIN` over the jail's mount namespace from
//! this process's own user namespace: pools run only when the server is
//! root ([`Jail::warm_size`]).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use super::session::StepJob;
use super::supervise::{self, WarmCall};
use super::{Jail, Layout, NativeOutcome, NativeRun, sys};
use crate::policy::Limits;

/// The cgroup owner of warm jails (not a valid user id).
const OWNER: &str = "@warm";

/// How long a warm jail's program may take to get ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// After this many warm-ups failed in a row, none is started for
/// [`PAUSE_AFTER_FAILURES`] (calls run fresh meanwhile).
const FAILURES_BEFORE_PAUSE: u32 = 3;
const PAUSE_AFTER_FAILURES: Duration = Duration::from_secs(60);

/// Attaches the user's directory `dir` at `/data` of the jail whose init is
/// `init` (a child of this process, not reaped).
pub(super) fn attach(init: libc::pid_t, dir: &Path, writable: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let source = super::rootfs::open_data(dir).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let tree = sys::open_tree_clone(source.as_raw_fd()).map_err(errno("copying the user's directory's mount"))?;
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
        std::thread::Builder::new()
            .name("warm-attach".into())
            .spawn_scoped(scope, || {
                sys::unshare_fs().map_err(errno("unshare(CLONE_FS)"))?;
                sys::setns(mount_ns.as_raw_fd(), libc::CLONE_NEWNS).map_err(errno("entering the jail's mounts"))?;
                sys::move_mount_onto(tree.as_raw_fd(), target.as_raw_fd()).map_err(errno("attaching /data"))
            })
            .map_err(|e| format!("starting the attaching thread: {e}"))?
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
    /// No more jails are started once set (under `idle`'s lock).
    stopped: AtomicBool,
    /// Warm-ups that failed in a row, and when the last did.
    failing: Mutex<Option<(u32, Instant)>>,
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
            failing: Mutex::new(None),
            stats: WarmStats::default(),
        });
        pool.refill();
        pool
    }

    /// Lets every warm jail go and waits (up to `within`) until they are
    /// gone with their cgroups; starts no more. For the server's stop.
    pub fn stop(&self, within: Duration) {
        let jails: Vec<WarmJail> = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            self.stopped.store(true, Ordering::Release);
            idle.drain(..).collect()
        };
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

    /// Prepares a user's directory for a jail's `/data` ([`Jail::prepare_data_dir`]).
    ///
    /// # Errors
    ///
    /// As there.
    pub fn prepare_data_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.jail.prepare_data_dir(dir)
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

    /// Runs a call in a ready warm jail: `None` when none could take it
    /// before its input was written (then run it in a fresh jail).
    pub async fn serve(
        self: &Arc<Self>,
        data_dir: &Path,
        data_writable: bool,
        limits: &Limits,
        input: &[u8],
        arrived: Instant,
        cancel: Option<Arc<AtomicBool>>,
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
        let Some(jail) = self.take(false) else {
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
            session: None,
            cancel,
        };
        let sent = jail.calls.send(Job { call, answer }).is_ok();
        drop(jail);
        let outcome = if sent { answered.await.ok() } else { None };
        // The jail in its place warms up now: while the call ran, a warm-up
        // (a core's worth of imports) would have competed with it for the
        // CPU. (A call that found no ready jail starts one at once: it runs
        // fresh, and the pool must fill again.)
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

    /// Opens a session of steps (`super::session`) in a warm jail attached
    /// to `data_dir` under `limits` (a ready jail, or one started for it,
    /// which takes a warm-up).
    ///
    /// # Errors
    ///
    /// Why no jail could take the session.
    pub async fn open_session(
        self: &Arc<Self>,
        data_dir: &Path,
        data_writable: bool,
        limits: &Limits,
    ) -> Result<NativeSession, String> {
        if !self.fits(limits) {
            return Err("this tier's /tmp or resource limits differ from the warm jails'".to_owned());
        }
        let jail = match self.take(true) {
            Some(jail) => jail,
            None if self.stopped.load(Ordering::Acquire) => return Err("the server is stopping".to_owned()),
            None if self.failing() => {
                return Err("the jails' warm-ups keep failing (see the server's log); try again later".to_owned());
            }
            None => self.start().map_err(|e| format!("starting a jail: {e}"))?,
        };
        let (steps, steps_rx) = mpsc::channel();
        let closed = Arc::new(AtomicBool::new(false));
        let memory = Arc::new(AtomicU64::new(0));
        let why = Arc::new(Mutex::new(None));
        let (opened, is_open) = tokio::sync::oneshot::channel();
        let link = super::session::Link {
            steps: steps_rx,
            closed: Arc::clone(&closed),
            memory: Arc::clone(&memory),
            opened: Some(opened),
            idle_cpu: limits.cpu_time,
            why: Arc::clone(&why),
            answer_cap: limits.output_bytes,
        };
        let call = WarmCall {
            data_dir: data_dir.to_owned(),
            data_writable,
            limits: limits.clone(),
            input: Vec::new(),
            arrived: Instant::now(),
            session: Some(link),
            cancel: None,
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let alive = Arc::clone(&jail.alive);
        // Until the session is open, a dropped open (its client gone) lets
        // the jail go, warming up or not.
        let mut abandoned = LetGo { flags: [Arc::clone(&jail.cancel), Arc::clone(&closed)], armed: true };
        let sent = jail.calls.send(Job { call, answer }).is_ok();
        drop(jail);
        self.refill();
        if !sent {
            return Err("the warm jail had ended".to_owned());
        }
        match is_open.await {
            Ok(Ok(())) => {
                abandoned.armed = false;
                return Ok(NativeSession { steps, closed, memory, alive, why, dead: AtomicBool::new(false) });
            }
            Ok(Err(why)) => return Err(why),
            Err(_) => {}
        }
        Err(match answered.await {
            Ok(Err(why)) => why,
            Ok(Ok(outcome)) => format!("the jail ended: {}", outcome.error.unwrap_or_default()),
            Err(_) => "the warm jail ended".to_owned(),
        })
    }

    /// Whether warm-ups have failed often enough lately to pause them.
    fn failing(&self) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|(n, last)| n >= FAILURES_BEFORE_PAUSE && last.elapsed() < PAUSE_AFTER_FAILURES)
    }

    /// Whether a call under `limits` can run in this pool's jails: their
    /// `/tmp` was made at their start, and their program can only lower its
    /// resource limits.
    fn fits(&self, limits: &Limits) -> bool {
        use super::rlimits::{for_limits, within};
        limits.tmp_bytes == self.spec.limits.tmp_bytes
            && limits.tmp_files == self.spec.limits.tmp_files
            && within(&for_limits(limits), &for_limits(&self.spec.limits))
    }

    /// The oldest ready warm jail (a call never waits for a warm-up: its
    /// wall-clock budget runs from its arrival); with `or_warming`, the
    /// oldest live one when none is ready (a session, which has no clock
    /// while it opens). Its replacement is started once the call is done.
    fn take(self: &Arc<Self>, or_warming: bool) -> Option<WarmJail> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|j| j.alive.load(Ordering::Acquire));
        let ready = idle.iter().position(|j| j.ready.load(Ordering::Acquire));
        let at = if or_warming && ready.is_none() && !idle.is_empty() { Some(0) } else { ready };
        at.and_then(|i| idle.remove(i))
    }

    /// Starts warm jails until `size` are idle.
    /// Not while the pool stops, nor for a while after warm-ups kept failing
    /// (each is a core's worth of imports).
    fn refill(self: &Arc<Self>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        if self.failing() {
            return;
        }
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
            // `alive` goes down however this thread ends (a panic included).
            let _alive = Alive(alive_flag);
            // The server's pid in the name: the next start knows a dead
            // server's leftovers at once (`Cgroups::sweep_stale`).
            let id = format!("warm-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
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
                cancel: None,
            };
            let result = supervise::run_warm(&jail, &run, &mut warm);
            let became_ready = ready_flag.load(Ordering::Acquire);
            if let Some(pool) = pool.upgrade() {
                let mut failing = pool.failing.lock().unwrap_or_else(PoisonError::into_inner);
                *failing = if became_ready { None } else { Some((failing.map_or(0, |(n, _)| n) + 1, Instant::now())) };
            }
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

/// Sets its flags when dropped while armed: lets a jail go.
struct LetGo {
    flags: [Arc<AtomicBool>; 2],
    armed: bool,
}

impl Drop for LetGo {
    fn drop(&mut self) {
        if self.armed {
            for flag in &self.flags {
                flag.store(true, Ordering::Release);
            }
        }
    }
}

/// Clears a warm jail's `alive` flag when its thread ends.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
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

/// A session of steps in a jail: dropping it ends the session (its jail is
/// killed and removed by the thread that supervises it).
pub struct NativeSession {
    steps: mpsc::Sender<StepJob>,
    closed: Arc<AtomicBool>,
    memory: Arc<AtomicU64>,
    /// The jail's supervising thread still runs.
    alive: Arc<AtomicBool>,
    /// Why the jail ended between steps, when it did.
    why: Arc<Mutex<Option<String>>>,
    /// A step ended the session.
    dead: AtomicBool,
}

impl std::fmt::Debug for NativeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeSession").field("dead", &self.is_dead()).finish_non_exhaustive()
    }
}

impl NativeSession {
    /// Runs one step (`input`: its `{code, args}` document) under `limits`'
    /// wall-clock and CPU budgets and output caps, from `arrived`; stopped
    /// with status `cancelled` when `cancel` fires first. A step that does
    /// not end with the program's answer (a limit, a crash) ends the session.
    pub async fn step(
        &self,
        input: Vec<u8>,
        limits: &Limits,
        arrived: Instant,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> NativeOutcome {
        let (answer, mut answered) = tokio::sync::oneshot::channel();
        let job = StepJob { input, limits: limits.clone(), arrived, answer };
        let outcome = if self.is_dead() || self.steps.send(job).is_err() {
            None
        } else {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.closed.store(true, Ordering::Release);
                    answered.await.ok()
                }
                outcome = &mut answered => outcome.ok(),
            }
        };
        let outcome = outcome.unwrap_or_else(|| {
            let why = self.why.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let why = why.unwrap_or_else(|| "its jail had ended".to_owned());
            NativeOutcome::failed(
                crate::report::Status::Crashed,
                format!("the session ended: {why}"),
                arrived.elapsed(),
            )
        });
        if !matches!(outcome.status, crate::report::Status::Ok | crate::report::Status::ToolError) {
            self.dead.store(true, Ordering::Release);
        }
        outcome
    }

    /// Ends the session now (its jail is killed by its thread).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.dead.store(true, Ordering::Release);
    }

    /// The memory the session's jail held after its last step.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// Down once the jail's supervising thread has killed and reaped it:
    /// until then its mount namespace still holds the user's directory.
    pub fn alive_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.alive)
    }

    /// Whether the session can run no more steps.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire) || !self.alive.load(Ordering::Acquire)
    }
}

impl Drop for NativeSession {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}
