//! What the nodes sharing one PostgreSQL hold right now (issue 19): the
//! nodes alive, every call in flight on any of them, and every user's
//! request bucket, so that a tier's limits on calls at once and requests per
//! second are the tier's across the nodes, not the tier's times the nodes.
//!
//! Each admission is one statement on one row per user (`user_load`, or
//! `rate_buckets`): nodes admitting the same user's calls take turns on it,
//! so the cap is exact. The tables are UNLOGGED (no WAL: a commit does not
//! wait for a flush); a crash of the database empties them, and each node's
//! heartbeat ([`Live::heartbeat`]) writes back the calls it holds. A node
//! unseen for the lease is taken for dead and its calls' places are given
//! back; one that was only cut off writes its places back when it returns.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};

use super::StoreError;

/// The live state of the nodes sharing a PostgreSQL store
/// ([`super::Store::live`]).
#[derive(Clone)]
pub struct Live {
    pool: Pool,
    /// The heartbeat's own connection.
    beats: Pool,
}

/// What a heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Nodes alive, this one included.
    pub nodes: u32,
    /// This node's row was made anew: its first heartbeat, or the first
    /// after its row was lost (a crash of the database, or a lease that ran
    /// out while it was cut off); its places were written back.
    pub rejoined: bool,
    /// Nodes found dead (unseen for the lease) and removed by this heartbeat.
    pub reaped_nodes: Vec<String>,
    /// Places of dead nodes' calls given back by this heartbeat.
    pub reaped_places: u32,
}

/// The calls a node holds places for, as its heartbeat reads them.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// Calls admitted, and whose: written back if the node's row was lost.
    pub held: Vec<(String, String)>,
    /// Every call with a place, being admitted or held: a place of the node
    /// not among them is removed.
    pub keep: Vec<String>,
}

/// Taken by the node that gives dead nodes' places back: one at a time.
const REAP_LOCK: i64 = i64::from_be_bytes(*b"ixs:reap");

impl Live {
    pub(super) fn new(pool: Pool, beats: Pool) -> Self {
        Self { pool, beats }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Pool(e.to_string()))
    }

    /// Takes a place for call `call` of `user` on `node` if fewer than `cap`
    /// of `user`'s calls are in flight across the nodes: `Ok(Err(running))`
    /// when they are not.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn take_place(
        &self,
        call: &str,
        user: &str,
        node: &str,
        cap: u32,
    ) -> Result<Result<(), u32>, StoreError> {
        let client = self.client().await?;
        let cap = i32::try_from(cap).unwrap_or(i32::MAX);
        // The upsert locks the user's row: a second node admitting the same
        // user waits for this statement, then sees its count.
        let take = client
            .prepare_cached(
                "WITH up AS (
                     INSERT INTO user_load AS l (user_id, running) VALUES ($2, 1)
                     ON CONFLICT (user_id) DO UPDATE SET running = l.running + 1 WHERE l.running < $4
                     RETURNING running)
                 INSERT INTO places (call, user_id, node) SELECT $1, $2, $3 FROM up RETURNING 1",
            )
            .await?;
        if client.query_opt(&take, &[&call, &user, &node, &cap]).await?.is_some() {
            return Ok(Ok(()));
        }
        let count = client.prepare_cached("SELECT running FROM user_load WHERE user_id = $1").await?;
        let running: i32 = client.query_opt(&count, &[&user]).await?.map(|row| row.get(0)).unwrap_or(0);
        Ok(Err(u32::try_from(running).unwrap_or(0)))
    }

    /// Gives back call `call`'s place (nothing when it holds none).
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn give_place(&self, call: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let give = client
            .prepare_cached(
                "WITH gone AS (DELETE FROM places WHERE call = $1 RETURNING user_id)
                 UPDATE user_load l SET running = GREATEST(l.running - 1, 0) FROM gone WHERE l.user_id = gone.user_id",
            )
            .await?;
        client.execute(&give, &[&call]).await?;
        Ok(())
    }

    /// Takes a token from `user`'s bucket (`rate` per second, up to `burst`),
    /// by the database's clock: `Ok(Err(seconds))` until the next one when
    /// there is none.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn take_token(&self, user: &str, rate: f64, burst: f64) -> Result<Result<(), f64>, StoreError> {
        let client = self.client().await?;
        let take = client
            .prepare_cached(
                r#"INSERT INTO rate_buckets AS b (user_id, tokens, "at") VALUES ($1, $3::float8 - 1, clock_timestamp())
                   ON CONFLICT (user_id) DO UPDATE SET
                       tokens = LEAST($3, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b."at")::float8 * $2) - 1,
                       "at" = clock_timestamp()
                   WHERE LEAST($3, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b."at")::float8 * $2) >= 1
                   RETURNING tokens"#,
            )
            .await?;
        if client.query_opt(&take, &[&user, &rate, &burst]).await?.is_some() {
            return Ok(Ok(()));
        }
        let left = client
            .prepare_cached(
                r#"SELECT LEAST($3, tokens + EXTRACT(EPOCH FROM clock_timestamp() - "at")::float8 * $2)
                   FROM rate_buckets WHERE user_id = $1"#,
            )
            .await?;
        let tokens: f64 = client.query_opt(&left, &[&user, &rate, &burst]).await?.map(|row| row.get(0)).unwrap_or(0.0);
        Ok(Err(((1.0 - tokens) / rate).max(0.0)))
    }

    /// Says `node` (listening at `address`) is alive, and makes the store's
    /// places of its calls what it holds, as `held` reads them (called once
    /// the node's row is written, so that a call admitted after the read
    /// has a place newer than the row): a place of `node` older than the
    /// row's write whose call is not in `keep` is removed (its call ended
    /// while the database was out of reach); when the node's row was made
    /// anew ([`Beat::rejoined`]), the calls it holds are written back. Then
    /// removes the nodes unseen for `lease` (one node at a time does),
    /// giving their calls' places back.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn heartbeat(
        &self,
        node: &str,
        address: &str,
        held: impl FnOnce() -> Held,
        lease: Duration,
    ) -> Result<Beat, StoreError> {
        let client = self.beats.get().await.map_err(|e| StoreError::Pool(e.to_string()))?;
        let seen = client
            .prepare_cached(
                "INSERT INTO nodes (node, address) VALUES ($1, $2)
                 ON CONFLICT (node) DO UPDATE SET seen = clock_timestamp(), address = excluded.address
                 RETURNING extract(epoch FROM clock_timestamp())::float8, xmax = 0",
            )
            .await?;
        let row = client.query_one(&seen, &[&node, &address]).await?;
        let (written, rejoined): (f64, bool) = (row.get(0), row.get(1));
        let Held { held, keep } = held();
        let back: Vec<&(String, String)> = if rejoined { held.iter().collect() } else { Vec::new() };
        let (calls, users): (Vec<&str>, Vec<&str>) = back.iter().map(|(c, u)| (c.as_str(), u.as_str())).unzip();
        // Each user's count moves by the places added and removed here; a
        // place another statement removes first is not counted twice (a
        // DELETE skips a row deleted since its snapshot).
        let reconcile = client
            .prepare_cached(
                "WITH stale AS (
                     DELETE FROM places p
                     WHERE p.node = $1 AND NOT (p.call = ANY($4::text[])) AND p.since < to_timestamp($5)
                     RETURNING user_id),
                 back AS (
                     INSERT INTO places (call, user_id, node)
                     SELECT call, user_id, $1 FROM unnest($2::text[], $3::text[]) AS h(call, user_id)
                     ON CONFLICT (call) DO NOTHING RETURNING user_id),
                 delta AS (
                     SELECT user_id, sum(d)::int AS d
                     FROM (SELECT user_id, -1 AS d FROM stale UNION ALL SELECT user_id, 1 FROM back) x
                     GROUP BY user_id),
                 moved AS (
                     UPDATE user_load l SET running = GREATEST(l.running + delta.d, 0)
                     FROM delta WHERE l.user_id = delta.user_id RETURNING l.user_id)
                 INSERT INTO user_load AS l (user_id, running)
                 SELECT user_id, d FROM delta WHERE d > 0 AND user_id NOT IN (SELECT user_id FROM moved)
                 ON CONFLICT (user_id) DO UPDATE SET running = l.running + excluded.running",
            )
            .await?;
        client.execute(&reconcile, &[&node, &calls, &users, &keep, &written]).await?;
        let (reaped_nodes, reaped_places) = reap(&client, None, lease).await?;
        let count = client.prepare_cached("SELECT count(*) FROM nodes").await?;
        let nodes: i64 = client.query_one(&count, &[]).await?.get(0);
        Ok(Beat { nodes: u32::try_from(nodes).unwrap_or(u32::MAX), rejoined, reaped_nodes, reaped_places })
    }

    /// Removes `node` and whatever places it still holds: a node stopping
    /// after its calls ended.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn leave(&self, node: &str, lease: Duration) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Waits for a reap in progress: the reap below then takes the lock again.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&REAP_LOCK]).await?;
        reap(&tx, Some(node), lease).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The nodes alive, as (node, address), oldest first.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn nodes(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT node, address FROM nodes ORDER BY started, node").await?;
        Ok(client.query(&stmt, &[]).await?.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// `user`'s calls in flight across the nodes, as the store counts them.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn running(&self, user: &str) -> Result<u32, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT running FROM user_load WHERE user_id = $1").await?;
        let running: i32 = client.query_opt(&stmt, &[&user]).await?.map(|row| row.get(0)).unwrap_or(0);
        Ok(u32::try_from(running).unwrap_or(0))
    }
}

/// Where an open code session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    pub node: String,
    /// The tool the session runs.
    pub tool: String,
    /// Where the node can be reached; `None` when it is no longer alive.
    pub address: Option<String>,
}

/// An open code session whose node is no longer alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub id: String,
    pub user: String,
    pub tool: String,
}

// Code sessions' nodes.
impl Live {
    /// Records that `node` holds session `id`.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn own_session(&self, id: &str, node: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("UPDATE sessions SET node = $2 WHERE id = $1").await?;
        client.execute(&stmt, &[&id, &node]).await?;
        Ok(())
    }

    /// The node holding session `id` of `user`, if it is open and has one.
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn session_home(&self, id: &str, user: &str) -> Result<Option<Home>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT s.node, s.tool, n.address FROM sessions s LEFT JOIN nodes n ON n.node = s.node
                 WHERE s.id = $1 AND s.user_id = $2 AND s.closed_at IS NULL AND s.node IS NOT NULL",
            )
            .await?;
        let row = client.query_opt(&stmt, &[&id, &user]).await?;
        Ok(row.map(|row| Home { node: row.get(0), tool: row.get(1), address: row.get(2) }))
    }

    /// The open sessions of `nodes` (nodes found dead).
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn sessions_of(&self, nodes: &[String]) -> Result<Vec<Orphan>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT id, user_id, tool FROM sessions WHERE closed_at IS NULL AND node = ANY($1::text[])")
            .await?;
        let rows = client.query(&stmt, &[&nodes]).await?;
        Ok(rows.iter().map(|row| Orphan { id: row.get(0), user: row.get(1), tool: row.get(2) }).collect())
    }
}

/// Removes the nodes unseen for `lease` (and `leaving`, if given) and the
/// places of every call not on a node alive, fixing their users' counts;
/// answers the nodes removed and the places given back. One node at a time
/// reaps ([`REAP_LOCK`]): while another does, this one does nothing.
async fn reap(
    client: &impl deadpool_postgres::GenericClient,
    leaving: Option<&str>,
    lease: Duration,
) -> Result<(Vec<String>, u32), StoreError> {
    let stmt = client
        .prepare_cached(
            "WITH turn AS (SELECT pg_try_advisory_xact_lock($3) AS mine),
             cutoff AS (SELECT clock_timestamp() - make_interval(secs => $2) AS at),
             dead AS (
                 DELETE FROM nodes
                 WHERE (SELECT mine FROM turn) AND (node = $1 OR seen < (SELECT at FROM cutoff))
                 RETURNING node),
             gone AS (
                 DELETE FROM places p WHERE (SELECT mine FROM turn) AND NOT EXISTS (
                     SELECT 1 FROM nodes n
                     WHERE n.node = p.node AND n.node IS DISTINCT FROM $1 AND n.seen >= (SELECT at FROM cutoff))
                 RETURNING user_id),
             lost AS (SELECT user_id, count(*)::int AS n FROM gone GROUP BY user_id),
             fixed AS (
                 UPDATE user_load l SET running = GREATEST(l.running - lost.n, 0)
                 FROM lost WHERE l.user_id = lost.user_id)
             SELECT coalesce((SELECT array_agg(node) FROM dead), '{}'), (SELECT count(*) FROM gone)::int",
        )
        .await?;
    let row = client.query_one(&stmt, &[&leaving, &lease.as_secs_f64(), &REAP_LOCK]).await?;
    let (nodes, places): (Vec<String>, i32) = (row.get(0), row.get(1));
    Ok((nodes, u32::try_from(places).unwrap_or(0)))
}
