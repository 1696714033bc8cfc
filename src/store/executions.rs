//! Executions: every call's report, kept whole, readable by its owner.

use rusqlite::params;

use super::{Sqlite, StoreError, optional};
use crate::audit::AuditEvent;
use crate::report::ExecutionReport;

/// One execution in a listing (the report itself is read by id).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ExecutionRow {
    pub id: String,
    pub tool: String,
    pub tool_version: Option<u32>,
    pub status: String,
    pub started_at: String,
}

/// A page of a user's executions, newest first.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ExecutionPage {
    pub executions: Vec<ExecutionRow>,
    /// Pass as `?before=` for the next (older) page; `null` on the last page.
    pub next_before: Option<i64>,
}

/// What [`Store::prune_executions`] deletes (a limit left `None` does not apply).
#[derive(Debug, Clone)]
pub struct Prune {
    /// Executions that started before this (RFC 3339).
    pub cutoff: Option<String>,
    /// All but the newest this many.
    pub max: Option<u64>,
    /// The oldest, until the reports kept take at most this many bytes.
    pub max_bytes: Option<u64>,
    /// Rows looked at (and deleted at most) in one commit.
    pub batch: u32,
}

/// A stored execution found by its idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotentHit {
    pub request_hash: Option<String>,
    pub report: String,
}

impl Sqlite {
    /// SQLite: see [`Store::record_execution`].
    pub(super) async fn record_execution(
        &self,
        report: &ExecutionReport,
        json: bytes::Bytes,
        tool_version: Option<u32>,
        idempotency: Option<(String, String)>,
        events: Vec<AuditEvent>,
    ) -> Result<(), StoreError> {
        let (id, user, tool, status, started) = (
            report.id.clone(),
            report.user.clone(),
            report.tool.clone(),
            report.status.as_str(),
            report.started_at.clone(),
        );
        self.write(move |w| {
            let (key, request_hash) = idempotency.unzip();
            let inserted = w
                .conn()
                .prepare_cached(
                    "INSERT INTO executions (id, user_id, tool, tool_version, status, started_at, report,
                                             idempotency_key, request_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    id,
                    user,
                    tool,
                    tool_version,
                    status,
                    started,
                    rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(&json)),
                    key,
                    request_hash
                ]);
            match inserted {
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    return Err(StoreError::Conflict("idempotency key already used".into()));
                }
                other => other?,
            };
            for event in &events {
                w.audit(event)?;
            }
            Ok(())
        })
        .await
    }

    /// SQLite: see [`Store::prune_executions`].
    pub(super) async fn prune_executions(&self, limits: Prune) -> Result<u64, StoreError> {
        let Prune { cutoff, max, max_bytes, batch } = limits;
        self.write(move |w| {
            let conn = w.conn();
            // The count limit by sequence number: rows are numbered in order
            // and only the oldest are ever deleted, so all but the newest
            // `max` are those at or below `newest - max` (O(1) on the key).
            let over_count: Option<i64> = match max {
                None => None,
                Some(max) => conn
                    .query_row("SELECT max(seq) FROM executions", [], |r| r.get::<_, Option<i64>>(0))?
                    .map(|newest| newest - i64::try_from(max).unwrap_or(i64::MAX)),
            };
            // The byte limit: the oldest rows whose reports cover the excess,
            // within the batch (the total is kept by triggers; the sizes are
            // read from the rows' headers, not their text).
            let over_bytes: Option<i64> = match max_bytes {
                None => None,
                Some(max_bytes) => {
                    let total: i64 =
                        conn.query_row("SELECT bytes FROM execution_bytes WHERE id = 1", [], |r| r.get(0))?;
                    let mut excess = total - i64::try_from(max_bytes).unwrap_or(i64::MAX);
                    let mut last = None;
                    if excess > 0 {
                        let mut oldest = conn
                            .prepare_cached("SELECT seq, octet_length(report) FROM executions ORDER BY seq LIMIT ?1")?;
                        let mut rows = oldest.query(params![batch])?;
                        let mut seen = 0;
                        while excess > 0
                            && let Some(row) = rows.next()?
                        {
                            last = Some(row.get::<_, i64>(0)?);
                            excess -= row.get::<_, i64>(1)?;
                            seen += 1;
                        }
                        if excess > 0 && seen < batch {
                            // The whole table does not cover the excess: the
                            // counter is wrong (edited by hand?). Counted anew,
                            // rather than deleting every row for it.
                            conn.execute(
                                "UPDATE execution_bytes
                                    SET bytes = (SELECT coalesce(sum(octet_length(report)), 0) FROM executions)",
                                [],
                            )?;
                            tracing::warn!("the stored reports' byte count was wrong; counted anew");
                            last = None;
                        }
                    }
                    last
                }
            };
            // Only the oldest `batch` rows are looked at (the key's order is
            // time's order): each batch is cheap whatever the table's size.
            let deleted = conn
                .prepare_cached(
                    "DELETE FROM executions WHERE seq IN (SELECT seq FROM executions ORDER BY seq LIMIT ?3)
                       AND ((?1 IS NOT NULL AND started_at < ?1) OR (?2 IS NOT NULL AND seq <= ?2)
                            OR (?4 IS NOT NULL AND seq <= ?4))",
                )?
                .execute(params![cutoff, over_count, batch, over_bytes])?;
            Ok(deleted as u64)
        })
        .await
    }

    /// SQLite: see [`Store::report_bytes`].
    pub(super) async fn report_bytes(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let bytes: i64 = conn.query_row("SELECT bytes FROM execution_bytes WHERE id = 1", [], |r| r.get(0))?;
            Ok(u64::try_from(bytes).unwrap_or(0))
        })
    }

    /// SQLite: see [`Store::audit`].
    pub(super) async fn audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        self.write(move |w| events.iter().try_for_each(|e| w.audit(e))).await
    }

    /// SQLite: see [`Store::execution`].
    pub(super) async fn execution(&self, id: &str, user: Option<&str>) -> Result<Option<String>, StoreError> {
        self.read(|conn| {
            optional(
                conn.prepare_cached("SELECT report FROM executions WHERE id = ?1 AND (?2 IS NULL OR user_id = ?2)")?
                    .query_row(params![id, user], |r| r.get(0)),
            )
        })
    }

    /// SQLite: see [`Store::idempotent`].
    pub(super) async fn idempotent(&self, user: &str, key: &str) -> Result<Option<IdempotentHit>, StoreError> {
        self.read(|conn| {
            optional(
                conn.prepare_cached(
                    "SELECT request_hash, report FROM executions WHERE user_id = ?1 AND idempotency_key = ?2",
                )?
                .query_row(params![user, key], |r| Ok(IdempotentHit { request_hash: r.get(0)?, report: r.get(1)? })),
            )
        })
    }

    /// SQLite: see [`Store::executions`].
    pub(super) async fn executions(
        &self,
        user: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<ExecutionPage, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, id, tool, tool_version, status, started_at FROM executions
                 WHERE user_id = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
            )?;
            let mut last_seq = None;
            let mut executions = Vec::new();
            let mut rows = stmt.query(params![user, before, limit])?;
            while let Some(r) = rows.next()? {
                last_seq = Some(r.get::<_, i64>(0)?);
                executions.push(ExecutionRow {
                    id: r.get(1)?,
                    tool: r.get(2)?,
                    tool_version: r.get(3)?,
                    status: r.get(4)?,
                    started_at: r.get(5)?,
                });
            }
            let next_before = if executions.len() == limit as usize { last_seq } else { None };
            Ok(ExecutionPage { executions, next_before })
        })
    }
}

impl Sqlite {
    /// SQLite: see [`Store::archive_audit`] (synchronous: it syncs a file).
    pub(super) fn archive_audit(&self, archive: &std::path::Path, cutoff: &str, max: u32) -> Result<u64, StoreError> {
        let _lock = crate::audit::lock_archive(archive, true)?;
        let records = self.read(|conn| crate::audit::archivable(conn, cutoff, max))?;
        let (Some(first), Some(last)) = (records.first().map(|r| r.seq), records.last().map(|r| r.seq)) else {
            return Ok(0);
        };
        crate::audit::write_segment(archive, &records)?;
        let deleted = tokio::runtime::Handle::current()
            .block_on(self.write(move |w| crate::audit::delete_archived(w.conn(), first, last)))?;
        Ok(deleted)
    }
}
