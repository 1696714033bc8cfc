//! The native jail (`Jail::run`, what the server calls), beside bubblewrap,
//! nsjail when installed, and plain fork/exec as the floor: `/bin/true` and
//! a Python one-liner, 1, 2, 8 and 32 runs in flight, all in one process and
//! one run. Needs root (namespaces and cgroups); skipped with a line without.

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Harness, Series, Suite, Who, process_series, threaded, which};
use crate::jail::{Jail, JailConfig, NativeRun, Timings};
use crate::policy::{Limits, Policy};
use crate::report::Status;

pub const PYTHON: &str = "/usr/bin/python3";
/// The host's Node.js, the JavaScript peer of the interpreter tool.
pub const NODE: &str = "/usr/bin/node";

/// The jail as the server holds it, with a user directory and a tier.
pub struct Jailer {
    pub jail: Arc<Jail>,
    pub data: tempfile::TempDir,
    pub policy: Policy,
}

impl Jailer {
    /// The jail, or why this host cannot run it.
    pub fn new() -> anyhow::Result<Self> {
        anyhow::ensure!(nix::unistd::geteuid().is_root(), "needs root (namespaces, cgroups)");
        let jail = Jail::new(JailConfig::default())?;
        let data = tempfile::tempdir()?;
        jail.prepare_data_dir(data.path())?;
        Ok(Self { jail: Arc::new(jail), data, policy: Policy::default() })
    }

    pub fn limits(&self, tier: &str, timeout: Duration) -> anyhow::Result<Limits> {
        Ok(self.policy.resolve(tier, Some(timeout))?)
    }

    /// One run to its end.
    pub fn run(&self, argv: &[String], limits: &Limits) -> crate::jail::NativeOutcome {
        self.run_as(&crate::report::new_execution_id(), argv, limits)
    }

    /// One run to its end, under the execution id `id` (its cgroup's name).
    pub fn run_as(&self, id: &str, argv: &[String], limits: &Limits) -> crate::jail::NativeOutcome {
        self.run_in(id, self.data.path(), argv, limits)
    }

    /// One run to its end with `data_dir` as its `/data`.
    pub fn run_in(&self, id: &str, data_dir: &Path, argv: &[String], limits: &Limits) -> crate::jail::NativeOutcome {
        self.jail.run(&NativeRun {
            id,
            owner: "bench",
            argv,
            env: &crate::jail::environment(&[]),
            input: b"",
            data_dir,
            data_writable: true,
            limits,
            layout: None,
            cancel: None,
        })
    }
}

fn strings(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|s| s.to_string()).collect()
}

/// bubblewrap with every namespace it offers and a read-only /usr: the
/// closest view to ours it gives without extra setup.
fn bwrap(bwrap: &Path, program: &[String]) -> Vec<String> {
    let mut argv = vec![super::path_str(bwrap)];
    argv.extend(strings(&[
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]));
    argv.extend(program.iter().cloned());
    argv
}

/// nsjail in one-shot mode with read-only system directories.
fn nsjail(nsjail: &Path, program: &[String]) -> Vec<String> {
    let mut argv = vec![super::path_str(nsjail)];
    argv.extend(strings(&["-Mo", "--quiet", "-R", "/usr", "-R", "/bin", "-R", "/lib", "-R", "/lib64", "--"]));
    argv.extend(program.iter().cloned());
    argv
}

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let jailer = match Jailer::new() {
        Ok(j) => j,
        Err(e) => {
            h.skip(format!("native jail suite: this host cannot run the jail: {e:#}"));
            return Ok(());
        }
    };
    let bwrap_bin = which(&["bwrap"]);
    let nsjail_bin = which(&["nsjail"]);
    if bwrap_bin.is_none() {
        h.skip("bubblewrap peer: not installed (`apt-get install bubblewrap`; `scripts/bench` does)");
    }
    if nsjail_bin.is_none() {
        h.skip("nsjail peer: not installed (Debian 12 has no nsjail package)");
    }
    let runs = h.size.pick(300, 40, 3);
    let levels = h.size.pick(&[1, 2, 8, 32][..], &[1, 2, 8, 32], &[1, 2]);
    let mut programs = vec![("/bin/true", strings(&["/bin/true"]), runs, levels)];
    if Path::new(PYTHON).exists() {
        programs.push(("python3 -c 'print(1)'", strings(&[PYTHON, "-c", "print(1)"]), runs, levels));
    } else {
        h.skip(format!("the Python rows: no {PYTHON}"));
    }
    // Node starts for tens of milliseconds: fewer runs, two levels.
    if Path::new(NODE).exists() {
        let few = h.size.pick(60, 20, 2);
        let levels = h.size.pick(&[1, 8][..], &[1, 8], &[1]);
        programs.push(("node -e 'console.log(1)'", strings(&[NODE, "-e", "console.log(1)"]), few, levels));
    } else {
        h.skip(format!("the Node rows: no {NODE}"));
    }
    let limits = jailer.limits("standard", Duration::from_secs(30))?;
    let timings = Mutex::new(Vec::new());
    for (name, program, runs, levels) in &programs {
        let runs = *runs;
        for &threads in *levels {
            let ours = format!("imagentx jail: {name}");
            let peak = AtomicU64::new(0);
            let run = || {
                let outcome = jailer.run(program, &limits);
                peak.fetch_max(outcome.peak_memory_bytes.unwrap_or(0), Ordering::Relaxed);
                if threads == 1 && *name == "/bin/true" {
                    timings.lock().unwrap_or_else(|e| e.into_inner()).push(outcome.timings);
                }
                outcome.status == Status::Ok
            };
            for _ in 0..3 {
                run();
            }
            let (samples, elapsed) = threaded(&ours, threads, runs, run);
            let peak = Some(peak.into_inner()).filter(|p| *p > 0);
            h.push(
                Series { samples, elapsed, ..Series::new(Suite::Native, &ours, Who::Ours, threads) }
                    .memory(peak, "largest run's cgroup"),
            );
            if let Some(bin) = &bwrap_bin {
                let case = format!("bwrap --unshare-all: {name}");
                process_series(h, Suite::Native, &case, Who::Peer, threads, runs, &bwrap(bin, program), b"");
                h.ratio(Suite::Native, &ours, &case, threads);
            }
            if let Some(bin) = &nsjail_bin {
                let case = format!("nsjail -Mo: {name}");
                process_series(h, Suite::Native, &case, Who::Peer, threads, runs, &nsjail(bin, program), b"");
                h.ratio(Suite::Native, &ours, &case, threads);
            }
            let floor = format!("fork/exec, no isolation: {name}");
            process_series(h, Suite::Native, &floor, Who::Floor, threads, runs, program, b"");
        }
    }
    breakdown(h, &timings.into_inner().unwrap_or_else(|e| e.into_inner()));
    python_data(h, &jailer, bwrap_bin.as_deref())?;
    volumes(h, &jailer)
}

/// The `python-data` tool's one-shot call (a 1 MB CSV grouped with pandas, a
/// chart to PNG) through a fresh jail, beside bubblewrap and the same
/// program with no isolation. Premium tier (a whole core): the rows compare
/// isolation, not a tier's CPU share.
fn python_data(h: &mut Harness, jailer: &Jailer, bwrap_bin: Option<&Path>) -> anyhow::Result<()> {
    use crate::interpreters::{PYTHON_DATA, PYTHON_DATA_INSIDE, SYSTEM_PYTHON};
    let built = h.interpreters.join(PYTHON_DATA);
    if !built.join("BUILD").is_file() {
        h.skip(format!(
            "the python-data rows: not built ({}; `scripts/build-interpreters python-data`)",
            built.display()
        ));
        return Ok(());
    }
    let built = std::fs::canonicalize(&built)?;
    let layout = jailer
        .jail
        .layout_with(&[crate::jail::ExtraBind { source: built.clone(), target: PYTHON_DATA_INSIDE.into() }])?;
    let csv = jailer.data.path().join("sales.csv");
    std::fs::write(&csv, super::wasm::sales_csv(1 << 20))?;
    let code = "import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_csv(args['csv'])\n\
                means = df.groupby('region')['amount'].mean()\nmeans.plot.bar()\nmeans";
    let input = |path: &str| serde_json::json!({"code": code, "args": {"csv": path}}).to_string().into_bytes();
    let inside = input("/data/sales.csv");
    let runner = format!("{PYTHON_DATA_INSIDE}/runner.py");
    let argv = strings(&[SYSTEM_PYTHON, "-I", "-B", &runner]);
    let limits = jailer.limits("premium", Duration::from_secs(60))?;
    let env = crate::jail::environment(&[]);
    let runs = h.size.pick(30, 8, 2);
    let ok_with_image = |stdout: &[u8]| stdout.windows(9).any(|w| w == br#""images":"#);
    let ours = "python-data: pandas groupby of a 1 MB CSV + a PNG chart, fresh jail (imagentx)";
    let (samples, elapsed) = threaded(ours, 1, runs, || {
        let outcome = jailer.jail.run(&NativeRun {
            id: &crate::report::new_execution_id(),
            owner: "bench",
            argv: &argv,
            env: &env,
            input: &inside,
            data_dir: jailer.data.path(),
            data_writable: true,
            limits: &limits,
            layout: Some(&layout),
            cancel: None,
        });
        outcome.status == Status::Ok && ok_with_image(&outcome.stdout)
    });
    h.push(Series { samples, elapsed, ..Series::new(Suite::Native, ours, Who::Ours, 1) });
    let warm_layout = jailer
        .jail
        .layout_with(&[crate::jail::ExtraBind { source: built.clone(), target: PYTHON_DATA_INSIDE.into() }])?;
    warm_python_data(h, jailer, warm_layout, &argv, &limits, &inside, runs, ours)?;
    let host_runner = super::path_str(&built.join("runner.py"));
    let program = strings(&[SYSTEM_PYTHON, "-I", "-B", &host_runner]);
    if let Some(bin) = bwrap_bin {
        let case = "python-data: the same, bwrap --unshare-all";
        let mut argv = bwrap(bin, &[]);
        let data = super::path_str(jailer.data.path());
        let at = argv.len();
        let built = super::path_str(&built);
        argv.splice(at..at, strings(&["--ro-bind", &built, &built, "--ro-bind", &data, "/data"]));
        argv.extend(program.iter().cloned());
        process_series(h, Suite::Native, case, Who::Peer, 1, runs, &argv, &inside);
        h.ratio(Suite::Native, ours, case, 1);
    }
    let floor = "python-data: the same, python3 with no isolation";
    let host = input(&super::path_str(&csv));
    process_series(h, Suite::Native, floor, Who::Floor, 1, runs, &program, &host);
    h.ratio(Suite::Native, ours, floor, 1);
    reused_python(h, &built, &host, runs)
}

/// Steps in a python-data session (`NativeSession`): `x = 1`, and a
/// groupby of the 1 MB CSV the session loaded in its first step, each timed
/// from the step's arrival to its outcome.
fn session_steps(
    h: &mut Harness,
    runtime: &tokio::runtime::Runtime,
    pool: &Arc<crate::jail::WarmPool>,
    jailer: &Jailer,
    limits: &Limits,
    runs: usize,
) -> anyhow::Result<()> {
    let session = runtime
        .block_on(pool.open_session(jailer.data.path(), true, limits))
        .map_err(|e| anyhow::anyhow!("opening a python-data session: {e}"))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let step = |code: &str| {
        let input = serde_json::json!({"code": code}).to_string().into_bytes();
        let t = Instant::now();
        let outcome = runtime.block_on(session.step(input, limits, t, &cancel));
        super::Sample { latency: t.elapsed(), ok: outcome.status == Status::Ok }
    };
    let loaded = step("import pandas as pd\ndf = pd.read_csv('/data/sales.csv')\nlen(df)");
    anyhow::ensure!(loaded.ok, "the session's first step failed");
    let steps = runs * 10;
    for (case, code) in [
        ("python-data session: step `x = 1`", "x = 1"),
        ("python-data session: step, groupby of the loaded 1 MB CSV", "df.groupby('region')['amount'].mean()"),
    ] {
        let started = Instant::now();
        let samples: Vec<_> = (0..steps).map(|_| step(code)).collect();
        h.push(Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Native, case, Who::Ours, 1) });
    }
    Ok(())
}

/// The floor of any per-call isolation: the same call in one Python process
/// warmed as a warm jail is and then reused for every call (a Jupyter-like
/// kernel, no isolation, no new process), timed from the request line
/// written to the answer line read.
fn reused_python(h: &mut Harness, built: &Path, input: &[u8], runs: usize) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let script = r#"
import json, os, sys
sys.path[:0] = [sys.argv[1]]
os.environ["MPLCONFIGDIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mpl-{os.getpid()}")
import runner
runner.warm_up()
for line in sys.stdin:
    request = json.loads(line)
    scope = {"__name__": "__main__", "args": request.get("args") or {}}
    answer = {"result": runner.result_json(runner.run(request["code"], scope))}
    runner.pictures(answer)
    runner.sys.modules["matplotlib.pyplot"].close("all")
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"#;
    let mut child = std::process::Command::new(PYTHON)
        .args(["-I", "-B", "-c", script, &super::path_str(built)])
        .env("MPLBACKEND", "Agg")
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        anyhow::bail!("python3's pipes");
    };
    let mut stdout = std::io::BufReader::new(stdout);
    let case = "python-data: the same, one warm python3 reused for every call (no isolation)";
    let (mut samples, started) = (Vec::with_capacity(runs), Instant::now());
    let mut line = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        stdin.write_all(input)?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        line.clear();
        stdout.read_line(&mut line)?;
        samples.push(super::Sample { latency: t.elapsed(), ok: line.contains(r#""images":"#) });
    }
    let elapsed = started.elapsed();
    drop(stdin);
    let _ = child.wait();
    h.push(Series { samples, elapsed, ..Series::new(Suite::Native, case, Who::Floor, 1) });
    h.ratio(Suite::Native, "python-data: the same, warm jail (imagentx)", case, 1);
    Ok(())
}

/// The same call through a warm jail (`crate::jail::WarmPool`, what `serve`
/// does when it keeps python-data warm), each call timed from its arrival to
/// its outcome with a warm jail ready (the wait for one is not timed: a pool
/// of two serves about two calls per warm-up time, ~0.8 s of a core; calls
/// beyond run fresh). Also the memory a ready warm jail holds.
#[allow(clippy::too_many_arguments)]
fn warm_python_data(
    h: &mut Harness,
    jailer: &Jailer,
    layout: crate::jail::Layout,
    argv: &[String],
    limits: &Limits,
    input: &[u8],
    runs: usize,
    fresh: &str,
) -> anyhow::Result<()> {
    let mut env = crate::jail::environment(&[]);
    env.extend(
        [("IMAGENTX_WARM", "1"), ("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1")]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let spec = crate::jail::WarmSpec {
        tool: "python-data".into(),
        argv: argv.to_vec(),
        env,
        layout: Some(Arc::new(layout)),
        limits: Limits { memory_bytes: 512 << 20, cpu_share: 1.0, ..limits.clone() },
    };
    let pool = crate::jail::WarmPool::new(Arc::clone(&jailer.jail), spec, 2);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ready = |pool: &crate::jail::WarmPool| {
        let until = Instant::now() + Duration::from_secs(60);
        while pool.counts().0 == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let case = "python-data: the same, warm jail (imagentx)";
    let (mut samples, mut busy) = (Vec::with_capacity(runs), Duration::ZERO);
    let mut memory = Vec::new();
    for _ in 0..runs {
        ready(&pool);
        memory.push(pool.counts().2 / pool.counts().0.max(1) as u64);
        let t = Instant::now();
        let served = runtime.block_on(pool.serve(jailer.data.path(), true, limits, input, t, None));
        let latency = t.elapsed();
        busy += latency;
        let ok = served.is_some_and(|o| o.status == Status::Ok && o.stdout.windows(9).any(|w| w == br#""images":"#));
        samples.push(super::Sample { latency, ok });
    }
    session_steps(h, &runtime, &pool, jailer, limits, runs)?;
    pool.stop(Duration::from_secs(5));
    memory.sort_unstable();
    let per_jail = memory.get(memory.len() / 2).copied().unwrap_or(0);
    h.push(Series {
        samples,
        elapsed: busy,
        peak_memory_bytes: Some(per_jail),
        memory_of: "one ready warm jail (its cgroup)",
        ..Series::new(Suite::Native, case, Who::Ours, 1)
    });
    h.ratio(Suite::Native, case, fresh, 1);
    Ok(())
}

/// What users' volumes (`crate::volume`) cost: making and mounting one, a
/// call's hold on a mounted one, and a native tool's 1 GiB write in 64 KiB
/// chunks into its volume beside the same write into a plain directory on the
/// same file system, alternating runs.
fn volumes(h: &mut Harness, jailer: &Jailer) -> anyhow::Result<()> {
    use crate::volume::{DiskSize, VolumeMode, VolumeSpace, Volumes};
    let root = tempfile::tempdir_in(h.scratch.path())?;
    std::fs::create_dir_all(root.path().join("users"))?;
    let volumes = match Volumes::open(root.path(), VolumeMode::Ext4Image, VolumeSpace::Sparse) {
        Ok(Some(v)) => v,
        Ok(None) | Err(_) => {
            h.skip("data volumes: this host cannot mount them");
            return Ok(());
        }
    };
    let size = DiskSize { bytes: 2 << 30, files: 100_000 };
    let users = h.size.pick(20, 5, 1);
    let (mut made, mut mounted, mut held) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..users {
        let user = format!("u{i}");
        let t = Instant::now();
        drop(volumes.hold(&user, Some(size))?);
        made.push(t.elapsed());
        let t = Instant::now();
        for _ in 0..100 {
            drop(volumes.hold_if_mounted(&user, size));
        }
        held.push(t.elapsed() / 100);
    }
    volumes.unmount_idle(Duration::ZERO);
    for i in 0..users {
        let t = Instant::now();
        drop(volumes.hold(&format!("u{i}"), Some(size))?);
        mounted.push(t.elapsed());
    }
    for (name, mut v, unit, scale) in [
        ("data volume: make (2 GiB, 100k files) and mount, a user's first use", made, "ms", 1e3),
        ("data volume: mount an existing one, first use after start or idling", mounted, "ms", 1e3),
        ("data volume: a call's hold on a mounted one", held, "µs", 1e6),
    ] {
        v.sort();
        h.figure(Suite::Native, format!("{name}, median"), v[v.len() / 2].as_secs_f64() * scale, unit, "");
    }

    let runs = h.size.pick(5, 2, 0);
    if runs == 0 {
        h.skip("1 GiB native writes: not in --tiny runs");
        return Ok(());
    }
    let mut limits = jailer.limits("premium", Duration::from_secs(60))?;
    limits.data_quota_bytes = size.bytes;
    let plain = tempfile::tempdir_in(h.scratch.path())?;
    jailer.jail.prepare_data_dir(plain.path())?;
    let user_dir = root.path().join("users/writer");
    let hold = volumes.hold("writer", Some(size))?;
    jailer.jail.prepare_data_dir(&user_dir)?;
    let write =
        strings(&["/bin/sh", "-c", "dd if=/dev/zero of=/data/big bs=64k count=16384 2>/dev/null && rm /data/big"]);
    let case = "native dd of 1 GiB in 64 KiB chunks to /data";
    let mut series = ["in the user's volume", "in a plain directory (no per-write cap)"]
        .map(|label| Series::new(Suite::Native, format!("{case}, {label}"), Who::Ours, 1));
    for _ in 0..runs {
        for (i, dir) in [user_dir.as_path(), plain.path()].into_iter().enumerate() {
            let t = Instant::now();
            let ok = jailer.run_in(&crate::report::new_execution_id(), dir, &write, &limits).status == Status::Ok;
            series[i].samples.push(super::Sample { latency: t.elapsed(), ok });
        }
    }
    for mut s in series {
        s.elapsed = s.samples.iter().map(|s| s.latency).sum();
        h.push(s);
    }
    h.ratio(
        Suite::Native,
        &format!("{case}, in the user's volume"),
        &format!("{case}, in a plain directory (no per-write cap)"),
        1,
    );
    drop(hold);
    Ok(())
}

/// Where the jail's time goes: medians of the sequential `/bin/true` runs,
/// from the supervisor's clock and the jail's own milestones.
fn breakdown(h: &mut Harness, timings: &[Timings]) {
    if timings.is_empty() {
        return;
    }
    type Step = (&'static str, fn(&Timings) -> Duration);
    let steps: [Step; 8] = [
        ("cgroup: make the run's cgroups, write limits", |t| t.cgroup),
        ("clone: pipes, plan, clone into new namespaces", |t| t.clone),
        ("attach: id maps", |t| t.attach),
        ("mounts: the root's mount steps", |t| t.mounts),
        ("join: the tool moves into its cgroup", |t| t.join),
        ("confine: pivot_root, rlimits, creds, Landlock, seccomp", |t| t.confine),
        ("program + namespaces' teardown", |t| t.program),
        ("cleanup: read the cgroup's figures, remove it", |t| t.cleanup),
    ];
    for (name, step) in steps {
        let mut v: Vec<Duration> = timings.iter().map(step).collect();
        v.sort();
        let median = v[v.len() / 2];
        h.figure(Suite::Native, format!("jail step, /bin/true median: {name}"), median.as_secs_f64() * 1e3, "ms", "");
    }
}
