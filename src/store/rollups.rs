//! Usage rollups: calls, errors, limit hits, CPU and memory (as histograms,
//! for percentiles), bytes written and security events, summed per minute
//! and per user, tool, tier and status; minutes older than a day compacted
//! into hours. `GET /v1/stats` reads these, never the executions.

use std::collections::{BTreeMap, HashMap};

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::{Sqlite, StoreError};

/// A minute's rows.
pub const MINUTE: i64 = 60;
/// An hour's rows (minutes compacted).
pub const HOUR: i64 = 3600;
/// Minute rows older than this are compacted into hours.
pub const KEEP_MINUTES_S: i64 = 26 * HOUR;
/// Hour rows older than this are deleted.
pub const KEEP_HOURS_S: i64 = 35 * 86_400;

/// A histogram with buckets a quarter of a binary order apart (each bucket's
/// upper bound is 19 % above its lower): percentiles within that.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram(BTreeMap<u16, u64>);

impl Histogram {
    const STEPS_PER_DOUBLING: f64 = 4.0;
    const TOP: u16 = 400;

    /// Counts `v` (a non-negative measure in units where 1 is the smallest
    /// that matters: microseconds of CPU, KiB of memory).
    pub fn add(&mut self, v: f64) {
        let bucket = if v <= 1.0 { 0 } else { ((v.log2() * Self::STEPS_PER_DOUBLING).ceil() as u16).min(Self::TOP) };
        *self.0.entry(bucket).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (b, n) in &other.0 {
            *self.0.entry(*b).or_default() += n;
        }
    }

    pub fn count(&self) -> u64 {
        self.0.values().sum()
    }

    /// The upper bound of the bucket holding the `q` quantile (0 to 1).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in &self.0 {
            seen += n;
            if seen >= rank {
                return Some(2f64.powf(f64::from(*b) / Self::STEPS_PER_DOUBLING));
            }
        }
        None
    }
}

/// What a row (or a sum of rows) holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub calls: u64,
    pub limit_hits: u64,
    pub bytes_written: u64,
    pub security_events: u64,
    /// Microseconds.
    pub cpu: Histogram,
    pub cpu_ms_sum: f64,
    /// KiB.
    pub memory: Histogram,
}

impl Totals {
    pub fn merge(&mut self, other: &Totals) {
        self.calls += other.calls;
        self.limit_hits += other.limit_hits;
        self.bytes_written += other.bytes_written;
        self.security_events += other.security_events;
        self.cpu.merge(&other.cpu);
        self.cpu_ms_sum += other.cpu_ms_sum;
        self.memory.merge(&other.memory);
    }
}

/// A row's key: the start of its minute (or hour), Unix seconds, and what it
/// is about. Security events are rows of tool `""` and status the event's kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub bucket: i64,
    pub user: String,
    pub tool: String,
    pub tier: String,
    pub status: String,
}

/// A row read back.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Key,
    pub span: i64,
    pub totals: Totals,
}

fn upsert(conn: &rusqlite::Connection, span: i64, key: &Key, add: &Totals) -> Result<(), StoreError> {
    let existing = super::optional(
        conn.prepare_cached(
            "SELECT calls, limit_hits, bytes_written, security_events, cpu_ms_sum, cpu_hist, memory_hist
             FROM rollups WHERE span = ?1 AND bucket = ?2 AND user_id = ?3 AND tool = ?4 AND tier = ?5 AND status = ?6",
        )?
        .query_row(params![span, key.bucket, key.user, key.tool, key.tier, key.status], |r| read_totals(r, 0)),
    )?;
    let mut totals = existing.transpose()?.unwrap_or_default();
    totals.merge(add);
    conn.prepare_cached(
        "INSERT OR REPLACE INTO rollups (span, bucket, user_id, tool, tier, status, calls, limit_hits, bytes_written,
                                         security_events, cpu_ms_sum, cpu_hist, memory_hist)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        span,
        key.bucket,
        key.user,
        key.tool,
        key.tier,
        key.status,
        totals.calls as i64,
        totals.limit_hits as i64,
        totals.bytes_written as i64,
        totals.security_events as i64,
        totals.cpu_ms_sum,
        serde_json::to_string(&totals.cpu)?,
        serde_json::to_string(&totals.memory)?,
    ])?;
    Ok(())
}

impl Sqlite {
    /// SQLite: see [`Store::add_rollups`].
    pub(super) async fn add_rollups(&self, rows: HashMap<Key, Totals>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(move |w| rows.iter().try_for_each(|(key, totals)| upsert(w.conn(), MINUTE, key, totals))).await
    }

    /// SQLite: see [`Store::compact_rollups`].
    pub(super) async fn compact_rollups(&self, now: i64, batch: u32) -> Result<usize, StoreError> {
        self.write(move |w| {
            let conn = w.conn();
            let before = now - KEEP_MINUTES_S;
            let rows = select(
                conn,
                "SELECT rowid, bucket, user_id, tool, tier, status, calls, limit_hits, bytes_written,
                        security_events, cpu_ms_sum, cpu_hist, memory_hist
                 FROM rollups WHERE span = ?1 AND bucket < ?2 ORDER BY bucket LIMIT ?3",
                params![MINUTE, before, batch],
            )?;
            let mut hours: HashMap<Key, Totals> = HashMap::new();
            for (_, key, totals) in &rows {
                let hour = Key { bucket: key.bucket - key.bucket.rem_euclid(HOUR), ..key.clone() };
                hours.entry(hour).or_default().merge(totals);
            }
            for (key, totals) in &hours {
                upsert(conn, HOUR, key, totals)?;
            }
            let mut delete = conn.prepare_cached("DELETE FROM rollups WHERE rowid = ?1")?;
            for (rowid, _, _) in &rows {
                delete.execute([rowid])?;
            }
            conn.execute("DELETE FROM rollups WHERE span = ?1 AND bucket < ?2", params![HOUR, now - KEEP_HOURS_S])?;
            Ok(rows.len())
        })
        .await
    }

    /// SQLite: see [`Store::rollups_since`].
    pub(super) async fn rollups_since(&self, since: i64) -> Result<Vec<Row>, StoreError> {
        self.read(|conn| {
            let rows = select(
                conn,
                "SELECT span, bucket, user_id, tool, tier, status, calls, limit_hits, bytes_written,
                        security_events, cpu_ms_sum, cpu_hist, memory_hist
                 FROM rollups WHERE bucket >= ?1",
                params![since],
            )?;
            Ok(rows.into_iter().map(|(span, key, totals)| Row { key, span, totals }).collect())
        })
    }
}

/// The rows of `sql`, which selects a number (the rowid or the span), the
/// key's five columns, then the totals' seven.
fn select(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(i64, Key, Totals)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mapped = stmt.query_map(params, |r| {
        let key = Key { bucket: r.get(1)?, user: r.get(2)?, tool: r.get(3)?, tier: r.get(4)?, status: r.get(5)? };
        Ok((r.get::<_, i64>(0)?, key, read_totals(r, 6)?))
    })?;
    let mut rows = Vec::new();
    for row in mapped {
        let (number, key, totals) = row?;
        rows.push((number, key, totals?));
    }
    Ok(rows)
}

/// The totals of a row that selects `calls, limit_hits, bytes_written,
/// security_events, cpu_ms_sum, cpu_hist, memory_hist` from column `offset`
/// on: a column that cannot be read is the outer error, a histogram that is
/// not JSON the inner one.
fn read_totals(r: &rusqlite::Row<'_>, offset: usize) -> rusqlite::Result<Result<Totals, StoreError>> {
    let (cpu, memory): (String, String) = (r.get(offset + 5)?, r.get(offset + 6)?);
    let totals = (|| {
        Ok(Totals {
            calls: r.get::<_, i64>(offset)? as u64,
            limit_hits: r.get::<_, i64>(offset + 1)? as u64,
            bytes_written: r.get::<_, i64>(offset + 2)? as u64,
            security_events: r.get::<_, i64>(offset + 3)? as u64,
            cpu_ms_sum: r.get(offset + 4)?,
            cpu: serde_json::from_str(&cpu)?,
            memory: serde_json::from_str(&memory)?,
        })
    })();
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histograms_quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.add(f64::from(v));
        }
        for (q, exact) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let got = h.quantile(q).unwrap();
            assert!(got >= exact && got <= exact * 1.19, "{q}: {got} vs {exact}");
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
