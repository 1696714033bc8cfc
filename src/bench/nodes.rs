//! Calls over HTTP with the store on PostgreSQL from one, two and three
//! `serve` processes on this host (issue 19), beside one node on SQLite, in
//! the same run: keep-alive clients spread over the nodes as a load balancer
//! spreads them, the trivial SDK tool, every call recorded with its audit
//! record. The nodes share the machine's two cores with each other and with
//! the database, so what the rows show is what the database costs, not how
//! nodes on hosts of their own would scale; pg_stat_statements (loaded by
//! [`Server`]) says what each call cost the database: statements, and their
//! time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http::{self, Server as Node};
use super::postgres::Server;
use super::{Harness, Series, Suite, Who};

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let clients = h.size.pick(100, 100, 4);
    let window = Duration::from_secs_f64(h.size.pick(5.0, 2.0, 0.3));
    let scratch = h.scratch.path().join("nodes");

    let dir = scratch.join("sqlite");
    std::fs::create_dir_all(&dir)?;
    let config = http::write_config(&dir, "")?;
    let (admin, key) = http::add_users(&dir, &config)?;
    let node = http::serve(&dir, &config, None)?;
    let nodes = std::slice::from_ref(&node);
    let (samples, elapsed) = rt.block_on(async {
        ready(h, nodes, &admin, &key).await?;
        anyhow::Ok(load(nodes, &key, clients, window).await)
    })?;
    let case = format!("HTTP calls, trivial SDK tool, SQLite store, 1 node, {clients} clients");
    h.push(Series { samples, elapsed, ..Series::new(Suite::Ops, case, Who::Ours, clients) });
    drop(node);

    let server = match rt.block_on(Server::start()) {
        Ok(server) => server,
        Err(e) => {
            h.skip(format!("HTTP calls on PostgreSQL: {e:#}"));
            return Ok(());
        }
    };
    for n in 1..=3 {
        let url = rt.block_on(server.database())?;
        let env = [("IMAGENTX_STORE_URL", url.as_str())];
        let dirs: Vec<_> = (0..n).map(|i| scratch.join(format!("pg{n}-node{i}"))).collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
        }
        let config = http::write_config(&dirs[0], "")?;
        let (admin, key) = http::add_users_with(&dirs[0], &config, &env)?;
        let nodes =
            dirs.iter().map(|dir| http::serve_with(dir, &config, None, &env)).collect::<anyhow::Result<Vec<_>>>()?;
        let (db, connection) = rt.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))?;
        rt.spawn(connection);
        let stats = rt.block_on(db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")).is_ok();
        let (samples, elapsed) = rt.block_on(async {
            ready(h, &nodes, &admin, &key).await?;
            if stats {
                db.batch_execute("SELECT pg_stat_statements_reset()").await?;
            }
            anyhow::Ok(load(&nodes, &key, clients, window).await)
        })?;
        let ok = samples.iter().filter(|s| s.ok).count().max(1) as f64;
        if stats {
            let row = rt.block_on(db.query_one(
                "SELECT coalesce(sum(calls), 0)::float8, coalesce(sum(total_exec_time), 0)::float8
                 FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            ))?;
            let (statements, ms): (f64, f64) = (row.get(0), row.get(1));
            let what = format!("PostgreSQL, {n} node(s), from pg_stat_statements");
            h.figure(Suite::Ops, format!("database statements per HTTP call ({what})"), statements / ok, "", "");
            h.figure(Suite::Ops, format!("database time per HTTP call ({what})"), 1000.0 * ms / ok, "µs", "");
        }
        let case = format!("HTTP calls, trivial SDK tool, PostgreSQL store, {n} node(s), {clients} clients");
        h.push(Series { samples, elapsed, ..Series::new(Suite::Ops, case, Who::Ours, clients) });
    }
    Ok(())
}

/// Registers the trivial tool on the first node and waits until every node
/// runs it (the others load it from the store).
async fn ready(h: &Harness, nodes: &[Node], admin: &str, key: &str) -> anyhow::Result<()> {
    http::register_trivial(h, &nodes[0].addr, admin).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in nodes {
        let mut sender = None;
        while !http::call_trivial(&mut sender, &node.addr, key).await {
            anyhow::ensure!(Instant::now() < deadline, "{} never ran the tool", node.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// `clients` keep-alive clients call the trivial tool for `window`, client
/// `i` on node `i % nodes` (a closed loop).
async fn load(nodes: &[Node], key: &str, clients: usize, window: Duration) -> (Vec<super::Sample>, Duration) {
    let key: Arc<str> = key.into();
    let started = Instant::now();
    let until = started + window;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..clients {
        let (addr, key): (Arc<str>, _) = (nodes[i % nodes.len()].addr.as_str().into(), key.clone());
        set.spawn(async move {
            let mut samples = Vec::new();
            let mut sender = None;
            while Instant::now() < until {
                let t = Instant::now();
                let ok = http::call_trivial(&mut sender, &addr, &key).await;
                samples.push(super::Sample { latency: t.elapsed(), ok });
            }
            samples
        });
    }
    let samples = set.join_all().await.into_iter().flatten().collect();
    (samples, started.elapsed())
}
