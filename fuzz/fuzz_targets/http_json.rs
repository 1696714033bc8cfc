//! The HTTP API's request bodies, headers and paths, through the server's
//! real router and state (SQLite, the engine, a registered tool): whatever a
//! client sends, the answer is never a 5xx, never a panic, and every refusal
//! is a JSON error with a code and a message. (schemathesis drives the same
//! API from its OpenAPI document in `tests/schemathesis.rs`; this goes below
//! the document: bytes that are not JSON, odd keys, odd paths.)

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use imagentx_sandbox::api::behaviour::{Action, RuleResponse};
use imagentx_sandbox::api::{AppState, ServerSettings, router};
use imagentx_sandbox::behaviour::Rule;
use imagentx_sandbox::policy::{Policy, UserId};
use imagentx_sandbox::volume::VolumeMode;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// A WASI preview 1 command that prints `{"ok":true}`.
const ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{\"ok\":true}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 11))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

#[derive(Arbitrary, Debug)]
enum Call {
    Invoke { body: Vec<u8>, idempotency_key: Option<String> },
    Files { method: u8, path: String, body: Vec<u8> },
    Audit { query: String },
    Suspend { body: Vec<u8> },
    Session { body: Vec<u8> },
    Register { query: String, body: Vec<u8>, json: bool },
    Any { method: u8, path: String, body: Vec<u8>, admin: bool },
}

struct Server {
    rt: tokio::runtime::Runtime,
    state: Arc<AppState>,
    admin: String,
    user: String,
    _dir: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a data directory");
        let mut settings = ServerSettings {
            data_dir: dir.path().to_owned(),
            max_instances: 8,
            builtin_tools: false,
            data_volumes: VolumeMode::Off,
            ..ServerSettings::default()
        };
        // Behaviour rules only alert: fuzzed `..` paths are escape attempts,
        // and a suspended or throttled alice would answer 403 or 429 to all.
        for rule in Rule::ALL {
            let alert = RuleResponse { actions: vec![Action::Alert], for_s: 1, throttle_rps: 1 };
            settings.response.rules.insert(rule.as_str().to_owned(), alert);
        }
        // A tier far above the fuzzer's rate (else most answers are 429
        // `rate`), with a small quota (a data directory in /tmp).
        let mut policy = Policy::default();
        let mut tier = policy.tiers["standard"].clone();
        tier.requests_per_second = 1_000_000;
        tier.concurrent_calls = 64;
        tier.data_quota_bytes = 4 << 20;
        tier.data_files = 256;
        policy.tiers.insert("fuzz".into(), tier);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (state, admin, user) = rt.block_on(async {
            let state = AppState::open(policy, settings).await.expect("the server's state");
            let key = |name: &str, admin: bool| {
                let state = Arc::clone(&state);
                let name = UserId::new(name).unwrap();
                async move { state.store.add_user(name, "fuzz".into(), admin, "fuzz".into()).await.unwrap().key }
            };
            let (admin, user) = (key("root", true).await, key("alice", false).await);
            let module = wat::parse_str(ECHO).unwrap();
            let (uri, wasm) = ("/v1/tools?name=echo", "application/wasm");
            let answer = send(&state, Method::POST, uri, Some(&admin), module, None, wasm).await.unwrap();
            assert_eq!(answer.0, StatusCode::CREATED, "registering the tool: {}", String::from_utf8_lossy(&answer.1));
            (state, admin, user)
        });
        Server { rt, state, admin, user, _dir: dir }
    })
}

const JSON: &str = "application/json";

/// The answer of the router to one request (`None`: a header no client could send).
async fn send(
    state: &Arc<AppState>,
    method: Method,
    uri: &str,
    key: Option<&str>,
    body: Vec<u8>,
    idempotency_key: Option<&str>,
    content_type: &str,
) -> Option<(StatusCode, Vec<u8>)> {
    let mut request = Request::builder().method(method).uri(uri).header("content-type", content_type);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if let Some(k) = idempotency_key {
        request = request.header("idempotency-key", k);
    }
    // A header no client could send (a control character in it): nothing to test.
    let mut request = request.body(Body::from(body)).ok()?;
    request.extensions_mut().insert(axum::extract::ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
    let response = router(Arc::clone(state)).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    Some((status, bytes))
}

fn method(n: u8) -> Method {
    [Method::GET, Method::PUT, Method::POST, Method::DELETE, Method::PATCH, Method::HEAD][usize::from(n) % 6].clone()
}

/// Percent-encodes what a URI cannot carry, so that odd paths reach the router.
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b'%' | b'=' | b'&' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fuzz_target!(|call: Call| {
    let s = server();
    let (admin, user) = (Some(s.admin.as_str()), Some(s.user.as_str()));
    let answer = s.rt.block_on(async {
        match &call {
            Call::Invoke { body, idempotency_key } => {
                let key = idempotency_key.as_deref();
                send(&s.state, Method::POST, "/v1/tools/echo/invoke", user, body.clone(), key, JSON).await
            }
            Call::Files { method: m, path, body } => {
                let uri = format!("/v1/files/{}", escape(path));
                send(&s.state, method(*m), &uri, user, body.clone(), None, JSON).await
            }
            Call::Audit { query } => {
                let uri = format!("/v1/audit?{}", escape(query));
                send(&s.state, Method::GET, &uri, admin, Vec::new(), None, JSON).await
            }
            Call::Suspend { body } => {
                send(&s.state, Method::POST, "/v1/users/alice/suspend", admin, body.clone(), None, JSON).await
            }
            Call::Session { body } => {
                send(&s.state, Method::POST, "/v1/sessions", user, body.clone(), None, JSON).await
            }
            Call::Register { query, body, json } => {
                let uri = format!("/v1/tools?{}", escape(query));
                let content_type = if *json { "application/json" } else { "application/wasm" };
                send(&s.state, Method::POST, &uri, admin, body.clone(), None, content_type).await
            }
            // As the admin, only reads: a fuzzed DELETE would retire `echo`
            // or revoke a key, and every later input would test less.
            Call::Any { method: m, path, body, admin: as_admin } => {
                let uri = format!("/{}", escape(path));
                let (key, m) = if *as_admin { (admin, Method::GET) } else { (user, method(*m)) };
                send(&s.state, m, &uri, key, body.clone(), None, JSON).await
            }
        }
    });
    let Some((status, body)) = answer else { return };
    // A native tool's spec registers only where the jail can run; elsewhere
    // its refusal is the documented 503 `native_unavailable`.
    let native_unavailable = status == StatusCode::SERVICE_UNAVAILABLE
        && serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v["error"]["code"] == "native_unavailable");
    assert!(
        !status.is_server_error() || native_unavailable,
        "{status} for {call:?}: {}",
        String::from_utf8_lossy(&body)
    );
    // The routes' own refusals (not the router's 404 or 405 for a made-up
    // path or method) are JSON errors that say something.
    if status.is_client_error() && !matches!(call, Call::Any { .. } | Call::Files { .. }) {
        let error: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{status} for {call:?} is not JSON ({e}): {}", String::from_utf8_lossy(&body)));
        let (code, message) = (&error["error"]["code"], &error["error"]["message"]);
        assert!(code.is_string() && message.as_str().is_some_and(|m| !m.is_empty()), "{status} for {call:?}: {error}");
    }
    // A suspended alice would make every later call a 403: lift it.
    if matches!(call, Call::Suspend { .. }) && status.is_success() {
        let lifted =
            s.rt.block_on(send(&s.state, Method::POST, "/v1/users/alice/unsuspend", admin, Vec::new(), None, JSON));
        assert_eq!(lifted.map(|(status, _)| status), Some(StatusCode::OK), "lifting the suspension");
    }
});
