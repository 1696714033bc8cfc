//! Backup and restore as an operator runs them: `serve` as its own process
//! keeps answering while `backup --to` reads its data directory (as root,
//! users' files from their volumes, mounted in the server's own namespace);
//! `backup verify` finds a damaged or truncated file; the data directory is
//! wiped, restored, and every user, key, tool, file and a verifying audit
//! trail come back.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use server::http;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
}

fn cli(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn add_user(dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["user", "add", name, "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

struct Served {
    child: common::StoppedOnDrop,
    addr: String,
}

fn serve(dir: &Path) -> Served {
    serve_with(dir, None)
}

fn serve_with(dir: &Path, config: Option<&Path>) -> Served {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut command = bin();
    if let Some(config) = config {
        command.arg("serve").arg("--config").arg(config);
    } else {
        command.arg("serve");
    }
    let child = command
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir)
        .env("IMAGENTX_INTERPRETERS", dir.join("no-interpreters"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Served { child: common::StoppedOnDrop(child), addr }
}

fn json_out(out: &Output) -> Value {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn back_up_a_running_server_wipe_restore_and_everything_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let admin = add_user(&data, "root", &["--admin", "--tier", "premium"]);
    let alice = add_user(&data, "alice", &["--tier", "standard"]);
    let server = serve(&data);
    let addr = server.addr.clone();
    let registered = http(&addr, Method::POST, "/v1/tools", &admin, common::guest_bytes("word-stats")).await;
    assert_eq!(registered.status, StatusCode::CREATED);
    let call =
        http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, r#"{"input":{"text":"kept words"}}"#).await;
    let execution = call.json()["id"].as_str().unwrap().to_owned();
    for (path, body) in [("notes/today.txt", "remember this"), ("big.bin", &"x".repeat(3 << 20))] {
        let put = http(&addr, Method::PUT, &format!("/v1/files/{path}"), &alice, body.to_owned()).await;
        assert_eq!(put.status, StatusCode::OK);
    }

    // A symlink a tool planted to the host's secrets (made here through the
    // server's own namespace, where alice's volume is mounted) is backed up
    // as the link it is, never followed.
    let planted = nix::unistd::geteuid().is_root().then(|| {
        let inside = data.canonicalize().unwrap();
        let alice_dir = Path::new(&format!("/proc/{}/root", server.child.0.id()))
            .join(inside.strip_prefix("/").unwrap())
            .join("users/alice");
        std::os::unix::fs::symlink("/etc/shadow", alice_dir.join("shadow-link")).unwrap();
    });

    // Back up while calls keep coming.
    let backup = root.path().join("backups/first.tar.gz");
    std::fs::create_dir(root.path().join("backups")).unwrap();
    let calls = {
        let (addr, alice) = (addr.clone(), alice.clone());
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..40 {
                let body = format!(r#"{{"input":{{"text":"during {i}"}}}}"#);
                let answer = http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, body).await;
                ok += usize::from(answer.status == StatusCode::OK);
            }
            ok
        })
    };
    let made = json_out(&bin().args(["backup", "--to"]).arg(&backup).arg("--data-dir").arg(&data).output().unwrap());
    assert_eq!(calls.await.unwrap(), 40, "calls failed during the backup");
    assert_eq!((made["users"].as_u64(), made["tools"].as_u64()), (Some(2), Some(1)), "{made}");
    assert!(made["executions"].as_u64().unwrap() >= 1, "{made}");
    let leftovers: Vec<_> =
        std::fs::read_dir(root.path().join("backups")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "a partial file was left: {leftovers:?}");
    let verified = json_out(&bin().args(["backup", "verify"]).arg(&backup).output().unwrap());
    assert_eq!(verified["audit_head"], made["audit_head"]);

    // A damaged copy and a truncated one are refused, naming what is wrong.
    let bytes = std::fs::read(&backup).unwrap();
    let truncated = root.path().join("truncated.tar.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = bin().args(["backup", "verify"]).arg(&truncated).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"), "{}", String::from_utf8_lossy(&out.stderr));
    let tampered = root.path().join("tampered.tar.gz");
    let mut altered = bytes.clone();
    let middle = altered.len() / 3;
    altered[middle] ^= 0x55;
    std::fs::write(&tampered, &altered).unwrap();
    assert_eq!(bin().args(["backup", "verify"]).arg(&tampered).output().unwrap().status.code(), Some(1));
    // Restore refuses a directory that is not empty.
    let out = bin().args(["restore"]).arg(&backup).arg("--data-dir").arg(&data).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // Wipe, restore, serve: everything is back.
    drop(server);
    std::fs::remove_dir_all(&data).unwrap();
    let restored = json_out(&bin().args(["restore"]).arg(&backup).arg("--data-dir").arg(&data).output().unwrap());
    assert_eq!(restored["audit_head"], made["audit_head"]);
    if planted.is_some() {
        let link = data.join("users/alice/shadow-link");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was followed");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/etc/shadow"));
    }
    let audit = bin().args(["audit", "verify", "--data-dir"]).arg(&data).output().unwrap();
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
    let server = serve(&data);
    let addr = server.addr.clone();
    let report = http(&addr, Method::GET, &format!("/v1/executions/{execution}"), &alice, "").await;
    assert_eq!(report.status, StatusCode::OK, "alice's key and execution");
    let file = http(&addr, Method::GET, "/v1/files/notes/today.txt", &alice, "").await;
    assert_eq!(&file.body[..], b"remember this");
    let big = http(&addr, Method::GET, "/v1/files/big.bin", &alice, "").await;
    assert_eq!(big.body.len(), 3 << 20);
    let again =
        http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, r#"{"input":{"text":"back again"}}"#).await;
    assert_eq!(again.json()["status"], "ok", "the tool is back");
    let me = http(&addr, Method::GET, "/v1/me", &alice, "").await.json();
    assert!(me["data_used_bytes"].as_u64().unwrap() >= 3 << 20, "{me}");
    let users = http(&addr, Method::GET, "/v1/audit?kind=user_added&limit=10", &admin, "").await.json();
    assert_eq!(users["records"].as_array().unwrap().len(), 2, "{}", json!(users));
}

/// A gauge or counter line of `/metrics`, by its whole name and labels.
async fn metric(addr: &str, name: &str) -> f64 {
    let text = String::from_utf8(http(addr, Method::GET, "/metrics", "", "").await.body.to_vec()).unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}

/// `[backup]` inside `serve`: every second, the newest two kept, each
/// audited; a target it cannot write is an alert and a metric, not a crash.
/// Then a damaged database: the server refuses it, naming the newest backup.
#[tokio::test(flavor = "multi_thread")]
async fn scheduled_backups_rotate_failures_alert_and_a_damaged_database_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let admin = add_user(&data, "root", &["--admin"]);
    let backups = root.path().join("backups");
    let config = root.path().join("config.toml");
    std::fs::write(&config, format!("[backup]\ndir = \"{}\"\nevery_s = 1\nkeep = 2\n", backups.display())).unwrap();
    let server = serve_with(&data, Some(&config));
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server.addr, "imagentx_backups_total{outcome=\"ok\"}").await < 3.0 {
        assert!(Instant::now() < deadline, "three backups were not taken");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = imagentx_sandbox::api::scheduled_backups(&backups);
    assert_eq!(kept.len(), 2, "{kept:?}");
    json_out(&bin().args(["backup", "verify"]).arg(kept.last().unwrap()).output().unwrap());
    let audit = http(&server.addr, Method::GET, "/v1/audit?kind=backup&limit=10", &admin, "").await.json();
    assert!(audit["records"].as_array().unwrap().iter().all(|r| r["outcome"] == "ok"), "{audit}");
    drop(server);

    // A target that cannot be written: alerts, and the server serves on.
    std::fs::write(&config, "[backup]\ndir = \"/proc/imagentx-cannot-write-here\"\nevery_s = 1\n").unwrap();
    let server = serve_with(&data, Some(&config));
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server.addr, "imagentx_backups_total{outcome=\"failed\"}").await < 1.0 {
        assert!(Instant::now() < deadline, "no failed backup was counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alerts = http(&server.addr, Method::GET, "/v1/alerts", &admin, "").await.json();
    assert!(alerts.to_string().contains("backup_failed"), "{alerts}");
    assert_eq!(http(&server.addr, Method::GET, "/healthz", "", "").await.status, StatusCode::OK);
    drop(server);

    // Damaged pages: the server refuses to start and says how to restore.
    std::fs::write(&config, format!("[backup]\ndir = \"{}\"\n", backups.display())).unwrap();
    damage_pages(&data);
    let stderr = refused_start(&data, &config);
    assert!(stderr.contains("damaged"), "{stderr}");
    let newest = imagentx_sandbox::api::scheduled_backups(&backups).pop().unwrap();
    assert!(stderr.contains(&format!("imagentx-sandbox restore {}", newest.display())), "{stderr}");
}

/// `kill -9` of the server and of its backup child in the middle of a
/// scheduled backup (as a crash of the host does): the partial file is left,
/// the next start's next backup removes it, and every backup taken before
/// still verifies.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_killed_mid_way_leaves_a_partial_file_the_next_start_removes() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("users/alice")).unwrap();
    add_user(&data, "alice", &[]);
    // Incompressible, so that the backup takes a while to write.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..24 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(data.join("users/alice/noise.bin"), &noise).unwrap();
    let backups = root.path().join("backups");
    let config = root.path().join("config.toml");
    std::fs::write(&config, format!("[backup]\ndir = \"{}\"\nevery_s = 1\nkeep = 10\n", backups.display())).unwrap();
    let partials = |dir: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .map(|e| e.path())
            .collect()
    };
    // A backup finished first (to check that it survives), then one killed
    // under way: its child first (found by the backup directory in its
    // arguments), then the server. A backup that wins the race is tried again.
    let needle = backups.to_string_lossy().into_owned();
    let mut left = Vec::new();
    for _attempt in 0..5 {
        let mut server = serve_with(&data, Some(&config));
        let deadline = Instant::now() + Duration::from_secs(60);
        while metric(&server.addr, "imagentx_backups_total{outcome=\"ok\"}").await < 1.0 {
            assert!(Instant::now() < deadline, "no backup was taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while partials(&backups).is_empty() {
            assert!(Instant::now() < deadline, "no backup was seen under way");
            std::thread::sleep(Duration::from_millis(2));
        }
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != server.child.0.id() as i32 && String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        server.child.0.kill().unwrap();
        let _ = server.child.0.wait();
        left = partials(&backups);
        if !left.is_empty() {
            break;
        }
    }
    let finished_before = imagentx_sandbox::api::scheduled_backups(&backups);
    assert!(!finished_before.is_empty() && !left.is_empty(), "no backup was killed under way in 5 tries");

    let server = serve_with(&data, Some(&config));
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server.addr, "imagentx_backups_total{outcome=\"ok\"}").await < 1.0 || left.iter().any(|p| p.exists())
    {
        assert!(Instant::now() < deadline, "no backup after the restart, or the partial file is still there: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let newest = imagentx_sandbox::api::scheduled_backups(&backups).pop().unwrap();
    drop(server);
    for backup in finished_before.iter().chain([&newest]) {
        json_out(&bin().args(["backup", "verify"]).arg(backup).output().unwrap());
    }
}

/// `serve` on `data` with `config`, which must refuse to start: its stderr.
fn refused_start(data: &Path, config: &Path) -> String {
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// Overwrites the second and third pages of the data directory's database
/// (its WAL removed first): answers the damaged file's bytes.
fn damage_pages(data: &Path) -> Vec<u8> {
    let db = data.join("sandbox.db");
    let _ = std::fs::remove_file(data.join("sandbox.db-wal"));
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() >= 4 * 4096, "a database of {} bytes", bytes.len());
    for b in &mut bytes[4096..3 * 4096] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    bytes
}

/// `[backup] auto_restore`: a damaged database is replaced by the newest
/// backup that verifies (a truncated newer one is passed over), the server
/// starts on it with an alert, users' files stay, the damaged files are
/// kept, and the audit trail verifies; what came after the backup (a user
/// added) is gone, as documented. With no backup that verifies, the server
/// still refuses to start, saying what it tried.
#[tokio::test(flavor = "multi_thread")]
async fn auto_restore_replaces_a_damaged_database_with_the_newest_good_backup() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let admin = add_user(&data, "root", &["--admin", "--tier", "premium"]);
    let alice = add_user(&data, "alice", &["--tier", "standard"]);
    let backups = root.path().join("backups");
    let config = root.path().join("config.toml");
    let schedule = |dir: &Path| format!("[backup]\ndir = \"{}\"\nevery_s = 3600\nauto_restore = true\n", dir.display());
    std::fs::write(&config, schedule(&backups)).unwrap();
    let server = serve_with(&data, Some(&config));
    let addr = server.addr.clone();
    let registered = http(&addr, Method::POST, "/v1/tools", &admin, common::guest_bytes("word-stats")).await;
    assert_eq!(registered.status, StatusCode::CREATED);
    let call = http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, r#"{"input":{"text":"before"}}"#).await;
    let execution = call.json()["id"].as_str().unwrap().to_owned();
    drop(server);
    std::fs::create_dir(&backups).unwrap();
    let good = backups.join(format!("{}2026-12-01T00-00-00.000000Z.tar.gz", imagentx_sandbox::api::BACKUP_PREFIX));
    json_out(&bin().args(["backup", "--to"]).arg(&good).arg("--data-dir").arg(&data).output().unwrap());
    // After the backup: a user added, a file written.
    let late = add_user(&data, "late", &[]);
    let server = serve_with(&data, Some(&config));
    let put = http(&server.addr, Method::PUT, "/v1/files/after.txt", &alice, "written after the backup").await;
    assert_eq!(put.status, StatusCode::OK);
    drop(server);
    // A newer backup, cut short: it must be passed over.
    let bytes = std::fs::read(&good).unwrap();
    let truncated = backups.join(format!("{}2026-12-02T00-00-00.000000Z.tar.gz", imagentx_sandbox::api::BACKUP_PREFIX));
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let damaged = damage_pages(&data);
    let server = serve_with(&data, Some(&config));
    let addr = server.addr.clone();
    let report = http(&addr, Method::GET, &format!("/v1/executions/{execution}"), &alice, "").await;
    assert_eq!(report.status, StatusCode::OK, "alice's key and execution");
    let again = http(&addr, Method::POST, "/v1/tools/word-stats/invoke", &alice, r#"{"input":{"text":"after"}}"#).await;
    assert_eq!(again.json()["status"], "ok", "the tool is back");
    let file = http(&addr, Method::GET, "/v1/files/after.txt", &alice, "").await;
    assert_eq!(&file.body[..], b"written after the backup", "users' files stay as they were");
    assert_eq!(http(&addr, Method::GET, "/v1/me", &late, "").await.status, StatusCode::UNAUTHORIZED);
    let alerts = http(&addr, Method::GET, "/v1/audit?kind=alert&limit=10", &admin, "").await.json();
    let restored = alerts["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["outcome"] == "database_restored")
        .unwrap_or_else(|| panic!("no database_restored alert: {alerts}"))
        .clone();
    let detail: Value = match &restored["detail"] {
        Value::String(text) => serde_json::from_str(text).unwrap(),
        other => other.clone(),
    };
    assert_eq!(detail["backup"], good.to_str().unwrap(), "{detail}");
    let kept = &detail["damaged_files_kept_in"];
    let kept = kept.as_array().unwrap()[0].as_str().map(std::path::PathBuf::from).unwrap();
    assert!(kept.starts_with(&data), "{detail}");
    assert!(std::fs::read(kept.join("sandbox.db")).unwrap() == damaged, "the kept database is not the damaged one");
    assert_eq!(metric(&addr, "imagentx_alerts_total{rule=\"database_restored\"}").await, 1.0);
    assert!(!data.join(".restoring").exists(), "the scratch directory was left");
    assert!(!data.join(".restoring.json").exists(), "the marker was left after the alert");
    drop(server);
    let audit = bin().args(["audit", "verify", "--data-dir"]).arg(&data).output().unwrap();
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));

    // No backup that verifies: the server refuses to start, saying what it tried.
    let only_bad = root.path().join("only-bad");
    std::fs::create_dir(&only_bad).unwrap();
    std::fs::copy(&truncated, only_bad.join(truncated.file_name().unwrap())).unwrap();
    std::fs::write(&config, schedule(&only_bad)).unwrap();
    let damaged_again = damage_pages(&data);
    let stderr = refused_start(&data, &config);
    assert!(stderr.contains("damaged") && stderr.contains("auto_restore"), "{stderr}");

    // A good backup in a directory anyone may write to is not trusted: whoever
    // planted it could have planted their own admin key.
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(&good, only_bad.join(good.file_name().unwrap())).unwrap();
    std::fs::set_permissions(&only_bad, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = refused_start(&data, &config);
    assert!(stderr.contains("writable by its group or others"), "{stderr}");
    assert!(std::fs::read(data.join("sandbox.db")).unwrap() == damaged_again, "the damaged database is left in place");
}

/// A restore that a crash cut short (its marker written, the backup's
/// database unpacked beside, nothing moved yet) is finished by the next
/// start, whatever the config says: the old WAL is moved away before the
/// swap (never replayed over the restored database), the damaged database
/// kept, and the alert raised.
#[tokio::test(flavor = "multi_thread")]
async fn an_automatic_restore_cut_short_is_finished_at_the_next_start() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let admin = add_user(&data, "root", &["--admin"]);
    let alice = add_user(&data, "alice", &[]);
    let backup = root.path().join("backup.tar.gz");
    json_out(&bin().args(["backup", "--to"]).arg(&backup).arg("--data-dir").arg(&data).output().unwrap());
    let late = add_user(&data, "late", &[]);
    let damaged = damage_pages(&data);
    std::fs::write(data.join("sandbox.db-wal"), b"the damaged database's write-ahead log").unwrap();
    // The state a crash right after the marker leaves.
    let unpacked = root.path().join("unpacked");
    json_out(&bin().args(["restore"]).arg(&backup).arg("--data-dir").arg(&unpacked).output().unwrap());
    std::fs::create_dir(data.join(".restoring")).unwrap();
    std::fs::copy(unpacked.join("sandbox.db"), data.join(".restoring/sandbox.db")).unwrap();
    let kept = data.join("damaged-cut-short");
    let marker = imagentx_sandbox::backup::RestoreMarker {
        problem: "pages overwritten".into(),
        backup: backup.clone(),
        backup_made_at: "2026-12-01T00:00:00Z".into(),
        kept: kept.clone(),
        has_archive: false,
        swapped: false,
    };
    std::fs::write(data.join(".restoring.json"), serde_json::to_vec(&marker).unwrap()).unwrap();

    let server = serve(&data);
    let addr = server.addr.clone();
    assert_eq!(http(&addr, Method::GET, "/v1/me", &alice, "").await.status, StatusCode::OK);
    assert_eq!(http(&addr, Method::GET, "/v1/me", &late, "").await.status, StatusCode::UNAUTHORIZED);
    let alerts = http(&addr, Method::GET, "/v1/audit?kind=alert&limit=10", &admin, "").await.json();
    assert!(alerts.to_string().contains("database_restored"), "{alerts}");
    assert!(std::fs::read(kept.join("sandbox.db")).unwrap() == damaged, "the kept database is not the damaged one");
    assert_eq!(std::fs::read(kept.join("sandbox.db-wal")).unwrap(), b"the damaged database's write-ahead log");
    assert!(!data.join(".restoring").exists() && !data.join(".restoring.json").exists());
    drop(server);
    let audit = bin().args(["audit", "verify", "--data-dir"]).arg(&data).output().unwrap();
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
}

/// A symlink slipped into a backup after it was made (to the host's
/// secrets, in alice's directory) is named by `backup verify`: the manifest
/// lists directories and symlinks too, not only files.
#[test]
fn a_symlink_added_to_a_backup_is_found() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("users/alice/notes")).unwrap();
    add_user(&data, "alice", &[]);
    std::fs::write(data.join("users/alice/notes/a.txt"), "a").unwrap();
    std::os::unix::fs::symlink("notes/a.txt", data.join("users/alice/link")).unwrap();
    // Targets that tar keeps in another form than readlink gives them.
    let long = format!("notes//{}/../a.txt", "x".repeat(120));
    for (name, target) in
        [("double", "notes//a.txt"), ("dot", "notes/./a.txt"), ("root", "/"), ("trailing", "notes/."), ("long", &long)]
    {
        std::os::unix::fs::symlink(target, data.join("users/alice").join(name)).unwrap();
    }
    let backup = root.path().join("backup.tar.gz");
    json_out(&bin().args(["backup", "--to"]).arg(&backup).arg("--data-dir").arg(&data).output().unwrap());

    // Copied member by member, with a symlink added before the manifest.
    let tampered = root.path().join("tampered.tar.gz");
    {
        let input = std::fs::File::open(&backup).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(input));
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&tampered).unwrap(), flate2::Compression::fast());
        let mut out = tar::Builder::new(gz);
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().into_owned();
            if path == Path::new("manifest.json") {
                let mut text = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut text).unwrap();
                let manifest: Value = serde_json::from_slice(&text).unwrap();
                let members = manifest["members"].as_array().unwrap();
                assert!(members.iter().any(|m| m["path"] == "users/alice/notes" && m["kind"] == "dir"), "{manifest}");
                assert!(
                    members.iter().any(|m| m["path"] == "users/alice/link" && m["kind"] == "symlink"),
                    "{manifest}"
                );
                let mut link = tar::Header::new_gnu();
                link.set_entry_type(tar::EntryType::Symlink);
                link.set_size(0);
                out.append_link(&mut link, "users/alice/innocent", "/etc/shadow").unwrap();
                out.append_data(&mut entry.header().clone(), &path, text.as_slice()).unwrap();
                continue;
            }
            let mut header = entry.header().clone();
            if entry.header().entry_type().is_symlink() {
                let target = entry.link_name().unwrap().unwrap().into_owned();
                out.append_link(&mut header, &path, target).unwrap();
            } else {
                out.append_data(&mut header, &path, &mut entry).unwrap();
            }
        }
        out.into_inner().unwrap().finish().unwrap();
    }
    let out = bin().args(["backup", "verify"]).arg(&tampered).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("users/alice/innocent"), "{stderr}");
    // The backup as made verifies, and restores every link.
    json_out(&bin().args(["backup", "verify"]).arg(&backup).output().unwrap());
    let restored = root.path().join("restored");
    json_out(&bin().args(["restore"]).arg(&backup).arg("--data-dir").arg(&restored).output().unwrap());
    for name in ["link", "double", "dot", "root", "trailing", "long"] {
        let link = restored.join("users/alice").join(name);
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "{name}");
    }
}

/// Names that are not UTF-8 (a native tool can make them) come back as the
/// same bytes, even two that read the same once made UTF-8 (both `\xfe` and
/// `\xff` are U+FFFD); a read-only directory comes back read-only with its
/// files, also from a restore that does not run as root.
#[test]
fn odd_names_and_read_only_directories_are_restored_as_they_were() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let root = tempfile::tempdir().unwrap();
    mode(root.path(), 0o755);
    let data = root.path().join("data");
    let alice = data.join("users/alice");
    std::fs::create_dir_all(&alice).unwrap();
    add_user(&data, "alice", &[]);
    std::fs::create_dir(alice.join(OsStr::from_bytes(b"\xff"))).unwrap();
    std::fs::write(alice.join(OsStr::from_bytes(b"\xff")).join("inside.txt"), "in the odd directory").unwrap();
    std::fs::write(alice.join(OsStr::from_bytes(b"\xfe")), "an odd file").unwrap();
    std::fs::create_dir(alice.join("frozen")).unwrap();
    std::fs::write(alice.join("frozen/kept.txt"), "kept").unwrap();
    mode(&alice.join("frozen"), 0o555);
    let backup = root.path().join("backup.tar.gz");
    json_out(&bin().args(["backup", "--to"]).arg(&backup).arg("--data-dir").arg(&data).output().unwrap());
    json_out(&bin().args(["backup", "verify"]).arg(&backup).output().unwrap());

    let check = |restored: &Path| {
        let alice = restored.join("users/alice");
        let inside = alice.join(OsStr::from_bytes(b"\xff")).join("inside.txt");
        assert_eq!(std::fs::read_to_string(inside).unwrap(), "in the odd directory");
        assert_eq!(std::fs::read_to_string(alice.join(OsStr::from_bytes(b"\xfe"))).unwrap(), "an odd file");
        assert_eq!(std::fs::read_to_string(alice.join("frozen/kept.txt")).unwrap(), "kept");
        let frozen = std::fs::metadata(alice.join("frozen")).unwrap().permissions().mode();
        assert_eq!(frozen & 0o777, 0o555);
    };
    let restored = root.path().join("restored");
    json_out(&bin().args(["restore"]).arg(&backup).arg("--data-dir").arg(&restored).output().unwrap());
    check(&restored);
    if nix::unistd::geteuid().is_root() {
        // As nobody, into a directory nobody owns.
        mode(&backup, 0o644);
        let by_nobody = root.path().join("by-nobody");
        std::fs::create_dir(&by_nobody).unwrap();
        std::os::unix::fs::chown(&by_nobody, Some(65534), Some(65534)).unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_imagentx-sandbox"))
            .arg("restore")
            .arg(&backup)
            .arg("--data-dir")
            .arg(&by_nobody)
            .output()
            .unwrap();
        json_out(&out);
        check(&by_nobody);
    }
}

/// A crafted backup (its manifest right) whose symlink points out of the
/// data directory, then a file "under" it: restore refuses it and writes
/// nothing outside.
#[test]
fn a_crafted_backup_cannot_write_through_its_own_symlink() {
    use sha2::Digest;
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("source");
    std::fs::create_dir(&source).unwrap();
    add_user(&source, "alice", &[]);
    let db = std::fs::read(source.join("sandbox.db")).unwrap();
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let payload = b"pwned".to_vec();
    let hash = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let manifest = json!({
        "format": 1, "created_at": "2026-11-30T00:00:00Z", "made_by": "attacker",
        "users": 1, "tools": 0, "executions": 0, "audit_records": 1, "audit_head": null,
        "members": [
            {"path": "sandbox.db", "bytes": db.len(), "sha256": hash(&db)},
            {"path": "users/alice/link/pwned", "bytes": payload.len(), "sha256": hash(&payload)},
        ],
    })
    .to_string();
    let crafted = root.path().join("crafted.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&crafted).unwrap(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let file = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, bytes).unwrap();
        };
        file(&mut tar, "sandbox.db", &db);
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        tar.append_link(&mut link, "users/alice/link", &outside).unwrap();
        file(&mut tar, "users/alice/link/pwned", &payload);
        file(&mut tar, "manifest.json", manifest.as_bytes());
        tar.into_inner().unwrap().finish().unwrap();
    }
    let target = root.path().join("restored");
    let out = bin().args(["restore"]).arg(&crafted).arg("--data-dir").arg(&target).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("through a symlink"), "{stderr}");
    assert!(!outside.join("pwned").exists(), "the restore wrote outside its directory");
}
