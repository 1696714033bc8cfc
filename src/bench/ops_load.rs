//! Calls while the operations run (issue 16's measures), on the ops suite's
//! data directory served by this binary's `serve`: a steady, paced load of
//! the trivial tool, its latency alone, during a backup (the CLI under
//! `nice -n 10`, as the schedule runs it), and while retention prunes nearly
//! all of its executions; then the throughput of a data directory after a
//! million calls with retention on, beside a fresh one.
//!
//! The paced load sends each client's calls at fixed times and measures each
//! from when it was due, so a stall counts for every call it delayed (no
//! coordinated omission).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;

use super::http::{self, connect, send};
use super::{Harness, Sample, Series, Suite, Who};

/// Volumes off: the suite's users' directories stay plain (moving 1,000 of
/// them into volumes is not what is measured).
const PLAIN: &str = "[server]\ndata_volumes = \"off\"\n";

pub(super) fn run(h: &mut Harness, data: &Path) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let rate = h.size.pick(500.0, 300.0, 100.0);
    let clients = 16;
    let window = Duration::from_secs_f64(h.size.pick(10.0, 4.0, 1.0));
    let label = |what: &str| format!("paced {rate} calls/s, trivial tool: {what}");

    let config = http::write_config(data, PLAIN)?;
    let (admin, key) = http::add_users(data, &config)?;
    let server = http::serve(data, &config, None)?;
    let addr: Arc<str> = server.addr.as_str().into();
    let key: Arc<str> = key.into();
    rt.block_on(http::register_trivial(h, &addr, &admin))?;

    // Each window starts with nothing of earlier steps left to write back
    // (the suite's restore leaves a gigabyte of dirty pages).
    nix::unistd::sync();
    let alone = rt.block_on(http::paced(&addr, &key, rate, clients, http::stop_after(window)));
    h.push(series(label("alone"), clients, alone));

    // A backup as the schedule takes it: this binary's `backup`, niced.
    let file = data.with_file_name("ops-load-backup.tar.gz");
    nix::unistd::sync();
    let stop = Arc::new(AtomicBool::new(false));
    let backup = {
        let (stop, data, file) = (stop.clone(), data.to_owned(), file.clone());
        let bin = super::this_binary()?;
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = Command::new("nice")
                .arg("-n")
                .arg("10")
                .arg(bin)
                .arg("backup")
                .arg("--to")
                .arg(&file)
                .arg("--data-dir")
                .arg(&data)
                .output();
            stop.store(true, Ordering::Relaxed);
            (out, started.elapsed())
        })
    };
    let during = rt.block_on(http::paced(&addr, &key, rate, clients, stop));
    let (out, took) = backup.join().map_err(|_| anyhow::anyhow!("the backup thread panicked"))?;
    let out = out?;
    anyhow::ensure!(out.status.success(), "the backup failed: {}", String::from_utf8_lossy(&out.stderr));
    h.push(series(label("during a backup"), clients, during));
    h.figure(Suite::Ops, "backup under the paced load (niced CLI)", took.as_secs_f64(), "s", "");
    nix::unistd::sync();
    let after = rt.block_on(http::paced(&addr, &key, rate, clients, http::stop_after(window)));
    h.push(series(label("alone, after the backup"), clients, after));
    let _ = std::fs::remove_file(&file);
    drop(server);

    // Retention: all but 1,000 executions go, a batch of 500 per commit.
    let conn = rusqlite::Connection::open(data.join("sandbox.db"))?;
    let rows: u64 = conn.query_row("SELECT count(*) FROM executions", [], |r| r.get(0))?;
    drop(conn);
    let kept = 1_000;
    http::write_config(data, &format!("{PLAIN}\n[retention]\nmax_executions = {kept}\n"))?;
    nix::unistd::sync();
    let server = http::serve(data, &config, None)?;
    let addr: Arc<str> = server.addr.as_str().into();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let watcher = {
        let (addr, stop) = (addr.clone(), stop.clone());
        rt.spawn(async move {
            // The pruner started with the server: watch it reach the bound.
            while pruned(&addr).await < rows.saturating_sub(kept) && started.elapsed() < Duration::from_secs(600) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stop.store(true, Ordering::Relaxed);
            (pruned(&addr).await, started.elapsed())
        })
    };
    let during = rt.block_on(http::paced(&addr, &key, rate, clients, stop));
    let (deleted, took) = rt.block_on(watcher)?;
    anyhow::ensure!(
        deleted >= rows.saturating_sub(kept),
        "retention pruned {deleted} of {} executions in {took:?}",
        rows.saturating_sub(kept)
    );
    h.push(series(label("while retention prunes"), clients, during));
    h.figure(
        Suite::Ops,
        format!("retention pruning {deleted} executions (batches of 500) under the paced load"),
        deleted as f64 / took.as_secs_f64(),
        "rows/s",
        &format!("{:.1} s", took.as_secs_f64()),
    );
    drop(server);
    drop(rt);
    after_a_million(h)
}

/// Throughput (closed loop) on a data directory that has recorded a million
/// calls with retention on — the executions pruned to the newest 100,000,
/// every audit record kept — beside a fresh one.
fn after_a_million(h: &mut Harness) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let (calls, kept) = h.size.pick((1_000_000usize, 100_000u64), (100_000, 10_000), (10_000, 1_000));
    let clients = 50;
    let window = Duration::from_secs_f64(h.size.pick(10.0, 4.0, 1.0));
    let root = tempfile::tempdir_in(h.scratch.path())?;
    let mut throughput = Vec::new();
    for aged in [true, false] {
        let dir = root.path().join(if aged { "aged" } else { "fresh" });
        std::fs::create_dir_all(&dir)?;
        let extra = format!("{PLAIN}\n[retention]\nmax_executions = {kept}\n");
        let config = http::write_config(&dir, &extra)?;
        if aged {
            let t = Instant::now();
            rt.block_on(super::ops::fill_database(&dir, 100, calls, 512))?;
            h.figure(
                Suite::Ops,
                format!("recording {calls} calls (512 in flight)"),
                t.elapsed().as_secs_f64(),
                "s",
                "",
            );
        }
        let (admin, key) = http::add_users(&dir, &config)?;
        let server = http::serve(&dir, &config, None)?;
        let addr: Arc<str> = server.addr.as_str().into();
        if aged {
            let t = Instant::now();
            let target = (calls as u64).saturating_sub(kept);
            while rt.block_on(pruned(&addr)) < target {
                anyhow::ensure!(t.elapsed() < Duration::from_secs(1800), "pruning did not finish in 30 minutes");
                std::thread::sleep(Duration::from_millis(100));
            }
            h.figure(
                Suite::Ops,
                format!("pruning {target} executions at start, nothing else running"),
                t.elapsed().as_secs_f64(),
                "s",
                "",
            );
        }
        rt.block_on(http::register_trivial(h, &addr, &admin))?;
        let key: Arc<str> = key.into();
        nix::unistd::sync();
        let (samples, elapsed) = rt.block_on(http::closed_loop(&addr, &key, clients, window));
        let case = if aged {
            format!(
                "{clients} clients, after {calls} calls with retention on ({kept} executions and {calls} audit records kept)"
            )
        } else {
            format!("{clients} clients, a fresh data directory")
        };
        let series = Series { samples, elapsed, ..Series::new(Suite::Ops, case, Who::Ours, clients) };
        throughput.push(series.summary().throughput_per_s);
        h.push(series);
    }
    h.figure(
        Suite::Ops,
        format!("throughput after {calls} calls with retention on / fresh"),
        throughput[0] / throughput[1],
        "x",
        "goal: flat (1.0)",
    );
    Ok(())
}

fn series(case: String, clients: usize, (samples, elapsed): (Vec<Sample>, Duration)) -> Series {
    Series { samples, elapsed, ..Series::new(Suite::Ops, case, Who::Ours, clients) }
}

/// `imagentx_executions_pruned_total` of the server at `addr` (0 when it
/// cannot be read).
async fn pruned(addr: &str) -> u64 {
    let Ok(mut sender) = connect(addr).await else { return 0 };
    let Ok((_, body)) = send(&mut sender, Method::GET, "/metrics", "", Bytes::new()).await else { return 0 };
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("imagentx_executions_pruned_total ")?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
