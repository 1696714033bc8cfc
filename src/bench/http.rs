//! The HTTP service over loopback, the server its own process (this binary's
//! `serve`, every execution recorded in SQLite): create-to-first-result the
//! way the public agent-sandbox start-time benchmarks measure it (a new
//! connection per call; one at a time, staggered, all at once), then a
//! throughput ramp of 1 → 1,000 keep-alive clients, with `wrk` against the
//! same endpoint as a cross-check of this load generator.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::{Harness, Sample, Series, Suite, Who, peak_rss, reset_peak};

/// A tier for load: the caps under test are the server's, not one user's.
pub(super) const CONFIG: &str = r#"
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

const BODY: &str = r#"{"input":{"op":"echo","text":"hi"}}"#;
pub const RAMP: &str = "trivial SDK tool, keep-alive clients (closed loop)";

pub(super) struct Server {
    child: Child,
    pub(super) addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server; with `interpreters`, it registers the built-in tools
/// found there first (compiling them: tens of seconds the first time).
pub(super) fn start(dir: &Path, interpreters: Option<&Path>) -> anyhow::Result<(Server, String, String)> {
    let config = write_config(dir, "")?;
    let (admin, key) = add_users(dir, &config)?;
    Ok((serve(dir, &config, interpreters)?, admin, key))
}

/// `bench.toml` in `dir`: the load tier, then `extra` (more tables).
pub(super) fn write_config(dir: &Path, extra: &str) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.join("bench.toml");
    std::fs::write(&config, format!("{CONFIG}\n{extra}"))?;
    Ok(config)
}

/// An admin (`root`) and a user of the load tier (`bench`): their keys.
pub(super) fn add_users(dir: &Path, config: &Path) -> anyhow::Result<(String, String)> {
    add_users_with(dir, config, &[])
}

/// [`add_users`], with these environment variables (`IMAGENTX_STORE_URL`).
pub(super) fn add_users_with(dir: &Path, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<(String, String)> {
    let bin = super::this_binary()?;
    let user = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&bin)
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    Ok((
        user(&["user", "add", "root", "--admin", "--tier", "premium"])?,
        user(&["user", "add", "bench", "--tier", "bench"])?,
    ))
}

/// This binary's `serve` on `dir` with `config`, once it listens (and, with
/// `interpreters`, has registered the built-in tools).
pub(super) fn serve(dir: &Path, config: &Path, interpreters: Option<&Path>) -> anyhow::Result<Server> {
    serve_with(dir, config, interpreters, &[])
}

/// [`serve`], with these environment variables (`IMAGENTX_STORE_URL`).
pub(super) fn serve_with(
    dir: &Path,
    config: &Path,
    interpreters: Option<&Path>,
    env: &[(&str, &str)],
) -> anyhow::Result<Server> {
    let bin = super::this_binary()?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let child = Command::new(&bin)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir)
        .arg("--config")
        .arg(config)
        .env(crate::interpreters::DIR_VAR, interpreters.map_or_else(|| dir.join("no-interpreters"), Path::to_owned))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the server")?;
    let server = Server { child, addr };
    let wait = if interpreters.is_some() { 300 } else { 30 };
    let deadline = Instant::now() + Duration::from_secs(wait);
    while std::net::TcpStream::connect(&server.addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the server did not listen within {wait} s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // It listens before it has registered the built-in tools: wait for them.
    while interpreters.is_some() && !ready(&server.addr) {
        anyhow::ensure!(Instant::now() < deadline, "the server was not ready within {wait} s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(server)
}

/// Registers the `sdk_probe` guest as `trivial` (what the load calls).
pub(super) async fn register_trivial(h: &Harness, addr: &str, admin: &str) -> anyhow::Result<()> {
    let (_, module) = super::guest(h, "sdk_probe")?;
    let mut sender = connect(addr).await?;
    let (status, body) = send(&mut sender, Method::POST, "/v1/tools?name=trivial", admin, module.into()).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "registering the tool: {status} {}", String::from_utf8_lossy(&body));
    Ok(())
}

/// Whether `/readyz` answers 200 (the built-in tools registered).
fn ready(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return false };
    let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

pub(super) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub(super) async fn connect(addr: &str) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

pub(super) async fn send(
    sender: &mut Sender,
    method: Method,
    path: &str,
    key: &str,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(body))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// An answer counts when it is a 200 whose report says `ok`.
fn answered_ok(answer: &anyhow::Result<(StatusCode, Bytes)>) -> bool {
    matches!(answer, Ok((StatusCode::OK, body)) if body.windows(13).any(|w| w == br#""status":"ok""#))
}

/// One call from nothing: connect, send, read the whole answer.
async fn create_to_result(addr: &str, key: &str) -> Sample {
    let t = Instant::now();
    let answer = async {
        let mut sender = connect(addr).await?;
        send(&mut sender, Method::POST, "/v1/tools/trivial/invoke", key, Bytes::from_static(BODY.as_bytes())).await
    }
    .await;
    Sample { latency: t.elapsed(), ok: answered_ok(&answer) }
}

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let dir = h.scratch.path().join("http");
    std::fs::create_dir_all(&dir)?;
    // The interpreters over HTTP are measured in full runs only: registering
    // them compiles 40 MB of components.
    let interpreters = (!matches!(h.size, super::Size::Tiny)).then(|| h.interpreters.clone());
    let (server, admin, key) = start(&dir, interpreters.as_deref())?;
    let pid = server.child.id();
    let addr: Arc<str> = server.addr.as_str().into();
    let key: Arc<str> = key.into();
    rt.block_on(async {
        register_trivial(h, &addr, &admin).await?;
        for _ in 0..20 {
            create_to_result(&addr, &key).await; // the first instances, the key cache
        }
        anyhow::Ok(())
    })?;
    let mut answered = 0usize;

    let n = h.size.pick(100, 100, 5);
    let stagger = Duration::from_millis(10);
    for (case, mode) in [
        ("create-to-first-result, one at a time (new connection each)", 0),
        ("create-to-first-result, staggered 10 ms apart", 1),
        ("create-to-first-result, all at once", 2),
    ] {
        reset_peak(pid);
        let started = Instant::now();
        let samples: Vec<Sample> = rt.block_on(async {
            if mode == 0 {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(create_to_result(&addr, &key).await);
                }
                return v;
            }
            let mut set = tokio::task::JoinSet::new();
            for i in 0..n {
                let (addr, key) = (addr.clone(), key.clone());
                let at = tokio::time::Instant::now() + if mode == 1 { stagger * i as u32 } else { Duration::ZERO };
                set.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    create_to_result(&addr, &key).await
                });
            }
            set.join_all().await
        });
        let concurrency = if mode == 2 { n } else { 1 };
        let series =
            Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Http, case, Who::Ours, concurrency) };
        answered += series.samples.iter().filter(|s| s.ok).count();
        h.push(series.memory(peak_rss(pid), "server process"));
    }

    let clients = h.size.pick(&[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000][..], &[1, 10, 100, 1000], &[1, 4]);
    let seconds = h.size.pick(3.0, 1.0, 0.3);
    for &c in clients {
        reset_peak(pid);
        let (samples, elapsed) = rt.block_on(closed_loop(&addr, &key, c, Duration::from_secs_f64(seconds)));
        let series = Series { samples, elapsed, ..Series::new(Suite::Http, RAMP, Who::Ours, c) };
        answered += series.samples.iter().filter(|s| s.ok).count();
        h.push(series.memory(peak_rss(pid), "server process"));
    }

    // An open loop: calls due at a fixed rate whether or not the last ones
    // have answered, the way independent agents arrive.
    let (clients, rate) = (h.size.pick(100, 100, 4), h.size.pick(5_000.0, 5_000.0, 100.0));
    reset_peak(pid);
    let stop = stop_after(Duration::from_secs_f64(seconds));
    let (samples, elapsed) = rt.block_on(paced(&addr, &key, rate, clients, stop));
    let case = format!("trivial SDK tool, open loop at {rate} calls/s (latency from when due)");
    let series = Series { samples, elapsed, ..Series::new(Suite::Http, case, Who::Ours, clients) };
    answered += series.samples.iter().filter(|s| s.ok).count();
    h.push(series.memory(peak_rss(pid), "server process"));

    // Durability: every call answered `ok` is in the database (counted
    // before wrk adds its own).
    let conn = rusqlite::Connection::open(dir.join("sandbox.db"))?;
    let stored: i64 = conn.query_row("SELECT count(*) FROM executions WHERE status = 'ok'", [], |r| r.get(0))?;
    let lost = answered.saturating_sub(usize::try_from(stored).unwrap_or(0));
    h.figure(
        Suite::Http,
        "calls answered ok with no execution record",
        lost as f64,
        "calls",
        &format!("{answered} answered ok in the timed rows; {stored} recorded ok, warm-ups included"),
    );

    if interpreters.is_some() {
        rt.block_on(interpreter_rows(h, &addr, &key, pid))?;
    }

    match super::which(&["wrk"]) {
        Some(_) => wrk(h, &server.addr, &key, &dir, seconds.max(1.0).ceil() as u64)?,
        None => h.skip("wrk cross-check: not installed (`apt-get install wrk`; `scripts/bench` does)"),
    }

    Ok(())
}

/// The built-in interpreters over HTTP, one call at a time: on a kept-alive
/// connection, and from nothing (a new connection per call).
async fn interpreter_rows(h: &mut Harness, addr: &str, key: &str, pid: u32) -> anyhow::Result<()> {
    let mut sender = connect(addr).await?;
    let (_, tools) = send(&mut sender, Method::GET, "/v1/tools", key, Bytes::new()).await?;
    let tools: serde_json::Value = serde_json::from_slice(&tools)?;
    let registered = |name: &str| tools["tools"].as_array().is_some_and(|t| t.iter().any(|t| t["name"] == name));
    let n = h.size.pick(300, 100, 3);
    for (name, label, snippets) in super::wasm::SNIPPETS {
        if !registered(name) {
            h.skip(format!("the {label} tool over HTTP: the server did not register it (is it built?)"));
            continue;
        }
        let path = format!("/v1/tools/{name}/invoke");
        let body = |code: &str| Bytes::from(serde_json::json!({"input": {"code": code}}).to_string());
        for (i, code) in snippets.iter().take(2).enumerate() {
            let case = format!("{label} tool over HTTP: {}, keep-alive", ["trivial snippet", "JSON + statistics"][i]);
            let request = body(code);
            for _ in 0..10 {
                send(&mut sender, Method::POST, &path, key, request.clone()).await?;
            }
            reset_peak(pid);
            let started = Instant::now();
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let answer = send(&mut sender, Method::POST, &path, key, request.clone()).await;
                samples.push(Sample { latency: t.elapsed(), ok: answered_ok(&answer) });
            }
            let series =
                Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Http, &case, Who::Ours, 1) };
            h.push(series.memory(peak_rss(pid), "server process"));
        }
        let case = format!("{label} tool over HTTP: trivial snippet, create-to-first-result (new connection each)");
        let request = body(snippets[0]);
        let started = Instant::now();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n.min(100) {
            let t = Instant::now();
            let answer = async {
                let mut fresh = connect(addr).await?;
                send(&mut fresh, Method::POST, &path, key, request.clone()).await
            }
            .await;
            samples.push(Sample { latency: t.elapsed(), ok: answered_ok(&answer) });
        }
        let series = Series { samples, elapsed: started.elapsed(), ..Series::new(Suite::Http, &case, Who::Ours, 1) };
        h.push(series.memory(peak_rss(pid), "server process"));
    }
    Ok(())
}

/// `clients` connections, each sending its next call when the last returns.
pub(super) async fn closed_loop(
    addr: &Arc<str>,
    key: &Arc<str>,
    clients: usize,
    duration: Duration,
) -> (Vec<Sample>, Duration) {
    let started = Instant::now();
    let until = started + duration;
    let progress = Arc::new(super::Progress::new(format!("{clients} clients"), clients));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (addr, key, progress) = (addr.clone(), key.clone(), progress.clone());
        set.spawn(async move {
            let mut samples = Vec::new();
            let mut sender = None;
            while Instant::now() < until {
                let t = Instant::now();
                let ok = call_trivial(&mut sender, &addr, &key).await;
                samples.push(Sample { latency: t.elapsed(), ok });
            }
            progress.tick();
            samples
        });
    }
    let samples = set.join_all().await.into_iter().flatten().collect();
    (samples, started.elapsed())
}

/// A flag that turns true `window` from now (what stops a [`paced`] load).
pub(super) fn stop_after(window: Duration) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let set = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(window);
        set.store(true, Ordering::Relaxed);
    });
    stop
}

/// `clients` keep-alive connections, together sending `rate` calls a second
/// at fixed times until `stop` (an open loop). A call's latency counts from
/// when it was due, not from when its connection was free to send it, so a
/// server that falls behind is charged for the queue it causes (no
/// coordinated omission).
pub(super) async fn paced(
    addr: &Arc<str>,
    key: &Arc<str>,
    rate: f64,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Sample>, Duration) {
    let started = tokio::time::Instant::now();
    let every = Duration::from_secs_f64(clients as f64 / rate);
    let mut set = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (addr, key, stop) = (addr.clone(), key.clone(), stop.clone());
        set.spawn(async move {
            let mut samples = Vec::new();
            let mut sender = None;
            let mut due = started + every.mul_f64(client as f64 / clients as f64);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(due).await;
                let ok = call_trivial(&mut sender, &addr, &key).await;
                samples.push(Sample { latency: due.elapsed(), ok });
                due += every;
            }
            samples
        });
    }
    let samples = set.join_all().await.into_iter().flatten().collect();
    (samples, started.elapsed())
}

/// One call of the trivial tool on `sender` (connecting first when there is
/// none; dropped after an error): whether it answered `ok`.
pub(super) async fn call_trivial(sender: &mut Option<Sender>, addr: &str, key: &str) -> bool {
    if sender.is_none() {
        *sender = connect(addr).await.ok();
    }
    let answer = match sender.as_mut() {
        Some(s) => send(s, Method::POST, "/v1/tools/trivial/invoke", key, Bytes::from_static(BODY.as_bytes())).await,
        None => Err(anyhow::anyhow!("could not connect")),
    };
    if answer.is_err() {
        *sender = None;
    }
    answered_ok(&answer)
}

/// `wrk -t2 -c100` on the same endpoint: its calls per second and median
/// beside this harness's row at 100 clients.
fn wrk(h: &mut Harness, addr: &str, key: &str, dir: &Path, secs: u64) -> anyhow::Result<()> {
    let script = dir.join("post.lua");
    let escaped = BODY.replace('\\', "\\\\").replace('"', "\\\"");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = \"{escaped}\"\nwrk.headers[\"Authorization\"] = \"Bearer {key}\"\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )?;
    let out = Command::new("wrk")
        .args(["-t2", "-c100", &format!("-d{secs}s"), "--latency", "-s"])
        .arg(&script)
        .arg(format!("http://{addr}/v1/tools/trivial/invoke"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate =
        text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse::<f64>().ok());
    let p50 = text.lines().find_map(|l| l.trim().strip_prefix("50%")).and_then(|v| parse_wrk_duration(v.trim()));
    let errors = text.lines().any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    match rate {
        Some(rate) => {
            let note = format!(
                "wrk's p50 {}{}",
                p50.map_or("?".to_owned(), super::human_us),
                if errors { "; wrk saw errors or non-2xx answers" } else { "" }
            );
            h.figure(Suite::Http, "wrk -t2 -c100, same server: calls/s", rate, "calls/s", &note);
            if let Some(ours) = h.series.iter().find(|s| s.case == RAMP && s.concurrency == 100).map(Series::summary) {
                h.figure(
                    Suite::Http,
                    "this harness ÷ wrk at 100 connections (calls/s)",
                    ours.throughput_per_s / rate,
                    "×",
                    "",
                );
            }
        }
        None => h.skip(format!("wrk cross-check: could not read its output: {}", text.trim())),
    }
    Ok(())
}

/// `1.23ms`, `870.00us`, `2.1s` → microseconds.
fn parse_wrk_duration(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num,
        "ms" => num * 1e3,
        "s" => num * 1e6,
        "m" => num * 60e6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_durations() {
        assert_eq!(super::parse_wrk_duration("870.00us"), Some(870.0));
        assert_eq!(super::parse_wrk_duration("1.50ms"), Some(1500.0));
        assert_eq!(super::parse_wrk_duration("2s"), Some(2e6));
        assert_eq!(super::parse_wrk_duration("fast"), None);
    }
}
