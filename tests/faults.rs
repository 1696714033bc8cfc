//! Injected faults (issue 20), each against the real server: the data
//! directory's filesystem fills up; the process runs out of descriptors;
//! the server is frozen (SIGSTOP) under load and thawed. Each checks the
//! answers are clear (never a 500, never a hang), nothing answered is lost,
//! and full service returns once the fault is gone.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use imagentx_sandbox::api::ServerSettings;
use imagentx_sandbox::volume::VolumeMode;
use serde_json::json;
use server::{TestServer, http};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The answer is the report of a call (200) or a clear refusal for want of
/// space (507 `storage_full`, with a message); never a 500.
fn ok_or_full(a: &server::Answer, what: &str) -> bool {
    match a.status {
        StatusCode::OK | StatusCode::CREATED => true,
        StatusCode::INSUFFICIENT_STORAGE => {
            assert_eq!(a.error_code(), "storage_full", "{what}");
            false
        }
        other => panic!("{what}: {other} {}", String::from_utf8_lossy(&a.body)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_answered_507_loses_nothing_and_service_returns_when_space_is_freed() {
    if !is_root() {
        common::skip_unprivileged("the full-disk test (a tmpfs mount)");
        return;
    }
    let fs = common::SmallFs::new(64 << 20);
    let dir = tempfile::tempdir_in(fs.path()).unwrap();
    let data = dir.path().to_owned();
    let settings = ServerSettings {
        data_dir: data.clone(),
        max_instances: 8,
        data_volumes: VolumeMode::Off,
        ..Default::default()
    };
    let srv = TestServer::start_in(dir, Default::default(), settings).await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let echo = json!({"input": {"op": "echo"}});
    let mut answered = vec![srv.report("probe", &alice, echo.clone()).await["id"].as_str().unwrap().to_owned()];
    let put = |path: &str, body: Vec<u8>| {
        let key = alice.clone();
        let path = format!("/v1/files/{path}");
        let srv = &srv;
        async move { srv.request(Method::PUT, &path, Some(&key), body).await }
    };
    assert_eq!(put("keep.txt", b"before".to_vec()).await.status, StatusCode::OK);

    let ballast = fs.fill();
    // Calls with 1 MiB of output each: their records need room. Each is
    // answered with its report (recorded) or 507; at least one is refused.
    let flood = json!({"input": {"op": "flood", "bytes": 1 << 20}});
    let mut refused = 0;
    for i in 0..8 {
        let a = srv.invoke("probe", &alice, flood.clone()).await;
        if ok_or_full(&a, &format!("call {i} on a full disk")) {
            answered.push(a.json()["id"].as_str().unwrap().to_owned());
        } else {
            refused += 1;
            assert!(a.json()["error"]["message"].as_str().unwrap().contains("space"), "{}", a.json());
        }
    }
    assert!(refused > 0, "no call was refused on a full disk");
    // A file write and a registration: refused, nothing half-written.
    let big = put("big.bin", vec![7u8; 4 << 20]).await;
    assert!(!ok_or_full(&big, "a file write on a full disk"));
    let bytes = common::guest_bytes("probe");
    let registered = srv.request(Method::POST, "/v1/tools?name=probe-two", Some(&srv.admin), bytes.clone()).await;
    assert!(!ok_or_full(&registered, "a registration on a full disk"));
    // Reads still answer.
    assert_eq!(&srv.get("/v1/files/keep.txt", &alice).await.body[..], b"before");
    assert_eq!(srv.get("/v1/executions", &alice).await.status, StatusCode::OK);
    srv.assert_healthy().await;

    // Space freed: full service, without a restart.
    std::fs::remove_file(ballast).unwrap();
    answered.push(srv.report("probe", &alice, flood.clone()).await["id"].as_str().unwrap().to_owned());
    assert_eq!(put("big.bin", vec![7u8; 4 << 20]).await.status, StatusCode::OK);
    assert_eq!(srv.get("/v1/files/big.bin", &alice).await.body.len(), 4 << 20);
    let again = srv.request(Method::POST, "/v1/tools?name=probe-two", Some(&srv.admin), bytes).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&again.body));
    assert_eq!(srv.report("probe-two", &alice, echo).await["status"], "ok");

    // Every answered call is recorded; no stray file is left in the user's directory.
    let page = srv.get("/v1/executions?limit=500", &alice).await.json();
    let recorded: HashSet<&str> =
        page["executions"].as_array().unwrap().iter().filter_map(|e| e["id"].as_str()).collect();
    for id in &answered {
        assert!(recorded.contains(id.as_str()), "answered call {id} is not recorded");
    }
    let listing = srv.get("/v1/files", &alice).await.json();
    let names: Vec<&str> = listing["entries"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names.len(), 2, "{listing}");
    let dir = srv.stop_keeping_data().await;
    // The database is whole and the audit chain unbroken.
    let conn = rusqlite::Connection::open(data.join("sandbox.db")).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    let verify = bin().args(["audit", "verify", "--data-dir"]).arg(&data).output().unwrap();
    assert!(verify.status.success(), "audit verify: {}", String::from_utf8_lossy(&verify.stderr));
    drop(dir);
}

/// A server process on a free port, its data directory, an admin and a user.
struct Served {
    child: common::StoppedOnDrop,
    addr: String,
    admin: String,
    alice: String,
    _dir: tempfile::TempDir,
}

fn cli(args: &[&str], dir: &Path) -> String {
    let out = bin().args(args).arg("--data-dir").arg(dir).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts `serve` (through `wrap`, e.g. `prlimit`), with the probe registered.
async fn serve(wrap: &[&str]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let admin = cli(&["user", "add", "root", "--admin"], dir.path());
    let alice = cli(&["user", "add", "alice", "--tier", "premium"], dir.path());
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_imagentx-sandbox"));
            c
        }
        None => bin(),
    };
    let mut child = command
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .env("IMAGENTX_INTERPRETERS", dir.path().join("no-interpreters"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("server: {line}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the server did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    let registered = http(&addr, Method::POST, "/v1/tools?name=probe", &admin, common::guest_bytes("probe")).await;
    assert_eq!(registered.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&registered.body));
    Served { child: common::StoppedOnDrop(child), addr, admin, alice, _dir: dir }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_server_under_load_loses_no_answered_call_and_serves_again_when_thawed() {
    let s = serve(&[]).await;
    let pid = nix::unistd::Pid::from_raw(s.child.0.id() as i32);
    let until = Instant::now() + Duration::from_secs(6);
    // Four clients, under the premium tier's 20 calls in flight: a call whose
    // client gave up during the freeze still holds its place until it ends.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, key) = (s.addr.clone(), s.alice.clone());
            tokio::spawn(async move {
                let (mut answered, mut timed_out) = (Vec::new(), 0);
                while Instant::now() < until {
                    let body = json!({"input": {"op": "echo"}}).to_string();
                    let call = http(&addr, Method::POST, "/v1/tools/probe/invoke", &key, body);
                    match tokio::time::timeout(Duration::from_secs(1), call).await {
                        Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(a) => {
                            assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
                            answered.push(a.json()["id"].as_str().unwrap().to_owned());
                        }
                        Err(_) => timed_out += 1,
                    }
                }
                (answered, timed_out)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let (mut answered, mut timed_out) = (Vec::new(), 0);
    for client in clients {
        let (a, t) = client.await.unwrap();
        answered.extend(a);
        timed_out += t;
    }
    assert!(timed_out > 0, "no client waited out the freeze");
    assert!(answered.len() > 50, "{} calls answered", answered.len());
    // Calls whose clients gave up still finish and are recorded: wait for them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let page = http(&s.addr, Method::GET, "/v1/executions?limit=500", &s.alice, "").await.json();
    let mut recorded: HashSet<String> = HashSet::new();
    let mut before = page["next_before"].clone();
    recorded.extend(page["executions"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()));
    while let Some(b) = before.as_i64() {
        let page = http(&s.addr, Method::GET, &format!("/v1/executions?limit=500&before={b}"), &s.alice, "").await;
        let page = page.json();
        recorded.extend(page["executions"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        before = page["next_before"].clone();
    }
    let lost: Vec<&String> = answered.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(lost.is_empty(), "answered calls not recorded: {lost:?}");
    assert!(recorded.len() >= answered.len());
    let a =
        http(&s.addr, Method::POST, "/v1/tools/probe/invoke", &s.alice, json!({"input": {"op": "echo"}}).to_string())
            .await;
    assert_eq!(a.status, StatusCode::OK);
    let audit = http(&s.addr, Method::GET, "/v1/audit?kind=execution&limit=1", &s.admin, "").await;
    assert_eq!(audit.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_new_connections_are_refused_cleanly_and_service_returns() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        panic!("prlimit (util-linux) is needed");
    }
    let s = serve(&["prlimit", "--nofile=256:256", "--"]).await;
    // Hold connections until the server has no descriptor left to accept with.
    let mut held = Vec::new();
    for _ in 0..400 {
        match std::net::TcpStream::connect(&s.addr) {
            Ok(c) => held.push(c),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new request is answered at once (503, with why) or its connection
    // closed: never left waiting.
    let started = Instant::now();
    let probe = tokio::time::timeout(Duration::from_secs(5), http(&s.addr, Method::GET, "/healthz", "", "")).await;
    match probe {
        Ok(a) => assert!(
            a.status == StatusCode::SERVICE_UNAVAILABLE && a.error_code() == "too_many_connections",
            "{} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ),
        Err(_) => panic!("a new connection hung for {:?} while the server was out of descriptors", started.elapsed()),
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = json!({"input": {"op": "echo"}}).to_string();
        let a = http(&s.addr, Method::POST, "/v1/tools/probe/invoke", &s.alice, body).await;
        if a.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "no service after the connections closed: {}", a.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Another process holds the database's write lock past the writer's
/// patience (10 s): the calls meanwhile are answered 503 `database_busy`,
/// not recorded and not hung; once the lock is gone, they run again.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_locked_by_another_process_is_answered_503_and_nothing_unrecorded_is_answered() {
    let srv = TestServer::start().await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let echo = json!({"input": {"op": "echo"}});
    assert_eq!(srv.report("probe", &alice, echo.clone()).await["status"], "ok");
    let db = srv.dir.path().join("sandbox.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(12));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let started = Instant::now();
    let a = srv.invoke("probe", &alice, echo.clone()).await;
    let waited = started.elapsed();
    assert_eq!((a.status, a.error_code()), (StatusCode::SERVICE_UNAVAILABLE, "database_busy".to_owned()));
    assert!(a.headers.contains_key("retry-after"));
    assert!(waited < Duration::from_secs(12), "answered after {waited:?}");
    holder.join().unwrap();
    assert_eq!(srv.report("probe", &alice, echo).await["status"], "ok");
    let page = srv.get("/v1/executions", &alice).await.json();
    assert_eq!(page["executions"].as_array().unwrap().len(), 2, "the refused call was recorded after all: {page}");
}

/// The artifact cache cannot be written (a read-only filesystem): tools are
/// still registered and called (compiled in memory), and a restart loads
/// them again from their blobs.
#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_artifact_cache_costs_compile_time_not_service() {
    if !is_root() {
        common::skip_unprivileged("the read-only cache test (a tmpfs mount)");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let out =
        Command::new("mount").args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"]).arg(cache.path()).output().unwrap();
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    let unmount = scopeguard(cache.path().to_owned());
    let settings = |data: &Path| ServerSettings {
        data_dir: data.to_owned(),
        max_instances: 8,
        artifact_cache_dir: Some(cache.path().to_owned()),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let srv = TestServer::start_in(dir, Default::default(), s).await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    assert_eq!(srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await["status"], "ok");
    let dir = srv.stop_keeping_data().await;
    let s = settings(dir.path());
    let again = TestServer::start_in(dir, Default::default(), s).await;
    assert_eq!(again.report("probe", &alice, json!({"input": {"op": "echo"}})).await["status"], "ok");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    drop(again);
    drop(unmount);
}

/// Unmounts `path` when dropped (however the test ends).
fn scopeguard(path: PathBuf) -> impl Drop {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).output();
        }
    }
    Unmount(path)
}
