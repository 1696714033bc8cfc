//! Code sessions (`/v1/sessions`) on a real server with the real interpreters
//! (CPython and SpiderMonkey components): state that lives between steps, and
//! every way a session ends — closed, idle, past a limit, the server stopping
//! or killed — with what it held given back.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use imagentx_sandbox::api::ServerSettings;
use imagentx_sandbox::policy::{Policy, Tier};
use serde_json::{Value, json};
use server::{Answer, TestServer};

/// A server with the built interpreters registered, on the tests' shared
/// artifact cache.
async fn serve(policy: Policy, tweak: impl FnOnce(&mut ServerSettings)) -> TestServer {
    let dir = common::interpreters::built_dir();
    TestServer::start_with(policy, |s| {
        s.interpreters_dir = dir;
        s.artifact_cache_dir = Some(common::artifact_cache());
        tweak(s);
    })
    .await
}

/// The default policy with one more tier, `lab`: standard's limits but the
/// given memory and sessions at once.
fn lab_policy(memory_bytes: u64, sessions: u32) -> Policy {
    let mut policy = Policy::default();
    let lab = Tier { memory_bytes, sessions, ..policy.tiers["standard"].clone() };
    policy.tiers.insert("lab".into(), lab);
    policy
}

async fn open(srv: &TestServer, key: &str, body: Value) -> Answer {
    srv.request(Method::POST, "/v1/sessions", Some(key), body.to_string()).await
}

/// Opens a session and answers its id.
async fn open_ok(srv: &TestServer, key: &str, tool: &str) -> String {
    let a = open(srv, key, json!({"tool": tool})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&a.body));
    a.json()["id"].as_str().unwrap().to_owned()
}

async fn step(srv: &TestServer, key: &str, id: &str, body: Value) -> Answer {
    srv.request(Method::POST, &format!("/v1/sessions/{id}/run"), Some(key), body.to_string()).await
}

/// Runs `code` as a step that must come back `ok`; answers its output.
async fn step_ok(srv: &TestServer, key: &str, id: &str, code: &str) -> Value {
    let a = step(srv, key, id, json!({"code": code})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
    let report = a.json();
    assert_eq!(report["status"], "ok", "{code}: {report}");
    assert_eq!(report["session"], id, "{report}");
    report["output"].clone()
}

async fn show(srv: &TestServer, key: &str, id: &str) -> Value {
    let a = srv.get(&format!("/v1/sessions/{id}"), key).await;
    assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
    a.json()
}

/// A gauge or counter of `/metrics`.
async fn metric(srv: &TestServer, name: &str) -> f64 {
    let text = String::from_utf8(srv.get("/metrics", "").await.body.to_vec()).unwrap();
    let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits until `check` holds, for at most `within`.
async fn eventually(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn variables_imports_and_data_persist_between_steps_in_both_languages() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let csv = "region,amount\nnorth,10\nsouth,5\nnorth,7\n";
    let put = srv.request(Method::PUT, "/v1/files/sales.csv", Some(&alice), csv).await;
    assert_eq!(put.status, StatusCode::OK);

    let py = open_ok(&srv, &alice, "python").await;
    assert_eq!(
        step_ok(&srv, &alice, &py, "import csv\nrows = list(csv.DictReader(open('/data/sales.csv')))").await,
        json!({"stdout": ""})
    );
    let out = step_ok(
        &srv,
        &alice,
        &py,
        "totals = {}\nfor r in rows:\n    totals[r['region']] = totals.get(r['region'], 0) + int(r['amount'])\ntotals",
    )
    .await;
    assert_eq!(out, json!({"stdout": "", "result": {"north": 17, "south": 5}}));
    // `result =` still wins over the last expression; a value JSON cannot
    // carry comes back as its repr.
    let out = step_ok(&srv, &alice, &py, "print(len(rows))\nresult = sorted(totals)\ntotals").await;
    assert_eq!(out, json!({"stdout": "3\n", "result": ["north", "south"]}));
    assert_eq!(step_ok(&srv, &alice, &py, "csv.QUOTE_ALL, {1}").await["result"], json!("(1, {1})"));
    // An exception is the step's tool_error, and the session goes on.
    let a = step(&srv, &alice, &py, json!({"code": "rows[99]"})).await.json();
    assert_eq!(a["status"], "tool_error", "{a}");
    assert!(a["error"].as_str().unwrap().contains("IndexError"), "{a}");
    let a = step(&srv, &alice, &py, json!({"code": "len(rows) * args['k']", "args": {"k": 3}})).await.json();
    assert_eq!(a["output"]["result"], json!(9), "args are per step: {a}");
    assert_eq!(step_ok(&srv, &alice, &py, "args").await["result"], json!({}));

    let js = open_ok(&srv, &alice, "javascript").await;
    step_ok(&srv, &alice, &js, "const fs = require('fs');\nlet text = fs.readFileSync('/data/sales.csv', 'utf8');")
        .await;
    step_ok(&srv, &alice, &js, "class Row { constructor(l) { [this.region, this.amount] = l.split(','); } }").await;
    let out = step_ok(
        &srv,
        &alice,
        &js,
        "const rows = text.trim().split('\\n').slice(1).map((l) => new Row(l));\nrows.length",
    )
    .await;
    assert_eq!(out["result"], json!(3));
    let out = step_ok(&srv, &alice, &js, "function total(r) { return rows.filter((x) => x.region === r).reduce((s, x) => s + Number(x.amount), 0) }\ntotal('north')").await;
    assert_eq!(out["result"], json!(17));
    let out = step_ok(&srv, &alice, &js, "let result = {south: total('south')}; 42").await;
    assert_eq!(out["result"], json!({"south": 5}), "`result` wins over the completion value");
    assert_eq!(step_ok(&srv, &alice, &js, "console.log('n', rows.length)").await, json!({"stdout": "n 3\n"}));

    // The session says what it holds, and each step is an execution of its own.
    let info = show(&srv, &alice, &py).await;
    assert_eq!((info["state"].as_str(), info["steps"].as_u64()), (Some("idle"), Some(7)), "{info}");
    assert!(info["memory_bytes"].as_u64().unwrap() > 1 << 20, "{info}");
    let listed = srv.get("/v1/sessions", &alice).await.json();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 2, "{listed}");
    let executions = srv.get("/v1/executions?limit=1", &alice).await.json();
    let last = executions["executions"][0]["id"].as_str().unwrap();
    let report = srv.get(&format!("/v1/executions/{last}"), &alice).await.json();
    assert_eq!(report["session"], js.as_str());
    assert!(metric(&srv, "imagentx_sessions_memory_bytes").await > 0.0);
    assert_eq!(metric(&srv, "imagentx_sessions_open").await, 2.0);

    // The audit trail: opened, each step linked to its session, closed and why.
    for id in [&py, &js] {
        let closed = srv.request(Method::DELETE, &format!("/v1/sessions/{id}"), Some(&alice), "").await.json();
        assert_eq!((closed["state"].as_str(), closed["reason"].as_str()), (Some("ended"), Some("user")), "{closed}");
    }
    let audit = srv.get("/v1/audit?user=alice&limit=100", &srv.admin).await.json();
    let records = audit["records"].as_array().unwrap();
    let of = |kind: &str| records.iter().filter(|r| r["kind"] == kind).collect::<Vec<_>>();
    assert_eq!(of("session_opened").len(), 2, "{audit}");
    let closed = of("session_closed");
    assert_eq!(closed.len(), 2, "{audit}");
    assert!(closed.iter().all(|r| r["outcome"] == "user" && r["detail"]["steps"].as_u64().unwrap() >= 6), "{audit}");
    let steps = of("execution").into_iter().filter(|r| r["detail"]["session"] == py.as_str()).count();
    assert_eq!(steps, 7, "{audit}");
    assert_eq!(metric(&srv, "imagentx_sessions_open").await, 0.0);
    assert_eq!(metric(&srv, "imagentx_guest_memory_bytes").await, 0.0, "the sessions' memory came back");
}

/// One-shot calls have the same rule: the last expression is the result.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_shot_call_answers_its_last_expression_too() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "free", false).await;
    for (tool, code, want) in [
        ("python", "x = [3, 1, 2]\nsorted(x)", json!([1, 2, 3])),
        ("python", "result = 'set'\n'last'", json!("set")),
        ("javascript", "const xs = [3, 1, 2];\nxs.sort()", json!([1, 2, 3])),
        ("javascript", "let result = 'set'; 'last'", json!("set")),
    ] {
        let report = srv.report(tool, &alice, json!({"input": {"code": code}})).await;
        assert_eq!(report["output"]["result"], want, "{tool}: {code}: {report}");
    }
    // A print as the last line is no result, in both.
    let report = srv.report("python", &alice, json!({"input": {"code": "print(1)"}})).await;
    assert_eq!(report["output"], json!({"stdout": "1\n"}));
    let report = srv.report("javascript", &alice, json!({"input": {"code": "console.log(1)"}})).await;
    assert_eq!(report["output"], json!({"stdout": "1\n"}));
    // The input schema tells the model so.
    let tools = srv.get("/v1/tools", &alice).await.json();
    for t in tools["tools"].as_array().unwrap() {
        let described = t["input_schema"]["properties"]["code"]["description"].as_str().unwrap_or_default();
        assert!(described.contains("last expression"), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_users_session_is_answered_like_one_that_does_not_exist() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let bob = srv.add_user("bob", "standard", false).await;
    let id = open_ok(&srv, &alice, "python").await;
    step_ok(&srv, &alice, &id, "secret = 'alice'").await;
    let missing = "ses_00000000000000000000000000000000";
    for target in [id.as_str(), missing] {
        let run = step(&srv, &bob, target, json!({"code": "secret"})).await;
        let look = srv.get(&format!("/v1/sessions/{target}"), &bob).await;
        let close = srv.request(Method::DELETE, &format!("/v1/sessions/{target}"), Some(&bob), "").await;
        for a in [&run, &look, &close] {
            assert_eq!((a.status, a.error_code()), (StatusCode::NOT_FOUND, "unknown_session".into()), "{target}");
        }
    }
    assert_eq!(srv.get("/v1/sessions", &bob).await.json()["sessions"], json!([]));
    assert_eq!(step_ok(&srv, &alice, &id, "secret").await["result"], "alice", "alice's session is untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_spins_ends_the_session_with_its_status_and_the_place_is_free_again() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "free", false).await;
    for tool in ["python", "javascript"] {
        let id = open_ok(&srv, &alice, tool).await;
        let spin = if tool == "python" { "while True: pass" } else { "while (true) {}" };
        let report = step(&srv, &alice, &id, json!({"code": spin, "timeout_ms": 500})).await.json();
        let status = report["status"].as_str().unwrap().to_owned();
        assert!(["cpu_limit", "timeout"].contains(&status.as_str()), "{report}");
        let after = step(&srv, &alice, &id, json!({"code": "1"})).await;
        assert_eq!((after.status, after.error_code()), (StatusCode::GONE, "session_ended".into()));
        assert!(after.json()["error"]["message"].as_str().unwrap().contains("stopped"), "{}", after.json());
        let info = show(&srv, &alice, &id).await;
        assert_eq!((info["state"].as_str(), info["reason"].as_str()), (Some("ended"), Some(status.as_str())));
        // The free tier's one place is free again: the next session opens.
    }
    srv.assert_healthy().await;
    assert_eq!(metric(&srv, "imagentx_guest_memory_bytes").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_grown_step_by_step_is_stopped_on_the_step_that_crosses_the_tier() {
    let srv = serve(lab_policy(96 << 20, 1), |_| {}).await;
    let alice = srv.add_user("alice", "lab", false).await;
    let id = open_ok(&srv, &alice, "python").await;
    step_ok(&srv, &alice, &id, "held = []").await;
    let mut last = show(&srv, &alice, &id).await["memory_bytes"].as_u64().unwrap();
    let mut stopped = None;
    for n in 1..=10 {
        let report =
            step(&srv, &alice, &id, json!({"code": "held.append(bytearray(16 << 20))\nlen(held)"})).await.json();
        if report["status"] == "ok" {
            assert_eq!(report["output"]["result"], json!(n));
            let now = show(&srv, &alice, &id).await["memory_bytes"].as_u64().unwrap();
            assert!(now > last, "memory grew: {last} -> {now}");
            last = now;
        } else {
            stopped = Some((n, report));
            break;
        }
    }
    let (n, report) = stopped.expect("the tier's 96 MiB stopped the session");
    assert!(n >= 2, "the first steps fit: {report}");
    assert_eq!(report["status"], "memory_limit", "{report}");
    assert!(last <= 96 << 20);
    let info = show(&srv, &alice, &id).await;
    assert_eq!(info["reason"], "memory_limit", "{info}");
    assert_eq!(metric(&srv, "imagentx_guest_memory_bytes").await, 0.0, "the instance's memory came back");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_is_closed_on_time_and_its_place_reused() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "free", false).await;
    let a = open(&srv, &alice, json!({"tool": "javascript", "idle_timeout_s": 1})).await;
    assert_eq!(a.status, StatusCode::CREATED);
    let id = a.json()["id"].as_str().unwrap().to_owned();
    step_ok(&srv, &alice, &id, "var kept = 1").await;
    // A step resets the idle clock; then nothing for a second closes it.
    let idle_since = Instant::now();
    eventually(Duration::from_secs(5), "the idle close", async || show(&srv, &alice, &id).await["state"] == "ended")
        .await;
    let waited = idle_since.elapsed();
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(3), "closed after {waited:?}");
    assert_eq!(show(&srv, &alice, &id).await["reason"], "idle");
    let after = step(&srv, &alice, &id, json!({"code": "kept"})).await;
    assert_eq!(after.status, StatusCode::GONE);
    assert!(after.json()["error"]["message"].as_str().unwrap().contains("idle"));
    open_ok(&srv, &alice, "javascript").await;
}

/// A session in use all the time still ends at its tier's lifetime.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_session_ends_at_its_tiers_lifetime() {
    let mut policy = lab_policy(256 << 20, 1);
    policy.tiers.get_mut("lab").unwrap().session_lifetime_s = 1;
    let srv = serve(policy, |_| {}).await;
    let alice = srv.add_user("alice", "lab", false).await;
    let id = open_ok(&srv, &alice, "python").await;
    let opened = Instant::now();
    let mut last = StatusCode::OK;
    while opened.elapsed() < Duration::from_secs(4) {
        last = step(&srv, &alice, &id, json!({"code": "1"})).await.status;
        if last != StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lived = opened.elapsed();
    assert_eq!(last, StatusCode::GONE, "still open after {lived:?}");
    assert!(lived >= Duration::from_secs(1) && lived < Duration::from_secs(3), "ended after {lived:?}");
    assert_eq!(show(&srv, &alice, &id).await["reason"], "lifetime");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tiers_session_cap_is_a_429_naming_it_and_sessions_cannot_starve_calls() {
    // 8 instances: sessions may hold at most 4 of them.
    let srv = serve(Policy::default(), |s| s.max_instances = 8).await;
    let free = srv.add_user("freda", "free", false).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let bob = srv.add_user("bob", "premium", false).await;
    open_ok(&srv, &free, "python").await;
    let over = open(&srv, &free, json!({"tool": "python"})).await;
    assert_eq!((over.status, over.error_code()), (StatusCode::TOO_MANY_REQUESTS, "user_sessions".into()));
    assert!(over.json()["error"]["message"].as_str().unwrap().contains("sessions = 1"), "{}", over.json());
    assert!(over.headers.contains_key("retry-after"));
    for _ in 0..3 {
        open_ok(&srv, &alice, "javascript").await;
    }
    // The server's 4 session slots are taken: bob is refused a session...
    let full = open(&srv, &bob, json!({"tool": "javascript"})).await;
    assert_eq!((full.status, full.error_code()), (StatusCode::TOO_MANY_REQUESTS, "server_busy".into()));
    // ...but his one-shot calls still run, four at once.
    let calls = (0..4).map(|_| srv.invoke("javascript", &bob, json!({"input": {"code": "1 + 1"}})));
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.json()["output"]["result"], 2, "{}", answer.json());
    }
    assert_eq!(metric(&srv, "imagentx_sessions_open").await, 4.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_steps_at_once_the_second_is_refused_409_and_delete_stops_a_running_step() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let id = open_ok(&srv, &alice, "python").await;
    let started = Instant::now();
    let slow = step(&srv, &alice, &id, json!({"code": "import time\ntime.sleep(8)", "timeout_ms": 10_000}));
    let (slow, others) = tokio::join!(slow, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = step(&srv, &alice, &id, json!({"code": "1"})).await;
        let running = show(&srv, &alice, &id).await;
        let deleted = srv.request(Method::DELETE, &format!("/v1/sessions/{id}"), Some(&alice), "").await;
        (second, running, deleted)
    });
    let (second, running, deleted) = others;
    assert_eq!((second.status, second.error_code()), (StatusCode::CONFLICT, "session_busy".into()));
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(deleted.json()["reason"], "user", "{}", deleted.json());
    let slow = slow.json();
    assert_eq!(slow["status"], "cancelled", "{slow}");
    assert!(started.elapsed() < Duration::from_secs(4), "DELETE stopped the step: {:?}", started.elapsed());
    assert_eq!(step(&srv, &alice, &id, json!({"code": "1"})).await.status, StatusCode::GONE);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_tmp_is_its_own_and_is_removed_when_it_closes() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let one = open_ok(&srv, &alice, "python").await;
    let two = open_ok(&srv, &alice, "python").await;
    step_ok(&srv, &alice, &one, "open('/tmp/marker-of-one', 'w').write('mine')").await;
    assert_eq!(step_ok(&srv, &alice, &one, "open('/tmp/marker-of-one').read()").await["result"], "mine");
    assert_eq!(step_ok(&srv, &alice, &two, "import os\nos.listdir('/tmp')").await["result"], json!([]));
    let scratch = srv.dir.path().join("scratch");
    let holding = || {
        std::fs::read_dir(&scratch)
            .unwrap()
            .filter(|d| d.as_ref().unwrap().path().join("marker-of-one").exists())
            .count()
    };
    assert_eq!(holding(), 1);
    srv.request(Method::DELETE, &format!("/v1/sessions/{one}"), Some(&alice), "").await;
    assert_eq!(holding(), 0, "the session's /tmp outlived it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_abandoned_sessions_leave_nothing_behind_after_their_idle_timeout() {
    let srv = serve(lab_policy(256 << 20, 100), |s| s.max_instances = 256).await;
    let alice = srv.add_user("alice", "lab", false).await;
    for i in 0..100 {
        let tool = if i % 2 == 0 { "javascript" } else { "python" };
        let a = open(&srv, &alice, json!({"tool": tool, "idle_timeout_s": 1})).await;
        assert_eq!(a.status, StatusCode::CREATED, "session {i}: {}", String::from_utf8_lossy(&a.body));
        let id = a.json()["id"].as_str().unwrap().to_owned();
        // Python keeps a file open in the session's /tmp: a descriptor held.
        let code =
            if i % 2 == 0 { "require('fs').writeFileSync('/tmp/s.txt', 'x')" } else { "f = open('/tmp/s.txt', 'w')" };
        step_ok(&srv, &alice, &id, code).await;
    }
    assert_eq!(metric(&srv, "imagentx_sessions_open").await, 100.0);
    let held = metric(&srv, "imagentx_sessions_memory_bytes").await;
    assert!(held > 100.0 * f64::from(1 << 20), "{held}");
    eventually(Duration::from_secs(20), "every idle session closed", async || {
        metric(&srv, "imagentx_sessions_open").await == 0.0
    })
    .await;
    assert_eq!(metric(&srv, "imagentx_guest_memory_bytes").await, 0.0);
    assert_eq!(metric(&srv, "imagentx_guest_descriptors").await, 0.0, "open files outlived their sessions");
    assert_eq!(metric(&srv, "imagentx_sessions_memory_bytes").await, 0.0);
    let scratch_left = std::fs::read_dir(srv.dir.path().join("scratch")).unwrap().count();
    assert_eq!(scratch_left, 0, "sessions' /tmp directories were left");
    // And the server still opens sessions and runs calls.
    open_ok(&srv, &alice, "python").await;
    let report = srv.report("python", &alice, json!({"input": {"code": "2 + 2"}})).await;
    assert_eq!(report["output"]["result"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors() {
    let srv = serve(Policy::default(), |_| {}).await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    for (body, status, code) in [
        (json!({"tool": "nope"}), StatusCode::NOT_FOUND, "unknown_tool"),
        (json!({"tool": "probe"}), StatusCode::BAD_REQUEST, "not_sessionable"),
        (json!({"tool": "python", "idle_timeout_s": 0}), StatusCode::BAD_REQUEST, "bad_idle_timeout"),
        (json!({"tool": "python", "idle_timeout_s": 100_000}), StatusCode::BAD_REQUEST, "bad_idle_timeout"),
        (json!({"tool": "python", "timeout_ms": 0}), StatusCode::BAD_REQUEST, "bad_timeout"),
        (json!({"tool": "python", "colour": "red"}), StatusCode::BAD_REQUEST, "bad_json"),
        (json!({}), StatusCode::BAD_REQUEST, "bad_json"),
    ] {
        let a = open(&srv, &alice, body.clone()).await;
        assert_eq!((a.status, a.error_code()), (status, code.to_owned()), "{body}");
    }
    let raw = srv.request(Method::POST, "/v1/sessions", Some(&alice), "{not json").await;
    assert_eq!(raw.status, StatusCode::BAD_REQUEST);
    let none = srv.request(Method::POST, "/v1/sessions", None, r#"{"tool": "python"}"#).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);

    let id = open_ok(&srv, &alice, "python").await;
    for (body, code) in [
        (json!({}), "bad_json"),
        (json!({"code": 1}), "bad_json"),
        (json!({"code": "1", "timeout_ms": 999_999}), "bad_timeout"),
    ] {
        let a = step(&srv, &alice, &id, body.clone()).await;
        assert_eq!((a.status, a.error_code()), (StatusCode::BAD_REQUEST, code.to_owned()), "{body}");
    }
    // A syntax error is the step's invalid code, not the session's end.
    let report = step(&srv, &alice, &id, json!({"code": "x = ("})).await.json();
    assert_eq!(report["status"], "tool_error", "{report}");
    assert!(report["error"].as_str().unwrap().contains("SyntaxError"), "{report}");
    assert_eq!(step_ok(&srv, &alice, &id, "1 + 1").await["result"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stops_ends_its_sessions_and_says_so() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let id = open_ok(&srv, &alice, "python").await;
    step_ok(&srv, &alice, &id, "x = 1").await;
    let dir = srv.stop_keeping_data().await;
    let settings = ServerSettings {
        data_dir: dir.path().to_owned(),
        max_instances: 32,
        interpreters_dir: common::interpreters::built_dir(),
        artifact_cache_dir: Some(common::artifact_cache()),
        ..Default::default()
    };
    let srv = TestServer::start_in(dir, Policy::default(), settings).await;
    let after = step(&srv, &alice, &id, json!({"code": "x"})).await;
    assert_eq!((after.status, after.error_code()), (StatusCode::GONE, "session_ended".into()));
    assert!(after.json()["error"]["message"].as_str().unwrap().contains("server stopped"), "{}", after.json());
    assert_eq!(show(&srv, &alice, &id).await["reason"], "shutdown");
}

/// `kill -9`: no chance to close anything. The next start marks the
/// sessions ended, and a step answers "server restarted", not a 500 or a hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_restarted_answers_session_ended_server_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_imagentx-sandbox");
    let out = Command::new(bin).args(["user", "add", "alice", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alice = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let config = dir.path().join("config.toml");
    let text = format!(
        "[server]\nartifact_cache_dir = \"{}\"\ninterpreters_dir = \"{}\"\n",
        common::artifact_cache().display(),
        common::interpreters::built_dir().display()
    );
    std::fs::write(&config, text).unwrap();
    let start = |addr: &str| {
        let child = Command::new(bin)
            .args(["serve", "--listen", addr, "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = common::StoppedOnDrop(child);
        wait_listening(&mut child.0, addr);
        child
    };
    let addr = free_port();
    let first = start(&addr);
    let opened = server::http(&addr, Method::POST, "/v1/sessions", &alice, r#"{"tool": "python"}"#).await;
    assert_eq!(opened.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&opened.body));
    let id = opened.json()["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/sessions/{id}/run");
    assert_eq!(server::http(&addr, Method::POST, &path, &alice, r#"{"code": "x = 1"}"#).await.status, StatusCode::OK);
    let mut first = first;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(first);

    let addr = free_port();
    let second = start(&addr);
    let after = server::http(&addr, Method::POST, &path, &alice, r#"{"code": "x"}"#).await;
    let message = after.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
    drop(second);
    assert_eq!(after.status, StatusCode::GONE, "{message}");
    assert!(message.contains("server restarted"), "{message}");
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Until the server listens and has registered its built-in tools
/// (`/readyz` answers 200).
fn wait_listening(child: &mut std::process::Child, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = || {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return false };
        let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200")
    };
    while !ready() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited before it was ready");
        assert!(Instant::now() < deadline, "the server was not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An admin retiring the interpreter's version ends the sessions running it.
#[tokio::test(flavor = "multi_thread")]
async fn retiring_the_tool_ends_its_sessions() {
    let srv = serve(Policy::default(), |_| {}).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let id = open_ok(&srv, &alice, "javascript").await;
    step_ok(&srv, &alice, &id, "var n = 1").await;
    let retired = srv.request(Method::DELETE, "/v1/tools/javascript", Some(&srv.admin), "").await;
    assert_eq!(retired.status, StatusCode::OK, "{}", String::from_utf8_lossy(&retired.body));
    let after = step(&srv, &alice, &id, json!({"code": "n"})).await;
    assert_eq!((after.status, after.error_code()), (StatusCode::GONE, "session_ended".into()));
    assert!(after.json()["error"]["message"].as_str().unwrap().contains("retired"), "{}", after.json());
    assert_eq!(show(&srv, &alice, &id).await["reason"], "tool_retired");
}
