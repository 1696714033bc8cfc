//! What this host gives the process: its memory, as the kernel reports it
//! (`/proc/meminfo`) and as the process's cgroup limits it.

/// A `/proc/meminfo` field (`"MemTotal:"`), in bytes.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse::<u64>().ok().map(|k| k * 1024)
}

/// The memory this process may use: the host's, or its cgroup's limit when
/// that is lower (v2 `memory.max`, v1 `memory.limit_in_bytes`). 1 GiB when
/// neither can be read.
pub fn memory_bytes() -> u64 {
    let host = meminfo_bytes("MemTotal:").unwrap_or(1 << 30);
    cgroup_memory_limit().map_or(host, |limit| limit.min(host))
}

/// The memory limit of this process's own cgroup, if it has one.
fn cgroup_memory_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    membership.lines().find_map(|line| {
        // `0::/path` (v2) or `N:memory:/path` (v1; `memory` may share its line).
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            return None;
        };
        // "max" (v2) or a page-rounded i64::MAX (v1) mean no limit.
        std::fs::read_to_string(file).ok()?.trim().parse::<u64>().ok().filter(|&l| l < 1 << 60)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_host_has_some_memory_and_no_more_than_meminfo_says() {
        let total = super::meminfo_bytes("MemTotal:").unwrap();
        let usable = super::memory_bytes();
        assert!(usable > 0 && usable <= total, "{usable} of {total}");
    }
}
