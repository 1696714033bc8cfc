//! The store's two backends side by side (issue 19): executions recorded per
//! second, each with its audit record, by `in_flight` writers at once — on
//! the SQLite file (one writer thread, group commit), and on PostgreSQL from
//! one node and from three (three stores on one database, as three `serve`
//! processes hold them: the audit chain's advisory lock taken by all). The
//! peer, on the same server in the same run: plain one-row commits of the
//! same reports with no chain to extend, from as many connections as a
//! store's pool — what per-node chains could reach at best.

use std::sync::Arc;
use std::time::Instant;

use super::postgres::Server;
use super::{Harness, Suite};
use crate::audit::{AuditEvent, Kind};
use crate::policy::UserId;
use crate::store::Store;

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let (executions, in_flight) = h.size.pick((20_000, 100), (4_000, 100), (400, 20));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let dir = tempfile::tempdir_in(h.scratch.path())?;
    let sqlite = Arc::new(Store::open(&dir.path().join("sandbox.db"))?);
    let rate = runtime.block_on(record(&[sqlite], executions, in_flight))?;
    let what = format!("{executions} executions, {in_flight} in flight");
    h.figure(Suite::Ops, format!("store: executions recorded/s, SQLite ({what})"), rate, "/s", "");
    let server = match runtime.block_on(Server::start()) {
        Ok(server) => server,
        Err(e) => {
            h.skip(format!("the store on PostgreSQL: {e:#}"));
            return Ok(());
        }
    };
    for nodes in [1, 3] {
        let rate = runtime.block_on(async {
            let url = server.database().await?;
            let mut stores = Vec::new();
            for _ in 0..nodes {
                stores.push(Arc::new(Store::connect(&url).await?));
            }
            record(&stores, executions, in_flight).await
        })?;
        h.figure(
            Suite::Ops,
            format!("store: executions recorded/s, PostgreSQL, {nodes} node(s) ({what})"),
            rate,
            "/s",
            "",
        );
    }
    // What exact limits across the nodes cost a call: a token from the
    // user's bucket, a place among the user's calls, the place given back.
    for (nodes, in_flight) in [(1, 1), (1, in_flight), (3, in_flight)] {
        let calls = if in_flight == 1 { executions / 10 } else { executions };
        let (rate, p50_us) = runtime.block_on(async {
            let url = server.database().await?;
            let mut stores = Vec::new();
            for _ in 0..nodes {
                stores.push(Arc::new(Store::connect(&url).await?));
            }
            admissions(&stores, calls, in_flight).await
        })?;
        let what = format!("{calls} calls, {in_flight} in flight, one user each");
        h.figure(
            Suite::Ops,
            format!("store: calls admitted/s across nodes (token, place, place back), {nodes} node(s) ({what})"),
            rate,
            "/s",
            &format!("median {p50_us:.0} µs a call"),
        );
    }
    let rate = runtime.block_on(plain_commits(&server, executions, in_flight))?;
    h.figure(Suite::Ops, format!("peer: plain one-row commits/s, same PostgreSQL ({what})"), rate, "/s", "");
    Ok(())
}

/// Records `executions` through `stores` in turn from `in_flight` tasks;
/// checks the chain holds every one; answers executions per second.
async fn record(stores: &[Arc<Store>], executions: usize, in_flight: usize) -> anyhow::Result<f64> {
    stores[0].add_user(UserId::new("bench")?, "standard".into(), false, "bench".into()).await?;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for first in 0..in_flight {
        let store = Arc::clone(&stores[first % stores.len()]);
        set.spawn(async move {
            for _ in (first..executions).step_by(in_flight) {
                let (report, json) = super::ops::execution("bench")?;
                let event = AuditEvent::new(Kind::Execution, "ok").actor("bench").user("bench").tool("python");
                store.record_execution(&report, json.into(), Some(1), None, vec![event]).await?;
            }
            anyhow::Ok(())
        });
    }
    set.join_all().await.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let rate = executions as f64 / started.elapsed().as_secs_f64();
    let scratch = tempfile::tempdir()?;
    let check = stores[0].verify_audit(&scratch.path().join("no-archive")).await?;
    // The user and its key, then one record per execution.
    anyhow::ensure!(
        check.first_broken.is_none() && check.records == executions as u64 + 2,
        "the chain after the run: {check:?}"
    );
    for store in stores {
        store.close();
    }
    Ok(rate)
}

/// `calls` admissions through `stores` in turn from `in_flight` tasks, each
/// the calls of a user of its own: a token, a place, the place given back, as
/// `serve` takes them for a call on a shared store. Answers calls per second
/// and the median time of one call's three statements.
async fn admissions(stores: &[Arc<Store>], calls: usize, in_flight: usize) -> anyhow::Result<(f64, f64)> {
    let lives: Vec<_> = stores.iter().filter_map(|s| s.live()).collect();
    anyhow::ensure!(lives.len() == stores.len(), "not PostgreSQL stores");
    for (i, live) in lives.iter().enumerate() {
        let held = crate::store::Held::default;
        live.heartbeat(&format!("bench-{i}"), "bench", held, std::time::Duration::from_secs(60)).await?;
    }
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for first in 0..in_flight {
        let (node, live) = (format!("bench-{}", first % lives.len()), lives[first % lives.len()].clone());
        set.spawn(async move {
            let user = format!("user-{first}");
            let mut took = Vec::new();
            for n in (first..calls).step_by(in_flight) {
                let one = Instant::now();
                let call = format!("{node}#{n}");
                anyhow::ensure!(live.take_token(&user, 1e6, 2e6).await?.is_ok(), "a token refused");
                anyhow::ensure!(live.take_place(&call, &user, &node, 1000).await?.is_ok(), "a place refused");
                live.give_place(&call).await?;
                took.push(one.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(took)
        });
    }
    let mut took: Vec<f64> = set.join_all().await.into_iter().collect::<anyhow::Result<Vec<_>>>()?.concat();
    let rate = calls as f64 / started.elapsed().as_secs_f64();
    took.sort_by(f64::total_cmp);
    let p50 = took.get(took.len() / 2).copied().unwrap_or(0.0);
    for store in stores {
        store.close();
    }
    Ok((rate, p50))
}

/// `executions` one-row commits of the same reports into a plain table,
/// from `in_flight` tasks sharing a pool as large as a store's.
async fn plain_commits(server: &Server, executions: usize, in_flight: usize) -> anyhow::Result<f64> {
    let url = server.database().await?;
    let config: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager).max_size(16).build()?;
    pool.get().await?.batch_execute("CREATE TABLE plain (id TEXT PRIMARY KEY, report TEXT NOT NULL)").await?;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for first in 0..in_flight {
        let pool = pool.clone();
        set.spawn(async move {
            for _ in (first..executions).step_by(in_flight) {
                let (report, json) = super::ops::execution("bench")?;
                let client = pool.get().await?;
                let json = String::from_utf8(json)?;
                client.execute("INSERT INTO plain (id, report) VALUES ($1, $2)", &[&report.id, &json]).await?;
            }
            anyhow::Ok(())
        });
    }
    set.join_all().await.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(executions as f64 / started.elapsed().as_secs_f64())
}
