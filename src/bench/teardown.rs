//! Killing and reclaiming a runaway sandbox: a tool spinning forever with a
//! 100 ms (WASM) or 200 ms (native) wall-clock budget. Each sample is the
//! time from the deadline to the call's answer with its resources given
//! back (the store and its pool slot; the jail's processes killed, its
//! cgroup read and removed), i.e. the call's wall time minus its budget.

use std::time::{Duration, Instant};

use super::native::Jailer;
use super::wasm::Fixture;
use super::{Harness, Progress, Sample, Series, Suite, Who};
use crate::report::Status;

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let n = h.size.pick(50, 10, 2);
    wasm(h, n)?;
    native(h, n)
}

fn wasm(h: &mut Harness, n: usize) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let pid = std::process::id();
    let fx = Fixture::new(&h.scratch.path().join("teardown-cache"), 16)?;
    let (_, probe) = super::guest(h, "probe")?;
    let tool = rt.block_on(fx.engine.load(&probe, usize::MAX, "probe"))?;
    let budget = Duration::from_millis(100);
    let mut limits = fx.policy_limits("standard", budget)?;
    // The wall-clock deadline is what stops it, not the fuel or CPU budget.
    limits.fuel = u64::MAX / 2;
    limits.cpu_time = budget * 100;
    let progress = Progress::new("WASM runaway", n);
    super::reset_peak(pid);
    let started = Instant::now();
    let samples = rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let status = fx.engine.call(&tool, fx.invocation(r#"{"op":"spin"}"#, &limits)).await.map(|o| o.status);
            v.push(Sample { latency: t.elapsed().saturating_sub(budget), ok: matches!(status, Ok(Status::Timeout)) });
            progress.tick();
        }
        v
    });
    drop(progress);
    let case = "WASM runaway (spin), 100 ms deadline: kill + reclaim after the deadline";
    h.push(
        Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Teardown, case, Who::Ours, 1) }
            .memory(super::peak_rss(pid), "bench process"),
    );
    Ok(())
}

fn native(h: &mut Harness, n: usize) -> anyhow::Result<()> {
    let jailer = match Jailer::new() {
        Ok(j) => j,
        Err(e) => {
            h.skip(format!("native teardown: this host cannot run the jail: {e:#}"));
            return Ok(());
        }
    };
    let budget = Duration::from_millis(200);
    let mut limits = jailer.limits("standard", budget)?;
    // The wall-clock deadline is what stops it, not the CPU-time budget.
    limits.cpu_time = budget * 100;
    // A shell that never returns, with four children in the background and
    // a busy loop of its own: all must be found and killed.
    let argv: Vec<String> = ["/bin/sh", "-c", "for i in 1 2 3 4; do sleep 1000 & done; while :; do :; done"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let progress = Progress::new("native runaway", n);
    let mut cleanup = Vec::with_capacity(n);
    let mut peak = 0;
    let started = Instant::now();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let id = crate::report::new_execution_id();
        let t = Instant::now();
        let outcome = jailer.run_as(&id, &argv, &limits);
        let latency = t.elapsed().saturating_sub(budget);
        // Stopped by its deadline, and nothing left: no cgroup, so no process.
        let gone = jailer.jail.cgroup_paths(&id, "bench").iter().all(|p| !p.exists());
        let stopped = outcome.status == Status::Timeout;
        samples.push(Sample { latency, ok: stopped && gone });
        cleanup.push(outcome.timings.cleanup);
        peak = peak.max(outcome.peak_memory_bytes.unwrap_or(0));
        progress.tick();
    }
    drop(progress);
    let case = "native runaway (spinning sh + 4 sleeping children), 200 ms deadline: kill + reclaim after the deadline";
    h.push(
        Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Teardown, case, Who::Ours, 1) }
            .memory(Some(peak).filter(|p| *p > 0), "largest run's cgroup"),
    );
    cleanup.sort();
    let median = cleanup[cleanup.len() / 2];
    h.figure(
        Suite::Teardown,
        "native: reading and removing the run's cgroups (median)",
        median.as_secs_f64() * 1e3,
        "ms",
        "",
    );
    Ok(())
}
