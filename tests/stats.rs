//! `GET /v1/stats` (issue 17): usage over a window from the rollups kept in
//! the database, against the real server: the numbers match the calls made,
//! by every grouping, security events included; bad windows and groupings
//! are 400s, users get 403; the rollups survive a restart.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use server::TestServer;

fn group<'a>(stats: &'a Value, key: &str) -> &'a Value {
    stats["groups"].as_array().unwrap().iter().find(|g| g["key"] == key).unwrap_or_else(|| panic!("no {key}: {stats}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_count_every_call_and_security_event_by_every_grouping() {
    let srv = TestServer::start().await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let bob = srv.add_user("bob", "free", false).await;
    for _ in 0..3 {
        srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await;
    }
    srv.report("probe", &alice, json!({"input": {"op": "sleep", "ms": 5000}, "timeout_ms": 50})).await;
    srv.report("probe", &bob, json!({"input": {"op": "panic"}})).await;
    srv.report("probe", &bob, json!({"input": {"op": "work", "rounds": 3_000_000}})).await;
    // Two security events: a bad key and a user on an admin route.
    assert_eq!(srv.get("/v1/me", "ixs_nope").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(srv.get("/v1/audit", &bob).await.status, StatusCode::FORBIDDEN);

    let by_tool = srv.get("/v1/stats?window=1h&by=tool", &srv.admin).await;
    assert_eq!(by_tool.status, StatusCode::OK, "{}", String::from_utf8_lossy(&by_tool.body));
    let by_tool = by_tool.json();
    let totals = &by_tool["totals"];
    assert_eq!(totals["calls"], 6, "{by_tool}");
    assert_eq!(totals["errors"], 2);
    assert_eq!(totals["by_status"], json!({"ok": 4, "timeout": 1, "crashed": 1}));
    assert_eq!(totals["limit_hits"], 1);
    assert_eq!(totals["security_events"], 2);
    assert_eq!(totals["security_by_kind"], json!({"auth_failure": 1, "denied": 1}));
    let cpu = totals["cpu_ms"]["p99"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu < 60_000.0, "{totals}");
    assert!(totals["peak_memory_bytes"]["p50"].as_f64().unwrap() > 65536.0, "{totals}");
    assert_eq!(group(&by_tool, "probe")["calls"], 6);
    // One point per minute of the hour; the calls are in the last ones.
    let series = by_tool["series"].as_array().unwrap();
    assert_eq!(series.len(), 60);
    let calls: u64 = series.iter().map(|p| p["calls"].as_u64().unwrap()).sum();
    let errors: u64 = series.iter().map(|p| p["errors"].as_u64().unwrap()).sum();
    assert_eq!((calls, errors), (6, 2));

    let by_user = srv.get("/v1/stats?window=24h&by=user", &srv.admin).await.json();
    assert_eq!(group(&by_user, "alice")["calls"], 4);
    assert_eq!(group(&by_user, "alice")["limit_hits"], 1);
    assert_eq!(group(&by_user, "bob")["by_status"], json!({"ok": 1, "crashed": 1}));
    assert_eq!(group(&by_user, "bob")["security_events"], 1, "the admin route");
    assert_eq!(group(&by_user, "-")["security_events"], 1, "the unknown key: nobody to name");
    assert_eq!(by_user["series"].as_array().unwrap().len(), 24);
    let by_status = srv.get("/v1/stats?window=7d&by=status", &srv.admin).await.json();
    assert_eq!(group(&by_status, "ok")["calls"], 4);
    assert_eq!(by_status["series"].as_array().unwrap().len(), 168);
    // One user's rows only.
    let bobs = srv.get("/v1/stats?window=1h&by=tool&user=bob", &srv.admin).await.json();
    assert_eq!((bobs["user"].as_str(), bobs["totals"]["calls"].as_u64()), (Some("bob"), Some(2)), "{bobs}");
    assert_eq!(bobs["totals"]["security_events"], 1);
    assert_eq!(group(&bobs, "probe")["calls"], 2);
    let nobody = srv.get("/v1/stats?user=carol", &srv.admin).await.json();
    assert_eq!(nobody["totals"]["calls"], 0, "{nobody}");
    let by_tier = srv.get("/v1/stats?by=tier", &srv.admin).await.json();
    assert_eq!((by_tier["window"].as_str(), group(&by_tier, "free")["calls"].as_u64()), (Some("24h"), Some(2)));

    // Bad input: 400 naming what is allowed; a user: 403; no key: 401.
    for query in ["window=2h", "window=", "by=day", "limit=5", "user=a%2Fb", "user="] {
        let a = srv.get(&format!("/v1/stats?{query}"), &srv.admin).await;
        assert_eq!((a.status, a.error_code()), (StatusCode::BAD_REQUEST, "bad_query".to_owned()), "{query}");
    }
    assert!(
        srv.get("/v1/stats?window=2h", &srv.admin).await.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1h, 24h, 7d")
    );
    assert_eq!(srv.get("/v1/stats", &alice).await.status, StatusCode::FORBIDDEN);
    assert_eq!(srv.request(Method::GET, "/v1/stats", None, Bytes::new()).await.status, StatusCode::UNAUTHORIZED);

    // The rollups are in the database: a restarted server has them.
    let dir = srv.stop_keeping_data().await;
    let settings = imagentx_sandbox::api::ServerSettings {
        data_dir: dir.path().to_owned(),
        max_instances: 32,
        ..Default::default()
    };
    let again = TestServer::start_in(dir, Default::default(), settings).await;
    let after = again.get("/v1/stats?window=1h", &again.admin).await.json();
    assert_eq!(after["totals"]["calls"], 6, "{after}");
}

/// `GET /v1/live` lists a call while it runs (who, what, for how long) and
/// the pool's occupancy, and forgets it when it ends; users get 403.
#[tokio::test(flavor = "multi_thread")]
async fn live_lists_the_calls_in_flight_and_forgets_them_when_they_end() {
    let srv = std::sync::Arc::new(TestServer::start().await);
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let idle = srv.get("/v1/live", &srv.admin).await.json();
    assert_eq!((idle["in_flight"].as_u64(), idle["calls"].as_array().map(Vec::len)), (Some(0), Some(0)), "{idle}");
    assert_eq!(idle["capacity"], 32);
    assert!(idle["memory_budget_bytes"].as_u64().unwrap() > 0, "{idle}");

    let calling = {
        let (srv, alice) = (srv.clone(), alice.clone());
        tokio::spawn(async move { srv.report("probe", &alice, json!({"input": {"op": "sleep", "ms": 1500}})).await })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let live = loop {
        let live = srv.get("/v1/live", &srv.admin).await.json();
        if live["in_flight"] == 1 || std::time::Instant::now() > deadline {
            break live;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let call = &live["calls"][0];
    assert_eq!((call["user"].as_str(), call["tool"].as_str()), (Some("alice"), Some("probe")), "{live}");
    assert!(call["running_ms"].as_u64().unwrap() < 5000 && call["started"].as_str().unwrap().ends_with('Z'), "{live}");
    assert_eq!(calling.await.unwrap()["status"], "ok");
    let after = srv.get("/v1/live", &srv.admin).await.json();
    assert_eq!((after["in_flight"].as_u64(), after["calls"].as_array().map(Vec::len)), (Some(0), Some(0)), "{after}");
    assert_eq!(srv.get("/v1/live", &alice).await.status, StatusCode::FORBIDDEN);
}
