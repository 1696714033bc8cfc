/* Tries what SECURITY.md says a jailed program must not do, and prints one
 * line per attempt: "name ok" when it succeeded, else "name <errno name>". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef AF_ALG
#define AF_ALG 38
#endif

static void report(const char *name, long ret) {
    if (ret >= 0) printf("%s ok\n", name);
    else printf("%s %s\n", name, strerrorname_np(errno));
    fflush(stdout);
}

int main(void) {
    report("ptrace", ptrace(PTRACE_ATTACH, 1, 0, 0));
    report("process_vm_readv", syscall(SYS_process_vm_readv, 1, 0, 0, 0, 0, 0));
    report("mount", mount("tmpfs", "/tmp", "tmpfs", 0, 0));
    report("umount", umount2("/data", MNT_DETACH));
    report("unshare_user", unshare(CLONE_NEWUSER));
    report("unshare_net", unshare(CLONE_NEWNET));
    report("setns", syscall(SYS_setns, 0, 0));
    report("chroot", chroot("/tmp"));
    report("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    report("keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
    report("add_key", syscall(SYS_add_key, "user", "x", "y", 1, -3));
    report("bpf", syscall(SYS_bpf, 0, 0, 0));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, 0, 0, -1, -1, 0));
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("open_tree", syscall(428 /* open_tree */, -100, "/", 0));
    report("fsopen", syscall(430 /* fsopen */, "tmpfs", 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, 0, 0));
    report("init_module", syscall(SYS_init_module, 0, 0, ""));
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, 0, 0, 0));
    report("socket_vsock", socket(AF_VSOCK, SOCK_STREAM, 0));
    report("socket_alg", socket(AF_ALG, SOCK_SEQPACKET, 0));
    report("socket_inet", socket(AF_INET, SOCK_STREAM, 0));
    report("socket_netlink", socket(AF_NETLINK, SOCK_RAW, 0));
    report("socket_unix", socket(AF_UNIX, SOCK_STREAM, 0));
    char c = 'x';
    report("tiocsti", ioctl(0, TIOCSTI, &c));
    /* The same command with high bits set: the kernel reads 32 bits. */
    report("tiocsti_high", syscall(SYS_ioctl, 0, 0x100000000UL | TIOCSTI, &c));
    report("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
    report("clone3", syscall(435 /* clone3 */, 0, 0));
    report("memfd_exec", syscall(SYS_memfd_create, "x", 0));
    report("personality", personality(0x0040000 /* READ_IMPLIES_EXEC */));
    /* x32 ABI: getpid with the x32 bit. */
    report("x32_getpid", syscall(0x40000000 | 39));
    /* Allowed things still work. */
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    int status = 0;
    report("fork", pid < 0 ? -1 : waitpid(pid, &status, 0));
    report("getpid", getpid());
    return 0;
}
