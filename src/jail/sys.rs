//! The narrow layer of raw system calls the jail makes.
//!
//! The jail's child processes share the server's memory (`CLONE_VM`: copying
//! a large server's page tables for every run would cost tens of
//! milliseconds), so the code they run must not touch anything the server's
//! threads use: no allocation, no lock, no panic, and not even `errno`, which
//! lives in the calling thread's TLS — the child has no TLS of its own and
//! would share the supervising thread's. Hence the child-side calls here are
//! made with inline `syscall` instructions that answer `-errno` directly.
//! Each takes only borrowed, already-built data (`&CStr`, slices).

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr;

/// A failed system call's `errno`.
pub(super) type Errno = i32;
pub(super) type SysResult<T = ()> = Result<T, Errno>;

/// A system call with up to six arguments, without the C library: the
/// kernel's answer, `-errno` on failure.
///
/// # Safety
///
/// The arguments must be what system call `nr` expects (valid pointers for
/// the lengths given).
#[cfg(target_arch = "x86_64")]
unsafe fn raw(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 system call convention; rcx and r11 are clobbered by
    // `syscall`; the caller vouches for the arguments.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// See the x86-64 version.
///
/// # Safety
///
/// As there.
#[cfg(target_arch = "aarch64")]
unsafe fn raw(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the AArch64 system call convention (x8 = number, x0-x5 = arguments).
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the native jail supports x86-64 and AArch64");

fn check(ret: isize) -> SysResult<usize> {
    if ret < 0 { Err(-ret as Errno) } else { Ok(ret as usize) }
}

/// `raw` on plain integer or pointer arguments.
macro_rules! syscall {
    ($nr:expr $(, $arg:expr)* $(,)?) => {{
        let mut args = [0usize; 6];
        let given = [$($arg as usize),*];
        args[..given.len()].copy_from_slice(&given);
        // SAFETY: every call site passes the arguments its system call takes,
        // pointers into data that outlives the call.
        check(unsafe { raw($nr, args) })
    }};
}

const AT_FDCWD: usize = libc::AT_FDCWD as isize as usize;

/// A stack for a child that shares this process's memory, with a guard page
/// below it. Unmapped on drop: keep it alive until the child is reaped.
pub(super) struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone.
unsafe impl Send for Stack {}

impl Stack {
    pub(super) fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = Self { base, len };
        // SAFETY: the lowest page of the mapping just made becomes the guard.
        if unsafe { libc::mprotect(base, 4096, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The top (stacks grow down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        (self.base as usize + self.len) as *mut libc::c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Starts `entry(arg)` in a new process on `stack`, with `flags`
/// (namespaces, `CLONE_VM` to share this process's memory, `CLONE_VFORK`).
/// Answers the child's pid.
///
/// # Safety
///
/// `entry` must follow this module's rules (no allocation, lock, panic or
/// `errno`) and end in `execve` or `exit_now`; `arg` must stay valid, and
/// `stack` mapped, until the child has exited or exec'd.
pub(super) unsafe fn clone_with_stack(
    flags: libc::c_int,
    stack: &Stack,
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> std::io::Result<libc::pid_t> {
    // SAFETY: glibc's `clone` switches the child to `stack` and calls `entry`
    // (posix_spawn uses it the same way); the caller upholds the child-side
    // contract. Its one touch of thread-local state is `errno` on failure,
    // read back at once below; from init that is the supervising thread's
    // `errno`, whose value it then holds for an instant: harmless, as that
    // thread reads `errno` only right after its own failed calls.
    let pid = unsafe { libc::clone(entry, stack.top(), flags | libc::SIGCHLD, arg) };
    if pid < 0 { Err(std::io::Error::last_os_error()) } else { Ok(pid) }
}

/// Ends the calling process at once, running nothing of the parent's.
pub(super) fn exit_now(code: i32) -> ! {
    loop {
        let _ = syscall!(libc::SYS_exit_group, code);
    }
}

pub(super) fn read(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        match syscall!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) {
            Err(libc::EINTR) => continue,
            other => return other,
        }
    }
}

pub(super) fn write(fd: RawFd, buf: &[u8]) -> SysResult<usize> {
    loop {
        match syscall!(libc::SYS_write, fd, buf.as_ptr(), buf.len()) {
            Err(libc::EINTR) => continue,
            other => return other,
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
    let _ = syscall!(libc::SYS_close, fd);
}

/// `dup3` (what `dup2` is on every architecture); `from` and `to` differ.
pub(super) fn dup2(from: RawFd, to: RawFd) -> SysResult {
    syscall!(libc::SYS_dup3, from, to, 0).map(drop)
}

/// Closes (or, with `cloexec`, marks close-on-exec) every descriptor in
/// `first..=last`.
pub(super) fn close_range(first: u32, last: u32, cloexec: bool) -> SysResult {
    if first > last {
        return Ok(());
    }
    let flags = if cloexec { libc::CLOSE_RANGE_CLOEXEC } else { 0 };
    syscall!(libc::SYS_close_range, first, last, flags).map(drop)
}

fn opt(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(ptr::null(), CStr::as_ptr)
}

pub(super) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> SysResult {
    syscall!(libc::SYS_mount, opt(source), target.as_ptr(), opt(fstype), flags, opt(data)).map(drop)
}

pub(super) fn umount_detach(target: &CStr) -> SysResult {
    syscall!(libc::SYS_umount2, target.as_ptr(), libc::MNT_DETACH).map(drop)
}

pub(super) fn mkdir(path: &CStr, mode: libc::mode_t) -> SysResult {
    match syscall!(libc::SYS_mkdirat, AT_FDCWD, path.as_ptr(), mode) {
        Ok(_) | Err(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) fn symlink(target: &CStr, at: &CStr) -> SysResult {
    syscall!(libc::SYS_symlinkat, target.as_ptr(), AT_FDCWD, at.as_ptr()).map(drop)
}

fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> SysResult<RawFd> {
    syscall!(libc::SYS_openat, AT_FDCWD, path.as_ptr(), flags | libc::O_CLOEXEC, mode).map(|fd| fd as RawFd)
}

/// Creates (or truncates) `path` with `mode` and writes `content` into it.
pub(super) fn write_file(path: &CStr, content: &[u8], mode: libc::mode_t) -> SysResult {
    let fd = open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, mode)?;
    let written = write_all(fd, content);
    close(fd);
    written
}

pub(super) fn chdir(path: &CStr) -> SysResult {
    syscall!(libc::SYS_chdir, path.as_ptr()).map(drop)
}

pub(super) fn pivot_root(new_root: &CStr, put_old: &CStr) -> SysResult {
    syscall!(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()).map(drop)
}

pub(super) fn unshare(flags: libc::c_int) -> SysResult {
    syscall!(libc::SYS_unshare, flags).map(drop)
}

pub(super) fn sethostname(name: &[u8]) -> SysResult {
    syscall!(libc::SYS_sethostname, name.as_ptr(), name.len()).map(drop)
}

pub(super) fn setsid() -> SysResult {
    syscall!(libc::SYS_setsid).map(drop)
}

pub(super) fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> SysResult {
    syscall!(libc::SYS_prctl, option, arg2, 0, 0, 0).map(drop)
}

pub(super) fn cap_ambient_clear() -> SysResult {
    syscall!(libc::SYS_prctl, libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0).map(drop)
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
    syscall!(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()).map(drop)
}

pub(super) fn setgroups_none() -> SysResult {
    syscall!(libc::SYS_setgroups, 0, ptr::null::<libc::gid_t>()).map(drop)
}

pub(super) fn setresgid(gid: libc::gid_t) -> SysResult {
    syscall!(libc::SYS_setresgid, gid, gid, gid).map(drop)
}

pub(super) fn setresuid(uid: libc::uid_t) -> SysResult {
    syscall!(libc::SYS_setresuid, uid, uid, uid).map(drop)
}

pub(super) fn setrlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> SysResult {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    syscall!(libc::SYS_prlimit64, 0, resource, &limit as *const libc::rlimit, ptr::null_mut::<libc::rlimit>()).map(drop)
}

/// Every signal back to its default action (the server's handlers, tokio's
/// among them, must not run in a jail), and none blocked.
pub(super) fn reset_signals() -> SysResult {
    // The kernel's sigaction with a null handler is SIG_DFL on every layout.
    let default = [0u64; 4];
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        match syscall!(libc::SYS_rt_sigaction, signal, default.as_ptr(), ptr::null_mut::<u64>(), 8) {
            Ok(_) | Err(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let none = 0u64;
    syscall!(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &none as *const u64, ptr::null_mut::<u64>(), 8).map(drop)
}

/// Installs a seccomp filter (the caller has set `no_new_privs`).
pub(super) fn seccomp_install(program: &[libc::sock_filter]) -> SysResult {
    let prog = libc::sock_fprog { len: program.len() as libc::c_ushort, filter: program.as_ptr().cast_mut() };
    syscall!(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog).map(drop)
}

/// `execve`; returns only on failure. `argv` and `envp` are null-terminated
/// arrays of pointers to NUL-terminated strings owned by the caller.
pub(super) fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    match syscall!(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), envp.as_ptr()) {
        Err(e) => e,
        Ok(_) => libc::EIO,
    }
}

/// Waits for any child; answers its pid and raw wait status.
pub(super) fn wait_any() -> SysResult<(libc::pid_t, libc::c_int)> {
    let mut status: libc::c_int = 0;
    loop {
        match syscall!(libc::SYS_wait4, -1isize, &mut status as *mut libc::c_int, libc::__WALL, 0) {
            Err(libc::EINTR) => continue,
            other => return other.map(|pid| (pid as libc::pid_t, status)),
        }
    }
}

/// The monotonic clock, in nanoseconds.
pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let _ = syscall!(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts as *mut libc::timespec);
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Landlock: creates a ruleset handling `access` for files, answers its fd.
pub(super) fn landlock_create_ruleset(access: u64) -> SysResult<RawFd> {
    #[repr(C)]
    struct Attr {
        handled_access_fs: u64,
    }
    let attr = Attr { handled_access_fs: access };
    syscall!(libc::SYS_landlock_create_ruleset, &attr as *const Attr, std::mem::size_of::<Attr>(), 0)
        .map(|fd| fd as RawFd)
}

/// Landlock: the ABI version the kernel speaks (an error when it has none).
pub(super) fn landlock_abi() -> SysResult<usize> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    syscall!(libc::SYS_landlock_create_ruleset, ptr::null::<u8>(), 0, LANDLOCK_CREATE_RULESET_VERSION)
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
    syscall!(libc::SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule as *const PathBeneath, 0).map(drop)
}

pub(super) fn landlock_restrict_self(ruleset: RawFd) -> SysResult {
    syscall!(libc::SYS_landlock_restrict_self, ruleset, 0).map(drop)
}

/// Opens `path` as an `O_PATH` handle (for Landlock rules).
pub(super) fn open_path(path: &CStr) -> SysResult<RawFd> {
    open(path, libc::O_PATH, 0)
}

// The supervisor's side: ordinary threads, where the C library is fine.

fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn check_long(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

fn check_int(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

/// A pidfd for `pid`, to poll for its exit.
pub(super) fn pidfd_open(pid: libc::pid_t) -> SysResult<RawFd> {
    // SAFETY: integer arguments.
    check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) }).map(|fd| fd as RawFd)
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

/// Waits until `pid` has exited, leaving it a zombie (to be read, then reaped).
pub(super) fn wait_exited_unreaped(pid: libc::pid_t) -> SysResult<()> {
    // SAFETY: an all-zero siginfo is a valid value to be overwritten.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(pid).map_err(|_| libc::EINVAL)?;
    loop {
        // SAFETY: `info` is a valid out-pointer.
        match check_int(unsafe {
            libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT | libc::__WALL)
        }) {
            Err(libc::EINTR) => continue,
            other => return other.map(|_| ()),
        }
    }
}

pub(super) fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: integer arguments; a vanished process is not an error here.
    unsafe { libc::kill(pid, signal) };
}

// The new mount API's constants (<linux/mount.h>).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
pub(super) const MOUNT_ATTR_RDONLY: u64 = 0x01;
pub(super) const MOUNT_ATTR_NOSUID: u64 = 0x02;
pub(super) const MOUNT_ATTR_NODEV: u64 = 0x04;
pub(super) const MOUNT_ATTR_NOEXEC: u64 = 0x08;

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount of the directory `dir` (a descriptor),
/// not recursive (`open_tree(OPEN_TREE_CLONE)`), to be attached elsewhere
/// with [`move_mount_onto`].
pub(super) fn open_tree_clone(dir: RawFd) -> SysResult<RawFd> {
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: an integer descriptor and a static empty C string.
    check_long(unsafe { libc::syscall(libc::SYS_open_tree, dir, c"".as_ptr(), flags) }).map(|fd| fd as RawFd)
}

/// Sets mount attributes (`MOUNT_ATTR_*`) on the detached mount `tree`, and
/// makes it private (no mount events from the mount it was copied from).
pub(super) fn mount_setattr(tree: RawFd, set: u64) -> SysResult {
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: libc::MS_PRIVATE, userns_fd: 0 };
    // SAFETY: `attr` is a valid mount_attr of the size passed.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Attaches the detached mount `tree` onto the directory `target` (both
/// descriptors; `target` must be in this thread's mount namespace).
pub(super) fn move_mount_onto(tree: RawFd, target: RawFd) -> SysResult {
    let flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: integer arguments and static empty C strings.
    check_long(unsafe { libc::syscall(libc::SYS_move_mount, tree, c"".as_ptr(), target, c"".as_ptr(), flags) })
        .map(drop)
}

/// Moves the calling thread into the namespace `ns` (of kind `nstype`).
pub(super) fn setns(ns: RawFd, nstype: libc::c_int) -> SysResult {
    // SAFETY: integer arguments.
    check_int(unsafe { libc::setns(ns, nstype) }).map(drop)
}

/// Gives the calling thread a file-system context (root, working directory)
/// of its own, so that it may enter another mount namespace.
pub(super) fn unshare_fs() -> SysResult {
    // SAFETY: an integer argument; affects the calling thread only.
    check_int(unsafe { libc::unshare(libc::CLONE_FS) }).map(drop)
}
