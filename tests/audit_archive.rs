//! The audit trail's archive: old records move out of the database into
//! compressed segments, and `audit verify` (the real CLI) checks segments and
//! table as one chain — naming the segment and the record of a break when a
//! segment is tampered with or missing. A server restarted on the data
//! directory chains on; a backup carries the segments and its restore
//! verifies.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hyper::{Method, StatusCode};
use imagentx_sandbox::audit::ARCHIVE_DIR;
use imagentx_sandbox::policy::Policy;
use serde_json::Value;
use server::TestServer;

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox")).args(args).output().unwrap()
}

fn verify(dir: &Path) -> (bool, Value) {
    let out = cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.success(), json)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join(ARCHIVE_DIR))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    found.sort();
    found
}

fn gunzip(path: &Path) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut text).unwrap();
    text
}

fn gzip(path: &Path, text: &str) {
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
}

/// Archives everything but the newest record, `per_segment` at a time, as
/// the server's scheduler does (here with a cutoff in the future).
async fn archive_all(srv: &TestServer, per_segment: u32) -> u64 {
    let dir = srv.state.settings.data_dir.join(ARCHIVE_DIR);
    let mut moved = 0;
    loop {
        let n = srv.state.store.archive_audit(dir.clone(), "9999-12-31T00:00:00Z".into(), per_segment).await.unwrap();
        if n == 0 {
            return moved;
        }
        moved += n;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn archived_segments_and_the_table_verify_as_one_chain_and_a_break_is_named() {
    let srv = TestServer::start_with(Policy::default(), |s| s.retention.days = 0).await;
    let alice = srv.add_user("alice", "standard", false).await;
    for i in 0..12 {
        let put = srv.request(Method::PUT, &format!("/v1/files/f{i}.txt"), Some(&alice), "x").await;
        assert_eq!(put.status, StatusCode::OK);
    }
    let total = srv.state.store.read(imagentx_sandbox::audit::verify).unwrap().records;
    assert!(total >= 14, "{total} records");
    let moved = archive_all(&srv, 5).await;
    assert_eq!(moved, total - 1, "all but the newest record are archived");
    let dir = srv.state.settings.data_dir.clone();
    let in_table: i64 =
        srv.state.store.read(|c| Ok(c.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))?)).unwrap();
    assert_eq!(in_table, 1);
    let archive = dir.join(ARCHIVE_DIR);
    let check = srv.state.store.verify_audit(&archive).await.unwrap();
    assert_eq!((check.records, check.archived, check.first_broken), (total, total - 1, None), "{check:?}");
    // The server goes on writing: the chain goes on from the record it kept.
    let put = srv.request(Method::PUT, "/v1/files/after.txt", Some(&alice), "y").await;
    assert_eq!(put.status, StatusCode::OK);
    let keep = srv.stop_keeping_data().await;
    let dir = keep.path();

    let (ok, report) = verify(dir);
    assert!(ok, "{report}");
    assert_eq!(report["records"], total + 1);
    assert_eq!(report["archived"], total - 1);

    // One record of the second segment altered: the break is named.
    let files = segments(dir);
    assert_eq!(files.len(), usize::try_from((total - 1).div_ceil(5)).unwrap(), "{files:?}");
    let victim = &files[1];
    let original = gunzip(victim);
    let mut lines: Vec<Value> = original.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let altered_seq = lines[2]["seq"].as_i64().unwrap();
    lines[2]["outcome"] = Value::from("nothing happened here");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    gzip(victim, &text);
    let (ok, report) = verify(dir);
    assert!(!ok, "a tampered segment verified: {report}");
    assert_eq!(report["first_broken"], altered_seq, "{report}");
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert_eq!(report["segment"], name, "{report}");
    assert!(report["reason"].as_str().unwrap().contains("hash"), "{report}");

    // A segment removed: the first record after the gap is named.
    gzip(victim, &original);
    std::fs::rename(victim, dir.join("removed.jsonl.gz.bak")).unwrap();
    let (ok, report) = verify(dir);
    assert!(!ok, "{report}");
    assert!(report["reason"].as_str().unwrap().contains("is missing"), "{report}");
    std::fs::rename(dir.join("removed.jsonl.gz.bak"), victim).unwrap();
    // A segment cut short (its end line gone) is a break too.
    let cut: String = original.lines().take(3).map(|l| format!("{l}\n")).collect();
    gzip(victim, &cut);
    let (ok, report) = verify(dir);
    assert!(!ok && report["reason"].as_str().unwrap().contains("cut short"), "{report}");
    gzip(victim, &original);
    assert!(verify(dir).0);

    // A backup carries the segments; its restore verifies as one chain.
    let backup = tempfile::tempdir().unwrap();
    let file = backup.path().join("b.tar.gz");
    let out = cli(&["backup", "--data-dir", dir.to_str().unwrap(), "--to", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["backup", "verify", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = backup.path().join("restored");
    let out = cli(&["restore", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(segments(&restored).len(), segments(dir).len());
    let (ok, report) = verify(&restored);
    assert!(ok, "{report}");
    assert_eq!(report["records"], total + 1);
}

/// What a crash, an appended gzip member and a planted symlink do: a
/// segment written but whose records were not yet deleted still verifies
/// (and the next run finishes the move); text appended to a segment, or a
/// symlink dressed as a segment, is a break, and a backup refuses the link.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_move_heals_and_appended_or_linked_segments_are_refused() {
    let srv = TestServer::start_with(Policy::default(), |s| s.retention.days = 0).await;
    let alice = srv.add_user("alice", "standard", false).await;
    for i in 0..8 {
        let put = srv.request(Method::PUT, &format!("/v1/files/f{i}.txt"), Some(&alice), "x").await;
        assert_eq!(put.status, StatusCode::OK);
    }
    let dir = srv.state.settings.data_dir.clone();
    let archive = dir.join(ARCHIVE_DIR);
    // A crash after the segment's rename, before its records' delete.
    let records = srv.state.store.read(|c| imagentx_sandbox::audit::archivable(c, "9999-12-31T00:00:00Z", 4)).unwrap();
    assert_eq!(records.len(), 4);
    imagentx_sandbox::audit::write_segment(&archive, &records).unwrap();
    let check = srv.state.store.verify_audit(&archive).await.unwrap();
    assert_eq!(check.first_broken, None, "a segment whose records are still in the table: {check:?}");
    // The next run replaces it and deletes them.
    let moved = archive_all(&srv, 4).await;
    assert!(moved >= 4);
    let check = srv.state.store.verify_audit(&archive).await.unwrap();
    assert_eq!(check.first_broken, None, "{check:?}");
    let keep = srv.stop_keeping_data().await;
    let dir = keep.path();
    assert!(verify(dir).0);

    // Forged records appended as a second gzip member.
    let first = segments(dir)[0].clone();
    let original = std::fs::read(&first).unwrap();
    let mut appended = original.clone();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"{\"seq\": 999, \"note\": \"forged\"}\n").unwrap();
    appended.extend(gz.finish().unwrap());
    std::fs::write(&first, &appended).unwrap();
    let (ok, report) = verify(dir);
    assert!(!ok, "text appended after a segment's end verified: {report}");
    assert_eq!(report["segment"], first.file_name().unwrap().to_str().unwrap(), "{report}");
    std::fs::write(&first, &original).unwrap();
    assert!(verify(dir).0);

    // A symlink dressed as the next segment.
    let link = dir.join(ARCHIVE_DIR).join("audit-000000999990-000000999999.jsonl.gz");
    std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
    let (ok, report) = verify(dir);
    assert!(!ok, "{report}");
    let to = dir.join("b.tar.gz");
    let out = cli(&["backup", "--data-dir", dir.to_str().unwrap(), "--to", to.to_str().unwrap()]);
    assert!(!out.status.success(), "a backup followed a symlink in the audit archive");
    assert!(String::from_utf8_lossy(&out.stderr).contains("audit-archive"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&link).unwrap();
    assert!(verify(dir).0);
}
