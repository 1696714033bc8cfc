//! The audit trail: one typed, append-only record per operation, each chained
//! to the one before it by a SHA-256 hash.
//!
//! `hash = sha256(prev_hash ‖ seq ‖ at ‖ kind ‖ actor ‖ user ‖ tool ‖ outcome ‖ detail)`
//! with every field length-prefixed, so that no two different records hash
//! the same. Changing, removing or reordering any record breaks the chain
//! from there on, which [`verify`] finds.
//!
//! Old records move out of the database into **archive segments**
//! ([`ARCHIVE_DIR`] under the data directory, `[retention] audit_days`):
//! gzip-compressed JSON lines, one record per line exactly as it was stored,
//! closed by an `{"end": ...}` line with the count and the last hash. A
//! segment is written whole (temporary name, fsync, rename) before its
//! records leave the table, and the newest record always stays there, so the
//! chain goes on from it. [`verify_all`] checks the segments and the table
//! as one chain, and names the segment of the first break.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{StoreError, optional};

/// The hash the first record chains to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What kind of operation a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    AuthFailure,
    Denied,
    UserAdded,
    UserTierChanged,
    KeyIssued,
    KeysRevoked,
    ToolRegistered,
    ToolRetired,
    Execution,
    LimitBreach,
    FileWritten,
    FileDeleted,
    Alert,
    SessionOpened,
    SessionClosed,
    Backup,
    /// A behaviour rule fired (`crate::behaviour`): its evidence and the responses taken.
    Anomaly,
    UserSuspended,
    UserThrottled,
    /// A suspension or a throttle lifted by an admin.
    UserUnsuspended,
}

impl Kind {
    pub const ALL: [Kind; 20] = [
        Kind::AuthFailure,
        Kind::Denied,
        Kind::UserAdded,
        Kind::UserTierChanged,
        Kind::KeyIssued,
        Kind::KeysRevoked,
        Kind::ToolRegistered,
        Kind::ToolRetired,
        Kind::Execution,
        Kind::LimitBreach,
        Kind::FileWritten,
        Kind::FileDeleted,
        Kind::Alert,
        Kind::SessionOpened,
        Kind::SessionClosed,
        Kind::Backup,
        Kind::Anomaly,
        Kind::UserSuspended,
        Kind::UserThrottled,
        Kind::UserUnsuspended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AuthFailure => "auth_failure",
            Kind::Denied => "denied",
            Kind::UserAdded => "user_added",
            Kind::UserTierChanged => "user_tier_changed",
            Kind::KeyIssued => "key_issued",
            Kind::KeysRevoked => "keys_revoked",
            Kind::ToolRegistered => "tool_registered",
            Kind::ToolRetired => "tool_retired",
            Kind::Execution => "execution",
            Kind::LimitBreach => "limit_breach",
            Kind::FileWritten => "file_written",
            Kind::FileDeleted => "file_deleted",
            Kind::Alert => "alert",
            Kind::SessionOpened => "session_opened",
            Kind::SessionClosed => "session_closed",
            Kind::Backup => "backup",
            Kind::Anomaly => "anomaly",
            Kind::UserSuspended => "user_suspended",
            Kind::UserThrottled => "user_throttled",
            Kind::UserUnsuspended => "user_unsuspended",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One operation, as recorded.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub kind: Kind,
    /// Who did it: a user id, `cli` for the command line, or `null` when
    /// the caller could not be identified.
    pub actor: Option<String>,
    /// Whose data or account it concerned.
    pub user: Option<String>,
    pub tool: Option<String>,
    /// `ok`, `denied`, or an execution's status.
    pub outcome: String,
    /// Kind-specific facts (usage, sizes, reasons). Never a tool's input or output.
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn new(kind: Kind, outcome: impl Into<String>) -> Self {
        Self { kind, actor: None, user: None, tool: None, outcome: outcome.into(), detail: serde_json::json!({}) }
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn tool(mut self, tool: impl Into<String>) -> Self {
        self.tool = Some(tool.into());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// The chain's last record: its number and hash.
#[derive(Debug, Clone)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
}

/// The head of the chain as stored.
pub(crate) fn head(conn: &Connection) -> Result<Head, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?;
    let row = optional(stmt.query_row([], |r| Ok(Head { seq: r.get(0)?, hash: r.get(1)? })))?;
    Ok(row.unwrap_or(Head { seq: 0, hash: GENESIS.to_owned() }))
}

/// Appends `event` after `head`; answers the new head.
pub(crate) fn append(conn: &Connection, head: &Head, at: &str, event: &AuditEvent) -> Result<Head, StoreError> {
    let seq = head.seq + 1;
    let detail = serde_json::to_string(&event.detail)?;
    let record = RecordFields {
        seq,
        at,
        kind: event.kind.as_str(),
        actor: event.actor.as_deref(),
        user: event.user.as_deref(),
        tool: event.tool.as_deref(),
        outcome: &event.outcome,
        detail: &detail,
    };
    let hash = record.hash(&head.hash);
    conn.prepare_cached(
        "INSERT INTO audit (seq, at, kind, actor, user_id, tool, outcome, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        seq,
        at,
        record.kind,
        record.actor,
        record.user,
        record.tool,
        record.outcome,
        detail,
        head.hash,
        hash
    ])?;
    Ok(Head { seq, hash })
}

/// A record's hashed fields (every backend appends through [`RecordFields::hash`]).
pub(crate) struct RecordFields<'a> {
    pub(crate) seq: i64,
    pub(crate) at: &'a str,
    pub(crate) kind: &'a str,
    pub(crate) actor: Option<&'a str>,
    pub(crate) user: Option<&'a str>,
    pub(crate) tool: Option<&'a str>,
    pub(crate) outcome: &'a str,
    pub(crate) detail: &'a str,
}

impl RecordFields<'_> {
    /// The record's hash, chained to `prev_hash`.
    pub(crate) fn hash(&self, prev_hash: &str) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: Option<&[u8]>| match bytes {
            // A missing field and an empty one hash differently.
            None => h.update(u64::MAX.to_le_bytes()),
            Some(b) => {
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
        };
        field(Some(prev_hash.as_bytes()));
        field(Some(&self.seq.to_le_bytes()));
        field(Some(self.at.as_bytes()));
        field(Some(self.kind.as_bytes()));
        field(self.actor.map(str::as_bytes));
        field(self.user.map(str::as_bytes));
        field(self.tool.map(str::as_bytes));
        field(Some(self.outcome.as_bytes()));
        field(Some(self.detail.as_bytes()));
        hex::encode(h.finalize())
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub records: u64,
    /// The first record whose hash or link does not match, if any.
    pub first_broken: Option<i64>,
    pub reason: Option<String>,
    /// Records checked in archive segments (part of `records`).
    #[serde(skip_serializing_if = "is_zero")]
    pub archived: u64,
    /// The archive segment of the first break, when it is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One record as stored, and as an archive segment's line holds it (the
/// detail as the exact text that was hashed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRecord {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub actor: Option<String>,
    pub user: Option<String>,
    pub tool: Option<String>,
    pub outcome: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

impl StoredRecord {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            at: r.get(1)?,
            kind: r.get(2)?,
            actor: r.get(3)?,
            user: r.get(4)?,
            tool: r.get(5)?,
            outcome: r.get(6)?,
            detail: r.get(7)?,
            prev_hash: r.get(8)?,
            hash: r.get(9)?,
        })
    }
}

const COLUMNS: &str = "seq, at, kind, actor, user_id, tool, outcome, detail, prev_hash, hash";

/// The chain as it is walked: what the next record must be.
struct Chain {
    prev: String,
    next_seq: i64,
    records: u64,
}

impl Chain {
    fn new() -> Self {
        Self { prev: GENESIS.to_owned(), next_seq: 1, records: 0 }
    }

    /// Checks `record` as the next one: why it breaks the chain, if it does.
    fn check(&mut self, record: &StoredRecord) -> Option<String> {
        self.records += 1;
        if record.seq != self.next_seq {
            return Some(format!("record {} is missing", self.next_seq));
        }
        if record.prev_hash != self.prev {
            return Some("does not link to the record before it".into());
        }
        let fields = RecordFields {
            seq: record.seq,
            at: &record.at,
            kind: &record.kind,
            actor: record.actor.as_deref(),
            user: record.user.as_deref(),
            tool: record.tool.as_deref(),
            outcome: &record.outcome,
            detail: &record.detail,
        };
        if fields.hash(&self.prev) != record.hash {
            return Some("content does not match its hash".into());
        }
        self.prev.clone_from(&record.hash);
        self.next_seq += 1;
        None
    }

    fn broken(&self, seq: i64, reason: String, segment: Option<String>) -> Verification {
        Verification { records: self.records, first_broken: Some(seq), reason: Some(reason), archived: 0, segment }
    }
}

/// Recomputes the whole chain of the table (no archive: see [`verify_all`]).
///
/// # Errors
///
/// A database error while reading.
pub fn verify(conn: &Connection) -> Result<Verification, StoreError> {
    verify_table(conn, TableWalk::new())
}

/// The table's records, walked after the archive's (see [`TableWalk`]).
fn verify_table(conn: &Connection, mut walk: TableWalk) -> Result<Verification, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        if let Some(broken) = walk.check(&StoredRecord::from_row(r)?) {
            return Ok(broken);
        }
    }
    Ok(walk.unbroken())
}

/// The table's part of a verification, fed its records in order by
/// whichever backend reads them: it goes on from the archive's chain, and
/// the records still in the table that were also archived (those of the last
/// segment, after a crash between its write and their delete) must be the
/// same as their archived copies.
pub(crate) struct TableWalk {
    chain: Chain,
    archived: u64,
    archived_hashes: std::collections::HashMap<i64, String>,
}

impl TableWalk {
    /// A walk of the table alone, from the first record.
    pub(crate) fn new() -> Self {
        Self { chain: Chain::new(), archived: 0, archived_hashes: std::collections::HashMap::new() }
    }

    /// Checks the table's next record: the answer, when it breaks the chain
    /// (then the walk is over).
    pub(crate) fn check(&mut self, record: &StoredRecord) -> Option<Verification> {
        let archived = self.archived;
        if record.seq < self.chain.next_seq {
            if self.archived_hashes.get(&record.seq) == Some(&record.hash) {
                return None;
            }
            let reason = "differs from its archived copy".to_owned();
            return Some(Verification { archived, ..self.chain.broken(record.seq, reason, None) });
        }
        let reason = self.chain.check(record)?;
        Some(Verification { archived, ..self.chain.broken(record.seq, reason, None) })
    }

    /// The answer once every record was checked and none broke the chain.
    pub(crate) fn unbroken(&self) -> Verification {
        Verification {
            records: self.chain.records,
            first_broken: None,
            reason: None,
            archived: self.archived,
            segment: None,
        }
    }
}

/// Where archive segments go, under a data directory.
pub const ARCHIVE_DIR: &str = "audit-archive";

/// The lock an archiver holds while it writes a segment and deletes its
/// records, and a backup while it copies the database and the segments
/// (so that a backup never holds a record twice, or not at all).
pub const ARCHIVE_LOCK: &str = ".lock";

/// Takes the archive's lock (waiting for it). With `create` (the archiver)
/// the directory and its lock file are made first; without (a backup, a
/// verify), no archive is no lock to take: `None`. Never through a symlink.
///
/// # Errors
///
/// The directory or the lock file cannot be made or opened, or the lock taken.
pub fn lock_archive(dir: &Path, create: bool) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    if create {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create {
        options.write(true).create(true).truncate(false).mode(0o600);
    }
    let file = match options.open(dir.join(ARCHIVE_LOCK)) {
        Ok(file) => file,
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive);
    locked.map(Some).map_err(|(_, e)| std::io::Error::from(e))
}

/// The file name of the segment of records `first..=last`.
pub fn segment_name(first: i64, last: i64) -> String {
    format!("audit-{first:012}-{last:012}.jsonl.gz")
}

/// The closing line of a segment.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    end: EndFields,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndFields {
    records: u64,
    first_seq: i64,
    last_seq: i64,
    last_hash: String,
}

/// The segments in `dir`, oldest first, with the first record each holds.
fn segments(dir: &Path) -> std::io::Result<Vec<(i64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let first = name.strip_prefix("audit-").and_then(|rest| rest.split('-').next()).and_then(|n| n.parse().ok());
        if let (Some(first), true) = (first, name.ends_with(".jsonl.gz")) {
            found.push((first, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The oldest records written before `cutoff` (RFC 3339), at most `max`,
/// never the newest record (the chain goes on from it).
///
/// # Errors
///
/// A database error.
///
/// Only an unbroken run from the oldest record: one written before
/// `cutoff` after one that was not (a clock stepped back) waits for it.
pub fn archivable(conn: &Connection, cutoff: &str, max: u32) -> Result<Vec<StoredRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM audit
          WHERE seq < (SELECT max(seq) FROM audit)
            AND seq < coalesce((SELECT min(seq) FROM audit WHERE at >= ?1), 9223372036854775807)
          ORDER BY seq LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![cutoff, max], StoredRecord::from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Writes `records` (consecutive) as one segment in `dir`: a temporary
/// file, fsync, rename, fsync of the directory. A segment that starts at
/// the same record (left by an archiver stopped before it could delete its
/// records) is replaced.
///
/// # Errors
///
/// The write's failure.
pub fn write_segment(dir: &Path, records: &[StoredRecord]) -> std::io::Result<PathBuf> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(std::io::Error::other("an empty segment"));
    };
    if records.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        return Err(std::io::Error::other("a segment's records must be consecutive"));
    }
    std::fs::create_dir_all(dir)?;
    for (start, stale) in segments(dir)? {
        if start == first.seq {
            std::fs::remove_file(stale)?;
        }
    }
    let path = dir.join(segment_name(first.seq, last.seq));
    let partial = dir.join(format!(".{}.partial", segment_name(first.seq, last.seq)));
    // Made new, never through something already there (a planted symlink).
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&partial)?;
    let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::default());
    for record in records {
        serde_json::to_writer(&mut gz, record)?;
        gz.write_all(b"\n")?;
    }
    let end = End {
        end: EndFields {
            records: records.len() as u64,
            first_seq: first.seq,
            last_seq: last.seq,
            last_hash: last.hash.clone(),
        },
    };
    serde_json::to_writer(&mut gz, &end)?;
    gz.write_all(b"\n")?;
    let file = gz.finish()?.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    std::fs::rename(&partial, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// Deletes the records `first..=last` once their segment is written.
///
/// # Errors
///
/// A database error.
pub(crate) fn delete_archived(conn: &Connection, first: i64, last: i64) -> Result<u64, StoreError> {
    conn.prepare_cached("UPDATE audit_archived SET upto = max(upto, ?1) WHERE id = 1")?.execute([last])?;
    let deleted = conn
        .prepare_cached("DELETE FROM audit WHERE seq BETWEEN ?1 AND ?2 AND seq < (SELECT max(seq) FROM audit)")?
        .execute(params![first, last])?;
    Ok(deleted as u64)
}

/// Verifies the archive segments in `archive` (oldest first) and then the
/// table, as one chain from the first record.
///
/// # Errors
///
/// A database error; an archive segment that cannot be read is reported as
/// the break, not as an error.
pub fn verify_all(conn: &Connection, archive: &Path) -> Result<Verification, StoreError> {
    match walk_archive(archive) {
        ControlFlow::Continue(walk) => verify_table(conn, walk),
        ControlFlow::Break(broken) => Ok(broken),
    }
}

/// Verifies the archive segments in `archive` (oldest first): the walk of the
/// table that goes on from them, or the answer when the chain breaks in them
/// (an archive segment that cannot be read is such a break). Reads files:
/// blocking.
pub(crate) fn walk_archive(archive: &Path) -> ControlFlow<Verification, TableWalk> {
    let mut chain = Chain::new();
    let found = match segments(archive) {
        Ok(found) => found,
        Err(e) => {
            let reason = format!("the archive {} cannot be read: {e}", archive.display());
            return ControlFlow::Break(chain.broken(1, reason, None));
        }
    };
    // The hashes of the last segment's records: after a crash between a
    // segment's write and its records' delete, the table still holds them.
    let mut last_segment = std::collections::HashMap::new();
    for (first, path) in found {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let broken =
            |chain: &Chain, seq: i64, reason: String| ControlFlow::Break(chain.broken(seq, reason, name.clone()));
        let file = match open_regular(&path) {
            Ok(file) => file,
            Err(e) => return broken(&chain, first, format!("the segment cannot be read: {e}")),
        };
        // Every gzip member: text appended after the first is read, and refused.
        let lines = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file)).lines();
        let mut ended = false;
        let mut in_segment = 0u64;
        last_segment.clear();
        for line in lines {
            let line = match line {
                Ok(line) => line,
                Err(e) => return broken(&chain, chain.next_seq, format!("the segment is damaged: {e}")),
            };
            if ended {
                return broken(&chain, chain.next_seq, "a line follows the segment's end".into());
            }
            if let Ok(end) = serde_json::from_str::<End>(&line) {
                let e = end.end;
                let named = name.as_deref() == Some(segment_name(e.first_seq, e.last_seq).as_str());
                if e.records == 0
                    || e.records != in_segment
                    || e.first_seq != first
                    || e.last_seq != chain.next_seq - 1
                    || e.last_hash != chain.prev
                    || !named
                {
                    return broken(&chain, e.last_seq, "the segment's end does not match its records or name".into());
                }
                ended = true;
                continue;
            }
            let record: StoredRecord = match serde_json::from_str(&line) {
                Ok(record) => record,
                Err(e) => return broken(&chain, chain.next_seq, format!("a line is not a record: {e}")),
            };
            in_segment += 1;
            if let Some(reason) = chain.check(&record) {
                return broken(&chain, record.seq, reason);
            }
            last_segment.insert(record.seq, record.hash);
        }
        if !ended {
            return broken(&chain, chain.next_seq, "the segment has no end line (cut short)".into());
        }
    }
    let archived = chain.records;
    ControlFlow::Continue(TableWalk { chain, archived, archived_hashes: last_segment })
}

/// Opens `path` if it is a regular file, never through a symlink, without
/// waiting on a FIFO.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// One record, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Record {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub actor: Option<String>,
    pub user: Option<String>,
    pub tool: Option<String>,
    pub outcome: String,
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

impl From<StoredRecord> for Record {
    /// The record as answered: its detail parsed (kept as a string if it is not JSON).
    fn from(stored: StoredRecord) -> Self {
        Record {
            seq: stored.seq,
            at: stored.at,
            kind: stored.kind,
            actor: stored.actor,
            user: stored.user,
            tool: stored.tool,
            outcome: stored.outcome,
            detail: serde_json::from_str(&stored.detail).unwrap_or(serde_json::Value::String(stored.detail)),
            prev_hash: stored.prev_hash,
            hash: stored.hash,
        }
    }
}

/// Filters of an audit query; all optional.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub user: Option<String>,
    pub tool: Option<String>,
    pub kind: Option<Kind>,
    /// RFC 3339 bounds on `at`, inclusive.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only records numbered below this (paging backwards).
    pub before: Option<i64>,
    pub limit: u32,
}

/// Records matching `q`, newest first.
///
/// # Errors
///
/// A database error.
pub fn query(conn: &Connection, q: &Query) -> Result<Vec<Record>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, at, kind, actor, user_id, tool, outcome, detail, prev_hash, hash FROM audit
         WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR tool = ?2) AND (?3 IS NULL OR kind = ?3)
           AND (?4 IS NULL OR at >= ?4) AND (?5 IS NULL OR at <= ?5) AND (?6 IS NULL OR seq < ?6)
         ORDER BY seq DESC LIMIT ?7",
    )?;
    let rows = stmt
        .query_map(params![q.user, q.tool, q.kind.map(Kind::as_str), q.since, q.until, q.before, q.limit], |r| {
            Ok(Record::from(StoredRecord::from_row(r)?))
        })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
