//! Hostile guests against the walls: files outside the preopens, other users,
//! planted symlinks, the host environment, the network. Each attack must fail
//! inside the tool, and the host must be untouched afterwards.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use common::{call, load, run, sandbox};
use imagentx_sandbox::report::Status;
use serde_json::{Value, json};

async fn probe(sb: &imagentx_sandbox::runner::Sandbox, user: &str, input: Value) -> Value {
    let tool = load(sb, "probe").await;
    let report = run(sb, &tool, &call(user, "standard", input)).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    report.output.expect("probe answers JSON")
}

#[tokio::test]
async fn guest_cannot_read_host_files_by_absolute_or_dotdot_paths() {
    let (sb, _dir) = sandbox();
    for path in [
        "/etc/passwd",
        "/data/../../../../etc/passwd",
        "/data/../users/bob",
        "../etc/passwd",
        "/tmp/../../etc/passwd",
        "/proc/self/environ",
        "/",
    ] {
        let out = probe(&sb, "alice", json!({"op": "read", "path": path})).await;
        assert_eq!(out["ok"], false, "{path} was readable: {out}");
    }
    let out = probe(&sb, "alice", json!({"op": "list", "path": "/data/.."})).await;
    assert_eq!(out["ok"], false, "listed the parent of /data: {out}");
}

#[tokio::test]
async fn guest_cannot_write_outside_its_preopens() {
    let (sb, dir) = sandbox();
    for path in ["/escape.txt", "/data/../escape.txt", "/data/../../escape.txt"] {
        let out = probe(&sb, "alice", json!({"op": "write", "path": path, "content": "x"})).await;
        assert_eq!(out["ok"], false, "{path} was writable: {out}");
    }
    assert!(!dir.path().join("users/escape.txt").exists());
    assert!(!dir.path().join("escape.txt").exists());
}

#[tokio::test]
async fn a_symlink_planted_in_the_users_directory_is_not_followed_out() {
    let (sb, dir) = sandbox();
    let _ = probe(&sb, "mallory", json!({"op": "echo"})).await; // creates users/mallory
    let home = dir.path().join("users/mallory");
    std::os::unix::fs::symlink("/etc", home.join("etc")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", home.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../..", home.join("up")).unwrap();
    for path in ["/data/etc/passwd", "/data/passwd", "/data/up/etc/passwd"] {
        let out = probe(&sb, "mallory", json!({"op": "read", "path": path})).await;
        assert_eq!(out["ok"], false, "{path} led out of /data: {out}");
    }
    let out = probe(&sb, "mallory", json!({"op": "write", "path": "/data/etc/hostile", "content": "x"})).await;
    assert_eq!(out["ok"], false, "wrote through a symlink: {out}");
    assert!(!std::path::Path::new("/etc/hostile").exists());
}

#[tokio::test]
async fn a_user_cannot_see_another_users_files() {
    let (sb, dir) = sandbox();
    let out = probe(&sb, "alice", json!({"op": "write", "path": "/data/secret.txt", "content": "alice's"})).await;
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(std::fs::read_to_string(dir.path().join("users/alice/secret.txt")).unwrap(), "alice's");

    for path in ["/data/secret.txt", "/data/../alice/secret.txt", "../alice/secret.txt"] {
        let out = probe(&sb, "bob", json!({"op": "read", "path": path})).await;
        assert_eq!(out["ok"], false, "bob read {path}: {out}");
    }
    let out = probe(&sb, "bob", json!({"op": "list", "path": "/data"})).await;
    assert_eq!(out["entries"], json!([]), "{out}");
    // Alice still sees her own file, in a later call.
    let out = probe(&sb, "alice", json!({"op": "read", "path": "/data/secret.txt"})).await;
    assert_eq!(out["content"], "alice's");
}

#[tokio::test]
async fn tmp_is_private_to_one_call_and_emptied_afterwards() {
    let (sb, dir) = sandbox();
    let out = probe(&sb, "alice", json!({"op": "write", "path": "/tmp/left-over", "content": "x"})).await;
    assert_eq!(out["ok"], true, "{out}");
    // The next call, another user's, gets the recycled directory: empty.
    let out = probe(&sb, "bob", json!({"op": "list", "path": "/tmp"})).await;
    assert_eq!(out["entries"], json!([]), "a previous call's /tmp leaked: {out}");
    let scratch: Vec<_> = std::fs::read_dir(dir.path().join("scratch")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(scratch.len(), 1, "one spare directory is kept: {scratch:?}");
    assert_eq!(std::fs::read_dir(&scratch[0]).unwrap().count(), 0, "the spare directory is not empty");
}

#[tokio::test]
async fn a_timed_out_calls_tmp_is_removed_not_reused() {
    let (sb, dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let call = common::with_timeout(call("alice", "free", json!({"op": "sleep", "ms": 60_000})), 200);
    assert_eq!(run(&sb, &tool, &call).await.status, Status::Timeout);
    assert_eq!(std::fs::read_dir(dir.path().join("scratch")).unwrap().count(), 0);
}

#[tokio::test]
async fn the_host_environment_does_not_leak_into_the_guest() {
    let (sb, _dir) = sandbox();
    assert!(std::env::var_os("PATH").is_some(), "the test needs a host environment to leak");
    let out = probe(&sb, "alice", json!({"op": "env"})).await;
    assert_eq!(out["vars"], json!([]), "{out}");
}

#[tokio::test]
async fn the_policy_environment_is_all_the_guest_sees() {
    let policy = imagentx_sandbox::policy::Policy {
        env: [("LANG".to_owned(), "C.UTF-8".to_owned())].into(),
        ..Default::default()
    };
    let (sb, _dir) = common::sandbox_with(policy);
    let out = probe(&sb, "alice", json!({"op": "env"})).await;
    assert_eq!(out["vars"], json!([["LANG", "C.UTF-8"]]), "{out}");
}

#[tokio::test]
async fn socket_connect_is_denied() {
    // Something is listening, so only the sandbox can make the connect fail.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "standard", json!({"op": "connect", "addr": addr}))).await;
    // wasi:sockets is not in the linker: the first socket call traps.
    assert_eq!(report.status, Status::Crashed, "{report:?}");
    assert!(report.error.as_deref().unwrap_or_default().contains("wasi:sockets"), "{report:?}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a connection reached the host");
}
