//! Usage trends: every finished call and every security event is added to
//! an in-memory minute rollup (O(1)), written to the database every few
//! seconds (and before `GET /v1/stats` answers, so it is never behind), and
//! compacted from minutes into hours after a day (`crate::store::rollups`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::Deserialize;

use super::auth::Admin;
use super::{ApiError, AppState};
use crate::policy::UserId;
use crate::report::{ExecutionReport, Status};
use crate::store::rollups::{HOUR, Key, MINUTE, Row, Totals};
use crate::store::{unix_now, unix_rfc3339};

/// The tool of security events' rows: a name no tool can have (tool names
/// are never empty).
const SECURITY: &str = "";

/// How often the minute rollups are written.
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How often minutes older than a day are compacted into hours.
const COMPACT_EVERY: Duration = Duration::from_secs(600);

/// Rows not yet written.
#[derive(Default)]
pub struct Rollup {
    pending: Mutex<HashMap<Key, Totals>>,
}

impl Rollup {
    fn add(&self, key: Key, f: impl FnOnce(&mut Totals)) {
        f(self.pending.lock().unwrap_or_else(PoisonError::into_inner).entry(key).or_default());
    }

    /// A finished call.
    pub fn call(&self, report: &ExecutionReport) {
        let key = Key {
            bucket: minute(unix_now()),
            user: report.user.clone(),
            tool: report.tool.clone(),
            tier: report.tier.clone(),
            status: report.status.as_str().to_owned(),
        };
        let stopped =
            matches!(report.status, Status::Timeout | Status::CpuLimit | Status::MemoryLimit | Status::PidsLimit);
        self.add(key, |t| {
            t.calls += 1;
            t.limit_hits += u64::from(stopped || !report.usage.limits_hit.is_empty());
            t.bytes_written += report.usage.bytes_written.unwrap_or(0);
            if let Some(cpu) = report.usage.cpu_ms {
                t.cpu.add(cpu * 1e3);
                t.cpu_ms_sum += cpu;
            }
            if let Some(memory) = report.usage.peak_memory_bytes {
                t.memory.add(memory as f64 / 1024.0);
            }
        });
    }

    /// A security event (`auth_failure`, `denied`, `anomaly`, `escape`) about `user`
    /// (`-` when nobody could be named).
    pub fn security_event(&self, user: Option<&str>, tier: &str, kind: &str) {
        let key = Key {
            bucket: minute(unix_now()),
            user: user.unwrap_or("-").to_owned(),
            tool: SECURITY.to_owned(),
            tier: tier.to_owned(),
            status: kind.to_owned(),
        };
        self.add(key, |t| t.security_events += 1);
    }

    /// Writes what is pending (put back if the write fails).
    pub async fn flush(&self, store: &crate::store::Store) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if pending.is_empty() {
            return;
        }
        if let Err(e) = store.add_rollups(pending.clone()).await {
            tracing::error!(error = %e, "usage rollups could not be written; kept for the next try");
            let mut now = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, totals) in pending {
                now.entry(key).or_default().merge(&totals);
            }
        }
    }
}

fn minute(unix: i64) -> i64 {
    unix - unix.rem_euclid(MINUTE)
}

/// Writes the rollups every few seconds and compacts old minutes (aborted
/// when the server stops, which then writes what is left).
pub(super) async fn keep(state: Arc<AppState>) {
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut compact = tokio::time::interval(COMPACT_EVERY);
    loop {
        tokio::select! {
            _ = flush.tick() => state.rollup.flush(&state.store).await,
            _ = compact.tick() => {
                loop {
                    match state.store.compact_rollups(unix_now(), 5000).await {
                        Ok(5000) => tokio::task::yield_now().await,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "usage rollups could not be compacted");
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    window: Option<String>,
    by: Option<String>,
    user: Option<String>,
}

/// Percentiles of a measure.
#[derive(Debug, Default, serde::Serialize, schemars::JsonSchema)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// What a group (or the whole window) did.
#[derive(Debug, Default, serde::Serialize, schemars::JsonSchema)]
pub struct Figures {
    pub calls: u64,
    /// Calls whose status is not `ok`.
    pub errors: u64,
    pub by_status: BTreeMap<String, u64>,
    /// Calls stopped by a limit or that ran into one.
    pub limit_hits: u64,
    pub cpu_ms: Percentiles,
    pub cpu_ms_total: f64,
    pub peak_memory_bytes: Percentiles,
    pub bytes_written: u64,
    /// Failed authentications, refusals (403, 429) and anomalies.
    pub security_events: u64,
    pub security_by_kind: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Sum {
    totals: Totals,
    by_status: BTreeMap<String, u64>,
    security_by_kind: BTreeMap<String, u64>,
}

impl Sum {
    fn add(&mut self, key: &Key, totals: &Totals) {
        self.totals.merge(totals);
        if key.tool == SECURITY {
            *self.security_by_kind.entry(key.status.clone()).or_default() += totals.security_events;
        } else {
            *self.by_status.entry(key.status.clone()).or_default() += totals.calls;
        }
    }

    fn figures(&self) -> Figures {
        let t = &self.totals;
        let percentiles = |h: &crate::store::rollups::Histogram, scale: f64| Percentiles {
            p50: h.quantile(0.5).map(|v| v * scale),
            p95: h.quantile(0.95).map(|v| v * scale),
            p99: h.quantile(0.99).map(|v| v * scale),
        };
        Figures {
            calls: t.calls,
            errors: t.calls - self.by_status.get("ok").copied().unwrap_or(0),
            by_status: self.by_status.clone(),
            limit_hits: t.limit_hits,
            cpu_ms: percentiles(&t.cpu, 1e-3),
            cpu_ms_total: (t.cpu_ms_sum * 1000.0).round() / 1000.0,
            peak_memory_bytes: percentiles(&t.memory, 1024.0),
            bytes_written: t.bytes_written,
            security_events: t.security_events,
            security_by_kind: self.security_by_kind.clone(),
        }
    }
}

/// One group of the window.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Group {
    /// The user, tool, status or tier.
    pub key: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Calls and errors in one step of the window.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Point {
    /// RFC 3339: the step's start.
    pub at: String,
    pub calls: u64,
    pub errors: u64,
    pub security_events: u64,
}

/// `GET /v1/stats`.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Stats {
    pub window: String,
    pub by: String,
    /// The one user summed, when `?user=` asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// RFC 3339.
    pub from: String,
    pub to: String,
    pub totals: Figures,
    /// The 100 groups with the most calls (then security events), most first.
    pub groups: Vec<Group>,
    /// Per minute for `1h`, per hour for `24h` and `7d`, oldest first.
    pub series: Vec<Point>,
}

const WINDOWS: [(&str, i64, i64); 3] = [("1h", HOUR, MINUTE), ("24h", 24 * HOUR, HOUR), ("7d", 7 * 24 * HOUR, HOUR)];
const BYS: [&str; 4] = ["user", "tool", "status", "tier"];
const MAX_GROUPS: usize = 100;

pub async fn stats(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Stats>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let window = q.window.unwrap_or_else(|| "24h".to_owned());
    let Some(&(_, length, step)) = WINDOWS.iter().find(|(name, _, _)| *name == window) else {
        return Err(ApiError::bad_request("bad_query", format!("window must be one of 1h, 24h, 7d (not `{window}`)")));
    };
    let by = q.by.unwrap_or_else(|| "tool".to_owned());
    if !BYS.contains(&by.as_str()) {
        return Err(ApiError::bad_request(
            "bad_query",
            format!("by must be one of user, tool, status, tier (not `{by}`)"),
        ));
    }
    if let Some(Err(e)) = q.user.as_deref().map(UserId::new) {
        return Err(ApiError::bad_request("bad_query", e.to_string()));
    }
    state.rollup.flush(&state.store).await;
    let now = unix_now();
    // Whole steps: the window starts at the beginning of its first step.
    let from = (now - length) - (now - length).rem_euclid(step) + step;
    let rows = state.store.rollups_since(from).await?;
    // Summing a week of rows takes a while: off the async threads.
    let (span, user) = ((window, length, step), q.user);
    tokio::task::spawn_blocking(move || summarize(rows, span, (from, now), by, user.as_deref()))
        .await
        .map_err(|e| ApiError::internal("summing the rollups", &e))?
        .map(Json)
}

/// The window `(name, length, step)` from `from` to `now`, summed by `by`,
/// of one user's `rows` or everyone's.
fn summarize(
    rows: Vec<Row>,
    (window, length, step): (String, i64, i64),
    (from, now): (i64, i64),
    by: String,
    user: Option<&str>,
) -> Result<Stats, ApiError> {
    let mut totals = Sum::default();
    let mut groups: HashMap<String, Sum> = HashMap::new();
    let mut series: BTreeMap<i64, (u64, u64, u64)> = (0..length / step).map(|i| (from + i * step, (0, 0, 0))).collect();
    for row in rows {
        // A row counts where its minute or hour starts: one that began before the window is out.
        if row.key.bucket < from || user.is_some_and(|u| row.key.user != u) {
            continue;
        }
        totals.add(&row.key, &row.totals);
        let group = match by.as_str() {
            "user" => &row.key.user,
            "tool" => &row.key.tool,
            "status" => &row.key.status,
            _ => &row.key.tier,
        };
        // Security events belong to users (and to tier `-`: a refusal's tier
        // is not looked up), not to a tool or a status.
        if row.key.tool != SECURITY || by == "user" || by == "tier" {
            groups.entry(group.clone()).or_default().add(&row.key, &row.totals);
        }
        let point = series.entry(row.key.bucket - (row.key.bucket - from).rem_euclid(step)).or_default();
        point.0 += row.totals.calls;
        if row.key.status != "ok" && row.key.tool != SECURITY {
            point.1 += row.totals.calls;
        }
        point.2 += row.totals.security_events;
    }
    let mut groups: Vec<Group> = groups.into_iter().map(|(key, sum)| Group { key, figures: sum.figures() }).collect();
    groups.sort_by(|a, b| {
        (b.figures.calls, b.figures.security_events)
            .cmp(&(a.figures.calls, a.figures.security_events))
            .then(a.key.cmp(&b.key))
    });
    groups.truncate(MAX_GROUPS);
    Ok(Stats {
        window,
        by,
        user: user.map(str::to_owned),
        from: unix_rfc3339(from),
        to: unix_rfc3339(now),
        totals: totals.figures(),
        groups,
        series: series
            .into_iter()
            .map(|(at, (calls, errors, security_events))| Point {
                at: unix_rfc3339(at),
                calls,
                errors,
                security_events,
            })
            .collect(),
    })
}
