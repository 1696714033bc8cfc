//! The namespaces of a run and the id maps of its user namespace.
//!
//! Every run gets new user, pid, mount, net, uts and ipc namespaces from the
//! clone (the cgroup namespace follows once the run is in its cgroup, see
//! `child`). The user namespace is made even when the server is root: it
//! scopes `RLIMIT_NPROC` to the run (the kernel counts processes per user
//! namespace) and confines the capabilities the jail's setup uses.
//!
//! Inside, the tool is uid/gid 65534. When the server is root, that maps to
//! the configured host id (65534, "nobody", by default) and inside uid 0 maps
//! to root so that the jail's init can build the root; when it is not, to the
//! server's own ids (the only ones an unprivileged process may map).

use std::fs;

use super::SANDBOX_ID;

pub(super) const CLONE_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC;

/// Checks that user namespaces can be made here.
pub(super) fn check_available() -> Result<(), String> {
    match fs::read_to_string("/proc/sys/user/max_user_namespaces") {
        Ok(text) if text.trim() == "0" => Err("/proc/sys/user/max_user_namespaces is 0".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("reading /proc/sys/user/max_user_namespaces: {e}")),
    }
}

/// Writes the uid and gid maps of the child `pid`'s user namespace.
pub(super) fn map_ids(pid: libc::pid_t, privileged: bool, host_id: u32) -> std::io::Result<()> {
    let (uid_map, gid_map, deny_setgroups) = if privileged {
        (format!("0 0 1\n{SANDBOX_ID} {host_id} 1\n"), format!("0 0 1\n{SANDBOX_ID} {host_id} 1\n"), false)
    } else {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        (format!("{SANDBOX_ID} {uid} 1\n"), format!("{SANDBOX_ID} {gid} 1\n"), true)
    };
    write_maps(pid, &uid_map, &gid_map, deny_setgroups)
}

/// Writes `/proc/<pid>/{uid_map,setgroups,gid_map}`, in the order the kernel needs.
fn write_maps(pid: libc::pid_t, uid_map: &str, gid_map: &str, deny_setgroups: bool) -> std::io::Result<()> {
    let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("uid_map"), uid_map)?;
    if deny_setgroups {
        std::fs::write(proc.join("setgroups"), "deny")?;
    }
    std::fs::write(proc.join("gid_map"), gid_map)?;
    Ok(())
}
