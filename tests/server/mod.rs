//! A real server on a loopback port, with a temporary data directory, and a
//! small HTTP client for it. Used by the API tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use imagentx_sandbox::api::{AppState, ServerSettings};
use imagentx_sandbox::policy::{Policy, UserId};
use serde_json::Value;

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub dir: tempfile::TempDir,
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    task: Option<tokio::task::JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
    pub admin: String,
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {}", self.status, String::from_utf8_lossy(&self.body)))
    }

    /// The error code of an `{"error": {"code", "message"}}` answer, after
    /// checking the shape and that the message says something.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(!message.is_empty(), "empty error message: {v}");
        v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code: {v}")).to_owned()
    }
}

impl Drop for TestServer {
    /// Users' volumes are mounted in the test process's namespace: unmount
    /// them before the data directory is removed.
    fn drop(&mut self) {
        self.state.registry.stop_warm_pools(std::time::Duration::from_secs(5));
        if let Some(volumes) = self.state.sandbox.data_dir.volumes() {
            volumes.unmount_all();
        }
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Policy::default(), |_| {}).await
    }

    pub async fn start_with(policy: Policy, tweak: impl FnOnce(&mut ServerSettings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = ServerSettings { data_dir: dir.path().to_owned(), max_instances: 32, ..Default::default() };
        tweak(&mut settings);
        Self::start_in(dir, policy, settings).await
    }

    pub async fn start_in(dir: tempfile::TempDir, policy: Policy, settings: ServerSettings) -> Self {
        let state = AppState::open(policy, settings).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(imagentx_sandbox::api::run(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        let task = tokio::spawn(async move {
            task.await.unwrap().unwrap();
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        let mut server = Self {
            addr,
            state,
            dir,
            stop: std::sync::Mutex::new(Some(stop)),
            task: Some(task),
            client,
            admin: String::new(),
        };
        // A restarted server's database already has `root`.
        let admin = if server.state.store.list_users().await.unwrap().iter().any(|u| u.id.as_str() == "root") {
            "root-again"
        } else {
            "root"
        };
        server.admin = server.add_user(admin, "premium", true).await;
        server
    }

    /// Adds a user straight in the database; answers their key.
    pub async fn add_user(&self, name: &str, tier: &str, admin: bool) -> String {
        let key = self.state.store.add_user(UserId::new(name).unwrap(), tier.into(), admin, "test".into()).await;
        key.unwrap().key
    }

    /// Asks the server to stop (as SIGTERM would), without waiting.
    pub fn trigger_stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
    }

    /// Asks the server to stop and waits until it has.
    pub async fn stop(mut self) {
        self.trigger_stop();
        self.task.take().unwrap().await.unwrap();
    }

    /// Stops the server and hands back its data directory (for a restart).
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.trigger_stop();
        self.task.take().unwrap().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub async fn request(&self, method: Method, path: &str, key: Option<&str>, body: impl Into<Bytes>) -> Answer {
        self.request_with(method, path, key, body, &[]).await
    }

    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(format!("http://{}{path}", self.addr));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self.client.request(req.body(Full::new(body.into())).unwrap()).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            // 503 and 507 are deliberate answers (busy, draining, a full disk); other 5xx are bugs.
            status.as_u16() < 500
                || status == StatusCode::SERVICE_UNAVAILABLE
                || status == StatusCode::INSUFFICIENT_STORAGE,
            "{status} for {path}: {}",
            String::from_utf8_lossy(&body)
        );
        Answer { status, headers, body }
    }

    pub async fn get(&self, path: &str, key: &str) -> Answer {
        self.request(Method::GET, path, Some(key), Bytes::new()).await
    }

    /// Registers a guest as `name` (admin); answers the registered row.
    pub async fn register(&self, guest: &str, name: &str) -> Value {
        let bytes = crate::common::guest_bytes(guest);
        let a = self.request(Method::POST, &format!("/v1/tools?name={name}"), Some(&self.admin), bytes).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&a.body));
        a.json()
    }

    pub async fn invoke(&self, tool: &str, key: &str, body: Value) -> Answer {
        self.request(Method::POST, &format!("/v1/tools/{tool}/invoke"), Some(key), body.to_string()).await
    }

    /// Invokes and expects a report (200); answers it.
    pub async fn report(&self, tool: &str, key: &str, body: Value) -> Value {
        let a = self.invoke(tool, key, body).await;
        assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
        a.json()
    }

    /// The server still answers and still runs tools.
    pub async fn assert_healthy(&self) {
        assert_eq!(self.get("/healthz", "").await.status, StatusCode::OK);
    }
}

/// One request to a server run as a separate process.
pub async fn http(addr: &str, method: Method, path: &str, key: &str, body: impl Into<Bytes>) -> Answer {
    http_with(addr, method, path, key, body, &[]).await
}

/// `http`, with these headers too.
pub async fn http_with(
    addr: &str,
    method: Method,
    path: &str,
    key: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Answer {
    try_http(addr, method, path, key, body, headers).await.unwrap()
}

/// `http_with`, answering why when no answer came (no connection, a
/// connection cut mid-way): for servers that may die under the request.
pub async fn try_http(
    addr: &str,
    method: Method,
    path: &str,
    key: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {key}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).map_err(|e| e.to_string())?;
    // A server that hangs fails the test instead of hanging it.
    let answer = async {
        let response = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer { status, headers, body })
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), answer)
        .await
        .map_err(|_| "no answer within 60 s".to_owned())?
}
