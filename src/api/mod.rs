//! The HTTP tool-execution service (`imagentx-sandbox serve`).
//!
//! ```text
//! request ─> auth (Bearer key → Caller, rate bucket) ─> handler ─> admission (caps)
//!        ─> runner (Sandbox::run) ─> store (execution + audit, group commit) ─> report
//! ```
//!
//! Every route is declared once, in [`routes`]: the router and the OpenAPI
//! document are both built from that table, so neither can miss a route.

mod admin;
mod admission;
mod auth;
pub mod behaviour;
pub mod client;
mod cluster;
mod console;
mod error;
mod files;
mod invoke;
pub mod mcp;
pub(crate) mod metrics;
mod native;
mod openapi;
mod registry;
mod sessions;
pub(crate) mod stats;
mod tools;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{MethodRouter, delete, get, post, put};
use serde::Deserialize;

pub use admission::{Admission, AuditThrottle, Denial};
pub use error::ApiError;
pub use metrics::Metrics;
pub use openapi::{PolicyBounds, document as openapi_document};
pub use registry::{Registered, Registry};

use crate::data_dir::DataDir;
use crate::engine::{CpuGate, Engine, EngineConfig, MemoryPool};
use crate::jail::{Jail, JailConfig};
use crate::policy::Policy;
use crate::runner::Sandbox;
use crate::store::Store;
use crate::volume::{VolumeMode, VolumeSpace};

/// Settings of `serve`: the config file's `[server]` table, then the
/// command line and environment over it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A directory every node sharing a PostgreSQL store mounts (NFS, CephFS,
    /// EFS: README, "More than one machine"): users' `/data` go to
    /// `<shared_dir>/users` and the audit archive to
    /// `<shared_dir>/audit-archive`, so that any node serves any user. The
    /// data directory keeps what is the node's own (compiled tools, scratch
    /// space, fetched modules). Default: none, everything in the data directory.
    pub shared_dir: Option<PathBuf>,
    /// Where the other nodes sharing the store reach this one (`host:port`),
    /// to forward it the requests for the code sessions it holds. Default:
    /// `listen`, or `<hostname>:<port>` when it listens on every address
    /// (`0.0.0.0`). In Kubernetes: the pod's IP (README).
    pub advertise: Option<String>,
    /// Instances the engine's pool holds; also the global cap on calls in flight.
    pub max_instances: u32,
    /// Largest file accepted by `PUT /v1/files/...`.
    pub max_file_bytes: usize,
    /// How long a shutdown waits for calls in flight.
    pub shutdown_grace_ms: u64,
    /// A client must send a request's headers within this long, or its
    /// connection is closed (slowloris).
    pub header_read_timeout_ms: u64,
    /// Write tools' inputs and outputs into the audit trail too (off: they stay
    /// only in the caller's execution records).
    pub audit_payloads: bool,
    /// Where compiled tools are cached (default: `cache/` in the data
    /// directory). It runs as machine code: writable by the sandbox only.
    pub artifact_cache_dir: Option<PathBuf>,
    /// Register the built-in `python` and `javascript` tools at start.
    pub builtin_tools: bool,
    /// Where their built components are (`scripts/build-interpreters`);
    /// default: `$IMAGENTX_INTERPRETERS`, else `interpreters/` beside the
    /// executable's directory (`target/`).
    pub interpreters_dir: PathBuf,
    /// Memory that all calls in flight may hold together (WASM linear memory,
    /// native runs' memory limits); default: 80 % of the host's memory, or of
    /// the server's cgroup limit when that is lower.
    pub memory_budget_bytes: Option<u64>,
    /// Share of that budget that one user's calls may hold together (0 to
    /// 1, default 0.5), so that one tenant cannot take it all.
    pub memory_user_share: f64,
    /// Cores that WASM guests may run on at once; default: all but one
    /// (the server keeps one for its own work). Past it, turns on the CPU go
    /// round the users whose calls wait.
    pub guest_cores: Option<usize>,
    /// Code sessions open at once on the server; each holds a slot of the
    /// instance pool. Default: half of `max_instances`, so that one-shot calls
    /// always keep the other half.
    pub max_sessions: Option<u32>,
    /// Per-user ext4 volumes that cap native tools' writes into `/data`:
    /// `auto` (where the host can mount them and native tools can run),
    /// `ext4-image` (required) or `off`.
    pub data_volumes: VolumeMode,
    /// How the volumes' images hold their blocks on the host's disk:
    /// `sparse` (what users wrote; quotas may add up to more than the disk)
    /// or `reserved` (each volume's whole size, so that a full disk never
    /// fails a write within a user's quota).
    pub data_volume_space: VolumeSpace,
    /// Reverse proxies whose `X-Forwarded-For` names the client
    /// (addresses or networks, e.g. `["127.0.0.1", "10.0.0.0/8"]`); from any
    /// other peer the header is ignored. Only behaviour analysis uses the
    /// client's address.
    pub trusted_proxies: Vec<String>,
    /// The native jailer's settings: the config file's `[jail]` table.
    #[serde(skip)]
    pub jail: JailConfig,
    /// How long executions are kept: the config file's `[retention]` table.
    #[serde(skip)]
    pub retention: Retention,
    /// Scheduled backups: the config file's `[backup]` table.
    #[serde(skip)]
    pub backup: BackupSchedule,
    /// Behaviour analysis' thresholds: the config file's `[behaviour]` table.
    #[serde(skip)]
    pub behaviour: crate::behaviour::Thresholds,
    /// What each behaviour rule's detection does: the `[response]` table.
    #[serde(skip)]
    pub response: behaviour::ResponseConfig,
    /// Which database: the config file's `[store]` table.
    #[serde(skip)]
    pub store: crate::store::StoreSettings,
    /// The config file the server was started with (backups include it).
    #[serde(skip)]
    pub config_path: Option<PathBuf>,
}

/// The `[backup]` table: with a `dir`, `serve` takes a backup every
/// `every_s` (at low priority, one at a time) and keeps the newest `keep`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSchedule {
    /// Where backups go (none: no scheduled backups). Also where a damaged
    /// database's start looks for the newest one to name.
    pub dir: Option<PathBuf>,
    pub every_s: u64,
    pub keep: usize,
    /// A damaged database found at start is replaced by the newest backup
    /// in `dir` that verifies (`backup::restore_database`), and the server
    /// starts on it with an alert, instead of refusing to start.
    pub auto_restore: bool,
}

impl Default for BackupSchedule {
    fn default() -> Self {
        Self { dir: None, every_s: 6 * 3600, keep: 7, auto_restore: false }
    }
}

/// The names scheduled backups get: `imagentx-backup-<time>.tar.gz`.
pub const BACKUP_PREFIX: &str = "imagentx-backup-";

/// The scheduled backups in `dir`, oldest first.
pub fn scheduled_backups(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with(BACKUP_PREFIX) && name.ends_with(".tar.gz")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The `[retention]` table: executions older than `days`, all but the
/// newest `max_executions`, and the oldest until their reports take at most
/// `max_bytes`, are deleted in the background, `batch` rows per
/// commit (calls' writes go between batches). Audit records older than
/// `audit_days` move to archive segments of `audit_segment` records
/// (`crate::audit`): out of the database, still one verifiable chain.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Days an execution is kept (0: no age limit).
    pub days: u32,
    /// Executions kept at most (0: no count limit).
    pub max_executions: u64,
    /// Bytes of stored reports kept at most, oldest deleted first (0: no
    /// byte limit): what keeps output floods from filling the disk.
    pub max_bytes: u64,
    /// How often to look for executions to delete.
    pub every_ms: u64,
    /// Rows deleted per commit.
    pub batch: u32,
    /// Days an audit record stays in the database before it is archived
    /// (0: never archived).
    pub audit_days: u32,
    /// Records per archive segment (at most).
    pub audit_segment: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            days: 30,
            max_executions: 10_000_000,
            max_bytes: 8 << 30,
            every_ms: 60_000,
            batch: 500,
            audit_days: 30,
            audit_segment: 10_000,
        }
    }
}

impl ServerSettings {
    /// Where users' `/data` directories are: `<shared_dir>/users`, else
    /// `<data_dir>/users`.
    pub fn users_dir(&self) -> PathBuf {
        self.shared_dir.as_ref().unwrap_or(&self.data_dir).join("users")
    }

    /// Where the other nodes reach this one: [`ServerSettings::advertise`].
    pub fn advertised(&self) -> String {
        if let Some(address) = &self.advertise {
            return address.clone();
        }
        if !self.listen.ip().is_unspecified() {
            return self.listen.to_string();
        }
        let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
        format!("{host}:{}", self.listen.port())
    }

    /// Where archived audit records go: `<shared_dir>/audit-archive`, else
    /// `<data_dir>/audit-archive`.
    pub fn archive_dir(&self) -> PathBuf {
        self.shared_dir.as_ref().unwrap_or(&self.data_dir).join(crate::audit::ARCHIVE_DIR)
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./sandbox-data"),
            shared_dir: None,
            advertise: None,
            max_instances: 1000,
            max_file_bytes: 64 << 20,
            shutdown_grace_ms: 30_000,
            header_read_timeout_ms: 10_000,
            audit_payloads: false,
            artifact_cache_dir: None,
            builtin_tools: true,
            interpreters_dir: crate::interpreters::default_dir(),
            memory_budget_bytes: None,
            memory_user_share: crate::engine::DEFAULT_USER_SHARE,
            guest_cores: None,
            max_sessions: None,
            data_volumes: VolumeMode::Auto,
            data_volume_space: VolumeSpace::Sparse,
            trusted_proxies: Vec::new(),
            jail: JailConfig::default(),
            retention: Retention::default(),
            backup: BackupSchedule::default(),
            behaviour: crate::behaviour::Thresholds::default(),
            response: behaviour::ResponseConfig::default(),
            store: crate::store::StoreSettings::default(),
            config_path: None,
        }
    }
}

/// Everything a request may need.
pub struct AppState {
    pub sandbox: Sandbox,
    pub store: Store,
    pub registry: Registry,
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
    pub settings: ServerSettings,
    pub blobs: PathBuf,
    /// The native jail, or why this host cannot run native tools.
    pub jail: Result<Arc<Jail>, String>,
    /// Idempotency keys of calls still running, as `(user, key)`.
    pub(crate) running_keys: Mutex<HashSet<(String, String)>>,
    pub(crate) draining: AtomicBool,
    /// Whether the built-in tools are registered (`serve` listens before).
    builtins_ready: AtomicBool,
    /// MCP sessions over HTTP (`/mcp`).
    pub(crate) mcp: mcp::Sessions,
    /// Code sessions (`/v1/sessions`).
    pub(crate) sessions: sessions::Sessions,
    pub(crate) audit_throttle: AuditThrottle,
    /// This node among the nodes sharing a PostgreSQL store; `None` on SQLite.
    pub(crate) node: Option<Arc<cluster::Node>>,
    /// Behaviour analysis (`crate::behaviour`), fed by every call.
    pub analyzer: crate::behaviour::Analyzer,
    /// Whose `X-Forwarded-For` names the client (`[server] trusted_proxies`).
    pub(crate) proxies: client::TrustedProxies,
    /// Usage rollups not yet written (`GET /v1/stats`).
    pub(crate) rollup: stats::Rollup,
    /// The alert webhook's queue, when `[response] webhook` is set.
    pub(crate) webhook: Option<behaviour::Webhook>,
    /// `<data-dir>/serve.lock`, held while the server lives (`None` where
    /// the filesystem takes no locks).
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory: {0}")]
    DataDir(#[from] crate::data_dir::DataDirError),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Damaged(String),
    #[error("{0}")]
    Lock(#[from] crate::data_dir::LockError),
}

/// How long the start's `PRAGMA quick_check` may take before it is skipped.
const QUICK_CHECK_BUDGET: Duration = Duration::from_secs(30);

/// What `auto_restore` did at start: the alert the server raises once open
/// (the restore's marker stays until it is recorded).
struct AutoRestored {
    marker: crate::backup::RestoreMarker,
    /// Every directory where a replaced database was kept (more than one
    /// when a restored backup turned out damaged too).
    kept: Vec<PathBuf>,
}

/// What the start's check found.
enum Checked {
    Healthy,
    /// `quick_check` named damage, or SQLite called the file corrupt or not
    /// a database: what `auto_restore` may replace.
    Damaged(String),
    /// It could not be read for another reason (locked, an I/O error): the
    /// server does not start, and nothing is replaced.
    Unreadable(String),
}

/// Refuses to serve a damaged database: `PRAGMA quick_check` (time-boxed)
/// before anything opens it for writing. The error names the newest
/// scheduled backup and the restore command; with `[backup] auto_restore`,
/// the newest backup that verifies replaces the database instead. A restore
/// a crash interrupted is finished first.
fn check_database(settings: &ServerSettings) -> Result<Option<AutoRestored>, StartError> {
    let data_dir = &settings.data_dir;
    let unfinished = crate::backup::finish_restore(data_dir).map_err(|e| {
        StartError::Damaged(format!("an automatic restore was interrupted and cannot be finished: {e}"))
    })?;
    let mut restored = unfinished.map(|marker| {
        tracing::warn!(backup = %marker.backup.display(), "an automatic restore of the database was finished");
        AutoRestored { kept: vec![marker.kept.clone()], marker }
    });
    let problem = match check(settings) {
        Checked::Healthy => return Ok(restored),
        Checked::Damaged(problem) => problem,
        Checked::Unreadable(problem) => {
            return Err(StartError::Damaged(format!(
                "the database {} cannot be checked ({problem}): the server will not serve it",
                data_dir.join("sandbox.db").display()
            )));
        }
    };
    let mut tried = Vec::new();
    if let (true, Some(dir)) = (settings.backup.auto_restore, settings.backup.dir.as_deref()) {
        for backup in scheduled_backups(dir).into_iter().rev() {
            if let Err(why) = trusted(dir).and_then(|()| trusted(&backup)) {
                tracing::error!(backup = %backup.display(), why, "this backup is not restored automatically");
                tried.push(format!("{}: {why}", backup.display()));
                continue;
            }
            tracing::error!(problem = %problem, backup = %backup.display(), "the database is damaged: restoring a backup");
            match crate::backup::restore_database(&backup, data_dir, &problem) {
                Ok(marker) => {
                    let mut kept = restored.take().map(|r| r.kept).unwrap_or_default();
                    kept.push(marker.kept.clone());
                    match check(settings) {
                        Checked::Healthy => {
                            tracing::error!(
                                backup = %backup.display(),
                                made_at = %marker.backup_made_at,
                                kept = %marker.kept.display(),
                                "the database was restored from a backup: what it recorded after the backup is not in \
                                 it (users, keys, tools, revocations, suspensions, executions, audit records); users' \
                                 files are as they were; the damaged files are kept"
                            );
                            return Ok(Some(AutoRestored { marker, kept }));
                        }
                        Checked::Damaged(again) | Checked::Unreadable(again) => {
                            tried.push(format!("{}: restored, and then damaged too ({again})", backup.display()));
                            restored = Some(AutoRestored { marker, kept });
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(backup = %backup.display(), error = %e, "this backup could not be restored");
                    tried.push(format!("{}: {e}", backup.display()));
                }
            }
        }
        if tried.is_empty() {
            tried.push(format!("no backup in {}", dir.display()));
        }
    }
    let tried = if tried.is_empty() { String::new() } else { format!(" (auto_restore: {})", tried.join("; ")) };
    let newest = settings.backup.dir.as_deref().map(scheduled_backups).and_then(|mut found| found.pop());
    let advice = match newest {
        Some(backup) => format!(
            "restore the newest backup into a new directory and start on it: imagentx-sandbox restore {} --data-dir NEW_DIR",
            backup.display()
        ),
        None => {
            "restore a backup into a new directory and start on it: imagentx-sandbox restore BACKUP --data-dir NEW_DIR \
                 (no [backup] dir is configured to name one)"
                .to_owned()
        }
    };
    Err(StartError::Damaged(format!(
        "the database {} is damaged ({problem}): the server will not serve it{tried}; {advice}",
        data_dir.join("sandbox.db").display()
    )))
}

/// A backup, or the directory of backups, that `auto_restore` may take: owned
/// by the server's own user and writable by no one else (whoever can plant
/// a backup there could plant their own admin key).
fn trusted(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!("{} is owned by uid {}, not this server's ({me})", path.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by its group or others (mode {:o})", path.display(), meta.mode() & 0o777));
    }
    Ok(())
}

/// `PRAGMA quick_check` of the database, within its time budget (past it,
/// or with no database yet, it counts as healthy).
fn check(settings: &ServerSettings) -> Checked {
    let path = settings.data_dir.join("sandbox.db");
    if !path.exists() {
        return Checked::Healthy;
    }
    let started = std::time::Instant::now();
    let checked = (|| -> rusqlite::Result<String> {
        let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Past its budget, the check is interrupted from a timer thread.
        let interrupt = conn.get_interrupt_handle();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let timer = std::thread::spawn(move || {
            if matches!(finished.recv_timeout(QUICK_CHECK_BUDGET), Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
                interrupt.interrupt();
            }
        });
        let checked = (|| {
            let mut stmt = conn.prepare("PRAGMA quick_check")?;
            let problems: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            Ok(problems.into_iter().take(3).collect::<Vec<_>>().join("; "))
        })();
        drop(done);
        let _ = timer.join();
        checked
    })();
    let ms = started.elapsed().as_millis() as u64;
    match checked {
        Ok(result) if result == "ok" => {
            tracing::info!(ms, "database checked (quick_check)");
            Checked::Healthy
        }
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::OperationInterrupted => {
            tracing::warn!(ms, "the database's quick_check took too long and was skipped");
            Checked::Healthy
        }
        Ok(result) => Checked::Damaged(result),
        Err(e @ rusqlite::Error::SqliteFailure(failure, _))
            if matches!(failure.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) =>
        {
            Checked::Damaged(e.to_string())
        }
        Err(e) => Checked::Unreadable(e.to_string()),
    }
}

impl AppState {
    /// Opens the data directory, the database and the engine, and loads every
    /// registered tool (from cached artifacts when they are there); the
    /// built-in tools are registered by [`AppState::register_builtins`].
    ///
    /// # Errors
    ///
    /// [`StartError`] naming what could not be opened.
    pub async fn open_without_builtins(policy: Policy, settings: ServerSettings) -> Result<Arc<Self>, StartError> {
        let jail = Jail::new(settings.jail.clone()).map(Arc::new).map_err(|e| {
            tracing::warn!(error = %e, "native tools are disabled: the jail cannot run on this host");
            e.to_string()
        });
        // Volumes hold native tools' writes: without the jail, `auto` spares their cost.
        // A volume is one host's loop device: users' directories on a shared
        // filesystem cannot be volumes.
        let volumes = match settings.data_volumes {
            VolumeMode::Auto if jail.is_err() || settings.shared_dir.is_some() => VolumeMode::Off,
            VolumeMode::Ext4Image if settings.shared_dir.is_some() => {
                return Err(StartError::Damaged(
                    "data_volumes = \"ext4-image\" and shared_dir cannot go together: a volume is mounted on one \
                     host, users' directories on the shared filesystem are every node's; set data_volumes = \"off\""
                        .to_owned(),
                ));
            }
            mode => mode,
        };
        let lock = crate::data_dir::lock(&settings.data_dir)?;
        let mut data_dir = DataDir::open_with_volumes(&settings.data_dir, volumes, settings.data_volume_space)?;
        if settings.shared_dir.is_some() {
            data_dir = data_dir.with_users_dir(settings.users_dir())?;
        }
        let swept = data_dir.sweep_scratch();
        if swept > 0 {
            tracing::info!(directories = swept, "removed scratch directories left by an earlier run");
        }
        let blobs = settings.data_dir.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        // A shared PostgreSQL is its operator's to check and restore.
        let restored = if settings.store.url.is_none() { check_database(&settings)? } else { None };
        let store = Store::open_configured(&settings.store, &settings.data_dir).await?;
        let max_memory = policy.tiers.values().map(|t| t.memory_bytes).max().unwrap_or(1 << 30);
        let cache_dir = settings.artifact_cache_dir.clone().unwrap_or_else(|| data_dir.cache_dir());
        let mut config = EngineConfig::new(cache_dir, max_memory);
        config.max_instances = settings.max_instances;
        let proxies = client::TrustedProxies::parse(&settings.trusted_proxies)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if !(settings.memory_user_share > 0.0 && settings.memory_user_share <= 1.0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("memory_user_share must be above 0 and at most 1, not {}", settings.memory_user_share),
            )
            .into());
        }
        let budget = settings.memory_budget_bytes.unwrap_or_else(|| config.guest_memory.budget_bytes());
        config.guest_memory = MemoryPool::with_user_share(budget, settings.memory_user_share);
        let most = config.guest_memory.heavy_max_bytes();
        for (name, tier) in policy.tiers.iter().filter(|(_, tier)| tier.memory_bytes > most) {
            tracing::warn!(
                tier = %name,
                tier_memory_bytes = tier.memory_bytes,
                most_one_user_may_hold = most,
                "this tier's memory is more than one user may hold of the memory budget (memory_user_share, and \
                 90 % of memory_budget_bytes): its native runs, which reserve it whole, will always be refused \
                 (429 user_memory or server_busy), and its WASM calls stop short of their limit"
            );
        }
        if let Some(cores) = settings.guest_cores {
            config.cpu_gate = CpuGate::new(cores);
        }
        let engine = Engine::new(&config)?;
        tracing::info!(
            memory_budget_bytes = engine.guest_memory().budget_bytes(),
            memory_per_user_bytes = engine.guest_memory().user_max_bytes(),
            guest_descriptors = engine.guest_descriptors().max(),
            guest_cores = engine.guest_cores(),
            cpu_turns = "round the users with calls waiting",
            "limits across all calls"
        );
        let limits = admin::disk_limits(data_dir.volumes().is_some());
        tracing::info!(data_quota = limits.wasm_components, "disk limits of WASM components");
        if data_dir.volumes().is_some() {
            tracing::info!(data_quota = limits.native_tools, "disk limits of native tools");
        } else if jail.is_ok() {
            tracing::warn!(
                data_quota = limits.native_tools,
                "disk limits of native tools are checked before each call only: one such call can write past \
                 the user's quota"
            );
        }
        let engine_memory = &Arc::clone(engine.guest_memory());
        // On a shared store, the sessions still open may be other nodes'
        // (which node owns a session is not recorded yet: issue 19).
        let ended = if store.is_sqlite() { store.end_open_sessions("restart").await? } else { 0 };
        if ended > 0 {
            tracing::info!(sessions = ended, "code sessions of the previous run ended: they do not survive a restart");
        }
        // Sessions never take the whole pool: one-shot calls keep a slot at least.
        let max_sessions = settings.max_sessions.unwrap_or(settings.max_instances / 2);
        let max_sessions = if max_sessions >= settings.max_instances {
            let kept = settings.max_instances.saturating_sub(1);
            tracing::warn!(
                max_sessions,
                max_instances = settings.max_instances,
                kept,
                "max_sessions must be below max_instances"
            );
            kept
        } else {
            max_sessions
        };
        let node = store.live().map(|live| cluster::Node::new(live, settings.advertised()));
        if let Some(node) = &node {
            // Before a call can take a place: a place of a node not in the table is given back.
            node.beat().await?;
            tracing::info!(node = %node.id, address = %settings.advertised(), "joined the nodes sharing the store");
            let loopback = settings.advertised().parse::<SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
            if loopback {
                tracing::warn!(
                    address = %settings.advertised(),
                    "the address other nodes forward code sessions' requests to is a loopback one: only nodes on this \
                     host reach it (set [server] advertise, or --advertise, to this node's address on their network)"
                );
            }
        }
        let state = Arc::new_cyclic(|me| Self {
            node,
            analyzer: crate::behaviour::Analyzer::new(settings.behaviour.clone()),
            proxies,
            rollup: stats::Rollup::default(),
            webhook: behaviour::Webhook::start(me.clone(), &settings.response),
            _lock: lock,
            sandbox: Sandbox { policy, engine, data_dir },
            store,
            registry: Registry::default(),
            admission: Admission::new(settings.max_instances, Arc::clone(engine_memory)),
            metrics: Metrics::default(),
            blobs,
            jail,
            settings,
            running_keys: Mutex::default(),
            draining: AtomicBool::new(false),
            builtins_ready: AtomicBool::new(false),
            mcp: mcp::Sessions::default(),
            sessions: sessions::Sessions::new(max_sessions),
            audit_throttle: AuditThrottle::default(),
        });
        let failed =
            state.registry.load_all(&state.store, &state.sandbox, &state.blobs, state.jail.as_deref().ok()).await?;
        // A damaged or missing module is loud: an alert each, and 503 `tool_unavailable` to its callers.
        let mut alerts: Vec<crate::audit::AuditEvent> = failed
            .into_iter()
            .map(|(tool, version, why)| {
                state.metrics.alert("tool_unloadable");
                let detail = serde_json::json!({"rule": "tool_unloadable", "version": version, "reason": why});
                crate::audit::AuditEvent::new(crate::audit::Kind::Alert, "tool_unloadable").tool(tool).detail(detail)
            })
            .collect();
        if let Some(AutoRestored { marker, kept }) = &restored {
            state.metrics.alert("database_restored");
            let detail = serde_json::json!({
                "rule": "database_restored",
                "problem": marker.problem,
                "backup": marker.backup,
                "backup_made_at": marker.backup_made_at,
                "damaged_files_kept_in": kept,
                "lost": "what the database recorded after the backup: users, keys, tools, revocations, suspensions, \
                         executions, audit records (readable in the kept files)",
            });
            alerts.push(
                crate::audit::AuditEvent::new(crate::audit::Kind::Alert, "database_restored")
                    .actor("sandbox")
                    .detail(detail),
            );
        }
        if !alerts.is_empty() {
            state.store.audit(alerts).await?;
        }
        if restored.is_some() {
            // Recorded: the next start need not raise it again.
            crate::backup::acknowledge_restore(&state.settings.data_dir);
        }
        Ok(state)
    }

    /// [`AppState::open_without_builtins`], then the built-in tools
    /// registered: a new build compiles for seconds before this answers.
    ///
    /// # Errors
    ///
    /// [`StartError`] naming what could not be opened.
    pub async fn open(policy: Policy, settings: ServerSettings) -> Result<Arc<Self>, StartError> {
        let state = Self::open_without_builtins(policy, settings).await?;
        state.register_builtins().await;
        Ok(state)
    }

    /// Registers the built-in tools (when `builtin_tools` is on): `python`,
    /// `javascript` and `python-data` where they are built. While it runs,
    /// `/readyz` answers 503 `loading` and a call of one of them 503
    /// `tool_loading`.
    pub async fn register_builtins(&self) {
        if !self.settings.builtin_tools {
            self.builtins_ready.store(true, Ordering::Release);
            return;
        }
        let started = std::time::Instant::now();
        let dir = &self.settings.interpreters_dir;
        let jail = self.jail.as_ref().ok();
        self.registry.register_builtins(&self.store, &self.sandbox, &self.blobs, dir, jail).await;
        self.builtins_ready.store(true, Ordering::Release);
        tracing::info!(ms = started.elapsed().as_millis() as u64, "built-in tools ready");
    }

    /// Whether the built-in tools are registered (or not wanted).
    pub fn builtins_ready(&self) -> bool {
        self.builtins_ready.load(Ordering::Acquire)
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// A request or response body, for the OpenAPI document.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    Json(fn(&mut schemars::SchemaGenerator) -> schemars::Schema),
    Raw(&'static str),
}

/// A query parameter's type, for the OpenAPI document: what the handler
/// accepts, so a client or a fuzzer generated from it knows the bounds.
#[derive(Clone, Copy)]
pub enum Param {
    Text,
    /// An integer from the first bound to the second.
    Int(i64, i64),
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// An audit record kind.
    AuditKind,
    /// A user's name.
    UserName,
    /// An RFC 3339 time.
    Time,
}

/// One route: what the router serves and what the OpenAPI document says.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Query parameters: name, description and type.
    pub query: &'static [(&'static str, &'static str, Param)],
    pub request: Body,
    pub response: Body,
    pub handler: MethodRouter<Arc<AppState>>,
}

fn json<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// Every route of the service.
pub fn routes() -> Vec<Route> {
    use Access::{Admin, Public, User};
    use Param::{AuditKind, Int, OneOf, Text, Time, UserName};
    let r = |method, path, summary, access, request, response, handler| Route {
        method,
        path,
        summary,
        access,
        query: &[],
        request,
        response,
        handler,
    };
    let q = |route: Route, query| Route { query, ..route };
    vec![
        r(
            "get",
            "/healthz",
            "Liveness: the process answers.",
            Public,
            Body::None,
            Body::Json(json::<admin::Health>),
            get(admin::healthz),
        ),
        r(
            "get",
            "/readyz",
            "Readiness: the database answers and the server is not draining.",
            Public,
            Body::None,
            Body::Json(json::<admin::Health>),
            get(admin::readyz),
        ),
        r("get", "/metrics", "Prometheus metrics.", Public, Body::None, Body::Raw("text/plain"), get(admin::metrics)),
        r(
            "get",
            "/openapi.json",
            "This document.",
            Public,
            Body::None,
            Body::Raw("application/json"),
            get(openapi::serve),
        ),
        r(
            "get",
            "/v1/me",
            "The caller: user, tier, limits, data usage.",
            User,
            Body::None,
            Body::Json(json::<admin::Me>),
            get(admin::me),
        ),
        q(
            r(
                "post",
                "/v1/tools",
                "Register a WASM tool (the module as the body), or a native tool (a JSON `NativeSpec` with \
                 `Content-Type: application/json`); a name registered again gets a new version.",
                Admin,
                Body::Raw("application/wasm"),
                Body::Json(json::<tools::ToolView>),
                post(tools::register),
            ),
            &[
                ("name", "Tool name (default: from the SDK's describe).", Text),
                ("description", "Description (default: from the SDK's describe).", Text),
                ("input_schema", "JSON Schema of the input, as JSON (default: from the SDK's describe).", Text),
            ],
        ),
        q(
            r(
                "get",
                "/v1/tools",
                "List tools with their input schemas.",
                User,
                Body::None,
                Body::Json(json::<tools::ToolsAnswer>),
                get(tools::list),
            ),
            &[("format", "`openai`: the function-calling `tools` array LLM APIs take.", OneOf(&["openai"]))],
        ),
        r(
            "get",
            "/v1/tools/{name}",
            "A tool's active versions.",
            User,
            Body::None,
            Body::Json(json::<tools::ToolVersions>),
            get(tools::show),
        ),
        q(
            r(
                "delete",
                "/v1/tools/{name}",
                "Retire a tool (all versions, or one); past executions keep their records.",
                Admin,
                Body::None,
                Body::Json(json::<tools::Retired>),
                delete(tools::retire),
            ),
            &[("version", "Retire only this version.", Int(1, u32::MAX as i64))],
        ),
        r(
            "post",
            "/v1/tools/{name}/invoke",
            "Run a tool as the caller, under the caller's tier. Header `Idempotency-Key` makes a retry answer the first result.",
            User,
            Body::Json(json::<invoke::InvokeRequest>),
            Body::Json(json::<crate::report::ExecutionReport>),
            post(invoke::invoke),
        ),
        q(
            r(
                "get",
                "/v1/executions",
                "The caller's executions, newest first.",
                User,
                Body::None,
                Body::Json(json::<crate::store::ExecutionPage>),
                get(invoke::list),
            ),
            &[
                ("limit", "Page size, 1 to 500 (default 50).", Int(1, 500)),
                ("before", "`next_before` of the previous page.", Int(i64::MIN, i64::MAX)),
            ],
        ),
        r(
            "get",
            "/v1/executions/{id}",
            "One of the caller's executions.",
            User,
            Body::None,
            Body::Json(json::<crate::report::ExecutionReport>),
            get(invoke::show),
        ),
        r(
            "post",
            "/v1/sessions",
            "Open a code session: a live interpreter (`python`, `javascript`) whose variables and imports persist \
             between steps, within the tier's sessions, memory, idle timeout and lifetime.",
            User,
            Body::Json(json::<sessions::OpenRequest>),
            Body::Json(json::<sessions::SessionInfo>),
            post(sessions::open),
        ),
        r(
            "get",
            "/v1/sessions",
            "The caller's open code sessions.",
            User,
            Body::None,
            Body::Json(json::<sessions::SessionList>),
            get(sessions::list),
        ),
        r(
            "get",
            "/v1/sessions/{id}",
            "One of the caller's code sessions: state, steps, memory, idle time (or why it ended).",
            User,
            Body::None,
            Body::Json(json::<sessions::SessionInfo>),
            get(sessions::show),
        ),
        r(
            "delete",
            "/v1/sessions/{id}",
            "Close a code session (a step that runs is stopped); its memory and /tmp are freed.",
            User,
            Body::None,
            Body::Json(json::<sessions::SessionInfo>),
            delete(sessions::delete),
        ),
        r(
            "post",
            "/v1/sessions/{id}/run",
            "Run a step in a code session: the code runs in the session's live interpreter, with a call's limits; \
             answers the step's execution report. 409 while another step runs; 410 once the session has ended.",
            User,
            Body::Json(json::<sessions::StepRequest>),
            Body::Json(json::<crate::report::ExecutionReport>),
            post(sessions::run),
        ),
        r(
            "get",
            "/v1/files",
            "List the caller's data directory (their tools' /data).",
            User,
            Body::None,
            Body::Json(json::<files::Listing>),
            get(files::list_root),
        ),
        r(
            "get",
            "/v1/files/{*path}",
            "A file of the caller's data directory, or a directory's listing.",
            User,
            Body::None,
            Body::Raw("application/octet-stream"),
            get(files::get),
        ),
        r(
            "put",
            "/v1/files/{*path}",
            "Write a file atomically (parents created), within the tier's data quota.",
            User,
            Body::Raw("application/octet-stream"),
            Body::Json(json::<files::Written>),
            put(files::put),
        ),
        r(
            "delete",
            "/v1/files/{*path}",
            "Delete a file, a symlink or an empty directory.",
            User,
            Body::None,
            Body::Json(json::<files::Deleted>),
            delete(files::delete),
        ),
        q(
            r(
                "get",
                "/v1/audit",
                "The audit trail, newest first.",
                Admin,
                Body::None,
                Body::Json(json::<admin::AuditPage>),
                get(admin::audit),
            ),
            &[
                ("user", "Only records about this user.", UserName),
                ("tool", "Only records about this tool.", Text),
                ("kind", "Only records of this kind.", AuditKind),
                ("since", "RFC 3339: records at or after.", Time),
                ("until", "RFC 3339: records at or before.", Time),
                ("before", "Only records numbered below (paging).", Int(i64::MIN, i64::MAX)),
                ("limit", "Page size, 1 to 1000 (default 100).", Int(1, 1000)),
            ],
        ),
        q(
            r(
                "get",
                "/v1/alerts",
                "Recent alerts (audit records of kind `alert`).",
                Admin,
                Body::None,
                Body::Json(json::<admin::AuditPage>),
                get(admin::alerts),
            ),
            &[("limit", "At most this many, 1 to 1000 (default 100).", Int(1, 1000))],
        ),
        q(
            r(
                "get",
                "/v1/stats",
                "Usage over a window, from per-minute rollups (per hour after a day): calls, errors by status, \
                 limit hits, CPU and memory percentiles, bytes written and security events, in total, by group \
                 and over time.",
                Admin,
                Body::None,
                Body::Json(json::<stats::Stats>),
                get(stats::stats),
            ),
            &[
                ("window", "`1h`, `24h` (default) or `7d`.", OneOf(&["1h", "24h", "7d"])),
                (
                    "by",
                    "Group by `user`, `tool` (default), `status` or `tier`.",
                    OneOf(&["user", "tool", "status", "tier"]),
                ),
                ("user", "Only this user's calls and security events.", UserName),
            ],
        ),
        r(
            "get",
            "/v1/live",
            "What the server is doing now: calls in flight (user, tool, how long), the instance pool's \
             occupancy, code sessions, the guests' memory and descriptors against their budgets, warm jails.",
            Admin,
            Body::None,
            Body::Json(json::<admin::Live>),
            get(admin::live),
        ),
        r(
            "get",
            "/v1/users",
            "Every user: tier, admin, active keys, and until when a suspension or a throttle holds.",
            Admin,
            Body::None,
            Body::Json(json::<admin::UserList>),
            get(admin::users),
        ),
        r(
            "post",
            "/v1/users/{id}/suspend",
            "Suspend a user: their keys answer 403 `suspended` until it runs out or is lifted (body \
             `{\"for_s\", \"reason\"}`, both optional). The last admin who is not suspended cannot be (409).",
            Admin,
            Body::Json(json::<admin::SuspendRequest>),
            Body::Json(json::<admin::Suspension>),
            post(admin::suspend),
        ),
        r(
            "post",
            "/v1/users/{id}/unsuspend",
            "Lift a user's suspension and throttle (whether an admin or a behaviour rule put them there).",
            Admin,
            Body::None,
            Body::Json(json::<admin::Lifted>),
            post(admin::unsuspend),
        ),
    ]
}

/// The service's router.
pub fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new();
    for route in routes() {
        app = app.route(route.path, route.handler);
    }
    // The operator console: static, embedded; its data come from the admin routes above.
    app = app
        .route("/console", get(console::page))
        .route("/console/", get(console::slash))
        .route("/console/app.js", get(console::script))
        .route("/console/app.css", get(console::style));
    let mcp = Router::new()
        .nest_service("/mcp", mcp::http_service(state.clone()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), mcp::authenticate));
    app.merge(mcp).fallback(admin::no_route).method_not_allowed_fallback(admin::no_method).with_state(state)
}

/// Serves until SIGINT or SIGTERM, then lets calls in flight finish for up
/// to the grace period.
///
/// # Errors
///
/// The listener could not be bound, or the service failed to start.
pub async fn serve(policy: Policy, settings: ServerSettings) -> Result<(), StartError> {
    raise_open_file_limit();
    // Listen first: compiling a new build of the built-in tools takes seconds
    // (tens the first time), and other tools can be served meanwhile.
    let state = AppState::open_without_builtins(policy, settings).await?;
    if state.store.list_users().await?.is_empty() {
        tracing::warn!(
        data_dir = %state.settings.data_dir.display(),
        "no users yet: add an admin with `imagentx-sandbox user add NAME --admin --data-dir DIR` \
         (it prints the API key)"
        );
    }
    let listener = tokio::net::TcpListener::bind(state.settings.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, data_dir = %state.settings.data_dir.display(), "serving");
    let registering = state.clone();
    tokio::spawn(async move { registering.register_builtins().await });
    run(listener, state, shutdown_signal()).await
}

/// Serves on `listener` until `shutdown` completes (tests pass their own),
/// then stops accepting, lets requests in flight finish (and calls whose
/// clients left be recorded) for up to the grace period, and closes the
/// database.
///
/// Connections are served by hyper directly rather than `axum::serve`, for
/// a header-read timeout: otherwise a client that never finishes its headers
/// holds its connection forever.
///
/// # Errors
///
/// None yet: accept errors (e.g. out of descriptors) are logged and retried.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(state.settings.header_read_timeout_ms));
    let app = router(state.clone());
    let graceful = GracefulShutdown::new();
    let sweeper = state.sandbox.data_dir.volumes().map(|volumes| tokio::spawn(unmount_idle(Arc::clone(volumes))));
    // A service manager (systemd, Type=notify) hears that we listen, and the
    // watchdog hears from the runtime for as long as it runs tasks.
    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
    if let Some(notifier) = &notifier {
        let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        notifier.send(&format!("READY=1\nSTATUS=serving on {at}\nMAINPID={}", std::process::id()));
    }
    let watchdog = notifier
        .clone()
        .zip(crate::notify::Notifier::watchdog())
        .map(|(notifier, interval)| tokio::spawn(crate::notify::watchdog(notifier, interval)));
    let session_sweeper = tokio::spawn(sessions::sweep(state.clone()));
    let mut refusing = Refusing::new();
    let pruner = tokio::spawn(prune_executions(state.clone()));
    let backups = tokio::spawn(scheduled_backup(state.clone()));
    let rollups = tokio::spawn(stats::keep(state.clone()));
    let registry_sync = tokio::spawn(sync_registry(state.clone()));
    let heartbeat = state.node.is_some().then(|| tokio::spawn(cluster::heartbeat(state.clone())));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // The peer's address, for behaviour analysis of failed authentication.
                    let app = tower_layer::Layer::layer(&axum::Extension(axum::extract::ConnectInfo(peer)), app.clone());
                    let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    refusing.refuse_one(&listener, &state.metrics).await;
                }
                Err(e) => {
                    // Anything else: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if let Some(notifier) = &notifier {
        notifier.send("STOPPING=1\nSTATUS=stopping: finishing calls in flight");
    }
    state.mcp.closing.cancel();
    // Background tasks hold the state (and through it the volumes' lock):
    // each is gone once awaited, so a restart in this process can take it.
    for task in [watchdog, sweeper].into_iter().flatten() {
        task.abort();
        let _ = task.await;
    }
    state.draining.store(true, Ordering::Release);
    tracing::info!(calls_in_flight = state.admission.in_flight(), "shutting down; finishing calls in flight");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(state.settings.shutdown_grace_ms);
    if tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period over; closing connections with requests still running");
    }
    // Calls whose clients left still finish and are recorded, within the grace.
    let waited = tokio::time::timeout_at(deadline, async {
        while state.admission.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!(calls_in_flight = state.admission.in_flight(), "stopping with calls still running");
    }
    for task in [Some(session_sweeper), Some(pruner), Some(backups), Some(rollups), Some(registry_sync), heartbeat]
        .into_iter()
        .flatten()
    {
        task.abort();
        let _ = task.await;
    }
    sessions::close_all(&state).await;
    if let Some(node) = &state.node {
        node.leave().await;
    }
    state.rollup.flush(&state.store).await;
    let stopping = Arc::clone(&state);
    let _ = tokio::task::spawn_blocking(move || stopping.registry.stop_warm_pools(Duration::from_secs(5))).await;
    state.store.close();
    if let Some(volumes) = state.sandbox.data_dir.volumes() {
        volumes.unmount_all();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Takes a backup every `[backup] every_s` into `dir`, keeping the newest
/// `keep`: a child process of this binary (`backup --to`, under `nice`),
/// one at a time. Each is an audit record; a failed one is also an alert.
/// How often a node sharing its store looks for tools registered or retired
/// by the other nodes.
const REGISTRY_SYNC: Duration = Duration::from_secs(2);

/// On a shared store (PostgreSQL), keeps this node's tools the store's:
/// what another node registered is loaded here within [`REGISTRY_SYNC`] (and
/// the time to load it), what another retired is dropped.
async fn sync_registry(state: Arc<AppState>) {
    if state.store.is_sqlite() {
        return; // one node: every change is made here
    }
    let mut every = tokio::time::interval(REGISTRY_SYNC);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let jail = state.jail.as_deref().ok();
        if let Err(e) = state.registry.sync(&state.store, &state.sandbox, &state.blobs, jail).await {
            tracing::warn!(error = %e, "reading the registry's changes from the store failed; trying again");
        }
    }
}

async fn scheduled_backup(state: Arc<AppState>) {
    let schedule = state.settings.backup.clone();
    let Some(dir) = schedule.dir.clone() else { return };
    if !state.store.is_sqlite() {
        tracing::warn!(
            dir = %dir.display(),
            "[backup] dir is set but the store is PostgreSQL: no scheduled backups (back the database up with \
             pg_dump or your provider's snapshots; `backup` copies a SQLite store with its data directory)"
        );
        return;
    }
    let mut every = tokio::time::interval(Duration::from_secs(schedule.every_s.max(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await; // the first one comes after a whole interval
    loop {
        every.tick().await;
        let started = std::time::Instant::now();
        // What a backup killed mid-way (a stop, a crash) left: its partial
        // file and its database snapshot. Backups here run one at a time.
        for entry in std::fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with(&format!(".{BACKUP_PREFIX}")) {
                let path = entry.path();
                let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
            }
        }
        let stamp = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string().replace(':', "-");
        let file = dir.join(format!("{BACKUP_PREFIX}{stamp}.tar.gz"));
        let outcome = run_backup(&state, &dir, &file).await;
        let ms = started.elapsed().as_millis() as u64;
        let mut events = Vec::new();
        let detail = serde_json::json!({"file": file, "ms": ms, "error": outcome.as_ref().err()});
        match &outcome {
            Ok(()) => {
                state.metrics.backup("ok");
                tracing::info!(file = %file.display(), ms, "backup taken");
                let found = scheduled_backups(&dir);
                for old in found.iter().take(found.len().saturating_sub(schedule.keep.max(1))) {
                    if let Err(e) = std::fs::remove_file(old) {
                        tracing::warn!(file = %old.display(), error = %e, "removing an old backup failed");
                    }
                }
            }
            Err(e) => {
                state.metrics.backup("failed");
                state.metrics.alert("backup_failed");
                tracing::error!(file = %file.display(), error = %e, "backup failed");
                events.push(
                    crate::audit::AuditEvent::new(crate::audit::Kind::Alert, "backup_failed")
                        .actor("sandbox")
                        .detail(serde_json::json!({"rule": "backup_failed", "error": e, "file": file})),
                );
            }
        }
        let outcome = if outcome.is_ok() { "ok" } else { "failed" };
        events.push(crate::audit::AuditEvent::new(crate::audit::Kind::Backup, outcome).actor("sandbox").detail(detail));
        if let Err(e) = state.store.audit(events).await {
            tracing::error!(error = %e, "recording a backup failed");
        }
    }
}

/// One backup of this server's data directory into `file`.
async fn run_backup(state: &AppState, dir: &std::path::Path, file: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let mut command = if std::path::Path::new("/usr/bin/nice").exists() {
        let mut c = std::process::Command::new("/usr/bin/nice");
        c.args(["-n", "10"]).arg(&exe);
        c
    } else {
        std::process::Command::new(&exe)
    };
    command.arg("backup").arg("--to").arg(file).arg("--data-dir").arg(&state.settings.data_dir);
    if let Some(config) = &state.settings.config_path {
        command.arg("--config").arg(config);
    }
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| format!("the backup's task: {e}"))?
        .map_err(|e| format!("running the backup: {e}"))?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()) }
}

/// Deletes executions past the `[retention]` limits, a batch per commit,
/// every `every_ms`.
async fn prune_executions(state: Arc<AppState>) {
    let retention = state.settings.retention.clone();
    let prunes = retention.days > 0 || retention.max_executions > 0 || retention.max_bytes > 0;
    if !prunes && retention.audit_days == 0 {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_millis(retention.every_ms.max(10)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let limits = crate::store::Prune {
            cutoff: (retention.days > 0).then(|| {
                let age = Duration::from_secs(u64::from(retention.days) * 86_400);
                crate::report::rfc3339(std::time::SystemTime::now() - age)
            }),
            max: (retention.max_executions > 0).then_some(retention.max_executions),
            max_bytes: (retention.max_bytes > 0).then_some(retention.max_bytes),
            batch: retention.batch.max(1),
        };
        archive_audit(&state, &retention).await;
        let mut pruned = 0u64;
        loop {
            if !prunes {
                break;
            }
            match state.store.prune_executions(limits.clone()).await {
                Ok(0) => break,
                Ok(n) => {
                    pruned += n;
                    state.metrics.executions_pruned(n);
                    // Let calls' writes through between batches.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning executions failed; trying again later");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(
                executions = pruned,
                days = retention.days,
                max = retention.max_executions,
                max_bytes = retention.max_bytes,
                "old executions pruned"
            );
        }
    }
}

/// Moves audit records older than `[retention] audit_days` into archive
/// segments, a segment at a time, until none is left to move.
async fn archive_audit(state: &Arc<AppState>, retention: &Retention) {
    if retention.audit_days == 0 {
        return;
    }
    let age = Duration::from_secs(u64::from(retention.audit_days) * 86_400);
    let cutoff = crate::report::rfc3339(std::time::SystemTime::now() - age);
    if !state.store.is_sqlite() && state.settings.shared_dir.is_none() {
        // Each node would keep a part of the chain's archive: none can verify it.
        tracing::warn!(
            "[retention] audit_days is set but records are not archived: on PostgreSQL the archive must be one \
             directory every node mounts (`[server] shared_dir`)"
        );
        return;
    }
    let dir = state.settings.archive_dir();
    let mut moved = 0u64;
    loop {
        let max = retention.audit_segment.max(1);
        match state.store.archive_audit(dir.clone(), cutoff.clone(), max).await {
            Ok(0) => break,
            Ok(n) => moved += n,
            Err(e) => {
                tracing::warn!(error = %e, "archiving audit records failed; trying again later");
                break;
            }
        }
    }
    if moved > 0 {
        tracing::info!(records = moved, days = retention.audit_days, dir = %dir.display(), "audit records archived");
    }
}

/// Unmounts users' volumes that nobody used for [`crate::volume::IDLE_UNMOUNT`].
async fn unmount_idle(volumes: Arc<crate::volume::Volumes>) {
    let mut every = tokio::time::interval(Duration::from_secs(30));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let volumes = Arc::clone(&volumes);
        let idle = crate::volume::IDLE_UNMOUNT;
        if let Ok(unmounted @ 1..) = tokio::task::spawn_blocking(move || volumes.unmount_idle(idle)).await {
            tracing::debug!(unmounted, "unmounted idle data volumes");
        }
    }
}

/// Every client connection is a descriptor: lift the soft limit to the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, soft, "could not raise the open-file limit"),
        },
        Ok((soft, _)) if soft < 4096 => tracing::warn!(limit = soft, "open-file limit is low for many clients"),
        _ => {}
    }
}

/// Out of descriptors, a new connection would wait in the listen backlog,
/// its client with it, until one is freed. Instead one descriptor is kept in
/// reserve: given back, it lets the connection be accepted, answered 503
/// `too_many_connections` and closed, and is then taken again.
struct Refusing {
    reserve: Option<std::fs::File>,
    refused: u64,
    logged: Option<std::time::Instant>,
}

impl Refusing {
    fn new() -> Self {
        Self { reserve: std::fs::File::open("/dev/null").ok(), refused: 0, logged: None }
    }

    async fn refuse_one(&mut self, listener: &tokio::net::TcpListener, metrics: &Metrics) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const BODY: &str = "{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the server has no \
                            descriptor left for a new connection; try again shortly\"}}";
        drop(self.reserve.take());
        let step = Duration::from_millis(20);
        if let Ok(Ok((mut stream, _))) = tokio::time::timeout(step, listener.accept()).await {
            // Read what the client sent first: closing on unread data would reset
            // the connection, and the client would never see the answer.
            let mut request = [0u8; 4096];
            let _ = tokio::time::timeout(step, stream.read(&mut request)).await;
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
                 connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
                BODY.len()
            );
            let _ = tokio::time::timeout(step, stream.write_all(answer.as_bytes())).await;
            let _ = tokio::time::timeout(step, stream.shutdown()).await;
            self.refused += 1;
            metrics.connection_refused();
        }
        self.reserve = std::fs::File::open("/dev/null").ok();
        if self.reserve.is_none() {
            // Not even the reserve came back: wait for descriptors instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.logged.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
            tracing::warn!(refused = self.refused, "out of file descriptors: new connections are answered 503");
            self.logged = Some(std::time::Instant::now());
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
