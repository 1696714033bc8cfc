//! Operations at scale (issue 16's measures): a data directory of 1,000
//! users, 100,000 executions (each with its audit record) and 1 GB of
//! users' files, made through the store's own API; then the start-time
//! `PRAGMA quick_check` on its database, a backup of it (`backup::create`),
//! `backup verify`, and a restore into an empty directory followed by
//! `audit verify` — what "recovery < 5 minutes" asks of us. Users' files are
//! plain directories (no volumes) of incompressible bytes: the archive's
//! worst case.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use super::{Harness, Suite};
use crate::audit::{AuditEvent, Kind};
use crate::policy::UserId;
use crate::report::{ExecutionReport, Runtime, Status, Truncated, Usage};
use crate::store::Store;

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let (users, executions, bytes) =
        h.size.pick((1_000usize, 100_000usize, 1u64 << 30), (100, 10_000, 100 << 20), (10, 1_000, 10 << 20));
    let root = tempfile::tempdir_in(h.scratch.path())?;
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("users"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let t = Instant::now();
    runtime.block_on(fill_database(&data, users, executions, 1))?;
    let made_db = t.elapsed();
    let t = Instant::now();
    write_files(&data, users, bytes)?;
    let made_files = t.elapsed();
    let db_bytes = std::fs::metadata(data.join("sandbox.db"))?.len();
    let label = format!("{users} users, {executions} executions, {} MB of files", bytes >> 20);
    h.figure(Suite::Ops, format!("making the data dir ({label}): database"), made_db.as_secs_f64(), "s", "");
    h.figure(Suite::Ops, "making the data dir: users' files", made_files.as_secs_f64(), "s", "");
    h.figure(Suite::Ops, "database size", db_bytes as f64 / 1e6, "MB", "");

    let t = Instant::now();
    let conn = rusqlite::Connection::open(data.join("sandbox.db"))?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    anyhow::ensure!(check == "ok", "quick_check: {check}");
    drop(conn);
    h.figure(Suite::Ops, "PRAGMA quick_check (what `serve` runs at start)", t.elapsed().as_secs_f64() * 1e3, "ms", "");

    let file = root.path().join("backup.tar.gz");
    let t = Instant::now();
    let manifest = crate::backup::create(&data, None, &file)?;
    h.figure(Suite::Ops, "backup (database snapshot, files, manifest)", t.elapsed().as_secs_f64(), "s", "");
    h.figure(Suite::Ops, "backup size", std::fs::metadata(&file)?.len() as f64 / 1e6, "MB", "");
    anyhow::ensure!(manifest.users == users as u64, "the backup has {} users", manifest.users);

    let t = Instant::now();
    crate::backup::verify(&file)?;
    h.figure(Suite::Ops, "backup verify", t.elapsed().as_secs_f64(), "s", "");

    let restored = root.path().join("restored");
    let t = Instant::now();
    crate::backup::restore(&file, &restored, false)?;
    let restore = t.elapsed();
    let t = Instant::now();
    let store = Store::open(&restored.join("sandbox.db"))?;
    let archive = restored.join(crate::audit::ARCHIVE_DIR);
    let verification = runtime.block_on(store.verify_audit(&archive))?;
    anyhow::ensure!(verification.first_broken.is_none(), "the restored audit chain breaks: {verification:?}");
    let verify = t.elapsed();
    h.figure(Suite::Ops, "restore into an empty directory", restore.as_secs_f64(), "s", "");
    h.figure(Suite::Ops, "audit verify of the restored chain", verify.as_secs_f64(), "s", "");
    h.figure(
        Suite::Ops,
        "recovery: restore + audit verify, beside the specification's 300 s",
        (restore + verify).as_secs_f64(),
        "s",
        "",
    );
    drop(runtime);
    super::ops_load::run(h, &data)?;
    super::stores::run(h)?;
    super::nodes::run(h)
}

/// Users (each with a key) and executions, each execution with its audit
/// record, through the store's writer as `serve` writes them: `in_flight`
/// at once (1: a commit each; more share commits, as concurrent calls do).
pub(super) async fn fill_database(
    data: &Path,
    users: usize,
    executions: usize,
    in_flight: usize,
) -> anyhow::Result<()> {
    let store = std::sync::Arc::new(Store::open(&data.join("sandbox.db"))?);
    let names: std::sync::Arc<[String]> = (0..users).map(|i| format!("u{i:04}")).collect();
    for name in names.iter() {
        store.add_user(UserId::new(name)?, "standard".into(), false, "bench".into()).await?;
    }
    // `in_flight` writers, each taking every `in_flight`-th execution.
    let writers = in_flight.clamp(1, executions.max(1));
    let mut set = tokio::task::JoinSet::new();
    for first in 0..writers {
        let (store, names) = (store.clone(), names.clone());
        set.spawn(async move {
            for i in (first..executions).step_by(writers) {
                let user = &names[i % names.len()];
                let (report, json) = execution(user)?;
                let event =
                    AuditEvent::new(Kind::Execution, "ok").actor(user.as_str()).user(user.as_str()).tool("python");
                store.record_execution(&report, json.into(), Some(1), None, vec![event]).await?;
            }
            anyhow::Ok(())
        });
    }
    set.join_all().await.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    store.close();
    Ok(())
}

/// A small `ok` execution of `user`'s, and its JSON.
pub(super) fn execution(user: &str) -> anyhow::Result<(ExecutionReport, Vec<u8>)> {
    let output = serde_json::json!({"stdout": "", "result": {"region": "north", "mean": 8.5, "rows": 20000}});
    let report = ExecutionReport {
        id: crate::report::new_execution_id(),
        tool: "python".into(),
        tool_sha256: Some("0".repeat(64)),
        user: user.to_owned(),
        tier: "standard".into(),
        runtime: Runtime::Wasm,
        status: Status::Ok,
        exit_code: Some(0),
        signal: None,
        output: Some(output),
        error: None,
        stdout: String::new(),
        stderr: String::new(),
        truncated: Truncated { stdout: false, stderr: false, output: false },
        usage: Usage {
            wall_ms: 2.1,
            cpu_ms: Some(1.9),
            fuel_consumed: Some(1_200_000),
            peak_memory_bytes: Some(19 << 20),
            peak_processes: Some(1),
            bytes_written: Some(0),
            limits_hit: Vec::new(),
        },
        started_at: crate::report::rfc3339(std::time::SystemTime::now()),
        finished_at: crate::report::rfc3339(std::time::SystemTime::now()),
        session: None,
    };
    let json = serde_json::to_vec(&report)?;
    Ok((report, json))
}

/// `bytes` of incompressible files spread over the users' directories, a
/// file of at most 1 MiB each.
fn write_files(data: &Path, users: usize, bytes: u64) -> anyhow::Result<()> {
    let per_user = bytes / users as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..users {
        let dir = data.join("users").join(format!("u{i:04}"));
        std::fs::create_dir_all(&dir)?;
        let mut left = per_user;
        let mut n = 0;
        while left > 0 {
            let len = usize::try_from(left.min(1 << 20))?;
            for word in chunk[..len].chunks_mut(8) {
                // xorshift64: fast, and gzip cannot shrink it.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
            }
            std::fs::File::create(dir.join(format!("part{n}.bin")))?.write_all(&chunk[..len])?;
            left -= len as u64;
            n += 1;
        }
    }
    Ok(())
}
