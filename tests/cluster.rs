//! Three `serve` nodes, each in a network namespace of its own with its own
//! address, sharing one PostgreSQL (reached over a second link of each node)
//! and one shared directory (issue 19), and a client spreading calls across
//! them, as a load balancer would: a node killed under load, a node cut off
//! from the database, and the database restarted under load. Root only
//! (network namespaces, veth pairs, bridges): CI runs it as root, where
//! `IMAGENTX_REQUIRE_PRIVILEGED_TESTS=1` makes a skip a failure.
//!
//! ```text
//!   client (host) ── 10.77.1.1 ┬ bridge ixfront0 ┬─ eth0 10.77.1.1{0,1,2}:8080  node 0, 1, 2
//!   PostgreSQL    ── 10.77.2.1 ┴ bridge ixback0  ┴─ eth1 10.77.2.1{0,1,2}       (netns ixnode{i})
//! ```

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use imagentx_sandbox::bench::postgres::Server;
use server::try_http;

const NODES: usize = 3;
const BIN: &str = env!("CARGO_BIN_EXE_imagentx-sandbox");

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The namespaces, links and bridges; removed when dropped.
struct Net;

impl Net {
    fn new() -> Net {
        Net::remove(); // what a killed run left
        for (bridge, address) in [("ixfront0", "10.77.1.1/24"), ("ixback0", "10.77.2.1/24")] {
            ip(&["link", "add", bridge, "type", "bridge"]);
            ip(&["addr", "add", address, "dev", bridge]);
            ip(&["link", "set", bridge, "up"]);
        }
        for i in 0..NODES {
            let ns = format!("ixnode{i}");
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            for (side, bridge, inside, net) in [("f", "ixfront0", "eth0", 1), ("b", "ixback0", "eth1", 2)] {
                let outside = format!("ix{side}{i}");
                ip(&["link", "add", &outside, "type", "veth", "peer", "name", inside, "netns", &ns]);
                ip(&["link", "set", &outside, "master", bridge, "up"]);
                ip(&["-n", &ns, "addr", "add", &format!("10.77.{net}.{}/24", 10 + i), "dev", inside]);
                ip(&["-n", &ns, "link", "set", inside, "up"]);
            }
        }
        Net
    }

    fn remove() {
        for i in 0..NODES {
            let _ = Command::new("ip").args(["netns", "del", &format!("ixnode{i}")]).output();
        }
        for bridge in ["ixfront0", "ixback0"] {
            let _ = Command::new("ip").args(["link", "del", bridge]).output();
        }
    }

    /// Node `i`'s link to the database: down (cut) or up.
    fn database_link(i: usize, up: bool) {
        ip(&["link", "set", &format!("ixb{i}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        Net::remove();
    }
}

fn address(i: usize) -> String {
    format!("10.77.1.{}:8080", 10 + i)
}

/// A `serve` process in node `i`'s namespace, and its log lines.
struct Node {
    child: Child,
    logs: std::sync::mpsc::Receiver<String>,
}

impl Node {
    fn start(i: usize, data: &Path, env: &[(&str, &str)]) -> Node {
        let mut command = Command::new("ip");
        // Killed with the test process, however it ends (`ip netns exec`
        // becomes the server: the signal stays set across exec).
        #[allow(unsafe_code)]
        // SAFETY: the closure runs in the forked child before exec and only
        // makes one async-signal-safe system call (prctl).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .args(["netns", "exec", &format!("ixnode{i}"), BIN, "--log-format", "json", "serve"])
            .args(["--listen", &address(i), "--data-dir"])
            .arg(data.join(format!("node{i}")))
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("IMAGENTX_INTERPRETERS", data.join("no-interpreters"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node { child, logs }
    }

    fn wait_for(&self, message: &str) {
        loop {
            let line = self.logs.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no `{message}`"));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            if v["fields"]["message"] == message {
                return;
            }
        }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the client saw.
#[derive(Default)]
struct Tally {
    /// Idempotency key → the execution id answered `ok`.
    ok: Mutex<HashMap<String, String>>,
    /// (node, what went wrong, when, how long the attempt took).
    failures: Mutex<Vec<(usize, String, Instant, Duration)>>,
    /// Calls retried after a failure that then succeeded: when.
    recovered: Mutex<Vec<Instant>>,
    gave_up: AtomicUsize,
    slowest: Mutex<Duration>,
}

/// Calls `probe` (a 50 ms sleep) until `stop`, each with an Idempotency-Key
/// of its own, on the nodes in `alive` in turn; a call that fails is retried
/// with the same key on the next node, as a client behind a load balancer
/// does; a node that gives no answer is taken out of the rotation.
async fn worker(w: usize, key: String, alive: Arc<[AtomicBool; NODES]>, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut next = w;
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        let idem = format!("w{w}-c{n}");
        n += 1;
        let mut failed = false;
        for _attempt in 0..100 {
            let i = (0..NODES).map(|k| (next + k) % NODES).find(|i| alive[*i].load(Ordering::Acquire)).unwrap();
            next = i + 1;
            let body = r#"{"input":{"op":"sleep","ms":50}}"#;
            let started = Instant::now();
            let answer = try_http(
                &address(i),
                Method::POST,
                "/v1/tools/probe/invoke",
                &key,
                body,
                &[("idempotency-key", idem.as_str())],
            )
            .await;
            let took = started.elapsed();
            {
                let mut slowest = tally.slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
            }
            let why = match answer {
                Ok(a) if a.status == StatusCode::OK => {
                    let id = a.json()["id"].as_str().unwrap().to_owned();
                    tally.ok.lock().unwrap().insert(idem.clone(), id);
                    if failed {
                        tally.recovered.lock().unwrap().push(Instant::now());
                    }
                    break;
                }
                Ok(a) => {
                    let retry = a.headers.get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                    format!("{} {} retry-after={retry:?}", a.status.as_u16(), a.error_code())
                }
                Err(e) => {
                    alive[i].store(false, Ordering::Release);
                    format!("no answer: {e}")
                }
            };
            tally.failures.lock().unwrap().push((i, why, started, took));
            failed = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if failed && !tally.ok.lock().unwrap().contains_key(&idem) {
            tally.gave_up.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn run_load(
    workers: usize,
    key: &str,
    alive: &Arc<[AtomicBool; NODES]>,
) -> (Arc<AtomicBool>, Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let tasks = (0..workers)
        .map(|w| tokio::spawn(worker(w, key.to_owned(), Arc::clone(alive), Arc::clone(&stop), Arc::clone(&tally))))
        .collect();
    (stop, tally, tasks)
}

async fn stop_load(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.unwrap();
    }
}

/// Every call answered `ok` is in the store, under the id it was answered with.
async fn all_stored(db: &tokio_postgres::Client, tally: &Tally) {
    let rows =
        db.query("SELECT idempotency_key, id FROM executions WHERE idempotency_key IS NOT NULL", &[]).await.unwrap();
    let stored: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let ok = tally.ok.lock().unwrap();
    assert!(!ok.is_empty());
    for (key, id) in ok.iter() {
        assert_eq!(stored.get(key), Some(id), "call {key} answered ok as {id}, stored as {:?}", stored.get(key));
    }
}

fn audit_verifies(data: &Path, env: &[(&str, &str)]) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(data.join("cli"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

async fn within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_a_node_killed_a_node_cut_off_and_the_database_restarted_under_load() {
    if !nix::unistd::Uid::effective().is_root() {
        let required = std::env::var("IMAGENTX_REQUIRE_PRIVILEGED_TESTS").is_ok_and(|v| v == "1");
        assert!(!required, "IMAGENTX_REQUIRE_PRIVILEGED_TESTS=1 but not root");
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let net = Net::new();
    let mut server = match Server::start_on("10.77.2.1").await {
        Ok(server) => server,
        Err(e) => {
            let required = std::env::var("IMAGENTX_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
            assert!(!required, "IMAGENTX_REQUIRE_POSTGRES=1 but: {e:#}");
            eprintln!("skipped: {e:#}");
            return;
        }
    };
    let url = server.database().await.unwrap();
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("config.toml");
    std::fs::write(&config, format!("[server]\nshared_dir = {:?}\n", data.path().join("shared"))).unwrap();
    let env = [("IMAGENTX_STORE_URL", url.as_str()), ("IMAGENTX_CONFIG", config.to_str().unwrap())];
    let cli = |args: &[&str]| {
        let out =
            Command::new(BIN).args(args).arg("--data-dir").arg(data.path().join("cli")).envs(env).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let alice = cli(&["user", "add", "alice", "--tier", "premium"]);
    let root = cli(&["user", "add", "root", "--admin"]);
    let mut nodes: Vec<Node> = (0..NODES).map(|i| Node::start(i, data.path(), &env)).collect();
    for node in &nodes {
        node.wait_for("serving");
    }
    let r = try_http(&address(0), Method::POST, "/v1/tools?name=probe", &root, common::guest_bytes("probe"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::CREATED);
    for i in 0..NODES {
        let loaded = within(Duration::from_secs(20), async || {
            let echo = r#"{"input":{"op":"echo"}}"#;
            try_http(&address(i), Method::POST, "/v1/tools/probe/invoke", &alice, echo, &[])
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
        })
        .await;
        assert!(loaded, "node {i} never ran the tool");
    }

    // 1. kill -9 one node under load.
    let alive = Arc::new([AtomicBool::new(true), AtomicBool::new(true), AtomicBool::new(true)]);
    let (stop, tally, tasks) = run_load(6, &alice, &alive);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    nodes[2].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_load(&stop, tasks).await;
    let failures = tally.failures.lock().unwrap().clone();
    // Only calls to the dead node failed (those in flight on it, and any sent
    // before the client saw it gone); each was retried on a survivor.
    assert!(failures.iter().all(|(i, why, ..)| *i == 2 && why.starts_with("no answer")), "{failures:?}");
    assert_eq!(tally.gave_up.load(Ordering::Relaxed), 0);
    let recovered = tally.recovered.lock().unwrap().clone();
    let served_again = recovered.iter().max().map(|t| t.duration_since(killed));
    eprintln!(
        "kill -9 under load: {} calls ok, {} attempts lost with the dead node, all traffic on the survivors {:?} \
         after the kill",
        tally.ok.lock().unwrap().len(),
        failures.len(),
        served_again
    );
    all_stored(&db, &tally).await;
    audit_verifies(data.path(), &env);

    // 2. Node 1 cut off from the database: refuses clearly, not ready, and
    //    comes back by itself; node 0 serves throughout.
    Net::database_link(1, false);
    let cut = Instant::now();
    let echo = r#"{"input":{"op":"echo"}}"#;
    let not_ready = within(Duration::from_secs(40), async || {
        try_http(&address(1), Method::GET, "/readyz", "", "", &[])
            .await
            .is_ok_and(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert!(not_ready, "a node cut off from its database still said it was ready");
    let not_ready_after = cut.elapsed();
    let started = Instant::now();
    let refused = try_http(&address(1), Method::POST, "/v1/tools/probe/invoke", &alice, echo, &[]).await.unwrap();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&refused.body));
    assert_eq!(refused.error_code(), "database_unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    let refused_in = started.elapsed();
    assert!(refused_in < Duration::from_secs(12), "refused after {refused_in:?}");
    let other = try_http(&address(0), Method::POST, "/v1/tools/probe/invoke", &alice, echo, &[]).await.unwrap();
    assert_eq!(other.status, StatusCode::OK);
    Net::database_link(1, true);
    let healed = Instant::now();
    let back = within(Duration::from_secs(40), async || {
        try_http(&address(1), Method::POST, "/v1/tools/probe/invoke", &alice, echo, &[])
            .await
            .is_ok_and(|a| a.status == StatusCode::OK)
    })
    .await;
    assert!(back, "the node did not come back once its link did");
    eprintln!(
        "node cut off from the database: not ready after {not_ready_after:?}, a call refused (503) in {refused_in:?}, \
         serving again {:?} after its link came back",
        healed.elapsed()
    );
    assert_eq!(try_http(&address(1), Method::GET, "/readyz", "", "", &[]).await.unwrap().status, StatusCode::OK);

    // 3. PostgreSQL restarted under load: calls in the gap fail fast with 503
    //    and Retry-After, never hang; the nodes reconnect by themselves.
    let alive = Arc::new([AtomicBool::new(true), AtomicBool::new(true), AtomicBool::new(false)]);
    let (stop, tally, tasks) = run_load(4, &alice, &alive);
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart(Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_load(&stop, tasks).await;
    let failures = tally.failures.lock().unwrap().clone();
    assert!(!failures.is_empty(), "the restart made no call fail: it was not under load");
    for (i, why, _, took) in &failures {
        if !why.starts_with("503 ") || why.ends_with("None") {
            let errors: Vec<String> = nodes[*i].logs.try_iter().filter(|l| l.contains("ERROR")).collect();
            panic!("node {i}: {why}; its errors: {errors:#?}");
        }
        assert!(*took < Duration::from_secs(8), "node {i} took {took:?} to answer {why}");
    }
    assert_eq!(tally.gave_up.load(Ordering::Relaxed), 0);
    eprintln!(
        "database restart under load: {} calls ok, {} attempts answered 503, slowest attempt {:?}",
        tally.ok.lock().unwrap().len(),
        failures.len(),
        tally.slowest.lock().unwrap()
    );
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    all_stored(&db, &tally).await;
    audit_verifies(data.path(), &env);
    drop(nodes);
    drop(net);
}
