//! The store's contract, through its public methods only: users and keys,
//! restrictions, the registry, executions and idempotency keys, code
//! sessions, and the audit chain all of them extend. Every test runs on both
//! backends: a real SQLite file, and a real PostgreSQL server (`postgres/`).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod postgres;

use std::sync::Arc;

use imagentx_sandbox::audit::{AuditEvent, Kind};
use imagentx_sandbox::policy::UserId;
use imagentx_sandbox::report::{ExecutionReport, Runtime, Status, Truncated, Usage, new_execution_id};
use imagentx_sandbox::store::rollups::{HOUR, KEEP_HOURS_S, KEEP_MINUTES_S, Key, MINUTE, Totals};
use imagentx_sandbox::store::{KeyCheck, Prune, Restriction, Store, StoreError, ToolRow, unix_now};

/// A store on one backend, and where its files are.
struct Db {
    store: Arc<Store>,
    dir: tempfile::TempDir,
    /// The PostgreSQL database's URL; `None` for SQLite.
    url: Option<String>,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("sandbox.db")).unwrap());
        Db { store, dir, url: None }
    }

    /// `None` when PostgreSQL is not here (and not required).
    async fn postgres() -> Option<Db> {
        let url = postgres::database().await?;
        let store = Arc::new(Store::connect(&url).await.unwrap());
        Some(Db { store, dir: tempfile::tempdir().unwrap(), url: Some(url) })
    }

    /// Everything the database holds, as bytes: the SQLite file and its WAL,
    /// or every row of every table as text.
    async fn at_rest(&self) -> Vec<u8> {
        let Some(url) = &self.url else {
            let mut bytes = std::fs::read(self.dir.path().join("sandbox.db")).unwrap();
            bytes.extend(std::fs::read(self.dir.path().join("sandbox.db-wal")).unwrap_or_default());
            return bytes;
        };
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let tables = client.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", &[]).await.unwrap();
        let mut bytes = Vec::new();
        for table in tables {
            let name: String = table.get(0);
            for row in client.query(&format!("SELECT t::text FROM {name} t"), &[]).await.unwrap() {
                bytes.extend(row.get::<_, String>(0).into_bytes());
            }
        }
        bytes
    }
}

/// Runs each named contract on both backends: `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = super::Db::postgres().await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

on_both_backends!(
    a_key_signs_its_user_in_until_it_is_revoked_and_only_its_hash_is_kept,
    a_suspended_user_is_refused_until_lifted_and_the_last_admin_cannot_be_suspended,
    a_name_registered_again_is_a_new_version_and_a_retired_one_is_no_longer_active,
    an_execution_is_found_by_its_owner_and_its_idempotency_key_is_taken_once,
    a_session_is_its_owners_and_one_left_open_is_ended_with_a_reason,
    writes_from_many_tasks_at_once_each_land_once_in_one_chain,
    old_executions_go_by_age_count_and_bytes_and_their_audit_records_stay,
    minutes_are_compacted_into_hours_and_nothing_is_lost,
    audit_records_archived_leave_the_database_and_the_chain_still_verifies_whole,
    a_write_refused_at_once_with_others_leaves_the_others_in,
);

fn id(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

/// The chain verifies whole and holds `records` records.
async fn chain_holds(db: &Db, records: u64) {
    let check = db.store.verify_audit(&db.dir.path().join("no-archive")).await.unwrap();
    assert_eq!(check.first_broken, None, "{check:?}");
    assert_eq!(check.records, records, "{check:?}");
}

fn report(user: &str, tool: &str) -> ExecutionReport {
    ExecutionReport {
        id: new_execution_id(),
        tool: tool.to_owned(),
        tool_sha256: None,
        user: user.to_owned(),
        tier: "free".to_owned(),
        runtime: Runtime::Wasm,
        status: Status::Ok,
        exit_code: None,
        signal: None,
        output: Some(serde_json::json!({"n": 1})),
        error: None,
        stdout: String::new(),
        stderr: String::new(),
        truncated: Truncated::default(),
        usage: Usage::default(),
        started_at: "2026-12-07T00:00:00.000000Z".to_owned(),
        finished_at: "2026-12-07T00:00:00.001000Z".to_owned(),
        session: None,
    }
}

async fn a_key_signs_its_user_in_until_it_is_revoked_and_only_its_hash_is_kept(db: Db) {
    let store = &db.store;
    let first = store.add_user(id("alice"), "free".into(), false, "test".into()).await.unwrap();
    let second = store.issue_key(id("alice"), "test".into()).await.unwrap();
    assert_ne!(first.key, second.key);
    for key in [&first.key, &second.key] {
        let KeyCheck::Active(caller) = store.authenticate(key).await.unwrap() else { panic!("{key} refused") };
        assert_eq!((caller.user.as_str(), caller.tier.as_str(), caller.admin), ("alice", "free", false));
    }
    assert!(matches!(store.authenticate("ixs_not-a-key").await.unwrap(), KeyCheck::Refused(_)));
    // The same user twice, a key for nobody: refused, nothing added.
    let again = store.add_user(id("alice"), "pro".into(), false, "test".into()).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let nobody = store.issue_key(id("nobody"), "test".into()).await;
    assert!(matches!(nobody, Err(StoreError::NotFound(_))), "{nobody:?}");

    store.set_tier(id("alice"), "pro".into(), "test".into()).await.unwrap();
    let KeyCheck::Active(caller) = store.authenticate(&first.key).await.unwrap() else { panic!("refused") };
    assert_eq!(caller.tier, "pro");
    assert_eq!(store.revoke_keys(id("alice"), "test".into()).await.unwrap(), 2);
    for key in [&first.key, &second.key] {
        assert!(matches!(store.authenticate(key).await.unwrap(), KeyCheck::Refused(_)), "{key} still signs in");
    }
    let users = store.list_users().await.unwrap();
    let alice = users.iter().find(|u| u.id == "alice").unwrap();
    assert_eq!((alice.tier.as_str(), alice.active_keys), ("pro", 0));

    // No key is stored, only what identifies it.
    let at_rest = db.at_rest().await;
    assert!(at_rest.len() > 1000, "the database read as {} bytes", at_rest.len());
    for key in [&first.key, &second.key] {
        let secret = &key.as_bytes()[12..];
        assert!(!at_rest.windows(secret.len()).any(|w| w == secret), "a key is in the database");
    }
    // user added, 2 keys issued, tier changed, keys revoked.
    chain_holds(&db, 5).await;
}

async fn a_suspended_user_is_refused_until_lifted_and_the_last_admin_cannot_be_suspended(db: Db) {
    let store = &db.store;
    let root = store.add_user(id("root"), "premium".into(), true, "test".into()).await.unwrap();
    let bob = store.add_user(id("bob"), "free".into(), false, "test".into()).await.unwrap();
    let until = unix_now() + 3600;
    let held = store.restrict(id("bob"), Restriction::Suspend, until, "probing".into(), "root".into()).await.unwrap();
    assert_eq!(held.until, until);
    let KeyCheck::Suspended(s) = store.authenticate(&bob.key).await.unwrap() else { panic!("bob not suspended") };
    assert_eq!((s.user.as_str(), s.until, s.reason.as_str()), ("bob", until, "probing"));

    let last = store.restrict(id("root"), Restriction::Suspend, until, "oops".into(), "root".into()).await;
    assert!(matches!(last, Err(StoreError::Conflict(_))), "{last:?}");
    assert!(matches!(store.authenticate(&root.key).await.unwrap(), KeyCheck::Active(_)));
    let nobody = store.restrict(id("nobody"), Restriction::Suspend, until, "x".into(), "root".into()).await;
    assert!(matches!(nobody, Err(StoreError::NotFound(_))), "{nobody:?}");

    let throttled = store.restrict(id("bob"), Restriction::Throttle(2), until, "busy".into(), "root".into()).await;
    assert_eq!(throttled.unwrap().rate, Some(2));
    let lifted = store.lift_restrictions(id("bob"), "root".into()).await.unwrap();
    assert_eq!(lifted.len(), 2, "{lifted:?}");
    assert!(matches!(store.authenticate(&bob.key).await.unwrap(), KeyCheck::Active(c) if c.throttle.is_none()));
    // 2 users, 2 keys, suspended, throttled, lifted.
    chain_holds(&db, 7).await;
}

async fn a_name_registered_again_is_a_new_version_and_a_retired_one_is_no_longer_active(db: Db) {
    let store = &db.store;
    let row = |sha: &str| ToolRow {
        name: "probe".into(),
        version: 0,
        label: None,
        sha256: sha.into(),
        kind: "sdk".into(),
        description: Some("a probe".into()),
        input_schema: Some(serde_json::json!({"type": "object"})),
        registered_by: "root".into(),
        registered_at: String::new(),
        retired_at: None,
    };
    let one = store.register_tool(row(&"a".repeat(64))).await.unwrap();
    let two = store.register_tool(row(&"b".repeat(64))).await.unwrap();
    assert_eq!((one.version, two.version), (1, 2));
    assert!(!two.registered_at.is_empty());
    let active: Vec<(String, u32)> =
        store.active_tools().await.unwrap().into_iter().map(|t| (t.name, t.version)).collect();
    assert_eq!(active, [("probe".to_owned(), 1), ("probe".to_owned(), 2)]);
    assert_eq!(store.active_tools().await.unwrap()[1].input_schema, Some(serde_json::json!({"type": "object"})));

    assert_eq!(store.retire_tool("probe".into(), Some(1), "root".into()).await.unwrap(), [1]);
    let active: Vec<u32> = store.active_tools().await.unwrap().into_iter().map(|t| t.version).collect();
    assert_eq!(active, [2]);
    let unknown = store.retire_tool("nothing".into(), None, "root".into()).await;
    assert!(matches!(unknown, Err(StoreError::NotFound(_))), "{unknown:?}");
    // Registered twice, retired once.
    chain_holds(&db, 3).await;
}

async fn an_execution_is_found_by_its_owner_and_its_idempotency_key_is_taken_once(db: Db) {
    let store = &db.store;
    store.add_user(id("alice"), "free".into(), false, "test".into()).await.unwrap();
    store.add_user(id("eve"), "free".into(), false, "test".into()).await.unwrap();
    let first = report("alice", "probe");
    let json = bytes::Bytes::from(serde_json::to_vec(&first).unwrap());
    let audit =
        |r: &ExecutionReport| vec![AuditEvent::new(Kind::Execution, "ok").actor("alice").user("alice").tool(&r.tool)];
    let key = Some(("k-1".to_owned(), "request-hash".to_owned()));
    store.record_execution(&first, json.clone(), Some(1), key.clone(), audit(&first)).await.unwrap();

    let stored = store.execution(&first.id, Some("alice")).await.unwrap().unwrap();
    assert_eq!(stored.as_bytes(), &json[..]);
    assert_eq!(store.execution(&first.id, Some("eve")).await.unwrap(), None, "another user's execution was found");
    let hit = store.idempotent("alice", "k-1").await.unwrap().unwrap();
    assert_eq!((hit.request_hash.as_deref(), hit.report.as_bytes()), (Some("request-hash"), &json[..]));
    assert!(store.idempotent("eve", "k-1").await.unwrap().is_none(), "keys are per user");

    // The same key again: refused, and nothing of the second call is kept.
    let second = report("alice", "probe");
    let json2 = bytes::Bytes::from(serde_json::to_vec(&second).unwrap());
    let again = store.record_execution(&second, json2, Some(1), key, audit(&second)).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(store.execution(&second.id, None).await.unwrap(), None);

    // Pages, newest first.
    for _ in 0..4 {
        let r = report("alice", "probe");
        let j = bytes::Bytes::from(serde_json::to_vec(&r).unwrap());
        store.record_execution(&r, j, Some(1), None, audit(&r)).await.unwrap();
    }
    let page = store.executions("alice", 3, None).await.unwrap();
    assert_eq!(page.executions.len(), 3);
    let rest = store.executions("alice", 3, page.next_before).await.unwrap();
    assert_eq!(rest.executions.len(), 2);
    assert_eq!(rest.next_before, None);
    assert_eq!(rest.executions[1].id, first.id, "the oldest comes last");
    assert!(store.executions("eve", 10, None).await.unwrap().executions.is_empty());
    // 2 users, 2 keys, 5 executions recorded (the refused one left nothing).
    chain_holds(&db, 9).await;
}

async fn a_session_is_its_owners_and_one_left_open_is_ended_with_a_reason(db: Db) {
    let store = &db.store;
    let opened = |user: &str| AuditEvent::new(Kind::SessionOpened, "ok").user(user);
    store.session_opened("s-1".into(), "alice".into(), "python".into(), opened("alice")).await.unwrap();
    store.session_opened("s-2".into(), "alice".into(), "python".into(), opened("alice")).await.unwrap();
    let row = store.session("s-1", "alice").await.unwrap().unwrap();
    assert_eq!((row.tool.as_str(), row.closed_at.as_deref()), ("python", None));
    assert!(store.session("s-1", "eve").await.unwrap().is_none(), "another user's session was found");

    let closed = AuditEvent::new(Kind::SessionClosed, "ok").user("alice");
    store.session_closed("s-1".into(), "closed".into(), 3, closed).await.unwrap();
    let row = store.session("s-1", "alice").await.unwrap().unwrap();
    assert_eq!((row.reason.as_deref(), row.steps), (Some("closed"), Some(3)));
    assert!(row.closed_at.is_some());

    assert_eq!(store.end_open_sessions("restart").await.unwrap(), 1);
    let row = store.session("s-2", "alice").await.unwrap().unwrap();
    assert_eq!(row.reason.as_deref(), Some("restart"));
    assert_eq!(store.end_open_sessions("restart").await.unwrap(), 0);
    // Opened twice, closed once (ending at a restart writes no record).
    chain_holds(&db, 3).await;
}

async fn writes_from_many_tasks_at_once_each_land_once_in_one_chain(db: Db) {
    let store = &db.store;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = Arc::clone(store);
        tasks.spawn(async move {
            let event = AuditEvent::new(Kind::Alert, "ok").tool(format!("t{i}"));
            store.audit(vec![event]).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    chain_holds(&db, 200).await;
    let page = store
        .audit_records(&imagentx_sandbox::audit::Query { limit: 500, ..imagentx_sandbox::audit::Query::default() })
        .await
        .unwrap();
    let mut tools: Vec<String> = page.into_iter().filter_map(|r| r.tool).collect();
    tools.sort();
    tools.dedup();
    assert_eq!(tools.len(), 200, "a write was lost or doubled");
}

async fn old_executions_go_by_age_count_and_bytes_and_their_audit_records_stay(db: Db) {
    let store = &db.store;
    store.add_user(id("alice"), "free".into(), false, "test".into()).await.unwrap();
    let mut sizes = Vec::new();
    for day in 1..=9 {
        let mut r = report("alice", "probe");
        r.started_at = format!("2026-12-0{day}T00:00:00.000000Z");
        let json = bytes::Bytes::from(serde_json::to_vec(&r).unwrap());
        sizes.push(json.len() as u64);
        let events = vec![AuditEvent::new(Kind::Execution, "ok").user("alice").tool("probe")];
        store.record_execution(&r, json, Some(1), None, events).await.unwrap();
    }
    assert_eq!(store.report_bytes().await.unwrap(), sizes.iter().sum::<u64>());
    let prune = |cutoff: Option<&str>, max: Option<u64>, max_bytes: Option<u64>| Prune {
        cutoff: cutoff.map(str::to_owned),
        max,
        max_bytes,
        batch: 100,
    };
    let kept = || async { store.executions("alice", 100, None).await.unwrap().executions.len() };
    // Started before the 3rd: days 1 and 2 go.
    assert_eq!(store.prune_executions(prune(Some("2026-12-03"), None, None)).await.unwrap(), 2);
    assert_eq!(kept().await, 7);
    // The newest 5 stay.
    assert_eq!(store.prune_executions(prune(None, Some(5), None)).await.unwrap(), 2);
    assert_eq!(kept().await, 5);
    // What the newest 3 take: the oldest 2 more go, no more than that.
    let three: u64 = sizes[6..].iter().sum();
    assert_eq!(store.prune_executions(prune(None, None, Some(three))).await.unwrap(), 2);
    assert_eq!(kept().await, 3);
    assert_eq!(store.report_bytes().await.unwrap(), three);
    let page = store.executions("alice", 100, None).await.unwrap();
    let newest: Vec<&str> = page.executions.iter().map(|e| e.started_at.as_str()).collect();
    assert_eq!(newest, ["2026-12-09T00:00:00.000000Z", "2026-12-08T00:00:00.000000Z", "2026-12-07T00:00:00.000000Z"]);
    // Nothing matches: nothing goes.
    assert_eq!(store.prune_executions(prune(Some("2026-12-01"), Some(10), None)).await.unwrap(), 0);
    // The user and key, and all 9 executions' records: pruning keeps the trail whole.
    chain_holds(&db, 11).await;
}

async fn minutes_are_compacted_into_hours_and_nothing_is_lost(db: Db) {
    let store = &db.store;
    let day = 86_400 * 20_000;
    let key = |minute: i64, status: &str| Key {
        bucket: day + minute * MINUTE,
        user: "alice".into(),
        tool: "t".into(),
        tier: "free".into(),
        status: status.into(),
    };
    let mut rows = std::collections::HashMap::new();
    for minute in 0..120 {
        let mut totals = Totals { calls: 2, limit_hits: 1, cpu_ms_sum: 3.0, ..Default::default() };
        totals.cpu.add(3000.0);
        rows.insert(key(minute, "ok"), totals);
    }
    store.add_rollups(rows.clone()).await.unwrap();
    // Added again: summed, not replaced.
    store.add_rollups(rows).await.unwrap();
    assert_eq!(store.rollups_since(day + 119 * MINUTE).await.unwrap()[0].totals.calls, 4);
    let now = day + 2 * HOUR + KEEP_MINUTES_S;
    let mut compacted = 0;
    loop {
        let n = store.compact_rollups(now, 50).await.unwrap();
        if n == 0 {
            break;
        }
        compacted += n;
    }
    assert_eq!(compacted, 120);
    let all = store.rollups_since(0).await.unwrap();
    assert_eq!(all.len(), 2, "two hours");
    assert!(all.iter().all(|r| r.span == HOUR));
    let calls: u64 = all.iter().map(|r| r.totals.calls).sum();
    assert_eq!(calls, 480);
    assert_eq!(all[0].totals.cpu.count(), 120);
    assert!((all.iter().map(|r| r.totals.cpu_ms_sum).sum::<f64>() - 720.0).abs() < 1e-9);
    // A month later the hours are gone too.
    store.compact_rollups(now + KEEP_HOURS_S + HOUR, 50).await.unwrap();
    assert!(store.rollups_since(0).await.unwrap().is_empty());
}

async fn audit_records_archived_leave_the_database_and_the_chain_still_verifies_whole(db: Db) {
    let store = &db.store;
    let archive = db.dir.path().join("audit-archive");
    for i in 0..10 {
        store.audit(vec![AuditEvent::new(Kind::Alert, "ok").tool(format!("t{i}"))]).await.unwrap();
    }
    let mut moved = 0;
    loop {
        let n = store.archive_audit(archive.clone(), "9999-12-31T00:00:00Z".into(), 4).await.unwrap();
        if n == 0 {
            break;
        }
        moved += n;
    }
    // All but the newest, which the next record chains to.
    assert_eq!(moved, 9);
    let segments = || {
        let mut found: Vec<_> = std::fs::read_dir(&archive)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
            .collect();
        found.sort();
        found
    };
    assert_eq!(segments().len(), 3, "segments of at most 4 records");
    let everything = imagentx_sandbox::audit::Query { limit: 100, ..imagentx_sandbox::audit::Query::default() };
    let left = store.audit_records(&everything).await.unwrap();
    assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), [10]);
    store.audit(vec![AuditEvent::new(Kind::Alert, "ok").tool("after")]).await.unwrap();
    let check = store.verify_audit(&archive).await.unwrap();
    assert_eq!((check.first_broken, check.records), (None, 11), "{check:?}");
    // A segment gone from the archive breaks the chain there.
    std::fs::remove_file(&segments()[1]).unwrap();
    let check = store.verify_audit(&archive).await.unwrap();
    assert!(check.first_broken.is_some(), "a missing segment went unnoticed: {check:?}");
}

async fn a_write_refused_at_once_with_others_leaves_the_others_in(db: Db) {
    let store = &db.store;
    store.add_user(id("alice"), "free".into(), false, "test".into()).await.unwrap();
    // 50 at once (they share commits): every 5th reuses one idempotency key.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = Arc::clone(store);
        tasks.spawn(async move {
            let r = report("alice", "probe");
            let json = bytes::Bytes::from(serde_json::to_vec(&r).unwrap());
            let key = (i % 5 == 0).then(|| ("same".to_owned(), "h".to_owned()));
            let events = vec![AuditEvent::new(Kind::Execution, "ok").user("alice").tool("probe")];
            store.record_execution(&r, json, Some(1), key, events).await
        });
    }
    let (mut stored, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            Ok(()) => stored += 1,
            Err(StoreError::Conflict(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((stored, refused), (41, 9));
    assert_eq!(store.executions("alice", 100, None).await.unwrap().executions.len(), 41);
    // The user and key, and one record per execution stored.
    chain_holds(&db, 43).await;
}

/// Several nodes on one PostgreSQL: each a store of its own on the same
/// database, as `serve` processes on different hosts would be.
mod nodes {
    use super::*;
    use imagentx_sandbox::store::{Beat, Held};
    use std::time::Duration;

    /// The lease the tests' nodes hold their rows for, unless a test shortens it.
    const LEASE: Duration = Duration::from_secs(10);

    async fn nodes(n: usize) -> Option<(String, Vec<Arc<Store>>)> {
        let url = postgres::database().await?;
        // Started at once, as a deployment's replicas are: the schema is made once.
        let opened = futures::future::join_all((0..n).map(|_| Store::connect(&url))).await;
        Some((url, opened.into_iter().map(|s| Arc::new(s.unwrap())).collect()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_from_three_nodes_at_once_land_once_each_in_one_chain() {
        let Some((_, nodes)) = nodes(3).await else { return };
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300 {
            let node = Arc::clone(&nodes[i % 3]);
            tasks
                .spawn(async move { node.audit(vec![AuditEvent::new(Kind::Alert, "ok").tool(format!("t{i}"))]).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        for node in &nodes {
            // Every node verifies the same whole chain.
            let check = node.verify_audit(&dir.path().join("no-archive")).await.unwrap();
            assert_eq!((check.first_broken, check.records), (None, 300), "{check:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_racing_on_one_idempotency_key_store_one_execution() {
        let Some((_, nodes)) = nodes(2).await else { return };
        nodes[0].add_user(id("alice"), "free".into(), false, "test".into()).await.unwrap();
        for round in 0..20 {
            let key = format!("k-{round}");
            let racers = nodes.iter().map(|node| {
                let (node, key) = (Arc::clone(node), key.clone());
                async move {
                    let r = report("alice", "probe");
                    let json = bytes::Bytes::from(serde_json::to_vec(&r).unwrap());
                    let events = vec![AuditEvent::new(Kind::Execution, "ok").user("alice").tool("probe")];
                    node.record_execution(&r, json, Some(1), Some((key, "h".into())), events).await
                }
            });
            let results = futures::future::join_all(racers).await;
            let stored = results.iter().filter(|r| r.is_ok()).count();
            let refused = results.iter().filter(|r| matches!(r, Err(StoreError::Conflict(_)))).count();
            assert_eq!((stored, refused), (1, 1), "round {round}: {results:?}");
            // Either node replays the one that was stored.
            for node in &nodes {
                assert!(node.idempotent("alice", &key).await.unwrap().is_some());
            }
        }
        let page = nodes[1].executions("alice", 100, None).await.unwrap();
        assert_eq!(page.executions.len(), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_a_newer_build_migrated_is_refused_and_left_as_it_was() {
        let Some((url, nodes)) = nodes(1).await else { return };
        nodes[0].add_user(id("alice"), "free".into(), false, "test".into()).await.unwrap();
        nodes[0].close();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let version =
            || async { client.query_one("SELECT version FROM schema_version", &[]).await.unwrap().get::<_, i64>(0) };
        let newer = version().await + 1;
        client.execute("UPDATE schema_version SET version = $1", &[&newer]).await.unwrap();
        let Err(e) = Store::connect(&url).await else { panic!("a newer schema was opened") };
        assert!(matches!(e, StoreError::NewerSchema { found, .. } if found == newer), "{e:?}");
        assert!(e.to_string().contains("written by a newer imagentx-sandbox"), "{e}");
        assert_eq!(version().await, newer);
        let users: i64 = client.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get(0);
        assert_eq!(users, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_users_calls_at_once_are_capped_across_nodes_and_places_come_back() {
        let Some((_, nodes)) = nodes(3).await else { return };
        let lives: Vec<_> = nodes.iter().map(|n| n.live().unwrap()).collect();
        for (i, live) in lives.iter().enumerate() {
            live.heartbeat(&format!("n{i}"), "test", Held::default, LEASE).await.unwrap();
        }
        // 30 calls of alice at once, spread over three nodes, with a cap of 3.
        let tries = (0..30).map(|i| {
            let live = lives[i % 3].clone();
            async move { (i, live.take_place(&format!("n{}#{i}", i % 3), "alice", &format!("n{}", i % 3), 3).await) }
        });
        let results = futures::future::join_all(tries).await;
        let taken: Vec<usize> = results.iter().filter(|(_, r)| matches!(r, Ok(Ok(())))).map(|(i, _)| *i).collect();
        assert_eq!(taken.len(), 3, "{results:?}");
        assert!(results.iter().all(|(_, r)| matches!(r, Ok(Ok(()) | Err(3)))), "{results:?}");
        assert_eq!(lives[1].running("alice").await.unwrap(), 3);
        // Another user's calls are not alice's.
        assert_eq!(lives[2].take_place("n2#bob", "bob", "n2", 3).await.unwrap(), Ok(()));
        // One place given back (on any node) makes room for one more, on another node.
        lives[0].give_place(&format!("n{}#{}", taken[0] % 3, taken[0])).await.unwrap();
        lives[0].give_place(&format!("n{}#{}", taken[0] % 3, taken[0])).await.unwrap(); // given twice: once
        assert_eq!(lives[1].running("alice").await.unwrap(), 2);
        assert_eq!(lives[1].take_place("n1#again", "alice", "n1", 3).await.unwrap(), Ok(()));
        assert_eq!(lives[2].take_place("n2#more", "alice", "n2", 3).await.unwrap(), Err(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_nodes_places_come_back_after_its_lease_and_a_node_that_returns_writes_its_own_back() {
        let Some((url, nodes)) = nodes(2).await else { return };
        let (a, b) = (nodes[0].live().unwrap(), nodes[1].live().unwrap());
        let (beat_a, beat_b) = (
            a.heartbeat("a", "10.0.0.1:8080", Held::default, LEASE).await.unwrap(),
            b.heartbeat("b", "10.0.0.2:8080", Held::default, LEASE).await.unwrap(),
        );
        assert!(beat_a.rejoined && beat_b.rejoined, "a node's first heartbeat makes its row");
        for call in ["a#1", "a#2"] {
            assert_eq!(a.take_place(call, "alice", "a", 2).await.unwrap(), Ok(()));
        }
        assert_eq!(b.take_place("b#1", "alice", "b", 2).await.unwrap(), Err(2));
        let held: Vec<(String, String)> =
            ["a#1", "a#2"].iter().map(|c| ((*c).to_owned(), "alice".to_owned())).collect();
        let keep: Vec<String> = held.iter().map(|(c, _)| c.clone()).collect();
        let holding = |n: usize| {
            let (held, keep) = (held[..n].to_vec(), keep[..n].to_vec());
            move || Held { held, keep }
        };
        // Within the lease, nothing of a's is touched.
        let beat = b.heartbeat("b", "10.0.0.2:8080", Held::default, LEASE).await.unwrap();
        assert_eq!(beat, Beat { nodes: 2, rejoined: false, reaped_nodes: vec![], reaped_places: 0 });
        // a goes silent past a (short) lease: b gives its places back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let beat = b.heartbeat("b", "10.0.0.2:8080", Held::default, Duration::from_millis(200)).await.unwrap();
        assert_eq!(beat, Beat { nodes: 1, rejoined: false, reaped_nodes: vec!["a".to_owned()], reaped_places: 2 });
        assert_eq!(b.nodes().await.unwrap(), vec![("b".to_owned(), "10.0.0.2:8080".to_owned())]);
        assert_eq!(b.running("alice").await.unwrap(), 0);
        assert_eq!(b.take_place("b#1", "alice", "b", 2).await.unwrap(), Ok(()));
        // a was only cut off: it comes back still running its two calls and
        // writes them back (alice is over her cap until they end).
        let beat = a.heartbeat("a", "10.0.0.1:8080", holding(2), LEASE).await.unwrap();
        assert_eq!((beat.nodes, beat.rejoined), (2, true));
        assert_eq!(a.running("alice").await.unwrap(), 3);
        assert_eq!(a.take_place("a#3", "alice", "a", 2).await.unwrap(), Err(3));
        // A node's row there, what it holds is not written again.
        assert!(!a.heartbeat("a", "10.0.0.1:8080", holding(2), LEASE).await.unwrap().rejoined);
        assert_eq!(a.running("alice").await.unwrap(), 3);
        // A crash of the database empties the live tables: each node's next
        // heartbeat writes back what it holds.
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute("TRUNCATE nodes, places, user_load, rate_buckets").await.unwrap();
        assert_eq!(a.running("alice").await.unwrap(), 0);
        assert!(a.heartbeat("a", "10.0.0.1:8080", holding(2), LEASE).await.unwrap().rejoined);
        assert_eq!(a.running("alice").await.unwrap(), 2);
        // A call that ended while its release could not reach the database:
        // the node no longer holds it, and its heartbeat removes its place.
        a.heartbeat("a", "10.0.0.1:8080", holding(1), LEASE).await.unwrap();
        assert_eq!(a.running("alice").await.unwrap(), 1);
        // A call admitted while the heartbeat reads what the node holds is
        // not in what it read, and keeps its place.
        let other = nodes[1].live().unwrap();
        let admit_meanwhile = || {
            let taken = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(other.take_place("a#4", "alice", "a", 5))
            });
            assert_eq!(taken.unwrap(), Ok(()));
            Held { held: held[..1].to_vec(), keep: keep[..1].to_vec() }
        };
        a.heartbeat("a", "10.0.0.1:8080", admit_meanwhile, LEASE).await.unwrap();
        assert_eq!(a.running("alice").await.unwrap(), 2);
        // A node that stops gives back what it still holds.
        a.leave("a", LEASE).await.unwrap();
        assert_eq!(a.running("alice").await.unwrap(), 0);
        let places: i64 = client.query_one("SELECT count(*) FROM places", &[]).await.unwrap().get(0);
        assert_eq!(places, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_users_requests_per_second_are_one_bucket_across_nodes() {
        let Some((_, nodes)) = nodes(2).await else { return };
        let lives: Vec<_> = nodes.iter().map(|n| n.live().unwrap()).collect();
        // A rate of 1 per second, bursts of 2: of 20 requests at once on two
        // nodes, 2 pass (each node alone would pass 2).
        let started = std::time::Instant::now();
        let tries = (0..20).map(|i| {
            let live = lives[i % 2].clone();
            async move { live.take_token("alice", 1.0, 2.0).await.unwrap() }
        });
        let results = futures::future::join_all(tries).await;
        assert!(started.elapsed() < Duration::from_secs(1), "too slow to count the burst alone");
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "{results:?}");
        let waits: Vec<f64> = results.iter().filter_map(|r| r.err()).collect();
        assert!(waits.iter().all(|w| *w > 0.0 && *w <= 1.0), "{waits:?}");
        assert_eq!(lives[0].take_token("bob", 1.0, 2.0).await.unwrap(), Ok(()));
        // The bucket refills by the database's clock.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(lives[1].take_token("alice", 1.0, 2.0).await.unwrap(), Ok(()));
    }
}
