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
    /// Code sessions one user may have open at once.
    #[serde(default = "default_sessions")]
    pub sessions: u32,
    /// A session with no step for this long is closed (also the longest idle
    /// timeout a session may ask for).
    #[serde(default = "default_session_idle_s")]
    pub session_idle_s: u64,
    /// A session is closed this long after it was opened, busy or not.
    #[serde(default = "default_session_lifetime_s")]
    pub session_lifetime_s: u64,
}

fn default_sessions() -> u32 {
    1
}

fn default_session_idle_s() -> u64 {
    300
}

fn default_session_lifetime_s() -> u64 {
    3600
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
                sessions: default_sessions(),
                session_idle_s: default_session_idle_s(),
                session_lifetime_s: default_session_lifetime_s(),
            };
        let sessions = |tier: Tier, sessions, session_idle_s, session_lifetime_s| Tier {
            sessions,
            session_idle_s,
            session_lifetime_s,
            ..tier
        };
        BTreeMap::from([
            ("free".to_owned(), sessions(tier(256 * MIB, 0.25, 25, 2, 20, 100 * MIB, 10_000), 1, 300, 3600)),
            ("standard".to_owned(), sessions(tier(512 * MIB, 0.5, 50, 5, 100, 1024 * MIB, 100_000), 4, 900, 4 * 3600)),
            (
                "premium".to_owned(),
                sessions(tier(1024 * MIB, 1.0, 100, 20, 1000, 10 * 1024 * MIB, 1_000_000), 16, 1800, 12 * 3600),
            ),
        ])
    }
}
