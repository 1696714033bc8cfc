//! Resource limits from the tier, a second line behind the cgroup: open
//! files (the tier's soft/hard), processes (one above `pids.max`, so that the
//! cgroup, which records the refusal, is what a fork bomb meets first; the
//! kernel counts them per user namespace, so per run), the largest file
//! (the larger of `/tmp` and the data quota) and no core dumps.

use super::sys::{self, Errno};
use crate::policy::Limits;

/// `(resource, soft, hard)` rows, built before the clone.
pub(super) type Table = [(libc::__rlimit_resource_t, u64, u64); 4];

pub(super) fn for_limits(limits: &Limits) -> Table {
    let fsize = limits.tmp_bytes.max(limits.data_quota_bytes);
    let nproc = u64::from(limits.pids) + 1;
    [
        (libc::RLIMIT_NOFILE, limits.nofile_soft, limits.nofile_hard),
        (libc::RLIMIT_NPROC, nproc, nproc),
        (libc::RLIMIT_FSIZE, fsize, fsize),
        (libc::RLIMIT_CORE, 0, 0),
    ]
}

/// Sets every row (in the tool, before its exec: raw system calls only).
pub(super) fn apply(table: &Table) -> Result<(), Errno> {
    for &(resource, soft, hard) in table {
        sys::setrlimit(resource, soft, hard)?;
    }
    Ok(())
}

/// The rows as the first line of a warm jail's input, for its program to
/// set on itself before its call's code runs (`resource.setrlimit` in
/// python-data's runner). A warm jail starts with limits at least those of
/// every tier it may serve ([`within`]), so this only lowers them, and
/// lowering one's own limits needs no capability.
/// `session`: the program then runs a session's steps (`super::session`),
/// each answer at most this many bytes.
pub(super) fn header(table: &Table, session: Option<usize>) -> String {
    let name = |resource| match resource {
        libc::RLIMIT_NOFILE => "nofile",
        libc::RLIMIT_NPROC => "nproc",
        libc::RLIMIT_FSIZE => "fsize",
        _ => "core",
    };
    let mut line = "imagentx-limits".to_owned();
    for &(resource, soft, hard) in table {
        line.push_str(&format!(" {}={soft}:{hard}", name(resource)));
    }
    if let Some(cap) = session {
        line.push_str(&format!(" session frame={cap}"));
    }
    line.push('\n');
    line
}

/// Whether a process under `have` may lower itself to `want` (every soft
/// and hard value at most the one it has).
pub(super) fn within(want: &Table, have: &Table) -> bool {
    want.iter().zip(have).all(|(w, h)| w.0 == h.0 && w.1 <= h.1 && w.2 <= h.2)
}
