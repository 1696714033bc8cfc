//! Instructions per in-process call, counted by valgrind's callgrind: exact
//! where wall times are noisy, so two commits' costs can be compared. The
//! harness runs itself under callgrind twice per case, with N1 and N2 calls,
//! collecting only inside [`counted_calls`] on the calling thread (a
//! current-thread runtime, so the whole call runs there); the difference
//! divided by N2 − N1 cancels start-up, loading and the first call's
//! one-time work. Hardware counters (`perf stat -e instructions`) would be
//! faster, but virtual machines like this one often do not expose them.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;

use super::wasm::{COMMAND_CALL, COMMAND_INPUT, Fixture, RUNNER_CALL, SDK_CALL, SDK_INPUT};
use super::{BenchArgs, Harness, Suite, path_str, which};

const CASES: [(&str, &str); 3] = [("sdk", SDK_CALL), ("command", COMMAND_CALL), ("runner", RUNNER_CALL)];

pub fn run(h: &mut Harness, cache: &Path) -> anyhow::Result<()> {
    let Some(valgrind) = which(&["valgrind"]) else {
        h.skip("instruction counts: valgrind is not installed (`apt-get install valgrind`)");
        return Ok(());
    };
    let (n1, n2) = h.size.pick((20, 120), (10, 60), (1, 3));
    for (key, case) in CASES {
        let low = counted(&valgrind, h, key, n1, cache)?;
        let high = counted(&valgrind, h, key, n2, cache)?;
        let per_call = high.saturating_sub(low) as f64 / (n2 - n1) as f64;
        let note = format!("callgrind: ({high} − {low}) / ({n2} − {n1}) calls");
        h.figure(Suite::Wasm, format!("instructions per call: {case}"), per_call, "instructions", &note);
    }
    Ok(())
}

/// Instructions callgrind collected in one child run of `n` calls.
fn counted(valgrind: &Path, h: &Harness, key: &str, n: usize, cache: &Path) -> anyhow::Result<u64> {
    let out = Command::new(valgrind)
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null", "--toggle-collect=*counted_calls*"])
        .arg(super::this_binary()?)
        .args(["bench", "--guests", &path_str(&h.guests), "--count-child", &format!("{key}:{n}:{}", path_str(cache))])
        .output()
        .context("running valgrind")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "the counted run failed: {}",
        stderr.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    let collected = parse_collected(&stderr).context("no `Collected :` line in callgrind's summary")?;
    anyhow::ensure!(collected > 0, "callgrind counted nothing inside counted_calls (symbol not found?)");
    Ok(collected)
}

/// callgrind's `==PID== Collected : 123456` line.
fn parse_collected(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| l.split_once("Collected :").and_then(|(_, n)| n.trim().parse().ok()))
}

/// The child side: `CASE:N:CACHE_DIR`, N calls of the case on a current-thread
/// runtime, then exit 0 if all answered ok.
pub fn count_child(args: &BenchArgs, spec: &str) -> ExitCode {
    let result = (|| -> anyhow::Result<bool> {
        let mut parts = spec.splitn(3, ':');
        let (Some(key), Some(n), Some(cache)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("--count-child wants CASE:N:CACHE_DIR");
        };
        let n: usize = n.parse()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let fx = Fixture::new(Path::new(cache), 4)?;
        let (file, input) =
            if key == "command" { ("probe.wasm", COMMAND_INPUT) } else { ("sdk_probe.wasm", SDK_INPUT) };
        let bytes = std::fs::read(args.guests.join(file))?;
        let tool = rt.block_on(fx.engine.load(&bytes, usize::MAX, "counted"))?;
        Ok(counted_calls(&rt, &fx, &tool, key == "runner", input, n) == n)
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: a counted call did not answer ok");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The region callgrind counts (by this function's name): `n` calls.
#[inline(never)]
fn counted_calls(
    rt: &tokio::runtime::Runtime,
    fx: &Fixture,
    tool: &crate::engine::Tool,
    runner: bool,
    input: &str,
    n: usize,
) -> usize {
    rt.block_on(async {
        let mut ok = 0;
        for _ in 0..n {
            ok += usize::from(if runner { fx.run(tool).await } else { fx.call(tool, input).await });
        }
        ok
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_callgrinds_summary() {
        let stderr = "==1== Events    : Ir\n==1== Collected : 2709952687\n==1==\n==1== I   refs:      2,709,952,687\n";
        assert_eq!(super::parse_collected(stderr), Some(2_709_952_687));
        assert_eq!(super::parse_collected("nothing here"), None);
    }
}
