//! The PostgreSQL backend (issue 19): several nodes share one database.
//!
//! The writes every call makes (an execution and its records, audit records
//! on their own) go through one writer task per node that commits them in
//! batches (a write that may be refused alone, one with an idempotency key, in
//! a savepoint of its own) under one taking of the chain's lock: as the
//! SQLite writer does, and for the same reason — one lock and one
//! WAL flush per batch instead of per call. Every other public write is one
//! transaction on a pooled connection. A write
//! that appends audit records takes the audit chain's advisory lock
//! ([`AUDIT_CHAIN_LOCK`]) as its first statement and holds it to its commit,
//! so the chain grows one write at a time across the cluster, each write
//! reading the head its predecessor committed. Those writes are also every
//! write that reads before it writes users, keys, restrictions, tools or
//! executions (a user's existence, the next tool version, the last admin, an
//! idempotency key), and under READ COMMITTED each statement after the lock
//! sees what the writes before committed: these reads need no row locks.
//! The writes that append no record (pruning, sessions ended at start,
//! rollups) lock the rows they read.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls, Row};

use super::rollups::{self, HOUR, KEEP_HOURS_S, KEEP_MINUTES_S, Key, MINUTE, Totals};
use super::users::{KEY_PREFIX, generate_key, key_hash};
use super::{
    ExecutionPage, ExecutionRow, IdempotentHit, KeyCheck, NewKey, Prune, Restricted, Restriction, SessionRow,
    StoreError, ToolRow, UserRow, unix_now, unix_rfc3339,
};
use crate::audit::{self, AuditEvent, Kind, StoredRecord};
use crate::policy::UserId;
use crate::report::{ExecutionReport, rfc3339};

/// The schema's versions, in order, as for SQLite (`super::MIGRATIONS`): each
/// script takes the database from the version before it to its own, and is
/// never edited once released. The version a database is at is the one row
/// of its `schema_version` table.
const MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("migrations/postgres/0001_schema.sql")), (2, include_str!("migrations/postgres/0002_live.sql"))];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

// Advisory lock keys. They share one namespace with anything else that uses
// the database's advisory locks: ASCII tags, unlikely to be anyone else's.
/// Held while the schema is migrated: nodes starting together migrate once.
const MIGRATION_LOCK: i64 = i64::from_be_bytes(*b"ixs:migr");
/// Held by every write that appends audit records, up to its commit.
const AUDIT_CHAIN_LOCK: i64 = i64::from_be_bytes(*b"ixs:audt");
/// Held while minute rollups are compacted: one node compacts at a time,
/// the others wait rather than contend for the same rows.
const ROLLUP_COMPACTION_LOCK: i64 = i64::from_be_bytes(*b"ixs:roll");

/// Connections kept to the database, at most.
const POOL_SIZE: usize = 16;
/// How long a call waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long what was sent to the database may go unacknowledged before the
/// connection is given up (TCP_USER_TIMEOUT).
const UNANSWERED: Duration = Duration::from_secs(5);
/// An idle connection is probed after this long, then every 2 s, 3 times.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Audit records read per round trip while the chain is verified.
const VERIFY_BATCH: i32 = 1000;

/// The audit table's columns, in the order [`stored_record`] reads them.
const AUDIT_COLUMNS: &str = r#"seq, "at", kind, actor, user_id, tool, outcome, detail, prev_hash, hash"#;
/// The tools table's columns, in the order [`tool_row`] reads them.
const TOOL_COLUMNS: &str =
    "name, version, label, sha256, kind, description, input_schema, registered_by, registered_at, retired_at";

/// The PostgreSQL backend: a pool of connections to a database that several
/// nodes may share.
pub(super) struct Postgres {
    pool: Pool,
    /// One connection for the nodes' heartbeats ([`super::Live::heartbeat`]).
    beats: Pool,
    /// The batching writer's queue.
    jobs: mpsc::UnboundedSender<Job>,
}

/// Writes committed together at most; more wait for the next commit.
const MAX_BATCH: usize = 512;

/// A write of the calls' path, batched with others.
enum Batched {
    Execution(Box<ExecutionRecord>),
    Audit(Vec<AuditEvent>),
}

/// An execution as `record_execution` stores it.
struct ExecutionRecord {
    id: String,
    user: String,
    tool: String,
    tool_version: Option<i64>,
    status: &'static str,
    started_at: String,
    report: String,
    key: Option<String>,
    request_hash: Option<String>,
    events: Vec<AuditEvent>,
}

struct Job {
    write: Batched,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

impl Postgres {
    /// Connects to the database at `url` (`postgres://user:password@host/db`,
    /// or `host=... dbname=...`) and brings its schema to [`SCHEMA_VERSION`].
    ///
    /// # Errors
    ///
    /// The URL is not valid, the database cannot be reached or migrated, or a
    /// newer build has migrated it ([`StoreError::NewerSchema`]).
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse()?;
        // A database that stops answering (a link gone, a host down) fails
        // the statements in flight within seconds rather than TCP's minutes:
        // each request that needed it answers 503 and the node is not ready.
        // The URL's own settings win.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(UNANSWERED);
        }
        config.keepalives_idle(KEEPALIVE_IDLE).keepalives_interval(Duration::from_secs(2)).keepalives_retries(3);
        let pool = |size: usize, wait: Duration| {
            let config = config.clone();
            let manager =
                Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(wait))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .build()
                .map_err(|e| StoreError::Pool(e.to_string()))
        };
        // The heartbeat's own connection: a node busy enough to hold every
        // pooled one must still say it is alive.
        let (beats, pool) = (pool(1, CONNECT_TIMEOUT)?, pool(POOL_SIZE, POOL_WAIT)?);
        let (jobs, queue) = mpsc::unbounded_channel();
        let db = Self { pool: pool.clone(), beats, jobs };
        db.migrate().await?;
        tokio::spawn(write_loop(pool, queue));
        Ok(db)
    }

    /// Closes the pool: connections in use close when they are given back,
    /// and no new one is handed out (the calls after it fail).
    pub(super) fn close(&self) {
        self.pool.close();
        self.beats.close();
    }

    /// The nodes' live state, on the same pool (and the heartbeat's own).
    pub(super) fn live(&self) -> super::Live {
        super::Live::new(self.pool.clone(), self.beats.clone())
    }

    /// Hands `write` to the batching writer and waits until it is committed.
    async fn batched(&self, write: Batched) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { write, reply }).map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Pool(e.to_string()))
    }

    /// Brings the database to [`SCHEMA_VERSION`] in one transaction under
    /// [`MIGRATION_LOCK`]; refuses one that a newer build has taken further,
    /// leaving it as it was, rather than write to a schema it does not know.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock(&tx, MIGRATION_LOCK).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)").await?;
        let at: i64 = match tx.query_opt("SELECT version FROM schema_version", &[]).await? {
            Some(row) => row.try_get(0)?,
            None => {
                tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[]).await?;
                0
            }
        };
        if at > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { found: at, known: SCHEMA_VERSION });
        }
        if at < SCHEMA_VERSION {
            for (_, script) in MIGRATIONS.iter().filter(|(to, _)| *to > at) {
                tx.batch_execute(script).await?;
            }
            tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION]).await?;
            tracing::info!(from = at, to = SCHEMA_VERSION, "database schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    /// PostgreSQL: see [`Store::ping`].
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT count(*) FROM tools").await?;
        client.query_one(&stmt, &[]).await?;
        Ok(())
    }

    /// PostgreSQL: see [`Store::audit_records`].
    pub(super) async fn audit_records(&self, q: &audit::Query) -> Result<Vec<audit::Record>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                r#"SELECT {AUDIT_COLUMNS} FROM audit
                   WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR tool = $2)
                     AND ($3::text IS NULL OR kind = $3) AND ($4::text IS NULL OR "at" >= $4)
                     AND ($5::text IS NULL OR "at" <= $5) AND ($6::bigint IS NULL OR seq < $6)
                   ORDER BY seq DESC LIMIT $7"#
            ))
            .await?;
        let rows = client
            .query(
                &stmt,
                &[&q.user, &q.tool, &q.kind.map(Kind::as_str), &q.since, &q.until, &q.before, &i64::from(q.limit)],
            )
            .await?;
        rows.iter().map(|row| Ok(audit::Record::from(stored_record(row)?))).collect()
    }

    /// PostgreSQL: see [`Store::verify_audit`].
    pub(super) async fn verify_audit(&self, archive: &Path) -> Result<audit::Verification, StoreError> {
        let dir = archive.to_owned();
        // The segments are files, read and decompressed whole: off the runtime's threads.
        let mut walk = match blocking("the audit verifier", move || audit::walk_archive(&dir)).await? {
            ControlFlow::Continue(walk) => walk,
            ControlFlow::Break(broken) => return Ok(broken),
        };
        let mut client = self.client().await?;
        // One snapshot for the whole table, read a batch at a time.
        let tx =
            client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
        let stmt = tx.prepare_cached(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq")).await?;
        let portal = tx.bind(&stmt, &[]).await?;
        loop {
            let rows = tx.query_portal(&portal, VERIFY_BATCH).await?;
            for row in &rows {
                if let Some(broken) = walk.check(&stored_record(row)?) {
                    return Ok(broken);
                }
            }
            if rows.len() < VERIFY_BATCH as usize {
                break;
            }
        }
        tx.commit().await?;
        Ok(walk.unbroken())
    }

    /// PostgreSQL: see [`Store::archive_audit`]. The chain's newest record
    /// always stays (the next append chains to it), as `audit::archivable`
    /// and `audit::delete_archived` keep it for SQLite.
    pub(super) async fn archive_audit(&self, archive: &Path, cutoff: &str, max: u32) -> Result<u64, StoreError> {
        // Taking the archive's lock may wait for a backup's copy, and writing
        // a segment compresses and syncs files: both on tokio's blocking
        // threads, where neither holds up the calls the runtime is serving.
        let dir = archive.to_owned();
        let _lock = blocking("the audit archiver", move || audit::lock_archive(&dir, true)).await??;
        let records = {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    r#"SELECT {AUDIT_COLUMNS} FROM audit
                       WHERE seq < (SELECT max(seq) FROM audit)
                         AND seq < coalesce((SELECT min(seq) FROM audit WHERE "at" >= $1), 9223372036854775807)
                       ORDER BY seq LIMIT $2"#
                ))
                .await?;
            let rows = client.query(&stmt, &[&cutoff, &i64::from(max)]).await?;
            rows.iter().map(stored_record).collect::<Result<Vec<_>, _>>()?
        };
        let (Some(first), Some(last)) = (records.first().map(|r| r.seq), records.last().map(|r| r.seq)) else {
            return Ok(0);
        };
        let dir = archive.to_owned();
        blocking("the audit archiver", move || audit::write_segment(&dir, &records)).await??;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Under the chain's lock, as SQLite deletes under its write lock: the
        // newest record is the same for the delete and the appends around it.
        lock(&tx, AUDIT_CHAIN_LOCK).await?;
        let mark = tx.prepare_cached("UPDATE audit_archived SET upto = greatest(upto, $1) WHERE id = 1").await?;
        tx.execute(&mark, &[&last]).await?;
        let delete = tx
            .prepare_cached("DELETE FROM audit WHERE seq BETWEEN $1 AND $2 AND seq < (SELECT max(seq) FROM audit)")
            .await?;
        let deleted = tx.execute(&delete, &[&first, &last]).await?;
        tx.commit().await?;
        Ok(deleted)
    }
}

// Tools' modules, shared by the nodes.
impl Postgres {
    /// PostgreSQL: see [`Store::put_blob`].
    pub(super) async fn put_blob(&self, name: String, bytes: bytes::Bytes) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("INSERT INTO blobs (name, bytes) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .await?;
        client.execute(&stmt, &[&name, &bytes.as_ref()]).await?;
        Ok(())
    }

    /// PostgreSQL: see [`Store::blob`].
    pub(super) async fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT bytes FROM blobs WHERE name = $1").await?;
        Ok(client.query_opt(&stmt, &[&name]).await?.map(|row| row.try_get::<_, Vec<u8>>(0)).transpose()?)
    }
}

// Users and keys (`super::users`).
impl Postgres {
    /// PostgreSQL: see [`Store::add_user`].
    pub(super) async fn add_user(
        &self,
        user: UserId,
        tier: String,
        admin: bool,
        actor: String,
    ) -> Result<NewKey, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        if user_exists(&w.tx, user.as_str()).await? {
            return Err(StoreError::Conflict(format!("user `{user}` already exists")));
        }
        let stmt =
            w.tx.prepare_cached("INSERT INTO users (id, tier, admin, created_at) VALUES ($1, $2, $3, $4)").await?;
        w.tx.execute(&stmt, &[&user.as_str(), &tier, &admin, &w.now]).await?;
        let key = insert_key(&w, user.as_str()).await?;
        let detail = serde_json::json!({"tier": tier, "admin": admin});
        w.audit(&AuditEvent::new(Kind::UserAdded, "ok").actor(actor.as_str()).user(user.as_str()).detail(detail))
            .await?;
        w.audit(&AuditEvent::new(Kind::KeyIssued, "ok").actor(actor.as_str()).user(user.as_str())).await?;
        w.commit().await?;
        Ok(key)
    }

    /// PostgreSQL: see [`Store::issue_key`].
    pub(super) async fn issue_key(&self, user: UserId, actor: String) -> Result<NewKey, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        if !user_exists(&w.tx, user.as_str()).await? {
            return Err(StoreError::NotFound(format!("no user `{user}`")));
        }
        let key = insert_key(&w, user.as_str()).await?;
        w.audit(&AuditEvent::new(Kind::KeyIssued, "ok").actor(actor).user(user.as_str())).await?;
        w.commit().await?;
        Ok(key)
    }

    /// PostgreSQL: see [`Store::set_tier`].
    pub(super) async fn set_tier(&self, user: UserId, tier: String, actor: String) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        let read = w.tx.prepare_cached("SELECT tier FROM users WHERE id = $1").await?;
        let old: Option<String> = w.tx.query_opt(&read, &[&user.as_str()]).await?.map(|r| r.try_get(0)).transpose()?;
        let Some(old) = old else { return Err(StoreError::NotFound(format!("no user `{user}`"))) };
        let update = w.tx.prepare_cached("UPDATE users SET tier = $1 WHERE id = $2").await?;
        w.tx.execute(&update, &[&tier, &user.as_str()]).await?;
        let detail = serde_json::json!({"from": old, "to": tier});
        w.audit(&AuditEvent::new(Kind::UserTierChanged, "ok").actor(actor).user(user.as_str()).detail(detail)).await?;
        w.commit().await
    }

    /// PostgreSQL: see [`Store::revoke_keys`].
    pub(super) async fn revoke_keys(&self, user: UserId, actor: String) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        if !user_exists(&w.tx, user.as_str()).await? {
            return Err(StoreError::NotFound(format!("no user `{user}`")));
        }
        let stmt =
            w.tx.prepare_cached("UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
                .await?;
        let revoked = w.tx.execute(&stmt, &[&w.now, &user.as_str()]).await?;
        let n = usize::try_from(revoked).unwrap_or(usize::MAX);
        let detail = serde_json::json!({"keys": n});
        w.audit(&AuditEvent::new(Kind::KeysRevoked, "ok").actor(actor).user(user.as_str()).detail(detail)).await?;
        w.commit().await?;
        Ok(n)
    }

    /// PostgreSQL: see [`Store::list_users`].
    pub(super) async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT u.id, u.tier, u.admin, u.created_at,
                        (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL),
                        (SELECT until FROM restrictions r WHERE r.user_id = u.id AND r.kind = 'suspend' AND r.until > $1),
                        (SELECT until FROM restrictions r WHERE r.user_id = u.id AND r.kind = 'throttle' AND r.until > $1)
                 FROM users u ORDER BY u.id",
            )
            .await?;
        let rows = client.query(&stmt, &[&unix_now()]).await?;
        let users = rows.iter().map(|r| {
            Ok(UserRow {
                id: r.try_get(0)?,
                tier: r.try_get(1)?,
                admin: r.try_get(2)?,
                created_at: r.try_get(3)?,
                active_keys: to_u32(r.try_get(4)?),
                suspended_until: r.try_get::<_, Option<i64>>(5)?.map(unix_rfc3339),
                throttled_until: r.try_get::<_, Option<i64>>(6)?.map(unix_rfc3339),
            })
        });
        users.collect()
    }

    /// PostgreSQL: see [`Store::authenticate`].
    pub(super) async fn authenticate(&self, key: &str) -> Result<KeyCheck, StoreError> {
        let hash = key_hash(key);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT u.id, u.tier, u.admin, k.revoked_at IS NOT NULL, s.until, s.reason, t.rate
                 FROM api_keys k JOIN users u ON u.id = k.user_id
                 LEFT JOIN restrictions s ON s.user_id = u.id AND s.kind = 'suspend' AND s.until > $2
                 LEFT JOIN restrictions t ON t.user_id = u.id AND t.kind = 'throttle' AND t.until > $2
                 WHERE k.hash = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&hash, &unix_now()]).await? else {
            return Ok(KeyCheck::Refused(None));
        };
        let id: String = row.try_get(0)?;
        let tier: String = row.try_get(1)?;
        let admin: bool = row.try_get(2)?;
        let revoked: bool = row.try_get(3)?;
        let suspended: Option<i64> = row.try_get(4)?;
        let reason: Option<String> = row.try_get(5)?;
        let throttle = row.try_get::<_, Option<i64>>(6)?.map(to_u32);
        Ok(KeyCheck::of_key(
            id,
            tier,
            admin,
            revoked,
            suspended.map(|until| (until, reason.unwrap_or_default())),
            throttle,
        ))
    }

    /// PostgreSQL: see [`Store::restrict`].
    pub(super) async fn restrict(
        &self,
        user: UserId,
        restriction: Restriction,
        until: i64,
        reason: String,
        actor: String,
    ) -> Result<Restricted, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        let read = w.tx.prepare_cached("SELECT admin FROM users WHERE id = $1").await?;
        let admin: Option<bool> = w.tx.query_opt(&read, &[&user.as_str()]).await?.map(|r| r.try_get(0)).transpose()?;
        let Some(admin) = admin else { return Err(StoreError::NotFound(format!("no user `{user}`"))) };
        let now = unix_now();
        if admin && restriction == Restriction::Suspend {
            // Another admin who can sign in: an active key, not suspended.
            let stmt =
                w.tx.prepare_cached(
                    "SELECT count(*) FROM users u WHERE u.admin AND u.id <> $1
                       AND EXISTS (SELECT 1 FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL)
                       AND NOT EXISTS
                       (SELECT 1 FROM restrictions r WHERE r.user_id = u.id AND r.kind = 'suspend' AND r.until > $2)",
                )
                .await?;
            let others: i64 = w.tx.query_one(&stmt, &[&user.as_str(), &now]).await?.try_get(0)?;
            if others == 0 {
                return Err(StoreError::Conflict(format!(
                    "`{user}` is the last admin who can sign in (an active key, not suspended): suspending them \
                     would leave nobody to lift it"
                )));
            }
        }
        let rate = match restriction {
            Restriction::Throttle(rate) => Some(rate),
            Restriction::Suspend => None,
        };
        // One that holds longer is kept (a rule's 15 minutes never shorten an
        // admin's 30 days); an expired one is replaced.
        let upsert =
            w.tx.prepare_cached(
                r#"INSERT INTO restrictions (user_id, kind, until, rate, reason, "by", "at")
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (user_id, kind) DO UPDATE SET
                     until = excluded.until, rate = excluded.rate, reason = excluded.reason, "by" = excluded."by",
                     "at" = excluded."at"
                   WHERE excluded.until >= restrictions.until"#,
            )
            .await?;
        w.tx.execute(
            &upsert,
            &[&user.as_str(), &restriction.kind(), &until, &rate.map(i64::from), &reason, &actor, &w.now],
        )
        .await?;
        let kind = match restriction {
            Restriction::Suspend => Kind::UserSuspended,
            Restriction::Throttle(_) => Kind::UserThrottled,
        };
        let read_held =
            w.tx.prepare_cached("SELECT until, reason, rate FROM restrictions WHERE user_id = $1 AND kind = $2")
                .await?;
        let row = w.tx.query_one(&read_held, &[&user.as_str(), &restriction.kind()]).await?;
        let held = Restricted {
            until: row.try_get(0)?,
            reason: row.try_get(1)?,
            rate: row.try_get::<_, Option<i64>>(2)?.map(to_u32),
            kept_longer: false,
        };
        let kept_longer = held.until > until;
        let mut detail = serde_json::json!({
            "until": unix_rfc3339(until),
            "for_s": until - now,
            "requests_per_second": rate,
            "reason": reason,
        });
        if kept_longer {
            // A longer one already held: it stays, and the record says so.
            detail["kept_longer"] = serde_json::json!({
                "until": unix_rfc3339(held.until),
                "requests_per_second": held.rate,
                "reason": held.reason,
            });
        }
        w.audit(&AuditEvent::new(kind, "ok").actor(actor).user(user.as_str()).detail(detail)).await?;
        w.commit().await?;
        Ok(Restricted { kept_longer, ..held })
    }

    /// PostgreSQL: see [`Store::lift_restrictions`].
    pub(super) async fn lift_restrictions(&self, user: UserId, actor: String) -> Result<Vec<String>, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        if !user_exists(&w.tx, user.as_str()).await? {
            return Err(StoreError::NotFound(format!("no user `{user}`")));
        }
        let read =
            w.tx.prepare_cached("SELECT kind FROM restrictions WHERE user_id = $1 AND until > $2 ORDER BY kind")
                .await?;
        let rows = w.tx.query(&read, &[&user.as_str(), &unix_now()]).await?;
        let held: Vec<String> = rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
        let delete = w.tx.prepare_cached("DELETE FROM restrictions WHERE user_id = $1").await?;
        w.tx.execute(&delete, &[&user.as_str()]).await?;
        if !held.is_empty() {
            let detail = serde_json::json!({"lifted": held});
            w.audit(&AuditEvent::new(Kind::UserUnsuspended, "ok").actor(actor).user(user.as_str()).detail(detail))
                .await?;
        }
        w.commit().await?;
        Ok(held)
    }
}

// The tool registry (`super::tools`).
impl Postgres {
    /// PostgreSQL: see [`Store::register_tool`].
    pub(super) async fn register_tool(&self, mut row: ToolRow) -> Result<ToolRow, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        let max_version = w.tx.prepare_cached("SELECT max(version) FROM tools WHERE name = $1").await?;
        let last: Option<i64> = w.tx.query_one(&max_version, &[&row.name]).await?.try_get(0)?;
        row.version = last.map_or(0, to_u32) + 1;
        row.registered_at.clone_from(&w.now);
        row.retired_at = None;
        let schema = row.input_schema.as_ref().map(serde_json::to_string).transpose()?;
        let insert =
            w.tx.prepare_cached(&format!(
                "INSERT INTO tools ({TOOL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL)"
            ))
            .await?;
        w.tx.execute(
            &insert,
            &[
                &row.name,
                &i64::from(row.version),
                &row.label,
                &row.sha256,
                &row.kind,
                &row.description,
                &schema,
                &row.registered_by,
                &row.registered_at,
            ],
        )
        .await?;
        let detail = serde_json::json!({"version": row.version, "sha256": row.sha256, "kind": row.kind});
        w.audit(
            &AuditEvent::new(Kind::ToolRegistered, "ok")
                .actor(row.registered_by.clone())
                .tool(row.name.clone())
                .detail(detail),
        )
        .await?;
        w.commit().await?;
        Ok(row)
    }

    /// PostgreSQL: see [`Store::retire_tool`]. The versions are answered in
    /// order.
    pub(super) async fn retire_tool(
        &self,
        name: String,
        version: Option<u32>,
        actor: String,
    ) -> Result<Vec<u32>, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        let stmt =
            w.tx.prepare_cached(
                "WITH retired AS (
                   UPDATE tools SET retired_at = $1 WHERE name = $2 AND ($3::bigint IS NULL OR version = $3)
                   AND retired_at IS NULL RETURNING version)
                 SELECT version FROM retired ORDER BY version",
            )
            .await?;
        let rows = w.tx.query(&stmt, &[&w.now, &name, &version.map(i64::from)]).await?;
        let versions: Vec<u32> = rows.iter().map(|r| r.try_get(0).map(to_u32)).collect::<Result<_, _>>()?;
        if versions.is_empty() {
            return Err(StoreError::NotFound(format!("no active tool `{name}`")));
        }
        let detail = serde_json::json!({"versions": versions});
        w.audit(&AuditEvent::new(Kind::ToolRetired, "ok").actor(actor).tool(name).detail(detail)).await?;
        w.commit().await?;
        Ok(versions)
    }

    /// PostgreSQL: see [`Store::active_tools`].
    pub(super) async fn active_tools(&self) -> Result<Vec<ToolRow>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {TOOL_COLUMNS} FROM tools WHERE retired_at IS NULL ORDER BY name, version"
            ))
            .await?;
        let rows = client.query(&stmt, &[]).await?;
        Ok(rows.iter().map(tool_row).collect::<Result<_, _>>()?)
    }
}

// Executions and audit records on their own (`super::executions`).
impl Postgres {
    /// PostgreSQL: see [`Store::record_execution`]. The execution is
    /// numbered `max(seq) + 1` under the chain's lock (the schema says why).
    pub(super) async fn record_execution(
        &self,
        report: &ExecutionReport,
        json: bytes::Bytes,
        tool_version: Option<u32>,
        idempotency: Option<(String, String)>,
        events: Vec<AuditEvent>,
    ) -> Result<(), StoreError> {
        let report_text = std::str::from_utf8(&json)
            .map_err(|e| StoreError::Json(<serde_json::Error as serde::de::Error>::custom(e)))?;
        let (key, request_hash) = idempotency.unzip();
        let record = ExecutionRecord {
            id: report.id.clone(),
            user: report.user.clone(),
            tool: report.tool.clone(),
            tool_version: tool_version.map(i64::from),
            status: report.status.as_str(),
            started_at: report.started_at.clone(),
            report: report_text.to_owned(),
            key,
            request_hash,
            events,
        };
        self.batched(Batched::Execution(Box::new(record))).await
    }

    /// PostgreSQL: see [`Store::prune_executions`].
    pub(super) async fn prune_executions(&self, limits: Prune) -> Result<u64, StoreError> {
        let Prune { cutoff, max, max_bytes, batch } = limits;
        let batch_rows = i64::from(batch);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The count limit by sequence number: executions are numbered in
        // order without gaps and only the oldest are ever deleted, so all but
        // the newest `max` are those at or below `newest - max`.
        let over_count: Option<i64> = match max {
            None => None,
            Some(max) => {
                let max_seq = tx.prepare_cached("SELECT max(seq) FROM executions").await?;
                let newest: Option<i64> = tx.query_one(&max_seq, &[]).await?.try_get(0)?;
                newest.map(|newest| newest - i64::try_from(max).unwrap_or(i64::MAX))
            }
        };
        // The byte limit: the oldest rows whose reports cover the excess,
        // within the batch (the total is kept by triggers).
        let over_bytes: Option<i64> = match max_bytes {
            None => None,
            Some(max_bytes) => {
                let counter = tx.prepare_cached("SELECT bytes FROM execution_bytes WHERE id = 1").await?;
                let total: i64 = tx.query_one(&counter, &[]).await?.try_get(0)?;
                let mut excess = total - i64::try_from(max_bytes).unwrap_or(i64::MAX);
                let mut last = None;
                if excess > 0 {
                    let oldest = tx
                        .prepare_cached(
                            "SELECT seq, octet_length(report)::bigint FROM executions ORDER BY seq LIMIT $1",
                        )
                        .await?;
                    let rows = tx.query(&oldest, &[&batch_rows]).await?;
                    let mut seen = 0;
                    for row in &rows {
                        if excess <= 0 {
                            break;
                        }
                        last = Some(row.try_get::<_, i64>(0)?);
                        excess -= row.try_get::<_, i64>(1)?;
                        seen += 1;
                    }
                    if excess > 0 && seen < batch {
                        // The whole table does not cover the excess: the
                        // counter is wrong (edited by hand?). Counted anew,
                        // rather than deleting every row for it.
                        let recount = tx
                            .prepare_cached(
                                "UPDATE execution_bytes
                                    SET bytes = (SELECT coalesce(sum(octet_length(report)), 0) FROM executions)
                                  WHERE id = 1",
                            )
                            .await?;
                        tx.execute(&recount, &[]).await?;
                        tracing::warn!("the stored reports' byte count was wrong; counted anew");
                        last = None;
                    }
                }
                last
            }
        };
        // Only the oldest `batch` rows are looked at (the key's order is
        // time's order): each batch is cheap whatever the table's size.
        let delete = tx
            .prepare_cached(
                "DELETE FROM executions WHERE seq IN (SELECT seq FROM executions ORDER BY seq LIMIT $3)
                   AND (($1::text IS NOT NULL AND started_at < $1) OR ($2::bigint IS NOT NULL AND seq <= $2)
                        OR ($4::bigint IS NOT NULL AND seq <= $4))",
            )
            .await?;
        let deleted = tx.execute(&delete, &[&cutoff, &over_count, &batch_rows, &over_bytes]).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// PostgreSQL: see [`Store::report_bytes`].
    pub(super) async fn report_bytes(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT bytes FROM execution_bytes WHERE id = 1").await?;
        let bytes: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    /// PostgreSQL: see [`Store::audit`].
    pub(super) async fn audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(()); // nothing to chain: the cluster's lock is not taken for it
        }
        self.batched(Batched::Audit(events)).await
    }

    /// PostgreSQL: see [`Store::execution`].
    pub(super) async fn execution(&self, id: &str, user: Option<&str>) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT report FROM executions WHERE id = $1 AND ($2::text IS NULL OR user_id = $2)")
            .await?;
        let row = client.query_opt(&stmt, &[&id, &user]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// PostgreSQL: see [`Store::idempotent`].
    pub(super) async fn idempotent(&self, user: &str, key: &str) -> Result<Option<IdempotentHit>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT request_hash, report FROM executions WHERE user_id = $1 AND idempotency_key = $2")
            .await?;
        let Some(row) = client.query_opt(&stmt, &[&user, &key]).await? else { return Ok(None) };
        Ok(Some(IdempotentHit { request_hash: row.try_get(0)?, report: row.try_get(1)? }))
    }

    /// PostgreSQL: see [`Store::executions`].
    pub(super) async fn executions(
        &self,
        user: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<ExecutionPage, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, id, tool, tool_version, status, started_at FROM executions
                 WHERE user_id = $1 AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3",
            )
            .await?;
        let rows = client.query(&stmt, &[&user, &before, &i64::from(limit)]).await?;
        let mut last_seq = None;
        let mut executions = Vec::with_capacity(rows.len());
        for r in &rows {
            last_seq = Some(r.try_get::<_, i64>(0)?);
            executions.push(ExecutionRow {
                id: r.try_get(1)?,
                tool: r.try_get(2)?,
                tool_version: r.try_get::<_, Option<i64>>(3)?.map(to_u32),
                status: r.try_get(4)?,
                started_at: r.try_get(5)?,
            });
        }
        let next_before = if executions.len() == limit as usize { last_seq } else { None };
        Ok(ExecutionPage { executions, next_before })
    }
}

// Code sessions (`super::sessions`).
impl Postgres {
    /// PostgreSQL: see [`Store::session_opened`].
    pub(super) async fn session_opened(
        &self,
        id: String,
        user: String,
        tool: String,
        event: AuditEvent,
    ) -> Result<String, StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        let stmt =
            w.tx.prepare_cached("INSERT INTO sessions (id, user_id, tool, opened_at) VALUES ($1, $2, $3, $4)").await?;
        w.tx.execute(&stmt, &[&id, &user, &tool, &w.now]).await?;
        w.audit(&event).await?;
        let now = w.now.clone();
        w.commit().await?;
        Ok(now)
    }

    /// PostgreSQL: see [`Store::session_closed`].
    pub(super) async fn session_closed(
        &self,
        id: String,
        reason: String,
        steps: u64,
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        let stmt =
            w.tx.prepare_cached(
                "UPDATE sessions SET closed_at = $2, reason = $3, steps = $4 WHERE id = $1 AND closed_at IS NULL",
            )
            .await?;
        let steps = i64::try_from(steps).unwrap_or(i64::MAX);
        // Several nodes may end one session (its node found dead): one record.
        if w.tx.execute(&stmt, &[&id, &w.now, &reason, &steps]).await? == 1 {
            w.audit(&event).await?;
        }
        w.commit().await
    }

    /// PostgreSQL: see [`Store::end_open_sessions`]. One statement, so its
    /// own transaction.
    pub(super) async fn end_open_sessions(&self, reason: &'static str) -> Result<usize, StoreError> {
        let now = rfc3339(SystemTime::now());
        let client = self.client().await?;
        let stmt =
            client.prepare_cached("UPDATE sessions SET closed_at = $1, reason = $2 WHERE closed_at IS NULL").await?;
        let ended = client.execute(&stmt, &[&now, &reason]).await?;
        Ok(usize::try_from(ended).unwrap_or(usize::MAX))
    }

    /// PostgreSQL: see [`Store::session`].
    pub(super) async fn session(&self, id: &str, user: &str) -> Result<Option<SessionRow>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT tool, opened_at, closed_at, reason, steps FROM sessions WHERE id = $1 AND user_id = $2",
            )
            .await?;
        let Some(r) = client.query_opt(&stmt, &[&id, &user]).await? else { return Ok(None) };
        Ok(Some(SessionRow {
            tool: r.try_get(0)?,
            opened_at: r.try_get(1)?,
            closed_at: r.try_get(2)?,
            reason: r.try_get(3)?,
            steps: r.try_get::<_, Option<i64>>(4)?.map(|n| u64::try_from(n).unwrap_or(0)),
        }))
    }
}

// Usage rollups (`super::rollups`).
impl Postgres {
    /// PostgreSQL: see [`Store::add_rollups`]. Rows are added in key order,
    /// the order compaction locks them in too, so that two writers never
    /// wait on each other in a cycle.
    pub(super) async fn add_rollups(&self, rows: HashMap<Key, Totals>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let rows: BTreeMap<Key, Totals> = rows.into_iter().collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for (key, totals) in &rows {
            upsert(&tx, MINUTE, key, totals).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// PostgreSQL: see [`Store::compact_rollups`].
    pub(super) async fn compact_rollups(&self, now: i64, batch: u32) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock(&tx, ROLLUP_COMPACTION_LOCK).await?;
        let before = now - KEEP_MINUTES_S;
        // The minute rows are taken out (locked, then deleted) in key order;
        // a writer adding to one meanwhile waits, then makes it anew.
        let take = tx
            .prepare_cached(
                "DELETE FROM rollups WHERE (span, bucket, user_id, tool, tier, status) IN
                   (SELECT span, bucket, user_id, tool, tier, status FROM rollups WHERE span = $1 AND bucket < $2
                     ORDER BY bucket, user_id, tool, tier, status LIMIT $3 FOR UPDATE)
                 RETURNING bucket, user_id, tool, tier, status, calls, limit_hits, bytes_written, security_events,
                           cpu_ms_sum, cpu_hist, memory_hist",
            )
            .await?;
        let minutes = tx.query(&take, &[&MINUTE, &before, &i64::from(batch)]).await?;
        let mut hours: BTreeMap<Key, Totals> = BTreeMap::new();
        for row in &minutes {
            let key = key_of(row, 0)?;
            let hour = Key { bucket: key.bucket - key.bucket.rem_euclid(HOUR), ..key };
            hours.entry(hour).or_default().merge(&totals_of(row, 5)?);
        }
        for (key, totals) in &hours {
            upsert(&tx, HOUR, key, totals).await?;
        }
        let expired = tx.prepare_cached("DELETE FROM rollups WHERE span = $1 AND bucket < $2").await?;
        tx.execute(&expired, &[&HOUR, &(now - KEEP_HOURS_S)]).await?;
        tx.commit().await?;
        Ok(minutes.len())
    }

    /// PostgreSQL: see [`Store::rollups_since`]. Oldest bucket first.
    pub(super) async fn rollups_since(&self, since: i64) -> Result<Vec<rollups::Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT span, bucket, user_id, tool, tier, status, calls, limit_hits, bytes_written,
                        security_events, cpu_ms_sum, cpu_hist, memory_hist
                 FROM rollups WHERE bucket >= $1 ORDER BY bucket",
            )
            .await?;
        let rows = client.query(&stmt, &[&since]).await?;
        rows.iter()
            .map(|r| Ok(rollups::Row { key: key_of(r, 1)?, span: r.try_get(0)?, totals: totals_of(r, 6)? }))
            .collect()
    }
}

/// A write that appends to the audit chain: one transaction that holds
/// [`AUDIT_CHAIN_LOCK`] from its first statement to its end, with the
/// write's time and the chain's head as that lock found it. Dropped without
/// [`ChainedWrite::commit`] (an error, a caller gone), it is rolled back.
struct ChainedWrite<'c> {
    tx: Transaction<'c>,
    /// The write's time (RFC 3339), every record's and row's it writes.
    now: String,
    head: audit::Head,
}

impl<'c> ChainedWrite<'c> {
    /// Begins the write on `client` and waits for the chain's lock.
    async fn begin(client: &'c mut Object) -> Result<Self, StoreError> {
        let tx = client.transaction().await?;
        lock(&tx, AUDIT_CHAIN_LOCK).await?;
        // Read once the lock is held, as SQLite reads it under its write lock.
        let now = rfc3339(SystemTime::now());
        let stmt = tx.prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").await?;
        let head = match tx.query_opt(&stmt, &[]).await? {
            Some(row) => audit::Head { seq: row.try_get(0)?, hash: row.try_get(1)? },
            // Only before the first record: archiving always leaves the
            // newest one in the table (as for SQLite's `audit::head`).
            None => audit::Head { seq: 0, hash: audit::GENESIS.to_owned() },
        };
        Ok(Self { tx, now, head })
    }

    /// Appends `event` to the audit chain, hashed as SQLite's
    /// `audit::append` hashes it.
    async fn audit(&mut self, event: &AuditEvent) -> Result<(), StoreError> {
        let seq = self.head.seq + 1;
        let detail = serde_json::to_string(&event.detail)?;
        let record = audit::RecordFields {
            seq,
            at: &self.now,
            kind: event.kind.as_str(),
            actor: event.actor.as_deref(),
            user: event.user.as_deref(),
            tool: event.tool.as_deref(),
            outcome: &event.outcome,
            detail: &detail,
        };
        let hash = record.hash(&self.head.hash);
        let stmt = self
            .tx
            .prepare_cached(&format!(
                "INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .await?;
        self.tx
            .execute(
                &stmt,
                &[
                    &seq,
                    &record.at,
                    &record.kind,
                    &record.actor,
                    &record.user,
                    &record.tool,
                    &record.outcome,
                    &record.detail,
                    &self.head.hash,
                    &hash,
                ],
            )
            .await?;
        self.head = audit::Head { seq, hash };
        Ok(())
    }

    /// Commits the write, which releases the chain's lock.
    async fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit().await?)
    }
}

/// Takes advisory lock `key` until the end of `tx`, waiting for it.
async fn lock(tx: &Transaction<'_>, key: i64) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached("SELECT pg_advisory_xact_lock($1)").await?;
    tx.execute(&stmt, &[&key]).await?;
    Ok(())
}

/// Runs blocking file work (`what`) on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| StoreError::Conflict(format!("{what} stopped: {e}")))
}

async fn user_exists(tx: &Transaction<'_>, user: &str) -> Result<bool, StoreError> {
    let stmt = tx.prepare_cached("SELECT 1 FROM users WHERE id = $1").await?;
    Ok(tx.query_opt(&stmt, &[&user]).await?.is_some())
}

/// Makes and stores a new key for `user`: only its hash and its first
/// characters are kept.
async fn insert_key(w: &ChainedWrite<'_>, user: &str) -> Result<NewKey, StoreError> {
    let key = generate_key()?;
    let stmt =
        w.tx.prepare_cached("INSERT INTO api_keys (hash, user_id, prefix, created_at) VALUES ($1, $2, $3, $4)").await?;
    w.tx.execute(&stmt, &[&key_hash(&key), &user, &&key[..KEY_PREFIX.len() + 8], &w.now]).await?;
    Ok(NewKey { user: user.to_owned(), key })
}

/// An audit record as stored, from a row that selects [`AUDIT_COLUMNS`].
fn stored_record(row: &Row) -> Result<StoredRecord, tokio_postgres::Error> {
    Ok(StoredRecord {
        seq: row.try_get(0)?,
        at: row.try_get(1)?,
        kind: row.try_get(2)?,
        actor: row.try_get(3)?,
        user: row.try_get(4)?,
        tool: row.try_get(5)?,
        outcome: row.try_get(6)?,
        detail: row.try_get(7)?,
        prev_hash: row.try_get(8)?,
        hash: row.try_get(9)?,
    })
}

/// A tool version, from a row that selects [`TOOL_COLUMNS`].
fn tool_row(row: &Row) -> Result<ToolRow, tokio_postgres::Error> {
    let schema: Option<String> = row.try_get(6)?;
    Ok(ToolRow {
        name: row.try_get(0)?,
        version: to_u32(row.try_get(1)?),
        label: row.try_get(2)?,
        sha256: row.try_get(3)?,
        kind: row.try_get(4)?,
        description: row.try_get(5)?,
        input_schema: schema.and_then(|s| serde_json::from_str(&s).ok()),
        registered_by: row.try_get(7)?,
        registered_at: row.try_get(8)?,
        retired_at: row.try_get(9)?,
    })
}

/// Adds `add` to the rollup row of `span` and `key`, made if missing. The
/// row is read locked: writers on other nodes add to it one after another.
async fn upsert(tx: &Transaction<'_>, span: i64, key: &Key, add: &Totals) -> Result<(), StoreError> {
    let read = tx
        .prepare_cached(
            "SELECT calls, limit_hits, bytes_written, security_events, cpu_ms_sum, cpu_hist, memory_hist
             FROM rollups WHERE span = $1 AND bucket = $2 AND user_id = $3 AND tool = $4 AND tier = $5 AND status = $6
             FOR UPDATE",
        )
        .await?;
    let update = tx
        .prepare_cached(
            "UPDATE rollups SET calls = $7, limit_hits = $8, bytes_written = $9, security_events = $10,
                                cpu_ms_sum = $11, cpu_hist = $12, memory_hist = $13
             WHERE span = $1 AND bucket = $2 AND user_id = $3 AND tool = $4 AND tier = $5 AND status = $6",
        )
        .await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO rollups (span, bucket, user_id, tool, tier, status, calls, limit_hits, bytes_written,
                                  security_events, cpu_ms_sum, cpu_hist, memory_hist)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    loop {
        let existing = tx.query_opt(&read, &[&span, &key.bucket, &key.user, &key.tool, &key.tier, &key.status]).await?;
        let mut totals = match &existing {
            Some(row) => totals_of(row, 0)?,
            None => Totals::default(),
        };
        totals.merge(add);
        let (calls, limit_hits) = (totals.calls as i64, totals.limit_hits as i64);
        let (bytes_written, security_events) = (totals.bytes_written as i64, totals.security_events as i64);
        let (cpu, memory) = (serde_json::to_string(&totals.cpu)?, serde_json::to_string(&totals.memory)?);
        let write = if existing.is_some() { &update } else { &insert };
        let written = tx
            .execute(
                write,
                &[
                    &span,
                    &key.bucket,
                    &key.user,
                    &key.tool,
                    &key.tier,
                    &key.status,
                    &calls,
                    &limit_hits,
                    &bytes_written,
                    &security_events,
                    &totals.cpu_ms_sum,
                    &cpu,
                    &memory,
                ],
            )
            .await?;
        if written == 1 {
            return Ok(());
        }
        // Another node made the row after it was read: read it again, locked.
    }
}

/// A rollup key, from a row that selects `bucket, user_id, tool, tier,
/// status` from column `offset` on.
fn key_of(row: &Row, offset: usize) -> Result<Key, tokio_postgres::Error> {
    Ok(Key {
        bucket: row.try_get(offset)?,
        user: row.try_get(offset + 1)?,
        tool: row.try_get(offset + 2)?,
        tier: row.try_get(offset + 3)?,
        status: row.try_get(offset + 4)?,
    })
}

/// A rollup row's totals, from a row that selects `calls, limit_hits,
/// bytes_written, security_events, cpu_ms_sum, cpu_hist, memory_hist` from
/// column `offset` on.
fn totals_of(row: &Row, offset: usize) -> Result<Totals, StoreError> {
    let cpu: String = row.try_get(offset + 5)?;
    let memory: String = row.try_get(offset + 6)?;
    Ok(Totals {
        calls: row.try_get::<_, i64>(offset)? as u64,
        limit_hits: row.try_get::<_, i64>(offset + 1)? as u64,
        bytes_written: row.try_get::<_, i64>(offset + 2)? as u64,
        security_events: row.try_get::<_, i64>(offset + 3)? as u64,
        cpu_ms_sum: row.try_get(offset + 4)?,
        cpu: serde_json::from_str(&cpu)?,
        memory: serde_json::from_str(&memory)?,
    })
}

/// A count or version stored as BIGINT, as the `u32` it was written from
/// (clamped, never wrapped).
fn to_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// The batching writer: takes what is queued (up to [`MAX_BATCH`]) and
/// commits it together, until the store is dropped.
async fn write_loop(pool: Pool, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&pool, batch).await;
    }
}

/// One transaction for the batch under the chain's lock; a write with an
/// idempotency key in a savepoint of its own, so that one refused (the key
/// taken) leaves the others in. Any other failure fails the batch, and every
/// write of it is told why.
async fn run_batch(pool: &Pool, batch: Vec<Job>) {
    let mut results = Vec::with_capacity(batch.len());
    let committed = async {
        let mut client = pool.get().await.map_err(|e| StoreError::Pool(e.to_string()))?;
        let mut w = ChainedWrite::begin(&mut client).await?;
        for job in &batch {
            // Only a write with an idempotency key can be refused while the
            // others go in (the key taken): only it pays for a savepoint.
            let guarded = matches!(&job.write, Batched::Execution(r) if r.key.is_some());
            if guarded {
                w.tx.batch_execute("SAVEPOINT job").await?;
            }
            let head = w.head.clone();
            let result = match &job.write {
                Batched::Execution(record) => insert_execution(&mut w, record).await,
                Batched::Audit(events) => append_all(&mut w, events).await,
            };
            match result {
                Ok(()) if guarded => w.tx.batch_execute("RELEASE SAVEPOINT job").await?,
                Ok(()) => {}
                Err(e) if guarded => {
                    w.tx.batch_execute("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job").await?;
                    w.head = head;
                    results.push(Err(e));
                    continue;
                }
                // The transaction is aborted: the batch fails whole (a COMMIT
                // now would roll back and answer as if it had not).
                Err(e) => return Err(e),
            }
            results.push(Ok(()));
        }
        w.commit().await
    }
    .await;
    match committed {
        Ok(()) => {
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "database commit failed");
            for job in batch {
                let _ = job.reply.send(Err(e.of_batch()));
            }
        }
    }
}

/// Stores an execution and appends its records.
async fn insert_execution(w: &mut ChainedWrite<'_>, r: &ExecutionRecord) -> Result<(), StoreError> {
    let insert =
        w.tx.prepare_cached(
            "INSERT INTO executions (seq, id, user_id, tool, tool_version, status, started_at, report,
                                     idempotency_key, request_hash)
             VALUES ((SELECT coalesce(max(seq), 0) + 1 FROM executions), $1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    let inserted =
        w.tx.execute(
            &insert,
            &[&r.id, &r.user, &r.tool, &r.tool_version, &r.status, &r.started_at, &r.report, &r.key, &r.request_hash],
        )
        .await;
    match inserted {
        // The key (or the id) is taken: its savepoint is rolled back, so
        // nothing of this call is kept.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(StoreError::Conflict("idempotency key already used".into()));
        }
        other => other?,
    };
    append_all(w, &r.events).await
}

async fn append_all(w: &mut ChainedWrite<'_>, events: &[AuditEvent]) -> Result<(), StoreError> {
    for event in events {
        w.audit(event).await?;
    }
    Ok(())
}
