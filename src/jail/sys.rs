//! The narrow layer of raw system calls the jail makes.
//!
//! Everything here is safe to call in a child made by `clone` from a
//! multithreaded process: each function is one or two system calls, takes
//! only borrowed, already-built data (`&CStr`, slices) and allocates nothing,
//! takes no lock and cannot panic. Errors are the raw `errno`.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr;

/// A failed system call's `errno`.
pub(super) type Errno = i32;
pub(super) type SysResult<T = ()> = Result<T, Errno>;

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn check(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

fn check_int(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

/// `clone` with fork semantics (no new stack: the child runs on a copy of
/// the caller's) and the given namespace flags. Answers 0 in the child and
/// the child's pid in the parent.
///
/// # Safety
///
/// The child is a copy of a multithreaded process in which only the calling
/// thread exists: it must not allocate, lock, or return into code that may,
/// and must end in `execve` or `exit_now`.
pub(super) unsafe fn clone_process(flags: libc::c_int) -> SysResult<libc::pid_t> {
    // SAFETY: with a null stack `clone` behaves like `fork`; the pointer
    // arguments (parent/child tid, tls) are unused because no flag asks for them.
    // The caller upholds the child-side contract above.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            ptr::null_mut::<libc::c_void>(),
            ptr::null_mut::<libc::c_int>(),
            ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    check(ret).map(|pid| pid as libc::pid_t)
}

/// Ends the calling process at once, without running any of the parent's
/// exit handlers (the only way out of a cloned child).
pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` never returns and touches no user-space state.
    unsafe { libc::_exit(code) }
}

pub(super) fn read(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match check(n as libc::c_long) {
            Err(libc::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

pub(super) fn write(fd: RawFd, buf: &[u8]) -> SysResult<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match check(n as libc::c_long) {
            Err(libc::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// Writes all of `buf` (small buffers: a pipe takes them whole).
pub(super) fn write_all(fd: RawFd, mut buf: &[u8]) -> SysResult {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        buf = buf.get(n..).unwrap_or_default();
    }
    Ok(())
}

pub(super) fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this process owns; errors are irrelevant here.
    unsafe { libc::close(fd) };
}

pub(super) fn dup2(from: RawFd, to: RawFd) -> SysResult {
    // SAFETY: plain descriptor duplication.
    check_int(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Closes (or, with `cloexec`, marks close-on-exec) every descriptor in
/// `first..=last`.
pub(super) fn close_range(first: u32, last: u32, cloexec: bool) -> SysResult {
    if first > last {
        return Ok(());
    }
    let flags = if cloexec { libc::CLOSE_RANGE_CLOEXEC } else { 0 };
    // SAFETY: close_range takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) }).map(drop)
}

pub(super) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> SysResult {
    let p = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check_int(unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) }).map(drop)
}

pub(super) fn umount_detach(target: &CStr) -> SysResult {
    // SAFETY: `target` is a NUL-terminated string.
    check_int(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub(super) fn mkdir(path: &CStr, mode: libc::mode_t) -> SysResult {
    // SAFETY: `path` is a NUL-terminated string.
    match check_int(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Ok(_) | Err(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) fn symlink(target: &CStr, at: &CStr) -> SysResult {
    // SAFETY: both are NUL-terminated strings.
    check_int(unsafe { libc::symlink(target.as_ptr(), at.as_ptr()) }).map(drop)
}

/// Creates (or truncates) `path` with `mode` and writes `content` into it.
pub(super) fn write_file(path: &CStr, content: &[u8], mode: libc::mode_t) -> SysResult {
    // SAFETY: `path` is a NUL-terminated string; the flags ask for a new descriptor.
    let fd = check_int(unsafe {
        libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC, mode)
    })?;
    let written = write_all(fd, content);
    close(fd);
    written
}

pub(super) fn chdir(path: &CStr) -> SysResult {
    // SAFETY: `path` is a NUL-terminated string.
    check_int(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

pub(super) fn pivot_root(new_root: &CStr, put_old: &CStr) -> SysResult {
    // SAFETY: both are NUL-terminated strings.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) }).map(drop)
}

pub(super) fn unshare(flags: libc::c_int) -> SysResult {
    // SAFETY: unshare takes plain flags.
    check_int(unsafe { libc::unshare(flags) }).map(drop)
}

pub(super) fn sethostname(name: &[u8]) -> SysResult {
    // SAFETY: `name` is valid for `name.len()` bytes.
    check_int(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

pub(super) fn setsid() -> SysResult {
    // SAFETY: no arguments.
    check_int(unsafe { libc::setsid() }).map(drop)
}

pub(super) fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> SysResult {
    // SAFETY: the options used here take integers only.
    check_int(unsafe { libc::prctl(option, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) })
        .map(drop)
}

pub(super) fn cap_ambient_clear() -> SysResult {
    // SAFETY: integer arguments only.
    check_int(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
    .map(drop)
}

/// Empties the effective, permitted and inheritable capability sets.
pub(super) fn capset_none() -> SysResult {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: version 3 takes a header and two data words, both valid here.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) }).map(drop)
}

/// The raw system call, not glibc's `setgroups`: in a process that glibc
/// believes multithreaded, the wrapper broadcasts the change to every thread
/// under a lock that another thread of the parent may have held at the clone.
pub(super) fn setgroups_none() -> SysResult {
    // SAFETY: an empty list.
    check(unsafe { libc::syscall(libc::SYS_setgroups, 0, ptr::null::<libc::gid_t>()) }).map(drop)
}

pub(super) fn setresgid(gid: libc::gid_t) -> SysResult {
    // SAFETY: integer arguments. The raw syscall changes this thread only, and
    // this process has only one thread.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

pub(super) fn setresuid(uid: libc::uid_t) -> SysResult {
    // SAFETY: as for `setresgid`.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

pub(super) fn setrlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> SysResult {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: `limit` is a valid rlimit.
    check_int(unsafe { libc::setrlimit(resource, &limit) }).map(drop)
}

/// Restores default dispositions for the signals a Rust runtime changes
/// (SIGPIPE is ignored by std) and unblocks every signal.
pub(super) fn reset_signals() -> SysResult {
    // SAFETY: setting a default disposition; the old handler is not needed.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(errno());
    }
    // SAFETY: an all-zero sigset_t is a valid (empty) set once sigemptyset ran.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: `set` is valid; the old mask is not wanted.
    check_int(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut()) }).map(drop)
}

/// Installs a seccomp filter (the caller has set `no_new_privs`).
pub(super) fn seccomp_install(program: &[seccompiler::sock_filter]) -> SysResult {
    // seccompiler's `sock_filter` is the kernel's `struct sock_filter` (repr C).
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    check(unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0 as libc::c_ulong, &prog as *const _)
    })
    .map(drop)
}

/// `execve`; returns only on failure.
pub(super) fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    // SAFETY: `argv` and `envp` are null-terminated arrays of pointers to
    // NUL-terminated strings owned by the caller (see `Plan`).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    errno()
}

/// Waits for any child; answers its pid and raw wait status.
pub(super) fn wait_any() -> SysResult<(libc::pid_t, libc::c_int)> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        match check_int(pid) {
            Err(libc::EINTR) => continue,
            other => return other.map(|pid| (pid, status)),
        }
    }
}

/// Landlock: creates a ruleset handling `access` for files, answers its fd.
pub(super) fn landlock_create_ruleset(access: u64) -> SysResult<RawFd> {
    #[repr(C)]
    struct Attr {
        handled_access_fs: u64,
    }
    let attr = Attr { handled_access_fs: access };
    // SAFETY: `attr` is valid for its size, which is passed.
    check(unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, &attr as *const Attr, std::mem::size_of::<Attr>(), 0u32)
    })
    .map(|fd| fd as RawFd)
}

/// Landlock: the ABI version the kernel speaks (an error when it has none).
pub(super) fn landlock_abi() -> SysResult<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: a null attribute with size 0 and the version flag only queries.
    check(unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, ptr::null::<u8>(), 0usize, LANDLOCK_CREATE_RULESET_VERSION)
    })
}

/// Landlock: allows `access` beneath the directory open at `parent_fd`.
pub(super) fn landlock_allow_beneath(ruleset: RawFd, parent_fd: RawFd, access: u64) -> SysResult {
    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }
    const LANDLOCK_RULE_PATH_BENEATH: u32 = 1;
    let rule = PathBeneath { allowed_access: access, parent_fd };
    // SAFETY: `rule` is a valid path-beneath attribute.
    check(unsafe {
        libc::syscall(libc::SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule as *const _, 0u32)
    })
    .map(drop)
}

pub(super) fn landlock_restrict_self(ruleset: RawFd) -> SysResult {
    // SAFETY: integer arguments.
    check(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) }).map(drop)
}

/// Opens `path` as an `O_PATH` handle (for Landlock rules).
pub(super) fn open_path(path: &CStr) -> SysResult<RawFd> {
    // SAFETY: `path` is a NUL-terminated string.
    check_int(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })
}

/// A pidfd for `pid`, to poll for its exit.
pub(super) fn pidfd_open(pid: libc::pid_t) -> SysResult<RawFd> {
    // SAFETY: integer arguments.
    check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) }).map(|fd| fd as RawFd)
}

/// `poll` on `fds` for up to `timeout_ms`; answers how many are ready.
pub(super) fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> SysResult<usize> {
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
    match check_int(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) }) {
        Err(libc::EINTR) => Ok(0),
        other => other.map(|n| n as usize),
    }
}

/// Reaps `pid`, answering its raw wait status and resource usage (which
/// includes the children it reaped).
pub(super) fn wait_rusage(pid: libc::pid_t) -> SysResult<(libc::c_int, libc::rusage)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid out-pointers.
        match check_int(unsafe { libc::wait4(pid, &mut status, libc::__WALL, &mut usage) }) {
            Err(libc::EINTR) => continue,
            other => return other.map(|_| (status, usage)),
        }
    }
}

pub(super) fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: integer arguments; a vanished process is not an error here.
    unsafe { libc::kill(pid, signal) };
}
