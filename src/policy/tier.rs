//! Resource tiers (DESIGN.md, "Tiers").

use std::collections::BTreeMap;

/// What one tier of users may use per call.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Memory cap: all linear memories of a WASM instance together, or the
    /// cgroup memory limit of a native run.
    pub memory_bytes: u64,
    /// Share of one core: 0.25 is a quarter. WASM turns it into fuel.
    pub cpu: f64,
    /// Process cap of a native run.
    pub pids: u32,
    /// Open files of a native run (`RLIMIT_NOFILE`); a WASM call may hold
    /// `nofile_soft` host descriptors.
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Size of a call's `/tmp`: a tmpfs for a native run, charged at every
    /// write for a WASM call.
    pub tmp_bytes: u64,
    /// Calls one user of this tier may have in flight.
    pub concurrent_calls: u32,
    /// Sustained API requests per second per user (the burst allowed is twice this).
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// Cap on the bytes in a user's data directory (`/data`).
    #[serde(default = "default_data_quota_bytes")]
    pub data_quota_bytes: u64,
    /// Cap on the files, directories and links in a user's data directory.
    #[serde(default = "default_data_files")]
    pub data_files: u64,
}

fn default_data_files() -> u64 {
    100_000
}

fn default_requests_per_second() -> u32 {
    100
}

fn default_data_quota_bytes() -> u64 {
    1024 * MIB
}

const MIB: u64 = 1 << 20;

impl Tier {
    /// DESIGN.md's three tiers.
    pub fn defaults() -> BTreeMap<String, Tier> {
        let tier =
            |memory_bytes, cpu, pids, concurrent_calls, requests_per_second, data_quota_bytes, data_files| Tier {
                memory_bytes,
                cpu,
                pids,
                nofile_soft: 1024,
                nofile_hard: 2048,
                tmp_bytes: 100 * MIB,
                concurrent_calls,
                requests_per_second,
                data_quota_bytes,
                data_files,
            };
        BTreeMap::from([
            ("free".to_owned(), tier(256 * MIB, 0.25, 25, 2, 20, 100 * MIB, 10_000)),
            ("standard".to_owned(), tier(512 * MIB, 0.5, 50, 5, 100, 1024 * MIB, 100_000)),
            ("premium".to_owned(), tier(1024 * MIB, 1.0, 100, 20, 1000, 10 * 1024 * MIB, 1_000_000)),
        ])
    }
}
