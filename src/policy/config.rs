//! The optional TOML config file: overrides of the built-in policy.
//!
//! ```toml
//! [limits]
//! default_timeout_ms = 10000
//! max_timeout_ms = 60000
//! output_bytes = 1048576
//!
//! [tiers.free]          # a known tier: override only what you name
//! memory_bytes = 134217728
//!
//! [tiers.team]          # a new tier: every field is required
//! memory_bytes = 2147483648
//! cpu = 2.0
//! pids = 200
//! nofile_soft = 1024
//! nofile_hard = 2048
//! tmp_bytes = 104857600
//! concurrent_calls = 50
//! requests_per_second = 500       # optional (default 100)
//! data_quota_bytes = 10737418240  # optional (default 1 GiB)
//! data_files = 1000000            # optional (default 100,000 files, directories and links)
//!
//! [server]              # settings of `serve` (see api::ServerSettings)
//! [jail]                # the native jailer (see jail::JailConfig)
//! listen = "127.0.0.1:8080"
//!
//! [env]                 # the environment every tool sees
//! LANG = "C.UTF-8"
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{Policy, Tier};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file is not valid: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("tier `{tier}`: {reason}")]
    Tier { tier: String, reason: String },
    #[error("limits: {0}")]
    Limits(String),
}

/// The config file as written: everything optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    limits: LimitsOverride,
    #[serde(default)]
    tiers: BTreeMap<String, toml::Table>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The `[server]` table: read by `serve`, not part of the policy.
    #[serde(default)]
    server: toml::Table,
    /// The `[jail]` table: the native jailer's settings (see `jail::JailConfig`).
    #[serde(default)]
    jail: toml::Table,
    #[serde(default)]
    retention: toml::Table,
    #[serde(default)]
    backup: toml::Table,
    #[serde(default)]
    behaviour: toml::Table,
    #[serde(default)]
    response: toml::Table,
    /// The `[store]` table: which database (see `store::StoreSettings`).
    #[serde(default)]
    store: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsOverride {
    default_timeout_ms: Option<u64>,
    max_timeout_ms: Option<u64>,
    fuel_per_cpu_second: Option<u64>,
    output_bytes: Option<usize>,
    input_bytes: Option<usize>,
    module_bytes: Option<usize>,
    table_elements: Option<u64>,
}

impl PolicyFile {
    /// Parses a config file's text.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] with the line and the key that is wrong.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Takes the `[jail]` table out (the native jailer's settings).
    pub fn take_jail(&mut self) -> toml::Table {
        std::mem::take(&mut self.jail)
    }

    /// Takes the `[server]` table out (settings of `serve`, checked there).
    pub fn take_backup(&mut self) -> toml::Table {
        std::mem::take(&mut self.backup)
    }

    /// Takes the `[behaviour]` table out (behaviour analysis' thresholds).
    pub fn take_behaviour(&mut self) -> toml::Table {
        std::mem::take(&mut self.behaviour)
    }

    /// Takes the `[response]` table out (what each behaviour rule does).
    pub fn take_response(&mut self) -> toml::Table {
        std::mem::take(&mut self.response)
    }

    pub fn take_retention(&mut self) -> toml::Table {
        std::mem::take(&mut self.retention)
    }

    pub fn take_store(&mut self) -> toml::Table {
        std::mem::take(&mut self.store)
    }

    pub fn take_server(&mut self) -> toml::Table {
        std::mem::take(&mut self.server)
    }

    /// The built-in policy with this file's overrides applied.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the tier or limit that is incomplete or out of range.
    pub fn apply(self, mut policy: Policy) -> Result<Policy, ConfigError> {
        let l = self.limits;
        if let Some(ms) = l.default_timeout_ms {
            policy.default_wall_time = Duration::from_millis(ms);
        }
        if let Some(ms) = l.max_timeout_ms {
            policy.max_wall_time = Duration::from_millis(ms);
        }
        if policy.default_wall_time.is_zero() || policy.default_wall_time > policy.max_wall_time {
            return Err(ConfigError::Limits("default_timeout_ms must be between 1 and max_timeout_ms".into()));
        }
        policy.fuel_per_cpu_second = l.fuel_per_cpu_second.unwrap_or(policy.fuel_per_cpu_second);
        policy.output_bytes = l.output_bytes.unwrap_or(policy.output_bytes);
        policy.input_bytes = l.input_bytes.unwrap_or(policy.input_bytes);
        policy.module_bytes = l.module_bytes.unwrap_or(policy.module_bytes);
        policy.table_elements = l.table_elements.unwrap_or(policy.table_elements);

        for (name, table) in self.tiers {
            let tier = match policy.tiers.get(&name) {
                // A known tier: the file's keys over the defaults.
                Some(base) => {
                    let mut merged = toml::Table::try_from(base).map_err(|e| tier_error(&name, e))?;
                    merged.extend(table);
                    merged.try_into().map_err(|e| tier_error(&name, e))?
                }
                None => toml::Value::Table(table).try_into().map_err(|e| tier_error(&name, e))?,
            };
            check_tier(&name, &tier)?;
            policy.tiers.insert(name, tier);
        }
        policy.env.extend(self.env);
        Ok(policy)
    }
}

fn tier_error(tier: &str, e: impl std::fmt::Display) -> ConfigError {
    ConfigError::Tier { tier: tier.to_owned(), reason: e.to_string() }
}

fn check_tier(name: &str, tier: &Tier) -> Result<(), ConfigError> {
    let bad = |reason: &str| Err(tier_error(name, reason));
    if !(tier.cpu.is_finite() && tier.cpu > 0.0) {
        return bad("cpu must be a positive number of cores");
    }
    if tier.memory_bytes == 0 || tier.pids == 0 || tier.concurrent_calls == 0 || tier.requests_per_second == 0 {
        return bad("memory_bytes, pids, concurrent_calls and requests_per_second must be positive");
    }
    if tier.session_idle_s == 0 || tier.session_lifetime_s == 0 {
        return bad("session_idle_s and session_lifetime_s must be positive (sessions = 0 turns sessions off)");
    }
    if tier.nofile_soft > tier.nofile_hard {
        return bad("nofile_soft must not exceed nofile_hard");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(text: &str) -> Result<Policy, ConfigError> {
        PolicyFile::parse(text)?.apply(Policy::default())
    }

    #[test]
    fn an_empty_file_changes_nothing() {
        assert_eq!(apply("").unwrap(), Policy::default());
    }

    #[test]
    fn a_known_tier_takes_only_the_overridden_fields() {
        let policy = apply("[tiers.free]\nmemory_bytes = 1000\n").unwrap();
        let free = &policy.tiers["free"];
        assert_eq!(free.memory_bytes, 1000);
        assert_eq!(free.pids, 25);
        assert_eq!(free.cpu, 0.25);
    }

    #[test]
    fn a_new_tier_needs_every_field() {
        let err = apply("[tiers.team]\nmemory_bytes = 1000\n").unwrap_err();
        assert!(err.to_string().starts_with("tier `team`: missing field"), "{err}");
        let policy = apply(
            "[tiers.team]\nmemory_bytes = 1\ncpu = 2.0\npids = 3\nnofile_soft = 4\n\
             nofile_hard = 5\ntmp_bytes = 6\nconcurrent_calls = 7\n",
        )
        .unwrap();
        assert_eq!(policy.tiers["team"].concurrent_calls, 7);
    }

    #[test]
    fn typos_and_nonsense_are_refused() {
        assert!(apply("[limits]\ndefault_timeout = 5\n").is_err());
        assert!(apply("[tiers.free]\nmemroy_bytes = 5\n").is_err());
        assert!(apply("[tiers.free]\ncpu = -1.0\n").is_err());
        assert!(apply("[limits]\ndefault_timeout_ms = 90000\n").is_err());
    }

    #[test]
    fn env_and_limits_are_applied() {
        let policy = apply("[limits]\noutput_bytes = 10\n[env]\nLANG = \"C.UTF-8\"\n").unwrap();
        assert_eq!(policy.output_bytes, 10);
        assert_eq!(policy.env["LANG"], "C.UTF-8");
    }
}
