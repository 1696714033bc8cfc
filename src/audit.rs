//! The audit trail: one typed, append-only record per operation, each chained
//! to the one before it by a SHA-256 hash.
//!
//! `hash = sha256(prev_hash ‖ seq ‖ at ‖ kind ‖ actor ‖ user ‖ tool ‖ outcome ‖ detail)`
//! with every field length-prefixed, so that no two different records hash
//! the same. Changing, removing or reordering any record breaks the chain
//! from there on, which [`verify`] finds.

use rusqlite::{Connection, params};
use serde::Serialize;
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
}

impl Kind {
    pub const ALL: [Kind; 16] = [
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

struct RecordFields<'a> {
    seq: i64,
    at: &'a str,
    kind: &'a str,
    actor: Option<&'a str>,
    user: Option<&'a str>,
    tool: Option<&'a str>,
    outcome: &'a str,
    detail: &'a str,
}

impl RecordFields<'_> {
    fn hash(&self, prev_hash: &str) -> String {
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
}

/// Recomputes the whole chain.
///
/// # Errors
///
/// A database error while reading.
pub fn verify(conn: &Connection) -> Result<Verification, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT seq, at, kind, actor, user_id, tool, outcome, detail, prev_hash, hash FROM audit ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1;
    let mut records = 0;
    let broken = |seq: i64, records: u64, reason: String| Verification {
        records,
        first_broken: Some(seq),
        reason: Some(reason),
    };
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let text = |i| r.get::<_, String>(i);
        let maybe = |i| r.get::<_, Option<String>>(i);
        let (at, kind, outcome, detail) = (text(1)?, text(2)?, text(6)?, text(7)?);
        let (actor, user, tool) = (maybe(3)?, maybe(4)?, maybe(5)?);
        let (prev_hash, hash) = (text(8)?, text(9)?);
        records += 1;
        if seq != expected_seq {
            return Ok(broken(seq, records, format!("record {expected_seq} is missing")));
        }
        if prev_hash != prev {
            return Ok(broken(seq, records, "does not link to the record before it".into()));
        }
        let fields = RecordFields {
            seq,
            at: &at,
            kind: &kind,
            actor: actor.as_deref(),
            user: user.as_deref(),
            tool: tool.as_deref(),
            outcome: &outcome,
            detail: &detail,
        };
        if fields.hash(&prev) != hash {
            return Ok(broken(seq, records, "content does not match its hash".into()));
        }
        prev = hash;
        expected_seq += 1;
    }
    Ok(Verification { records, first_broken: None, reason: None })
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
    let rows =
        stmt.query_map(params![q.user, q.tool, q.kind.map(Kind::as_str), q.since, q.until, q.before, q.limit], |r| {
            let detail: String = r.get(7)?;
            Ok(Record {
                seq: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                actor: r.get(3)?,
                user: r.get(4)?,
                tool: r.get(5)?,
                outcome: r.get(6)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
                prev_hash: r.get(8)?,
                hash: r.get(9)?,
            })
        })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
