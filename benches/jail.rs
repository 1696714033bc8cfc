//! Start-up cost of the native jail, beside bubblewrap and plain fork/exec
//! measured in the same run.
//!
//! `cargo bench --bench jail` (as root; `-- --quick` for 50 runs a row instead
//! of 300). Prints a Markdown table of wall-clock percentiles per run, the
//! jail's own breakdown of where the time went, and how many jailed runs per
//! second the machine sustains with 1, 2 and 4 runs in flight. BENCHMARKS.md
//! holds a run of it; `scripts/bench jail` installs bubblewrap first.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imagentx_sandbox::jail::{Jail, JailConfig, NativeRun, Timings};
use imagentx_sandbox::policy::Policy;
use imagentx_sandbox::report::Status;

const PYTHON: [&str; 3] = ["/usr/bin/python3", "-c", "print(1)"];

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(name: &str, mut samples: Vec<Duration>, failures: usize) {
    samples.sort();
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {failures} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(percentile(&samples, 0.99)),
        ms(samples[samples.len() - 1]),
    );
}

/// Times `n` runs of `f` after a few warm-up runs; `f` answers success.
fn time(n: usize, mut f: impl FnMut() -> bool) -> (Vec<Duration>, usize) {
    for _ in 0..5 {
        f();
    }
    let mut samples = Vec::with_capacity(n);
    let mut failures = 0;
    for _ in 0..n {
        let t = Instant::now();
        if !f() {
            failures += 1;
        }
        samples.push(t.elapsed());
    }
    (samples, failures)
}

struct Runner {
    jail: Arc<Jail>,
    data: tempfile::TempDir,
    policy: Policy,
}

impl Runner {
    fn run(&self, argv: &[String]) -> (bool, Timings) {
        let limits = self.policy.resolve("standard", Some(Duration::from_secs(10))).unwrap();
        let id = imagentx_sandbox::report::new_execution_id();
        let outcome = self.jail.run(&NativeRun {
            id: &id,
            argv,
            env: &imagentx_sandbox::jail::environment(&[]),
            input: b"",
            data_dir: self.data.path(),
            data_writable: true,
            limits: &limits,
            layout: None,
        });
        (outcome.status == Status::Ok, outcome.timings)
    }
}

fn command(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// bubblewrap with every namespace it offers and a read-only /usr, the
/// closest view to ours it gives without extra setup.
fn bwrap(program: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = "bwrap --unshare-all --die-with-parent --ro-bind /usr /usr \
         --symlink usr/bin /bin --symlink usr/sbin /sbin --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
         --proc /proc --dev /dev --tmpfs /tmp"
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    argv.extend(program.iter().map(|s| s.to_string()));
    argv
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("the jail benchmark needs root (namespaces and cgroups); skipped");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 50 } else { 300 };
    let jail = Arc::new(Jail::new(JailConfig::default()).expect("the jail"));
    let runner = Arc::new(Runner { jail, data: tempfile::tempdir().unwrap(), policy: Policy::default() });
    let has_bwrap = Path::new("/usr/bin/bwrap").exists();
    let bwrap_uid = if has_bwrap {
        let argv = bwrap(&["/usr/bin/id", "-u"]);
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else {
        "-".to_owned()
    };

    println!("\nWall time per run, ms (cgroup {}, {} runs a row, sequential)\n", runner.jail.cgroup_version(), n);
    println!("| what | runs | p50 | p90 | p99 | max | failures |");
    println!("|---|---|---|---|---|---|---|");
    let mut breakdown: Vec<Timings> = Vec::new();
    let true_argv = vec!["/bin/true".to_owned()];
    let python_argv: Vec<String> = PYTHON.iter().map(|s| s.to_string()).collect();
    for (name, argv, program) in
        [("/bin/true", &true_argv, &["/bin/true"][..]), ("python3 -c 'print(1)'", &python_argv, &PYTHON[..])]
    {
        let (samples, failures) = time(n, || {
            let (ok, timings) = runner.run(argv);
            breakdown.push(timings);
            ok
        });
        row(&format!("imagentx jail: {name}"), samples, failures);
        if has_bwrap {
            let argv = bwrap(program);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (samples, failures) = time(n, || command(&argv));
            row(&format!("bwrap --unshare-all (uid {bwrap_uid} inside): {name}"), samples, failures);
        }
        let (samples, failures) = time(n, || command(program));
        row(&format!("fork/exec, no isolation: {name}"), samples, failures);
    }

    println!("\nWhere the jail's time goes (median of the /bin/true runs, ms)\n");
    let true_runs = &breakdown[5..5 + n];
    let median = |f: fn(&Timings) -> Duration| {
        let mut v: Vec<Duration> = true_runs.iter().map(f).collect();
        v.sort();
        ms(percentile(&v, 0.5))
    };
    println!("| cgroup | clone | attach | mounts | join | confine | program + teardown | cleanup | join p90 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let join_p90 = {
        let mut v: Vec<Duration> = true_runs.iter().map(|t| t.join).collect();
        v.sort();
        ms(percentile(&v, 0.9))
    };
    println!(
        "| {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {join_p90:.2} |",
        median(|t| t.cgroup),
        median(|t| t.clone),
        median(|t| t.attach),
        median(|t| t.mounts),
        median(|t| t.join),
        median(|t| t.confine),
        median(|t| t.program),
        median(|t| t.cleanup)
    );

    // A server holds much more memory than this benchmark; the clone copies
    // its page tables. Measure again with 1 GiB resident.
    let ballast: Vec<u8> = vec![1u8; 1 << 30];
    let mut heavy: Vec<Timings> = Vec::new();
    let (samples, failures) = time(n, || {
        let (ok, timings) = runner.run(&true_argv);
        heavy.push(timings);
        ok
    });
    std::hint::black_box(&ballast);
    drop(ballast);
    let mut clones: Vec<Duration> = heavy.iter().map(|t| t.clone).collect();
    clones.sort();
    println!(
        "\nWith 1 GiB resident in the calling process: /bin/true p50 {:.2} ms (clone p50 {:.2} ms), {failures} failures",
        {
            let mut s = samples.clone();
            s.sort();
            ms(percentile(&s, 0.5))
        },
        ms(percentile(&clones, 0.5))
    );

    println!("\nSustained jailed runs of /bin/true per second\n");
    println!("| in flight | runs | runs/s | failures |");
    println!("|---|---|---|---|");
    let seconds = if quick { 2 } else { 5 };
    for threads in [1, 2, 4] {
        let until = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let runner = Arc::clone(&runner);
                let argv = true_argv.clone();
                std::thread::spawn(move || {
                    let (mut runs, mut failures) = (0u64, 0u64);
                    while Instant::now() < until {
                        runs += 1;
                        if !runner.run(&argv).0 {
                            failures += 1;
                        }
                    }
                    (runs, failures)
                })
            })
            .collect();
        let (runs, failures) =
            handles.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |(a, b), (r, f)| (a + r, b + f));
        println!("| {threads} | {runs} | {:.0} | {failures} |", runs as f64 / started.elapsed().as_secs_f64());
    }
}
