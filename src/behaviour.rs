//! Behaviour analysis: per-user and per-tool baselines kept online from what
//! every call already reports, and the rules that name an incident.
//!
//! Everything here is in memory, updated in O(1) per observation (a bounded
//! ring per user, a sliding minute of ten-second slots folded into moving
//! averages), and knows
//! nothing of HTTP or the database: the server feeds it (`crate::api`) and
//! acts on what it detects (`[response]`). A restart starts every baseline
//! over; the detections themselves are audit records.
//!
//! The rules, and what each compares:
//!
//! | rule | fires when |
//! |---|---|
//! | `limit_probing` | in the last minute, at least `probing_hits` of the user's calls were stopped by (or ran into) a limit, more than one limit among them (code that loops, retried, hits one), they were at least half of the user's calls, and the user's long-run share of such calls is under 20 % |
//! | `escape_attempts` | `escape_attempts` refused escapes in 5 minutes: paths that leave `/data` sent to the files API, admin routes with a user's key, native programs killed by seccomp (`SIGSYS`) |
//! | `auth_failures` | `auth_failures` failed authentications in a minute from one source (a client address; a revoked key names its user) |
//! | `call_rate` | the user's calls in the last minute pass `factor` × their per-minute average and `rate_floor_per_min`, and the call is not from one of the user's usual networks (below) |
//! | `cpu_spike` | CPU in the last minute passes `factor` × the user's average and `cpu_floor_ms_per_min` |
//! | `write_spike` | bytes written in the last minute pass `factor` × the user's average and `write_floor_bytes_per_min`, and the call is not from one of the user's usual networks |
//! | `crashing_tool` | the first `crash_calls` calls of a tool build (by its SHA-256) all crashed |
//!
//! A rule fires at most once per `cooldown_s` for the same user (or source,
//! or tool build): one incident, one detection.
//!
//! **Networks.** A call's network is its client's IPv4 /24 or IPv6 /48
//! (`crate::api::client`: the peer, or the address a trusted proxy
//! forwarded). The user's calls from a network are counted in periods of
//! `network_settle_s`: the network is one of the user's *usual* ones when,
//! over its last full period, at least [`USUAL_SHARE`] of the user's calls
//! came from it (a period with no call of the user's keeps the verdict).
//! So a new network is never usual in its first period, and one call from
//! a network, made to prime it, does not make it usual for a user who
//! calls from elsewhere: its share is too small. A burst of calls or writes
//! from a usual network is the user's own work (a new batch job, an
//! export), which volume alone cannot tell from misuse; the same burst
//! from a network new to the user is what a leaked key looks like. So
//! `call_rate` and `write_spike` do not fire on calls from a usual network.
//! A network that [`SHARED_BY`] or more users call from (an agent
//! platform's backend, a NAT, a proxy not listed as trusted) says nothing
//! of who calls, and counts as unknown: with no known network, those two
//! rules judge by volume alone, as before networks were seen.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::report::Status;

/// What a detection is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    LimitProbing,
    EscapeAttempts,
    AuthFailures,
    CallRate,
    CpuSpike,
    WriteSpike,
    CrashingTool,
}

impl Rule {
    pub const ALL: [Rule; 7] = [
        Rule::LimitProbing,
        Rule::EscapeAttempts,
        Rule::AuthFailures,
        Rule::CallRate,
        Rule::CpuSpike,
        Rule::WriteSpike,
        Rule::CrashingTool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::LimitProbing => "limit_probing",
            Rule::EscapeAttempts => "escape_attempts",
            Rule::AuthFailures => "auth_failures",
            Rule::CallRate => "call_rate",
            Rule::CpuSpike => "cpu_spike",
            Rule::WriteSpike => "write_spike",
            Rule::CrashingTool => "crashing_tool",
        }
    }

    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One incident found: the rule, whom it concerns, and the numbers and
/// executions behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub rule: Rule,
    pub user: Option<String>,
    pub tool: Option<String>,
    pub evidence: serde_json::Value,
}

/// The `[behaviour]` table: the rules' thresholds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Off: nothing is analysed (and nothing responds).
    pub enabled: bool,
    /// Calls in a minute stopped by a limit that make a burst.
    pub probing_hits: u32,
    /// Refused escapes in five minutes.
    pub escape_attempts: u32,
    /// Failed authentications in a minute from one source.
    pub auth_failures: u32,
    /// How far above a user's own per-minute average is anomalous.
    pub factor: f64,
    /// Calls per minute under which no rate is anomalous.
    pub rate_floor_per_min: u32,
    /// CPU milliseconds per minute under which no CPU use is anomalous.
    pub cpu_floor_ms_per_min: f64,
    /// Bytes written per minute under which no writing is anomalous.
    pub write_floor_bytes_per_min: u64,
    /// Calls of a new tool build that must all crash.
    pub crash_calls: u32,
    /// The least time between two detections of one rule for one subject.
    pub cooldown_s: u64,
    /// The period over which a network's share of a user's calls makes it
    /// one of their usual ones (a burst from a usual network is their own
    /// work). Counted in ten-second slots.
    pub network_settle_s: u64,
}

impl Thresholds {
    /// Checks that every rule can fire and none fires on everything.
    ///
    /// # Errors
    ///
    /// What is out of range, naming the key.
    pub fn check(&self) -> Result<(), String> {
        let within = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) { Ok(()) } else { Err(format!("{key} must be between {lo} and {hi}")) }
        };
        within("probing_hits", self.probing_hits.into(), 2, RING as u64)?;
        within("escape_attempts", self.escape_attempts.into(), 1, ESCAPES as u64)?;
        within("auth_failures", self.auth_failures.into(), 1, 10_000)?;
        within("crash_calls", self.crash_calls.into(), 1, 1000)?;
        within("cooldown_s", self.cooldown_s, 1, 7 * 86_400)?;
        within("network_settle_s", self.network_settle_s, 1, 30 * 86_400)?;
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err("factor must be a number of at least 1".to_owned());
        }
        if !(self.cpu_floor_ms_per_min.is_finite() && self.cpu_floor_ms_per_min > 0.0) {
            return Err("cpu_floor_ms_per_min must be a positive number".to_owned());
        }
        if self.rate_floor_per_min == 0 || self.write_floor_bytes_per_min == 0 {
            return Err("rate_floor_per_min and write_floor_bytes_per_min must be positive".to_owned());
        }
        Ok(())
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            enabled: true,
            probing_hits: 5,
            escape_attempts: 5,
            auth_failures: 20,
            factor: 10.0,
            rate_floor_per_min: 600,
            cpu_floor_ms_per_min: 60_000.0,
            write_floor_bytes_per_min: 256 << 20,
            crash_calls: 5,
            cooldown_s: 600,
            network_settle_s: 1800,
        }
    }
}

/// What one finished call tells the analysis.
#[derive(Debug, Clone)]
pub struct CallFacts<'a> {
    pub user: &'a str,
    pub tool: &'a str,
    /// The build that ran (a native tool's or a WASM module's SHA-256).
    pub build: Option<&'a str>,
    pub execution: &'a str,
    pub status: Status,
    /// Limits the call ran into, even ones it survived.
    pub limits_hit: &'a [String],
    pub cpu_ms: f64,
    pub bytes_written: u64,
    /// The signal that ended a native program, if one did.
    pub signal: Option<&'a str>,
    /// The client's network (`crate::api::client::network_of`), when known.
    pub network: Option<&'a str>,
}

impl<'a> CallFacts<'a> {
    /// What `report` tells.
    pub fn of(report: &'a crate::report::ExecutionReport) -> Self {
        Self {
            user: &report.user,
            tool: &report.tool,
            build: report.tool_sha256.as_deref(),
            execution: &report.id,
            status: report.status,
            limits_hit: &report.usage.limits_hit,
            cpu_ms: report.usage.cpu_ms.unwrap_or(0.0),
            bytes_written: report.usage.bytes_written.unwrap_or(0),
            signal: report.signal.as_deref(),
            network: None,
        }
    }
}

/// Calls remembered per user for the minute windows (the last ones only:
/// a burst is judged on at most this many).
const RING: usize = 32;
/// Escapes remembered per user.
const ESCAPES: usize = 16;
/// Bytes of an escape's description kept.
const MAX_WHAT: usize = 200;
/// Executions named in a detection's evidence, at most.
const EVIDENCE: usize = 8;
/// Ten-second slots in the sliding minute.
const SLOTS: u64 = 6;
const SLOT: Duration = Duration::from_secs(10);
/// Weight of a new slot in a user's averages (about an hour's memory).
const SLOT_WEIGHT: f64 = 1.0 / 360.0;
/// Weight of a new call in a user's long-run share of limited calls.
const CALL_WEIGHT: f64 = 0.02;
/// History before a user's own average counts (until then only the floors
/// apply): five minutes.
const WARM_SLOTS: u64 = 30;
/// A limited-call share at or over this is the user's normal, not a probe.
const NORMAL_LIMITED_SHARE: f64 = 0.2;
/// Sources of failed authentication remembered at most (a flood from many
/// addresses forgets the oldest).
const MAX_SOURCES: usize = 10_000;
/// Users after which a network is shared: it no longer tells who calls.
pub const SHARED_BY: usize = 3;
const _: () = assert!(SHARED_BY > 1, "one user's network is never shared");
/// Networks remembered per user (the least recently used is forgotten).
const USER_NETWORKS: usize = 8;
/// The share of a user's calls in a period that makes a network usual.
pub const USUAL_SHARE: f64 = 0.1;
/// Networks remembered in all (past it, the unshared ones are forgotten).
const MAX_NETWORKS: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);
const ESCAPE_WINDOW: Duration = Duration::from_secs(300);

struct Call {
    at: Instant,
    /// The limit the call was stopped by or ran into, if one.
    limit: Option<String>,
    execution: String,
}

/// A sum over the last minute, in [`SLOTS`] slots of ten seconds (so the
/// minute slides), and the moving average of a slot.
#[derive(Default)]
struct LastMinute {
    slots: [f64; SLOTS as usize],
    /// Per slot.
    average: f64,
    /// The average as it stood when each slot began: a minute is judged
    /// against the average before it, never one it already raised.
    before: [f64; SLOTS as usize],
}

impl LastMinute {
    /// Moves from slot `from` to slot `to`: the slot left is folded into the
    /// average, then the empty ones in between; the slots that now hold a
    /// new ten seconds are cleared.
    fn advance(&mut self, from: u64, to: u64) {
        if to <= from {
            return;
        }
        self.average += SLOT_WEIGHT * (self.slots[(from % SLOTS) as usize] - self.average);
        let idle = (to - from - 1).min(100_000) as i32;
        self.average *= (1.0 - SLOT_WEIGHT).powi(idle);
        for i in (from + 1)..=to.min(from + SLOTS) {
            self.slots[(i % SLOTS) as usize] = 0.0;
            self.before[(i % SLOTS) as usize] = self.average;
        }
    }

    fn add(&mut self, slot: u64, v: f64) {
        self.slots[(slot % SLOTS) as usize] += v;
    }

    fn sum(&self) -> f64 {
        self.slots.iter().sum()
    }

    /// The average per minute before the minute that ends with slot `now`,
    /// over the `seen` slots of history, corrected for the zero it started
    /// from (as Adam's moving averages are).
    fn average_per_minute(&self, now: u64, seen: u64) -> f64 {
        let raw = self.before[((now + 1) % SLOTS) as usize];
        let seen = seen.saturating_sub(SLOTS - 1).min(100_000) as i32;
        let weight = 1.0 - (1.0 - SLOT_WEIGHT).powi(seen);
        if weight <= 0.0 { 0.0 } else { raw / weight * SLOTS as f64 }
    }
}

struct UserState {
    slot: u64,
    slots_seen: u64,
    calls: LastMinute,
    cpu: LastMinute,
    written: LastMinute,
    limited_share: f64,
    recent: VecDeque<Call>,
    escapes: VecDeque<(Instant, String)>,
    fired: [Option<Instant>; Rule::ALL.len()],
    /// The user's calls so far, from anywhere.
    calls_total: u64,
    /// The networks the user calls from (at most [`USER_NETWORKS`]).
    networks: Vec<SeenNetwork>,
}

/// A network a user calls from, counted in periods of `network_settle_s`.
struct SeenNetwork {
    network: String,
    /// The slot the current period began in.
    period: u64,
    /// The user's calls from this network in the current period.
    calls: u64,
    /// The user's calls from anywhere before the current period began.
    user_calls_before: u64,
    /// The verdict of the last full period: at least [`USUAL_SHARE`] of the
    /// user's calls came from here.
    usual: bool,
    last_seen: u64,
}

impl UserState {
    fn new(slot: u64) -> Self {
        Self {
            slot,
            slots_seen: 0,
            calls: LastMinute::default(),
            cpu: LastMinute::default(),
            written: LastMinute::default(),
            limited_share: 0.0,
            recent: VecDeque::with_capacity(RING),
            escapes: VecDeque::with_capacity(ESCAPES),
            fired: [None; Rule::ALL.len()],
            calls_total: 0,
            networks: Vec::new(),
        }
    }

    fn advance(&mut self, slot: u64) {
        if slot > self.slot {
            self.calls.advance(self.slot, slot);
            self.cpu.advance(self.slot, slot);
            self.written.advance(self.slot, slot);
            self.slots_seen += slot - self.slot;
            self.slot = slot;
        }
    }

    /// Notes the user's call (already in `calls_total`) from `network` in
    /// `slot` and answers whether the network is one of their usual ones,
    /// by the last full period of `settle` slots before this call.
    fn usual_network(&mut self, network: &str, slot: u64, settle: u64) -> bool {
        let before_this = self.calls_total.saturating_sub(1);
        let found = self.networks.iter().position(|seen| seen.network == network);
        let seen = match found {
            Some(i) => &mut self.networks[i],
            None => {
                if self.networks.len() == USER_NETWORKS
                    && let Some(oldest) = (0..self.networks.len()).min_by_key(|i| self.networks[*i].last_seen)
                {
                    self.networks.swap_remove(oldest);
                }
                self.networks.push(SeenNetwork {
                    network: network.to_owned(),
                    period: slot,
                    calls: 0,
                    user_calls_before: before_this,
                    usual: false,
                    last_seen: slot,
                });
                self.networks.last_mut().expect("just pushed")
            }
        };
        if slot >= seen.period + settle {
            // The period ends: its share of the user's calls (those after it
            // ended and before this one too: a verdict that errs toward
            // unusual) is the verdict until the next.
            let user_calls = before_this - seen.user_calls_before;
            if user_calls > 0 {
                seen.usual = seen.calls as f64 >= USUAL_SHARE * user_calls as f64;
            }
            (seen.period, seen.calls, seen.user_calls_before) = (slot, 0, before_this);
        }
        seen.calls += 1;
        seen.last_seen = slot;
        seen.usual
    }

    /// Whether `rule` may fire now (and marks it fired if so).
    fn may_fire(&mut self, rule: Rule, now: Instant, cooldown: Duration) -> bool {
        let slot = &mut self.fired[rule.index()];
        if slot.is_some_and(|at| now.duration_since(at) < cooldown) {
            return false;
        }
        *slot = Some(now);
        true
    }

    fn recent_executions(&self, only_limited: bool, since: Instant) -> Vec<String> {
        self.recent
            .iter()
            .rev()
            .filter(|c| c.at >= since && (!only_limited || c.limit.is_some()))
            .take(EVIDENCE)
            .map(|c| c.execution.clone())
            .collect()
    }
}

#[derive(Default)]
struct ToolState {
    calls: u32,
    crashed: u32,
    executions: Vec<String>,
    fired: bool,
}

#[derive(Default)]
struct Source {
    failures: VecDeque<Instant>,
    fired: Option<Instant>,
    user: Option<String>,
}

/// The analysis: one per server.
pub struct Analyzer {
    thresholds: Thresholds,
    started: Instant,
    users: Mutex<HashMap<String, UserState>>,
    tools: Mutex<HashMap<String, ToolState>>,
    sources: Mutex<HashMap<String, Source>>,
    /// Per network, the users seen calling from it (hashes of their ids),
    /// up to [`SHARED_BY`].
    networks: Mutex<HashMap<String, Vec<u64>>>,
    hasher: std::hash::RandomState,
}

impl Analyzer {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            started: Instant::now(),
            users: Mutex::default(),
            tools: Mutex::default(),
            sources: Mutex::default(),
            networks: Mutex::default(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Notes that `user` calls from `network` and answers whether the
    /// network is shared by [`SHARED_BY`] users or more (and so tells
    /// nothing of who calls).
    fn shared_network(&self, network: &str, user: &str) -> bool {
        use std::hash::BuildHasher;
        let id = self.hasher.hash_one(user);
        let mut networks = self.networks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(users) = networks.get_mut(network) {
            if users.len() < SHARED_BY && !users.contains(&id) {
                users.push(id);
            }
            return users.len() >= SHARED_BY;
        }
        if networks.len() >= MAX_NETWORKS {
            networks.retain(|_, users| users.len() >= SHARED_BY);
            if networks.len() >= MAX_NETWORKS {
                networks.clear();
            }
        }
        networks.insert(network.to_owned(), vec![id]);
        false
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / SLOT.as_secs()
    }

    fn cooldown(&self) -> Duration {
        Duration::from_secs(self.thresholds.cooldown_s)
    }

    /// A finished call: updates the user's and the tool's baselines and
    /// answers what the call completes (most often nothing).
    pub fn observe_call(&self, facts: &CallFacts<'_>, now: Instant) -> Vec<Detection> {
        let t = &self.thresholds;
        let mut found = Vec::new();
        if !t.enabled {
            return found;
        }
        let slot = self.slot(now);
        // Named as `usage.limits_hit` names them, whether the limit stopped
        // the call or the call survived it.
        let limit = match facts.status {
            Status::Timeout => Some("timeout".to_owned()),
            Status::CpuLimit => Some("cpu".to_owned()),
            Status::MemoryLimit => Some("memory".to_owned()),
            Status::PidsLimit => Some("pids".to_owned()),
            _ => facts.limits_hit.first().cloned(),
        };
        let limited = limit.is_some();
        // A shared network tells nothing of who calls: as if unknown.
        let network = facts.network.filter(|n| !self.shared_network(n, facts.user));
        let settle = self.thresholds.network_settle_s.div_ceil(SLOT.as_secs());
        {
            let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
            let user = users.entry(facts.user.to_owned()).or_insert_with(|| UserState::new(slot));
            user.advance(slot);
            // A call that took its time before the lock is counted in the user's current slot.
            let slot = slot.max(user.slot);
            // The share before this call: a burst is judged against the past.
            let share_before = user.limited_share;
            user.limited_share += CALL_WEIGHT * (f64::from(u8::from(limited)) - user.limited_share);
            user.calls.add(slot, 1.0);
            user.calls_total += 1;
            user.cpu.add(slot, facts.cpu_ms);
            user.written.add(slot, facts.bytes_written as f64);
            if user.recent.len() == RING {
                user.recent.pop_front();
            }
            user.recent.push_back(Call { at: now, limit, execution: facts.execution.to_owned() });
            let usual_network = network.map(|n| user.usual_network(n, slot, settle));

            let since = now.checked_sub(WINDOW).unwrap_or(self.started);
            if limited && share_before < NORMAL_LIMITED_SHARE {
                let (mut calls, mut hits) = (0u32, 0u32);
                let mut limits: Vec<String> = Vec::new();
                for c in user.recent.iter().filter(|c| c.at >= since) {
                    calls += 1;
                    if let Some(limit) = &c.limit {
                        hits += 1;
                        if !limits.contains(limit) {
                            limits.push(limit.clone());
                        }
                    }
                }
                // A probe walks the limits; code that loops, retried, hits one.
                if hits >= t.probing_hits
                    && limits.len() >= 2
                    && 2 * hits >= calls
                    && user.may_fire(Rule::LimitProbing, now, self.cooldown())
                {
                    found.push(Detection {
                        rule: Rule::LimitProbing,
                        user: Some(facts.user.to_owned()),
                        tool: Some(facts.tool.to_owned()),
                        evidence: serde_json::json!({
                            "limited_calls": hits,
                            "limits": limits,
                            "calls": calls,
                            "window_s": WINDOW.as_secs(),
                            "usual_limited_share": round(share_before),
                            "executions": user.recent_executions(true, since),
                        }),
                    });
                }
            }
            let warm = user.slots_seen >= WARM_SLOTS;
            let spikes = [
                (Rule::CallRate, &user.calls, f64::from(t.rate_floor_per_min), "calls"),
                (Rule::CpuSpike, &user.cpu, t.cpu_floor_ms_per_min, "cpu_ms"),
                (Rule::WriteSpike, &user.written, t.write_floor_bytes_per_min as f64, "bytes_written"),
            ]
            .map(|(rule, window, floor, what)| {
                (rule, window.sum(), window.average_per_minute(slot, user.slots_seen), floor, what)
            });
            for (rule, last_minute, average, floor, what) in spikes {
                // A burst from the user's usual network is their own work.
                if usual_network == Some(true) && matches!(rule, Rule::CallRate | Rule::WriteSpike) {
                    continue;
                }
                let bar = if warm { floor.max(t.factor * average) } else { floor };
                if last_minute >= bar && user.may_fire(rule, now, self.cooldown()) {
                    found.push(Detection {
                        rule,
                        user: Some(facts.user.to_owned()),
                        tool: Some(facts.tool.to_owned()),
                        evidence: serde_json::json!({
                            "measure": what,
                            "last_minute": round(last_minute),
                            "usual_per_minute": round(average),
                            "minutes_of_history": user.slots_seen / SLOTS,
                            "threshold": round(bar),
                            "network": match (facts.network, usual_network) {
                                (None, _) => "unknown",
                                (Some(_), None) => "shared by several users",
                                (Some(n), Some(_)) => n,
                            },
                            "usual_network": usual_network == Some(true),
                            "executions": user.recent_executions(false, since),
                        }),
                    });
                }
            }
            if facts.signal == Some("SIGSYS") {
                found.extend(self.escape_locked(
                    user,
                    facts.user,
                    format!("{} killed by seccomp (SIGSYS)", facts.tool),
                    now,
                ));
            }
        }
        if let Some(build) = facts.build {
            let mut tools = self.tools.lock().unwrap_or_else(PoisonError::into_inner);
            let key = format!("{}@{build}", facts.tool);
            let tool = tools.entry(key).or_default();
            if !tool.fired && tool.calls < t.crash_calls {
                tool.calls += 1;
                tool.crashed += u32::from(facts.status == Status::Crashed);
                tool.executions.push(facts.execution.to_owned());
                if tool.calls == t.crash_calls && tool.crashed == tool.calls {
                    tool.fired = true;
                    found.push(Detection {
                        rule: Rule::CrashingTool,
                        user: None,
                        tool: Some(facts.tool.to_owned()),
                        evidence: serde_json::json!({
                            "sha256": build,
                            "calls": tool.calls,
                            "crashed": tool.crashed,
                            "executions": std::mem::take(&mut tool.executions),
                        }),
                    });
                } else if tool.crashed < tool.calls {
                    // One call that did not crash: this build is not the rule's.
                    tool.fired = true;
                    tool.executions = Vec::new();
                }
            }
        }
        found
    }

    /// An escape refused outside a call (a files API path, an admin route).
    pub fn observe_escape(&self, user: &str, what: String, now: Instant) -> Option<Detection> {
        if !self.thresholds.enabled {
            return None;
        }
        let slot = self.slot(now);
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let state = users.entry(user.to_owned()).or_insert_with(|| UserState::new(slot));
        self.escape_locked(state, user, what, now)
    }

    fn escape_locked(&self, state: &mut UserState, user: &str, mut what: String, now: Instant) -> Option<Detection> {
        // What a client sent (a path) goes into the evidence: a bounded part of it.
        if what.len() > MAX_WHAT {
            let cut = (0..=MAX_WHAT).rev().find(|i| what.is_char_boundary(*i)).unwrap_or(0);
            what.truncate(cut);
            what.push('…');
        }
        if state.escapes.len() == ESCAPES {
            state.escapes.pop_front();
        }
        state.escapes.push_back((now, what));
        let since = now.checked_sub(ESCAPE_WINDOW).unwrap_or(self.started);
        let within: Vec<&str> = state.escapes.iter().filter(|(at, _)| *at >= since).map(|(_, w)| w.as_str()).collect();
        if within.len() < self.thresholds.escape_attempts as usize {
            return None;
        }
        let evidence = serde_json::json!({
            "attempts": within.len(),
            "window_s": ESCAPE_WINDOW.as_secs(),
            "what": within,
            "executions": state.recent_executions(false, since).into_iter().take(EVIDENCE).collect::<Vec<_>>(),
        });
        state.may_fire(Rule::EscapeAttempts, now, self.cooldown()).then(|| Detection {
            rule: Rule::EscapeAttempts,
            user: Some(user.to_owned()),
            tool: None,
            evidence,
        })
    }

    /// A failed authentication from `source` (a peer address, or `key:<user>`
    /// for a revoked key of `user`).
    pub fn observe_auth_failure(&self, source: &str, user: Option<&str>, now: Instant) -> Option<Detection> {
        if !self.thresholds.enabled {
            return None;
        }
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() >= MAX_SOURCES && !sources.contains_key(source) {
            // Forget the sources with nothing in the window (and, if that is
            // not enough, all of them: a flood from everywhere is not a key).
            let since = now.checked_sub(WINDOW).unwrap_or(self.started);
            sources.retain(|_, s| s.failures.back().is_some_and(|at| *at >= since));
            if sources.len() >= MAX_SOURCES {
                sources.clear();
            }
        }
        let state = sources.entry(source.to_owned()).or_default();
        if let Some(user) = user {
            state.user = Some(user.to_owned());
        }
        let since = now.checked_sub(WINDOW).unwrap_or(self.started);
        while state.failures.front().is_some_and(|at| *at < since) {
            state.failures.pop_front();
        }
        let cap = self.thresholds.auth_failures.max(1) as usize;
        if state.failures.len() == cap {
            state.failures.pop_front();
        }
        state.failures.push_back(now);
        if state.failures.len() < cap || state.fired.is_some_and(|at| now.duration_since(at) < self.cooldown()) {
            return None;
        }
        state.fired = Some(now);
        Some(Detection {
            rule: Rule::AuthFailures,
            user: state.user.clone(),
            tool: None,
            evidence: serde_json::json!({
                "source": source,
                "failures": state.failures.len(),
                "window_s": WINDOW.as_secs(),
            }),
        })
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(user: &'a str, execution: &'a str, status: Status) -> CallFacts<'a> {
        CallFacts {
            user,
            tool: "t",
            build: Some("abc"),
            execution,
            status,
            limits_hit: &[],
            cpu_ms: 1.0,
            bytes_written: 0,
            signal: None,
            network: None,
        }
    }

    fn at(start: Instant, secs: f64) -> Instant {
        start + Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_burst_of_limits_is_probing_and_a_user_who_always_hits_them_is_not() {
        let a = Analyzer::new(Thresholds::default());
        let t0 = Instant::now();
        // 20 ordinary calls over 20 minutes, then 4 limited ones: under the rule.
        for i in 0..20 {
            assert!(
                a.observe_call(&facts("alice", &format!("ok{i}"), Status::Ok), at(t0, 60.0 * f64::from(i))).is_empty()
            );
        }
        for i in 0..4 {
            let f = facts("alice", "x", Status::Timeout);
            assert!(a.observe_call(&f, at(t0, 1200.0 + f64::from(i))).is_empty());
        }
        // The fifth in the same minute fires, once, with the executions.
        let found = a.observe_call(&facts("alice", "x5", Status::CpuLimit), at(t0, 1205.0));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].rule, Rule::LimitProbing);
        assert_eq!(found[0].evidence["limited_calls"], 5);
        assert_eq!(found[0].evidence["executions"][0], "x5");
        assert!(a.observe_call(&facts("alice", "x6", Status::Timeout), at(t0, 1206.0)).is_empty(), "cooldown");

        // Bob's calls are always stopped by a limit (a test suite, a benchmark): his normal.
        let mut fired = 0;
        for i in 0..200 {
            let status = if i % 2 == 0 { Status::Timeout } else { Status::MemoryLimit };
            fired += a.observe_call(&facts("bob", "b", status), at(t0, 5.0 * f64::from(i))).len();
        }
        assert_eq!(fired, 1, "only the first burst, before his share showed it is his normal");

        // Carol's code loops and her agent retries it seven times: one limit, not a probe.
        for i in 0..7 {
            let found = a.observe_call(&facts("carol", "r", Status::Timeout), at(t0, 10.0 * f64::from(i)));
            assert!(found.is_empty(), "{found:?}");
        }
    }

    #[test]
    fn rate_cpu_and_writes_far_above_the_users_own_average_fire() {
        let thresholds = Thresholds { rate_floor_per_min: 50, cpu_floor_ms_per_min: 1000.0, ..Default::default() };
        let a = Analyzer::new(thresholds);
        let t0 = Instant::now();
        // Ten quiet minutes: 3 calls a minute.
        for m in 0..10 {
            for c in 0..3 {
                let found =
                    a.observe_call(&facts("carol", "q", Status::Ok), at(t0, 60.0 * f64::from(m) + f64::from(c)));
                assert!(found.is_empty(), "{found:?}");
            }
        }
        // Then 60 calls in one minute, each 100 ms of CPU.
        let mut rules = Vec::new();
        for c in 0..60 {
            let mut f = facts("carol", "burst", Status::Ok);
            f.cpu_ms = 100.0;
            rules.extend(a.observe_call(&f, at(t0, 600.0 + f64::from(c) * 0.5)).into_iter().map(|d| d.rule));
        }
        assert_eq!(rules, [Rule::CpuSpike, Rule::CallRate]);
    }

    #[test]
    fn a_burst_from_the_users_usual_network_is_their_own_work_and_from_a_new_one_fires() {
        let thresholds = Thresholds {
            rate_floor_per_min: 50,
            write_floor_bytes_per_min: 1 << 20,
            network_settle_s: 600,
            ..Default::default()
        };
        let a = Analyzer::new(thresholds);
        let t0 = Instant::now();
        let call = |user: &'static str, network: &'static str, written: u64, secs: f64| {
            let f = CallFacts { network: Some(network), bytes_written: written, ..facts(user, "e", Status::Ok) };
            a.observe_call(&f, at(t0, secs)).into_iter().map(|d| (d.rule, d.evidence)).collect::<Vec<_>>()
        };
        // Erin calls from her office now and then for twenty minutes.
        for m in 0..20 {
            assert!(call("erin", "198.51.100.0/24", 0, 60.0 * f64::from(m)).is_empty());
        }
        // A new batch job from there: 100 calls writing 100 MiB in a minute.
        for c in 0..100 {
            let found = call("erin", "198.51.100.0/24", 1 << 20, 1200.0 + f64::from(c) * 0.5);
            assert!(found.is_empty(), "a burst from her usual network: {found:?}");
        }
        // Her key from a network she never used: the same burst fires both.
        let mut found = Vec::new();
        for c in 0..100 {
            found.extend(call("erin", "203.0.113.0/24", 1 << 20, 1300.0 + f64::from(c) * 0.5));
        }
        let rules: Vec<Rule> = found.iter().map(|(rule, _)| *rule).collect();
        assert_eq!(rules, [Rule::WriteSpike, Rule::CallRate], "{found:?}");
        assert_eq!(found[1].1["network"], "203.0.113.0/24");
        assert_eq!(found[1].1["usual_network"], false);

        // A thief primes a network with one call, waits a period while Ivan
        // works from his office, then bursts: one call in 121 is not usual.
        assert!(call("ivan", "192.0.2.0/24", 0, 0.0).is_empty());
        for c in 0..120 {
            assert!(call("ivan", "198.51.100.0/24", 0, 1.0 + f64::from(c) * 20.0).is_empty());
        }
        let mut found = Vec::new();
        for c in 0..100 {
            found.extend(call("ivan", "192.0.2.0/24", 0, 2500.0 + f64::from(c) * 0.5));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].0, found[0].1["usual_network"].as_bool()), (Rule::CallRate, Some(false)));

        // A network three users call from (a platform's backend) tells
        // nothing: Frank's burst from it is judged by volume alone.
        for (i, user) in ["frank", "grace", "heidi"].into_iter().enumerate() {
            for m in 0..20 {
                assert!(call(user, "10.1.2.0/24", 0, 60.0 * f64::from(m) + i as f64).is_empty());
            }
        }
        let mut found = Vec::new();
        for c in 0..100 {
            found.extend(call("frank", "10.1.2.0/24", 0, 1500.0 + f64::from(c) * 0.5));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].0, found[0].1["network"].as_str()), (Rule::CallRate, Some("shared by several users")));
    }

    #[test]
    fn a_rate_is_judged_against_ten_times_the_users_own_average_from_five_minutes_on() {
        let a = Analyzer::new(Thresholds { rate_floor_per_min: 50, ..Default::default() });
        let t0 = Instant::now();
        // Ten minutes at 30 calls a minute: the user's normal.
        for i in 0..300 {
            let found = a.observe_call(&facts("dave", "d", Status::Ok), at(t0, f64::from(i) * 2.0));
            assert!(found.is_empty(), "{i}: {found:?}");
        }
        // 250 a minute: under ten times 30.
        for i in 0..250 {
            let found = a.observe_call(&facts("dave", "d", Status::Ok), at(t0, 700.0 + f64::from(i) * 0.24));
            assert!(found.is_empty(), "{i}: {found:?}");
        }
        // Later, 320 in a minute: over ten times the average.
        let mut found = Vec::new();
        for i in 0..320 {
            found.extend(a.observe_call(&facts("dave", "d", Status::Ok), at(t0, 1400.0 + f64::from(i) * 0.18)));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        let usual = found[0].evidence["usual_per_minute"].as_f64().unwrap();
        assert!((15.0..60.0).contains(&usual), "the user's own average, idle minutes counted as zero: {usual}");
    }

    #[test]
    fn a_new_build_whose_every_call_crashes_fires_once_and_one_that_works_never() {
        let a = Analyzer::new(Thresholds::default());
        let t0 = Instant::now();
        let mut fired = Vec::new();
        for i in 0..8 {
            let mut f = facts(if i % 2 == 0 { "u1" } else { "u2" }, "c", Status::Crashed);
            f.tool = "bad";
            fired.extend(a.observe_call(&f, at(t0, f64::from(i))));
        }
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rule, Rule::CrashingTool);
        assert_eq!(fired[0].evidence["executions"].as_array().unwrap().len(), 5);
        let mut works = Vec::new();
        for i in 0..8 {
            let status = if i == 2 { Status::Ok } else { Status::Crashed };
            let mut f = facts("u1", "c", status);
            f.tool = "flaky";
            works.extend(a.observe_call(&f, at(t0, f64::from(i))));
        }
        assert!(works.is_empty(), "{works:?}");
    }

    #[test]
    fn escapes_and_failed_authentications_in_a_burst_fire() {
        let a = Analyzer::new(Thresholds { escape_attempts: 3, ..Default::default() });
        let t0 = Instant::now();
        assert!(a.observe_escape("eve", "files: ../x".into(), t0).is_none());
        assert!(a.observe_escape("eve", "files: /etc".into(), at(t0, 100.0)).is_none());
        // The third, but six minutes after the first: two in the window.
        assert!(a.observe_escape("eve", "admin route".into(), at(t0, 360.0)).is_none());
        let found =
            a.observe_escape("eve", format!("GET /{} with a user's key", "é".repeat(5000)), at(t0, 361.0)).unwrap();
        assert_eq!(found.evidence["attempts"], 3);
        assert!(found.evidence["what"][2].as_str().unwrap().len() <= MAX_WHAT + '…'.len_utf8());
        let mut sys = facts("eve", "e", Status::Crashed);
        sys.signal = Some("SIGSYS");
        assert!(a.observe_call(&sys, at(t0, 362.0)).is_empty(), "cooldown");

        for i in 0..19 {
            assert!(a.observe_auth_failure("10.0.0.1", None, at(t0, f64::from(i))).is_none());
        }
        // Slower than 20 a minute never fires.
        for i in 0..40 {
            assert!(a.observe_auth_failure("10.0.0.2", None, at(t0, 4.0 * f64::from(i))).is_none());
        }
        let found = a.observe_auth_failure("10.0.0.1", Some("mallory"), at(t0, 19.5)).unwrap();
        assert_eq!((found.rule, found.user.as_deref()), (Rule::AuthFailures, Some("mallory")));
    }

    #[test]
    fn nothing_is_found_when_the_analysis_is_off() {
        let a = Analyzer::new(Thresholds { enabled: false, escape_attempts: 1, ..Default::default() });
        assert!(a.observe_escape("eve", "x".into(), Instant::now()).is_none());
    }
}
