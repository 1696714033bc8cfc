//! Load on the real HTTP service over loopback: `imagentx-sandbox serve` runs
//! as its own process (release build), and 1, 10, 100 and 1,000 concurrent
//! clients (keep-alive connections, one request at a time each) call a trivial
//! tool and a realistic one. Reports latency percentiles, calls per second,
//! errors, 429s and the server's memory, then checks that every answered call
//! was recorded in the database. When `wrk` is installed it is run against the
//! same endpoint in the same run, as a cross-check of this harness.
//!
//! `cargo bench --bench http_load` (`-- --quick` for 2 s per row instead of 8 s).

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const CONFIG: &str = r#"
# A tier for load: the caps under test are the server's, not one user's.
[tiers.bench]
memory_bytes = 268435456
cpu = 1.0
pids = 10
nofile_soft = 1024
nofile_hard = 2048
tmp_bytes = 104857600
concurrent_calls = 100000
requests_per_second = 10000000
"#;

const TEXT: &str = "The quick brown fox jumps over the lazy dog. A sandbox runs an agent's tool calls \
safely and fast, for many users at once. Tools compiled to WebAssembly run in wasmtime with fuel \
and memory limits, a per-user preopened directory and no network. ";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn start(dir: &Path) -> (Server, String, String) {
    std::fs::write(dir.join("bench.toml"), CONFIG).unwrap();
    let user = |args: &[&str]| {
        let out =
            bin().args(args).arg("--data-dir").arg(dir).arg("--config").arg(dir.join("bench.toml")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let admin = user(&["user", "add", "root", "--admin", "--tier", "premium"]);
    let key = user(&["user", "add", "bench", "--tier", "bench"]);
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let child = bin()
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir)
        .arg("--config")
        .arg(dir.join("bench.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(&addr).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    (Server { child, addr }, admin, key)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build(connector)
}

async fn send(
    client: &HttpClient,
    addr: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Bytes,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(body))
        .unwrap();
    match client.request(req).await {
        Ok(r) => {
            let status = r.status();
            (status, r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default())
        }
        Err(e) => (StatusCode::from_u16(599).unwrap(), Bytes::from(format!("client error: {e:?}"))),
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    ok: u64,
    too_many: u64,
    errors: u64,
}

impl Tally {
    /// One answer: `ok` only for a 200 whose report says `ok`; the first few
    /// errors of a client are printed, so that a row's errors can be told apart.
    fn count(&mut self, latency: Duration, status: StatusCode, answer: &[u8]) {
        self.latencies.push(latency);
        match status {
            StatusCode::OK if answer.windows(13).any(|w| w == br#""status":"ok""#) => self.ok += 1,
            StatusCode::TOO_MANY_REQUESTS => self.too_many += 1,
            _ => {
                self.errors += 1;
                if self.errors <= 3 {
                    eprintln!("error: {status}: {}", String::from_utf8_lossy(&answer[..answer.len().min(600)]));
                }
            }
        }
    }

    async fn merge(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
        let mut total = Tally::default();
        for task in tasks {
            let t = task.await.unwrap();
            total.latencies.extend(t.latencies);
            total.ok += t.ok;
            total.too_many += t.too_many;
            total.errors += t.errors;
        }
        total
    }
}

async fn load(
    addr: &str,
    key: &str,
    tool: &str,
    body: &Bytes,
    clients: usize,
    duration: Duration,
) -> (Tally, Duration) {
    let addr: Arc<str> = addr.into();
    let key: Arc<str> = key.into();
    let path: Arc<str> = format!("/v1/tools/{tool}/invoke").into();
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, key, path, body) = (addr.clone(), key.clone(), path.clone(), body.clone());
            tokio::spawn(async move {
                let client = client();
                let mut tally = Tally::default();
                while Instant::now() < until {
                    let t = Instant::now();
                    let (status, answer) = send(&client, &addr, Method::POST, &path, &key, body.clone()).await;
                    tally.count(t.elapsed(), status, &answer);
                }
                tally
            })
        })
        .collect();
    let total = Tally::merge(tasks).await;
    (total, started.elapsed())
}

/// An open loop: `clients` connections, together sending `rate` calls per
/// second on a fixed schedule whether or not earlier calls have returned.
/// A call sent late because the one before it had not returned is timed from
/// its scheduled time, so a server that falls behind is charged for the queue
/// (no coordinated omission); one that is on time is timed from its actual
/// send, so the timer's own lateness (tokio's timers tick in milliseconds)
/// is not charged to the server.
async fn open_loop(
    addr: &str,
    key: &str,
    tool: &str,
    body: &Bytes,
    clients: usize,
    rate: f64,
    duration: Duration,
) -> Tally {
    let addr: Arc<str> = addr.into();
    let key: Arc<str> = key.into();
    let path: Arc<str> = format!("/v1/tools/{tool}/invoke").into();
    let interval = Duration::from_secs_f64(clients as f64 / rate);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = t0 + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, key, path, body) = (addr.clone(), key.clone(), path.clone(), body.clone());
            tokio::spawn(async move {
                let client = client();
                let mut tally = Tally::default();
                let mut scheduled = t0 + interval.mul_f64(c as f64 / clients as f64);
                let mut behind = false;
                while scheduled < end {
                    tokio::time::sleep_until(scheduled).await;
                    let start = if behind { scheduled } else { tokio::time::Instant::now() };
                    let (status, answer) = send(&client, &addr, Method::POST, &path, &key, body.clone()).await;
                    tally.count(start.elapsed(), status, &answer);
                    behind = tokio::time::Instant::now() > scheduled + interval;
                    scheduled += interval;
                }
                tally
            })
        })
        .collect();
    Tally::merge(tasks).await
}

fn wrk(addr: &str, key: &str, tool: &str, body: &str, dir: &Path, secs: u64) -> Option<String> {
    Command::new("wrk").arg("--version").output().ok()?;
    let script = dir.join("post.lua");
    let escaped = body.replace('\\', "\\\\").replace('"', "\\\"");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = \"{escaped}\"\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .ok()?;
    let out = Command::new("wrk")
        .args(["-t2", "-c100", &format!("-d{secs}s"), "--latency", "-s"])
        .arg(&script)
        .arg(format!("http://{addr}/v1/tools/{tool}/invoke"))
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // 1,000 client connections need 1,000 descriptors here too.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let secs = if quick { 2 } else { 8 };
    let dir = tempfile::tempdir().unwrap();
    let (server, admin, key) = start(dir.path());
    let pid = server.child.id();
    let setup = client();
    for (guest, name) in [("sdk-probe", "trivial"), ("word-stats", "realistic")] {
        let path = format!("/v1/tools?name={name}");
        let (status, body) =
            send(&setup, &server.addr, Method::POST, &path, &admin, common::guest_bytes(guest).into()).await;
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    }
    let trivial = r#"{"input":{"op":"echo","text":"hi"}}"#.to_owned();
    let realistic = serde_json::json!({"input": {"text": TEXT.repeat(8)}}).to_string();
    println!("HTTP load, {secs} s per row, server pid {pid}, {}", std::env::consts::ARCH);
    println!(
        "\n| tool | clients | calls | calls/s | p50 ms | p90 ms | p99 ms | max ms | ok | 429 | errors | server RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut answered_ok = 0;
    for (tool, body) in [("trivial", &trivial), ("realistic", &realistic)] {
        let body = Bytes::from(body.clone());
        // Warm up: connections, pool slots, the tool's first instances.
        load(&server.addr, &key, tool, &body, 10, Duration::from_millis(500)).await.0.ok.to_string();
        for clients in [1, 10, 100, 1000] {
            let (mut t, elapsed) = load(&server.addr, &key, tool, &body, clients, Duration::from_secs(secs)).await;
            t.latencies.sort();
            let n = t.latencies.len();
            let at = |q: f64| t.latencies[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e3;
            println!(
                "| {tool} | {clients} | {n} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {:.0} |",
                n as f64 / elapsed.as_secs_f64(),
                at(0.5),
                at(0.9),
                at(0.99),
                at(1.0),
                t.ok,
                t.too_many,
                t.errors,
                rss_mib(pid, "VmRSS:"),
            );
            answered_ok += t.ok;
        }
    }

    // Below saturation: the latency a caller sees when the server keeps up.
    println!("\nOpen loop, 100 clients, trivial tool, calls sent on a fixed schedule:\n");
    println!("| target calls/s | calls | p50 ms | p90 ms | p99 ms | max ms | ok | 429 | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let body = Bytes::from(trivial.clone());
    for rate in [500.0, 1000.0, 2000.0, 3000.0] {
        let mut t = open_loop(&server.addr, &key, "trivial", &body, 100, rate, Duration::from_secs(secs)).await;
        t.latencies.sort();
        let n = t.latencies.len();
        let at = |q: f64| t.latencies[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e3;
        println!(
            "| {rate:.0} | {n} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} |",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0),
            t.ok,
            t.too_many,
            t.errors
        );
        answered_ok += t.ok;
    }
    println!("\nserver peak RSS (VmHWM): {:.0} MiB", rss_mib(pid, "VmHWM:"));

    // Durability: every call answered `ok` is in the database.
    let conn = rusqlite::Connection::open(dir.path().join("sandbox.db")).unwrap();
    let stored: u64 = conn.query_row("SELECT count(*) FROM executions WHERE status = 'ok'", [], |r| r.get(0)).unwrap();
    println!(
        "executions recorded with status ok: {stored}; answered ok in the timed rows: {answered_ok} (plus warm-ups)"
    );
    assert!(stored >= answered_ok, "an answered call was not recorded");

    match wrk(&server.addr, &key, "trivial", &trivial, dir.path(), secs) {
        Some(report) => println!("\nwrk -t2 -c100 -d{secs}s on the trivial tool, same server:\n```\n{report}```"),
        None => println!("\n(wrk not installed: `apt-get install wrk` for the cross-check)"),
    }
}
