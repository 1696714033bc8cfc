//! Code sessions: a step in a warm session beside the same snippet in a
//! fresh interpreter (in-process, then over HTTP against the real server),
//! a 1 MB CSV loaded once and grouped at every step beside loading and
//! grouping it fresh each call, and what an idle session holds (linear
//! memory charged, and this process's RSS growth) with sessions per GiB.

use std::time::Instant;

use bytes::Bytes;
use hyper::{Method, StatusCode};

use super::wasm::{Fixture, SNIPPETS, sales_csv};
use super::{Harness, Series, Suite, Who, peak_rss, reset_peak, rss, sequential};
use crate::engine::Tool;
use crate::report::Status;
use crate::runner::{CodeSession, ToolCall};

const GIB: f64 = (1u64 << 30) as f64;

/// Per language: a step that sets a variable, one that prints it, loading
/// the CSV into the session, grouping what was loaded, and both at once.
struct Steps {
    set: &'static str,
    print: &'static str,
    load: &'static str,
    group: &'static str,
}

const PYTHON: Steps = Steps {
    set: "x = 1",
    print: "print(x)",
    load: "import csv, collections\nrows = list(csv.DictReader(open('/data/sales.csv')))",
    group: "totals = collections.Counter()\nfor r in rows: totals[r['region']] += int(r['amount'])\n\
            totals.most_common(3)",
};

const JAVASCRIPT: Steps = Steps {
    set: "var x = 1",
    print: "console.log(x)",
    load: "const rows = require('fs').readFileSync('/data/sales.csv', 'utf8').split('\\n').slice(1)\n\
           .filter(Boolean).map((l) => l.split(','))",
    group: "const totals = {};\nfor (const [, region, amount] of rows) totals[region] = (totals[region] ?? 0) + Number(amount);\n\
            Object.entries(totals).sort((a, b) => b[1] - a[1]).slice(0, 3)",
};

fn steps(name: &str) -> &'static Steps {
    if name == "python" { &PYTHON } else { &JAVASCRIPT }
}

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    if matches!(h.size, super::Size::Tiny) {
        h.skip("the session rows: not in --tiny runs (loading the interpreters compiles 40 MB of components)");
        return Ok(());
    }
    let rt = super::runtime()?;
    let cache = h.scratch.path().join("sessions-cache");
    let fx = Fixture::new(&cache, 256)?;
    let user_dir = fx.sandbox.data_dir.user_dir(&fx.call.user)?;
    std::fs::write(user_dir.join("sales.csv"), sales_csv(1 << 20))?;
    for (name, label, _) in SNIPPETS {
        let path = h.interpreters.join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&path) else {
            h.skip(format!("the {label} session rows: no {} (`scripts/build-interpreters`)", path.display()));
            continue;
        };
        let tool = rt.block_on(fx.sandbox.load(&bytes, name))?;
        in_process(h, &rt, &fx, &tool, label, steps(name))?;
        idle_memory(h, &rt, &fx, &tool, label)?;
    }
    rt.block_on(over_http(h))
}

fn open(rt: &tokio::runtime::Runtime, fx: &Fixture, tool: &Tool) -> anyhow::Result<CodeSession> {
    rt.block_on(fx.sandbox.open_session(tool, &fx.call.user, &fx.call.tier, None))
        .map_err(|(status, message)| anyhow::anyhow!("opening a session: {}: {message}", status.as_str()))
}

fn code_call(fx: &Fixture, code: &str) -> ToolCall {
    ToolCall { input: serde_json::json!({ "code": code }).to_string().into_bytes(), ..fx.call.clone() }
}

/// Steps in one warm session, each beside the same work in a fresh
/// interpreter, and the ratios.
fn in_process(
    h: &mut Harness,
    rt: &tokio::runtime::Runtime,
    fx: &Fixture,
    tool: &Tool,
    label: &str,
    steps: &Steps,
) -> anyhow::Result<()> {
    let n = h.size.pick(2_000, 300, 5);
    let mut session = open(rt, fx, tool)?;
    let never = tokio_util::sync::CancellationToken::new();
    let pid = std::process::id();
    for code in [steps.set, steps.print] {
        let step_case = format!("{label} session: step `{code}`, warm, in-process");
        let fresh_case = format!("{label}: `{code}` in a fresh interpreter, in-process");
        let call = code_call(fx, code);
        // The fresh call has no `x`: it sets one first when it prints it.
        let fresh_call = code_call(fx, &format!("{}\n{code}", steps.set));
        reset_peak(pid);
        let (samples, elapsed) = rt.block_on(sequential(&step_case, 20, n, async || {
            fx.sandbox.step(&mut session, &call, &never).await.status == Status::Ok
        }));
        h.push(
            Series { samples, elapsed, ..Series::new(Suite::Sessions, &step_case, Who::Ours, 1) }
                .memory(peak_rss(pid), "bench process"),
        );
        let (samples, elapsed) = rt.block_on(sequential(&fresh_case, 20, n.min(500), async || {
            fx.sandbox.run(Ok(tool), &fresh_call).await.status == Status::Ok
        }));
        h.push(Series { samples, elapsed, ..Series::new(Suite::Sessions, &fresh_case, Who::Peer, 1) });
        h.ratio(Suite::Sessions, &step_case, &fresh_case, 1);
    }
    // The CSV: loaded once into the session, then every step only groups.
    let load = rt.block_on(fx.sandbox.step(&mut session, &code_call(fx, steps.load), &never));
    anyhow::ensure!(load.status == Status::Ok, "loading the CSV in a session: {:?}", load.error);
    let runs = h.size.pick(100, 20, 2);
    let group_case = format!("{label} session: group the 1 MB CSV loaded in an earlier step");
    let fresh_case = format!("{label}: load and group the 1 MB CSV, fresh interpreter each call");
    let group = code_call(fx, steps.group);
    let both = code_call(fx, &format!("{}\n{}", steps.load, steps.group));
    let (samples, elapsed) = rt.block_on(sequential(&group_case, 3, runs, async || {
        fx.sandbox.step(&mut session, &group, &never).await.status == Status::Ok
    }));
    h.push(Series { samples, elapsed, ..Series::new(Suite::Sessions, &group_case, Who::Ours, 1) });
    let (samples, elapsed) = rt.block_on(sequential(&fresh_case, 3, runs, async || {
        fx.sandbox.run(Ok(tool), &both).await.status == Status::Ok
    }));
    h.push(Series { samples, elapsed, ..Series::new(Suite::Sessions, &fresh_case, Who::Peer, 1) });
    h.ratio(Suite::Sessions, &group_case, &fresh_case, 1);
    h.figure(
        Suite::Sessions,
        format!("{label} session holding the 1 MB CSV: linear memory"),
        session.memory_bytes() as f64 / f64::from(1 << 20),
        "MiB",
        "charged to the host's memory pool while the session lives",
    );
    Ok(())
}

/// Idle sessions held at once: linear memory each (what is charged to the
/// pool), and this process's RSS growth each (what the host pays).
fn idle_memory(
    h: &mut Harness,
    rt: &tokio::runtime::Runtime,
    fx: &Fixture,
    tool: &Tool,
    label: &str,
) -> anyhow::Result<()> {
    let n = h.size.pick(100, 50, 4);
    let pid = std::process::id();
    let before = rss(pid).unwrap_or(0);
    let mut sessions = Vec::with_capacity(n);
    let never = tokio_util::sync::CancellationToken::new();
    let set = code_call(fx, if label == "Python" { PYTHON.set } else { JAVASCRIPT.set });
    for _ in 0..n {
        let mut session = open(rt, fx, tool)?;
        // One step each: a session that has run code, then sits idle.
        rt.block_on(fx.sandbox.step(&mut session, &set, &never));
        sessions.push(session);
    }
    let grown = rss(pid).unwrap_or(0).saturating_sub(before);
    let linear: u64 = sessions.iter().map(CodeSession::memory_bytes).sum::<u64>() / n as u64;
    h.figure(
        Suite::Sessions,
        format!("{label} idle session: linear memory charged"),
        linear as f64 / f64::from(1 << 20),
        "MiB",
        &format!("each, {n} open at once"),
    );
    if grown > 0 {
        let each = grown as f64 / n as f64;
        h.figure(
            Suite::Sessions,
            format!("{label} idle session: resident memory"),
            each / f64::from(1 << 20),
            "MiB",
            &format!("growth of this process's RSS over {n} open at once, each after one step"),
        );
        h.figure(Suite::Sessions, format!("{label} idle sessions per GiB (resident)"), GIB / each, "per GiB", "");
    }
    h.figure(
        Suite::Sessions,
        format!("{label} idle sessions per GiB (charged)"),
        GIB / linear.max(1) as f64,
        "per GiB",
        "what the memory pool admits",
    );
    drop(sessions);
    Ok(())
}

/// The same steps over HTTP against the real server, beside one-shot calls.
async fn over_http(h: &mut Harness) -> anyhow::Result<()> {
    let dir = h.scratch.path().join("sessions-http");
    std::fs::create_dir_all(&dir)?;
    let interpreters = h.interpreters.clone();
    let (server, _admin, key) = super::http::start(&dir, Some(&interpreters))?;
    let mut sender = super::http::connect(&server.addr).await?;
    let n = h.size.pick(1_000, 200, 3);
    for (name, label, _) in SNIPPETS {
        let steps = steps(name);
        let opened = serde_json::json!({"tool": name}).to_string();
        let (status, body) = super::http::send(&mut sender, Method::POST, "/v1/sessions", &key, opened.into()).await?;
        if status != StatusCode::CREATED {
            h.skip(format!("{label} sessions over HTTP: {status} {}", String::from_utf8_lossy(&body)));
            continue;
        }
        let id = serde_json::from_slice::<serde_json::Value>(&body)?["id"].as_str().unwrap_or_default().to_owned();
        let step_path = format!("/v1/sessions/{id}/run");
        let call_path = format!("/v1/tools/{name}/invoke");
        let step_body = Bytes::from(serde_json::json!({"code": steps.set}).to_string());
        let call_body = Bytes::from(serde_json::json!({"input": {"code": steps.set}}).to_string());
        let step_case = format!("{label} session over HTTP: step `{}`, keep-alive", steps.set);
        let call_case = format!("{label} over HTTP: `{}` one-shot (fresh interpreter), keep-alive", steps.set);
        for (case, who, path, body) in
            [(&step_case, Who::Ours, &step_path, &step_body), (&call_case, Who::Peer, &call_path, &call_body)]
        {
            for _ in 0..20 {
                super::http::send(&mut sender, Method::POST, path, &key, body.clone()).await?;
            }
            let started = Instant::now();
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let answer = super::http::send(&mut sender, Method::POST, path, &key, body.clone()).await;
                let ok = matches!(&answer, Ok((StatusCode::OK, b)) if b.windows(13).any(|w| w == br#""status":"ok""#));
                samples.push(super::Sample { latency: t.elapsed(), ok });
            }
            h.push(Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Sessions, case, who, 1) });
        }
        h.ratio(Suite::Sessions, &step_case, &call_case, 1);
        super::http::send(&mut sender, Method::DELETE, &format!("/v1/sessions/{id}"), &key, Bytes::new()).await?;
    }
    drop(server);
    Ok(())
}
