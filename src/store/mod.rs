//! The service's persistent state in one SQLite file (WAL): users and API
//! keys, the tool registry, executions and the audit trail.
//!
//! Writes go through one writer thread that commits them in batches (group
//! commit): every caller waits for its own write to be committed, but a
//! thousand concurrent writers share a handful of commits. Each write runs in
//! its own savepoint, so one failing write does not take its batch-mates down.
//! Reads use a small pool of read-only connections; WAL lets them run beside
//! the writer.

mod executions;
mod live;
mod postgres;
pub mod rollups;
mod sessions;
mod tools;
mod users;

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use crate::audit::{self, AuditEvent};
use crate::policy::UserId;
use crate::report::{ExecutionReport, rfc3339};

pub use executions::{ExecutionPage, ExecutionRow, IdempotentHit, Prune};
pub use live::{Beat, Held, Home, Live, Orphan};
pub use sessions::SessionRow;
pub use tools::ToolRow;
pub use users::{Caller, KeyCheck, NewKey, Restricted, Restriction, Suspended, UserRow, unix_now, unix_rfc3339};

/// Writes committed together at most; more wait for the next commit.
const MAX_BATCH: usize = 512;
/// Read connections kept open.
const MAX_IDLE_READERS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("audit archive: {0}")]
    Archive(#[from] std::io::Error),
    /// A batch of writes could not be committed because the filesystem is full.
    #[error("database: no space left on its filesystem ({0})")]
    DiskFull(String),
    /// A batch of writes waited past the writer's patience for another
    /// process's lock.
    #[error("database: locked by another process ({0})")]
    Busy(String),
    /// The database was migrated by a newer build to a schema this one does
    /// not know.
    #[error(
        "the database's schema is at version {found}, written by a newer imagentx-sandbox; this build knows versions \
         up to {known}: run the newer build, or restore a backup made with this one"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to PostgreSQL could be had from the pool.
    #[error("database: no connection: {0}")]
    Pool(String),
    /// A batch of writes failed because the database went out of reach.
    #[error("database: out of reach ({0})")]
    Unreachable(String),
    /// A batch of writes could not be committed for another reason.
    #[error("database: the commit failed ({0})")]
    CommitFailed(String),
}

impl StoreError {
    /// The database or the archive could not grow: the filesystem is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => e.code == rusqlite::ErrorCode::DiskFull,
            StoreError::Archive(e) => e.raw_os_error() == Some(libc::ENOSPC),
            StoreError::DiskFull(_) => true,
            _ => false,
        }
    }

    /// The database server could not be reached, or went away (PostgreSQL
    /// stopping, restarting, or out of the network's reach): worth trying
    /// again shortly.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Pool(_) | StoreError::Unreachable(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_some_and(|code| {
                        let code = code.code();
                        code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
                    })
            }
            _ => false,
        }
    }

    /// Another process held the database past the writer's patience.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            }
            StoreError::Busy(_) => true,
            _ => false,
        }
    }

    /// What each write of a batch that failed as a whole is told, keeping
    /// whether the disk was full or the database locked.
    fn of_batch(&self) -> StoreError {
        let message = self.to_string();
        if self.is_disk_full() {
            StoreError::DiskFull(message)
        } else if self.is_busy() {
            StoreError::Busy(message)
        } else if self.is_unreachable() {
            StoreError::Unreachable(message)
        } else {
            StoreError::CommitFailed(message)
        }
    }
}

type Reply = oneshot::Sender<Result<Box<dyn Any + Send>, StoreError>>;
type Work = Box<dyn FnOnce(&mut Writer<'_>) -> Result<Box<dyn Any + Send>, StoreError> + Send>;

struct Job {
    work: Work,
    reply: Reply,
}

/// A write in progress, inside its own savepoint of the batch's transaction.
pub struct Writer<'c> {
    conn: &'c Connection,
    now: String,
    audit_head: audit::Head,
}

impl Writer<'_> {
    pub fn conn(&self) -> &Connection {
        self.conn
    }

    /// The batch's timestamp (RFC 3339).
    pub fn now(&self) -> &str {
        &self.now
    }

    /// Appends `event` to the audit trail, chained to the record before it.
    ///
    /// # Errors
    ///
    /// A database error; the whole write is then rolled back.
    pub fn audit(&mut self, event: &AuditEvent) -> Result<(), StoreError> {
        self.audit_head = audit::append(self.conn, &self.audit_head, &self.now, event)?;
        Ok(())
    }
}

/// The schema's versions, in order: each script takes the database from the
/// version before it to its own, in one transaction, and is never edited
/// once released (a change is a new script). The version a database is at is
/// its `PRAGMA user_version`. The first script creates only what is missing,
/// so a database made before versions were recorded (version 0) adopts it.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("migrations/0001_schema.sql"))];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Brings the database to [`SCHEMA_VERSION`]; refuses one that a newer build
/// has already taken further, rather than write to a schema it does not know.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version = |conn: &Connection| conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0));
    if version(conn)? == SCHEMA_VERSION {
        return Ok(()); // the usual case: no write lock taken
    }
    for &(to, script) in MIGRATIONS {
        // One transaction per step, the version checked under the write lock:
        // two processes opening the database at once migrate it once.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let step = (|| {
            let at = version(conn)?;
            if at > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema { found: at, known: SCHEMA_VERSION });
            }
            if at < to {
                conn.execute_batch(script)?;
                conn.pragma_update(None, "user_version", to)?;
                tracing::info!(from = at, to, "database schema migrated");
            }
            Ok(())
        })();
        match step {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The `[store]` table: which database holds the service's state.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `postgres://user:password@host:port/database`: a PostgreSQL database
    /// shared by every node. None (the default): the SQLite file
    /// `sandbox.db` in the data directory. `$IMAGENTX_STORE_URL` overrides it
    /// (so that a secret need not be in the config file).
    pub url: Option<String>,
}

/// The variable that carries the store's URL, over the config file's.
pub const STORE_URL_VAR: &str = "IMAGENTX_STORE_URL";

impl StoreSettings {
    /// Takes [`STORE_URL_VAR`] over the file's `url`, and checks the URL's scheme.
    ///
    /// # Errors
    ///
    /// A URL that is not `postgres://` or `postgresql://`.
    pub fn from_env(&mut self) -> Result<(), StoreError> {
        if let Some(url) = std::env::var(STORE_URL_VAR).ok().filter(|u| !u.is_empty()) {
            self.url = Some(url);
        }
        match &self.url {
            Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
                Err(StoreError::Conflict(format!(
                    "[store] url must start with postgres:// or postgresql:// (SQLite needs no url), not `{}`",
                    redacted(url)
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A database URL without its password, to log or show.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "<not a url>".to_owned() };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// The service's database, on one of its backends. Cheap to share behind an
/// `Arc`. Every method means the same on both; `tests/store.rs` is the
/// contract each passes.
pub struct Store {
    backend: Backend,
}

enum Backend {
    /// One file beside the data (the default).
    Sqlite(Arc<Sqlite>),
    /// A server shared by several nodes.
    Postgres(postgres::Postgres),
}

/// Calls the backend's method of the same name.
macro_rules! dispatch {
    ($self:ident.$method:ident($($arg:expr),*)) => {
        match &$self.backend {
            Backend::Sqlite(db) => db.$method($($arg),*).await,
            Backend::Postgres(db) => db.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`.
    ///
    /// # Errors
    ///
    /// The file cannot be opened, its schema created, or it is a newer build's.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self { backend: Backend::Sqlite(Arc::new(Sqlite::open(path)?)) })
    }

    /// Connects to the PostgreSQL database at `url` and brings its schema up
    /// to date.
    ///
    /// # Errors
    ///
    /// The server cannot be reached, refuses the login, or holds a newer
    /// build's schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self { backend: Backend::Postgres(postgres::Postgres::connect(url).await?) })
    }

    /// The store `settings` name: PostgreSQL at its URL, else the SQLite file
    /// in `data_dir`.
    ///
    /// # Errors
    ///
    /// As [`Store::open`] or [`Store::connect`].
    pub async fn open_configured(settings: &StoreSettings, data_dir: &Path) -> Result<Self, StoreError> {
        match &settings.url {
            Some(url) => {
                let store = Self::connect(url).await?;
                tracing::info!(url = %redacted(url), "store: PostgreSQL");
                Ok(store)
            }
            None => Self::open(&data_dir.join("sandbox.db")),
        }
    }

    /// Whether this is the SQLite file (one node) rather than a shared server.
    pub fn is_sqlite(&self) -> bool {
        matches!(self.backend, Backend::Sqlite(_))
    }

    /// The live state the nodes sharing this store keep in it (calls in
    /// flight, request buckets); `None` on SQLite, where the one node's
    /// memory is the whole truth.
    pub fn live(&self) -> Option<Live> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(db) => Some(db.live()),
        }
    }

    /// Runs `f` on a read-only connection to the SQLite file: for tests and
    /// tools that look under the methods.
    ///
    /// # Errors
    ///
    /// What `f` returned, or the connection's failure to open.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Sqlite(db) => db.read(f),
            Backend::Postgres(_) => Err(StoreError::Conflict("raw SQLite reads on a PostgreSQL store".to_owned())),
        }
    }

    /// Stops the backend after it has committed everything already submitted.
    pub fn close(&self) {
        match &self.backend {
            Backend::Sqlite(db) => db.close(),
            Backend::Postgres(db) => db.close(),
        }
    }

    /// Whether the database answers a read (the readiness probe's check).
    ///
    /// # Errors
    ///
    /// The database cannot be read.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self.ping())
    }

    /// One page of the audit trail, newest first, as `q` filters it.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn audit_records(&self, q: &audit::Query) -> Result<Vec<audit::Record>, StoreError> {
        dispatch!(self.audit_records(q))
    }

    /// Recomputes the whole audit chain: the archived segments under
    /// `archive`, then the table (the caller holds the archive's lock, so no
    /// record moves meanwhile).
    ///
    /// # Errors
    ///
    /// A database error; a break in the chain is the verification's answer.
    pub async fn verify_audit(&self, archive: &Path) -> Result<audit::Verification, StoreError> {
        dispatch!(self.verify_audit(archive))
    }

    /// Moves up to `max` audit records written before `cutoff` (RFC 3339)
    /// into one archive segment in `archive` (`crate::audit`), then deletes
    /// them from the table; answers how many moved. Holds the archive's lock
    /// from the read to the delete (a backup holds it while it copies).
    ///
    /// # Errors
    ///
    /// A database error, or the segment's write failure (then nothing is
    /// deleted).
    pub async fn archive_audit(&self, archive: PathBuf, cutoff: String, max: u32) -> Result<u64, StoreError> {
        let stopped = |e: tokio::task::JoinError| StoreError::Conflict(format!("the audit archiver stopped: {e}"));
        match &self.backend {
            Backend::Sqlite(db) => {
                // It syncs a file and holds a lock: off the runtime's threads.
                let db = Arc::clone(db);
                tokio::task::spawn_blocking(move || db.archive_audit(&archive, &cutoff, max)).await.map_err(stopped)?
            }
            Backend::Postgres(db) => db.archive_audit(&archive, &cutoff, max).await,
        }
    }

    /// Keeps a tool's module (or a native tool's spec) where every node can
    /// fetch it, under its content-addressed file name (`<sha256>.wasm`,
    /// `<sha256>.json`). SQLite: nothing to do (one node: the data
    /// directory's `blobs/` is where modules are).
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn put_blob(&self, name: String, bytes: bytes::Bytes) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(db) => db.put_blob(name, bytes).await,
        }
    }

    /// A module kept by [`Store::put_blob`]; `None` when there is none
    /// (always, on SQLite).
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(db) => db.blob(name).await,
        }
    }

    /// Adds a user with one key.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] when the user exists.
    pub async fn add_user(&self, user: UserId, tier: String, admin: bool, actor: String) -> Result<NewKey, StoreError> {
        dispatch!(self.add_user(user, tier, admin, actor))
    }

    /// Makes another key for an existing user.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn issue_key(&self, user: UserId, actor: String) -> Result<NewKey, StoreError> {
        dispatch!(self.issue_key(user, actor))
    }

    /// Moves a user to another tier.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn set_tier(&self, user: UserId, tier: String, actor: String) -> Result<(), StoreError> {
        dispatch!(self.set_tier(user, tier, actor))
    }

    /// Revokes every key of a user; answers how many were active.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn revoke_keys(&self, user: UserId, actor: String) -> Result<usize, StoreError> {
        dispatch!(self.revoke_keys(user, actor))
    }

    /// Every user, by id.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        dispatch!(self.list_users())
    }

    /// The caller a key belongs to, or `None` for an unknown or revoked key.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn authenticate(&self, key: &str) -> Result<KeyCheck, StoreError> {
        dispatch!(self.authenticate(key))
    }

    /// Puts `restriction` on `user` until `until` (Unix seconds), unless one
    /// of the same kind already holds longer (that one stays); audited.
    /// Answers what holds now.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user; [`StoreError::Conflict`]
    /// for a suspension of the last admin not suspended (nobody could lift it
    /// over the API).
    pub async fn restrict(
        &self,
        user: UserId,
        restriction: Restriction,
        until: i64,
        reason: String,
        actor: String,
    ) -> Result<Restricted, StoreError> {
        dispatch!(self.restrict(user, restriction, until, reason, actor))
    }

    /// Lifts every suspension and throttle of `user`; answers the kinds that
    /// still held (audited when there was one).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] for an unknown user.
    pub async fn lift_restrictions(&self, user: UserId, actor: String) -> Result<Vec<String>, StoreError> {
        dispatch!(self.lift_restrictions(user, actor))
    }

    /// Registers a new version of `row.name` (its `version`, timestamps and
    /// retirement are set here); answers the stored row.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn register_tool(&self, row: ToolRow) -> Result<ToolRow, StoreError> {
        dispatch!(self.register_tool(row))
    }

    /// Retires `name` (one version, or all when `version` is `None`); answers
    /// the versions retired.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when nothing active matches.
    pub async fn retire_tool(&self, name: String, version: Option<u32>, actor: String) -> Result<Vec<u32>, StoreError> {
        dispatch!(self.retire_tool(name, version, actor))
    }

    /// Every version not retired, oldest first.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn active_tools(&self) -> Result<Vec<ToolRow>, StoreError> {
        dispatch!(self.active_tools())
    }

    /// Stores a finished execution and its audit records in one commit.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] when the idempotency key was taken meanwhile.
    /// `json` is the report as answered, serialized once for both.
    pub async fn record_execution(
        &self,
        report: &ExecutionReport,
        json: bytes::Bytes,
        tool_version: Option<u32>,
        idempotency: Option<(String, String)>,
        events: Vec<AuditEvent>,
    ) -> Result<(), StoreError> {
        dispatch!(self.record_execution(report, json, tool_version, idempotency, events))
    }

    /// Deletes up to `batch` executions, oldest first, that started before
    /// `cutoff` (RFC 3339), are older than the newest `max`, or must go for
    /// the reports kept to fit in `max_bytes` (no more of them than that
    /// takes); answers how many. Their audit records stay.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn prune_executions(&self, limits: Prune) -> Result<u64, StoreError> {
        dispatch!(self.prune_executions(limits))
    }

    /// The bytes of every stored report together (what `max_bytes` bounds).
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn report_bytes(&self) -> Result<u64, StoreError> {
        dispatch!(self.report_bytes())
    }

    /// Writes audit records on their own (denials, file changes, alerts).
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        dispatch!(self.audit(events))
    }

    /// The report of execution `id` if it belongs to `user` (any user's when
    /// `user` is `None`), as stored JSON.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn execution(&self, id: &str, user: Option<&str>) -> Result<Option<String>, StoreError> {
        dispatch!(self.execution(id, user))
    }

    /// The execution `user` stored under idempotency key `key`.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn idempotent(&self, user: &str, key: &str) -> Result<Option<IdempotentHit>, StoreError> {
        dispatch!(self.idempotent(user, key))
    }

    /// `user`'s executions, newest first, `limit` at most, older than `before`.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn executions(&self, user: &str, limit: u32, before: Option<i64>) -> Result<ExecutionPage, StoreError> {
        dispatch!(self.executions(user, limit, before))
    }

    /// Records that `user` opened session `id` on `tool`, with its audit record.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn session_opened(
        &self,
        id: String,
        user: String,
        tool: String,
        event: AuditEvent,
    ) -> Result<String, StoreError> {
        dispatch!(self.session_opened(id, user, tool, event))
    }

    /// Records that session `id` ended for `reason`, with its audit record.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn session_closed(
        &self,
        id: String,
        reason: String,
        steps: u64,
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        dispatch!(self.session_closed(id, reason, steps, event))
    }

    /// Marks every session still open as ended for `reason` (at start: their
    /// instances died with the process before). Answers how many.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn end_open_sessions(&self, reason: &'static str) -> Result<usize, StoreError> {
        dispatch!(self.end_open_sessions(reason))
    }

    /// Session `id` if it is `user`'s.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn session(&self, id: &str, user: &str) -> Result<Option<SessionRow>, StoreError> {
        dispatch!(self.session(id, user))
    }

    /// Adds `rows` to the minute rollups (one commit).
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn add_rollups(&self, rows: HashMap<rollups::Key, rollups::Totals>) -> Result<(), StoreError> {
        dispatch!(self.add_rollups(rows))
    }

    /// Compacts minute rows older than [`rollups::KEEP_MINUTES_S`] before `now` into
    /// hour rows, at most `batch` minute rows per call, and deletes hour rows
    /// older than [`rollups::KEEP_HOURS_S`]; answers the minute rows compacted.
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn compact_rollups(&self, now: i64, batch: u32) -> Result<usize, StoreError> {
        dispatch!(self.compact_rollups(now, batch))
    }

    /// Every row whose bucket starts at or after `since` (minute and hour rows).
    ///
    /// # Errors
    ///
    /// A database error.
    pub async fn rollups_since(&self, since: i64) -> Result<Vec<rollups::Row>, StoreError> {
        dispatch!(self.rollups_since(since))
    }
}

/// The SQLite backend: one file, one writer thread, a few readers.
pub(crate) struct Sqlite {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path` and starts its writer.
    ///
    /// # Errors
    ///
    /// The file cannot be opened or its schema created.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        // WAL + NORMAL: a commit survives a crash of the process (kill -9) and is
        // atomic; only a power cut can lose the last commits, never corrupt.
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = std::thread::Builder::new()
            .name("imagentx-db-writer".into())
            .spawn(move || write_loop(conn, &rx))
            .map_err(|e| StoreError::Conflict(format!("starting the database writer: {e}")))?;
        Ok(Self {
            path: path.to_owned(),
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Runs `work` in the writer thread and waits until it is committed.
    ///
    /// # Errors
    ///
    /// What `work` returned, or the commit's failure.
    pub async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(move |w| work(w).map(|t| Box::new(t) as Box<dyn Any + Send>));
        self.submit(Job { work, reply })?;
        let any = answer.await.map_err(|_| StoreError::WriterGone)??;
        any.downcast::<T>().map(|t| *t).map_err(|_| StoreError::WriterGone)
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.as_ref().ok_or(StoreError::WriterGone)?.send(job).map_err(|_| StoreError::WriterGone)
    }

    /// Runs `f` on a read-only connection. Reads are short (indexed lookups or
    /// one page of a listing); callers on the async runtime may call it inline.
    ///
    /// # Errors
    ///
    /// What `f` returned, or the connection's failure to open.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(std::time::Duration::from_secs(10))?;
                conn
            }
        };
        let result = f(&conn);
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        result
    }

    /// SQLite: see [`Store::ping`].
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| Ok(conn.query_row("SELECT count(*) FROM tools", [], |r| r.get::<_, i64>(0)).map(drop)?))
    }

    /// SQLite: see [`Store::audit_records`].
    pub(super) async fn audit_records(&self, q: &audit::Query) -> Result<Vec<audit::Record>, StoreError> {
        self.read(|conn| audit::query(conn, q))
    }

    /// SQLite: see [`Store::verify_audit`].
    pub(super) async fn verify_audit(&self, archive: &Path) -> Result<audit::Verification, StoreError> {
        self.read(|conn| audit::verify_all(conn, archive))
    }

    /// Stops the writer after it has committed everything already submitted.
    pub fn close(&self) {
        drop(self.jobs.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(writer) = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(mut conn: Connection, jobs: &mpsc::Receiver<Job>) {
    let (mut writes, mut commits) = (0u64, 0u64);
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        writes += batch.len() as u64;
        commits += 1;
        run_batch(&mut conn, batch);
    }
    tracing::info!(writes, commits, "database writer stopped");
}

/// Runs a batch in one transaction, each job in a savepoint of its own.
/// When the batch fails as a whole (the lock not taken, the commit refused),
/// every job of it is told why, those not yet run included.
fn run_batch(conn: &mut Connection, batch: Vec<Job>) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut jobs = batch.into_iter();
    let committed = (|| -> Result<(), StoreError> {
        // IMMEDIATE: take the write lock now, so the audit head read below is
        // the head this batch appends to, even with a CLI writing beside us.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = rfc3339(SystemTime::now());
        let mut head = audit::head(&tx)?;
        for Job { work, reply } in jobs.by_ref() {
            // Its reply is kept before anything can fail: a failed batch answers it too.
            replies.push((reply, Err(StoreError::CommitFailed("not run".to_owned()))));
            // Savepoints by hand, through cached statements: rusqlite's
            // `Savepoint` parses its SQL anew for every write.
            tx.prepare_cached("SAVEPOINT job")?.execute([])?;
            let mut writer = Writer { conn: &tx, now: now.clone(), audit_head: head.clone() };
            let result = work(&mut writer);
            let next_head = writer.audit_head;
            let result = match result {
                Ok(value) => {
                    tx.prepare_cached("RELEASE job")?.execute([])?;
                    head = next_head;
                    Ok(value)
                }
                Err(e) => {
                    let undone = tx
                        .prepare_cached("ROLLBACK TO job")
                        .and_then(|mut s| s.execute([]))
                        .and_then(|_| tx.prepare_cached("RELEASE job").and_then(|mut s| s.execute([])));
                    if undone.is_err() {
                        // SQLite ended the whole transaction itself (a full disk
                        // does): the batch fails, and every job of it hears why.
                        return Err(e);
                    }
                    Err(e)
                }
            };
            if let Some(last) = replies.last_mut() {
                last.1 = result;
            }
        }
        tx.commit()?;
        Ok(())
    })();
    match committed {
        Ok(()) => {
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "database commit failed");
            for reply in replies.into_iter().map(|(reply, _)| reply).chain(jobs.map(|job| job.reply)) {
                let _ = reply.send(Err(e.of_batch()));
            }
        }
    }
}

/// `query_row` that answers `None` for no row.
pub(crate) fn optional<T>(r: rusqlite::Result<T>) -> Result<Option<T>, StoreError> {
    Ok(r.optional()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
mod tests {
    use super::*;

    fn version(path: &Path) -> i64 {
        Connection::open(path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_new_database_is_at_the_latest_schema_version_and_reopening_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox.db");
        Store::open(&path).unwrap().close();
        assert_eq!(version(&path), SCHEMA_VERSION);
        Store::open(&path).unwrap().close();
        assert_eq!(version(&path), SCHEMA_VERSION);
    }

    #[test]
    fn a_database_from_before_schema_versions_adopts_them_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox.db");
        {
            // What a build before versions left: the tables, version 0.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].1).unwrap();
            conn.execute("INSERT INTO users (id, tier, created_at) VALUES ('alice', 'free', 'then')", []).unwrap();
        }
        assert_eq!(version(&path), 0);
        let store = Store::open(&path).unwrap();
        assert_eq!(version(&path), SCHEMA_VERSION);
        let tier: String =
            store.read(|c| Ok(c.query_row("SELECT tier FROM users WHERE id = 'alice'", [], |r| r.get(0))?)).unwrap();
        assert_eq!(tier, "free");
    }

    #[test]
    fn a_database_a_newer_build_migrated_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox.db");
        Store::open(&path).unwrap().close();
        let newer = SCHEMA_VERSION + 1;
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE from_a_newer_build (x)").unwrap();
            conn.pragma_update(None, "user_version", newer).unwrap();
        }
        let Err(e) = Store::open(&path) else { panic!("a newer schema was opened") };
        assert!(
            matches!(e, StoreError::NewerSchema { found, known } if found == newer && known == SCHEMA_VERSION),
            "{e:?}"
        );
        assert!(e.to_string().contains("written by a newer imagentx-sandbox"), "{e}");
        assert_eq!(version(&path), newer);
    }
}
