//! The tool registry: every version of every tool ever registered. Retiring
//! a tool marks it; its rows stay, so past executions keep their meaning.

use rusqlite::params;

use super::{Sqlite, StoreError};
use crate::audit::{AuditEvent, Kind};

/// One registered version of a tool.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct ToolRow {
    pub name: String,
    /// 1, 2, 3…: each registration under a name makes the next.
    pub version: u32,
    /// The version the tool gives itself (SDK `describe`), if any.
    pub label: Option<String>,
    pub sha256: String,
    /// `sdk`, `wasi_command` or `wasi_p1_module`.
    pub kind: String,
    pub description: Option<String>,
    pub input_schema: Option<serde_json::Value>,
    pub registered_by: String,
    pub registered_at: String,
    pub retired_at: Option<String>,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ToolRow> {
    let schema: Option<String> = r.get(6)?;
    Ok(ToolRow {
        name: r.get(0)?,
        version: r.get(1)?,
        label: r.get(2)?,
        sha256: r.get(3)?,
        kind: r.get(4)?,
        description: r.get(5)?,
        input_schema: schema.and_then(|s| serde_json::from_str(&s).ok()),
        registered_by: r.get(7)?,
        registered_at: r.get(8)?,
        retired_at: r.get(9)?,
    })
}

const COLUMNS: &str =
    "name, version, label, sha256, kind, description, input_schema, registered_by, registered_at, retired_at";

impl Sqlite {
    /// SQLite: see [`Store::register_tool`].
    pub(super) async fn register_tool(&self, mut row: ToolRow) -> Result<ToolRow, StoreError> {
        self.write(move |w| {
            let last: Option<u32> =
                w.conn().query_row("SELECT max(version) FROM tools WHERE name = ?1", [&row.name], |r| r.get(0))?;
            row.version = last.unwrap_or(0) + 1;
            row.registered_at = w.now().to_owned();
            row.retired_at = None;
            let schema = row.input_schema.as_ref().map(serde_json::to_string).transpose()?;
            w.conn().execute(
                &format!("INSERT INTO tools ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL)"),
                params![
                    row.name,
                    row.version,
                    row.label,
                    row.sha256,
                    row.kind,
                    row.description,
                    schema,
                    row.registered_by,
                    row.registered_at
                ],
            )?;
            let detail = serde_json::json!({"version": row.version, "sha256": row.sha256, "kind": row.kind});
            w.audit(
                &AuditEvent::new(Kind::ToolRegistered, "ok")
                    .actor(row.registered_by.clone())
                    .tool(row.name.clone())
                    .detail(detail),
            )?;
            Ok(row)
        })
        .await
    }

    /// SQLite: see [`Store::retire_tool`].
    pub(super) async fn retire_tool(
        &self,
        name: String,
        version: Option<u32>,
        actor: String,
    ) -> Result<Vec<u32>, StoreError> {
        self.write(move |w| {
            let mut stmt = w.conn().prepare(
                "UPDATE tools SET retired_at = ?1 WHERE name = ?2 AND (?3 IS NULL OR version = ?3)
                 AND retired_at IS NULL RETURNING version",
            )?;
            let versions: Vec<u32> =
                stmt.query_map(params![w.now(), name, version], |r| r.get(0))?.collect::<Result<_, _>>()?;
            drop(stmt);
            if versions.is_empty() {
                return Err(StoreError::NotFound(format!("no active tool `{name}`")));
            }
            let detail = serde_json::json!({"versions": versions});
            w.audit(&AuditEvent::new(Kind::ToolRetired, "ok").actor(actor).tool(name).detail(detail))?;
            Ok(versions)
        })
        .await
    }

    /// SQLite: see [`Store::active_tools`].
    pub(super) async fn active_tools(&self) -> Result<Vec<ToolRow>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare(&format!("SELECT {COLUMNS} FROM tools WHERE retired_at IS NULL ORDER BY name, version"))?;
            Ok(stmt.query_map([], row)?.collect::<Result<_, _>>()?)
        })
    }
}
