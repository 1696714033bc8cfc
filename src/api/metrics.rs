//! Counters and histograms for `GET /metrics`, in the Prometheus text format.
//! Kept by hand: a handful of families, a lock each, no registry crate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::report::ExecutionReport;

/// A histogram with fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    fn observe(&self, v: f64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            s.0[i] += 1;
        }
        s.1 += v;
        s.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&s.0) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", s.2, s.1, s.2);
    }
}

/// Counters keyed by label values.
struct Family<const N: usize> {
    labels: [&'static str; N],
    values: Mutex<BTreeMap<[String; N], u64>>,
}

impl<const N: usize> Family<N> {
    fn new(labels: [&'static str; N]) -> Self {
        Self { labels, values: Mutex::default() }
    }

    fn inc(&self, values: [&str; N]) {
        let key = values.map(escape);
        *self.values.lock().unwrap_or_else(PoisonError::into_inner).entry(key).or_default() += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (values, n) in self.values.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            let labels: Vec<String> = self.labels.iter().zip(values).map(|(l, v)| format!("{l}=\"{v}\"")).collect();
            let _ = writeln!(out, "{name}{{{}}} {n}", labels.join(","));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

const LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const FUEL: &[f64] = &[1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11];
const MEMORY: &[f64] = &[65536.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 268435456.0, 536870912.0, 1073741824.0];

pub struct Metrics {
    calls: Family<3>,
    limits_hit: Family<1>,
    rejections: Family<1>,
    alerts: Family<1>,
    sessions_closed: Family<1>,
    backups: Family<1>,
    anomalies: Family<1>,
    responses: Family<1>,
    webhook: Family<1>,
    webhook_attempts: AtomicU64,
    sessions_opened: AtomicU64,
    executions_pruned: AtomicU64,
    auth_failures: AtomicU64,
    request_seconds: Histogram,
    wall_seconds: Histogram,
    fuel: Histogram,
    memory: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            calls: Family::new(["tool", "tier", "status"]),
            limits_hit: Family::new(["limit"]),
            rejections: Family::new(["reason"]),
            alerts: Family::new(["rule"]),
            sessions_closed: Family::new(["reason"]),
            backups: Family::new(["outcome"]),
            anomalies: Family::new(["rule"]),
            responses: Family::new(["action"]),
            webhook: Family::new(["outcome"]),
            webhook_attempts: AtomicU64::new(0),
            sessions_opened: AtomicU64::new(0),
            executions_pruned: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            request_seconds: Histogram::new(LATENCY),
            wall_seconds: Histogram::new(LATENCY),
            fuel: Histogram::new(FUEL),
            memory: Histogram::new(MEMORY),
        }
    }
}

impl Metrics {
    /// One finished call: its report, and how long the whole request took.
    pub fn call(&self, report: &ExecutionReport, request_seconds: f64) {
        self.calls.inc([&report.tool, &report.tier, report.status.as_str()]);
        for limit in &report.usage.limits_hit {
            self.limits_hit.inc([limit]);
        }
        self.request_seconds.observe(request_seconds);
        self.wall_seconds.observe(report.usage.wall_ms / 1e3);
        if let Some(fuel) = report.usage.fuel_consumed {
            self.fuel.observe(fuel as f64);
        }
        if let Some(memory) = report.usage.peak_memory_bytes {
            self.memory.observe(memory as f64);
        }
    }

    pub fn rejection(&self, reason: &str) {
        self.rejections.inc([reason]);
    }

    pub fn alert(&self, rule: &str) {
        self.alerts.inc([rule]);
    }

    /// A behaviour rule's detection.
    pub fn anomaly(&self, rule: &str) {
        self.anomalies.inc([rule]);
    }

    /// A response taken: alert, throttle, suspend.
    pub fn response(&self, action: &str) {
        self.responses.inc([action]);
    }

    /// A webhook event's fate (delivered, failed, dropped) after `attempts`.
    pub fn webhook(&self, outcome: &str, attempts: u32) {
        self.webhook.inc([outcome]);
        self.webhook_attempts.fetch_add(u64::from(attempts), Ordering::Relaxed);
    }

    pub fn session_opened(&self) {
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self, reason: &str) {
        self.sessions_closed.inc([reason]);
    }

    pub fn backup(&self, outcome: &str) {
        self.backups.inc([outcome]);
    }

    pub fn executions_pruned(&self, n: u64) {
        self.executions_pruned.fetch_add(n, Ordering::Relaxed);
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, active_calls: u32, pool_capacity: u32, shared: &SharedGauges) -> String {
        let mut out = String::with_capacity(8192);
        self.calls.render(&mut out, "imagentx_calls_total", "Tool calls finished, by tool, tier and status.");
        self.request_seconds.render(
            &mut out,
            "imagentx_request_duration_seconds",
            "Invoke requests, from arrival to answer (recording included).",
        );
        self.wall_seconds.render(&mut out, "imagentx_call_wall_seconds", "Wall time of tool calls in the sandbox.");
        self.fuel.render(&mut out, "imagentx_call_fuel", "Fuel consumed by WASM tool calls.");
        self.memory.render(&mut out, "imagentx_call_peak_memory_bytes", "Peak linear memory of WASM tool calls.");
        self.rejections.render(&mut out, "imagentx_admission_rejections_total", "Requests turned away with 429.");
        self.limits_hit.render(
            &mut out,
            "imagentx_limits_hit_total",
            "Calls that ran into a limit (usage.limits_hit), whether or not they survived it, by limit.",
        );
        self.alerts.render(&mut out, "imagentx_alerts_total", "Alert rules fired, by rule.");
        self.sessions_closed.render(&mut out, "imagentx_sessions_closed_total", "Code sessions closed, by reason.");
        self.backups.render(&mut out, "imagentx_backups_total", "Scheduled backups taken, by outcome (ok, failed).");
        self.anomalies.render(&mut out, "imagentx_anomalies_total", "Behaviour rules' detections, by rule.");
        self.responses.render(
            &mut out,
            "imagentx_responses_total",
            "Automatic responses taken, by action (alert, throttle, suspend).",
        );
        self.webhook.render(
            &mut out,
            "imagentx_webhook_events_total",
            "Alert webhook events, by outcome (delivered, failed after retries, dropped from a full queue).",
        );
        let _ = writeln!(
            out,
            "# HELP imagentx_webhook_attempts_total POSTs made to the alert webhook, retries included.\n\
             # TYPE imagentx_webhook_attempts_total counter\nimagentx_webhook_attempts_total {}",
            self.webhook_attempts.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP imagentx_sessions_opened_total Code sessions opened.\n\
             # TYPE imagentx_sessions_opened_total counter\nimagentx_sessions_opened_total {}",
            self.sessions_opened.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP imagentx_executions_pruned_total Executions deleted by the [retention] limits.\n\
             # TYPE imagentx_executions_pruned_total counter\nimagentx_executions_pruned_total {}",
            self.executions_pruned.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP imagentx_auth_failures_total Requests with no key or a bad key.\n\
             # TYPE imagentx_auth_failures_total counter\nimagentx_auth_failures_total {}",
            self.auth_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP imagentx_active_calls Tool calls running now.\n# TYPE imagentx_active_calls gauge\n\
             imagentx_active_calls {active_calls}\n\
             # HELP imagentx_pool_capacity Calls the instance pool admits at once.\n\
             # TYPE imagentx_pool_capacity gauge\nimagentx_pool_capacity {pool_capacity}\n\
             # HELP imagentx_pool_occupancy Share of the instance pool in use.\n\
             # TYPE imagentx_pool_occupancy gauge\nimagentx_pool_occupancy {}",
            f64::from(active_calls) / f64::from(pool_capacity.max(1))
        );
        for (name, help, value) in [
            (
                "imagentx_guest_memory_budget_bytes",
                "Memory that all calls in flight may hold together.",
                shared.memory_budget_bytes,
            ),
            ("imagentx_guest_memory_bytes", "Memory the calls in flight hold now.", shared.memory_in_use_bytes),
            (
                "imagentx_guest_memory_peak_bytes",
                "The most memory the calls in flight held at once since start.",
                shared.memory_peak_bytes,
            ),
            (
                "imagentx_guest_descriptors_max",
                "Host descriptors that WASM calls may hold together (the process limit less the server's reserve).",
                shared.descriptors_max,
            ),
            (
                "imagentx_guest_descriptors",
                "Host descriptors the WASM calls in flight hold now.",
                shared.descriptors_in_use,
            ),
            ("imagentx_sessions_open", "Code sessions open now.", shared.sessions_open),
            (
                "imagentx_sessions_memory_bytes",
                "Linear memory that open code sessions' instances hold (part of imagentx_guest_memory_bytes).",
                shared.sessions_memory_bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        if let Some(mounted) = shared.data_volumes_mounted {
            let _ = writeln!(
                out,
                "# HELP imagentx_data_volumes_mounted Users' data volumes mounted now.\n\
                 # TYPE imagentx_data_volumes_mounted gauge\nimagentx_data_volumes_mounted {mounted}"
            );
        }
        out
    }
}

/// What all calls share, read when `/metrics` is scraped.
#[derive(Debug, Clone, Copy)]
pub struct SharedGauges {
    pub memory_budget_bytes: u64,
    pub memory_in_use_bytes: u64,
    pub memory_peak_bytes: u64,
    pub descriptors_max: u64,
    pub descriptors_in_use: u64,
    /// `None` without volumes.
    pub data_volumes_mounted: Option<u64>,
    pub sessions_open: u64,
    pub sessions_memory_bytes: u64,
}

impl SharedGauges {
    pub fn of(sandbox: &crate::runner::Sandbox) -> Self {
        let (memory, descriptors) = (sandbox.engine.guest_memory(), sandbox.engine.guest_descriptors());
        Self {
            memory_budget_bytes: memory.budget_bytes(),
            memory_in_use_bytes: memory.in_use_bytes(),
            memory_peak_bytes: memory.peak_bytes(),
            descriptors_max: descriptors.max(),
            descriptors_in_use: descriptors.in_use(),
            data_volumes_mounted: sandbox.data_dir.volumes().map(|v| v.mounted() as u64),
            sessions_open: 0,
            sessions_memory_bytes: 0,
        }
    }
}

/// The warm jails' lines of `/metrics`, per tool (the families are there,
/// empty, on a server without warm jails: rules and dashboards find them).
pub fn render_warm(out: &mut String, pools: &[Arc<crate::jail::WarmPool>]) {
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(out, "imagentx_warm_jails", "gauge", "Warm jails waiting for a call, by tool and state (ready, warming).");
    for pool in pools {
        let (ready, warming, _) = pool.counts();
        let tool = pool.tool();
        let _ = writeln!(out, "imagentx_warm_jails{{tool=\"{tool}\",state=\"ready\"}} {ready}");
        let _ = writeln!(out, "imagentx_warm_jails{{tool=\"{tool}\",state=\"warming\"}} {warming}");
    }
    head(
        out,
        "imagentx_warm_memory_bytes",
        "gauge",
        "Memory the ready warm jails held when they became ready, by tool.",
    );
    for pool in pools {
        let _ = writeln!(out, "imagentx_warm_memory_bytes{{tool=\"{}\"}} {}", pool.tool(), pool.counts().2);
    }
    head(
        out,
        "imagentx_warm_calls_total",
        "counter",
        "Calls of tools with warm jails, by tool and how they ran (warm, fresh: no warm jail could take them).",
    );
    for pool in pools {
        let tool = pool.tool();
        let stats = &pool.stats;
        let _ = writeln!(
            out,
            "imagentx_warm_calls_total{{tool=\"{tool}\",ran=\"warm\"}} {}",
            stats.served.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "imagentx_warm_calls_total{{tool=\"{tool}\",ran=\"fresh\"}} {}",
            stats.missed.load(Ordering::Relaxed)
        );
    }
    head(out, "imagentx_warm_started_total", "counter", "Warm jails started, by tool (each serves one call at most).");
    for pool in pools {
        let started = pool.stats.started.load(Ordering::Relaxed);
        let _ = writeln!(out, "imagentx_warm_started_total{{tool=\"{}\"}} {started}", pool.tool());
    }
    head(out, "imagentx_warm_failures_total", "counter", "Warm jails that ended before their call, by tool.");
    for pool in pools {
        let _ = writeln!(
            out,
            "imagentx_warm_failures_total{{tool=\"{}\"}} {}",
            pool.tool(),
            pool.stats.failed.load(Ordering::Relaxed)
        );
    }
}
