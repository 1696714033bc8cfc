//! Latency percentiles of the WASM runtime, with peers measured in the same run.
//!
//! `cargo bench --bench latency` (add `-- --quick` for a short run, `-- --only TEXT`
//! to run only the in-process rows whose name contains TEXT, e.g. under a
//! profiler). Prints a
//! Markdown table; BENCHMARKS.md holds a run of it. Every call is a fresh store
//! and instance with fuel, epochs and the memory limiter on.

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imagentx_sandbox::data_dir::DataDir;
use imagentx_sandbox::engine::{Engine, EngineConfig, Invocation, Tool};
use imagentx_sandbox::policy::{Policy, UserId};
use imagentx_sandbox::report::Status;
use imagentx_sandbox::runner::{Sandbox, ToolCall};

struct Row {
    name: String,
    samples: Vec<Duration>,
    ok: usize,
}

impl Row {
    fn print(&mut self) {
        self.samples.sort();
        let n = self.samples.len();
        let at = |q: f64| self.samples[((n as f64 * q) as usize).min(n - 1)];
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let total: Duration = self.samples.iter().sum();
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1}% |",
            self.name,
            n,
            us(at(0.50)),
            us(at(0.90)),
            us(at(0.99)),
            us(self.samples[n - 1]),
            n as f64 / total.as_secs_f64(),
            100.0 * self.ok as f64 / n as f64
        );
    }
}

async fn time_calls(name: &str, n: usize, mut f: impl AsyncFnMut() -> bool) -> Row {
    for _ in 0..n.min(200) {
        f().await; // warm up
    }
    let mut row = Row { name: name.into(), samples: Vec::with_capacity(n), ok: 0 };
    for _ in 0..n {
        let t = Instant::now();
        let ok = f().await;
        row.samples.push(t.elapsed());
        row.ok += usize::from(ok);
    }
    row
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn run_process(program: &Path, args: &[&str], stdin: &[u8]) -> bool {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap().status.success()
}

fn wasmtime_cli() -> Option<std::path::PathBuf> {
    let candidates = [std::path::PathBuf::from("/opt/wasmtime-cli/bin/wasmtime"), "wasmtime".into()];
    candidates.into_iter().find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wanted = |name: &str| only.as_ref().is_none_or(|o| name.contains(o.as_str()));
    let n = if quick { 1_000 } else { 10_000 };
    let cache = tempfile::tempdir().unwrap();
    let config = EngineConfig::new(cache.path().to_owned(), 1 << 30);
    let engine = Engine::new(&config).unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let policy = Policy::default();
    let limits = policy.resolve("standard", None).unwrap();
    let env = BTreeMap::new();
    let inv = |input| Invocation {
        input,
        args: &[],
        env: &env,
        data_dir: dirs.path(),
        data_writable: true,
        scratch_dir: dirs.path(),
        limits: &limits,
    };
    let sdk_wasm = common::guest_bytes("sdk-probe");
    let cmd_wasm = common::guest_bytes("probe");
    let sdk = engine.load(&sdk_wasm, usize::MAX, "sdk").await.unwrap();
    let cmd = engine.load(&cmd_wasm, usize::MAX, "cmd").await.unwrap();
    let call_ok = async |tool: &Tool, input| engine.call(tool, inv(input)).await.unwrap().status == Status::Ok;

    println!("machine: {} cores, {}", std::thread::available_parallelism().unwrap(), os_line());
    println!("\n| case | n | p50 µs | p90 µs | p99 µs | max µs | calls/s (1 at a time) | ok |");
    println!("|---|---|---|---|---|---|---|---|");
    if wanted("SDK tool call, engine") {
        time_calls("SDK tool call, engine", n, async || call_ok(&sdk, r#"{"op":"echo","text":"hi"}"#).await)
            .await
            .print();
    }
    if wanted("command tool call, engine") {
        time_calls("command tool call, engine", n, async || call_ok(&cmd, r#"{"op":"echo"}"#).await).await.print();
    }

    // The whole runner: policy, input check, user dir, scratch mkdir/rmdir, report.
    let data = tempfile::tempdir().unwrap();
    let sandbox =
        Sandbox { policy: policy.clone(), engine: engine.clone(), data_dir: DataDir::open(data.path()).unwrap() };
    let call = ToolCall {
        user: UserId::new("bench").unwrap(),
        tier: "standard".into(),
        input: br#"{"op":"echo","text":"hi"}"#.to_vec(),
        args: vec![],
        timeout: None,
    };
    if wanted("SDK tool call, runner + report") {
        time_calls("SDK tool call, runner + report", n, async || {
            sandbox.run(Ok(&sdk), &call).await.status == Status::Ok
        })
        .await
        .print();
    }
    if only.is_some() {
        return;
    }

    // A restart: a new engine, the tool loaded from its precompiled artifact
    // (read, deserialize, link, `describe`), then its first call.
    let reps = if quick { 10 } else { 50 };
    let mut restart = Row { name: "restart: load precompiled SDK tool + first call".into(), samples: vec![], ok: 0 };
    let mut engine_new = Row { name: "restart: Engine::new (pool + ticker)".into(), samples: vec![], ok: 0 };
    for _ in 0..reps {
        let t = Instant::now();
        let fresh = Engine::new(&config).unwrap();
        engine_new.samples.push(t.elapsed());
        engine_new.ok += 1;
        let t = Instant::now();
        let tool = fresh.load(&sdk_wasm, usize::MAX, "sdk").await.unwrap();
        let ok = fresh.call(&tool, inv(r#"{"op":"echo","text":"hi"}"#)).await.unwrap().status == Status::Ok;
        restart.samples.push(t.elapsed());
        restart.ok += usize::from(ok && tool.loaded_from_cache());
    }
    restart.print();
    engine_new.print();

    // Compiling a tool never seen before (empty cache).
    let mut compile = Row { name: "compile new SDK tool (368 KB) + describe".into(), samples: vec![], ok: 0 };
    for _ in 0..reps.min(10) {
        let empty = tempfile::tempdir().unwrap();
        let cold = Engine::new(&EngineConfig { cache_dir: empty.path().to_owned(), ..config.clone() }).unwrap();
        let t = Instant::now();
        let tool = cold.load(&sdk_wasm, usize::MAX, "sdk").await.unwrap();
        compile.samples.push(t.elapsed());
        compile.ok += usize::from(!tool.loaded_from_cache());
    }
    compile.print();

    // 1,000 calls in flight at once: each sleeps 200 ms inside a host call.
    let in_flight = 1_000;
    let t = Instant::now();
    let calls = (0..in_flight).map(|_| async {
        let limits = limits.clone();
        let inv = Invocation { limits: &limits, ..inv(r#"{"op":"sleep","ms":200}"#) };
        engine.call(&cmd, inv).await.map(|o| o.status == Status::Ok).unwrap_or(false)
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|ok| **ok).count();
    println!(
        "\n1,000 calls in flight (each sleeping 200 ms in a host call): {ok}/{in_flight} ok, all done in {:.0} ms; \
         peak RSS of the bench process {:.0} MiB",
        t.elapsed().as_secs_f64() * 1e3,
        peak_rss_mib()
    );

    // Fuel rate: how much fuel one core burns per second of guest CPU.
    let report = engine.call(&cmd, inv(r#"{"op":"work","rounds":200000000}"#)).await.unwrap();
    let (fuel, cpu) = (report.fuel_consumed.unwrap(), report.cpu_time.unwrap());
    println!(
        "fuel rate: {} fuel in {:.0} ms of CPU = {:.2e} fuel per CPU-second (policy default {:.1e})",
        fuel,
        cpu.as_secs_f64() * 1e3,
        fuel as f64 / cpu.as_secs_f64(),
        imagentx_sandbox::policy::DEFAULT_FUEL_PER_CPU_SECOND as f64
    );

    // Peers, one-shot processes: the wasmtime CLI and our CLI, same tool, same input.
    println!("\n| one-shot process | n | p50 µs | p90 µs | p99 µs | max µs | runs/s | ok |");
    println!("|---|---|---|---|---|---|---|---|");
    let runs = if quick { 20 } else { 100 };
    let probe = common::guest("probe");
    let input = br#"{"op":"echo"}"#;
    let ours = Path::new(env!("CARGO_BIN_EXE_imagentx-sandbox"));
    let ours_data = tempfile::tempdir().unwrap();
    let ours_args = ["run", "--data-dir", ours_data.path().to_str().unwrap(), probe.to_str().unwrap()];
    time_calls("imagentx-sandbox run (artifact cached)", runs, async || run_process(ours, &ours_args, input))
        .await
        .print();
    match wasmtime_cli() {
        Some(wasmtime) => {
            let cwasm = dirs.path().join("probe.cwasm");
            let compiled = Command::new(&wasmtime)
                .args(["compile", "-o", cwasm.to_str().unwrap(), probe.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(compiled.success());
            let args = ["run", "--allow-precompiled", cwasm.to_str().unwrap()];
            time_calls("wasmtime run --allow-precompiled (peer)", runs, async || run_process(&wasmtime, &args, input))
                .await
                .print();
            // `-C cache=n`: the CLI's own compile cache is on by default.
            let args = ["run", "-C", "cache=n", probe.to_str().unwrap()];
            time_calls("wasmtime run -C cache=n, compiling each time (peer)", runs.min(20), async || {
                run_process(&wasmtime, &args, input)
            })
            .await
            .print();
        }
        None => println!("| wasmtime CLI not installed: peer skipped (`scripts/bench` installs it) | | | | | | | |"),
    }
}

fn os_line() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default()
}
