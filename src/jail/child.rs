//! What runs after the clone, inside the new namespaces: the run's init
//! (pid 1) and the tool (pid 2) it forks.
//!
//! Both run on stacks of their own, in the server's memory (`CLONE_VM`)
//! until the tool's exec: nothing here allocates, locks, panics or touches
//! `errno` (see `sys`). Every failure is written to the error pipe as
//! `(stage, detail, errno)` and ends the process.
//!
//! init: default signal dispositions (the server's handlers must not run
//! here) → wait for the parent's go → close inherited descriptors → private
//! mount propagation → build the root (`rootfs` steps) → fork the tool → reap
//! every child until the tool exits, then report the tool's wait status and
//! exit, which makes the kernel kill whatever else lives in the pid namespace.
//!
//! tool: stdio → join the run's cgroup and a new cgroup namespace →
//! close descriptors → `pivot_root` → session → rlimits (`rlimits`) →
//! capabilities, credentials, `no_new_privs` (`caps`) → Landlock
//! (`landlock`) → seccomp → exec.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::rootfs::{self, Layout, Step};
use super::seccomp::Filter;
use super::sys::{self, Errno};
use super::{caps, landlock, rlimits};

/// Setup stages, as reported through the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum Stage {
    CloseFds = 1,
    Namespaces,
    Mount,
    RunMount,
    Fork,
    Stdio,
    JoinCgroup,
    PivotRoot,
    Hostname,
    Session,
    Rlimit,
    Capabilities,
    Credentials,
    NoNewPrivs,
    Landlock,
    Seccomp,
    Exec,
}
// Every stage is in `Stage::ALL` (a stage missing there would be reported as
// an unknown one): the test below checks the count.

impl Stage {
    const ALL: [Stage; 17] = [
        Stage::CloseFds,
        Stage::Namespaces,
        Stage::Mount,
        Stage::RunMount,
        Stage::Fork,
        Stage::Stdio,
        Stage::JoinCgroup,
        Stage::PivotRoot,
        Stage::Hostname,
        Stage::Session,
        Stage::Rlimit,
        Stage::Capabilities,
        Stage::Credentials,
        Stage::NoNewPrivs,
        Stage::Landlock,
        Stage::Seccomp,
        Stage::Exec,
    ];

    pub(super) fn from_u32(n: u32) -> Option<Stage> {
        Self::ALL.into_iter().find(|s| *s as u32 == n)
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Stage::CloseFds => "closing inherited descriptors",
            Stage::Namespaces => "entering the cgroup namespace",
            Stage::Mount => "building the root",
            Stage::RunMount => "mounting /tmp, /data or /proc",
            Stage::Fork => "forking the tool",
            Stage::Stdio => "connecting stdio",
            Stage::JoinCgroup => "joining the run's cgroup",
            Stage::PivotRoot => "pivot_root",
            Stage::Hostname => "setting the hostname",
            Stage::Session => "setsid",
            Stage::Rlimit => "setting rlimits",
            Stage::Capabilities => "dropping capabilities",
            Stage::Credentials => "switching to the sandbox uid/gid",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::Landlock => "applying Landlock",
            Stage::Seccomp => "installing the seccomp filter",
            Stage::Exec => "executing the program",
        }
    }
}

/// Everything the child needs, built by the parent before the clone.
pub(super) struct Plan<'a> {
    pub layout: &'a Layout,
    pub run_steps: &'a [Step],
    pub go_r: RawFd,
    pub err_w: RawFd,
    pub status_w: RawFd,
    pub stdin_r: RawFd,
    pub stdout_w: RawFd,
    pub stderr_w: RawFd,
    /// The run cgroup's `cgroup.procs` files, open for writing: the tool
    /// joins them itself, so that init (in the server's memory) is never in
    /// the run's memory cgroup, where the OOM killer could pick it.
    pub cgroup_procs: &'a [RawFd],
    /// Descriptors init keeps (sorted): all of the above.
    pub keep: &'a [RawFd],
    pub uid: u32,
    pub gid: u32,
    /// Whether `setgroups` is allowed (not in an unprivileged user namespace).
    pub setgroups: bool,
    pub rlimits: &'a rlimits::Table,
    pub filter: &'a Filter,
    pub landlock: Option<landlock::Rights>,
    /// Candidate paths of the program (PATH search done ahead).
    pub exec_paths: &'a [CString],
    /// Null-terminated pointer arrays into strings the parent owns.
    pub argv: &'a [*const libc::c_char],
    pub envp: &'a [*const libc::c_char],
    /// The tool's stack (it runs in init's memory until it execs).
    pub tool_stack: &'a sys::Stack,
    /// When each setup milestone was reached (monotonic ns), written by the
    /// children into this shared memory for the supervisor's timings.
    pub milestones: &'a Milestones,
}

/// Setup milestones, in order.
#[derive(Debug, Default)]
pub(super) struct Milestones([AtomicU64; 4]);

impl Milestones {
    pub(super) const GO: usize = 0;
    pub(super) const MOUNTED: usize = 1;
    pub(super) const JOINED: usize = 2;
    pub(super) const EXEC: usize = 3;

    fn reach(&self, milestone: usize) {
        if let Some(at) = self.0.get(milestone) {
            at.store(sys::now_ns(), Ordering::Relaxed);
        }
    }

    /// When `milestone` was reached (0: never).
    pub(super) fn at(&self, milestone: usize) -> u64 {
        self.0.get(milestone).map_or(0, |at| at.load(Ordering::Relaxed))
    }
}

/// Where the clone starts init.
#[allow(unsafe_code)]
pub(super) extern "C" fn init_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the supervisor's `Plan`, which outlives this process
    // (the supervisor reaps it before dropping the plan).
    let plan = unsafe { &*(arg as *const Plan<'static>) };
    init(plan)
}

#[allow(unsafe_code)]
extern "C" fn tool_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: as for `init_entry`: the same plan, alive while init lives.
    let plan = unsafe { &*(arg as *const Plan<'static>) };
    tool(plan)
}

fn fail(err_w: RawFd, stage: Stage, detail: u32, errno: Errno) -> ! {
    let mut msg = [0u8; 12];
    msg[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    msg[4..8].copy_from_slice(&detail.to_ne_bytes());
    msg[8..].copy_from_slice(&errno.to_ne_bytes());
    let _ = sys::write_all(err_w, &msg);
    sys::exit_now(126)
}

/// Closes every descriptor from 3 up except those in `keep` (sorted).
fn close_all_but(keep: &[RawFd]) -> Result<(), Errno> {
    let mut next: u32 = 3;
    for &fd in keep {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd >= next {
            if fd > next {
                sys::close_range(next, fd - 1, false)?;
            }
            next = fd + 1;
        }
    }
    sys::close_range(next, u32::MAX, false)
}

/// The run's init. Never returns.
fn init(plan: &Plan<'_>) -> libc::c_int {
    let err = plan.err_w;
    if sys::reset_signals().is_err() {
        sys::exit_now(124);
    }
    // Die with the supervisor; then check it did not die already.
    let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    let mut go = [0u8; 1];
    if !matches!(sys::read(plan.go_r, &mut go), Ok(1)) {
        sys::exit_now(125);
    }
    plan.milestones.reach(Milestones::GO);
    if let Err(e) = close_all_but(plan.keep) {
        fail(err, Stage::CloseFds, 0, e);
    }
    if let Err(e) = sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None) {
        fail(err, Stage::Mount, u32::MAX, e);
    }
    for (i, step) in plan.layout.steps.iter().enumerate() {
        if let Err(e) = rootfs::apply(step) {
            fail(err, Stage::Mount, i as u32, e);
        }
    }
    for (i, step) in plan.run_steps.iter().enumerate() {
        if let Err(e) = rootfs::apply(step) {
            fail(err, Stage::RunMount, i as u32, e);
        }
    }
    plan.milestones.reach(Milestones::MOUNTED);
    if let Err(e) = sys::sethostname(b"sandbox") {
        fail(err, Stage::Hostname, 0, e);
    }
    // vfork-style: init waits until the tool has exec'd (or died), so the
    // two never run at once in the memory they share.
    let arg = plan as *const Plan<'_> as *mut libc::c_void;
    // SAFETY: `tool_entry` keeps to this module's rules and ends in exec or
    // exit; the plan and the tool's stack outlive it (see `init_entry`).
    #[allow(unsafe_code)]
    let forked = unsafe { sys::clone_with_stack(libc::CLONE_VM | libc::CLONE_VFORK, plan.tool_stack, tool_entry, arg) };
    let tool_pid = match forked {
        Ok(pid) => pid,
        Err(e) => fail(err, Stage::Fork, 0, e.raw_os_error().unwrap_or(libc::EIO)),
    };
    for fd in [plan.stdin_r, plan.stdout_w, plan.stderr_w, plan.go_r, err] {
        sys::close(fd);
    }
    loop {
        match sys::wait_any() {
            Ok((pid, status)) if pid == tool_pid => {
                let _ = sys::write_all(plan.status_w, &status.to_ne_bytes());
                sys::exit_now(0);
            }
            Ok(_) => {}
            Err(_) => sys::exit_now(0),
        }
    }
}

/// The tool: the last steps of confinement, then exec. Never returns.
fn tool(plan: &Plan<'_>) -> libc::c_int {
    let err = plan.err_w;
    let step = |stage: Stage, result: Result<(), Errno>| {
        if let Err(e) = result {
            fail(err, stage, 0, e);
        }
    };
    for (from, to) in [(plan.stdin_r, 0), (plan.stdout_w, 1), (plan.stderr_w, 2)] {
        step(Stage::Stdio, sys::dup2(from, to));
    }
    for &fd in plan.cgroup_procs {
        step(Stage::JoinCgroup, sys::write_all(fd, b"0"));
    }
    plan.milestones.reach(Milestones::JOINED);
    // Its cgroup is the root of what it can see of cgroups.
    step(Stage::Namespaces, sys::unshare(libc::CLONE_NEWCGROUP));
    // Everything but stdio and the error pipe (close-on-exec) goes now.
    let err_u = err as u32;
    step(Stage::CloseFds, sys::close_range(3, err_u.saturating_sub(1), false));
    step(Stage::CloseFds, sys::close_range(err_u + 1, u32::MAX, false));
    // pivot_root moves init's root too, and the old root goes.
    step(Stage::PivotRoot, rootfs::enter());
    step(Stage::Session, sys::setsid());
    step(Stage::Rlimit, rlimits::apply(plan.rlimits));
    if let Err((stage, e)) = caps::drop_all(plan.setgroups, plan.uid, plan.gid) {
        fail(err, stage, 0, e);
    }
    if let Some(rights) = plan.landlock {
        step(Stage::Landlock, landlock::restrict(rights));
    }
    // /data as the working directory (read-only when over quota).
    let _ = sys::chdir(c"/data");
    step(Stage::Seccomp, sys::seccomp_install(&plan.filter.program));
    plan.milestones.reach(Milestones::EXEC);
    let mut last = libc::ENOENT;
    for path in plan.exec_paths {
        let e = sys::execve(path, plan.argv, plan.envp);
        // Keep searching past a missing candidate, as execvp does.
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last = e;
            break;
        }
    }
    fail(err, Stage::Exec, 0, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_round_trips_through_the_error_pipe_code() {
        for (i, stage) in Stage::ALL.into_iter().enumerate() {
            assert_eq!(stage as u32, i as u32 + 1);
            assert_eq!(Stage::from_u32(stage as u32), Some(stage));
        }
        assert_eq!(Stage::from_u32(Stage::Exec as u32 + 1), None);
        assert_eq!(Stage::ALL.len(), Stage::Exec as usize);
    }
}
