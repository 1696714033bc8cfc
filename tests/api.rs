//! The HTTP service end to end: a real server on a loopback port, a real
//! SQLite file, real guests registered through the API, hostile ones too.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use imagentx_sandbox::policy::Policy;
use serde_json::{Value, json};
use server::TestServer;

fn audit_kinds(v: &Value) -> Vec<String> {
    v["records"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tools_are_registered_versioned_listed_invoked_and_retired() {
    let s = TestServer::start().await;
    let alice = s.add_user("alice", "standard", false).await;

    // Name, description and schema come from the SDK's describe.
    let sdk = s.request(Method::POST, "/v1/tools", Some(&s.admin), common::guest_bytes("word-stats")).await;
    assert_eq!(sdk.status, StatusCode::CREATED);
    let row = sdk.json();
    assert_eq!(row["name"], "word-stats");
    assert_eq!(row["version"], 1);
    assert_eq!(row["kind"], "sdk");
    assert_eq!(row["input_schema"]["required"][0], "text");
    // A command-style tool takes its description from the request.
    let cmd = s.register("probe", "probe&description=echoes%20its%20input").await;
    assert_eq!((cmd["kind"].as_str(), cmd["description"].as_str()), (Some("wasi_command"), Some("echoes its input")));

    let list = s.get("/v1/tools", &alice).await.json();
    let names: Vec<&str> = list["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["probe", "word-stats"]);
    let openai = s.get("/v1/tools?format=openai", &alice).await.json();
    let f = &openai.as_array().unwrap()[1];
    assert_eq!((f["type"].as_str(), f["function"]["name"].as_str()), (Some("function"), Some("word-stats")));
    assert_eq!(f["function"]["parameters"]["type"], "object");
    assert_eq!(s.get("/v1/tools?format=yaml", &alice).await.error_code(), "bad_query");

    let report = s.report("word-stats", &alice, json!({"input": {"text": "a b a"}})).await;
    assert_eq!(report["status"], "ok");
    assert_eq!(report["user"], "alice");
    assert_eq!(report["tier"], "standard");
    assert_eq!(report["output"]["words"], 3);
    assert_eq!(report["tool_sha256"], row["sha256"]);
    let id = report["id"].as_str().unwrap();
    let stored = s.get(&format!("/v1/executions/{id}"), &alice).await;
    assert_eq!(stored.json(), report, "the stored report is the one answered");

    // Registering the name again makes version 2; the name takes the newest.
    let v2 = s.register("probe", "word-stats").await;
    assert_eq!(v2["version"], 2);
    let newest = s.report("word-stats", &alice, json!({"input": {"op": "echo"}})).await;
    assert_eq!(newest["status"], "ok");
    assert_eq!(newest["output"]["input"]["op"], "echo");
    let pinned = s.report("word-stats", &alice, json!({"input": {"text": "x"}, "version": 1})).await;
    assert_eq!(pinned["output"]["words"], 1);
    let versions = s.get("/v1/tools/word-stats", &alice).await.json();
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    assert_eq!(s.invoke("word-stats", &alice, json!({"version": 9})).await.error_code(), "unknown_version");
    assert_eq!(s.invoke("nope", &alice, json!({})).await.error_code(), "unknown_tool");

    // Retiring keeps past executions readable.
    let retired = s.request(Method::DELETE, "/v1/tools/word-stats", Some(&s.admin), Bytes::new()).await;
    assert_eq!(retired.json()["versions"], json!([1, 2]));
    assert_eq!(s.invoke("word-stats", &alice, json!({})).await.error_code(), "unknown_tool");
    assert_eq!(s.get(&format!("/v1/executions/{id}"), &alice).await.json()["id"], id);
    let page = s.get("/v1/executions?limit=2", &alice).await.json();
    assert_eq!(page["executions"].as_array().unwrap().len(), 2);
    assert_eq!(page["executions"][0]["id"], pinned["id"], "newest first");
    let before = page["next_before"].as_i64().unwrap();
    let rest = s.get(&format!("/v1/executions?limit=2&before={before}"), &alice).await.json();
    assert_eq!(rest["executions"][0]["id"], report["id"]);
    assert_eq!(rest["next_before"], Value::Null);

    let audit = s.get("/v1/audit?kind=tool_registered", &s.admin).await.json();
    assert_eq!(audit_kinds(&audit).len(), 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_auth_failure_is_refused_and_recorded() {
    let s = TestServer::start().await;
    let alice = s.add_user("alice", "free", false).await;
    let bob = s.add_user("bob", "free", false).await;
    s.register("word-stats", "word-stats").await;

    let no_key = s.request(Method::GET, "/v1/tools", None, Bytes::new()).await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_key.headers["www-authenticate"], "Bearer");
    assert_eq!(no_key.error_code(), "unauthorized");
    let basic = s.request_with(Method::GET, "/v1/tools", None, Bytes::new(), &[("authorization", "Basic YTpi")]).await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.get("/v1/tools", "ixs_0000").await.status, StatusCode::UNAUTHORIZED);
    // A key that differs in one character is as unknown as any other.
    let mut near = alice.clone();
    near.pop();
    near.push(if alice.ends_with('0') { '1' } else { '0' });
    assert_eq!(s.get("/v1/tools", &near).await.status, StatusCode::UNAUTHORIZED);

    // A user key on admin routes: 403.
    for (method, path) in [
        (Method::POST, "/v1/tools"),
        (Method::GET, "/v1/audit"),
        (Method::DELETE, "/v1/tools/word-stats"),
        (Method::GET, "/v1/alerts"),
    ] {
        let a = s.request(method, path, Some(&alice), Bytes::from_static(b"\0asm")).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(a.error_code(), "forbidden");
    }
    assert_eq!(s.report("word-stats", &alice, json!({"input": {"text": "ok"}})).await["status"], "ok");

    // A revoked key stops working at once; the user's other data stays.
    let revoked = s.state.store.revoke_keys(imagentx_sandbox::policy::UserId::new("bob").unwrap(), "test".into()).await;
    assert_eq!(revoked.unwrap(), 1);
    assert_eq!(s.get("/v1/tools", &bob).await.status, StatusCode::UNAUTHORIZED);

    let audit = s.get("/v1/audit?limit=1000", &s.admin).await.json();
    let kinds = audit_kinds(&audit);
    assert_eq!(kinds.iter().filter(|k| *k == "auth_failure").count(), 5);
    assert_eq!(kinds.iter().filter(|k| *k == "denied").count(), 4);
    assert!(kinds.contains(&"keys_revoked".to_owned()));
    let metrics = String::from_utf8(s.get("/metrics", "").await.body.to_vec()).unwrap();
    assert!(metrics.contains("imagentx_auth_failures_total 5"), "{metrics}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_cannot_see_each_others_files_executions_or_audit() {
    let s = TestServer::start().await;
    let alice = s.add_user("alice", "standard", false).await;
    let bob = s.add_user("bob", "standard", false).await;
    s.register("probe", "probe").await;

    let put = s.request(Method::PUT, "/v1/files/private/diary.txt", Some(&alice), "alice's secret").await;
    assert_eq!(put.json()["bytes"], 14);
    assert_eq!(&s.get("/v1/files/private/diary.txt", &alice).await.body[..], b"alice's secret");
    // Bob's files API and bob's tools see only bob's directory.
    assert_eq!(s.get("/v1/files/private/diary.txt", &bob).await.status, StatusCode::NOT_FOUND);
    assert_eq!(s.get("/v1/files", &bob).await.json()["entries"], json!([]));
    let r = s.report("probe", &bob, json!({"input": {"op": "read", "path": "/data/private/diary.txt"}})).await;
    assert_eq!(r["output"]["ok"], false);
    let r = s.report("probe", &bob, json!({"input": {"op": "read", "path": "/data/../alice/private/diary.txt"}})).await;
    assert_eq!(r["output"]["ok"], false);
    // Alice's tool sees the file the API wrote: the same /data.
    let r = s.report("probe", &alice, json!({"input": {"op": "read", "path": "/data/private/diary.txt"}})).await;
    assert_eq!(r["output"]["content"], "alice's secret");
    let alices = r["id"].as_str().unwrap();

    let theirs = s.get(&format!("/v1/executions/{alices}"), &bob).await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND, "another user's execution is not confirmed to exist");
    assert_eq!(theirs.error_code(), "unknown_execution");
    assert_eq!(
        s.get("/v1/executions/no-such-id", &bob).await.json(),
        theirs.json().clone().tap_message("no-such-id", alices)
    );
    let bobs = s.get("/v1/executions", &bob).await.json();
    assert!(bobs["executions"].as_array().unwrap().iter().all(|e| e["id"] != alices));
    // Admins read any execution; users cannot read the audit trail.
    assert_eq!(s.get(&format!("/v1/executions/{alices}"), &s.admin).await.status, StatusCode::OK);
    assert_eq!(s.get("/v1/audit?user=alice", &bob).await.status, StatusCode::FORBIDDEN);
    let deleted = s.request(Method::DELETE, "/v1/files/private/diary.txt", Some(&bob), Bytes::new()).await;
    assert_eq!(deleted.status, StatusCode::NOT_FOUND);
    assert!(s.dir.path().join("users/alice/private/diary.txt").exists());
    s.stop().await;
}

trait TapMessage {
    fn tap_message(self, id: &str, other: &str) -> Self;
}

impl TapMessage for Value {
    /// The 404 for another user's id with that id swapped for `id`: the two
    /// answers must then be identical.
    fn tap_message(mut self, id: &str, other: &str) -> Self {
        let m = self["error"]["message"].as_str().unwrap().replace(other, id);
        self["error"]["message"] = Value::String(m);
        self
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_mistakes_get_a_4xx_with_a_message_and_lose_nothing() {
    let policy = Policy { input_bytes: 4096, module_bytes: 8 << 20, ..Policy::default() };
    let s = TestServer::start_with(policy, |settings| settings.max_file_bytes = 1024).await;
    let alice = s.add_user("alice", "standard", false).await;
    s.register("word-stats", "word-stats").await;
    let invoke = |body: &'static str| s.request(Method::POST, "/v1/tools/word-stats/invoke", Some(&alice), body);

    assert_eq!(invoke("{not json").await.error_code(), "bad_json");
    assert_eq!(invoke(r#"{"input": {}, "args": "not a list"}"#).await.error_code(), "bad_json");
    assert_eq!(invoke(r#"{"inptu": {}}"#).await.error_code(), "bad_json");
    assert_eq!(invoke(r#"{"timeout_ms": 0}"#).await.error_code(), "bad_timeout");
    assert_eq!(invoke(r#"{"timeout_ms": 3600000}"#).await.error_code(), "bad_timeout");
    assert_eq!(invoke(r#"{"version": -1}"#).await.error_code(), "bad_json");
    // A whole number written with a zero fraction is one (JSON Schema's
    // `integer`; Python writes floats so); a fraction is refused, saying why.
    let whole = invoke(r#"{"input": {"text": "a b"}, "timeout_ms": 2500.0}"#).await;
    assert_eq!(whole.json()["status"], "ok", "{}", String::from_utf8_lossy(&whole.body));
    for body in [r#"{"timeout_ms": 2500.5}"#, r#"{"timeout_ms": -2.0}"#, r#"{"version": 0.5}"#] {
        let refused = invoke(body).await;
        assert_eq!(refused.error_code(), "bad_json", "{body}");
        assert!(refused.json()["error"]["message"].as_str().unwrap().contains("whole number"), "{}", refused.json());
    }
    for body in [r#"{"version": 5000000000}"#, r#"{"version": 1e300}"#] {
        assert!(invoke(body).await.json()["error"]["message"].as_str().unwrap().contains("too large"), "{body}");
    }
    let huge = s.request(Method::POST, "/v1/tools/word-stats/invoke", Some(&alice), vec![b' '; 200 << 10]).await;
    assert_eq!((huge.status, huge.error_code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    // The tool's own refusal of a wrong input is a report, not an HTTP error.
    let r = s.report("word-stats", &alice, json!({"input": {"text": 5}})).await;
    assert_eq!(r["status"], "invalid_input");

    let upload = |body: Vec<u8>| s.request(Method::POST, "/v1/tools?name=bad", Some(&s.admin), body);
    assert_eq!(upload(Vec::new()).await.error_code(), "empty_body");
    assert_eq!(upload(b"MZ\x90\0 not wasm".to_vec()).await.error_code(), "invalid_tool");
    assert_eq!(upload(b"\0asm\x01\0\0\0\x01\xff\xff".to_vec()).await.error_code(), "invalid_tool");
    let too_big = upload(vec![0; 9 << 20]).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    let bad_name = s.request(Method::POST, "/v1/tools?name=../etc", Some(&s.admin), common::guest_bytes("probe")).await;
    assert_eq!(bad_name.error_code(), "bad_tool_name");
    let bad_schema = s
        .request(Method::POST, "/v1/tools?name=p&input_schema=%7Bnope", Some(&s.admin), common::guest_bytes("probe"))
        .await;
    assert_eq!(bad_schema.error_code(), "bad_input_schema");

    for path in
        ["/v1/files/a/%2E%2E/%2E%2E/etc/passwd", "/v1/files/a//b", "/v1/files/%2Fetc%2Fpasswd", "/v1/files/a%00b"]
    {
        let a = s.request(Method::PUT, path, Some(&alice), "x").await;
        assert_eq!((a.status, a.error_code().as_str()), (StatusCode::BAD_REQUEST, "bad_path"), "{path}");
    }
    let big_file = s.request(Method::PUT, "/v1/files/big", Some(&alice), vec![0u8; 2048]).await;
    assert_eq!(big_file.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(s.get("/v1/executions?limit=0", &alice).await.error_code(), "bad_query");
    assert_eq!(s.get("/v1/executions?limit=ten", &alice).await.error_code(), "bad_query");
    assert_eq!(s.get("/v1/audit?kind=everything", &s.admin).await.error_code(), "bad_query");
    assert_eq!(s.get("/v1/audit?since=yesterday", &s.admin).await.error_code(), "bad_query");
    assert_eq!(s.get("/v1/nothing-here", &alice).await.error_code(), "no_route");
    assert_eq!(s.get("/v1/executions/%FF", &alice).await.error_code(), "bad_path");
    assert_eq!(s.request(Method::PATCH, "/v1/tools", Some(&alice), "").await.error_code(), "method_not_allowed");

    // Nothing was lost or half-made by any of it.
    let tools = s.get("/v1/tools", &alice).await.json();
    assert_eq!(tools["tools"].as_array().unwrap().len(), 1);
    assert_eq!(s.get("/v1/files", &alice).await.json()["entries"], json!([]));
    assert_eq!(s.report("word-stats", &alice, json!({"input": {"text": "still here"}})).await["status"], "ok");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_tools_are_stopped_with_the_right_status_and_the_server_keeps_serving() {
    let s = TestServer::start().await;
    let mallory = s.add_user("mallory", "free", false).await;
    s.register("probe", "probe").await;
    s.register("word-stats", "word-stats").await;
    let cases = [
        (json!({"op": "spin"}), Some(500), "cpu_limit"),
        (json!({"op": "sleep", "ms": 5000}), Some(300), "timeout"),
        (json!({"op": "alloc", "bytes": 300 << 20}), None, "memory_limit"),
        (json!({"op": "recurse"}), None, "crashed"),
        (json!({"op": "panic"}), None, "crashed"),
        (json!({"op": "exit", "code": 7}), None, "tool_error"),
        // No sockets: the first socket call stops the tool with a message.
        (json!({"op": "connect", "addr": "127.0.0.1:8080"}), None, "crashed"),
        (json!({"op": "read", "path": "/etc/passwd"}), None, "ok"),
    ];
    for (input, timeout_ms, status) in cases {
        let r = s.report("probe", &mallory, json!({"input": input, "timeout_ms": timeout_ms})).await;
        assert_eq!(r["status"], status, "{input}: {r}");
        if status == "ok" {
            assert_eq!(r["output"]["ok"], false, "{input} must fail inside the sandbox: {r}");
        }
        s.assert_healthy().await;
        assert_eq!(s.report("word-stats", &mallory, json!({"input": {"text": "fine"}})).await["status"], "ok");
    }
    let flood = s.report("probe", &mallory, json!({"input": {"op": "flood", "bytes": 3 << 20}})).await;
    assert_eq!(flood["truncated"]["stdout"], true);
    assert!(flood["stdout"].as_str().unwrap().len() <= 1 << 20);

    let breaches = s.get("/v1/audit?kind=limit_breach&user=mallory", &s.admin).await.json();
    let outcomes: Vec<&str> =
        breaches["records"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["memory_limit", "timeout", "cpu_limit"]);
    // Using nearly all of the tier's CPU share or memory raises alerts.
    let alerts = s.get("/v1/alerts", &s.admin).await.json();
    let rules: Vec<&str> =
        alerts["records"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert!(rules.contains(&"cpu_over_90_percent"), "{alerts}");
    let metrics = String::from_utf8(s.get("/metrics", "").await.body.to_vec()).unwrap();
    assert!(metrics.contains(r#"imagentx_calls_total{status="memory_limit",tier="free",tool="probe"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"imagentx_alerts_total{rule="cpu_over_90_percent"}"#));
    assert!(metrics.contains("imagentx_active_calls 0"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_over_the_caps_gets_429_with_retry_after_never_a_hang_or_a_5xx() {
    let mut policy = Policy::default();
    policy.tiers.get_mut("free").unwrap().requests_per_second = 1000;
    let s = TestServer::start_with(policy, |settings| settings.max_instances = 6).await;
    let alice = s.add_user("alice", "free", false).await; // 2 calls at once
    s.register("probe", "probe").await;
    let slow = json!({"input": {"op": "sleep", "ms": 1000}});

    let burst = (0..8).map(|_| s.invoke("probe", &alice, slow.clone()));
    let answers = futures::future::join_all(burst).await;
    let ok = answers.iter().filter(|a| a.status == StatusCode::OK).count();
    let limited: Vec<_> = answers.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(ok + limited.len(), 8);
    assert_eq!(ok, 2, "the free tier runs 2 calls at once");
    for a in &limited {
        assert_eq!(a.error_code(), "user_concurrency");
        assert!(a.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    }

    // The global cap (the pool's size) holds across users.
    let mut keys = Vec::new();
    for i in 0..4 {
        keys.push(s.add_user(&format!("u{i}"), "premium", false).await);
    }
    let burst = keys.iter().flat_map(|k| (0..3).map(|_| s.invoke("probe", k, slow.clone())));
    let answers = futures::future::join_all(burst).await;
    let busy = answers.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(answers.iter().filter(|a| a.status == StatusCode::OK).count(), 6);
    assert_eq!(busy, 6);
    assert!(answers.iter().filter(|a| a.status != StatusCode::OK).all(|a| a.error_code() == "server_busy"));

    // The request rate: a tier of 2 per second allows a burst of 4.
    let mut policy = Policy::default();
    policy.tiers.get_mut("free").unwrap().requests_per_second = 2;
    let r = TestServer::start_with(policy, |_| {}).await;
    let bob = r.add_user("bob", "free", false).await;
    let statuses: Vec<StatusCode> =
        futures::future::join_all((0..6).map(|_| r.get("/v1/tools", &bob))).await.iter().map(|a| a.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 4, "{statuses:?}");
    let limited = r.get("/v1/tools", &bob).await;
    assert_eq!((limited.status, limited.error_code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(r.get("/v1/tools", &bob).await.status, StatusCode::OK, "tokens come back");

    let metrics = String::from_utf8(s.get("/metrics", "").await.body.to_vec()).unwrap();
    assert!(metrics.contains(r#"imagentx_admission_rejections_total{reason="server_busy"} 6"#), "{metrics}");
    assert!(metrics.contains(r#"imagentx_admission_rejections_total{reason="user_concurrency"} 6"#), "{metrics}");
    s.stop().await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_makes_a_retry_answer_the_first_result() {
    let s = TestServer::start().await;
    let alice = s.add_user("alice", "standard", false).await;
    s.register("probe", "probe").await;
    let body = json!({"input": {"op": "work", "rounds": 1000}}).to_string();
    let call = async |key: &str, body: String| {
        s.request_with(Method::POST, "/v1/tools/probe/invoke", Some(&alice), body, &[("idempotency-key", key)]).await
    };
    let first = call("order-17", body.clone()).await;
    let retry = call("order-17", body.clone()).await;
    assert_eq!(first.json()["id"], retry.json()["id"]);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    let page = s.get("/v1/executions", &alice).await.json();
    assert_eq!(page["executions"].as_array().unwrap().len(), 1, "ran once");
    let other = call("order-17", json!({"input": {"op": "echo"}}).to_string()).await;
    assert_eq!(
        (other.status, other.error_code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    // Another user's identical key is theirs alone.
    let bob = s.add_user("bob", "standard", false).await;
    let bobs = s
        .request_with(
            Method::POST,
            "/v1/tools/probe/invoke",
            Some(&bob),
            body.clone(),
            &[("idempotency-key", "order-17")],
        )
        .await;
    assert_ne!(bobs.json()["id"], first.json()["id"]);

    // A retry while the first is still running is told so, not run twice.
    let slow = json!({"input": {"op": "sleep", "ms": 800}}).to_string();
    let (a, b) = tokio::join!(call("slow-1", slow.clone()), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        call("slow-1", slow.clone()).await
    });
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!((b.status, b.error_code().as_str()), (StatusCode::CONFLICT, "idempotency_key_in_use"));
    assert_eq!(call("slow-1", slow).await.json()["id"], a.json()["id"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_quota_holds_for_uploads_and_symlinks_planted_by_tools_are_never_followed() {
    let mut policy = Policy::default();
    policy.tiers.get_mut("free").unwrap().data_quota_bytes = 1000;
    let s = TestServer::start_with(policy, |_| {}).await;
    let alice = s.add_user("alice", "free", false).await;
    assert_eq!(s.request(Method::PUT, "/v1/files/a.bin", Some(&alice), vec![1u8; 600]).await.status, StatusCode::OK);
    let over = s.request(Method::PUT, "/v1/files/b.bin", Some(&alice), vec![1u8; 600]).await;
    assert_eq!((over.status, over.error_code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded"));
    assert!(!s.dir.path().join("users/alice/b.bin").exists());
    // Replacing a file counts only the difference.
    assert_eq!(s.request(Method::PUT, "/v1/files/a.bin", Some(&alice), vec![2u8; 900]).await.status, StatusCode::OK);
    let me = s.get("/v1/me", &alice).await.json();
    assert_eq!((me["data_used_bytes"].as_u64(), me["data_quota_bytes"].as_u64()), (Some(900), Some(1000)));

    // What a hostile tool (or user) could leave in their own directory.
    let home = s.dir.path().join("users/alice");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host-secret"), "host").unwrap();
    std::os::unix::fs::symlink(outside.path(), home.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", home.join("passwd")).unwrap();
    nix::unistd::mkfifo(&home.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for path in ["escape/host-secret", "passwd"] {
        assert_eq!(s.get(&format!("/v1/files/{path}"), &alice).await.error_code(), "bad_path", "{path}");
    }
    assert_eq!(s.request(Method::PUT, "/v1/files/escape/planted", Some(&alice), "x").await.error_code(), "bad_path");
    assert!(!outside.path().join("planted").exists());
    // A FIFO does not hang the server.
    assert_eq!(s.get("/v1/files/fifo", &alice).await.status, StatusCode::CONFLICT);
    // Writing over the link replaces the link; deleting it removes the link only.
    assert_eq!(s.request(Method::PUT, "/v1/files/passwd", Some(&alice), "mine").await.status, StatusCode::OK);
    assert!(std::fs::read_to_string("/etc/passwd").unwrap().contains("root"));
    assert_eq!(s.request(Method::DELETE, "/v1/files/escape", Some(&alice), Bytes::new()).await.status, StatusCode::OK);
    assert_eq!(std::fs::read_to_string(outside.path().join("host-secret")).unwrap(), "host");
    let listing = s.get("/v1/files", &alice).await.json();
    let names: Vec<&str> = listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a.bin", "fifo", "passwd"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_parses_and_covers_every_route() {
    let s = TestServer::start().await;
    let doc = s.get("/openapi.json", "").await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = imagentx_sandbox::api::routes();
    for route in &routes {
        let path = route.path.replace("{*", "{");
        let op = &doc["paths"][&path][route.method];
        assert!(op.is_object(), "{} {} missing from the document", route.method, route.path);
        assert!(op["responses"]["200"].is_object());
    }
    // DESIGN.md's routes are all there.
    for (method, path) in [
        ("post", "/v1/tools"),
        ("get", "/v1/tools"),
        ("get", "/v1/tools/{name}"),
        ("delete", "/v1/tools/{name}"),
        ("post", "/v1/tools/{name}/invoke"),
        ("get", "/v1/executions/{id}"),
        ("get", "/v1/executions"),
        ("get", "/v1/files/{path}"),
        ("put", "/v1/files/{path}"),
        ("delete", "/v1/files/{path}"),
        ("get", "/v1/audit"),
        ("get", "/metrics"),
        ("get", "/healthz"),
        ("get", "/openapi.json"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    // Every schema reference resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(doc["components"]["schemas"][name].is_object(), "dangling $ref {name}");
    }
    let report = &doc["paths"]["/v1/tools/{name}/invoke"]["post"]["responses"]["200"]["content"]["application/json"];
    assert!(text.contains("\"ExecutionReport\""), "{report}");
    assert_eq!(s.get("/readyz", "").await.json()["status"], "ready");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_calls_in_flight_finish_and_records_them() {
    let s = TestServer::start().await;
    let alice = s.add_user("alice", "standard", false).await;
    s.register("probe", "probe").await;
    let state = s.state.clone();
    let client = s.invoke("probe", &alice, json!({"input": {"op": "sleep", "ms": 600}}));
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let in_flight = s.state.admission.in_flight();
        s.trigger_stop();
        in_flight
    };
    let (answer, in_flight) = tokio::join!(client, stopper);
    assert_eq!(in_flight, 1);
    assert_eq!(answer.json()["status"], "ok", "the call in flight finished after the stop was asked");
    s.stop().await;
    let page = state.store.executions("alice", 10, None).await.unwrap();
    assert_eq!(page.executions.len(), 1, "and it was recorded");
}

/// The quota holds during the call (SECURITY.md, "Disk"): a write that would
/// pass it is cut at the quota, the next is refused, the report names the limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_tool_cannot_write_past_the_data_quota_and_the_report_says_so() {
    let mut policy = Policy::default();
    policy.tiers.get_mut("free").unwrap().data_quota_bytes = 1000;
    let s = TestServer::start_with(policy, |_| {}).await;
    let alice = s.add_user("alice", "free", false).await;
    s.register("probe", "probe").await;
    let write = |path: &str, len: usize| json!({"input": {"op": "write", "path": path, "content": "x".repeat(len)}});

    // 1200 bytes into a quota of 1000: the first 1000 land, the rest is refused.
    let r = s.report("probe", &alice, write("/data/first.txt", 1200)).await;
    assert_eq!((r["status"].as_str(), r["output"]["ok"].as_bool()), (Some("ok"), Some(false)), "{r}");
    assert_eq!(r["usage"]["limits_hit"], json!(["data_quota"]), "{r}");
    assert_eq!(r["usage"]["bytes_written"], 1000, "{r}");
    assert_eq!(std::fs::metadata(s.dir.path().join("users/alice/first.txt")).unwrap().len(), 1000);

    // Full: a new file's first write is refused with the quota's own error; reading still works.
    let r = s.report("probe", &alice, write("/data/second.txt", 10)).await;
    assert_eq!(r["output"]["ok"], false, "{r}");
    assert!(r["output"]["error"].as_str().unwrap().to_lowercase().contains("quota"), "{r}");
    assert_eq!(std::fs::metadata(s.dir.path().join("users/alice/second.txt")).unwrap().len(), 0);
    let r = s.report("probe", &alice, json!({"input": {"op": "read", "path": "/data/first.txt"}})).await;
    assert_eq!(r["output"]["content"].as_str().unwrap().len(), 1000);
    // /tmp is not /data: still writable.
    let r = s.report("probe", &alice, write("/tmp/scratch.txt", 10)).await;
    assert_eq!(r["output"]["ok"], true);
    // The files API refuses too, and freeing space gives writing back at once.
    let put = s.request(Method::PUT, "/v1/files/more.txt", Some(&alice), "y").await;
    assert_eq!(put.error_code(), "quota_exceeded");
    let deleted = s.request(Method::DELETE, "/v1/files/first.txt", Some(&alice), Bytes::new()).await;
    assert_eq!(deleted.status, StatusCode::OK);
    let r = s.report("probe", &alice, write("/data/second.txt", 10)).await;
    assert_eq!((r["output"]["ok"].as_bool(), &r["error"]), (Some(true), &Value::Null), "{r}");
    assert_eq!(r["usage"]["limits_hit"], json!([]), "{r}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start_with(Policy::default(), |settings| settings.header_read_timeout_ms = 300).await;
    let mut slow = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let mut buf = [0u8; 1024];
    let cut = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    let read = cut.expect("the server did not cut the slow client off");
    // Closed (0 bytes, or a reset), or told off with a 408 and then closed.
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"), "{:?}", &buf[..n]),
    }
    s.assert_healthy().await;
    s.stop().await;
}

/// A module damaged on disk (its bytes no longer its SHA-256) or gone is
/// never run: the restarted server leaves it out, says so in an alert and a
/// metric, and answers its callers 503 `tool_unavailable` with why; the
/// other tools serve as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_or_missing_module_is_refused_at_start_and_its_callers_are_told() {
    let s = TestServer::start().await;
    let damaged = s.register("probe", "damaged").await;
    let missing = s.register("word-stats", "missing").await;
    // (Blobs are content-addressed: `fine` must be another module.)
    s.register("sdk-probe", "fine").await;
    // A text module is stored as sent and known by its binary form's hash: it loads again.
    let text = r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                   (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const 0))))"#;
    let registered = s.request(Method::POST, "/v1/tools?name=text", Some(&s.admin), text).await;
    assert_eq!(registered.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&registered.body));
    let alice = s.add_user("alice", "free", false).await;
    let dir = s.stop_keeping_data().await;
    let blob = |row: &Value| dir.path().join(format!("blobs/{}.wasm", row["sha256"].as_str().unwrap()));
    // Another valid module in its place (what a bit flip or a tamperer leaves), and one deleted.
    std::fs::write(blob(&damaged), common::guest_bytes("sdk-probe")).unwrap();
    std::fs::remove_file(blob(&missing)).unwrap();

    let settings = imagentx_sandbox::api::ServerSettings {
        data_dir: dir.path().to_owned(),
        max_instances: 32,
        ..Default::default()
    };
    let s = TestServer::start_in(dir, Policy::default(), settings).await;
    for (tool, says) in [("damaged", "does not match its sha256"), ("missing", "cannot be read")] {
        let a = s.invoke(tool, &alice, json!({"input": {"op": "echo"}})).await;
        assert_eq!((a.status, a.error_code()), (StatusCode::SERVICE_UNAVAILABLE, "tool_unavailable".to_owned()));
        let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says) && message.contains("version 1"), "{message}");
    }
    assert_eq!(s.report("fine", &alice, json!({"input": {"op": "echo", "text": "hi"}})).await["status"], "ok");
    assert_eq!(s.report("text", &alice, json!({})).await["status"], "ok");
    let alerts = s.get("/v1/alerts", &s.admin).await.json();
    let tools: Vec<&str> = alerts["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "tool_unloadable")
        .map(|r| r["tool"].as_str().unwrap())
        .collect();
    assert_eq!(tools.len(), 2, "{alerts}");
    assert!(tools.contains(&"damaged") && tools.contains(&"missing"));
    let metrics =
        String::from_utf8(s.request(Method::GET, "/metrics", None, Bytes::new()).await.body.to_vec()).unwrap();
    assert!(metrics.contains("imagentx_tools_unloadable 2"), "{metrics}");
    // An unknown tool is still a 404.
    assert_eq!(s.invoke("nothing", &alice, json!({})).await.error_code(), "unknown_tool");

    // Registered again, the damaged one is mended (its blob replaced); retired, the missing one is gone.
    let again = s.register("probe", "damaged").await;
    assert_eq!(again["version"], 2);
    assert_eq!(s.report("damaged", &alice, json!({"input": {"op": "echo"}})).await["status"], "ok");
    let blob = std::fs::read(s.dir.path().join(format!("blobs/{}.wasm", again["sha256"].as_str().unwrap()))).unwrap();
    assert_eq!(blob, common::guest_bytes("probe"));
    let retired = s.request(Method::DELETE, "/v1/tools/missing", Some(&s.admin), Bytes::new()).await;
    assert_eq!(retired.status, StatusCode::OK, "{}", String::from_utf8_lossy(&retired.body));
    assert_eq!(s.invoke("missing", &alice, json!({})).await.error_code(), "unknown_tool");
    let metrics =
        String::from_utf8(s.request(Method::GET, "/metrics", None, Bytes::new()).await.body.to_vec()).unwrap();
    assert!(metrics.contains("imagentx_tools_unloadable 0"), "{metrics}");
}
