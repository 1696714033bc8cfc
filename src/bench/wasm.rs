//! The WASM runtime in-process (what the server does per call: a fresh
//! store and instance with fuel, epochs and the memory limiter on), the
//! costs around it (a restart, a cold compile, 1,000 calls in flight), and
//! one-shot processes: our CLI beside the `wasmtime` CLI and fork/exec.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use super::{
    Harness, Sample, Series, Suite, Who, path_str, peak_rss, process_series, reset_peak, run_process, sequential,
};
use crate::data_dir::DataDir;
use crate::engine::{Engine, EngineConfig, Invocation, Tool};
use crate::policy::{Limits, Policy, UserId};
use crate::quota::Budget;
use crate::report::Status;
use crate::runner::{Sandbox, ToolCall};

pub const SDK_CALL: &str = "SDK tool call (engine: new store + instance + call)";
pub const COMMAND_CALL: &str = "command tool call (engine)";
pub const RUNNER_CALL: &str = "SDK tool call, whole runner (policy, dirs, report)";
const ONESHOT_OURS: &str = "imagentx-sandbox run (artifact cached)";
const ONESHOT_WASMTIME: &str = "wasmtime run --allow-precompiled";
const ONESHOT_FLOOR: &str = "fork/exec /bin/true";

/// The inputs of the in-process cases.
pub const SDK_INPUT: &str = r#"{"op":"echo","text":"hi"}"#;
pub const COMMAND_INPUT: &str = r#"{"op":"echo"}"#;

/// What an in-process call needs, owned.
pub struct Fixture {
    pub engine: Engine,
    pub config: EngineConfig,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub dirs: tempfile::TempDir,
    pub sandbox: Sandbox,
    pub call: ToolCall,
}

impl Fixture {
    pub fn new(cache_dir: &Path, max_instances: u32) -> anyhow::Result<Self> {
        let mut config = EngineConfig::new(cache_dir.to_owned(), 1 << 30);
        config.max_instances = max_instances;
        let engine = Engine::new(&config)?;
        let policy = Policy::default();
        let limits = policy.resolve("standard", None)?;
        let dirs = tempfile::tempdir()?;
        let data = DataDir::open(dirs.path().join("state"))?;
        let sandbox = Sandbox { policy, engine: engine.clone(), data_dir: data };
        let call = ToolCall {
            user: UserId::new("bench")?,
            tier: "standard".into(),
            input: SDK_INPUT.as_bytes().to_vec(),
            args: vec![],
            timeout: None,
        };
        Ok(Self { engine, config, limits, env: BTreeMap::new(), dirs, sandbox, call })
    }

    pub fn invocation<'a>(&'a self, input: &'a str, limits: &'a Limits) -> Invocation<'a> {
        Invocation {
            input,
            args: &[],
            env: &self.env,
            data_dir: self.dirs.path(),
            data_writable: true,
            data_budget: Budget::empty(limits.data_quota_bytes, limits.data_files),
            scratch_dir: self.dirs.path(),
            limits,
            owner: "bench",
        }
    }

    /// The policy's limits for a tier and budget.
    pub fn policy_limits(&self, tier: &str, timeout: std::time::Duration) -> anyhow::Result<Limits> {
        Ok(self.sandbox.policy.resolve(tier, Some(timeout))?)
    }

    /// One engine call; true when it answered `ok`.
    pub async fn call(&self, tool: &Tool, input: &str) -> bool {
        self.engine.call(tool, self.invocation(input, &self.limits)).await.is_ok_and(|o| o.status == Status::Ok)
    }

    /// One call through the whole runner.
    pub async fn run(&self, tool: &Tool) -> bool {
        self.sandbox.run(Ok(tool), &self.call).await.status == Status::Ok
    }
}

pub fn run(h: &mut Harness, instructions: bool) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let pid = std::process::id();
    let cache = h.scratch.path().join("wasm-cache");
    let (_, sdk_wasm) = super::guest(h, "sdk_probe")?;
    let (probe_path, cmd_wasm) = super::guest(h, "probe")?;
    let fx = Fixture::new(&cache, 1000)?;
    let (sdk, cmd) = rt.block_on(async {
        anyhow::Ok((
            fx.engine.load(&sdk_wasm, usize::MAX, "sdk").await?,
            fx.engine.load(&cmd_wasm, usize::MAX, "cmd").await?,
        ))
    })?;
    let n = h.size.pick(10_000, 2_000, 20);
    let warmup = n.min(200);
    for (case, tool, input) in [(SDK_CALL, &sdk, SDK_INPUT), (COMMAND_CALL, &cmd, COMMAND_INPUT)] {
        reset_peak(pid);
        let (samples, elapsed) = rt.block_on(sequential(case, warmup, n, async || fx.call(tool, input).await));
        h.push(
            Series { samples, elapsed, ..Series::new(Suite::Wasm, case, Who::Ours, 1) }
                .memory(peak_rss(pid), "bench process"),
        );
    }
    reset_peak(pid);
    let (samples, elapsed) = rt.block_on(sequential(RUNNER_CALL, warmup, n, async || fx.run(&sdk).await));
    h.push(
        Series { samples, elapsed, ..Series::new(Suite::Wasm, RUNNER_CALL, Who::Ours, 1) }
            .memory(peak_rss(pid), "bench process"),
    );

    // A restart: a new engine (pool, linkers, ticker), timed apart; then the
    // tool loaded from its precompiled artifact (read, deserialize, link,
    // `describe`) and its first call, which is what DESIGN's goal is about.
    let reps = h.size.pick(50, 10, 2);
    let mut engine_new =
        Series::new(Suite::Wasm, "restart: Engine::new (pool of 1,000 slots, linkers, ticker)", Who::Ours, 1);
    let mut restart = Series::new(Suite::Wasm, "restart: load precompiled SDK tool + first call", Who::Ours, 1);
    rt.block_on(async {
        for _ in 0..reps {
            let t = Instant::now();
            let fresh = Engine::new(&fx.config);
            engine_new.samples.push(Sample { latency: t.elapsed(), ok: fresh.is_ok() });
            let Ok(fresh) = fresh else { continue };
            let t = Instant::now();
            let ok = match fresh.load(&sdk_wasm, usize::MAX, "sdk").await {
                Ok(tool) => {
                    let inv = fx.invocation(SDK_INPUT, &fx.limits);
                    tool.loaded_from_cache() && fresh.call(&tool, inv).await.is_ok_and(|o| o.status == Status::Ok)
                }
                Err(_) => false,
            };
            restart.samples.push(Sample { latency: t.elapsed(), ok });
        }
    });
    // One after the other: each series' throughput is one at a time.
    engine_new.elapsed = engine_new.samples.iter().map(|s| s.latency).sum();
    restart.elapsed = restart.samples.iter().map(|s| s.latency).sum();
    h.push(restart);
    h.push(engine_new);

    // A tool never seen before: compiled, cached, described.
    let mut compile = Series::new(Suite::Wasm, "cold compile of a new SDK tool (368 KB) + describe", Who::Ours, 1);
    let started = Instant::now();
    rt.block_on(async {
        for _ in 0..h.size.pick(10, 3, 1) {
            let Ok(empty) = tempfile::tempdir() else { continue };
            let config = EngineConfig { cache_dir: empty.path().to_owned(), ..fx.config.clone() };
            let t = Instant::now();
            let ok = match Engine::new(&config) {
                Ok(cold) => cold.load(&sdk_wasm, usize::MAX, "sdk").await.is_ok_and(|tool| !tool.loaded_from_cache()),
                Err(_) => false,
            };
            compile.samples.push(Sample { latency: t.elapsed(), ok });
        }
    });
    compile.elapsed = started.elapsed();
    h.push(compile);

    // The fuel rate: fuel one core burns per second of guest CPU, which
    // turns a tier's CPU share into a fuel budget.
    let rounds = h.size.pick(200_000_000u64, 50_000_000, 2_000_000);
    let input = format!(r#"{{"op":"work","rounds":{rounds}}}"#);
    let outcome = rt.block_on(fx.engine.call(&cmd, fx.invocation(&input, &fx.limits)))?;
    if let (Some(fuel), Some(cpu)) = (outcome.fuel_consumed, outcome.cpu_time) {
        let note = format!(
            "{fuel} fuel in {:.0} ms of guest CPU; the policy's default is {:.1e}",
            cpu.as_secs_f64() * 1e3,
            crate::policy::DEFAULT_FUEL_PER_CPU_SECOND as f64
        );
        h.figure(
            Suite::Wasm,
            "fuel burnt per CPU-second (a tight integer loop)",
            fuel as f64 / cpu.as_secs_f64(),
            "fuel/s",
            &note,
        );
    }

    in_flight(h, &rt, &fx, cmd)?;
    drop(sdk);
    super::shared::run(h, &rt, &fx.config, &cmd_wasm, &sdk_wasm)?;

    interpreters(h, &rt, &fx)?;
    one_shot(h, &probe_path)?;
    if instructions {
        super::count::run(h, &cache)?;
    }
    Ok(())
}

/// `n` calls of `tool` started at once, each timed on its own; `expected`
/// says which statuses count as answered as planned. Call inside a runtime.
pub fn start_calls(
    engine: &Engine,
    tool: &Arc<Tool>,
    limits: &Limits,
    dir: &Path,
    input: &'static str,
    n: usize,
    expected: &'static [Status],
) -> tokio::task::JoinSet<Sample> {
    let dir: Arc<Path> = dir.into();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (engine, tool, limits, dir) = (engine.clone(), tool.clone(), limits.clone(), dir.clone());
        set.spawn(async move {
            let env = BTreeMap::new();
            let inv = Invocation {
                input,
                args: &[],
                env: &env,
                data_dir: &dir,
                data_writable: true,
                data_budget: Budget::empty(limits.data_quota_bytes, limits.data_files),
                scratch_dir: &dir,
                limits: &limits,
                owner: "bench",
            };
            let t = Instant::now();
            let ok = engine.call(&tool, inv).await.is_ok_and(|o| expected.contains(&o.status));
            Sample { latency: t.elapsed(), ok }
        });
    }
    set
}

/// 1,000 calls in flight at once, each sleeping 200 ms in a host call: each
/// call's own latency, and the memory they hold together.
fn in_flight(h: &mut Harness, rt: &tokio::runtime::Runtime, fx: &Fixture, cmd: Tool) -> anyhow::Result<()> {
    let pid = std::process::id();
    let calls = h.size.pick(1_000, 1_000, 20);
    let cmd = Arc::new(cmd);
    reset_peak(pid);
    let started = Instant::now();
    let input = r#"{"op":"sleep","ms":200}"#;
    let samples = rt.block_on(async {
        start_calls(&fx.engine, &cmd, &fx.limits, fx.dirs.path(), input, calls, &[Status::Ok]).join_all().await
    });
    let series = Series {
        samples,
        elapsed: started.elapsed(),
        ..Series::new(Suite::Wasm, "calls in flight at once, each sleeping 200 ms in a host call", Who::Ours, calls)
    };
    h.push(series.memory(peak_rss(pid), "bench process"));
    Ok(())
}

/// The snippets timed for each interpreter: trivial, realistic (JSON and
/// statistics over 1,000 rows), heavier (a 1 MB CSV from `/data`, grouped).
pub const SNIPPETS: [(&str, &str, [&str; 3]); 2] = [
    (
        "python",
        "Python",
        [
            "print(1)",
            "import json, statistics\nrows = [{'v': i % 17} for i in range(1000)]\n\
             data = json.loads(json.dumps(rows))\nresult = statistics.mean(r['v'] for r in data)",
            "import csv, collections\ntotals = collections.Counter()\n\
             for r in csv.DictReader(open('/data/sales.csv')): totals[r['region']] += int(r['amount'])\n\
             result = totals.most_common(3)",
        ],
    ),
    (
        "javascript",
        "JavaScript",
        [
            "console.log(1)",
            "const rows = Array.from({length: 1000}, (_, i) => ({v: i % 17}));\n\
             const data = JSON.parse(JSON.stringify(rows));\nresult = data.reduce((a, r) => a + r.v, 0) / data.length",
            "const totals = {};\n\
             for (const line of require('fs').readFileSync('/data/sales.csv', 'utf8').split('\\n').slice(1)) {\n\
               if (!line) continue; const [, region, amount] = line.split(','); totals[region] = (totals[region] ?? 0) + Number(amount);\n\
             }\nresult = Object.entries(totals).sort((a, b) => b[1] - a[1]).slice(0, 3)",
        ],
    ),
];

/// The row names of one interpreter's snippets.
pub fn snippet_cases(label: &str) -> [String; 3] {
    [
        format!("{label} tool: trivial snippet (print 1), fresh interpreter"),
        format!("{label} tool: JSON + statistics over 1,000 rows"),
        format!("{label} tool: group a 1 MB CSV from /data"),
    ]
}

/// A CSV of about `bytes` (id, region, amount) for the heavier snippet.
pub fn sales_csv(bytes: usize) -> String {
    let mut csv = String::from("id,region,amount\n");
    let mut n = 0u64;
    while csv.len() < bytes {
        csv.push_str(&format!("{n},region-{},{}\n", n % 13, (n * 7919) % 1000));
        n += 1;
    }
    csv
}

/// Agents' code: the interpreter tools, a fresh interpreter per call,
/// through the runner like any tool; then one process per call for the same
/// trivial snippet: our CLI, and the wasmtime CLI invoking the same component.
fn interpreters(h: &mut Harness, rt: &tokio::runtime::Runtime, fx: &Fixture) -> anyhow::Result<()> {
    if matches!(h.size, super::Size::Tiny) {
        h.skip("the interpreter rows: not in --tiny runs (loading them compiles 40 MB of components)");
        return Ok(());
    }
    let user_dir = fx.sandbox.data_dir.user_dir(&fx.call.user)?;
    std::fs::write(user_dir.join("sales.csv"), sales_csv(1 << 20))?;
    for (name, label, snippets) in SNIPPETS {
        let path = h.interpreters.join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&path) else {
            h.skip(format!("the {label} tool rows: no {} (`scripts/build-interpreters`)", path.display()));
            continue;
        };
        let t = Instant::now();
        let tool = rt.block_on(fx.sandbox.load(&bytes, name))?;
        h.figure(
            Suite::Wasm,
            format!("{label} tool: load ({} MB component)", bytes.len() >> 20),
            t.elapsed().as_secs_f64() * 1e3,
            "ms",
            if tool.loaded_from_cache() { "from the artifact cache" } else { "compiled" },
        );
        let n = h.size.pick(1_000, 200, 5);
        for (case, code) in snippet_cases(label).iter().zip(snippets) {
            let input = serde_json::json!({ "code": code }).to_string().into_bytes();
            let call = ToolCall { input, ..fx.call.clone() };
            reset_peak(std::process::id());
            let runs = if code.contains("sales.csv") { h.size.pick(40, 10, 2) } else { n };
            let (samples, elapsed) = rt.block_on(sequential(case, runs.min(20), runs, async || {
                fx.sandbox.run(Ok(&tool), &call).await.status == Status::Ok
            }));
            h.push(
                Series { samples, elapsed, ..Series::new(Suite::Wasm, case, Who::Ours, 1) }
                    .memory(peak_rss(std::process::id()), "bench process"),
            );
        }
        interpreter_one_shot(h, &path, name, label, snippets[0])?;
    }
    Ok(())
}

/// `imagentx-sandbox run <component>` and `wasmtime run --invoke` of the same
/// precompiled component, one process per call.
fn interpreter_one_shot(h: &mut Harness, path: &Path, name: &str, label: &str, code: &str) -> anyhow::Result<()> {
    let runs = h.size.pick(100, 20, 3);
    let input = serde_json::json!({ "code": code }).to_string();
    let data = h.scratch.path().join("oneshot-data");
    let ours_case = format!("{label} tool, one process per call: imagentx-sandbox run");
    let argv =
        vec![path_str(&super::this_binary()?), "run".into(), "--data-dir".into(), path_str(&data), path_str(path)];
    run_process(&argv, input.as_bytes()); // compiles into the data dir's cache
    process_series(h, Suite::Wasm, &ours_case, Who::Ours, 1, runs, &argv, input.as_bytes());
    let Some(wasmtime) = super::which(&["/opt/wasmtime-cli/bin/wasmtime", "wasmtime"]) else {
        return Ok(()); // one_shot says why the wasmtime peer is skipped
    };
    let cwasm = h.scratch.path().join(format!("{name}.cwasm"));
    let compiled = std::process::Command::new(&wasmtime).args(["compile", "-o"]).arg(&cwasm).arg(path).status()?;
    anyhow::ensure!(compiled.success(), "wasmtime compile {} failed", path.display());
    let invoke = format!("call({})", serde_json::to_string(&input)?);
    let argv = vec![
        path_str(&wasmtime),
        "run".into(),
        "--allow-precompiled".into(),
        "--invoke".into(),
        invoke,
        path_str(&cwasm),
    ];
    let peer_case = format!("{label} tool, one process per call: wasmtime run --invoke");
    process_series(h, Suite::Wasm, &peer_case, Who::Peer, 1, runs, &argv, b"");
    h.ratio(Suite::Wasm, &ours_case, &peer_case, 1);
    Ok(())
}

/// One process per call: our CLI, the wasmtime CLI on the same guest and
/// input, and fork/exec of `/bin/true` as the floor.
fn one_shot(h: &mut Harness, probe: &Path) -> anyhow::Result<()> {
    let runs = h.size.pick(100, 20, 3);
    let input = COMMAND_INPUT.as_bytes();
    let ours = super::this_binary()?;
    let data = h.scratch.path().join("oneshot-data");
    let argv = vec![path_str(&ours), "run".into(), "--data-dir".into(), path_str(&data), path_str(probe)];
    process_series(h, Suite::Wasm, ONESHOT_OURS, Who::Ours, 1, runs, &argv, input);
    match super::which(&["/opt/wasmtime-cli/bin/wasmtime", "wasmtime"]) {
        Some(wasmtime) => {
            let cwasm = h.scratch.path().join("probe.cwasm");
            let compiled = std::process::Command::new(&wasmtime)
                .args(["compile", "-o"])
                .arg(&cwasm)
                .arg(probe)
                .status()
                .context("running wasmtime compile")?;
            anyhow::ensure!(compiled.success(), "wasmtime compile failed");
            let argv = vec![path_str(&wasmtime), "run".into(), "--allow-precompiled".into(), path_str(&cwasm)];
            process_series(h, Suite::Wasm, ONESHOT_WASMTIME, Who::Peer, 1, runs, &argv, input);
            h.ratio(Suite::Wasm, ONESHOT_OURS, ONESHOT_WASMTIME, 1);
        }
        None => h.skip(
            "wasmtime CLI peer: not installed (`scripts/bench` installs wasmtime-cli 48.0.8 into /opt/wasmtime-cli)",
        ),
    }
    process_series(h, Suite::Wasm, ONESHOT_FLOOR, Who::Floor, 1, runs, &["/bin/true".to_owned()], b"");
    Ok(())
}
