//! Code sessions' rows: whose each session was, and why it ended.

use rusqlite::params;

use super::{Sqlite, StoreError, optional};
use crate::audit::AuditEvent;

/// A session as the database knows it.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub tool: String,
    pub opened_at: String,
    pub closed_at: Option<String>,
    pub reason: Option<String>,
    /// Steps it ran (once ended).
    pub steps: Option<u64>,
}

impl Sqlite {
    /// SQLite: see [`Store::session_opened`].
    pub(super) async fn session_opened(
        &self,
        id: String,
        user: String,
        tool: String,
        event: AuditEvent,
    ) -> Result<String, StoreError> {
        self.write(move |w| {
            let now = w.now().to_owned();
            w.conn()
                .prepare_cached("INSERT INTO sessions (id, user_id, tool, opened_at) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![id, user, tool, now])?;
            w.audit(&event)?;
            Ok(now)
        })
        .await
    }

    /// SQLite: see [`Store::session_closed`].
    pub(super) async fn session_closed(
        &self,
        id: String,
        reason: String,
        steps: u64,
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(move |w| {
            let now = w.now().to_owned();
            w.conn()
                .prepare_cached(
                    "UPDATE sessions SET closed_at = ?2, reason = ?3, steps = ?4 WHERE id = ?1 AND closed_at IS NULL",
                )?
                .execute(params![id, now, reason, steps])?;
            w.audit(&event)
        })
        .await
    }

    /// SQLite: see [`Store::end_open_sessions`].
    pub(super) async fn end_open_sessions(&self, reason: &'static str) -> Result<usize, StoreError> {
        self.write(move |w| {
            let now = w.now().to_owned();
            Ok(w.conn()
                .prepare_cached("UPDATE sessions SET closed_at = ?1, reason = ?2 WHERE closed_at IS NULL")?
                .execute(params![now, reason])?)
        })
        .await
    }

    /// SQLite: see [`Store::session`].
    pub(super) async fn session(&self, id: &str, user: &str) -> Result<Option<SessionRow>, StoreError> {
        self.read(|conn| {
            optional(
                conn.prepare_cached(
                    "SELECT tool, opened_at, closed_at, reason, steps FROM sessions WHERE id = ?1 AND user_id = ?2",
                )?
                .query_row(params![id, user], |r| {
                    Ok(SessionRow {
                        tool: r.get(0)?,
                        opened_at: r.get(1)?,
                        closed_at: r.get(2)?,
                        reason: r.get(3)?,
                        steps: r.get(4)?,
                    })
                }),
            )
        })
    }
}
