//! Policy: what a call may use, as plain data.
//!
//! No I/O happens here. A [`Policy`] holds the tiers (DESIGN.md's table, or a
//! config file's overrides) and the global caps; [`Policy::resolve`] turns a
//! tier name and a requested time budget into the [`Limits`] one call runs
//! under. Both runtimes read the same `Limits`.

mod config;
mod tier;
mod user;

use std::collections::BTreeMap;
use std::time::Duration;

pub use config::{ConfigError, PolicyFile};
pub use tier::Tier;
pub use user::{InvalidUserId, UserId};

/// Fuel a guest burns in one second of one core's time: the bridge between a
/// tier's CPU share and a deterministic fuel budget. Measured by
/// `cargo bench --bench latency` ("fuel rate", 8.96e9 on the reference machine,
/// BENCHMARKS.md) with a tight integer loop; code that waits on memory burns
/// less fuel per second, and then the wall-clock deadline stops it instead.
pub const DEFAULT_FUEL_PER_CPU_SECOND: u64 = 9_000_000_000;

/// Files, directories and links a call's `/tmp` may hold (a native run's
/// tmpfs `nr_inodes`).
pub const TMP_FILES: u64 = 16_384;

/// Everything a call is allowed, resolved from its tier and its request.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The tier these limits came from.
    pub tier: String,
    /// Wall-clock budget of the whole call.
    pub wall_time: Duration,
    /// Fuel budget: `fuel_per_cpu_second × cpu share × wall_time`. Deterministic:
    /// the same input burns the same fuel.
    pub fuel: u64,
    /// CPU-time budget: `cpu share × wall_time`, measured on the thread clock.
    /// Exact where fuel is not: fuel burnt per second depends on the code.
    pub cpu_time: Duration,
    /// Cap on all linear memories of the instance together.
    pub memory_bytes: u64,
    /// Cap on all table elements of the instance together.
    pub table_elements: u64,
    /// Cap on each of stdout, stderr and the result; the excess is dropped.
    pub output_bytes: usize,
    /// Cap on the input document.
    pub input_bytes: usize,
    /// Cap on the bytes in the user's data directory.
    pub data_quota_bytes: u64,
    /// Cap on the files, directories and links in the user's data directory.
    pub data_files: u64,
    /// Cap on the files, directories and links in the call's `/tmp`.
    pub tmp_files: u64,
    /// The tier's share of one core (a native run's cgroup CPU quota).
    pub cpu_share: f64,
    /// Processes a native run may have at once.
    pub pids: u32,
    /// Open-file limits of a native run.
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Size of a native run's `/tmp`.
    pub tmp_bytes: u64,
}

/// Why a call's policy could not be resolved. These are the caller's mistakes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("unknown tier `{name}` (known: {known})")]
    UnknownTier { name: String, known: String },
    #[error("timeout of {requested_ms} ms is outside 1..={max_ms} ms")]
    TimeoutOutOfRange { requested_ms: u64, max_ms: u64 },
}

/// The sandbox's resource policy: tiers and global caps.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub tiers: BTreeMap<String, Tier>,
    /// Wall-clock budget when a call asks for none.
    pub default_wall_time: Duration,
    /// The largest wall-clock budget a call may ask for.
    pub max_wall_time: Duration,
    pub fuel_per_cpu_second: u64,
    pub output_bytes: usize,
    pub input_bytes: usize,
    /// Uploaded modules larger than this are refused before compiling.
    pub module_bytes: usize,
    /// Cap on table elements per instance (funcref tables of big components hold
    /// tens of thousands; this only guards against table-growth bombs).
    pub table_elements: u64,
    /// The environment every tool sees; nothing of the host's leaks in.
    pub env: BTreeMap<String, String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            tiers: Tier::defaults(),
            default_wall_time: Duration::from_secs(10),
            max_wall_time: Duration::from_secs(60),
            fuel_per_cpu_second: DEFAULT_FUEL_PER_CPU_SECOND,
            output_bytes: 1 << 20,
            input_bytes: 1 << 20,
            module_bytes: 64 << 20,
            table_elements: 1_000_000,
            env: BTreeMap::new(),
        }
    }
}

impl Policy {
    /// The tier called `name`.
    pub fn tier(&self, name: &str) -> Result<&Tier, PolicyError> {
        self.tiers.get(name).ok_or_else(|| PolicyError::UnknownTier {
            name: name.to_owned(),
            known: self.tiers.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The limits of one call in tier `tier_name` that asked for `timeout`
    /// (the default budget when `None`).
    ///
    /// # Errors
    ///
    /// [`PolicyError::UnknownTier`] for a tier the policy does not have;
    /// [`PolicyError::TimeoutOutOfRange`] for a zero timeout or one above the
    /// maximum.
    pub fn resolve(&self, tier_name: &str, timeout: Option<Duration>) -> Result<Limits, PolicyError> {
        let tier = self.tier(tier_name)?;
        let wall_time = timeout.unwrap_or(self.default_wall_time);
        if wall_time.is_zero() || wall_time > self.max_wall_time {
            return Err(PolicyError::TimeoutOutOfRange {
                requested_ms: u64::try_from(wall_time.as_millis()).unwrap_or(u64::MAX),
                max_ms: u64::try_from(self.max_wall_time.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(Limits {
            tier: tier_name.to_owned(),
            wall_time,
            fuel: fuel_budget(self.fuel_per_cpu_second, tier.cpu, wall_time),
            cpu_time: wall_time.mul_f64(tier.cpu),
            memory_bytes: tier.memory_bytes,
            table_elements: self.table_elements,
            output_bytes: self.output_bytes,
            input_bytes: self.input_bytes,
            data_quota_bytes: tier.data_quota_bytes,
            data_files: tier.data_files,
            tmp_files: TMP_FILES,
            cpu_share: tier.cpu,
            pids: tier.pids,
            nofile_soft: tier.nofile_soft,
            nofile_hard: tier.nofile_hard,
            tmp_bytes: tier.tmp_bytes,
        })
    }
}

/// `fuel_per_cpu_second × cpu share × wall time`, saturating.
fn fuel_budget(fuel_per_cpu_second: u64, cpu: f64, wall_time: Duration) -> u64 {
    let fuel = fuel_per_cpu_second as f64 * cpu * wall_time.as_secs_f64();
    if fuel >= u64::MAX as f64 { u64::MAX } else { fuel.max(1.0) as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_tier_gets_half_a_core_of_fuel_over_the_default_budget() {
        let policy = Policy::default();
        let limits = policy.resolve("standard", None).unwrap();
        assert_eq!(limits.wall_time, Duration::from_secs(10));
        assert_eq!(limits.memory_bytes, 512 << 20);
        assert_eq!(limits.fuel, DEFAULT_FUEL_PER_CPU_SECOND * 5);
        assert_eq!(limits.cpu_time, Duration::from_secs(5));
    }

    #[test]
    fn fuel_scales_with_the_tier_cpu_share_and_the_requested_time() {
        let policy = Policy::default();
        let free = policy.resolve("free", Some(Duration::from_secs(2))).unwrap();
        let premium = policy.resolve("premium", Some(Duration::from_secs(2))).unwrap();
        assert_eq!(free.fuel * 4, premium.fuel);
        assert_eq!(premium.fuel, DEFAULT_FUEL_PER_CPU_SECOND * 2);
    }

    #[test]
    fn unknown_tier_is_refused_with_the_known_ones_listed() {
        let err = Policy::default().resolve("gold", None).unwrap_err();
        assert_eq!(err.to_string(), "unknown tier `gold` (known: free, premium, standard)");
    }

    #[test]
    fn timeouts_of_zero_or_above_the_maximum_are_refused() {
        let policy = Policy::default();
        assert!(matches!(policy.resolve("free", Some(Duration::ZERO)), Err(PolicyError::TimeoutOutOfRange { .. })));
        assert!(matches!(
            policy.resolve("free", Some(Duration::from_secs(61))),
            Err(PolicyError::TimeoutOutOfRange { requested_ms: 61_000, max_ms: 60_000 })
        ));
        assert!(policy.resolve("free", Some(Duration::from_secs(60))).is_ok());
    }
}
