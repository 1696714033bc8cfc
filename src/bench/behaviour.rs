//! Behaviour analysis (issue 17): a labelled replay, precision and recall
//! per rule, and the analysis' cost per call.
//!
//! The calls replayed are real: the probe guest is run in-process once per
//! kind of call (an echo, some work, a call stopped by its time or memory
//! limit, a crash, a 1-CPU-second job, a 64 MiB write) and their reports
//! are what the analyzer sees, as `serve` feeds it. The traffic is made
//! around them on a simulated clock (seeded, so every run replays the same
//! hours): interactive agents' sessions with their occasional mistakes
//! (a timeout, a crash, a mistyped key, a retry storm of code that loops),
//! steady batch users, benign bursts (a new batch job, a data export), and scripted
//! incidents, each labelled with its rule and subject: a prober walking
//! the limits, an escape walker, a leaked key hammered from outside (unknown
//! and revoked), a key used far above its owner's rate, a crypto-miner, an
//! exfiltration-style writer, and new tools whose every call crashes (beside
//! a flaky one that does not always). A detection matching an incident's rule
//! and subject within ten minutes of its start is a true positive; every
//! other detection is a false one.
//!
//! Every call comes from a network, as the server sees it: each agent and
//! batch user from one of their own, except one agent in four, whose calls
//! all come through one shared gateway (an agent platform's backend, where
//! the network tells nothing). The benign bursts come from their users' own
//! networks; the leaked key used far above its owner's rate and the
//! exfiltration come from a network new to the user. A burst from a user's
//! usual network is labelled benign: that is what the network lets the
//! analysis tell apart, and an insider's burst from there goes unseen by
//! `call_rate` and `write_spike` by design.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::wasm::Fixture;
use super::{Harness, Suite};
use crate::behaviour::{Analyzer, CallFacts, Rule, Thresholds};
use crate::policy::UserId;
use crate::report::ExecutionReport;
use crate::runner::ToolCall;

/// xorshift64*: a small seeded generator (the replay must be the same every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The real reports the replay is made of.
struct Samples {
    ok: ExecutionReport,
    busy: ExecutionReport,
    timeout: ExecutionReport,
    memory: ExecutionReport,
    crashed: ExecutionReport,
    heavy: ExecutionReport,
    writer: ExecutionReport,
}

enum What {
    Call { user: String, network: String, tool: String, build: String, sample: fn(&Samples) -> &ExecutionReport },
    Escape { user: String },
    AuthFailure { source: String, user: Option<String> },
}

struct Event {
    at: f64,
    what: What,
}

/// An incident: its rule, whom it is about, when it starts (simulated seconds).
struct Incident {
    rule: Rule,
    subject: String,
    at: f64,
}

fn samples(h: &Harness) -> anyhow::Result<(Samples, Duration)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let fx = Fixture::new(&h.scratch.path().join("behaviour-cache"), 8)?;
    let bytes = std::fs::read(h.guests.join("probe.wasm"))?;
    let probe = rt.block_on(fx.sandbox.load(&bytes, "probe"))?;
    let run_in = |tier: &str, input: &str, timeout_ms: Option<u64>| {
        let call = ToolCall {
            user: UserId::new("replay").expect("a valid user id"),
            tier: tier.into(),
            input: input.as_bytes().to_vec(),
            args: vec![],
            timeout: timeout_ms.map(Duration::from_millis),
        };
        rt.block_on(fx.sandbox.run(Ok(&probe), &call))
    };
    let run = |input: &str, timeout_ms: Option<u64>| run_in("premium", input, timeout_ms);
    let s = Samples {
        ok: run(r#"{"op":"echo"}"#, None),
        busy: run(r#"{"op":"work","rounds":2000000}"#, None),
        timeout: run(r#"{"op":"sleep","ms":5000}"#, Some(50)),
        // 300 MiB: past the free tier's 256.
        memory: run_in("free", r#"{"op":"alloc","bytes":314572800}"#, None),
        crashed: run(r#"{"op":"panic"}"#, None),
        heavy: run(r#"{"op":"work","rounds":1500000000}"#, Some(30_000)),
        writer: run(r#"{"op":"fill","path":"/data/out.bin","chunk":1048576,"total":67108864}"#, Some(30_000)),
    };
    for (name, report, status) in [
        ("echo", &s.ok, "ok"),
        ("work", &s.busy, "ok"),
        ("sleep past its timeout", &s.timeout, "timeout"),
        ("alloc past the memory limit", &s.memory, "memory_limit"),
        ("panic", &s.crashed, "crashed"),
        ("a second of work", &s.heavy, "ok"),
        ("a 64 MiB write", &s.writer, "ok"),
    ] {
        anyhow::ensure!(report.status.as_str() == status, "{name}: {:?} {:?}", report.status, report.error);
    }
    let _ = std::fs::remove_file(fx.dirs.path().join("out.bin"));
    Ok((s, trivial_call_p50(&rt, &fx, &probe)))
}

/// The p50 of a trivial call through the runner (the probe's echo): what
/// the analysis' cost is beside, in the same run.
fn trivial_call_p50(rt: &tokio::runtime::Runtime, fx: &Fixture, probe: &crate::engine::Tool) -> Duration {
    let call = ToolCall { input: br#"{"op":"echo"}"#.to_vec(), ..fx.call.clone() };
    let mut times: Vec<Duration> = (0..300)
        .map(|_| {
            let started = Instant::now();
            let report = rt.block_on(fx.sandbox.run(Ok(probe), &call));
            debug_assert_eq!(report.status.as_str(), "ok");
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The traffic and its incidents over `hours` of simulated time.
fn traffic(users: usize, hours: f64, incidents_per_rule: usize) -> (Vec<Event>, Vec<Incident>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let end = hours * 3600.0;
    let mut events = Vec::new();
    // The network a user's calls come from: their own, or the shared
    // gateway for one agent in four.
    let network = |user: &str| match user.strip_prefix("agent").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) if n % 4 == 3 => "10.255.0.0/24".to_owned(),
        Some(n) => format!("10.{}.{}.0/24", n / 250, n % 250),
        None => format!("10.254.{}.0/24", user.len() % 250),
    };
    let call_from = |user: &str, network: String, tool: &str, sample: fn(&Samples) -> &ExecutionReport| What::Call {
        user: user.to_owned(),
        network,
        tool: tool.to_owned(),
        build: format!("{tool}-v1"),
        sample,
    };
    let call =
        |user: &str, tool: &str, sample: fn(&Samples) -> &ExecutionReport| call_from(user, network(user), tool, sample);
    // Interactive agents: a session every 20 minutes on average, 5 to 40
    // calls over 1 to 5 minutes; 1.5 % of calls hit a limit (a loop left
    // running), 0.5 % crash, 5 % do some work; now and then a mistyped key.
    let tools = ["word-stats", "python", "javascript", "fetch-csv", "summarize"];
    for u in 0..users {
        let user = format!("agent{u}");
        let mut t = rng.unit() * 1200.0;
        while t < end {
            let calls = 5 + rng.below(36);
            let span = 60.0 + rng.unit() * 240.0;
            let tool = tools[rng.below(tools.len() as u64) as usize];
            for _ in 0..calls {
                let at = t + rng.unit() * span;
                let roll = rng.unit();
                let sample: fn(&Samples) -> &ExecutionReport = if roll < 0.01 {
                    |s| &s.timeout
                } else if roll < 0.015 {
                    |s| &s.memory
                } else if roll < 0.02 {
                    |s| &s.crashed
                } else if roll < 0.07 {
                    |s| &s.busy
                } else {
                    |s| &s.ok
                };
                events.push(Event { at, what: call(&user, tool, sample) });
            }
            // A retry storm: the agent's code loops, and it tries again 2
            // to 7 times with small changes, each stopped by its timeout.
            if rng.unit() < 0.03 {
                for k in 0..2 + rng.below(6) {
                    events.push(Event { at: t + k as f64 * 10.0, what: call(&user, "python", |s| &s.timeout) });
                }
            }
            if rng.unit() < 0.05 {
                for k in 0..1 + rng.below(3) {
                    let source = format!("198.51.100.{}", u % 250);
                    events.push(Event { at: t + k as f64, what: What::AuthFailure { source, user: None } });
                }
            }
            t += span + rng.unit() * 2400.0;
        }
    }
    // Batch users: steady work all along, 100 to 500 calls a minute.
    for b in 0..(users / 20).max(1) {
        let user = format!("batch{b}");
        let own = format!("10.254.{b}.0/24");
        let per_minute = 100.0 + rng.unit() * 400.0;
        let mut t = 0.0;
        while t < end {
            events.push(Event { at: t, what: call_from(&user, own.clone(), "etl", |s| &s.ok) });
            t += 60.0 / per_minute;
        }
    }
    // Benign bursts from users with a quiet history: a new batch job of 700
    // calls a minute for 20 minutes, and a data export of six 64 MiB files
    // in a minute. Not incidents: what volume alone cannot tell apart.
    for j in 0..(users / 100).max(1) {
        let user = format!("agent{}", (j * 11 + 50) % users);
        let start = 3600.0 + rng.unit() * (end - 4800.0).max(60.0);
        for k in 0..14_000 {
            events.push(Event { at: start + k as f64 * 60.0 / 700.0, what: call(&user, "etl", |s| &s.ok) });
        }
        let user = format!("agent{}", (j * 11 + 55) % users);
        let start = 3600.0 + rng.unit() * (end - 4800.0).max(60.0);
        for k in 0..6 {
            events.push(Event { at: start + k as f64 * 9.0, what: call(&user, "export", |s| &s.writer) });
        }
    }
    // A flaky new tool: 3 of its first 5 calls crash (not every one).
    for (k, crashes) in [true, false, true, false, true, true, false].into_iter().enumerate() {
        let sample: fn(&Samples) -> &ExecutionReport = if crashes { |s| &s.crashed } else { |s| &s.ok };
        events.push(Event { at: 1800.0 + k as f64 * 30.0, what: call("agent0", "flaky-new", sample) });
    }

    let mut incidents = Vec::new();
    // Incidents start after an hour of history, spread over the rest.
    let when = |rng: &mut Rng| 3600.0 + rng.unit() * (end - 4200.0).max(60.0);
    for i in 0..incidents_per_rule {
        // The prober: an agent who walks the limits, 8 calls in a minute.
        let user = format!("agent{}", (i * 7 + 1) % users);
        let at = when(&mut rng);
        for k in 0..8 {
            let sample: fn(&Samples) -> &ExecutionReport = if k % 2 == 0 { |s| &s.timeout } else { |s| &s.memory };
            events.push(Event { at: at + k as f64 * 6.0, what: call(&user, "python", sample) });
        }
        incidents.push(Incident { rule: Rule::LimitProbing, subject: user, at });

        // The escape walker: 6 refused escapes in two minutes.
        let user = format!("agent{}", (i * 7 + 2) % users);
        let at = when(&mut rng);
        for k in 0..6 {
            events.push(Event { at: at + k as f64 * 20.0, what: What::Escape { user: user.clone() } });
        }
        incidents.push(Incident { rule: Rule::EscapeAttempts, subject: user, at });

        // A leaked key hammered from outside: unknown keys from one address,
        // and a revoked key (which names its owner).
        let at = when(&mut rng);
        let source = format!("203.0.113.{i}");
        for k in 0..40 {
            let what = What::AuthFailure { source: source.clone(), user: None };
            events.push(Event { at: at + k as f64 * 1.2, what });
        }
        incidents.push(Incident { rule: Rule::AuthFailures, subject: source, at });
        let owner = format!("agent{}", (i * 7 + 3) % users);
        let at = when(&mut rng);
        for k in 0..25 {
            let what = What::AuthFailure { source: format!("key:{owner}"), user: Some(owner.clone()) };
            events.push(Event { at: at + k as f64 * 2.0, what });
        }
        incidents.push(Incident { rule: Rule::AuthFailures, subject: format!("key:{owner}"), at });

        // A leaked key used far above its owner's rate, from elsewhere:
        // 1,500 calls in a minute.
        let user = format!("agent{}", (i * 7 + 4) % users);
        let at = when(&mut rng);
        let elsewhere = format!("203.0.{}.0/24", i % 250);
        for k in 0..1500 {
            let what = call_from(&user, elsewhere.clone(), "word-stats", |s| &s.ok);
            events.push(Event { at: at + k as f64 * 0.04, what });
        }
        incidents.push(Incident { rule: Rule::CallRate, subject: user, at });

        // A crypto-miner: 120 calls of a CPU-second each in a minute.
        let user = format!("agent{}", (i * 7 + 5) % users);
        let at = when(&mut rng);
        for k in 0..120 {
            events.push(Event { at: at + k as f64 * 0.5, what: call(&user, "python", |s| &s.heavy) });
        }
        incidents.push(Incident { rule: Rule::CpuSpike, subject: user, at });

        // An exfiltration-style writer with a stolen key: eight 64 MiB
        // writes in a minute, from elsewhere.
        let user = format!("agent{}", (i * 7 + 6) % users);
        let at = when(&mut rng);
        for k in 0..8 {
            let what = call_from(&user, format!("198.18.{}.0/24", i % 250), "python", |s| &s.writer);
            events.push(Event { at: at + k as f64 * 7.0, what });
        }
        incidents.push(Incident { rule: Rule::WriteSpike, subject: user, at });

        // A new tool whose every call crashes, called by several agents.
        let tool = format!("broken{i}");
        let at = when(&mut rng);
        for k in 0..6 {
            let user = format!("agent{}", (i + k * 3) % users);
            events.push(Event { at: at + k as f64 * 40.0, what: call(&user, &tool, |s| &s.crashed) });
        }
        incidents.push(Incident { rule: Rule::CrashingTool, subject: tool, at });
    }
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    (events, incidents)
}

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let (s, trivial) = samples(h)?;
    let (users, hours, per_rule) = h.size.pick((400, 6.0, 10), (100, 3.0, 5), (30, 1.5, 2));
    let (events, incidents) = traffic(users, hours, per_rule);
    let analyzer = Analyzer::new(Thresholds::default());
    let t0 = Instant::now();
    let mut found = Vec::new();
    let (mut calls, mut in_calls) = (0u64, Duration::ZERO);
    for event in &events {
        let now = t0 + Duration::from_secs_f64(event.at);
        match &event.what {
            What::Call { user, network, tool, build, sample } => {
                let report = sample(&s);
                let facts =
                    CallFacts { user, tool, build: Some(build), network: Some(network), ..CallFacts::of(report) };
                let started = Instant::now();
                let detected = analyzer.observe_call(&facts, now);
                in_calls += started.elapsed();
                calls += 1;
                found.extend(detected.into_iter().map(|d| (event.at, d)));
            }
            What::Escape { user } => {
                found.extend(analyzer.observe_escape(user, "files API: `..`".into(), now).map(|d| (event.at, d)));
            }
            What::AuthFailure { source, user } => {
                found.extend(analyzer.observe_auth_failure(source, user.as_deref(), now).map(|d| (event.at, d)));
            }
        }
    }

    // Score: per rule, detections matched to an incident, and incidents found.
    let subject = |d: &crate::behaviour::Detection| match d.rule {
        Rule::CrashingTool => d.tool.clone().unwrap_or_default(),
        Rule::AuthFailures => d.evidence["source"].as_str().unwrap_or_default().to_owned(),
        _ => d.user.clone().unwrap_or_default(),
    };
    let mut table: BTreeMap<&str, (u64, u64, u64, u64)> = BTreeMap::new(); // tp, fp, incidents, found
    for rule in Rule::ALL {
        table.insert(rule.as_str(), (0, 0, 0, 0));
    }
    let matches = |i: &Incident, at: f64, d: &crate::behaviour::Detection| {
        i.rule == d.rule && i.subject == subject(d) && at >= i.at && at <= i.at + 600.0
    };
    for (at, d) in &found {
        let row = table.get_mut(d.rule.as_str()).expect("every rule has a row");
        if incidents.iter().any(|i| matches(i, *at, d)) {
            row.0 += 1;
        } else {
            row.1 += 1;
        }
    }
    for i in &incidents {
        let row = table.get_mut(i.rule.as_str()).expect("every rule has a row");
        row.2 += 1;
        if found.iter().any(|(at, d)| matches(i, *at, d)) {
            row.3 += 1;
        }
    }
    let label = format!("{users} agents, {} batch users, {hours} h, {} events", (users / 20).max(1), events.len());
    h.figure(Suite::Behaviour, format!("replay ({label}): calls"), calls as f64, "calls", "");
    let (mut tp_all, mut fp_all, mut inc_all, mut found_all) = (0, 0, 0, 0);
    for (rule, (tp, fp, inc, hit)) in &table {
        let precision = if tp + fp == 0 { 1.0 } else { *tp as f64 / (tp + fp) as f64 };
        let recall = if *inc == 0 { 1.0 } else { *hit as f64 / *inc as f64 };
        let note = format!("{tp} true, {fp} false detections; {hit} of {inc} incidents found");
        h.figure(Suite::Behaviour, format!("{rule}: precision"), precision * 100.0, "%", &note);
        h.figure(Suite::Behaviour, format!("{rule}: recall"), recall * 100.0, "%", "");
        (tp_all, fp_all, inc_all, found_all) = (tp_all + tp, fp_all + fp, inc_all + inc, found_all + hit);
    }
    let precision = tp_all as f64 / (tp_all + fp_all).max(1) as f64;
    h.figure(
        Suite::Behaviour,
        "all rules: precision",
        precision * 100.0,
        "%",
        &format!("{tp_all} true, {fp_all} false"),
    );
    h.figure(Suite::Behaviour, "all rules: recall", found_all as f64 / inc_all.max(1) as f64 * 100.0, "%", "");
    let per_call = in_calls.as_secs_f64() / calls.max(1) as f64;
    h.figure(
        Suite::Behaviour,
        format!("analysis per call (observe_call, {} users' baselines)", users + (users / 20).max(1)),
        per_call * 1e9,
        "ns",
        "mean over the replay's calls, timed one by one",
    );
    // The same calls again on a fresh analysis that is told no network:
    // what knowing the network costs, in the same run.
    let blind = Analyzer::new(Thresholds::default());
    let mut in_blind = Duration::ZERO;
    for event in &events {
        if let What::Call { user, tool, build, sample, .. } = &event.what {
            let facts = CallFacts { user, tool, build: Some(build), ..CallFacts::of(sample(&s)) };
            let now = t0 + Duration::from_secs_f64(event.at);
            let started = Instant::now();
            std::hint::black_box(blind.observe_call(&facts, now));
            in_blind += started.elapsed();
        }
    }
    h.figure(
        Suite::Behaviour,
        "analysis per call, the same calls with no network known",
        in_blind.as_secs_f64() / calls.max(1) as f64 * 1e9,
        "ns",
        "a second pass, fresh baselines",
    );
    let rollup = rollup_cost(h, &s);
    metrics_cost(h, &s);
    h.figure(
        Suite::Behaviour,
        "a trivial call through the runner (the probe's echo), p50, same run",
        trivial.as_secs_f64() * 1e6,
        "µs",
        &format!("analysis and rollup add {:.1} %", (per_call + rollup) / trivial.as_secs_f64() * 100.0),
    );
    Ok(())
}

/// What a call's usage rollup costs (the other per-call addition), in seconds.
fn rollup_cost(h: &mut Harness, s: &Samples) -> f64 {
    let rollup = crate::api::stats::Rollup::default();
    let mut reports: Vec<ExecutionReport> = (0..1000).map(|_| s.ok.clone()).collect();
    for (i, r) in reports.iter_mut().enumerate() {
        r.user = format!("user{i}");
    }
    let n = h.size.pick(1_000_000, 200_000, 20_000);
    let started = Instant::now();
    for i in 0..n {
        rollup.call(&reports[i % reports.len()]);
    }
    let per_call = started.elapsed().as_secs_f64() / n as f64;
    h.figure(Suite::Behaviour, "usage rollup per call (1,000 users)", per_call * 1e9, "ns", "");
    per_call
}

/// What recording a call in the Prometheus metrics costs, and rendering
/// `/metrics` with 40 tools × 3 tiers × 4 statuses of series.
fn metrics_cost(h: &mut Harness, s: &Samples) {
    let metrics = crate::api::Metrics::default();
    let statuses = [crate::report::Status::Ok, crate::report::Status::Timeout, crate::report::Status::Crashed];
    let mut reports: Vec<ExecutionReport> = Vec::new();
    for tool in 0..40 {
        for tier in ["free", "standard", "premium"] {
            for status in statuses {
                let mut r = s.ok.clone();
                (r.tool, r.tier, r.status) = (format!("tool{tool}"), tier.to_owned(), status);
                reports.push(r);
            }
        }
    }
    let n = h.size.pick(1_000_000, 200_000, 20_000);
    let started = Instant::now();
    for i in 0..n {
        metrics.call(&reports[i % reports.len()], 0.001);
    }
    let per_call = started.elapsed().as_secs_f64() / n as f64;
    h.figure(Suite::Behaviour, "metrics: a call recorded", per_call * 1e9, "ns", "40 tools × 3 tiers × 3 statuses");
    let shared = crate::api::metrics::SharedGauges {
        memory_budget_bytes: 1 << 34,
        memory_in_use_bytes: 1 << 20,
        memory_peak_bytes: 1 << 22,
        descriptors_max: 15_000,
        descriptors_in_use: 3,
        data_volumes_mounted: None,
        sessions_open: 0,
        sessions_memory_bytes: 0,
    };
    let scrapes = h.size.pick(2_000, 500, 100);
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..scrapes {
        let now = crate::api::metrics::Now {
            active_calls: 1,
            pool_capacity: 64,
            shared,
            warm: &[],
            tools_unloadable: 0,
            report_bytes: None,
        };
        bytes += metrics.render(&now).len();
    }
    let per_scrape = started.elapsed().as_secs_f64() / f64::from(scrapes);
    let note = format!("{} bytes of text", bytes / scrapes as usize);
    h.figure(Suite::Behaviour, "metrics: /metrics rendered", per_scrape * 1e6, "µs", &note);
}
