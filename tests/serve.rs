//! `imagentx-sandbox serve`, `user` and `audit verify` as processes: keys made
//! by the command line, `kill -9` in the middle of a burst, a restart that
//! keeps everything and loads tools without recompiling, and a tampered audit
//! trail found out.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod postgres;
mod server;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;
use server::{http, http_with};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
}

fn cli(args: &[&str], dir: &Path) -> Output {
    bin().args(args).arg("--data-dir").arg(dir).output().unwrap()
}

fn add_user(dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["user", "add", name];
    args.extend_from_slice(extra);
    let out = cli(&args, dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("ixs_") && key.len() == 68, "{key}");
    key
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Starts `serve`; answers the child and its log lines (read on a thread).
fn start(dir: &Path, addr: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    start_with(dir, addr, &[])
}

/// `start`, with these environment variables.
fn start_with(dir: &Path, addr: &str, env: &[(&str, &str)]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = bin()
        .args(["--log-format", "json", "serve", "--listen", addr, "--data-dir"])
        .arg(dir)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        // The built-in interpreters (compiled for seconds) are tests/interpreters.rs's.
        .env("IMAGENTX_INTERPRETERS", dir.join("no-interpreters"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the server did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, rx)
}

/// Loop devices whose backing file is under `path`.
fn loop_devices_backed_by(path: &Path) -> usize {
    let Ok(devices) = std::fs::read_dir("/sys/block") else { return 0 };
    let path = path.to_string_lossy();
    devices
        .filter_map(Result::ok)
        .filter_map(|d| std::fs::read_to_string(d.path().join("loop/backing_file")).ok())
        .filter(|file| file.starts_with(&*path))
        .count()
}

fn log_line(logs: &std::sync::mpsc::Receiver<String>, message: &str) -> serde_json::Value {
    loop {
        let line = logs.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no log line `{message}`"));
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("log is not JSON ({e}): {line}"));
        if v["fields"]["message"] == message {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_burst_then_restart_keeps_everything_and_loads_tools_without_recompiling() {
    let dir = tempfile::tempdir().unwrap();
    let root = add_user(dir.path(), "root", &["--admin", "--tier", "premium"]);
    let alice = add_user(dir.path(), "alice", &["--tier", "premium"]);
    // A name that could be a path is refused with a usage error.
    let bad = cli(&["user", "add", "../evil"], dir.path());
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error:"));
    assert_eq!(cli(&["user", "add", "alice"], dir.path()).status.code(), Some(2), "alice exists");
    let bad_tier = cli(&["user", "add", "carol", "--tier", "gold"], dir.path());
    assert!(String::from_utf8_lossy(&bad_tier.stderr).contains("unknown tier `gold`"));

    let addr = free_port();
    let (mut server, logs) = start(dir.path(), &addr);
    log_line(&logs, "serving");
    let word_stats = common::guest_bytes("word-stats");
    let r = http(&addr, Method::POST, "/v1/tools", &root, word_stats).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = http(&addr, Method::POST, "/v1/tools?name=probe", &root, common::guest_bytes("probe")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let first = http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, r#"{"input":{"text":"kept"}}"#).await;
    let first = first.json();
    assert_eq!(first["status"], "ok");
    let put = http(&addr, Method::PUT, "/v1/files/notes/today.txt", &alice, "remember").await;
    assert_eq!(put.status, StatusCode::OK);
    let root_user = nix::unistd::geteuid().is_root();
    if root_user {
        // As root, alice's files are in her volume, mounted in the server's
        // own namespace: the host's (this test's) never sees the mount.
        let ready = http(&addr, Method::GET, "/readyz", "", "").await.json();
        let native = ready["disk_limits"]["native_tools"].as_str().unwrap();
        assert!(native.contains("own ext4 volume"), "{ready}");
        assert!(dir.path().join("volumes/alice.ext4").is_file());
        assert_eq!(common::mounts_under(dir.path()), 0, "a volume's mount reached the host's namespace");
        assert!(!dir.path().join("users/alice/notes").exists());
        let metrics = http(&addr, Method::GET, "/metrics", "", "").await;
        assert!(String::from_utf8_lossy(&metrics.body).contains("imagentx_data_volumes_mounted 1"));
    }

    // A burst of calls (some of them slow) and kill -9 in the middle of it.
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let (addr, alice) = (addr.clone(), alice.clone());
            let body = if i % 2 == 0 {
                json!({"input": {"op": "sleep", "ms": 300}})
            } else {
                json!({"input": {"op": "echo"}})
            };
            // A call cut off by the kill panics in its task; the task's error is ignored.
            tokio::spawn(
                async move { http(&addr, Method::POST, "/v1/tools/probe/invoke", &alice, body.to_string()).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill().unwrap();
    server.wait().unwrap();
    for call in burst {
        let _ = call.await; // answered or cut off: either is fine
    }
    if root_user {
        // Killed, the server's namespace is gone and its mounts and loop devices with it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while loop_devices_backed_by(dir.path()) > 0 {
            assert!(Instant::now() < deadline, "a loop device outlived the killed server");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::fs::create_dir(dir.path().join("scratch/left-by-the-crash")).unwrap();
    std::fs::write(dir.path().join("scratch/left-by-the-crash/junk"), "x").unwrap();

    let (mut server, logs) = start(dir.path(), &addr);
    let loaded = log_line(&logs, "registered tools loaded");
    assert_eq!(loaded["fields"]["tools"], 2, "{loaded}");
    assert_eq!(loaded["fields"]["from_cache"], 2, "no recompiling after a restart: {loaded}");
    assert!(!dir.path().join("scratch/left-by-the-crash").exists(), "stale scratch is swept at start");

    let tools = http(&addr, Method::GET, "/v1/tools", &alice, "").await.json();
    assert_eq!(tools["tools"].as_array().unwrap().len(), 2);
    let id = first["id"].as_str().unwrap();
    let again = http(&addr, Method::GET, &format!("/v1/executions/{id}"), &alice, "").await;
    assert_eq!(again.json(), first);
    // The file survived the kill in alice's volume (its journal replayed at the mount).
    let file = http(&addr, Method::GET, "/v1/files/notes/today.txt", &alice, "").await;
    assert_eq!(&file.body[..], b"remember");
    let r = http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, r#"{"input":{"text":"again"}}"#).await;
    assert_eq!(r.json()["status"], "ok");
    // Every execution stored is whole, and the audit chain survived the kill.
    let page = http(&addr, Method::GET, "/v1/executions?limit=500", &alice, "").await.json();
    for e in page["executions"].as_array().unwrap() {
        let one = http(&addr, Method::GET, &format!("/v1/executions/{}", e["id"].as_str().unwrap()), &alice, "").await;
        assert_eq!(one.json()["id"], e["id"]);
    }
    let verify = cli(&["audit", "verify"], dir.path());
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    // Revoking from the command line takes effect on the running server.
    assert!(cli(&["user", "revoke", "alice"], dir.path()).status.success());
    assert_eq!(http(&addr, Method::GET, "/v1/tools", &alice, "").await.status, StatusCode::UNAUTHORIZED);
    let listed = String::from_utf8(cli(&["user", "list"], dir.path()).stdout).unwrap();
    assert!(listed.lines().any(|l| l.starts_with("alice") && l.contains("premium")), "{listed}");

    // SIGTERM: a clean stop, exit 0.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    log_line(&logs, "stopped");
    assert!(server.wait().unwrap().success());
    assert_eq!(loop_devices_backed_by(dir.path()), 0, "a loop device outlived the stopped server");
}

#[test]
fn audit_verify_finds_a_changed_or_removed_record() {
    let dir = tempfile::tempdir().unwrap();
    add_user(dir.path(), "root", &["--admin"]);
    add_user(dir.path(), "alice", &[]);
    assert!(cli(&["user", "set-tier", "alice", "premium"], dir.path()).status.success());
    assert!(cli(&["user", "key", "alice"], dir.path()).status.success());
    let verify = cli(&["audit", "verify"], dir.path());
    assert!(verify.status.success());
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(v["records"], 6);

    let db = dir.path().join("sandbox.db");
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        // The triggers refuse edits outright…
        let refused = conn.execute("UPDATE audit SET outcome = 'denied' WHERE seq = 3", []);
        assert!(refused.unwrap_err().to_string().contains("append-only"));
        assert!(conn.execute("DELETE FROM audit WHERE seq = 3", []).is_err());
        conn.execute_batch(&format!("VACUUM INTO '{}'", copy.join("sandbox.db").display())).unwrap();
        // …so an attacker with the file drops them first.
        conn.execute_batch(
            "DROP TRIGGER audit_no_update; DROP TRIGGER audit_delete_archived_only;
             UPDATE audit SET detail = '{\"from\":\"standard\",\"to\":\"free\"}' WHERE seq = 5;",
        )
        .unwrap();
    }
    let verify = cli(&["audit", "verify"], dir.path());
    assert_eq!(verify.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(v["first_broken"], 5, "{v}");

    {
        let conn = rusqlite::Connection::open(copy.join("sandbox.db")).unwrap();
        conn.execute_batch("DROP TRIGGER audit_delete_archived_only; DELETE FROM audit WHERE seq = 3;").unwrap();
    }
    let verify = cli(&["audit", "verify"], &copy);
    assert_eq!(verify.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(v["first_broken"], 4, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("missing"));
}

/// A fresh data dir and artifact cache: `serve` listens at once while it
/// compiles the built-in tools; meanwhile `/readyz` says `loading` and a
/// call of a built-in `tool_loading` (503 with `Retry-After`), then both
/// work without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn serve_listens_before_the_builtins_are_compiled_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let alice = add_user(dir.path(), "alice", &[]);
    let interpreters = common::interpreters::built_dir();
    let addr = free_port();
    let started = Instant::now();
    let server = bin()
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .env("IMAGENTX_INTERPRETERS", &interpreters)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = common::StoppedOnDrop(server);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let listening = started.elapsed();
    let ready = http(&addr, Method::GET, "/readyz", "", "").await;
    let call = http(&addr, Method::POST, "/v1/tools/python/invoke", &alice, r#"{"input": {"code": "6 * 7"}}"#).await;
    let (ready_code, call_code, retry) =
        (ready.error_code(), call.error_code(), call.headers.contains_key("retry-after"));
    // Every built-in registered: ready, and the call runs.
    let deadline = Instant::now() + Duration::from_secs(240);
    let ready_after = loop {
        let status = http(&addr, Method::GET, "/readyz", "", "").await.status;
        if status == StatusCode::OK || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let answer = http(&addr, Method::POST, "/v1/tools/python/invoke", &alice, r#"{"input": {"code": "6 * 7"}}"#).await;
    drop(server);
    assert!(listening < Duration::from_secs(10), "listening took {listening:?}");
    assert_eq!((ready.status, ready_code.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "loading"));
    assert_eq!((call.status, call_code.as_str(), retry), (StatusCode::SERVICE_UNAVAILABLE, "tool_loading", true));
    assert_eq!(answer.json()["output"]["result"], 42, "{}", answer.json());
    assert_eq!(ready_after, StatusCode::OK);
}

/// One server per data directory, with volumes or without: a second
/// `serve` or `mcp` on it is refused with who holds it, a restore over it
/// is refused, and once the first has stopped the directory serves again.
#[test]
fn a_second_server_on_a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _logs) = start(dir.path(), &free_port());
    let first = common::StoppedOnDrop(first);
    let pid = first.0.id();
    let refused = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env("IMAGENTX_INTERPRETERS", dir.path().join("no-interpreters"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let says = format!("another imagentx-sandbox process (pid {pid}) is using the data directory");
    for args in [&["serve", "--listen", &free_port()][..], &["mcp"][..]] {
        let (code, stderr) = refused(args);
        assert!(matches!(code, Some(1 | 2)), "{args:?}: {code:?} {stderr}");
        assert!(stderr.contains(&says), "{args:?}: {stderr}");
    }
    // A backup of it, then a restore over it: refused while it runs.
    let backup = dir.path().join("b.tar.gz");
    let out = bin().args(["backup", "--to"]).arg(&backup).arg("--data-dir").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, stderr) = refused(&["restore", backup.to_str().unwrap(), "--force"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("a server is running on"), "{stderr}");

    drop(first);
    let addr = free_port();
    let (second, _logs) = start(dir.path(), &addr);
    let _second = common::StoppedOnDrop(second);
    assert_eq!(std::fs::read_to_string(dir.path().join("serve.lock")).unwrap().trim(), _second.0.id().to_string());
}

/// Polls `check` every 100 ms for up to 20 s; answers whether it held.
async fn within_20_s(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_on_one_postgresql_share_users_tools_executions_and_one_audit_chain() {
    let Some(url) = postgres::database().await else { return };
    let env = [("IMAGENTX_STORE_URL", url.as_str())];
    let cli_with = |args: &[&str], dir: &Path| bin().args(args).arg("--data-dir").arg(dir).envs(env).output().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let made = cli_with(&["user", "add", "alice", "--tier", "premium"], dir_a.path());
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let alice = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let made = cli_with(&["user", "add", "root", "--admin"], dir_b.path());
    let root = String::from_utf8(made.stdout).unwrap().trim().to_owned();

    let (a, b) = (free_port(), free_port());
    let (node_a, logs_a) = start_with(dir_a.path(), &a, &env);
    let _node_a = common::StoppedOnDrop(node_a);
    let said = log_line(&logs_a, "store: PostgreSQL");
    assert!(!said.to_string().contains("postgres@"), "the URL's user is logged: {said}");
    let (node_b, logs_b) = start_with(dir_b.path(), &b, &env);
    let _node_b = common::StoppedOnDrop(node_b);
    log_line(&logs_a, "serving");
    log_line(&logs_b, "serving");

    // Registered on A: B fetches the module from the store and runs it.
    let r = http(&a, Method::POST, "/v1/tools?name=probe", &root, common::guest_bytes("probe")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let echo = r#"{"input":{"op":"echo"}}"#;
    let reached = within_20_s(async || {
        http(&b, Method::POST, "/v1/tools/probe/invoke", &alice, echo).await.status == StatusCode::OK
    })
    .await;
    assert!(reached, "a tool registered on A never ran on B");
    log_line(&logs_b, "module fetched from the store");

    // An idempotency key used on B replays on A.
    let key = [("idempotency-key", "order-17")];
    let first = http_with(&b, Method::POST, "/v1/tools/probe/invoke", &alice, echo, &key).await.json();
    assert_eq!(first["status"], "ok", "{first}");
    let replay = http_with(&a, Method::POST, "/v1/tools/probe/invoke", &alice, echo, &key).await;
    assert_eq!(replay.json()["id"], first["id"], "the key ran again on the other node");
    let id = first["id"].as_str().unwrap();
    let read = http(&a, Method::GET, &format!("/v1/executions/{id}"), &alice, "").await;
    assert_eq!(read.json(), first);

    // Retired on B: A stops offering it.
    assert_eq!(http(&b, Method::DELETE, "/v1/tools/probe", &root, "").await.status, StatusCode::OK);
    let dropped = within_20_s(async || {
        http(&a, Method::POST, "/v1/tools/probe/invoke", &alice, echo).await.status == StatusCode::NOT_FOUND
    })
    .await;
    assert!(dropped, "a tool retired on B still ran on A");

    // A key revoked from any node is refused by every node at its next request.
    let revoked = cli_with(&["user", "revoke", "alice"], dir_b.path());
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    for node in [&a, &b] {
        assert_eq!(http(node, Method::GET, "/v1/tools", &alice, "").await.status, StatusCode::UNAUTHORIZED);
    }
    let verify = cli_with(&["audit", "verify"], dir_a.path());
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let verification: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert!(verification["records"].as_u64().unwrap() >= 8, "{verification}");
    for dir in [dir_a.path(), dir_b.path()] {
        assert!(!dir.join("sandbox.db").exists(), "a SQLite file in {}", dir.display());
    }
    // A backup of a data directory is not one of the database: said so.
    let backup = cli_with(&["backup", "--to", "/tmp/never.tar.gz"], dir_a.path());
    assert_eq!(backup.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&backup.stderr).contains("pg_dump"), "{}", String::from_utf8_lossy(&backup.stderr));
    // A URL that is not PostgreSQL's: a usage error, not a SQLite file somewhere.
    let bad = bin()
        .args(["user", "list", "--data-dir"])
        .arg(dir_a.path())
        .env("IMAGENTX_STORE_URL", "mysql://x")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("postgres://"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// A tier's calls at once and requests per second are the tier's across the
/// nodes, not the tier's times the nodes; what a node holds comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_calls_at_once_and_requests_per_second_hold_across_two_nodes() {
    let Some(url) = postgres::database().await else { return };
    // Users' files on a directory both nodes mount.
    let (shared, config_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = config_dir.path().join("config.toml");
    std::fs::write(&config, format!("[server]\nshared_dir = {:?}\n", shared.path())).unwrap();
    let env = [("IMAGENTX_STORE_URL", url.as_str()), ("IMAGENTX_CONFIG", config.to_str().unwrap())];
    let cli_with = |args: &[&str], dir: &Path| bin().args(args).arg("--data-dir").arg(dir).envs(env).output().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The free tier: 2 calls at once, 20 requests per second (bursts of 40).
    let made = cli_with(&["user", "add", "carol", "--tier", "free"], dir_a.path());
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let carol = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let root = String::from_utf8(cli_with(&["user", "add", "root", "--admin"], dir_a.path()).stdout).unwrap();
    let root = root.trim().to_owned();
    let (a, b) = (free_port(), free_port());
    let (node_a, logs_a) = start_with(dir_a.path(), &a, &env);
    let _node_a = common::StoppedOnDrop(node_a);
    let (node_b, logs_b) = start_with(dir_b.path(), &b, &env);
    let _node_b = common::StoppedOnDrop(node_b);
    log_line(&logs_a, "joined the nodes sharing the store");
    log_line(&logs_b, "joined the nodes sharing the store");
    let r = http(&a, Method::POST, "/v1/tools?name=probe", &root, common::guest_bytes("probe")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let echo = r#"{"input":{"op":"echo"}}"#;
    let loaded = within_20_s(async || {
        http(&b, Method::POST, "/v1/tools/probe/invoke", &root, echo).await.status == StatusCode::OK
    })
    .await;
    assert!(loaded, "the tool never loaded on B");

    let sleeps = |n: usize| {
        let (a, b, carol) = (a.clone(), b.clone(), carol.clone());
        futures::future::join_all((0..n).map(move |i| {
            let (node, carol) = (if i % 2 == 0 { a.clone() } else { b.clone() }, carol.clone());
            async move {
                let slow = r#"{"input":{"op":"sleep","ms":1500}}"#;
                http(&node, Method::POST, "/v1/tools/probe/invoke", &carol, slow).await
            }
        }))
    };
    // Under the cap: one call on each node, both run; and at the cap one
    // after another, each finding the place its last call gave back.
    for answer in sleeps(2).await {
        assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    }
    for _ in 0..10 {
        let pair = [&a, &b].map(|node| http(node, Method::POST, "/v1/tools/probe/invoke", &carol, echo));
        for answer in futures::future::join_all(pair).await {
            assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
        }
    }
    // Over it: six at once, three on each node. Each node alone would run two.
    let answers = sleeps(6).await;
    let ran = answers.iter().filter(|r| r.status == StatusCode::OK).count();
    let refused: Vec<_> = answers.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!((ran, refused.len()), (2, 4), "{:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(refused.iter().all(|r| r.error_code() == "user_concurrency"), "{:?}", refused[0].json());
    assert!(refused.iter().any(|r| r.json()["error"]["message"].as_str().unwrap().contains("across the nodes")));

    // Requests per second: 80 at once, half on each node. One shared bucket
    // passes its burst of 40 and what it refills meanwhile (20 a second);
    // each node's own would pass 40, 80 in all.
    tokio::time::sleep(Duration::from_secs(3)).await; // a full bucket
    let started = Instant::now();
    let answers = futures::future::join_all((0..80).map(|i| {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let carol = carol.clone();
        async move { http(&node, Method::GET, "/v1/tools", &carol, "").await }
    }))
    .await;
    let took = started.elapsed().as_secs_f64();
    let passed = answers.iter().filter(|r| r.status == StatusCode::OK).count();
    let limited =
        answers.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS && r.error_code() == "rate").count();
    assert_eq!(passed + limited, 80);
    let most = 40 + (20.0 * took).ceil() as usize;
    assert!((40..=most).contains(&passed), "{passed} passed in {took:.2} s: more than one bucket's {most}");

    // Both nodes keep serving, and every place came back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A file written through one node is read through the other.
    let put = http(&a, Method::PUT, "/v1/files/plan.txt", &carol, "one /data for every node").await;
    assert!(put.status.is_success(), "{}", String::from_utf8_lossy(&put.body));
    let got = http(&b, Method::GET, "/v1/files/plan.txt", &carol, "").await;
    assert_eq!((got.status, &got.body[..]), (StatusCode::OK, &b"one /data for every node"[..]));
    for node in [&a, &b] {
        assert_eq!(http(node, Method::POST, "/v1/tools/probe/invoke", &carol, echo).await.status, StatusCode::OK);
    }
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let settled = within_20_s(async || {
        let places: i64 = client.query_one("SELECT count(*) FROM places", &[]).await.unwrap().get(0);
        places == 0
    })
    .await;
    assert!(settled, "places left in the store after every call ended");
    let nodes: i64 = client.query_one("SELECT count(*) FROM nodes", &[]).await.unwrap().get(0);
    assert_eq!(nodes, 2);
}

/// A node that loses its database refuses calls at once (503 and a
/// `Retry-After`, never a hang), says it is not ready, and serves again by
/// itself when the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_postgresql_answers_503_fast_and_comes_back_by_itself() {
    let Some(url) = postgres::database().await else { return };
    let env = [("IMAGENTX_STORE_URL", url.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let made = bin().args(["user", "add", "dave", "--data-dir"]).arg(dir.path()).envs(env).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let dave = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let addr = free_port();
    let (node, logs) = start_with(dir.path(), &addr, &env);
    let _node = common::StoppedOnDrop(node);
    log_line(&logs, "joined the nodes sharing the store");
    assert_eq!(http(&addr, Method::GET, "/v1/tools", &dave, "").await.status, StatusCode::OK);

    // The database stops taking this node's connections, and ends the open ones.
    // (From the server's own database: one cannot lock itself out.)
    let (base, db) = url.rsplit_once('/').unwrap();
    let (client, connection) =
        tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!(r#"ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS false"#)).await.unwrap();
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let r = http(&addr, Method::GET, "/v1/tools", &dave, "").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.error_code(), "database_unavailable");
        assert_eq!(r.headers["retry-after"], "1");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }
    let ready = http(&addr, Method::GET, "/readyz", "", "").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);

    // Back: the node serves again with nothing done to it.
    client.batch_execute(&format!(r#"ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true"#)).await.unwrap();
    let back =
        within_20_s(async || http(&addr, Method::GET, "/v1/tools", &dave, "").await.status == StatusCode::OK).await;
    assert!(back, "the node did not serve again once the database was back");
    assert_eq!(http(&addr, Method::GET, "/readyz", "", "").await.status, StatusCode::OK);
}

/// The Kubernetes manifests (`deploy/kubernetes/`): valid for the API's
/// schemas (kubernetes-validate from PyPI, strict: a field the API does not
/// know fails), and true of this build — a node started with the pods'
/// config file on PostgreSQL answers the probes' paths, exports the
/// autoscaler's metric, keeps users' files in the shared directory, and
/// stops within the pods' grace period. No cluster runs them here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_pass_the_api_schemas_and_hold_for_this_build() {
    let python = common::venv_python("kubernetes-venv", "kubernetes-validate==1.37.0");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut manifests: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 5, "{manifests:?}");
    let validate = |files: &[std::path::PathBuf], version: &str| {
        Command::new(&python)
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .unwrap()
    };
    for version in ["1.30.0", "1.37.0"] {
        let out = validate(&manifests, version);
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !said.contains("FAIL") && !said.contains("ERROR"), "{version}: {said}");
    }
    // The validator bites: one misspelt field fails the file.
    let scratch = tempfile::tempdir().unwrap();
    let broken = scratch.path().join("wasm.yaml");
    let text = std::fs::read_to_string(dir.join("wasm.yaml")).unwrap();
    std::fs::write(&broken, text.replacen("readinessProbe", "readinesProbe", 1)).unwrap();
    assert!(!validate(&[broken], "1.37.0").status.success(), "a misspelt field passed");

    let read = "import sys, json, yaml\nprint(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))";
    let out = Command::new(&python).args(["-c", read]).args(&manifests).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let config = find("ConfigMap", "imagentx-config");
    let secret = find("Secret", "imagentx-store");
    let mut wasm_toml = String::new();
    for name in ["imagentx-wasm", "imagentx-native"] {
        let pod = find("Deployment", name)["spec"]["template"]["spec"].clone();
        let container = &pod["containers"][0];
        let file = container["args"].as_array().unwrap().iter().skip_while(|a| *a != "--config").nth(1).unwrap();
        let key = file.as_str().unwrap().rsplit('/').next().unwrap();
        let toml_text = config["data"][key].as_str().unwrap_or_else(|| panic!("{name}: no {key} in the ConfigMap"));
        let settings: toml::Table = toml::from_str(toml_text).unwrap();
        let grace_ms = settings["server"].get("shutdown_grace_ms").and_then(toml::Value::as_integer).unwrap_or(30_000);
        let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().unwrap();
        let period = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
        assert!(period >= pause + grace_ms / 1000 + 5, "{name}: {period} s to stop, {pause} s + {grace_ms} ms needed");
        let url = &container["env"][0];
        assert_eq!(url["name"], "IMAGENTX_STORE_URL");
        let from = &url["valueFrom"]["secretKeyRef"];
        assert!(secret["stringData"][from["key"].as_str().unwrap()].is_string(), "{name}: the Secret lacks {from}");
        let env = container["env"].as_array().unwrap();
        let advertise = env.iter().find(|e| e["name"] == "IMAGENTX_ADVERTISE").unwrap_or_else(|| panic!("{name}"));
        let port = container["ports"][0]["containerPort"].as_i64().unwrap();
        assert_eq!(advertise["value"], format!("$(POD_IP):{port}"));
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let path = container[probe]["httpGet"]["path"].as_str().unwrap();
            assert!(["/readyz", "/healthz"].contains(&path), "{name}: {probe} {path}");
        }
        if name == "imagentx-wasm" {
            wasm_toml = toml_text.to_owned();
            // No privilege at all on the WASM nodes.
            let security = &container["securityContext"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(security["allowPrivilegeEscalation"], false);
            assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
            assert!(security.get("privileged").is_none());
        }
    }
    let hpa = find("HorizontalPodAutoscaler", "imagentx-wasm");
    let metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"].as_str().unwrap().to_owned();

    // The WASM pods' config file, run for real: its paths made this test's.
    let Some(url) = postgres::database().await else { return };
    let (data, shared) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let file = scratch.path().join("wasm.toml");
    let text = wasm_toml
        .replace("/var/lib/imagentx-sandbox", data.path().to_str().unwrap())
        .replace("/srv/imagentx-shared", shared.path().to_str().unwrap())
        .replace("/usr/local/lib/imagentx-sandbox/interpreters", "/nonexistent");
    std::fs::write(&file, text).unwrap();
    let env = [("IMAGENTX_STORE_URL", url.as_str()), ("IMAGENTX_CONFIG", file.to_str().unwrap())];
    let made = bin().args(["user", "add", "erin", "--data-dir"]).arg(data.path()).envs(env).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let erin = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let addr = free_port();
    let (node, logs) = start_with(data.path(), &addr, &env);
    let _node = common::StoppedOnDrop(node);
    log_line(&logs, "joined the nodes sharing the store");
    let ready = within_20_s(async || http(&addr, Method::GET, "/readyz", "", "").await.status == StatusCode::OK).await;
    assert!(ready, "never ready");
    assert_eq!(http(&addr, Method::GET, "/healthz", "", "").await.status, StatusCode::OK);
    let metrics = http(&addr, Method::GET, "/metrics", "", "").await;
    assert!(String::from_utf8_lossy(&metrics.body).contains(&format!("\n{metric} ")), "no {metric} in /metrics");
    let put = http(&addr, Method::PUT, "/v1/files/notes.txt", &erin, "kept on the shared filesystem").await;
    assert!(put.status.is_success(), "{}", String::from_utf8_lossy(&put.body));
    let kept = std::fs::read_to_string(shared.path().join("users/erin/notes.txt")).unwrap();
    assert_eq!(kept, "kept on the shared filesystem");
    assert!(!data.path().join("users/erin").exists(), "a user's directory in the node's own data directory");
}

/// A code session lives in the memory of the node that opened it: its
/// requests reaching another node are forwarded there, and when that node
/// dies the session ends with a clear error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_requests_reach_its_node_from_any_node_and_end_when_that_node_dies() {
    let Some(url) = postgres::database().await else { return };
    let env = [("IMAGENTX_STORE_URL", url.as_str())];
    let cli_with = |args: &[&str], dir: &Path| bin().args(args).arg("--data-dir").arg(dir).envs(env).output().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dana = String::from_utf8(cli_with(&["user", "add", "dana"], dir_a.path()).stdout).unwrap().trim().to_owned();
    let root = String::from_utf8(cli_with(&["user", "add", "root", "--admin"], dir_a.path()).stdout).unwrap();
    let root = root.trim().to_owned();
    let (a, b) = (free_port(), free_port());
    let (node_a, logs_a) = start_with(dir_a.path(), &a, &env);
    let mut node_a = common::StoppedOnDrop(node_a);
    let (node_b, logs_b) = start_with(dir_b.path(), &b, &env);
    let _node_b = common::StoppedOnDrop(node_b);
    let joined = log_line(&logs_a, "joined the nodes sharing the store");
    assert_eq!(joined["fields"]["address"], a.as_str(), "{joined}");
    log_line(&logs_b, "joined the nodes sharing the store");
    let r = http(&a, Method::POST, "/v1/tools?name=sdk", &root, common::guest_bytes("sdk-probe")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));

    let opened = http(&a, Method::POST, "/v1/sessions", &dana, r#"{"tool":"sdk"}"#).await;
    assert_eq!(opened.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&opened.body));
    let id = opened.json()["id"].as_str().unwrap().to_owned();
    let step = format!("/v1/sessions/{id}/run");
    // Through B, which does not hold it: forwarded to A, which runs the step.
    let stepped = http(&b, Method::POST, &step, &dana, r#"{"code":"1"}"#).await;
    assert_eq!(stepped.status, StatusCode::OK, "{}", String::from_utf8_lossy(&stepped.body));
    assert_eq!(stepped.json()["session"], id.as_str());
    let shown = http(&b, Method::GET, &format!("/v1/sessions/{id}"), &dana, "").await;
    assert_eq!(shown.status, StatusCode::OK, "{}", String::from_utf8_lossy(&shown.body));
    assert_eq!(shown.json()["steps"], 1, "{}", shown.json());
    // Someone else's key finds nothing there, through either node.
    for node in [&a, &b] {
        assert_eq!(http(node, Method::POST, &step, &root, r#"{"code":"1"}"#).await.status, StatusCode::NOT_FOUND);
    }
    // A request already forwarded is answered, never forwarded again.
    let looped =
        http_with(&b, Method::POST, &step, &dana, r#"{"code":"1"}"#, &[("x-imagentx-forwarded-by", "x")]).await;
    assert_eq!((looped.status, looped.error_code()), (StatusCode::MISDIRECTED_REQUEST, "session_elsewhere".into()));

    // A dies with the session in its memory.
    node_a.0.kill().unwrap();
    node_a.0.wait().unwrap();
    let started = Instant::now();
    let lost = http(&b, Method::POST, &step, &dana, r#"{"code":"1"}"#).await;
    assert_eq!(lost.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&lost.body));
    assert_eq!(lost.error_code(), "node_unreachable");
    assert!(lost.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    // Once A's lease is over, the session has ended, and says why.
    let ended =
        within_20_s(async || http(&b, Method::POST, &step, &dana, r#"{"code":"1"}"#).await.status == StatusCode::GONE)
            .await;
    assert!(ended, "the dead node's session never ended");
    let gone = http(&b, Method::POST, &step, &dana, r#"{"code":"1"}"#).await;
    assert!(
        gone.json()["error"]["message"].as_str().unwrap().contains("the node that held it stopped"),
        "{}",
        gone.json()
    );
    let info = http(&b, Method::GET, &format!("/v1/sessions/{id}"), &dana, "").await.json();
    assert_eq!(info["reason"], "node_lost", "{info}");
    let verify = cli_with(&["audit", "verify"], dir_b.path());
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}
