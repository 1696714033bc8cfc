//! The parent side of a run: make the cgroup and pipes, clone into the new
//! namespaces, map ids, let the child go (the tool moves itself into the
//! cgroup), feed its stdin, collect its capped output, enforce the wall-clock
//! and CPU-time deadlines, reap it, and read what the cgroup recorded.

use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::cgroup::{CgroupLimits, CgroupStats};
use super::child::{self, Milestones, Plan, Stage};
use super::rootfs;
use super::{Jail, NativeOutcome, NativeRun, Timings};
use super::{rlimits, sys};
use crate::report::Status;

/// Why a run stopped early, when the supervisor stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Wall,
    Cpu,
    /// The caller cancelled the call.
    Cancelled,
}

/// Stack size of the jail's init and of the tool before its exec.
const CHILD_STACK: usize = 256 * 1024;

/// How often the CPU time of a running tool is read.
const CPU_POLL: Duration = Duration::from_millis(10);

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Output kept up to a cap; the rest counted and dropped.
struct Capped {
    bytes: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl Capped {
    fn push(&mut self, chunk: &[u8]) {
        let room = self.cap.saturating_sub(self.bytes.len());
        let keep = chunk.len().min(room);
        self.bytes.extend_from_slice(chunk.get(..keep).unwrap_or_default());
        self.dropped += (chunk.len() - keep) as u64;
    }
}

/// The wait status of the tool, or nothing when init died first.
fn decode_status(bytes: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal).map_or_else(|_| format!("SIG{signal}"), |s| s.as_str().to_owned())
}

/// `argv[0]` resolved against the jail's PATH (inside the jail, by the child).
fn exec_candidates(program: &str, path: &str) -> Vec<CString> {
    let make = |s: String| CString::new(s).unwrap_or_default();
    if program.contains('/') {
        return vec![make(program.to_owned())];
    }
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|dir| make(format!("{}/{program}", dir.trim_end_matches('/'))))
        .collect()
}

pub(super) fn run(jail: &Jail, req: &NativeRun<'_>) -> NativeOutcome {
    let started = Instant::now();
    match prepare_and_run(jail, req, started, None) {
        Ok(outcome) => outcome,
        Err(message) => NativeOutcome::failed(Status::InternalError, message, started.elapsed()),
    }
}

/// Starts `req` as a warm jail (no `/data`, no input), waits until its
/// program says it is ready, then for `warm`'s call, and runs that. Answers
/// the call's outcome, or why no call was run (nothing of a call is run
/// unless its `/data` was attached and its limits set).
pub(super) fn run_warm(jail: &Jail, req: &NativeRun<'_>, warm: &mut Warm<'_>) -> Result<NativeOutcome, String> {
    prepare_and_run(jail, req, Instant::now(), Some(warm))
}

/// A warm jail's side of a run: how it learns that it is ready and gets its call.
pub(super) struct Warm<'a> {
    /// Set once the program has said it is ready.
    pub ready: &'a std::sync::atomic::AtomicBool,
    /// The memory the jail held when it became ready.
    pub memory: &'a std::sync::atomic::AtomicU64,
    /// Set when the jail is let go before its call.
    pub cancelled: &'a std::sync::atomic::AtomicBool,
    /// How long the program may take to get ready.
    pub ready_within: Duration,
    /// Blocks until the call comes; `None`: no call will.
    pub next: &'a mut dyn FnMut() -> Option<WarmCall>,
}

/// A call for a warm jail.
pub(super) struct WarmCall {
    pub data_dir: std::path::PathBuf,
    pub data_writable: bool,
    pub limits: crate::policy::Limits,
    pub input: Vec<u8>,
    /// When the call arrived: its wall-clock budget runs from here.
    pub arrived: Instant,
    /// A session's steps instead of one call (`super::session`).
    pub session: Option<super::session::Link>,
    /// Set when the caller cancels the call.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The line a warm jail's program writes on stderr once it is ready to
/// read its call.
pub const READY_LINE: &[u8] = b"imagentx-warm-ready\n";

fn prepare_and_run(
    jail: &Jail,
    req: &NativeRun<'_>,
    started: Instant,
    warm: Option<&mut Warm<'_>>,
) -> Result<NativeOutcome, String> {
    let limits = req.limits;
    let Some(program) = req.argv.first() else {
        return Ok(NativeOutcome::failed(Status::InvalidTool, "no program to run".to_owned(), started.elapsed()));
    };
    if req.argv.iter().chain(req.env.iter().flat_map(|(k, v)| [k, v])).any(|s| s.contains('\0')) {
        return Ok(NativeOutcome::failed(
            Status::InvalidInput,
            "arguments and environment may not contain NUL bytes".to_owned(),
            started.elapsed(),
        ));
    }
    let id = req.id;
    let cgroup_limits = CgroupLimits { memory_bytes: limits.memory_bytes, cpu: limits.cpu_share, pids: limits.pids };
    let mut cgroup =
        jail.cgroups.create(id, req.owner, &cgroup_limits).map_err(|e| format!("creating the run's cgroup: {e}"))?;
    let t_cgroup = started.elapsed();

    let (stdin_r, stdin_w) = pipe().map_err(io("pipe"))?;
    let (stdout_r, stdout_w) = pipe().map_err(io("pipe"))?;
    let (stderr_r, stderr_w) = pipe().map_err(io("pipe"))?;
    let (go_r, go_w) = pipe().map_err(io("pipe"))?;
    let (err_r, err_w) = pipe().map_err(io("pipe"))?;
    let (status_r, status_w) = pipe().map_err(io("pipe"))?;
    let data = match warm {
        Some(_) => None,
        None => Some(rootfs::open_data(req.data_dir).map_err(|e| format!("opening {}: {e}", req.data_dir.display()))?),
    };
    let layout = req.layout.unwrap_or(&jail.layout);
    let run_steps = rootfs::run_steps(limits.tmp_bytes, data.as_ref().map(|fd| (req.data_dir, fd, req.data_writable)));

    let procs_files = cgroup.procs_files().map_err(|e| format!("the run's cgroup: {e}"))?;
    let cgroup_procs: Vec<RawFd> = procs_files.iter().map(AsRawFd::as_raw_fd).collect();
    let mut keep: Vec<RawFd> = [&go_r, &err_w, &status_w, &stdin_r, &stdout_w, &stderr_w]
        .iter()
        .map(|fd| fd.as_raw_fd())
        .chain(cgroup_procs.iter().copied())
        .collect();
    keep.sort_unstable();

    let argv_c: Vec<CString> = req.argv.iter().map(|a| CString::new(a.as_bytes()).unwrap_or_default()).collect();
    let env_c: Vec<CString> =
        req.env.iter().map(|(k, v)| CString::new(format!("{k}={v}")).unwrap_or_default()).collect();
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let path = req.env.iter().find(|(k, _)| k == "PATH").map_or(super::DEFAULT_PATH, |(_, v)| v.as_str());
    let exec_paths = exec_candidates(program, path);
    let rlimits = rlimits::for_limits(limits);
    // The children run in this process's memory, on stacks of their own.
    let init_stack = sys::Stack::new(CHILD_STACK).map_err(io("mapping a stack"))?;
    let tool_stack = sys::Stack::new(CHILD_STACK).map_err(io("mapping a stack"))?;
    let milestones = Milestones::default();
    let plan = Plan {
        layout,
        run_steps: &run_steps,
        go_r: go_r.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        status_w: status_w.as_raw_fd(),
        stdin_r: stdin_r.as_raw_fd(),
        stdout_w: stdout_w.as_raw_fd(),
        stderr_w: stderr_w.as_raw_fd(),
        cgroup_procs: &cgroup_procs,
        keep: &keep,
        uid: super::SANDBOX_ID,
        gid: super::SANDBOX_ID,
        setgroups: jail.privileged,
        rlimits: &rlimits,
        filter: &jail.filter,
        // A warm jail's program restricts itself once /data is attached
        // (`landlock::deferred`): a rule made now would miss the attached tree.
        landlock: if warm.is_some() { None } else { jail.landlock },
        exec_paths: &exec_paths,
        argv: &argv,
        envp: &envp,
        tool_stack: &tool_stack,
        milestones: &milestones,
    };

    let arg = &plan as *const Plan<'_> as *mut libc::c_void;
    // SAFETY: `init_entry` keeps to `sys`'s rules for children that share
    // this memory; `plan`, what it points at and both stacks stay alive until
    // the child is reaped (`Reaper` below is dropped first).
    #[allow(unsafe_code)]
    let cloned = unsafe { sys::clone_with_stack(jail.clone_flags(), &init_stack, child::init_entry, arg) };
    let pid = cloned.map_err(io("clone"))?;
    let t_clone = started.elapsed();
    // From here on the child must be reaped whatever happens.
    let mut child = Reaper { pid, reaped: false };
    drop((stdin_r, stdout_w, stderr_w, go_r, err_w, status_w, data, procs_files));

    if let Err(e) = jail.map_ids(pid) {
        return Err(format!("writing the user namespace's id maps: {e}"));
    }
    let mut go_w = File::from(go_w);
    go_w.write_all(b"g").map_err(io("starting the run"))?;
    drop(go_w);

    let t_go = started.elapsed();
    let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open: {}", std::io::Error::from_raw_os_error(e)))?;
    // SAFETY: `pidfd` was just opened and is owned by no one else.
    let pidfd = unsafe_owned(pidfd);
    for fd in [&stdin_w, &stdout_r, &stderr_r] {
        nonblocking(fd).map_err(io("fcntl"))?;
    }
    // A warm jail: ready, then its call, with its limits and /data.
    let mut call = None;
    let mut cpu_base = Duration::ZERO;
    if let Some(warm) = warm {
        wait_ready(&pidfd, &stderr_r, warm.ready_within, warm.cancelled)?;
        warm.memory.store(cgroup.memory_now().unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
        warm.ready.store(true, std::sync::atomic::Ordering::Release);
        let Some(next) = (warm.next)() else {
            return Err("the warm jail was let go before a call".to_owned());
        };
        let call_limits =
            CgroupLimits { memory_bytes: next.limits.memory_bytes, cpu: next.limits.cpu_share, pids: next.limits.pids };
        // The warm-up's memory counts against the call's limit: leave it at
        // least half (a fresh jail is fairer to a small tier).
        if let Some(held) = cgroup.memory_now().filter(|held| held.saturating_mul(2) > next.limits.memory_bytes) {
            return Err(format!("the warm jail holds {held} bytes, the call may have {}", next.limits.memory_bytes));
        }
        cgroup.set_limits(&call_limits).map_err(|e| format!("setting the call's limits: {e}"))?;
        if sys::poll(&mut [libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }], 0) != Ok(0) {
            return Err("the warm jail's program ended before its call".to_owned());
        }
        super::warm::attach(pid, &next.data_dir, next.data_writable)?;
        cpu_base = cgroup.cpu().unwrap_or_default();
        // The call's peak, not the warm-up's.
        cgroup.reset_peaks();
        call = Some(next);
    }
    let session = call.as_mut().and_then(|call| call.session.take());
    // A warm call's own flag, or the fresh run's.
    let call_cancel = call.as_ref().and_then(|call| call.cancel.clone());
    let cancel = call_cancel.as_deref().or(req.cancel);
    let (limits, input, clock) = match &mut call {
        Some(call) => {
            // The program lowers its own resource limits to the call's first.
            let table = rlimits::for_limits(&call.limits);
            let cap = session.is_some().then_some(call.limits.output_bytes);
            let mut input = rlimits::header(&table, cap).into_bytes();
            input.append(&mut call.input);
            call.input = input;
            (&call.limits, call.input.as_slice(), call.arrived)
        }
        None => (limits, req.input, started),
    };
    let cap = limits.output_bytes;
    let mut stdout = Capped { bytes: Vec::new(), cap, dropped: 0 };
    let mut stderr = Capped { bytes: Vec::new(), cap, dropped: 0 };
    let stopped = match session {
        // A session: its steps until it ends, then the jail goes.
        Some(link) => {
            let io = super::session::Io {
                pid,
                pidfd: &pidfd,
                cgroup: &cgroup,
                stdin: &stdin_w,
                stdout: &stdout_r,
                stderr: &stderr_r,
            };
            super::session::serve(&io, input, link);
            sys::kill(pid, libc::SIGKILL);
            drop((stdin_w, stdout_r, stderr_r));
            None
        }
        None => pump(
            &child,
            &cgroup,
            limits,
            cpu_base,
            input,
            clock,
            cancel,
            &pidfd,
            stdin_w,
            stdout_r,
            stderr_r,
            &mut stdout,
            &mut stderr,
        ),
    };

    let (init_status, rusage, bytes_written) = match child.reap() {
        Ok(reaped) => reaped,
        // A warm jail's call was given its input: it must not run again elsewhere.
        Err(e) if call.is_some() => {
            let message = format!("wait4: {}", std::io::Error::from_raw_os_error(e));
            return Ok(NativeOutcome::failed(Status::InternalError, message, clock.elapsed()));
        }
        Err(e) => return Err(format!("wait4: {}", std::io::Error::from_raw_os_error(e))),
    };
    let reaped_ns = sys::now_ns();
    let wall = clock.elapsed();
    let t_reaped = started.elapsed();
    let mut tool_status = Vec::new();
    let _ = File::from(status_r).read_to_end(&mut tool_status);
    let mut setup_error = Vec::new();
    let _ = File::from(err_r).read_to_end(&mut setup_error);
    cgroup.kill_all();
    let stats = cgroup.stats();
    cgroup.remove();
    let between = |from: usize, to: usize| {
        let (a, b) = (milestones.at(from), milestones.at(to));
        if a == 0 || b < a { Duration::ZERO } else { Duration::from_nanos(b - a) }
    };
    let exec_ns = milestones.at(Milestones::EXEC);
    let timings = Timings {
        cgroup: t_cgroup,
        clone: t_clone - t_cgroup,
        attach: t_go - t_clone,
        mounts: between(Milestones::GO, Milestones::MOUNTED),
        join: between(Milestones::MOUNTED, Milestones::JOINED),
        confine: between(Milestones::JOINED, Milestones::EXEC),
        program: if exec_ns == 0 { Duration::ZERO } else { Duration::from_nanos(reaped_ns.saturating_sub(exec_ns)) },
        run: t_reaped - t_go,
        cleanup: started.elapsed() - t_reaped,
    };
    tracing::debug!(?timings, "native run timings");

    let mut outcome = NativeOutcome {
        status: Status::Ok,
        exit_code: None,
        signal: None,
        error: None,
        stdout: stdout.bytes,
        stderr: stderr.bytes,
        stdout_truncated: stdout.dropped > 0,
        stderr_truncated: stderr.dropped > 0,
        wall,
        cpu: stats.cpu.map(|cpu| cpu.saturating_sub(cpu_base)).or_else(|| Some(rusage_cpu(&rusage))),
        peak_memory_bytes: stats.peak_memory_bytes,
        // The jail's init is not in the cgroup: these are the program's.
        peak_processes: stats.peak_processes,
        bytes_written,
        limits_hit: [(stats.pids_refused > 0, "pids"), (stats.oom_kills > 0, "memory")]
            .into_iter()
            .filter_map(|(hit, name)| hit.then_some(name))
            .collect(),
        timings,
    };
    if let Some(report) = setup_failure(&setup_error, layout, &run_steps) {
        let (status, message) = report;
        outcome.status = status;
        outcome.error = Some(message);
        return Ok(outcome);
    }
    classify(&mut outcome, decode_status(&tool_status), init_status, stopped, &stats, limits);
    Ok(outcome)
}

/// Reads a warm jail's stderr until its program writes [`READY_LINE`]:
/// an error when it ends or takes longer than `within` first (with what it
/// wrote, which is its warm-up's and no call's).
fn wait_ready(
    pidfd: &OwnedFd,
    stderr_r: &OwnedFd,
    within: Duration,
    cancelled: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if said.windows(READY_LINE.len()).any(|w| w == READY_LINE) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let tail = || String::from_utf8_lossy(&said[said.len().saturating_sub(2048)..]).into_owned();
        if left.is_zero() {
            return Err(format!("the warm jail's program was not ready within {within:?}: {}", tail()));
        }
        if cancelled.load(std::sync::atomic::Ordering::Acquire) {
            return Err("the warm jail was let go while it warmed up".to_owned());
        }
        let mut fds = [
            libc::pollfd { fd: stderr_r.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let timeout = i32::try_from(left.min(Duration::from_millis(100)).as_millis().max(1)).unwrap_or(i32::MAX);
        if sys::poll(&mut fds, timeout).is_err() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if fds[0].revents != 0 {
            match nix::unistd::read(stderr_r, &mut buf) {
                Ok(0) => {
                    return Err(format!("the warm jail's program closed its stderr before it was ready: {}", tail()));
                }
                Ok(n) => said.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("reading the warm jail's stderr: {e}")),
            }
            continue;
        }
        if fds[1].revents != 0 {
            return Err(format!("the warm jail's program ended before it was ready: {}", tail()));
        }
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn rusage_cpu(usage: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[allow(unsafe_code)]
fn unsafe_owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor they just opened and own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Bytes that the processes of an exited (unreaped) init sent to storage:
/// the kernel's I/O accounting of the init, into which every process it
/// reaped was added, less the dirty pages that never reached the disk (a
/// write refused for lack of space, a file removed before writeback).
/// Nothing for the tmpfs `/tmp`.
fn storage_writes(pid: libc::pid_t) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        io.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
    };
    Some(field("write_bytes")?.saturating_sub(field("cancelled_write_bytes")?))
}

/// Kills and reaps the child if the run ends early.
struct Reaper {
    pid: libc::pid_t,
    reaped: bool,
}

impl Reaper {
    /// Waits for the exit, reads what the run sent to storage, and reaps.
    fn reap(&mut self) -> sys::SysResult<(libc::c_int, libc::rusage, Option<u64>)> {
        sys::wait_exited_unreaped(self.pid)?;
        let written = storage_writes(self.pid);
        let result = sys::wait_rusage(self.pid);
        self.reaped = true;
        result.map(|(status, usage)| (status, usage, written))
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if !self.reaped {
            sys::kill(self.pid, libc::SIGKILL);
            let _ = sys::wait_rusage(self.pid);
        }
    }
}

/// Feeds stdin, drains stdout and stderr, and enforces the deadlines until
/// the init exits. Answers why the supervisor stopped the run, if it did.
#[allow(clippy::too_many_arguments)]
fn pump(
    child: &Reaper,
    cgroup: &super::cgroup::RunCgroup,
    limits: &crate::policy::Limits,
    cpu_base: Duration,
    input: &[u8],
    started: Instant,
    cancel: Option<&std::sync::atomic::AtomicBool>,
    pidfd: &OwnedFd,
    stdin_w: OwnedFd,
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    stdout: &mut Capped,
    stderr: &mut Capped,
) -> Option<Stopped> {
    let deadline = started + limits.wall_time;
    let mut stdin = if input.is_empty() {
        // No input: the tool reads end-of-file at once.
        drop(stdin_w);
        None
    } else {
        Some(File::from(stdin_w))
    };
    let mut written = 0;
    let mut out = Some(File::from(stdout_r));
    let mut err = Some(File::from(stderr_r));
    let mut stopped = None;
    let mut exited_at: Option<Instant> = None;
    let mut next_cpu_check = started + CPU_POLL;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if out.is_none() && err.is_none() && exited_at.is_some() {
            return stopped;
        }
        // Once init is gone every writer is too, but a copy of a pipe end may
        // linger for an instant in another run's fresh clone: wait briefly.
        if let Some(at) = exited_at
            && at.elapsed() > Duration::from_millis(200)
        {
            return stopped;
        }
        let now = Instant::now();
        if stopped.is_none() && exited_at.is_none() {
            if now >= deadline {
                stopped = Some(Stopped::Wall);
            } else if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire)) {
                stopped = Some(Stopped::Cancelled);
            } else if now >= next_cpu_check {
                next_cpu_check = now + CPU_POLL;
                if cgroup.cpu().is_some_and(|cpu| cpu.saturating_sub(cpu_base) > limits.cpu_time) {
                    stopped = Some(Stopped::Cpu);
                }
            }
            if stopped.is_some() {
                sys::kill(child.pid, libc::SIGKILL);
            }
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut push = |fd: RawFd, events: libc::c_short| {
            fds.push(libc::pollfd { fd, events, revents: 0 });
            fds.len() - 1
        };
        let pid_slot = if exited_at.is_none() { Some(push(pidfd.as_raw_fd(), libc::POLLIN)) } else { None };
        let in_slot = stdin.as_ref().map(|f| push(f.as_raw_fd(), libc::POLLOUT));
        let out_slot = out.as_ref().map(|f| push(f.as_raw_fd(), libc::POLLIN));
        let err_slot = err.as_ref().map(|f| push(f.as_raw_fd(), libc::POLLIN));
        // The CPU check's period also bounds how long a cancellation waits.
        let wake = if exited_at.is_some() {
            Duration::from_millis(20)
        } else {
            deadline.min(next_cpu_check).saturating_duration_since(Instant::now())
        };
        let timeout = i32::try_from(wake.as_millis().max(1)).unwrap_or(i32::MAX);
        if sys::poll(&mut fds, timeout).is_err() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let ready = |slot: Option<usize>| slot.and_then(|i| fds.get(i)).is_some_and(|p| p.revents != 0);
        if ready(pid_slot) {
            exited_at = Some(Instant::now());
        }
        if ready(in_slot)
            && let Some(file) = stdin.as_mut()
        {
            match file.write(input.get(written..).unwrap_or_default()) {
                Ok(n) => {
                    written += n;
                    if written >= input.len() {
                        stdin = None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                // The tool closed its stdin: the rest of the input is not wanted.
                Err(_) => stdin = None,
            }
        }
        for (slot, file, sink) in [(out_slot, &mut out, &mut *stdout), (err_slot, &mut err, &mut *stderr)] {
            if !ready(slot) {
                continue;
            }
            if let Some(f) = file.as_mut() {
                match f.read(&mut buf) {
                    Ok(0) => *file = None,
                    Ok(n) => sink.push(buf.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => *file = None,
                }
            }
        }
    }
}

/// The setup error the child reported, as a status and a message.
fn setup_failure(bytes: &[u8], layout: &rootfs::Layout, run_steps: &[rootfs::Step]) -> Option<(Status, String)> {
    let word = |i: usize| -> Option<[u8; 4]> { bytes.get(i..i + 4)?.try_into().ok() };
    let stage = Stage::from_u32(u32::from_ne_bytes(word(0)?))?;
    let detail = u32::from_ne_bytes(word(4)?) as usize;
    let errno = i32::from_ne_bytes(word(8)?);
    let cause = std::io::Error::from_raw_os_error(errno);
    let at = match stage {
        Stage::Mount => layout.steps.get(detail).map(rootfs::describe),
        Stage::RunMount => run_steps.get(detail).map(rootfs::describe),
        _ => None,
    };
    let mut at = at.map(|p| format!(" at {}", p.to_string_lossy())).unwrap_or_default();
    if stage == Stage::Mount {
        at.push_str(&format!(" (root from {})", layout.origin));
    }
    if stage == Stage::Exec && matches!(errno, libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR) {
        return Some((Status::InvalidTool, format!("the program could not be executed in the jail: {cause}")));
    }
    Some((Status::InternalError, format!("jail setup failed {}{at}: {cause}", stage.describe())))
}

/// Decides the status from how the tool ended and what the cgroup saw.
fn classify(
    outcome: &mut NativeOutcome,
    tool: Option<i32>,
    init_status: i32,
    stopped: Option<Stopped>,
    stats: &CgroupStats,
    limits: &crate::policy::Limits,
) {
    let memory = || format!("the tool ran out of memory: the tier allows {} bytes", limits.memory_bytes);
    let pids = || format!("the tool hit the process limit: the tier allows {} processes", limits.pids);
    if let Some(status) = tool {
        if libc::WIFEXITED(status) {
            let code = libc::WEXITSTATUS(status);
            outcome.exit_code = Some(code);
            if code == 0 {
                return;
            }
        } else if libc::WIFSIGNALED(status) {
            outcome.signal = Some(signal_name(libc::WTERMSIG(status)));
        }
    }
    // A run the caller cancelled ended for that, whatever its processes ran
    // into before (`limits_hit` still says so).
    let (status, message) = if stopped == Some(Stopped::Cancelled) {
        (Status::Cancelled, "cancelled by the caller before it finished".to_owned())
    } else if stats.oom_kills > 0 {
        (Status::MemoryLimit, memory())
    } else if stats.pids_refused > 0 && (stopped.is_some() || tool.is_some()) {
        (Status::PidsLimit, pids())
    } else if stopped == Some(Stopped::Cpu) {
        (Status::CpuLimit, format!("CPU time budget of {} ms used up", limits.cpu_time.as_millis()))
    } else if stopped == Some(Stopped::Wall) {
        (Status::Timeout, format!("wall-clock budget of {} ms ran out", limits.wall_time.as_millis()))
    } else if let Some(signal) = &outcome.signal {
        (Status::Crashed, format!("the tool was killed by {signal}"))
    } else if let Some(code) = outcome.exit_code {
        (Status::ToolError, format!("tool exited with code {code}"))
    } else {
        // The init died without reporting: killed from outside the jail.
        let how = if libc::WIFSIGNALED(init_status) {
            signal_name(libc::WTERMSIG(init_status))
        } else {
            format!("exit {}", libc::WEXITSTATUS(init_status))
        };
        (Status::Crashed, format!("the jail's init ended before the tool ({how})"))
    };
    // A stopped run was killed by the supervisor, not by a signal of its own.
    if stopped.is_some() && stats.oom_kills == 0 {
        outcome.signal = None;
    }
    outcome.status = status;
    outcome.error = Some(message);
}
