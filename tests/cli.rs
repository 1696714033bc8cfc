//! `imagentx-sandbox run` and `describe` as DESIGN.md's command-line contract
//! says: the real binary, real guests, a report on stdout, exit codes 0/1/2.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn sandbox_cmd(args: &[&str], data_dir: &std::path::Path, stdin: &str) -> Output {
    // `--data-dir` right after the subcommand: everything after `--` is the tool's.
    let mut command = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"));
    command.arg(args[0]).arg("--data-dir").arg(data_dir).args(&args[1..]);
    common::output_with_stdin(&mut command, stdin)
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not a report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn run_prints_a_report_and_exits_zero_on_ok() {
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("word-stats");
    let out = sandbox_cmd(&["run", tool.to_str().unwrap()], dir.path(), r#"{"text": "one two two"}"#);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&out);
    for key in [
        "id",
        "tool",
        "tool_sha256",
        "user",
        "tier",
        "runtime",
        "status",
        "exit_code",
        "signal",
        "output",
        "error",
        "stdout",
        "stderr",
        "truncated",
        "usage",
        "started_at",
        "finished_at",
    ] {
        assert!(r.get(key).is_some(), "report lacks {key}: {r}");
    }
    assert_eq!(r["status"], "ok");
    assert_eq!(r["user"], "local");
    assert_eq!(r["tier"], "standard");
    assert_eq!(r["runtime"], "wasm");
    assert_eq!(r["output"]["words"], 3);
    assert!(dir.path().join("users/local").is_dir());
}

#[test]
fn run_exits_one_for_any_other_status() {
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("probe");
    let out = sandbox_cmd(
        &["run", "--user", "alice", "--tier", "free", "--timeout-ms", "300", tool.to_str().unwrap()],
        dir.path(),
        r#"{"op": "sleep", "ms": 100000}"#,
    );
    assert_eq!(out.status.code(), Some(1));
    let r = report(&out);
    assert_eq!(r["status"], "timeout");
    assert_eq!(r["user"], "alice");

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a module").unwrap();
    let out = sandbox_cmd(&["run", junk.to_str().unwrap()], dir.path(), "{}");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report(&out)["status"], "invalid_tool");
}

#[test]
fn run_passes_arguments_after_the_double_dash() {
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("probe");
    let out = sandbox_cmd(&["run", tool.to_str().unwrap(), "--", "-x", "y"], dir.path(), r#"{"op":"echo"}"#);
    assert_eq!(report(&out)["output"]["args"], serde_json::json!(["probe", "-x", "y"]));
}

#[test]
fn usage_errors_exit_two_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("probe");
    let tool = tool.to_str().unwrap();
    for (args, needle) in [
        (vec!["run", "--tier", "gold", tool], "unknown tier `gold`"),
        (vec!["run", "--user", "../bob", tool], "invalid user id"),
        (vec!["run", "--timeout-ms", "0", tool], "timeout of 0 ms"),
        (vec!["run", "/no/such/tool.wasm"], "reading /no/such/tool.wasm"),
        (vec!["run", "--native", "/bin/true"], "runs the program after `--`"),
        (vec!["run", "--native"], "--native needs a program"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ] {
        let out = sandbox_cmd(&args, dir.path(), "");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn describe_prints_the_tools_schema() {
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("notes");
    let out = sandbox_cmd(&["describe", tool.to_str().unwrap()], dir.path(), "");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["name"], "notes");
    assert_eq!(info["kind"], "sdk");
    assert_eq!(info["sha256"].as_str().unwrap().len(), 64);
    assert!(info["input_schema"]["oneOf"].as_array().unwrap().len() >= 4, "{info}");
}

#[test]
fn a_config_file_changes_the_limits_a_real_tool_gets() {
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("probe");
    let input = r#"{"op": "alloc", "bytes": 100000000}"#;
    let out = sandbox_cmd(&["run", "--tier", "free", tool.to_str().unwrap()], dir.path(), input);
    assert_eq!(report(&out)["status"], "ok");

    let config = dir.path().join("sandbox.toml");
    std::fs::write(&config, "[tiers.free]\nmemory_bytes = 67108864\n[env]\nGREETING = \"hi\"\n").unwrap();
    let config = config.to_str().unwrap();
    let out = sandbox_cmd(&["run", "--config", config, "--tier", "free", tool.to_str().unwrap()], dir.path(), input);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report(&out)["status"], "memory_limit");
    let out = sandbox_cmd(&["run", "--config", config, tool.to_str().unwrap()], dir.path(), r#"{"op": "env"}"#);
    assert_eq!(report(&out)["output"]["vars"], serde_json::json!([["GREETING", "hi"]]));

    std::fs::write(dir.path().join("bad.toml"), "[tiers.free]\nmemroy_bytes = 1\n").unwrap();
    let bad = dir.path().join("bad.toml");
    let out = sandbox_cmd(&["run", "--config", bad.to_str().unwrap(), tool.to_str().unwrap()], dir.path(), "{}");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("memroy_bytes"));
}

#[test]
fn describe_of_a_broken_tool_exits_one_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0\x01\xff").unwrap();
    let out = sandbox_cmd(&["describe", junk.to_str().unwrap()], dir.path(), "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not validate or compile"), "{out:?}");
}

#[test]
fn a_reader_that_goes_away_is_no_panic() {
    // `imagentx-sandbox run tool.wasm | head -1`-like: stdout closed before
    // the report is written. The exit code still says how the call ended.
    let dir = tempfile::tempdir().unwrap();
    let tool = common::guest("word-stats");
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .arg(&tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.stdin.take().unwrap().write_all(br#"{"text": "one two"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_database_a_newer_build_migrated_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sandbox.db");
    imagentx_sandbox::store::Store::open(&db).unwrap().close();
    let newer = imagentx_sandbox::store::SCHEMA_VERSION + 7;
    rusqlite::Connection::open(&db).unwrap().pragma_update(None, "user_version", newer).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
        .args(["audit", "verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("schema is at version {newer}, written by a newer imagentx-sandbox")), "{stderr}");
    let version: i64 =
        rusqlite::Connection::open(&db).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, newer, "the database was changed");
}

/// The hex SHA-256 of `bytes`, as reports name a tool's module.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The `(entry, sha256)` pairs of the data directory's file stamps.
fn stamps(data: &std::path::Path) -> Vec<(std::path::PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(data.join("cache/by-file")) else { return Vec::new() };
    entries.map(|e| e.unwrap().path()).map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap())).collect()
}

#[test]
fn a_tool_file_seen_before_is_loaded_by_its_stamp_and_a_changed_one_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("tool.wasm");
    let (a, b, c) = (common::guest_bytes("word-stats"), common::guest_bytes("notes"), common::guest_bytes("csv-stats"));
    std::fs::write(&file, &a).unwrap();
    let run = |path: &std::path::Path| {
        let out = sandbox_cmd(&["run", path.to_str().unwrap()], &data, r#"{"text": "one two two"}"#);
        report(&out)["tool_sha256"].as_str().unwrap().to_owned()
    };
    // Just written: read and hashed, and not remembered (it may still be changing).
    assert_eq!(run(&file), sha256_hex(&a));
    assert!(stamps(&data).iter().all(|(_, sha)| *sha != sha256_hex(&a)), "a file changed just now was stamped");
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    assert_eq!(run(&file), sha256_hex(&a));
    let stamped: Vec<_> = stamps(&data).into_iter().filter(|(_, sha)| *sha == sha256_hex(&a)).collect();
    assert_eq!(stamped.len(), 1, "{stamped:?}");

    // The stamp answers for the file: pointed at another cached tool, the run
    // loads that one (the file was neither read nor hashed).
    assert_eq!(run(&common::guest("notes")), sha256_hex(&b));
    std::fs::write(&stamped[0].0, sha256_hex(&b)).unwrap();
    assert_eq!(run(&file), sha256_hex(&b));

    // Rewritten in place with bytes of the same size and its modification
    // time put back exactly: device, inode, size and mtime are as stamped, and
    // only the status-change time tells; the file is read again.
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20)); // past the clock's tick
    let handle = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    (&handle).write_all(&a).unwrap();
    handle.set_modified(before.modified().unwrap()).unwrap();
    drop(handle);
    let after = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.modified().unwrap()),
        (before.ino(), before.len(), before.modified().unwrap())
    );
    assert_ne!((after.ctime(), after.ctime_nsec()), (before.ctime(), before.ctime_nsec()));
    assert_eq!(run(&file), sha256_hex(&a), "a file whose ctime changed was taken by its old stamp");

    // Rewritten in place (same name, same inode): its stamp changed, so it is
    // read again, whatever the old stamp said.
    std::fs::OpenOptions::new().write(true).truncate(true).open(&file).unwrap().write_all(&c).unwrap();
    assert_eq!(run(&file), sha256_hex(&c));
    // Replaced by a rename, and its times set back: the inode and the status
    // change time differ all the same.
    let replacement = dir.path().join("replacement.wasm");
    std::fs::write(&replacement, &a).unwrap();
    std::fs::rename(&replacement, &file).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(old).unwrap();
    assert_eq!(run(&file), sha256_hex(&a));
}
