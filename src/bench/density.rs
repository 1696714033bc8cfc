//! How many free-tier sandboxes fit in a GiB: idle but ready (started and
//! blocked, waiting), and running (burning CPU). WASM: calls in flight in
//! this process on a fresh engine, measured by this process's resident
//! memory. Native: jails in flight, measured by the machine's memory in use
//! (MemTotal − MemAvailable), which includes the kernel's side of a jail
//! (namespaces, page tables, cgroups) that no process's RSS shows.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::native::{Jailer, PYTHON};
use super::wasm::start_calls;
use super::{Harness, Sample, Series, Suite, Who, machine_used, rss};
use crate::engine::{Engine, EngineConfig};
use crate::policy::Policy;
use crate::report::Status;

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    wasm(h)?;
    native(h)
}

fn per_gib(h: &mut Harness, what: &str, used: u64, n: usize, measured_by: &str) {
    if used == 0 {
        h.skip(format!("{what}: the memory in use did not grow measurably with {n} at once"));
        return;
    }
    let each = used as f64 / n.max(1) as f64;
    h.figure(
        Suite::Density,
        format!("{what}: memory per sandbox"),
        each / 1024.0,
        "KiB",
        &format!("{n} at once, {measured_by}"),
    );
    h.figure(Suite::Density, format!("{what}: sandboxes per GiB"), GIB / each.max(1.0), "per GiB", "");
}

fn wasm(h: &mut Harness) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let pid = std::process::id();
    let (_, probe) = super::guest(h, "probe")?;
    let cache = h.scratch.path().join("density-cache");
    for (what, input, n, timeout) in [
        ("WASM, idle and ready (blocked in a host call)", r#"{"op":"sleep","ms":4000}"#, h.size.pick(1000, 500, 10), 8),
        ("WASM, running (spinning on CPU)", r#"{"op":"spin"}"#, h.size.pick(200, 100, 4), 6),
    ] {
        // A fresh engine: pool slots touched by earlier calls stay resident
        // and would hide the cost being measured.
        let mut config = EngineConfig::new(cache.clone(), 1 << 30);
        config.max_instances = u32::try_from(n)?;
        let engine = Engine::new(&config)?;
        let tool = Arc::new(rt.block_on(engine.load(&probe, usize::MAX, "probe"))?);
        let limits = Policy::default().resolve("free", Some(Duration::from_secs(timeout)))?;
        let before = rss(pid).unwrap_or(0);
        let started = Instant::now();
        let (samples, during) = rt.block_on(async {
            // Idle calls end ok; running ones are stopped by their limits.
            let expected = &[Status::Ok, Status::Timeout, Status::CpuLimit];
            let set = start_calls(&engine, &tool, &limits, h.scratch.path(), input, n, expected);
            // Every call instantiated: a spinning one yields every epoch tick.
            tokio::time::sleep(Duration::from_millis(1500 + 10 * n as u64)).await;
            let during = rss(pid).unwrap_or(0);
            (set.join_all().await, during)
        });
        let used = during.saturating_sub(before);
        h.push(
            Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Density, what, Who::Ours, n) }
                .memory(Some(used), "bench process RSS growth"),
        );
        per_gib(h, what, used, n, "growth of this process's RSS");
    }
    Ok(())
}

fn native(h: &mut Harness) -> anyhow::Result<()> {
    let jailer = match Jailer::new() {
        Ok(j) => j,
        Err(e) => {
            h.skip(format!("native density: this host cannot run the jail: {e:#}"));
            return Ok(());
        }
    };
    let idle = h.size.pick(200, 50, 3);
    let running = h.size.pick(100, 20, 2);
    let cases: [(&str, Vec<String>, usize); 2] = [
        ("native, idle and ready (`sleep` in a jail)", vec!["/bin/sleep".into(), "3600".into()], idle),
        (
            "native, running (Python spinning in a jail)",
            vec![PYTHON.into(), "-c".into(), "while True: pass".into()],
            running,
        ),
    ];
    for (what, argv, n) in cases {
        if argv[0] == PYTHON && !Path::new(PYTHON).exists() {
            h.skip(format!("{what}: no {PYTHON}"));
            continue;
        }
        let settle = Duration::from_millis(1000 + 40 * n as u64);
        let limits = jailer.limits("free", settle + Duration::from_secs(2))?;
        let before = machine_used().unwrap_or(0);
        let started = Instant::now();
        let during = std::sync::Mutex::new(0u64);
        let samples = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..n)
                .map(|_| {
                    scope.spawn(|| {
                        let t = Instant::now();
                        let outcome = jailer.run(&argv, &limits);
                        // Both are stopped by the deadline: that is the run ending as planned.
                        let ok = matches!(outcome.status, Status::Timeout | Status::CpuLimit);
                        Sample { latency: t.elapsed(), ok }
                    })
                })
                .collect();
            std::thread::sleep(settle);
            *during.lock().unwrap_or_else(|e| e.into_inner()) = machine_used().unwrap_or(0);
            runs.into_iter()
                .map(|r| r.join().unwrap_or(Sample { latency: Duration::ZERO, ok: false }))
                .collect::<Vec<_>>()
        });
        let used = during.into_inner().unwrap_or_else(|e| e.into_inner()).saturating_sub(before);
        h.push(
            Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Density, what, Who::Ours, n) }
                .memory(Some(used), "machine memory in use, growth"),
        );
        per_gib(h, what, used, n, "growth of the machine's memory in use");
    }
    Ok(())
}
