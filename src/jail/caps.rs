//! Privileges: every capability dropped (the bounding and ambient sets
//! too), no supplementary groups, the sandbox's uid and gid, and
//! `no_new_privs`, so that nothing the program executes (a setuid binary, a
//! file with capabilities) can give any of it back.
//!
//! Runs in the tool's process before its exec (see `child`), with the same
//! rules: raw system calls only.

use super::child::Stage;
use super::sys::{self, Errno};

/// Drops everything, in the order the kernel needs: the bounding set while
/// `CAP_SETPCAP` is still held, then the ids, then the remaining sets.
/// `setgroups` is false in an unprivileged user namespace, where the kernel
/// refuses it (and there are no groups to drop).
pub(super) fn drop_all(setgroups: bool, uid: u32, gid: u32) -> Result<(), (Stage, Errno)> {
    for cap in 0..64 {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap) {
            // Past the kernel's last capability.
            Ok(()) | Err(libc::EINVAL) => {}
            Err(e) => return Err((Stage::Capabilities, e)),
        }
    }
    sys::cap_ambient_clear().map_err(|e| (Stage::Capabilities, e))?;
    if setgroups {
        sys::setgroups_none().map_err(|e| (Stage::Credentials, e))?;
    }
    // A change of uid also makes the memory the tool still shares with the
    // server non-dumpable (the kernel applies `suid_dumpable`): no host
    // process running as the tool's uid can ptrace its way into it before
    // the exec.
    sys::setresgid(gid).map_err(|e| (Stage::Credentials, e))?;
    sys::setresuid(uid).map_err(|e| (Stage::Credentials, e))?;
    sys::capset_none().map_err(|e| (Stage::Capabilities, e))?;
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| (Stage::NoNewPrivs, e))
}
