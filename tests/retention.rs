//! `[retention]` on a real server and database: executions past the count
//! limit or the age limit are deleted in the background, newest kept, their
//! audit records kept (the chain still verifies), calls served meanwhile.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::time::{Duration, Instant};

use imagentx_sandbox::api::Retention;
use imagentx_sandbox::policy::Policy;
use serde_json::{Value, json};
use server::TestServer;

async fn executions(srv: &TestServer, key: &str) -> Vec<String> {
    let page = srv.get("/v1/executions?limit=500", key).await.json();
    page["executions"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn old_and_surplus_executions_are_pruned_newest_kept_audit_intact() {
    let retention = Retention { days: 30, max_executions: 5, every_ms: 50, batch: 2, ..Retention::default() };
    let srv = TestServer::start_with(Policy::default(), |s| {
        s.builtin_tools = false;
        s.retention = retention;
    })
    .await;
    srv.register("word-stats", "word-stats").await;
    let alice = srv.add_user("alice", "premium", false).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let report = srv.report("word-stats", &alice, json!({"input": {"text": format!("call {i}")}})).await;
        ids.push(report["id"].as_str().unwrap().to_owned());
    }
    // At most five remain, and they are the newest five.
    eventually("pruning to 5", async || executions(&srv, &alice).await.len() == 5).await;
    let mut kept = executions(&srv, &alice).await;
    kept.reverse();
    assert_eq!(kept, ids[7..].to_vec());
    let gone = srv.get(&format!("/v1/executions/{}", ids[0]), &alice).await;
    assert_eq!(gone.status, hyper::StatusCode::NOT_FOUND);
    // The audit trail keeps every call, and still verifies as one chain.
    let audit = srv.get("/v1/audit?kind=execution&limit=100", &srv.admin).await.json();
    assert_eq!(audit["records"].as_array().unwrap().len(), 12);
    let metrics = String::from_utf8(srv.get("/metrics", "").await.body.to_vec()).unwrap();
    assert!(metrics.contains("imagentx_executions_pruned_total 7"), "{metrics}");

    // Age: an execution that started 40 days ago goes, the limit of 30 days.
    let db = rusqlite::Connection::open(srv.dir.path().join("sandbox.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute("UPDATE executions SET started_at = '2020-01-01T00:00:00.000000Z' WHERE id = ?1", [&ids[8]]).unwrap();
    eventually("the old one pruned", async || !executions(&srv, &alice).await.contains(&ids[8])).await;
    assert_eq!(executions(&srv, &alice).await.len(), 4);
    let report: Value = srv.report("word-stats", &alice, json!({"input": {"text": "still serving"}})).await;
    assert_eq!(report["status"], "ok");
    drop(db);
    let dir = srv.stop_keeping_data().await;
    let verified = std::process::Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
        .args(["audit", "verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
}

/// Output floods cannot fill the disk through the database: with
/// `max_bytes`, the oldest executions go until the reports kept fit, and no
/// more than that; the counter the bound reads is the reports' true size.
#[tokio::test(flavor = "multi_thread")]
async fn output_floods_are_pruned_to_the_byte_bound_and_no_further() {
    let max_bytes: i64 = 1 << 20;
    let retention = Retention { max_bytes: max_bytes as u64, every_ms: 50, batch: 3, ..Retention::default() };
    let srv = TestServer::start_with(Policy::default(), |s| {
        s.builtin_tools = false;
        s.retention = retention;
    })
    .await;
    srv.register("probe", "probe").await;
    let mallory = srv.add_user("mallory", "premium", false).await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        let report = srv.report("probe", &mallory, json!({"input": {"op": "flood", "bytes": 200 << 10}})).await;
        assert_eq!(report["status"], "ok", "{report}");
        ids.push(report["id"].as_str().unwrap().to_owned());
    }
    // Text of two to four bytes a character: the bound is in bytes.
    let wide = "ü€😀".repeat(2000);
    for _ in 0..3 {
        let report = srv.report("probe", &mallory, json!({"input": {"op": "echo", "text": wide}})).await;
        assert_eq!(report["status"], "ok", "{report}");
        ids.push(report["id"].as_str().unwrap().to_owned());
    }
    let db = rusqlite::Connection::open(srv.dir.path().join("sandbox.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let sizes = |db: &rusqlite::Connection| -> (i64, i64, Vec<i64>) {
        let counted: i64 = db.query_row("SELECT bytes FROM execution_bytes", [], |r| r.get(0)).unwrap();
        let mut stmt = db.prepare("SELECT length(CAST(report AS BLOB)) FROM executions ORDER BY seq").unwrap();
        let each: Vec<i64> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        (counted, each.iter().sum(), each)
    };
    eventually("pruning to the byte bound", async || sizes(&db).1 <= max_bytes).await;
    let (counted, total, each) = sizes(&db);
    assert_eq!(counted, total, "the counter and the reports' true size differ");
    // The newest are kept, and no more were deleted than the bound needs:
    // the next older one would not have fitted.
    let kept = executions(&srv, &mallory).await;
    assert_eq!(kept.len(), each.len());
    let newest: Vec<String> = ids[ids.len() - kept.len()..].iter().rev().cloned().collect();
    assert_eq!(kept, newest);
    assert!(total + each[0] > max_bytes, "{total} + {} fits in {max_bytes}: one too many deleted", each[0]);
    let metrics = String::from_utf8(srv.get("/metrics", "").await.body.to_vec()).unwrap();
    assert!(metrics.contains(&format!("imagentx_execution_report_bytes {total}")), "{metrics}");
    assert!(metrics.contains(&format!("imagentx_executions_pruned_total {}", ids.len() - kept.len())), "{metrics}");
    // Serving goes on.
    let report = srv.report("probe", &mallory, json!({"input": {"op": "flood", "bytes": 1024}})).await;
    assert_eq!(report["status"], "ok");
    drop(db);

    // A database from before the counter (and so from before schema
    // versions, version 0): the counter is made from the rows there.
    let dir = srv.stop_keeping_data().await;
    let path = dir.path().join("sandbox.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(
        "DROP TRIGGER execution_bytes_added; DROP TRIGGER execution_bytes_removed;
         DROP TRIGGER execution_bytes_changed; DROP TABLE execution_bytes; PRAGMA user_version = 0;",
    )
    .unwrap();
    let total: i64 =
        db.query_row("SELECT sum(length(CAST(report AS BLOB))) FROM executions", [], |r| r.get(0)).unwrap();
    drop(db);
    let store = imagentx_sandbox::store::Store::open(&path).unwrap();
    assert_eq!(store.report_bytes().await.unwrap(), total as u64);
}
