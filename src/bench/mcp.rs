//! MCP `tools/call` of a trivial tool (the SDK probe's echo), one client,
//! warm, one call at a time: over stdio (`imagentx-sandbox mcp`, the client
//! speaking JSON-RPC lines on its pipes) and over Streamable HTTP (`/mcp` of
//! the `serve` process, one session, keep-alive), beside the same server's
//! own `POST /v1/tools/{name}/invoke` on the same connection. Every call is
//! recorded in SQLite, as for any face. A peer (Wassette) over stdio when
//! `IMAGENTX_BENCH_WASSETTE` names its binary and `IMAGENTX_BENCH_WASSETTE_TOOL`
//! a component it serves (see BENCHMARKS.md).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Harness, Sample, Series, Suite, Who};

/// A JSON-RPC client on a child's stdin and stdout, one line a message.
struct JsonRpcPipe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

impl Drop for JsonRpcPipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl JsonRpcPipe {
    fn start(command: &mut Command) -> anyhow::Result<Self> {
        let mut child =
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut client = Self { child, stdin, stdout, next_id: 0 };
        let init = client.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}),
        )?;
        anyhow::ensure!(init.get("result").is_some(), "initialize: {init}");
        client.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        Ok(client)
    }

    fn send(&mut self, message: &Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(message)?;
        line.push(b'\n');
        self.stdin.write_all(&line)?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Sends a request and reads until its answer (skipping notifications).
    fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        let mut line = String::new();
        loop {
            line.clear();
            anyhow::ensure!(self.stdout.read_line(&mut line)? > 0, "the server closed its stdout");
            let message: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
            if message.get("id").and_then(Value::as_u64) == Some(id) {
                return Ok(message);
            }
        }
    }
}

/// The first tool a server lists that is not a built-in interpreter, and
/// its arguments for the echo (wrapped in `input` when its schema says so).
fn echo_call(tools: &Value) -> anyhow::Result<(String, Value)> {
    let tool = tools["result"]["tools"]
        .as_array()
        .and_then(|t| t.iter().find(|t| !matches!(t["name"].as_str(), Some("python" | "javascript"))))
        .with_context(|| format!("no tool listed: {tools}"))?;
    let name = tool["name"].as_str().unwrap_or_default().to_owned();
    let input = json!({"op": "echo", "text": "hi"});
    let wrapped = tool["inputSchema"]["properties"].get("input").is_some();
    Ok((name, if wrapped { json!({"input": input}) } else { input }))
}

/// A result that is not an error (`isError` absent means false).
fn answered_ok(answer: &Value) -> bool {
    answer["result"].is_object() && answer["result"]["isError"] != true
}

pub fn run(h: &mut Harness) -> anyhow::Result<()> {
    let n = h.size.pick(2000, 300, 20);
    let dir = h.scratch.path().join("mcp");
    std::fs::create_dir_all(&dir)?;
    let (probe, _) = super::guest(h, "sdk_probe")?;
    let config = dir.join("bench.toml");
    std::fs::write(&config, super::http::CONFIG)?;

    // stdio: our `mcp` command with the probe given on its command line.
    let stdio_case = "MCP tools/call over stdio, trivial SDK tool";
    let mut ours = JsonRpcPipe::start(
        Command::new(super::this_binary()?)
            .args(["mcp", "--user", "bench", "--tier", "bench", "--data-dir"])
            .arg(dir.join("stdio"))
            .arg("--config")
            .arg(&config)
            .arg("--tool")
            .arg(&probe)
            .env(crate::interpreters::DIR_VAR, dir.join("no-interpreters")),
    )?;
    let tools = ours.request("tools/list", json!({}))?;
    let (name, arguments) = echo_call(&tools)?;
    let samples = stdio_series(&mut ours, &name, &arguments, n)?;
    drop(ours);
    push(h, stdio_case, Who::Ours, samples);

    match (std::env::var_os("IMAGENTX_BENCH_WASSETTE"), std::env::var_os("IMAGENTX_BENCH_WASSETTE_TOOL")) {
        (Some(bin), Some(tool)) => {
            let case = "Wassette tools/call over stdio, trivial component";
            // Its plugin directory holds a component exporting `echo: func(msg: string) -> string`.
            let mut peer = JsonRpcPipe::start(
                Command::new(bin).args(["serve", "--stdio", "--plugin-dir"]).arg(&tool).env("RUST_LOG", "off"),
            )?;
            let tools = peer.request("tools/list", json!({}))?;
            let listed = tools["result"]["tools"].as_array().is_some_and(|t| t.iter().any(|t| t["name"] == "echo"));
            anyhow::ensure!(listed, "Wassette lists no `echo` tool: {tools}");
            let samples = stdio_series(&mut peer, "echo", &json!({"msg": "hi"}), n)?;
            push(h, case, Who::Peer, samples);
            h.ratio(Suite::Mcp, stdio_case, case, 1);
        }
        _ => h.skip(
            "Wassette over stdio: not built here (set IMAGENTX_BENCH_WASSETTE to its binary and \
             IMAGENTX_BENCH_WASSETTE_TOOL to a directory with its component; see BENCHMARKS.md)",
        ),
    }

    // Streamable HTTP: one session on one keep-alive connection, beside the
    // same server's own invoke route.
    let rt = super::runtime()?;
    let http_dir = dir.join("http");
    std::fs::create_dir_all(&http_dir)?;
    let (server, admin, key) = super::http::start(&http_dir, None)?;
    let addr = server.addr.clone();
    let (http_samples, invoke_samples) = rt.block_on(async {
        let mut sender = super::http::connect(&addr).await?;
        let (status, body) = super::http::send(
            &mut sender,
            Method::POST,
            "/v1/tools?name=trivial",
            &admin,
            std::fs::read(&probe)?.into(),
        )
        .await?;
        anyhow::ensure!(status == StatusCode::CREATED, "registering: {status} {}", String::from_utf8_lossy(&body));
        let session = http_session(&mut sender, &key).await?;
        let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                          "params": {"name": "trivial", "arguments": {"input": {"op": "echo", "text": "hi"}}}});
        let call = Bytes::from(call.to_string());
        let (mcp, _) = super::sequential("MCP over HTTP", 50, n, async || {
            let answer = mcp_post(&mut sender, &key, Some(&session), call.clone()).await;
            answer.is_ok_and(|(status, body)| status == StatusCode::OK && contains(&body, br#""isError":false"#))
        })
        .await;
        let body = Bytes::from_static(br#"{"input":{"op":"echo","text":"hi"}}"#);
        let (invoke, _) = super::sequential("invoke over HTTP", 50, n, async || {
            let answer =
                super::http::send(&mut sender, Method::POST, "/v1/tools/trivial/invoke", &key, body.clone()).await;
            answer.is_ok_and(|(status, body)| status == StatusCode::OK && contains(&body, br#""status":"ok""#))
        })
        .await;
        anyhow::Ok((mcp, invoke))
    })?;
    drop(server);
    let http_case = "MCP tools/call over Streamable HTTP, trivial SDK tool";
    let invoke_case = "POST /v1/tools/{name}/invoke, same server and connection";
    push(h, http_case, Who::Ours, http_samples);
    push(h, invoke_case, Who::Ours, invoke_samples);
    h.ratio(Suite::Mcp, http_case, invoke_case, 1);
    Ok(())
}

fn stdio_series(client: &mut JsonRpcPipe, name: &str, arguments: &Value, n: usize) -> anyhow::Result<Vec<Sample>> {
    let params = json!({"name": name, "arguments": arguments});
    for _ in 0..50 {
        let answer = client.request("tools/call", params.clone())?;
        anyhow::ensure!(answered_ok(&answer), "tools/call: {answer}");
    }
    let progress = super::Progress::new("MCP over stdio", n);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let ok = client.request("tools/call", params.clone()).is_ok_and(|a| answered_ok(&a));
        samples.push(Sample { latency: t.elapsed(), ok });
        progress.tick();
    }
    Ok(samples)
}

fn push(h: &mut Harness, case: &str, who: Who, samples: Vec<Sample>) {
    let elapsed: Duration = samples.iter().map(|s| s.latency).sum();
    h.push(Series { samples, elapsed, ..Series::new(Suite::Mcp, case, who, 1) });
}

fn contains(body: &[u8], needle: &[u8]) -> bool {
    body.windows(needle.len()).any(|w| w == needle)
}

/// Opens an MCP session: `initialize`, then `notifications/initialized`.
async fn http_session(sender: &mut super::http::Sender, key: &str) -> anyhow::Result<String> {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                 "clientInfo": {"name": "bench", "version": "0"}}});
    let req = mcp_request(key, None, Bytes::from(init.to_string()))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let session = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .context("no Mcp-Session-Id")?;
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await?;
    let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    mcp_post(sender, key, Some(&session), Bytes::from(done.to_string())).await?;
    Ok(session)
}

fn mcp_request(
    key: &str,
    session: Option<&str>,
    body: Bytes,
) -> anyhow::Result<hyper::Request<http_body_util::Full<Bytes>>> {
    let mut req = hyper::Request::builder()
        .method(Method::POST)
        .uri("/mcp")
        .header("host", "bench")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(id) = session {
        req = req.header("mcp-session-id", id);
    }
    Ok(req.body(http_body_util::Full::new(body))?)
}

async fn mcp_post(
    sender: &mut super::http::Sender,
    key: &str,
    session: Option<&str>,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = mcp_request(key, session, body)?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes()))
}
