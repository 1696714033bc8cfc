//! The service's Prometheus metrics, on tikv's `prometheus` crate: counters
//! and histograms kept as calls finish in a registry of the server's own (so
//! several servers can share a process, as the tests do), and gauges read
//! when `/metrics` is scraped; the crate's encoder writes the text format
//! 0.0.4, which every Prometheus scrapes and `promtool check metrics` checks.
//!
//! Why this crate: `prometheus-client` writes OpenMetrics, whose counter
//! families (`# TYPE x counter` over `x_total` samples) `promtool check
//! metrics` 2.42 refuses; `metrics-exporter-prometheus` installs a global
//! recorder, one per process. Label values known in advance (rules, reasons,
//! outcomes) are made at zero, so their series exist before the first event.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::report::ExecutionReport;

/// The content type of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

const LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const FUEL: &[f64] = &[1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11];
const MEMORY: &[f64] = &[65536.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 268435456.0, 536870912.0, 1073741824.0];

/// Alert rules a server can fire (`imagentx_alerts_total{rule}`).
const ALERT_RULES: &[&str] = &[
    "memory_over_80_percent",
    "cpu_over_90_percent",
    "processes_over_40",
    "writes_over_1_gib",
    "host_memory_over_80_percent",
    "tool_unloadable",
    "backup_failed",
    "database_restored",
    "webhook_failed",
];

pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    limits_hit: IntCounterVec,
    rejections: IntCounterVec,
    alerts: IntCounterVec,
    sessions_closed: IntCounterVec,
    backups: IntCounterVec,
    anomalies: IntCounterVec,
    responses: IntCounterVec,
    webhook: IntCounterVec,
    webhook_attempts: IntCounter,
    sessions_opened: IntCounter,
    executions_pruned: IntCounter,
    auth_failures: IntCounter,
    connections_refused: IntCounter,
    request_seconds: Histogram,
    wall_seconds: Histogram,
    fuel: Histogram,
    memory: Histogram,
}

/// Registers `metric` in `registry`. The names are ours and each is
/// registered once per registry, so a failure is a programming error.
fn registered<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        panic!("a metric registered twice or misnamed: {e}");
    }
    metric
}

/// A counter family by `labels`, with the series of `known` values at zero.
fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str], known: &[&str]) -> IntCounterVec {
    let family = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is misdeclared: {e}"));
    for value in known {
        family.with_label_values(&[value]);
    }
    registered(registry, family)
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name} is misdeclared: {e}"));
    registered(registry, counter)
}

fn histogram(registry: &Registry, name: &str, help: &str, bounds: &[f64]) -> Histogram {
    let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(bounds.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name} is misdeclared: {e}"));
    registered(registry, histogram)
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let rules: Vec<&str> = crate::behaviour::Rule::ALL.iter().map(|r| r.as_str()).collect();
        Self {
            calls: counters(
                &r,
                "imagentx_calls_total",
                "Tool calls finished, by tool, tier and status.",
                &["tool", "tier", "status"],
                &[],
            ),
            limits_hit: counters(
                &r,
                "imagentx_limits_hit_total",
                "Calls that ran into a limit (usage.limits_hit), whether or not they survived it, by limit.",
                &["limit"],
                &["memory", "host_memory", "user_memory", "table", "pids", "data_quota", "data_files"],
            ),
            rejections: counters(
                &r,
                "imagentx_admission_rejections_total",
                "Requests turned away with 429.",
                &["reason"],
                &["rate", "user_concurrency", "server_busy", "user_memory", "user_sessions"],
            ),
            alerts: counters(&r, "imagentx_alerts_total", "Alert rules fired, by rule.", &["rule"], ALERT_RULES),
            sessions_closed: counters(
                &r,
                "imagentx_sessions_closed_total",
                "Code sessions closed, by reason.",
                &["reason"],
                &["user", "idle", "lifetime", "shutdown", "mcp_session_ended", "tool_retired"],
            ),
            backups: counters(
                &r,
                "imagentx_backups_total",
                "Scheduled backups taken, by outcome (ok, failed).",
                &["outcome"],
                &["ok", "failed"],
            ),
            anomalies: counters(
                &r,
                "imagentx_anomalies_total",
                "Behaviour rules' detections, by rule.",
                &["rule"],
                &rules,
            ),
            responses: counters(
                &r,
                "imagentx_responses_total",
                "Automatic responses taken, by action (alert, throttle, suspend).",
                &["action"],
                &["alert", "throttle", "suspend"],
            ),
            webhook: counters(
                &r,
                "imagentx_webhook_events_total",
                "Alert webhook events, by outcome (delivered, failed after retries, dropped from a full queue).",
                &["outcome"],
                &["delivered", "failed", "dropped"],
            ),
            webhook_attempts: counter(
                &r,
                "imagentx_webhook_attempts_total",
                "POSTs made to the alert webhook, retries included.",
            ),
            sessions_opened: counter(&r, "imagentx_sessions_opened_total", "Code sessions opened."),
            executions_pruned: counter(
                &r,
                "imagentx_executions_pruned_total",
                "Executions deleted by the [retention] limits.",
            ),
            auth_failures: counter(&r, "imagentx_auth_failures_total", "Requests with no key or a bad key."),
            connections_refused: counter(
                &r,
                "imagentx_connections_refused_total",
                "Connections answered 503 and closed because the server had no descriptor left.",
            ),
            request_seconds: histogram(
                &r,
                "imagentx_request_duration_seconds",
                "Invoke requests, from arrival to answer (recording included).",
                LATENCY,
            ),
            wall_seconds: histogram(
                &r,
                "imagentx_call_wall_seconds",
                "Wall time of tool calls in the sandbox.",
                LATENCY,
            ),
            fuel: histogram(&r, "imagentx_call_fuel", "Fuel consumed by WASM tool calls.", FUEL),
            memory: histogram(&r, "imagentx_call_peak_memory_bytes", "Peak linear memory of WASM tool calls.", MEMORY),
            registry: r,
        }
    }
}

/// What `/metrics` reads at the moment it is scraped.
pub struct Now<'a> {
    pub active_calls: u32,
    pub pool_capacity: u32,
    pub shared: SharedGauges,
    pub warm: &'a [Arc<crate::jail::WarmPool>],
    pub tools_unloadable: usize,
    /// The stored reports' bytes (what `[retention] max_bytes` bounds).
    pub report_bytes: Option<u64>,
}

impl Metrics {
    /// One finished call: its report, and how long the whole request took.
    pub fn call(&self, report: &ExecutionReport, request_seconds: f64) {
        self.calls.with_label_values(&[report.tool.as_str(), report.tier.as_str(), report.status.as_str()]).inc();
        for limit in &report.usage.limits_hit {
            self.limits_hit.with_label_values(&[limit.as_str()]).inc();
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
        self.rejections.with_label_values(&[reason]).inc();
    }

    pub fn alert(&self, rule: &str) {
        self.alerts.with_label_values(&[rule]).inc();
    }

    /// A behaviour rule's detection.
    pub fn anomaly(&self, rule: &str) {
        self.anomalies.with_label_values(&[rule]).inc();
    }

    /// A response taken: alert, throttle, suspend.
    pub fn response(&self, action: &str) {
        self.responses.with_label_values(&[action]).inc();
    }

    /// A webhook event's fate (delivered, failed, dropped) after `attempts`.
    pub fn webhook(&self, outcome: &str, attempts: u32) {
        self.webhook.with_label_values(&[outcome]).inc();
        self.webhook_attempts.inc_by(u64::from(attempts));
    }

    pub fn session_opened(&self) {
        self.sessions_opened.inc();
    }

    pub fn session_closed(&self, reason: &str) {
        self.sessions_closed.with_label_values(&[reason]).inc();
    }

    pub fn backup(&self, outcome: &str) {
        self.backups.with_label_values(&[outcome]).inc();
    }

    pub fn executions_pruned(&self, n: u64) {
        self.executions_pruned.inc_by(n);
    }

    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The text exposition: the registry's families and the gauges read now,
    /// sorted by name.
    pub fn render(&self, now: &Now<'_>) -> String {
        let mut families = self.registry.gather();
        families.extend(now.families());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut text = String::with_capacity(16 << 10);
        if let Err(e) = TextEncoder::new().encode_utf8(&families, &mut text) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        text
    }
}

/// One series: its labels and value.
type Sample = (Vec<(&'static str, String)>, f64);

/// A family of values read at scrape time; `None` without a sample (the
/// format has no empty family).
fn family(name: &str, help: &str, kind: MetricType, samples: Vec<Sample>) -> Option<MetricFamily> {
    if samples.is_empty() {
        return None;
    }
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(
        samples
            .into_iter()
            .map(|(mut labels, value)| {
                // In name order, as the registry's own families have them.
                labels.sort_unstable();
                let mut metric = proto::Metric::from_label(
                    labels
                        .into_iter()
                        .map(|(name, value)| {
                            let mut pair = proto::LabelPair::default();
                            pair.set_name(name.to_owned());
                            pair.set_value(value);
                            pair
                        })
                        .collect(),
                );
                if kind == MetricType::COUNTER {
                    let mut counter = proto::Counter::default();
                    counter.set_value(value);
                    metric.set_counter(counter);
                } else {
                    let mut gauge = proto::Gauge::default();
                    gauge.set_value(value);
                    metric.set_gauge(gauge);
                }
                metric
            })
            .collect(),
    );
    Some(family)
}

impl Now<'_> {
    fn families(&self) -> Vec<MetricFamily> {
        let gauge = |name, help, value: f64| family(name, help, MetricType::GAUGE, vec![(Vec::new(), value)]);
        let s = &self.shared;
        let mut out = vec![
            gauge("imagentx_active_calls", "Tool calls running now.", f64::from(self.active_calls)),
            gauge("imagentx_pool_capacity", "Calls the instance pool admits at once.", f64::from(self.pool_capacity)),
            gauge(
                "imagentx_pool_occupancy",
                "Share of the instance pool in use.",
                f64::from(self.active_calls) / f64::from(self.pool_capacity.max(1)),
            ),
            gauge(
                "imagentx_guest_memory_budget_bytes",
                "Memory that all calls in flight may hold together.",
                s.memory_budget_bytes as f64,
            ),
            gauge("imagentx_guest_memory_bytes", "Memory the calls in flight hold now.", s.memory_in_use_bytes as f64),
            gauge(
                "imagentx_guest_memory_peak_bytes",
                "The most memory the calls in flight held at once since start.",
                s.memory_peak_bytes as f64,
            ),
            gauge(
                "imagentx_guest_descriptors_max",
                "Host descriptors that WASM calls may hold together (the process limit less the server's reserve).",
                s.descriptors_max as f64,
            ),
            gauge(
                "imagentx_guest_descriptors",
                "Host descriptors the WASM calls in flight hold now.",
                s.descriptors_in_use as f64,
            ),
            gauge("imagentx_sessions_open", "Code sessions open now.", s.sessions_open as f64),
            gauge(
                "imagentx_sessions_memory_bytes",
                "Linear memory that open code sessions' instances hold (part of imagentx_guest_memory_bytes).",
                s.sessions_memory_bytes as f64,
            ),
            gauge(
                "imagentx_tools_unloadable",
                "Registered tools that could not be loaded at start (a module missing or damaged).",
                self.tools_unloadable as f64,
            ),
            self.report_bytes.and_then(|bytes| {
                gauge(
                    "imagentx_execution_report_bytes",
                    "Bytes of the execution reports stored now (bounded by [retention] max_bytes).",
                    bytes as f64,
                )
            }),
            s.data_volumes_mounted.and_then(|mounted| {
                gauge("imagentx_data_volumes_mounted", "Users' data volumes mounted now.", mounted as f64)
            }),
        ];
        out.extend(self.warm_families());
        out.into_iter().flatten().collect()
    }

    /// The warm jails' families, per tool (none on a server without warm jails).
    fn warm_families(&self) -> Vec<Option<MetricFamily>> {
        let per_tool = |value: &dyn Fn(&crate::jail::WarmPool) -> f64| -> Vec<Sample> {
            self.warm.iter().map(|p| (vec![("tool", p.tool().to_owned())], value(p))).collect()
        };
        let count = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed) as f64;
        let jails = self
            .warm
            .iter()
            .flat_map(|p| {
                let (ready, warming, _) = p.counts();
                [("ready", ready), ("warming", warming)]
                    .map(|(state, n)| (vec![("tool", p.tool().to_owned()), ("state", state.to_owned())], n as f64))
            })
            .collect();
        let calls = self
            .warm
            .iter()
            .flat_map(|p| {
                [("warm", &p.stats.served), ("fresh", &p.stats.missed)]
                    .map(|(ran, n)| (vec![("tool", p.tool().to_owned()), ("ran", ran.to_owned())], count(n)))
            })
            .collect();
        vec![
            family(
                "imagentx_warm_jails",
                "Warm jails waiting for a call, by tool and state (ready, warming).",
                MetricType::GAUGE,
                jails,
            ),
            family(
                "imagentx_warm_memory_bytes",
                "Memory the ready warm jails held when they became ready, by tool.",
                MetricType::GAUGE,
                per_tool(&|p| p.counts().2 as f64),
            ),
            family(
                "imagentx_warm_calls_total",
                "Calls of tools with warm jails, by tool and how they ran (warm, fresh: no warm jail could take them).",
                MetricType::COUNTER,
                calls,
            ),
            family(
                "imagentx_warm_started_total",
                "Warm jails started, by tool (each serves one call at most).",
                MetricType::COUNTER,
                per_tool(&|p| count(&p.stats.started)),
            ),
            family(
                "imagentx_warm_failures_total",
                "Warm jails that ended before their call, by tool.",
                MetricType::COUNTER,
                per_tool(&|p| count(&p.stats.failed)),
            ),
        ]
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
