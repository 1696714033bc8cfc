//! What holding the limits across tenants costs, and what it buys: a guest's
//! writes with the file-system accounting on and off (1 GiB in 64 KiB chunks,
//! 10,000 small files), and another user's trivial calls while one user keeps
//! 20 calls spinning, with turns on the CPU handed round users and round calls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Harness, Sample, Series, Suite, Who, sequential};
use crate::engine::{CpuGate, Engine, EngineConfig, Invocation, Tool};
use crate::policy::{Limits, Policy};
use crate::quota::Budget;
use crate::report::Status;

const MIB: u64 = 1 << 20;

/// One call of `tool` with `input` for `owner`, its `/data` and `/tmp` in `dir`.
async fn call(engine: &Engine, tool: &Tool, limits: &Limits, dir: &std::path::Path, owner: &str, input: &str) -> bool {
    let env = BTreeMap::new();
    let inv = Invocation {
        input,
        args: &[],
        env: &env,
        data_dir: dir,
        data_writable: true,
        data_budget: Budget::empty(limits.data_quota_bytes, limits.data_files),
        scratch_dir: dir,
        limits,
        owner,
    };
    engine.call(tool, inv).await.is_ok_and(|o| o.status == Status::Ok && o.limits_hit.is_empty())
}

pub fn run(
    h: &mut Harness,
    rt: &tokio::runtime::Runtime,
    config: &EngineConfig,
    probe: &[u8],
    sdk: &[u8],
) -> anyhow::Result<()> {
    let policy = Policy::default();
    let mut limits = policy.resolve("premium", Some(Duration::from_secs(60)))?;
    limits.data_quota_bytes = 2 << 30;

    // The same writes with the accounting on, then off, alternating runs.
    let charged = Engine::new(config)?;
    let plain = Engine::new(&EngineConfig { charge_files: false, ..config.clone() })?;
    let tools = rt.block_on(async {
        anyhow::Ok([charged.load(probe, usize::MAX, "probe").await?, plain.load(probe, usize::MAX, "probe").await?])
    })?;
    let big = format!(r#"{{"op":"fill","path":"/data/big","chunk":{},"total":{}}}"#, 64 * 1024, 1024 * MIB);
    let small = r#"{"op":"files","dir":"/data/many","count":10000,"bytes":100}"#;
    let cases = [
        ("write 1 GiB to /data in 64 KiB chunks", big.as_str(), h.size.pick(5, 2, 0)),
        ("write 10,000 files of 100 bytes to /data", small, h.size.pick(20, 5, 1)),
    ];
    for (case, input, runs) in cases {
        if runs == 0 {
            h.skip(format!("{case}: not in --tiny runs"));
            continue;
        }
        let mut series = [(&charged, "accounting on"), (&plain, "accounting off (wasmtime-wasi as it is)")]
            .map(|(_, label)| Series::new(Suite::Wasm, format!("{case}, {label}"), Who::Ours, 1));
        for _ in 0..runs {
            for (i, engine) in [&charged, &plain].into_iter().enumerate() {
                let dir = tempfile::tempdir_in(h.scratch.path())?;
                std::fs::create_dir(dir.path().join("many"))?;
                let t = Instant::now();
                let ok = rt.block_on(call(engine, &tools[i], &limits, dir.path(), "bench", input));
                series[i].samples.push(Sample { latency: t.elapsed(), ok });
            }
        }
        for mut s in series {
            s.elapsed = s.samples.iter().map(|s| s.latency).sum();
            h.push(s);
        }
        h.ratio(
            Suite::Wasm,
            &format!("{case}, accounting on"),
            &format!("{case}, accounting off (wasmtime-wasi as it is)"),
            1,
        );
    }

    // Another user's trivial calls while one user keeps 20 calls spinning
    // (premium allows 20), with the gate as built and with no gate at all.
    let spinners = 20;
    let trivial = h.size.pick(400, 100, 5);
    for (label, gate) in
        [("turns by user", CpuGate::for_this_host()), ("turns by call (no gate)", CpuGate::new(1 << 20))]
    {
        let engine = Engine::new(&EngineConfig { cpu_gate: gate, ..config.clone() })?;
        let (spin, echo) = rt.block_on(async {
            anyhow::Ok((
                Arc::new(engine.load(probe, usize::MAX, "probe").await?),
                engine.load(sdk, usize::MAX, "sdk").await?,
            ))
        })?;
        let dir = tempfile::tempdir_in(h.scratch.path())?;
        let case = format!("another user's trivial call beside 20 spinning calls, {label}");
        let spin_limits = policy.resolve("premium", Some(Duration::from_secs(30)))?;
        let (samples, elapsed) = rt.block_on(async {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut hogs = tokio::task::JoinSet::new();
            for _ in 0..spinners {
                let (engine, spin, limits, path, stop) =
                    (engine.clone(), Arc::clone(&spin), spin_limits.clone(), dir.path().to_owned(), Arc::clone(&stop));
                hogs.spawn(async move {
                    // Each spins for up to a second of its budget, again and again.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let input = r#"{"op":"work","rounds":2000000000}"#;
                        call(&engine, &spin, &limits, &path, "spinner", input).await;
                    }
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let small = policy.resolve("standard", None).unwrap_or_else(|_| spin_limits.clone());
            // Each call is a task on the runtime's workers, as the server's are.
            let echo = Arc::new(echo);
            let measured = sequential(&case, 5, trivial, async || {
                let (engine, echo, small, path) =
                    (engine.clone(), Arc::clone(&echo), small.clone(), dir.path().to_owned());
                tokio::spawn(
                    async move { call(&engine, &echo, &small, &path, "bystander", super::wasm::SDK_INPUT).await },
                )
                .await
                .unwrap_or(false)
            })
            .await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            hogs.abort_all();
            measured
        });
        h.push(Series { samples, elapsed, ..Series::new(Suite::Wasm, case, Who::Ours, 1) });
    }
    Ok(())
}
