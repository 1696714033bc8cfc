//! The benchmark harness behind `imagentx-sandbox bench`: every suite of
//! BENCHMARKS.md, with the peers a user would reach for instead measured in
//! the same run, a table printed as it goes, and `bench-report/` written at
//! the end (raw samples, a summary, a Markdown report, SVG plots).
//!
//! ```text
//! bench::main ──> wasm.rs      in-process calls, restart, cold compile, 1,000 in flight,
//!             │                one-shot processes (our CLI, the wasmtime CLI, fork/exec)
//!             ├─> shared.rs    the file accounting on and off; CPU turns by user and by call
//!             ├─> http.rs      the real server as its own process: create-to-first-result,
//!             │                a ramp of 1 → 1,000 keep-alive clients, wrk beside it
//!             ├─> native.rs    the jail, bubblewrap, nsjail and fork/exec at 1/2/8/32 in flight
//!             ├─> density.rs   idle and running free-tier sandboxes per GiB
//!             ├─> sessions.rs  code sessions: warm steps beside fresh interpreters, idle memory
//!             ├─> teardown.rs  killing and reclaiming a runaway sandbox
//!             ├─> count.rs     instructions per call under callgrind (`--instructions`)
//!             └─> report.rs    samples.csv, summary.json, report.md, plots (svg.rs)
//! ```
//!
//! Speed is measured here, never asserted: a suite that fails to measure
//! records its failures in the success rate, and the harness goes on.

mod behaviour;
mod count;
mod density;
mod http;
mod mcp;
mod native;
mod nodes;
mod ops;
mod ops_load;
pub mod postgres;
mod report;
mod sessions;
mod shared;
mod stores;
pub mod svg;
mod teardown;
pub mod wasm;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

pub use count::count_child;

/// How much to measure: the full run (≤ 15 minutes on 2 cores), a smoke run
/// of about a minute, or a tiny one that only proves the harness works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    Full,
    Quick,
    Tiny,
}

impl Size {
    /// Picks the count for this size.
    pub fn pick<T>(self, full: T, quick: T, tiny: T) -> T {
        match self {
            Size::Full => full,
            Size::Quick => quick,
            Size::Tiny => tiny,
        }
    }
}

/// The suites, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    Wasm,
    Http,
    Native,
    Density,
    Teardown,
    Mcp,
    Sessions,
    Ops,
    Behaviour,
}

impl Suite {
    pub const ALL: [Suite; 9] = [
        Suite::Wasm,
        Suite::Http,
        Suite::Native,
        Suite::Density,
        Suite::Teardown,
        Suite::Mcp,
        Suite::Sessions,
        Suite::Ops,
        Suite::Behaviour,
    ];

    fn title(self) -> &'static str {
        match self {
            Suite::Wasm => "WASM in-process, and one-shot processes",
            Suite::Http => "HTTP over loopback",
            Suite::Native => "native jail",
            Suite::Density => "density",
            Suite::Teardown => "teardown",
            Suite::Mcp => "MCP",
            Suite::Sessions => "code sessions",
            Suite::Ops => "operations at scale (backup, restore, quick_check)",
            Suite::Behaviour => "behaviour analysis (labelled replay, cost per call)",
        }
    }
}

/// `imagentx-sandbox bench`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A smoke run of under a minute instead of the full one (about 3 minutes).
    #[arg(long, conflicts_with = "tiny")]
    pub quick: bool,
    /// A few samples per case: proves the harness works, the figures mean nothing.
    #[arg(long)]
    pub tiny: bool,
    /// Where the report goes.
    #[arg(long, default_value = "bench-report")]
    pub out: PathBuf,
    /// Where the built test guests are (`probe.wasm`, `sdk_probe.wasm`); `scripts/bench` builds them.
    #[arg(long, default_value = "target/guests/wasm32-wasip2/release")]
    pub guests: PathBuf,
    /// Where the interpreter tools are (`python.wasm`); `scripts/build-interpreters` builds them.
    #[arg(long, default_value = "target/interpreters")]
    pub interpreters: PathBuf,
    /// Only these suites (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub suites: Vec<Suite>,
    /// Also count instructions per in-process call under valgrind's callgrind (exact, slow).
    #[arg(long)]
    pub instructions: bool,
    /// Internal: one counted run under callgrind (`CASE:N`).
    #[arg(long, hide = true)]
    pub count_child: Option<String>,
}

impl BenchArgs {
    fn size(&self) -> Size {
        if self.tiny {
            Size::Tiny
        } else if self.quick {
            Size::Quick
        } else {
            Size::Full
        }
    }
}

/// Whose figure a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// This project.
    Ours,
    /// The tool a user would use instead.
    Peer,
    /// No isolation at all: the floor.
    Floor,
}

/// One timed operation.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub latency: Duration,
    pub ok: bool,
}

/// A case measured: its samples and what it cost.
#[derive(Debug, Clone)]
pub struct Series {
    pub suite: Suite,
    pub case: String,
    pub who: Who,
    /// Operations in flight at once (clients, threads, calls).
    pub concurrency: usize,
    pub samples: Vec<Sample>,
    /// Wall time of the measured part: throughput is samples / elapsed.
    pub elapsed: Duration,
    pub peak_memory_bytes: Option<u64>,
    /// Whose memory `peak_memory_bytes` is.
    pub memory_of: &'static str,
}

/// A series' summary, as the table, the JSON and the Markdown show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub suite: Suite,
    pub case: String,
    pub who: Who,
    pub concurrency: usize,
    pub n: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub throughput_per_s: f64,
    pub success_rate: f64,
    pub peak_memory_mib: Option<f64>,
    pub memory_of: &'static str,
}

impl Summary {
    /// p50, p90, p99, max, throughput and success rate, as the tables show them.
    pub fn figures(&self) -> [String; 6] {
        [
            human_us(self.p50_us),
            human_us(self.p90_us),
            human_us(self.p99_us),
            human_us(self.max_us),
            human_rate(self.throughput_per_s),
            format!("{:.1}%", self.success_rate * 100.0),
        ]
    }
}

impl Series {
    pub fn new(suite: Suite, case: impl Into<String>, who: Who, concurrency: usize) -> Self {
        Self {
            suite,
            case: case.into(),
            who,
            concurrency,
            samples: Vec::new(),
            elapsed: Duration::ZERO,
            peak_memory_bytes: None,
            memory_of: "",
        }
    }

    pub fn memory(mut self, bytes: Option<u64>, of: &'static str) -> Self {
        self.peak_memory_bytes = bytes;
        self.memory_of = of;
        self
    }

    /// Latencies sorted, in microseconds.
    pub fn sorted_us(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.samples.iter().map(|s| s.latency.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn summary(&self) -> Summary {
        let sorted = self.sorted_us();
        let n = sorted.len();
        let at = |q: f64| if n == 0 { f64::NAN } else { sorted[((n as f64 * q) as usize).min(n - 1)] };
        let ok = self.samples.iter().filter(|s| s.ok).count();
        Summary {
            suite: self.suite,
            case: self.case.clone(),
            who: self.who,
            concurrency: self.concurrency,
            n,
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            max_us: sorted.last().copied().unwrap_or(f64::NAN),
            throughput_per_s: if self.elapsed.is_zero() { f64::NAN } else { n as f64 / self.elapsed.as_secs_f64() },
            success_rate: if n == 0 { 0.0 } else { ok as f64 / n as f64 },
            peak_memory_mib: self.peak_memory_bytes.map(|b| b as f64 / (1u64 << 20) as f64),
            memory_of: self.memory_of,
        }
    }
}

/// A single figure that is not a latency distribution: a ratio, a density,
/// an instruction count.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    pub suite: Suite,
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub note: String,
}

/// What a run collects, and the table it prints as it goes.
pub struct Harness {
    pub size: Size,
    pub guests: PathBuf,
    pub interpreters: PathBuf,
    pub series: Vec<Series>,
    pub figures: Vec<Figure>,
    /// Peers or suites not measured, each with the reason.
    pub skipped: Vec<String>,
    /// Suites that failed to run at all, with the error.
    pub failed: Vec<String>,
    /// A scratch directory for the run.
    pub scratch: tempfile::TempDir,
}

impl Harness {
    /// Records a series and prints its row.
    pub fn push(&mut self, series: Series) {
        let s = series.summary();
        let [p50, p90, p99, max, rate, ok] = s.figures();
        let mem = s.peak_memory_mib.map_or("-".to_owned(), |m| format!("{m:.1}M"));
        let (case, conc, n) = (truncate(&s.case, 58), s.concurrency, s.n);
        println!("  {case:<58} {conc:>5} {n:>6} {p50:>9} {p90:>9} {p99:>9} {max:>9} {rate:>9} {ok:>6} {mem:>8}");
        self.series.push(series);
    }

    /// Records a figure and prints it.
    pub fn figure(&mut self, suite: Suite, name: impl Into<String>, value: f64, unit: &'static str, note: &str) {
        let name = name.into();
        println!(
            "  {name}: {} {unit}{}",
            human_value(value),
            if note.is_empty() { String::new() } else { format!(" ({note})") }
        );
        self.figures.push(Figure { suite, name, value, unit, note: note.to_owned() });
    }

    /// A peer or part not measured, said plainly.
    pub fn skip(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("  skipped: {line}");
        self.skipped.push(line);
    }

    /// The ratio of two series' medians measured in this run, as a figure.
    pub fn ratio(&mut self, suite: Suite, ours: &str, peer: &str, concurrency: usize) {
        let find = |case: &str| {
            self.series
                .iter()
                .find(|s| s.suite == suite && s.case == case && s.concurrency == concurrency)
                .map(Series::summary)
        };
        if let (Some(a), Some(b)) = (find(ours), find(peer)) {
            let note = format!("p50 {} vs {}, same run", human_us(a.p50_us), human_us(b.p50_us));
            self.figure(
                suite,
                format!("{ours} ÷ {peer} (p50, {concurrency} in flight)"),
                a.p50_us / b.p50_us,
                "×",
                &note,
            );
        }
    }

    fn header(&self, suite: Suite) {
        println!("\n== {} ==", suite.title());
        println!(
            "  {:<58} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8}",
            "case", "conc", "n", "p50", "p90", "p99", "max", "per s", "ok", "peak mem"
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_owned() } else { s.chars().take(n - 1).chain(['…']).collect() }
}

pub fn human_us(us: f64) -> String {
    if !us.is_finite() {
        "-".to_owned()
    } else if us < 1_000.0 {
        format!("{us:.1}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

fn human_rate(r: f64) -> String {
    if !r.is_finite() {
        "-".to_owned()
    } else if r >= 10_000.0 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn human_value(v: f64) -> String {
    if v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

/// A progress bar on stderr (only when stderr is a terminal: logs stay clean).
pub struct Progress {
    label: String,
    total: usize,
    done: AtomicUsize,
    last_draw: Mutex<Instant>,
    tty: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Self {
            label: label.into(),
            total,
            done: AtomicUsize::new(0),
            last_draw: Mutex::new(Instant::now()),
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.tty {
            return;
        }
        let mut last = self.last_draw.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < Duration::from_millis(100) && done < self.total {
            return;
        }
        *last = Instant::now();
        let width = 30;
        let filled = (done * width / self.total.max(1)).min(width);
        eprint!(
            "\r  [{}{}] {} {done}/{}\x1b[K",
            "#".repeat(filled),
            "-".repeat(width - filled),
            truncate(&self.label, 50),
            self.total
        );
        let _ = std::io::stderr().flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Times `n` calls of `f` one after another, after `warmup` untimed ones.
pub async fn sequential(
    label: &str,
    warmup: usize,
    n: usize,
    mut f: impl AsyncFnMut() -> bool,
) -> (Vec<Sample>, Duration) {
    for _ in 0..warmup {
        f().await;
    }
    let progress = Progress::new(label, n);
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let ok = f().await;
        samples.push(Sample { latency: t.elapsed(), ok });
        progress.tick();
    }
    (samples, started.elapsed())
}

/// Times `total` blocking calls of `f` spread over `threads` threads, each
/// taking the next call when its last one is done (a closed loop).
pub fn threaded(label: &str, threads: usize, total: usize, f: impl Fn() -> bool + Sync) -> (Vec<Sample>, Duration) {
    let progress = Progress::new(label, total);
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(total));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut mine = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let t = Instant::now();
                    let ok = f();
                    mine.push(Sample { latency: t.elapsed(), ok });
                    progress.tick();
                }
                samples.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            });
        }
    });
    let elapsed = started.elapsed();
    (samples.into_inner().unwrap_or_else(|e| e.into_inner()), elapsed)
}

/// Forgets a process's peak resident memory so that the next reading is
/// this series' own (`/proc/PID/clear_refs`, Linux ≥ 4.0).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// A process's peak resident memory (VmHWM) in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:").map(|k| k * 1024)
}

/// A process's resident memory (VmRSS) in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:").map(|k| k * 1024)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// Memory in use on the whole machine (MemTotal − MemAvailable), in bytes:
/// what a sandbox costs including the kernel's side of it.
pub fn machine_used() -> Option<u64> {
    Some(crate::host::meminfo_bytes("MemTotal:")?.saturating_sub(crate::host::meminfo_bytes("MemAvailable:")?))
}

/// Runs a program to its end, stdin fed, output discarded: whether it
/// exited 0.
pub fn run_process(argv: &[String], stdin: &[u8]) -> bool {
    let Some((program, args)) = argv.split_first() else { return false };
    let child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_empty() { Stdio::null() } else { Stdio::piped() })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    child.wait().is_ok_and(|s| s.success())
}

/// A program's peak resident memory, from one more run under GNU `time`.
/// (The harness cannot ask the kernel itself: a child forked from this
/// large process inherits its high-water mark through the exec.)
pub fn process_peak(argv: &[String], stdin: &[u8], scratch: &Path) -> Option<u64> {
    let time = which(&["/usr/bin/time"])?;
    let out = scratch.join("time.out");
    let mut wrapped = vec![path_str(&time), "-f".into(), "%M".into(), "-o".into(), path_str(&out)];
    wrapped.extend(argv.iter().cloned());
    run_process(&wrapped, stdin);
    let kib: u64 = std::fs::read_to_string(&out).ok()?.lines().last()?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// `runs` runs of a process, `threads` at a time (after a few untimed
/// ones); peak memory from one more run under GNU `time`.
#[allow(clippy::too_many_arguments)]
pub fn process_series(
    h: &mut Harness,
    suite: Suite,
    case: &str,
    who: Who,
    threads: usize,
    runs: usize,
    argv: &[String],
    input: &[u8],
) {
    for _ in 0..runs.min(3) {
        run_process(argv, input);
    }
    let (samples, elapsed) = threaded(case, threads, runs, || run_process(argv, input));
    let peak = process_peak(argv, input, h.scratch.path());
    if peak.is_none() && !h.skipped.iter().any(|s| s.starts_with("peak memory of processes")) {
        h.skip("peak memory of processes: GNU time is not installed (`apt-get install time`; `scripts/bench` does)");
    }
    h.push(
        Series { samples, elapsed, ..Series::new(suite, case, who, threads) }.memory(peak, "the process (GNU time)"),
    );
}

/// The first of `names` that is an executable file (a name without a
/// slash is looked up in `PATH`).
pub fn which(names: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        if name.contains('/') {
            Some(PathBuf::from(name)).filter(|p| executable(p))
        } else {
            std::env::split_paths(&path).map(|d| d.join(name)).find(|p| executable(p))
        }
    })
}

/// The machine the figures come from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub started_at: String,
    pub command: String,
    pub size: String,
    pub commit: String,
}

impl Machine {
    fn read(size: Size) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let total = crate::host::meminfo_bytes("MemTotal:").unwrap_or(0);
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .unwrap_or("")
                .trim()
                .to_owned(),
            memory_gib: total as f64 / (1u64 << 30) as f64,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            size: format!("{size:?}").to_lowercase(),
            commit,
        }
    }
}

/// `imagentx-sandbox bench`: runs the suites and writes the report. Runs
/// before any async runtime exists (the suites make their own).
pub fn main(args: BenchArgs) -> ExitCode {
    if let Some(spec) = &args.count_child {
        return count_child(&args, spec);
    }
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &BenchArgs) -> anyhow::Result<usize> {
    let size = args.size();
    let suites: Vec<Suite> = if args.suites.is_empty() { Suite::ALL.to_vec() } else { args.suites.clone() };
    for guest in ["probe.wasm", "sdk_probe.wasm"] {
        let path = args.guests.join(guest);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: build the test guests first (`scripts/bench` does), or pass --guests DIR",
            path.display()
        );
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    raise_nofile();
    let machine = Machine::read(size);
    println!(
        "imagentx-sandbox bench ({}): {} cores ({}), {:.0} GiB, Linux {}, commit {}",
        machine.size, machine.cpus, machine.cpu_model, machine.memory_gib, machine.kernel, machine.commit
    );
    let started = Instant::now();
    let mut h = Harness {
        size,
        guests: args.guests.clone(),
        interpreters: args.interpreters.clone(),
        series: Vec::new(),
        figures: Vec::new(),
        skipped: Vec::new(),
        failed: Vec::new(),
        scratch: tempfile::tempdir().context("a scratch directory")?,
    };
    for suite in suites {
        h.header(suite);
        let result = match suite {
            Suite::Wasm => wasm::run(&mut h, args.instructions),
            Suite::Http => http::run(&mut h),
            Suite::Native => native::run(&mut h),
            Suite::Density => density::run(&mut h),
            Suite::Teardown => teardown::run(&mut h),
            Suite::Mcp => mcp::run(&mut h),
            Suite::Sessions => sessions::run(&mut h),
            Suite::Ops => ops::run(&mut h),
            Suite::Behaviour => behaviour::run(&mut h),
        };
        if let Err(e) = result {
            println!("  FAILED: {e:#}");
            h.failed.push(format!("{}: {e:#}", suite.title()));
        }
    }
    let took = started.elapsed();
    report::write(&h, &machine, took, &args.out)?;
    println!(
        "\n{} series, {} figures in {:.0} s; report in {}",
        h.series.len(),
        h.figures.len(),
        took.as_secs_f64(),
        args.out.join("report.md").display()
    );
    Ok(h.failed.len())
}

/// 1,000 client connections and 32 jails in flight need descriptors.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A multi-threaded runtime for a suite's async parts.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// The built guest `name` (file name without `.wasm`).
fn guest(h: &Harness, name: &str) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let path = h.guests.join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path, bytes))
}

/// This binary (the harness runs the server and the CLI from it).
fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding this binary")
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
