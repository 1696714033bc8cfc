//! The Model Context Protocol face of the service, on the official Rust SDK
//! (`rmcp`): Streamable HTTP at `/mcp` on `serve` (the same Bearer keys as
//! the HTTP API, checked before any MCP processing), and stdio for a local
//! client (`imagentx-sandbox mcp`). One handler for both.
//!
//! - `tools/list`: the registry's tools (newest versions), their descriptions
//!   and input schemas, with annotations from what the sandbox knows: no
//!   network (closed world), `/data` writable (not read-only).
//! - `tools/call`: exactly the HTTP API's invoke path ([`Prepared`]):
//!   admission, tier limits, the execution record, audit and metrics. A
//!   report whose status is not `ok` is a tool result with `isError: true`
//!   naming the status and the error, never a protocol error; so is a call
//!   refused for the caller's rate or concurrency (a model can wait and
//!   retry). An unknown tool or a bad timeout is a protocol error.
//! - `resources/list` and `resources/read`: the caller's `/data` files, as
//!   `file:///data/<path>`, through the files API's hardened path.
//! - `notifications/tools/list_changed` to every session (and stdio client)
//!   when a tool is registered or retired.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelledNotificationParam, ContentBlock, ErrorCode,
    Extensions, Implementation, JsonObject, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, RequestId,
    Resource, ResourceContents, ServerCapabilities, ServerConfig, SubscriptionFilter, Tool, ToolAnnotations,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

use super::invoke::{InvokeRequest, Prepared};
use super::registry::{BUILTIN_REGISTRAR, Registered, Runnable};
use super::{ApiError, AppState};
use crate::report::{ExecutionReport, Status};
use crate::store::Caller;
use crate::userfs::{Node, read_all};

/// An MCP session over HTTP idle this long is closed.
pub const SESSION_IDLE: Duration = Duration::from_secs(300);
/// MCP sessions open at once, over all users: past it a new one is refused
/// (503) until idle ones expire. Each holds a task and small buffers.
pub const MAX_SESSIONS: usize = 10_000;

/// MCP sessions one user may have open at once.
pub const MAX_SESSIONS_PER_USER: usize = 100;

/// The server's MCP sessions over HTTP.
pub struct Sessions {
    manager: Arc<LocalSessionManager>,
    /// Who opened each session: only they may use it (its id is no key).
    owners: Mutex<HashMap<String, crate::policy::UserId>>,
    /// Cancelled at shutdown: ends every session (their event streams would
    /// otherwise hold the shutdown for its whole grace).
    pub(crate) closing: tokio_util::sync::CancellationToken,
}

impl Default for Sessions {
    fn default() -> Self {
        let mut manager = LocalSessionManager::default();
        manager.session_config.keep_alive = Some(SESSION_IDLE);
        Self {
            manager: Arc::new(manager),
            owners: Mutex::default(),
            closing: tokio_util::sync::CancellationToken::new(),
        }
    }
}

impl Sessions {
    /// Sessions open now: all of them, and `user`'s. Forgets the owners of
    /// sessions that have ended.
    pub async fn open(&self, user: &crate::policy::UserId) -> (usize, usize) {
        let live = self.manager.sessions.read().await;
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        owners.retain(|id, _| live.contains_key(id.as_str()));
        (live.len(), owners.values().filter(|owner| *owner == user).count())
    }

    /// Whether `user` may use the session `id` (sessions this server did not
    /// see opened are rmcp's to refuse).
    fn usable_by(&self, id: &str, user: &crate::policy::UserId) -> bool {
        let owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        owners.get(id).is_none_or(|owner| owner == user)
    }
}

/// The Streamable HTTP service for `/mcp`. Put [`authenticate`] in front of
/// it: the handler serves only requests that carry their caller.
pub fn http_service(state: Arc<AppState>) -> StreamableHttpService<McpServer, LocalSessionManager> {
    // Keys, not the Host header, say who may call: the server may sit behind
    // a proxy under any name.
    let mut config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    config.max_request_body_bytes =
        state.sandbox.policy.input_bytes.saturating_add(super::invoke::INVOKE_ENVELOPE_BYTES);
    config.cancellation_token = state.mcp.closing.clone();
    let manager = Arc::clone(&state.mcp.manager);
    StreamableHttpService::new(move || Ok(McpServer::for_http(Arc::clone(&state))), manager, config)
}

/// The Bearer check in front of `/mcp`, before any MCP processing: the same
/// keys, rate and audit of refusals as the HTTP API. The caller rides along
/// in the request's extensions.
pub async fn authenticate(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (mut parts, body) = request.into_parts();
    let caller = match super::auth::authenticate(&parts, &state).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let session = parts.headers.get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(id) = &session
        && !state.mcp.usable_by(id, &caller.user)
    {
        // Another user's session is answered like one that does not exist.
        return ApiError::not_found("unknown_session", "no such MCP session").into_response();
    }
    let opening = parts.method == axum::http::Method::POST && session.is_none();
    if opening {
        let (all, mine) = state.mcp.open(&caller.user).await;
        if all >= MAX_SESSIONS {
            let message =
                format!("{MAX_SESSIONS} MCP sessions are open; idle ones close after {} s", SESSION_IDLE.as_secs());
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_sessions", message).into_response();
        }
        if mine >= MAX_SESSIONS_PER_USER {
            let message = format!(
                "you have {MAX_SESSIONS_PER_USER} MCP sessions open; close one (DELETE) or let it idle out \
                 ({} s)",
                SESSION_IDLE.as_secs()
            );
            let mut refused = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", message);
            refused.retry_after = Some(SESSION_IDLE.as_secs());
            return refused.into_response();
        }
    }
    let user = caller.user.clone();
    parts.extensions.insert(caller);
    let response = next.run(axum::extract::Request::from_parts(parts, body)).await;
    if opening && let Some(id) = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        state.mcp.owners.lock().unwrap_or_else(PoisonError::into_inner).insert(id.to_owned(), user);
    }
    response
}

/// Serves MCP on stdin and stdout for `caller` until the client closes
/// them, then lets calls in flight finish (within the shutdown grace) and
/// closes the database.
///
/// # Errors
///
/// The protocol could not start (the client's first messages were not MCP).
pub async fn serve_stdio(state: Arc<AppState>, caller: Caller) -> Result<(), String> {
    use rmcp::ServiceExt;
    // Usage rollups are written as under `serve` (else they pile up in memory).
    let rollups = tokio::spawn(super::stats::keep(Arc::clone(&state)));
    let served = match McpServer::for_local(Arc::clone(&state), caller).serve(rmcp::transport::stdio_pipes()).await {
        Ok(running) => {
            let _ = running.waiting().await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    let deadline = Instant::now() + Duration::from_millis(state.settings.shutdown_grace_ms);
    while state.admission.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    super::sessions::close_all(&state).await;
    rollups.abort();
    let _ = rollups.await;
    state.rollup.flush(&state.store).await;
    // Warm jails (python-data's) go with their cgroups before the process does.
    let stopping = Arc::clone(&state);
    let _ = tokio::task::spawn_blocking(move || stopping.registry.stop_warm_pools(Duration::from_secs(5))).await;
    state.store.close();
    served
}

/// Tools and resources per page of `tools/list` and `resources/list`.
const PAGE: usize = 100;
/// Files listed as resources at most (a walk of the user's directory).
const MAX_RESOURCES: usize = 10_000;

/// One MCP session's handler (or the stdio client's).
#[derive(Clone)]
pub struct McpServer {
    state: Arc<AppState>,
    /// The one local user of `imagentx-sandbox mcp`; over HTTP, each request's
    /// caller, put there by the Bearer check.
    local: Option<Caller>,
    /// Calls in flight by request id: what `notifications/cancelled` stops.
    /// Only that stops a call: a session that ends or a client that leaves
    /// does not.
    calls: Arc<Mutex<HashMap<RequestId, tokio_util::sync::CancellationToken>>>,
    /// Whether this session already listens for tool changes (a client may
    /// send `notifications/initialized` more than once).
    listening: Arc<std::sync::atomic::AtomicBool>,
    /// The code sessions this MCP session opened (calls with `session: true`).
    code: Arc<CodeSessions>,
}

/// An MCP session's code sessions, by interpreter; closed when the MCP
/// session's handler goes (the session expired or was deleted, the stdio
/// client left).
struct CodeSessions {
    state: Arc<AppState>,
    ids: Mutex<HashMap<String, String>>,
    /// Held while a session is looked up or opened: two first calls at once
    /// open one session, not two.
    opening: tokio::sync::Mutex<()>,
}

impl Drop for CodeSessions {
    fn drop(&mut self) {
        let ids: Vec<String> =
            self.ids.lock().unwrap_or_else(PoisonError::into_inner).drain().map(|(_, id)| id).collect();
        if ids.is_empty() {
            return;
        }
        let state = Arc::clone(&self.state);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for id in ids {
                    super::sessions::close_by_id(&state, &id, super::sessions::Reason::McpEnded).await;
                }
            });
        }
    }
}

impl McpServer {
    fn new(state: Arc<AppState>, local: Option<Caller>) -> Self {
        let code = Arc::new(CodeSessions {
            state: Arc::clone(&state),
            ids: Mutex::default(),
            opening: tokio::sync::Mutex::default(),
        });
        Self { state, local, calls: Arc::default(), listening: Arc::default(), code }
    }

    /// The handler for HTTP sessions: each request carries its caller.
    pub fn for_http(state: Arc<AppState>) -> Self {
        Self::new(state, None)
    }

    /// The handler for one local user (stdio).
    pub fn for_local(state: Arc<AppState>, caller: Caller) -> Self {
        Self::new(state, Some(caller))
    }

    fn caller(&self, extensions: &Extensions) -> Result<Caller, ErrorData> {
        if let Some(caller) = &self.local {
            return Ok(caller.clone());
        }
        extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
            .cloned()
            .ok_or_else(|| ErrorData::invalid_request("the request carries no authenticated caller", None))
    }

    /// Whether this handler lives for one HTTP request only: a request of the
    /// 2026-07-28 revision (no `initialize`), which rmcp serves without an
    /// MCP session whatever its headers say. Such a request is cancelled by
    /// closing its response stream.
    fn per_request(&self, context: &RequestContext<RoleServer>) -> bool {
        self.local.is_none() && context.protocol_version().is_some_and(|v| !v.has_initialize())
    }
}

impl McpServer {
    /// A call with `session: true`: a step in this MCP session's code session
    /// of `tool`, opened at the first such call.
    async fn call_in_session(
        &self,
        caller: Caller,
        request: RequestId,
        tool: &str,
        arguments: Option<JsonObject>,
        arrived: Instant,
    ) -> Result<CallToolResponse, ErrorData> {
        let step: super::sessions::StepRequest =
            serde_json::from_value(Value::Object(arguments.unwrap_or_default()))
                .map_err(|e| ErrorData::invalid_params(format!("arguments: {e}"), None))?;
        // Registered before the session is looked up or opened (an open
        // takes a while): a cancel meanwhile is not lost.
        let cancel = tokio_util::sync::CancellationToken::new();
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).insert(request.clone(), cancel.clone());
        let answered = self.step_in_session(caller, tool, step, arrived, &cancel).await;
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).remove(&request);
        answered
    }

    async fn step_in_session(
        &self,
        caller: Caller,
        tool: &str,
        step: super::sessions::StepRequest,
        arrived: Instant,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<CallToolResponse, ErrorData> {
        let opening = self.code.opening.lock().await;
        let known = self.code.ids.lock().unwrap_or_else(PoisonError::into_inner).get(tool).cloned();
        let live = match known {
            Some(id) => match super::sessions::find(&self.state, &caller, &id).await {
                Ok(live) => live,
                Err(e) => return Ok(self.session_ended(tool, &id, &e, cancel)),
            },
            None => {
                let open =
                    super::sessions::OpenRequest { tool: tool.to_owned(), idle_timeout_s: None, timeout_ms: None };
                let live = match super::sessions::open_live(&self.state, &caller, &open).await {
                    Ok(live) => live,
                    Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS => return Ok(refusal(&e).into()),
                    Err(e) => return Err(protocol_error(e)),
                };
                self.code
                    .ids
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(tool.to_owned(), live.id().to_owned());
                live
            }
        };
        drop(opening);
        // A step cannot be stopped and resumed (an interpreter stopped
        // mid-step cannot go on): cancelling it closes its session, which
        // stops the step; the next `session: true` call is told, and the
        // one after opens a new session. The close waits for the step to
        // let the session go, so the step is polled alongside it.
        let reason = super::sessions::Reason::Stopped(Status::Cancelled);
        let step = super::sessions::run_step(&self.state, caller, Arc::clone(&live), step, arrived);
        tokio::pin!(step);
        let ran = tokio::select! {
            biased;
            ran = &mut step => ran,
            () = cancel.cancelled() => {
                let ((), ran) = tokio::join!(super::sessions::close(&self.state, &live, reason), &mut step);
                ran
            }
        };
        match ran {
            // Sessions are the built-in interpreters': no output schema.
            Ok((report, _)) => Ok(tool_result(&report, false).into()),
            Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS || e.status == StatusCode::CONFLICT => {
                Ok(refusal(&e).into())
            }
            Err(e) if e.status == StatusCode::GONE => Ok(self.session_ended(tool, live.id(), &e, cancel)),
            Err(e) => Err(protocol_error(e)),
        }
    }

    /// The code session `id` of `tool` ended (idle, a limit, a cancelled
    /// step): says so once, and the next `session: true` call opens a new
    /// one. A cancelled call's answer is never read, so it leaves the
    /// telling to the next call.
    fn session_ended(
        &self,
        tool: &str,
        id: &str,
        e: &ApiError,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> CallToolResponse {
        if !cancel.is_cancelled() {
            let mut ids = self.code.ids.lock().unwrap_or_else(PoisonError::into_inner);
            if ids.get(tool).is_some_and(|known| known == id) {
                ids.remove(tool);
            }
        }
        let text = format!("{} ({id}); call again with `session: true` to start a new one", e.message);
        CallToolResult::error(vec![ContentBlock::text(text)]).into()
    }
}

/// Whether calls of `registered` may ask for a session: the built-in interpreters.
fn takes_session(registered: &Registered) -> bool {
    registered.row.registered_by == BUILTIN_REGISTRAR
        && match &registered.runnable {
            Runnable::Wasm(t) => t.kind() == crate::engine::ToolKind::Sdk,
            // python-data: its sessions live in jails kept warm for it.
            Runnable::Native(t) => t.warm.is_some(),
        }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        let capabilities =
            ServerCapabilities::builder().enable_tools().enable_tool_list_changed().enable_resources().build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("imagentx-sandbox", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Tools run in a sandbox: WebAssembly (or a Linux jail for native tools) with no network, \
                 CPU, memory, time and disk limits of the caller's tier, and the caller's own /data \
                 directory that persists between calls. `python` and `javascript` run code. The caller's \
                 /data files are resources (file:///data/...).",
            )
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        if self.listening.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        // Tell this client when the tools change, until it goes away.
        let mut changes = self.state.registry.subscribe();
        let peer = context.peer;
        tokio::spawn(async move {
            let mut check = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() || peer.notify_tool_list_changed().await.is_err() {
                            break;
                        }
                    }
                    _ = check.tick() => {
                        if peer.is_transport_closed() {
                            break;
                        }
                    }
                }
            }
        });
    }

    /// `subscriptions/listen` (2026-07-28): tool list changes are all we
    /// announce (the resources are the caller's files, which change with
    /// every call that writes; a client lists them when it needs them).
    fn accepted_subscription_filter(&self, _requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        Some(SubscriptionFilter::builder().tools_list_changed().build())
    }

    /// One listen stream: `notifications/tools/list_changed` on it whenever a
    /// tool is registered or retired, until the client cancels it, the
    /// connection goes, or the server stops (then a graceful end).
    async fn listen(&self, subscription: SubscriptionContext) -> Result<(), ErrorData> {
        self.caller(&subscription.request_context().extensions)?;
        if subscription.sink().accepted().tools_list_changed != Some(true) {
            // Nothing asked for that we send: hold the stream open until it ends.
            tokio::select! {
                () = subscription.cancelled() => {}
                () = self.state.mcp.closing.cancelled() => {}
            }
            return Ok(());
        }
        let mut changes = self.state.registry.subscribe();
        loop {
            tokio::select! {
                () = subscription.cancelled() => return Ok(()),
                () = self.state.mcp.closing.cancelled() => return Ok(()),
                changed = changes.changed() => {
                    if changed.is_err() || subscription.sink().notify_tool_list_changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn on_cancelled(&self, notification: CancelledNotificationParam, _context: NotificationContext<RoleServer>) {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cancel) = notification.request_id.as_ref().and_then(|id| calls.get(id)) {
            cancel.cancel();
        }
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.caller(&context.extensions)?;
        let all: Vec<Tool> = self.state.registry.newest().iter().map(|t| mcp_tool(t)).collect();
        let (tools, next_cursor) = page(all, request.and_then(|r| r.cursor))?;
        Ok(ListToolsResult { tools, next_cursor, ..Default::default() })
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arrived = Instant::now();
        let caller = self.caller(&context.extensions)?;
        let name = request.name.to_string();
        // MCP names no version or timeout: the newest version, the tier's default.
        let prepared = Prepared::new(&self.state, &caller, &name, &InvokeRequest::default()).map_err(protocol_error)?;
        let mut arguments = request.arguments;
        if takes_session(prepared.registered())
            && let Some(session) = arguments.as_mut().and_then(|a| a.remove("session"))
        {
            match session {
                Value::Bool(true) if self.per_request(&context) => {
                    return Err(ErrorData::invalid_params(
                        "`session: true` needs an MCP session, which requests of the 2026-07-28 revision over \
                         HTTP do not have: connect with the initialize handshake (2025-11-25), or use the HTTP \
                         API's code sessions (POST /v1/sessions)",
                        None,
                    ));
                }
                Value::Bool(true) => {
                    return self.call_in_session(caller, context.id.clone(), &name, arguments, arrived).await;
                }
                Value::Bool(false) | Value::Null => {}
                _ => return Err(ErrorData::invalid_params("`session` must be true or false", None)),
            }
        }
        let invoke = invoke_request(prepared.registered(), arguments)?;
        let declares_output = output_schema(prepared.registered()).is_some();
        // A client that asked for progress hears every second that the call runs on.
        let progress = context.meta.get_progress_token().map(|token| {
            let peer = context.peer.clone();
            tokio::spawn(async move {
                let second = Duration::from_secs(1);
                let mut every = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
                for seconds in 1u32.. {
                    every.tick().await;
                    let note = ProgressNotificationParam::new(token.clone(), f64::from(seconds))
                        .with_message(format!("running for {seconds} s"));
                    if peer.notify_progress(note).await.is_err() {
                        break;
                    }
                }
            })
        });
        // The call runs in a task of its own: a client that goes away does
        // not stop it; one that cancels (notifications/cancelled, see
        // `on_cancelled`) does, and the call is recorded `cancelled`.
        let cancel = tokio_util::sync::CancellationToken::new();
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).insert(context.id.clone(), cancel.clone());
        // In the 2026-07-28 revision over HTTP, closing the response stream
        // is the cancellation (the request's token, cancelled by rmcp). A
        // server shutting down closes it too; that lets the call finish.
        let closed = self.per_request(&context).then(|| {
            let (request, cancel, closing) = (context.ct.clone(), cancel.clone(), self.state.mcp.closing.clone());
            tokio::spawn(async move {
                request.cancelled().await;
                if !closing.is_cancelled() {
                    cancel.cancel();
                }
            })
        });
        let ran =
            prepared.run(&self.state, caller, invoke, None, arrived, super::invoke::Runs::Call(Some(cancel))).await;
        if let Some(closed) = closed {
            closed.abort();
        }
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).remove(&context.id);
        if let Some(progress) = progress {
            progress.abort();
        }
        match ran {
            Ok((report, _)) => Ok(tool_result(&report, declares_output).into()),
            Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS || e.status == StatusCode::SERVICE_UNAVAILABLE => {
                Ok(refusal(&e).into())
            }
            Err(e) => Err(protocol_error(e)),
        }
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let caller = self.caller(&context.extensions)?;
        let files = super::files::with_fs(&self.state, &caller, "MCP resources/list", |fs| Ok(walk(fs)))
            .await
            .map_err(protocol_error)?;
        let all = files
            .into_iter()
            .map(|(path, size)| {
                Resource::new(resource_uri(&path), path.clone())
                    .with_description(format!("/data/{path} in the sandbox"))
                    .with_size(size)
            })
            .collect();
        let (resources, next_cursor) = page(all, request.and_then(|r| r.cursor))?;
        Ok(ListResourcesResult { resources, next_cursor, ..Default::default() })
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let caller = self.caller(&context.extensions)?;
        let uri = request.uri;
        let Some(path) = resource_path(&uri) else {
            return Err(ErrorData::invalid_params(format!("not a file:///data/ resource: {uri}"), None));
        };
        let cap = self.state.settings.max_file_bytes as u64;
        let request = format!("MCP resources/read {uri}");
        let bytes = super::files::with_fs(&self.state, &caller, &request, move |fs| match fs.get(&path)? {
            Node::File { size, .. } if size > cap => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the file holds {size} bytes; resources are read up to {cap}"),
            )),
            Node::File { file, size } => read_all(file, size).map_err(|e| ApiError::internal("reading the file", &e)),
            Node::Dir(_) => Err(ApiError::bad_request("not_a_file", "a directory is not a resource")),
        })
        .await
        .map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                ErrorData::resource_not_found(e.message.clone(), None)
            } else {
                protocol_error(e)
            }
        })?;
        let contents = match String::from_utf8(bytes) {
            Ok(text) => ResourceContents::text(text, uri),
            Err(e) => {
                use base64::Engine;
                let data = base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                ResourceContents::blob(data, uri).with_mime_type("application/octet-stream")
            }
        };
        Ok(ReadResourceResult::new(vec![contents]).into())
    }
}

/// A registered tool as MCP lists it.
fn mcp_tool(registered: &Registered) -> Tool {
    let row = &registered.row;
    let mut description = row.description.clone().unwrap_or_default();
    if row.registered_by == BUILTIN_REGISTRAR {
        description.push_str(builtin_notes(&row.name));
    }
    // Nothing a tool does leaves the sandbox (no network): a closed world. It
    // may write the caller's /data: neither read-only nor idempotent.
    let annotations = ToolAnnotations::new().read_only(false).open_world(false).idempotent(false);
    let tool = Tool::new(row.name.clone(), description, Arc::new(input_schema(registered)))
        .with_title(row.name.clone())
        .with_annotations(annotations);
    match output_schema(registered) {
        Some(schema) => tool.with_raw_output_schema(Arc::new(schema)),
        None => tool,
    }
}

/// A tool's `outputSchema`: an SDK tool's output schema (from its output
/// type, see `imagentx_tool::export_tool!`) when it describes an object, which
/// is then the call's structured content as it is ([`tool_result`]). Other
/// outputs are structured content under `result`, and declared by no schema.
fn output_schema(registered: &Registered) -> Option<JsonObject> {
    let Runnable::Wasm(tool) = &registered.runnable else {
        return None;
    };
    match tool.info().output_schema.as_deref() {
        Some(Value::Object(schema)) if schema.get("type").and_then(Value::as_str) == Some("object") => {
            Some(schema.clone())
        }
        _ => None,
    }
}

/// What a model should know about the built-in interpreters beyond their own
/// description.
fn builtin_notes(name: &str) -> &'static str {
    match name {
        "python" => {
            " CPython 3 in WebAssembly, a fresh interpreter per call (or, with `session: true`, one that \
             keeps its state between calls): `code` runs, what it prints comes back as stdout, and the \
             last expression's value (or a variable `result`) as the result; `args` is available to the \
             code as `args`. Files under /data persist between calls (the caller's own directory); /tmp \
             is per call. No network, no subprocesses. Pure-Python packages baked in: \
             python-dateutil, six, tabulate, more-itertools, jmespath, and the standard library's pure \
             modules."
        }
        "javascript" => {
            " A JavaScript engine in WebAssembly, fresh per call (or, with `session: true`, one that keeps \
             its state between calls): `code` runs, console.log output comes back as stdout and the last \
             expression's value (or `result`) as the result; `args` is available as `args`. \
             Files under /data persist between calls (the caller's own directory) through the `fs` \
             module's synchronous calls; /tmp is per call. No network."
        }
        "python-data" => {
            " The host's CPython with numpy, pandas and matplotlib, in a Linux jail: a fresh process per \
             call, or with `session: true` one that keeps its state (DataFrames, imports) between calls. \
             Figures left open come back as PNG images. Files under /data are the caller's own (relative \
             paths start there). No network."
        }
        _ => "",
    }
}

/// Whether `schema` describes a JSON object (MCP's `inputSchema` must).
fn is_object_schema(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object")
}

/// A tool's `inputSchema`: its own when that is an object's; otherwise its
/// input under `input` (and a command tool's `args`).
fn input_schema(registered: &Registered) -> JsonObject {
    let own = registered.row.input_schema.clone();
    let schema = match own {
        Some(schema) if is_object_schema(&schema) => schema,
        own => json!({
            "type": "object",
            "properties": {
                "input": own.unwrap_or_else(|| json!({"description": "the tool's input document (any JSON)"})),
                "args": {"type": "array", "items": {"type": "string"}, "description": "arguments (argv[1..]) for a command tool"},
            },
        }),
    };
    let mut schema = schema;
    if takes_session(registered)
        && let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut)
    {
        properties.insert(
            "session".into(),
            json!({
                "type": "boolean",
                "description": "true: run in this MCP session's live interpreter, where variables, imports and \
                                loaded data persist between the calls that set it (like a notebook); closed when \
                                the MCP session ends or after the tier's idle timeout. Default: a fresh interpreter."
            }),
        );
    }
    match schema {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    }
}

/// The invoke request for MCP `arguments`, shaped as [`input_schema`] says.
fn invoke_request(registered: &Registered, arguments: Option<JsonObject>) -> Result<InvokeRequest, ErrorData> {
    let arguments = arguments.unwrap_or_default();
    if registered.row.input_schema.as_ref().is_some_and(is_object_schema) {
        return Ok(InvokeRequest { input: Value::Object(arguments), ..InvokeRequest::default() });
    }
    let mut arguments = arguments;
    let input = arguments.remove("input").unwrap_or(Value::Null);
    let args = match arguments.remove("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(args) => serde_json::from_value(args)
            .map_err(|e| ErrorData::invalid_params(format!("`args` must be an array of strings: {e}"), None))?,
    };
    if let Some(other) = arguments.keys().next() {
        return Err(ErrorData::invalid_params(format!("unknown argument `{other}` (known: input, args)"), None));
    }
    Ok(InvokeRequest { input, args, ..InvokeRequest::default() })
}

/// A finished call as a tool result: the output as structured content and
/// text; a call that did not end `ok` as an error result that says why.
/// `output` without the base64 data of its `images` (each keeps its format
/// and size, and its index among the image content blocks), and those data.
fn split_images(output: &Value) -> (std::borrow::Cow<'_, Value>, Vec<String>) {
    let Some(images) = output.get("images").and_then(Value::as_array) else {
        return (std::borrow::Cow::Borrowed(output), Vec::new());
    };
    let mut data = Vec::new();
    let described: Vec<Value> = images
        .iter()
        .map(|image| {
            let mut image = image.clone();
            if let Some(Value::String(png)) = image.as_object_mut().and_then(|o| o.remove("data")) {
                image["image_block"] = json!(data.len());
                data.push(png);
            }
            image
        })
        .collect();
    let mut output = output.clone();
    output["images"] = Value::Array(described);
    (std::borrow::Cow::Owned(output), data)
}

///
/// `declares_output`: the tool lists an `outputSchema` (see [`output_schema`]):
/// its output is the structured content as it is, and an `ok` call without
/// one (over the output cap) is an error result, since a client checks that
/// content against the schema.
fn tool_result(report: &ExecutionReport, declares_output: bool) -> CallToolResult {
    let mut meta = json!({
        "execution": report.id,
        "status": report.status,
        "usage": report.usage,
    });
    if let Some(session) = &report.session {
        meta["session"] = session.as_str().into();
    }
    if report.status == Status::Ok && declares_output && !matches!(report.output, Some(Value::Object(_))) {
        let why = if report.truncated.output || report.truncated.stdout {
            "its output passed the tier's output cap and was dropped"
        } else {
            "it answered no object of its output schema"
        };
        let mut result =
            CallToolResult::error(vec![ContentBlock::text(format!("the tool call ended `ok`, but {why}"))]);
        result.structured_content = Some(json!({
            "status": report.status,
            "error": why,
            "execution": report.id,
            "truncated": report.truncated,
        }));
        result.meta = serde_json::from_value(json!({ "imagentx": meta })).ok();
        return result;
    }
    if report.status == Status::Ok {
        let mut content = Vec::new();
        if !report.stdout.is_empty() {
            content.push(ContentBlock::text(report.stdout.clone()));
        }
        let mut result = match &report.output {
            Some(output) => {
                // Pictures (python-data's figures) are image content; the
                // text and structured content keep only what describes them.
                // Not for a tool with an output schema: its output stays as declared.
                let (output, images) =
                    if declares_output { (Cow::Borrowed(output), Vec::new()) } else { split_images(output) };
                content.push(ContentBlock::text(output.to_string()));
                content.extend(images.into_iter().map(|data| ContentBlock::image(data, "image/png")));
                let mut result = CallToolResult::success(content);
                // Structured content is an object: a scalar or array output goes under `result`.
                result.structured_content =
                    Some(if output.is_object() { output.into_owned() } else { json!({ "result": output }) });
                result
            }
            None => CallToolResult::success(content),
        };
        result.meta = serde_json::from_value(json!({ "imagentx": meta })).ok();
        return result;
    }
    let error = report.error.clone().unwrap_or_default();
    let mut text = format!("the tool call ended `{}`: {error}", report.status.as_str());
    if !report.stderr.is_empty() {
        text.push_str("\nstderr:\n");
        text.push_str(tail(&report.stderr, 4096));
    }
    if !report.stdout.is_empty() {
        text.push_str("\nstdout:\n");
        text.push_str(tail(&report.stdout, 4096));
    }
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(json!({
        "status": report.status,
        "error": report.error,
        "exit_code": report.exit_code,
        "execution": report.id,
        "limits_hit": report.usage.limits_hit,
    }));
    result.meta = serde_json::from_value(json!({ "imagentx": meta })).ok();
    result
}

/// A call the server turned away (rate, concurrency, memory, a native tool
/// on a host without the jail): an error result the model can act on.
fn refusal(e: &ApiError) -> CallToolResult {
    let mut text = format!("the call was not run ({}): {}", e.code, e.message);
    if let Some(after) = e.retry_after {
        text.push_str(&format!("; retry after {after} s"));
    }
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content =
        Some(json!({ "status": "refused", "code": e.code, "error": e.message, "retry_after_s": e.retry_after }));
    result
}

/// The URI of the file at `path` under `/data`, percent-encoded.
fn resource_uri(path: &str) -> String {
    let mut uri = String::from("file:///data/");
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri
}

/// The path under `/data` of a `file:///data/...` URI, percent-decoded
/// (the files API's path checks apply to it afterwards).
fn resource_path(uri: &str) -> Option<String> {
    let encoded = uri.strip_prefix("file:///data/")?.as_bytes();
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        if encoded[i] == b'%' {
            let hex = std::str::from_utf8(encoded.get(i + 1..i + 3)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            bytes.push(encoded[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The end of `text`, at most `max` bytes, on a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// A client's mistake as the protocol's error: invalid params for a 4xx,
/// internal error for the rest.
fn protocol_error(e: ApiError) -> ErrorData {
    let data = Some(json!({ "code": e.code }));
    if e.status.is_client_error() {
        ErrorData::invalid_params(e.message.clone(), data)
    } else {
        ErrorData::new(ErrorCode::INTERNAL_ERROR, Cow::Owned(e.message.clone()), data)
    }
}

/// One page of `all` from `cursor` (an offset this server handed out).
fn page<T>(all: Vec<T>, cursor: Option<String>) -> Result<(Vec<T>, Option<String>), ErrorData> {
    let start = match cursor {
        None => 0,
        Some(c) => c.parse::<usize>().map_err(|_| ErrorData::invalid_params("unknown cursor", None))?,
    };
    let total = all.len();
    let items: Vec<T> = all.into_iter().skip(start).take(PAGE).collect();
    let next = (start + items.len() < total).then(|| (start + items.len()).to_string());
    Ok((items, next))
}

/// The regular files under the user's directory, as paths and sizes, in
/// order; at most [`MAX_RESOURCES`].
fn walk(fs: &crate::userfs::UserFs) -> Vec<(String, u64)> {
    let mut files = Vec::new();
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        let Ok(Node::Dir(entries)) = fs.get(&dir) else { continue };
        for entry in entries {
            let path = if dir.is_empty() { entry.name.clone() } else { format!("{dir}/{}", entry.name) };
            match entry.kind {
                "file" => files.push((path, entry.size)),
                "dir" => dirs.push(path),
                _ => {}
            }
            if files.len() >= MAX_RESOURCES {
                dirs.clear();
                break;
            }
        }
    }
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_their_cursors_to_the_end() {
        let all: Vec<u32> = (0..250).collect();
        let (first, next) = page(all.clone(), None).unwrap();
        assert_eq!((first.len(), next.as_deref()), (100, Some("100")));
        let (second, next) = page(all.clone(), next).unwrap();
        assert_eq!((second[0], next.as_deref()), (100, Some("200")));
        let (last, next) = page(all.clone(), next).unwrap();
        assert_eq!((last.len(), next), (50, None));
        assert!(page(all, Some("x".into())).is_err());
    }

    #[test]
    fn resource_uris_are_encoded_and_decoded_back() {
        for path in ["notes.txt", "a dir/file #1?.csv", "100%/ü", "x/y"] {
            let uri = resource_uri(path);
            assert!(!uri.contains(' ') && !uri.contains('#') && !uri.contains('?'), "{uri}");
            assert_eq!(resource_path(&uri).as_deref(), Some(path));
        }
        assert_eq!(resource_path("file:///data/a%2"), None);
        assert_eq!(resource_path("file:///etc/passwd"), None);
    }

    fn report(output: Value, truncated: bool) -> ExecutionReport {
        serde_json::from_value(json!({
            "id": "e1", "tool": "t", "tool_sha256": null, "user": "u", "tier": "free", "runtime": "wasm",
            "status": "ok", "exit_code": null, "signal": null, "output": output, "error": null,
            "stdout": "", "stderr": "",
            "truncated": {"stdout": false, "stderr": false, "output": truncated},
            "usage": {"wall_ms": 1.0}, "started_at": "", "finished_at": "",
        }))
        .unwrap()
    }

    #[test]
    fn a_tool_with_an_output_schema_answers_its_object_or_an_error() {
        // Its output, images and all, is the structured content as it is.
        let output = json!({"images": [{"format": "png", "data": "AAAA"}]});
        let result = tool_result(&report(output.clone(), false), true);
        assert_eq!((result.is_error, result.structured_content.as_ref()), (Some(false), Some(&output)));
        // Without a schema, images become image content.
        let result = tool_result(&report(output, false), false);
        assert_eq!(result.structured_content.unwrap()["images"][0]["image_block"], 0);
        // Dropped over the output cap: no object to check against the schema,
        // so an error result saying why (a success would fail the client's check).
        let result = tool_result(&report(Value::Null, true), true);
        assert_eq!(result.is_error, Some(true));
        assert!(result.structured_content.unwrap()["error"].as_str().unwrap().contains("output cap"));
    }

    #[test]
    fn tails_cut_on_character_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
