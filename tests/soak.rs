//! The soak harness (issue 20): the real server (`serve`, a process of its
//! own) under a steady mix an agent platform sees, hostile calls included,
//! sampled every 10 s, then a verdict. CI runs a 2-minute smoke of it;
//! `scripts/soak --minutes 30 --clients 100` runs it long (release build).
//!
//! The mix, per request: tool calls that succeed (echo, some CPU work),
//! file writes and reads through the API, and hostile calls at a steady
//! share: a spin stopped by its timeout, a memory bomb, an output flood, a
//! panic, a native fork bomb (where the jail can run), and escape attempts
//! through the files API from a user of their own (who gets suspended).
//!
//! Every sample: the server's RSS, open descriptors, threads, calls in
//! flight, database and WAL size, scratch directories, warm cgroups, and
//! the interval's latency percentiles and answers. The verdict: no answer
//! outside each request's expected set, memory and descriptors flat within
//! a stated bound, no latency drift, nothing left behind. Samples go to
//! `target/soak/samples.csv` (or `IMAGENTX_SOAK_OUT`).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use server::http;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cli(args: &[&str], dir: &Path) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox")).args(args).arg("--data-dir").arg(dir).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A small deterministic generator (the mix is the same on every run).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One kind of request: its share (per mille) and what it may be answered.
struct Op {
    name: &'static str,
    per_mille: u64,
}

const OPS: &[Op] = &[
    Op { name: "echo", per_mille: 545 },
    Op { name: "work", per_mille: 60 },
    Op { name: "file", per_mille: 100 },
    Op { name: "spin", per_mille: 60 },
    Op { name: "bomb", per_mille: 60 },
    // Rare: each stores its capped output (a few MiB of database per flood).
    Op { name: "flood", per_mille: 5 },
    Op { name: "panic", per_mille: 40 },
    Op { name: "forkbomb", per_mille: 50 },
    Op { name: "escape", per_mille: 80 },
];

/// The statuses (of a report) or HTTP answers each request may get. A 429
/// (the tier's rate or calls in flight, the memory the heavy users' calls
/// hold) is allowed for the hostile mix: it is admission doing its job under
/// load. The light user's calls ("light": one at a time, far under its rate,
/// holding a few megabytes) must never be turned away, whatever the others
/// hold: that is the memory budget's per-user share and reserve at work.
fn expected(op: &str, answer: &str) -> bool {
    let allowed: &[&str] = match op {
        "light" => return answer == "ok",
        "echo" | "work" | "file" => &["ok"],
        "spin" => &["timeout", "cpu_limit"],
        "bomb" => &["memory_limit"],
        "flood" => &["ok"],
        "panic" => &["crashed"],
        "forkbomb" => &["pids_limit", "timeout", "memory_limit", "crashed", "tool_error", "ok"],
        "escape" => &["400 bad_path", "403 suspended"],
        _ => &[],
    };
    answer.starts_with("429 ") || allowed.contains(&answer)
}

struct Tally {
    latencies: Vec<f64>,
    answers: BTreeMap<(String, String), u64>,
}

async fn one(addr: &str, op: &str, key: &str, mallory: &str, client: usize, n: u64) -> String {
    let call = |input: Value| {
        let body = input.to_string();
        async move { http(addr, Method::POST, "/v1/tools/probe/invoke", key, body).await }
    };
    let a = match op {
        "echo" | "light" => call(json!({"input": {"op": "echo", "n": n}})).await,
        "work" => call(json!({"input": {"op": "work", "rounds": 200_000}})).await,
        "spin" => call(json!({"input": {"op": "spin"}, "timeout_ms": 200})).await,
        "bomb" => call(json!({"input": {"op": "alloc", "bytes": 5u64 << 28}})).await,
        "flood" => call(json!({"input": {"op": "flood", "bytes": 2 << 20}})).await,
        "panic" => call(json!({"input": {"op": "panic"}})).await,
        "forkbomb" => {
            let body = json!({"timeout_ms": 3000}).to_string();
            http(addr, Method::POST, "/v1/tools/forkbomb/invoke", key, body).await
        }
        "file" => {
            let path = format!("/v1/files/soak/c{client}-{}.txt", n % 16);
            let content = format!("client {client} request {n}\n").repeat(64);
            let put = http(addr, Method::PUT, &path, key, content.clone()).await;
            if put.status != StatusCode::OK {
                return format!("{} {}", put.status.as_u16(), put.error_code());
            }
            let got = http(addr, Method::GET, &path, key, "").await;
            assert_eq!(String::from_utf8_lossy(&got.body), content, "read back");
            return "ok".to_owned();
        }
        "escape" => {
            let a = http(addr, Method::GET, "/v1/files/%2Fetc%2Fpasswd", mallory, "").await;
            return format!("{} {}", a.status.as_u16(), a.error_code());
        }
        _ => unreachable!(),
    };
    match a.status {
        StatusCode::OK => a.json()["status"].as_str().unwrap().to_owned(),
        StatusCode::TOO_MANY_REQUESTS => format!("429 {}", a.error_code()),
        other => format!("{} {}", other.as_u16(), String::from_utf8_lossy(&a.body)),
    }
}

/// A JSON POST over a plain socket (the shared client sends no content type);
/// answers the whole response.
fn post_json(addr: &str, path: &str, key: &str, body: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

struct Sample {
    at_s: f64,
    rss_mib: f64,
    fds: u64,
    threads: u64,
    in_flight: u64,
    db_mib: f64,
    wal_mib: f64,
    scratch: u64,
    warm_cgroups: u64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Sample {
    const HEADER: &str =
        "at_s,rss_mib,fds,threads,in_flight,db_mib,wal_mib,scratch,warm_cgroups,requests,p50_ms,p99_ms";

    /// The values, in the order of [`Sample::HEADER`], for the log and the CSV.
    fn fields(&self) -> [String; 12] {
        [
            format!("{:.1}", self.at_s),
            format!("{:.2}", self.rss_mib),
            self.fds.to_string(),
            self.threads.to_string(),
            self.in_flight.to_string(),
            format!("{:.2}", self.db_mib),
            format!("{:.2}", self.wal_mib),
            self.scratch.to_string(),
            self.warm_cgroups.to_string(),
            self.requests.to_string(),
            format!("{:.2}", self.p50_ms),
            format!("{:.2}", self.p99_ms),
        ]
    }
}

/// The samples as four charts against time, beside the CSV: memory and
/// descriptors, latency, the database, the load.
fn plot(samples: &[Sample], dir: &Path, run: &str) {
    use imagentx_sandbox::bench::svg::{Axis, Chart, Line};
    let line = |name: &str, f: fn(&Sample) -> f64| Line {
        name: name.to_owned(),
        points: samples.iter().map(|s| (s.at_s / 60.0, f(s))).collect(),
    };
    let minutes = || Axis { label: "minutes", log: false, format: |v| format!("{v:.0}") };
    let charts = [
        (
            "soak-memory.svg",
            "server memory and descriptors",
            Axis { label: "MiB, count", log: false, format: |v| format!("{v:.0}") },
            vec![
                line("RSS (MiB)", |s| s.rss_mib),
                line("open descriptors", |s| s.fds as f64),
                line("threads", |s| s.threads as f64),
            ],
        ),
        (
            "soak-latency.svg",
            "echo latency per 10 s (429s included)",
            Axis { label: "ms (log scale)", log: true, format: |v| format!("{v}") },
            vec![line("p50", |s| s.p50_ms), line("p99", |s| s.p99_ms)],
        ),
        (
            "soak-database.svg",
            "database and write-ahead log",
            Axis { label: "MiB", log: false, format: |v| format!("{v:.0}") },
            vec![line("database", |s| s.db_mib), line("WAL", |s| s.wal_mib)],
        ),
        (
            "soak-load.svg",
            "load",
            Axis { label: "count", log: false, format: |v| format!("{v:.0}") },
            vec![
                line("requests answered per 10 s / 10", |s| s.requests as f64 / 10.0),
                line("calls in flight", |s| s.in_flight as f64),
                line("scratch directories", |s| s.scratch as f64),
                line("warm cgroups", |s| s.warm_cgroups as f64),
            ],
        ),
    ];
    for (file, what, y, lines) in charts {
        let chart = Chart { title: format!("Soak ({run}): {what}"), x: minutes(), y, lines };
        std::fs::write(dir.join(file), chart.svg()).unwrap();
    }
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().split(' ').next()?.parse().ok()).unwrap_or(0)
}

fn count(dir: impl AsRef<Path>) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.count() as u64)
}

fn size_mib(path: impl AsRef<Path>) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / (1 << 20) as f64)
}

fn warm_cgroups(pid: u32) -> u64 {
    let out = Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-name", &format!("warm-{pid}-*")])
        .output();
    out.map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().count() as u64)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + (x - mx) * (y - my), b + (x - mx).powi(2)));
    if den == 0.0 { 0.0 } else { num / den }
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_the_server_under_a_hostile_mix_and_judge_it() {
    let seconds = env_or("IMAGENTX_SOAK_SECONDS", 120);
    let clients = env_or("IMAGENTX_SOAK_CLIENTS", 16) as usize;
    let out_dir = std::env::var("IMAGENTX_SOAK_OUT")
        .map_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak"), Into::into);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let admin = cli(&["user", "add", "root", "--admin"], &data);
    let users: Vec<String> =
        (0..8).map(|i| cli(&["user", "add", &format!("agent{i}"), "--tier", "premium"], &data)).collect();
    let mallory = cli(&["user", "add", "mallory"], &data);
    let bob = cli(&["user", "add", "bob", "--tier", "standard"], &data);
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(&data)
        .env("IMAGENTX_INTERPRETERS", data.join("no-interpreters"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ERROR") || line.contains("panicked") {
                seen.lock().unwrap().push(line);
            }
        }
    });
    let server = common::StoppedOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the server did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe = http(&addr, Method::POST, "/v1/tools?name=probe", &admin, common::guest_bytes("probe")).await;
    assert_eq!(probe.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&probe.body));
    // The native fork bomb, where this host can jail native tools.
    let spec =
        json!({"runtime": "native", "name": "forkbomb", "argv": ["/bin/sh", "-c", "f() { f | f & }; f; sleep 5"]});
    let native = post_json(&addr, "/v1/tools", &admin, &spec.to_string());
    let with_native = native.starts_with("HTTP/1.1 201");
    if !with_native {
        eprintln!("soak: no native fork bomb: {native}");
    }

    let fds_before = count(format!("/proc/{pid}/fd"));
    let tally = Arc::new(Mutex::new(Tally { latencies: Vec::new(), answers: BTreeMap::new() }));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut workers: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, key, mallory, tally) =
                (addr.clone(), users[c % users.len()].clone(), mallory.clone(), tally.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                let mut n = 0u64;
                while Instant::now() < until {
                    let mut roll = rng.below(1000);
                    let op = OPS
                        .iter()
                        .find(|op| {
                            let hit = roll < op.per_mille;
                            roll = roll.saturating_sub(op.per_mille);
                            hit
                        })
                        .map_or("echo", |op| op.name);
                    let op = if op == "forkbomb" && !with_native { "echo" } else { op };
                    let at = Instant::now();
                    let answer = one(&addr, op, &key, &mallory, c, n).await;
                    let ms = at.elapsed().as_secs_f64() * 1e3;
                    {
                        let mut t = tally.lock().unwrap();
                        if op == "echo" {
                            t.latencies.push(ms);
                        }
                        *t.answers.entry((op.to_owned(), answer.clone())).or_default() += 1;
                    }
                    if answer.starts_with("429 ") {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    n += 1;
                }
            })
        })
        .collect();
    // The light user: a small call every 200 ms, beside the heavy ones.
    workers.push({
        let (addr, bob, tally) = (addr.clone(), bob.clone(), tally.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let answer = one(&addr, "light", &bob, &bob, clients, n).await;
                *tally.lock().unwrap().answers.entry(("light".to_owned(), answer)).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                n += 1;
            }
        })
    });

    let mut samples: Vec<Sample> = Vec::new();
    let mut requests_before = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(10).min(until.saturating_duration_since(Instant::now()))).await;
        let live = http(&addr, Method::GET, "/v1/live", &admin, "").await.json();
        let (mut lat, requests) = {
            let mut t = tally.lock().unwrap();
            (std::mem::take(&mut t.latencies), t.answers.values().sum::<u64>())
        };
        lat.sort_by(f64::total_cmp);
        samples.push(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_mib: proc_status(pid, "VmRSS:") as f64 / 1024.0,
            fds: count(format!("/proc/{pid}/fd")),
            threads: proc_status(pid, "Threads:"),
            in_flight: live["in_flight"].as_u64().unwrap_or(0),
            db_mib: size_mib(data.join("sandbox.db")),
            wal_mib: size_mib(data.join("sandbox.db-wal")),
            scratch: count(data.join("scratch")),
            warm_cgroups: warm_cgroups(pid),
            requests: requests - requests_before,
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
        });
        requests_before = requests;
        let fields = samples.last().unwrap().fields();
        let line: Vec<String> = Sample::HEADER.split(',').zip(&fields).map(|(name, v)| format!("{name} {v}")).collect();
        eprintln!("soak: {}", line.join(", "));
    }
    for w in workers {
        w.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live = http(&addr, Method::GET, "/v1/live", &admin, "").await.json();
    let fds_after = count(format!("/proc/{pid}/fd"));
    let scratch_after = count(data.join("scratch"));

    // The samples, for plots and the record.
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut csv = std::fs::File::create(out_dir.join("samples.csv")).unwrap();
    writeln!(csv, "{}", Sample::HEADER).unwrap();
    for s in &samples {
        writeln!(csv, "{}", s.fields().join(",")).unwrap();
    }
    plot(&samples, &out_dir, &format!("{seconds} s, {clients} clients"));
    let answers = tally.lock().unwrap().answers.clone();
    let mut summary = String::new();
    for ((op, answer), n) in &answers {
        summary += &format!("  {op:>9} → {answer}: {n}\n");
    }
    eprintln!("soak answers:\n{summary}");

    // The verdict.
    let unexpected: Vec<String> = answers
        .iter()
        .filter(|((op, answer), _)| !expected(op, answer))
        .map(|((op, answer), n)| format!("{op} → {answer} ({n})"))
        .collect();
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    let total: u64 = answers.values().sum();
    assert!(total > 100 * seconds / 10, "only {total} requests in {seconds} s");
    // Flat after the first third (warm-up: pools, caches, the allocator's
    // arenas). RSS swings by megabytes between samples and descriptors by
    // dozens (calls in flight hold them), so a slope means something over a
    // long run only; a short run checks the last third against the first.
    let third = (samples.len() / 3).max(1);
    let settled = &samples[third.min(samples.len() - 1)..];
    let per_min =
        |f: &dyn Fn(&Sample) -> f64| 60.0 * slope(&settled.iter().map(|s| (s.at_s, f(s))).collect::<Vec<_>>());
    let (rss_slope, fds_slope) = (per_min(&|s| s.rss_mib), per_min(&|s| s.fds as f64));
    let peak = |s: &[Sample]| s.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    let (first, last) = (&samples[..third], &samples[samples.len() - third..]);
    eprintln!(
        "soak verdict inputs: rss {rss_slope:+.2} MiB/min, fds {fds_slope:+.2}/min after warm-up; peak rss {:.1} \
         MiB first third, {:.1} last",
        peak(first),
        peak(last)
    );
    if seconds >= 600 {
        assert!(rss_slope < 1.0, "memory grows {rss_slope:.2} MiB a minute");
        assert!(fds_slope < 2.0, "descriptors grow {fds_slope:.2} a minute");
    } else {
        assert!(peak(last) <= peak(first) + 32.0, "memory grew from {:.1} to {:.1} MiB", peak(first), peak(last));
    }
    let p99 = |s: &[Sample]| s.iter().map(|s| s.p99_ms).fold(0.0, f64::max);
    assert!(p99(last) <= 3.0 * p99(first) + 20.0, "echo p99 drifted from {:.1} to {:.1} ms", p99(first), p99(last));
    // Nothing left behind once the load is gone.
    assert_eq!(live["in_flight"], 0, "{live}");
    assert!(fds_after <= fds_before + 16, "{fds_after} descriptors open after the load, {fds_before} before it");
    assert!(scratch_after <= 64, "{scratch_after} scratch directories left");
    let logged = errors.lock().unwrap().clone();
    assert!(logged.is_empty(), "the server logged errors: {logged:?}");
    drop(server);
    assert_eq!(warm_cgroups(pid), 0, "warm cgroups left after the server stopped");
}
