//! The seccomp filter every jailed program runs under.
//!
//! An allow-list with default deny (`EPERM`) and the architecture checked (a
//! mismatch kills the process); x32 system calls (the `0x40000000` bit) are
//! refused before anything else. Arguments are checked where a system call is
//! needed but one use of it is dangerous: `clone` without namespace flags,
//! `socket` for `AF_UNIX` only, `ioctl` but not `TIOCSTI` or `TIOCLINUX`
//! (32-bit compare, as the kernel reads the command), `memfd_create` only
//! with `MFD_NOEXEC_SEAL` (an executable memfd would sidestep `noexec`),
//! `personality` only for the harmless personas. `clone3` passes its flags in
//! memory that a filter cannot read, so it answers `ENOSYS`: C libraries then
//! fall back to `clone`, whose flags are checked.
//!
//! The program is generated here rather than with `seccompiler`, whose
//! output is one comparison chain per system call: 1,286 instructions for
//! this list, and installing it cost about a millisecond per run, because
//! the kernel evaluates a new filter for every system call number to fill
//! its action cache. Sorted ranges with early exits make ~200 instructions,
//! and every jump is local (BPF jumps reach 255 instructions at most).

const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWCGROUP
    | 0x80) as u64; // CLONE_NEWTIME

const MFD_NOEXEC_SEAL: u64 = 0x0008;

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync,
    libc::SYS_syncfs,
    libc::SYS_sync_file_range,
    libc::SYS_ftruncate,
    libc::SYS_truncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_splice,
    libc::SYS_tee,
    libc::SYS_vmsplice,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_brk,
    libc::SYS_membarrier,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sigaltstack,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    // Without capabilities these can only drop privilege.
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getpgid,
    libc::SYS_setpgid,
    libc::SYS_getsid,
    libc::SYS_setsid,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_times,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_umask,
    libc::SYS_prctl,
    // Installing a further filter can only take rights away (no_new_privs is set).
    libc::SYS_seccomp,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_getcpu,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getitimer,
    libc::SYS_setitimer,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_gettime,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_delete,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_getrandom,
    // Landlock only ever takes rights away: a warm jail's program restricts
    // itself once its call's /data is attached (`super::warm`).
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_signalfd4,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    // Sockets: only AF_UNIX ones can be made (see `socket` below).
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    // System V IPC: the run has its own IPC namespace.
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmdt,
    libc::SYS_shmctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
];

/// The pre-`*at` system calls x86-64 still has (and C libraries still use).
#[cfg(target_arch = "x86_64")]
const ALLOWED_LEGACY: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_creat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_getdents,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_link,
    libc::SYS_symlink,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_futimesat,
    libc::SYS_pipe,
    libc::SYS_dup2,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_epoll_create,
    libc::SYS_epoll_wait,
    libc::SYS_inotify_init,
    libc::SYS_eventfd,
    libc::SYS_signalfd,
    libc::SYS_alarm,
    libc::SYS_pause,
    libc::SYS_time,
    libc::SYS_getpgrp,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_arch_prctl,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[libc::c_long] = &[libc::SYS_getrlimit, libc::SYS_setrlimit];

/// The program, built once and installed by every run.
#[derive(Debug, Clone)]
pub struct Filter {
    pub(super) program: Vec<libc::sock_filter>,
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541C;

// Classic BPF opcodes (linux/filter.h) and seccomp's return values.
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`, and the other comparisons.
const JEQ: u16 = 0x15;
const JGT: u16 = 0x25;
const JGE: u16 = 0x35;
const JSET: u16 = 0x45;
const RET: u16 = 0x06;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const DENY: u32 = RET_ERRNO | libc::EPERM as u32;

// Offsets in `struct seccomp_data`; an argument's low 32 bits (little endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg(i: u32) -> u32 {
    16 + 8 * i
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Allows when the argument equals one of `values`, else denies.
fn any_of(argument: u32, values: &[u32]) -> Vec<libc::sock_filter> {
    let n = values.len();
    let mut block = vec![stmt(LD_W_ABS, arg(argument))];
    for (i, &v) in values.iter().enumerate() {
        block.push(jump(JEQ, v, (n - i) as u8, 0));
    }
    block.extend([stmt(RET, DENY), stmt(RET, RET_ALLOW)]);
    block
}

/// The system calls allowed only with some arguments: each with the block
/// that decides (every path of a block returns).
fn conditional() -> Vec<(libc::c_long, Vec<libc::sock_filter>)> {
    let unix_only = || any_of(0, &[libc::AF_UNIX as u32]);
    vec![
        (libc::SYS_socket, unix_only()),
        (libc::SYS_socketpair, unix_only()),
        (
            libc::SYS_ioctl,
            vec![
                stmt(LD_W_ABS, arg(1)),
                jump(JEQ, TIOCSTI, 2, 0),
                jump(JEQ, TIOCLINUX, 1, 0),
                stmt(RET, RET_ALLOW),
                stmt(RET, DENY),
            ],
        ),
        (
            libc::SYS_clone,
            vec![
                stmt(LD_W_ABS, arg(0)),
                jump(JSET, NAMESPACE_FLAGS as u32, 0, 1),
                stmt(RET, DENY),
                stmt(RET, RET_ALLOW),
            ],
        ),
        (libc::SYS_clone3, vec![stmt(RET, RET_ERRNO | libc::ENOSYS as u32)]),
        (
            libc::SYS_memfd_create,
            vec![
                stmt(LD_W_ABS, arg(1)),
                jump(JSET, MFD_NOEXEC_SEAL as u32, 0, 1),
                stmt(RET, RET_ALLOW),
                stmt(RET, DENY),
            ],
        ),
        // PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE, both, and the query.
        (libc::SYS_personality, any_of(0, &[0, 0x0008, 0x20000, 0x20008, 0xffff_ffff])),
    ]
}

/// Sorted runs of consecutive numbers.
fn ranges(mut numbers: Vec<u32>) -> Vec<(u32, u32)> {
    numbers.sort_unstable();
    numbers.dedup();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for n in numbers {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == n => *end = n,
            _ => runs.push((n, n)),
        }
    }
    runs
}

impl Filter {
    pub fn build() -> Self {
        let mut p = vec![
            stmt(LD_W_ABS, ARCH),
            jump(JEQ, AUDIT_ARCH, 1, 0),
            stmt(RET, RET_KILL_PROCESS),
            stmt(LD_W_ABS, NR),
            jump(JSET, X32_SYSCALL_BIT, 0, 1),
            stmt(RET, DENY),
        ];
        let conditional = conditional();
        for (nr, block) in &conditional {
            // Falls into the block on a match, jumps over it otherwise.
            p.push(jump(JEQ, *nr as u32, 0, block.len() as u8));
            p.extend_from_slice(block);
        }
        let special: Vec<libc::c_long> = conditional.iter().map(|(nr, _)| *nr).collect();
        let allowed = ALLOWED.iter().chain(ALLOWED_LEGACY).filter(|nr| !special.contains(nr)).map(|&nr| nr as u32);
        // Runs in ascending order: below a run's start (and past every earlier
        // run) means not allowed.
        for (start, end) in ranges(allowed.collect()) {
            p.extend([jump(JGE, start, 1, 0), stmt(RET, DENY), jump(JGT, end, 1, 0), stmt(RET, RET_ALLOW)]);
        }
        p.push(stmt(RET, DENY));
        Self { program: p }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_consecutive_numbers() {
        assert_eq!(ranges(vec![5, 1, 2, 3, 9, 10, 3]), [(1, 3), (5, 5), (9, 10)]);
    }

    #[test]
    fn the_program_is_short_and_its_jumps_stay_inside_it() {
        let p = Filter::build().program;
        assert!(p.len() < 400, "{} instructions", p.len());
        for (i, ins) in p.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + usize::from(ins.jt.max(ins.jf)) < p.len(), "jump out of the program at {i}");
            }
        }
        assert_eq!(p.last().map(|i| (i.code, i.k)), Some((RET, DENY)));
    }
}
