//! Behaviour analysis and automatic responses (issue 17), against the real
//! server on a loopback port: each rule stays quiet under its threshold and
//! fires on the incident, with an `anomaly` audit record and its evidence;
//! throttles and suspensions hold, and are lifted by an admin (over the API
//! and from the command line); the webhook gets the event, and a dead
//! webhook costs the calls nothing.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use server::TestServer;

/// The anomaly records of `rule`, newest first.
async fn anomalies(srv: &TestServer, rule: &str) -> Vec<Value> {
    let page = srv.get("/v1/audit?kind=anomaly&limit=1000", &srv.admin).await.json();
    page["records"].as_array().unwrap().iter().filter(|r| r["outcome"] == rule).cloned().collect()
}

/// Audit records of `kind` about `user`, waiting up to 10 s for `n` of them
/// (responses are taken on a task of their own, just after the call).
async fn wait_records(srv: &TestServer, kind: &str, user: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = srv.get(&format!("/v1/audit?kind={kind}&user={user}"), &srv.admin).await.json();
        let records = page["records"].as_array().unwrap().clone();
        if records.len() >= n || Instant::now() > deadline {
            assert!(records.len() >= n, "no {kind} record for {user}: {records:?}");
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(srv: &TestServer) -> String {
    String::from_utf8(srv.request(Method::GET, "/metrics", None, Bytes::new()).await.body.to_vec()).unwrap()
}

/// Requests in a row that `key` gets answered 200 before the first 429.
async fn burst_until_refused(srv: &TestServer, key: &str, n: usize) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..n {
        let a = srv.get("/v1/me", key).await;
        match a.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(a.error_code(), "rate");
                refused += 1;
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&a.body)),
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_limit_hits_is_probing_the_user_is_throttled_and_an_admin_lifts_it() {
    let srv = TestServer::start().await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let bob = srv.add_user("bob", "standard", false).await;
    for _ in 0..3 {
        assert_eq!(srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await["status"], "ok");
    }
    // Code that loops, retried six times: one limit, not a probe.
    let stopped = json!({"input": {"op": "sleep", "ms": 5000}, "timeout_ms": 50});
    for _ in 0..6 {
        assert_eq!(srv.report("probe", &bob, stopped.clone()).await["status"], "timeout");
    }
    // Four calls stopped by their time and memory limits: under the rule.
    let bomb = json!({"input": {"op": "alloc", "bytes": 1u64 << 30}});
    let mut ids = Vec::new();
    for (i, input) in [&stopped, &bomb, &stopped, &bomb].into_iter().enumerate() {
        let report = srv.report("probe", &alice, input.clone()).await;
        assert_eq!(report["status"], if i % 2 == 0 { "timeout" } else { "memory_limit" });
        ids.push(report["id"].as_str().unwrap().to_owned());
    }
    assert!(anomalies(&srv, "limit_probing").await.is_empty());
    assert_eq!(burst_until_refused(&srv, &alice, 5).await, (5, 0), "not throttled yet");

    // The fifth in the minute: probing, with the five executions as evidence.
    let report = srv.report("probe", &alice, stopped.clone()).await;
    ids.push(report["id"].as_str().unwrap().to_owned());
    let found = anomalies(&srv, "limit_probing").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let record = &found[0];
    assert_eq!(record["user"], "alice");
    assert_eq!(record["detail"]["evidence"]["limited_calls"], 5);
    assert_eq!(record["detail"]["evidence"]["limits"], json!(["timeout", "memory"]));
    let evidence: Vec<&str> =
        record["detail"]["evidence"]["executions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for id in &ids {
        assert!(evidence.contains(&id.as_str()), "{id} not in {evidence:?}");
    }
    assert_eq!(record["detail"]["actions"], json!(["alert", "throttle"]));

    // The response: a throttle (1 request/s, a burst of 2), audited; bob is untouched.
    let throttled = wait_records(&srv, "user_throttled", "alice", 1).await;
    assert_eq!(throttled[0]["detail"]["requests_per_second"], 1);
    assert_eq!(throttled[0]["actor"], "behaviour");
    let (ok, refused) = burst_until_refused(&srv, &alice, 6).await;
    assert!(ok <= 3 && refused >= 3, "throttled: {ok} answered, {refused} refused");
    assert_eq!(srv.report("probe", &bob, json!({"input": {"op": "echo"}})).await["status"], "ok");
    assert!(metrics(&srv).await.contains("imagentx_anomalies_total{rule=\"limit_probing\"} 1"));

    // An admin lifts it; the next calls run at the tier's rate again.
    let lifted = srv.request(Method::POST, "/v1/users/alice/unsuspend", Some(&srv.admin), Bytes::new()).await;
    assert_eq!(lifted.status, StatusCode::OK);
    assert_eq!(lifted.json()["lifted"], json!(["throttle"]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(burst_until_refused(&srv, &alice, 6).await, (6, 0));
    assert_eq!(wait_records(&srv, "user_unsuspended", "alice", 1).await[0]["detail"]["lifted"], json!(["throttle"]));
    // Another burst within the cooldown is the same incident: no second record.
    for _ in 0..5 {
        srv.report("probe", &alice, stopped.clone()).await;
    }
    assert_eq!(anomalies(&srv, "limit_probing").await.len(), 1);
    srv.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_attempts_suspend_the_user_until_an_admin_lifts_it_from_the_command_line() {
    let srv = TestServer::start().await;
    let mallory = srv.add_user("mallory", "standard", false).await;
    let bob = srv.add_user("bob", "standard", false).await;
    // Ordinary mistakes are not escapes, nor is a link the user's own tools made.
    for path in ["a//b", "./a", "a/./b"] {
        assert_eq!(srv.get(&format!("/v1/files/{path}"), &mallory).await.error_code(), "bad_path", "{path}");
    }
    std::fs::create_dir_all(srv.dir.path().join("users/mallory")).unwrap();
    std::os::unix::fs::symlink("notes.txt", srv.dir.path().join("users/mallory/link")).unwrap();
    for _ in 0..5 {
        assert_eq!(srv.get("/v1/files/link", &mallory).await.error_code(), "bad_path");
    }
    // Four escapes: under the rule.
    let escape = srv.get("/v1/files/%2Fetc%2Fpasswd", &mallory).await;
    assert_eq!((escape.status, escape.error_code()), (StatusCode::BAD_REQUEST, "bad_path".to_owned()));
    assert_eq!(srv.get("/v1/files/notes/..%2F..%2Fsecret", &mallory).await.error_code(), "bad_path");
    assert_eq!(srv.get("/v1/audit", &mallory).await.status, StatusCode::FORBIDDEN);
    assert_eq!(srv.request(Method::POST, "/v1/tools", Some(&mallory), "\0asm").await.status, StatusCode::FORBIDDEN);
    assert_eq!(srv.get("/v1/me", &mallory).await.status, StatusCode::OK);
    assert!(anomalies(&srv, "escape_attempts").await.is_empty());

    // The fifth in five minutes: suspended.
    assert_eq!(srv.get("/v1/alerts", &mallory).await.status, StatusCode::FORBIDDEN);
    let suspended = wait_records(&srv, "user_suspended", "mallory", 1).await;
    assert_eq!(suspended[0]["detail"]["reason"], "behaviour rule `escape_attempts`");
    let found = anomalies(&srv, "escape_attempts").await;
    assert_eq!(found[0]["detail"]["evidence"]["attempts"], 5);
    let what = found[0]["detail"]["evidence"]["what"].to_string();
    assert!(what.contains("absolute") && what.contains("/v1/audit"), "{what}");
    for path in ["/v1/me", "/v1/tools", "/v1/files"] {
        let refused = srv.get(path, &mallory).await;
        assert_eq!((refused.status, refused.error_code()), (StatusCode::FORBIDDEN, "suspended".to_owned()), "{path}");
        let message = refused.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("suspended until") && message.contains("escape_attempts"), "{message}");
    }
    assert_eq!(srv.get("/v1/me", &bob).await.status, StatusCode::OK);
    let users = srv.get("/v1/users", &srv.admin).await.json();
    let row = |name: &str| users["users"].as_array().unwrap().iter().find(|u| u["id"] == name).unwrap().clone();
    assert!(row("mallory")["suspended_until"].is_string(), "{users}");
    assert!(row("bob")["suspended_until"].is_null(), "{users}");
    assert_eq!(srv.get("/v1/users", &bob).await.status, StatusCode::FORBIDDEN);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metrics(&srv).await.contains("imagentx_responses_total{action=\"suspend\"} 1") {
        assert!(Instant::now() < deadline, "{}", metrics(&srv).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The command line sees it and lifts it; the running server follows at once.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
            .args(args)
            .arg("--data-dir")
            .arg(srv.dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, listed, _) = cli(&["user", "list"]);
    assert_eq!(code, Some(0));
    assert!(listed.lines().any(|l| l.starts_with("mallory") && l.contains("suspended until")), "{listed}");
    let (code, _, said) = cli(&["user", "unsuspend", "mallory"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("suspend"), "{said}");
    assert_eq!(srv.get("/v1/me", &mallory).await.status, StatusCode::OK);
    // And suspends again, by hand, from there too.
    let (code, _, said) = cli(&["user", "suspend", "bob", "--for", "10m", "--reason", "chargeback"]);
    assert_eq!(code, Some(0), "{said}");
    let refused = srv.get("/v1/me", &bob).await;
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("chargeback"));
    srv.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn suspending_over_the_api_checks_its_input_and_never_the_last_admin() {
    let srv = TestServer::start().await;
    let alice = srv.add_user("alice", "standard", false).await;
    let post = |path: String, key: String, body: &'static str| {
        let srv = &srv;
        async move { srv.request(Method::POST, &path, Some(&key), body).await }
    };
    let admin = srv.admin.clone();
    // Not for users; bad bodies; unknown users; the last admin.
    assert_eq!(post("/v1/users/alice/suspend".into(), alice.clone(), "").await.status, StatusCode::FORBIDDEN);
    for body in [r#"{"for_s": 0}"#, r#"{"for_s": 99999999}"#, r#"{"for": 10}"#, "not json"] {
        let a = post("/v1/users/alice/suspend".into(), admin.clone(), body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", String::from_utf8_lossy(&a.body));
    }
    assert_eq!(post("/v1/users/nobody/suspend".into(), admin.clone(), "").await.status, StatusCode::NOT_FOUND);
    assert_eq!(post("/v1/users/nobody/unsuspend".into(), admin.clone(), "").await.status, StatusCode::NOT_FOUND);
    let last = post("/v1/users/root/suspend".into(), admin.clone(), "").await;
    assert_eq!((last.status, last.error_code()), (StatusCode::CONFLICT, "conflict".to_owned()));
    assert!(last.json()["error"]["message"].as_str().unwrap().contains("last admin"));
    assert_eq!(srv.get("/v1/me", &admin).await.status, StatusCode::OK);

    // A suspension that runs out lets the user back in by itself.
    let a = post("/v1/users/alice/suspend".into(), admin.clone(), r#"{"for_s": 1, "reason": "cool down"}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["reason"], "cool down");
    assert_eq!(srv.get("/v1/me", &alice).await.error_code(), "suspended");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(srv.get("/v1/me", &alice).await.status, StatusCode::OK);
    // Unsuspending a user with nothing on them lifts nothing, and says so.
    let lifted = post("/v1/users/alice/unsuspend".into(), admin.clone(), "").await;
    assert_eq!(lifted.json()["lifted"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_tool_whose_every_call_crashes_is_an_anomaly_and_a_flaky_one_is_not() {
    let srv = TestServer::start().await;
    srv.register("probe", "crasher").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let report = srv.report("crasher", &alice, json!({"input": {"op": "panic"}})).await;
        assert_eq!(report["status"], "crashed");
        ids.push(report["id"].clone());
    }
    let found = anomalies(&srv, "crashing_tool").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["tool"], "crasher");
    assert_eq!(found[0]["detail"]["evidence"]["executions"], json!(ids));
    assert_eq!(found[0]["detail"]["actions"], json!(["alert"]));
    // Nobody is restricted for a tool's crashes.
    assert_eq!(srv.get("/v1/me", &alice).await.status, StatusCode::OK);

    // The same module under another name is another tool; one call of five works.
    srv.register("probe", "flaky").await;
    for op in ["panic", "panic", "echo", "panic", "panic", "panic"] {
        srv.report("flaky", &alice, json!({"input": {"op": op}})).await;
    }
    assert!(anomalies(&srv, "crashing_tool").await.iter().all(|r| r["tool"] == "crasher"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_rate_far_above_the_users_own_is_an_anomaly() {
    let srv = TestServer::start_with(Default::default(), |s| s.behaviour.rate_floor_per_min = 30).await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    for _ in 0..29 {
        srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await;
    }
    assert!(anomalies(&srv, "call_rate").await.is_empty(), "29 calls: under the floor");
    srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await;
    let found = anomalies(&srv, "call_rate").await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["detail"]["evidence"]["last_minute"], 30.0);
    assert_eq!(found[0]["detail"]["evidence"]["executions"].as_array().unwrap().len(), 8);
    // A batch job within the tier's rate is told about, not slowed.
    assert_eq!(found[0]["detail"]["actions"], json!(["alert"]));
    assert_eq!(burst_until_refused(&srv, &alice, 10).await, (10, 0));
}

/// Behind a reverse proxy listed in `trusted_proxies` (the test is the
/// proxy, on loopback): a burst from the user's usual network is their own
/// work, the same key bursting from a network it never used is an anomaly,
/// and failed keys are counted per forwarded client, not per proxy.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_a_burst_from_a_new_network_is_an_anomaly_and_from_the_usual_one_is_not() {
    let srv = TestServer::start_with(Default::default(), |s| {
        s.trusted_proxies = vec!["127.0.0.1".into()];
        s.behaviour.rate_floor_per_min = 20;
        s.behaviour.network_settle_s = 1;
    })
    .await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let echo = json!({"input": {"op": "echo"}}).to_string();
    let call_from = |client: &'static str| {
        let headers = [("x-forwarded-for", client)];
        let (alice, echo) = (alice.clone(), echo.clone());
        let srv = &srv;
        async move {
            let a = srv.request_with(Method::POST, "/v1/tools/probe/invoke", Some(&alice), echo, &headers).await;
            assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
        }
    };
    // Alice calls from her office; a slot (10 s) later it is her usual network.
    call_from("198.51.100.7").await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    // A new batch job from there: past the floor, and her own work.
    for _ in 0..25 {
        call_from("198.51.100.8").await;
    }
    assert!(anomalies(&srv, "call_rate").await.is_empty(), "a burst from her usual network");
    // Her key from a network it never used, in the same minute: an anomaly.
    call_from("203.0.113.50").await;
    let found = anomalies(&srv, "call_rate").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let evidence = &found[0]["detail"]["evidence"];
    assert_eq!(evidence["network"], "203.0.113.0/24");
    assert_eq!(evidence["usual_network"], false);
    assert!(evidence["last_minute"].as_f64().unwrap() >= 20.0, "{evidence}");

    // Failed keys: 19 from each of two clients behind the proxy are two
    // sources under the threshold (20), not one over it.
    let refused = |client: &'static str| {
        let srv = &srv;
        async move {
            let headers = [("x-forwarded-for", client)];
            let a = srv.request_with(Method::GET, "/v1/me", Some("imx_not_a_key"), Bytes::new(), &headers).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        }
    };
    for _ in 0..19 {
        refused("192.0.2.1").await;
        refused("192.0.2.2").await;
    }
    refused("192.0.2.1").await;
    // A detection of failed keys is recorded just after the request: wait
    // for it, then check it is the only one (none for the proxy's address).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = anomalies(&srv, "auth_failures").await;
    while found.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        found = anomalies(&srv, "auth_failures").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let found = anomalies(&srv, "auth_failures").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["detail"]["evidence"]["source"], "192.0.2.1");
    assert_eq!(found[0]["detail"]["evidence"]["failures"], 20);
}

/// A webhook receiver: answers `status` to every POST and hands over the bodies.
async fn receiver(status: StatusCode) -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/imagentx?token=t", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        use http_body_util::BodyExt;
                        assert_eq!(request.uri().path_and_query().unwrap().as_str(), "/hooks/imagentx?token=t");
                        assert_eq!(request.headers()["content-type"], "application/json");
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx.send(serde_json::from_slice::<Value>(&body).unwrap());
                        let mut answer = hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                        *answer.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(answer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_authentication_in_a_burst_reaches_the_webhook() {
    let (url, mut events) = receiver(StatusCode::OK).await;
    let srv = TestServer::start_with(Default::default(), |s| {
        s.behaviour.auth_failures = 5;
        s.response.webhook = Some(url);
    })
    .await;
    // A leaked key, revoked, still being tried: the events name its owner.
    let alice = srv.add_user("alice", "standard", false).await;
    srv.state.store.revoke_keys(imagentx_sandbox::policy::UserId::new("alice").unwrap(), "test".into()).await.unwrap();
    for i in 0..4 {
        let a = srv.get("/v1/me", &alice).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{i}");
    }
    assert!(anomalies(&srv, "auth_failures").await.is_empty());
    assert_eq!(srv.get("/v1/me", &alice).await.status, StatusCode::UNAUTHORIZED);
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert_eq!((event["event"].as_str(), event["rule"].as_str()), (Some("anomaly"), Some("auth_failures")));
    assert_eq!(event["user"], "alice");
    assert_eq!(event["evidence"]["source"], "key:alice");
    assert_eq!(event["evidence"]["failures"], 5);
    let found = anomalies(&srv, "auth_failures").await;
    assert_eq!(found[0]["user"], "alice");

    // Unknown keys from one address: its source is the address.
    for _ in 0..5 {
        srv.get("/v1/me", "ixs_not-a-key").await;
    }
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert_eq!(event["evidence"]["source"], "127.0.0.1");
    assert_eq!(event["user"], Value::Null);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metrics(&srv).await.contains("imagentx_webhook_events_total{outcome=\"delivered\"} 2") {
        assert!(Instant::now() < deadline, "{}", metrics(&srv).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_failing_webhook_costs_the_calls_nothing_and_is_an_alert() {
    // Nothing listens at the first; the second answers 500 to everything.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (failing, mut tried) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    for (url, answered) in [(format!("http://{closed}/"), false), (failing, true)] {
        let srv = TestServer::start_with(Default::default(), |s| {
            s.behaviour.auth_failures = 2;
            s.response.webhook = Some(url);
            s.response.webhook_retries = 1;
            s.response.webhook_timeout_ms = 500;
        })
        .await;
        srv.register("probe", "probe").await;
        let alice = srv.add_user("alice", "standard", false).await;
        for _ in 0..2 {
            srv.get("/v1/me", "ixs_wrong").await;
        }
        // Calls while the webhook is being retried answer as fast as ever.
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await["status"], "ok");
        }
        // (The webhook's retry alone waits a second; its attempts take up to 1 s more.)
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        // Two attempts (one retry after 1 s), then an alert record.
        let deadline = Instant::now() + Duration::from_secs(15);
        let failed = loop {
            let page = srv.get("/v1/alerts", &srv.admin).await.json();
            let failed: Vec<Value> = page["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["outcome"] == "webhook_failed")
                .cloned()
                .collect();
            if !failed.is_empty() {
                break failed;
            }
            assert!(Instant::now() < deadline, "no webhook_failed alert");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(failed[0]["detail"]["attempts"], 2);
        assert_eq!(failed[0]["detail"]["event"]["rule"], "auth_failures");
        let text = metrics(&srv).await;
        assert!(text.contains("imagentx_webhook_events_total{outcome=\"failed\"} 1"), "{text}");
        assert!(text.contains("imagentx_webhook_attempts_total 2"), "{text}");
        if answered {
            for _ in 0..2 {
                assert_eq!(tried.recv().await.unwrap()["rule"], "auth_failures");
            }
        }
        srv.assert_healthy().await;
    }
}

#[test]
fn a_config_with_an_unknown_rule_or_an_https_webhook_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (text, says) in [
        ("[response.rules.no_such_rule]\nactions = [\"alert\"]\n", "no such rule"),
        ("[response]\nwebhook = \"https://hooks.example.com/x\"\n", "only http://"),
        ("[behaviour]\nprobing = 3\n", "unknown field"),
        ("[behaviour]\nescape_attempts = 99\n", "escape_attempts must be between 1 and 16"),
        ("[response.rules.auth_failures]\nactions = [\"alert\", \"suspend\"]\n", "only `alert`"),
        ("[response.rules.cpu_spike]\nactions = [\"ban\"]\n", "unknown variant"),
        ("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.local\"]\n", "`proxy.local` is neither"),
        ("[behaviour]\nnetwork_settle_s = 0\n", "network_settle_s must be between 1 and"),
    ] {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(says), "{text}: {stderr}");
    }
}
