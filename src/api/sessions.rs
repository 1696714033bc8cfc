//! Code sessions: `/v1/sessions`. A session is one live instance of an
//! interpreter tool (`python`, `javascript`, or any SDK tool; or a jailed
//! interpreter of a native built-in with warm jails, `python-data`:
//! `crate::jail::NativeSession`) whose state lives on between its steps, each step run through the one invoke path
//! ([`Prepared::run`]) with its own limits and recorded as an execution.
//!
//! What a session holds while it lives, and who counts it:
//! - a place among the tier's `sessions` (per user) and the server's
//!   `max_sessions`, which also holds one slot of the instance pool, so that
//!   calls in flight and sessions together never pass the pool;
//! - its instance's linear memory, charged to the host's memory pool like
//!   any call's (a native session's memory is its jail's cgroup, held to
//!   the tier's limit, and not charged to that pool while it is idle); a session is not opened while sessions hold more than
//!   [`SESSION_MEMORY_SHARE`] of that pool, so that they cannot starve
//!   one-shot calls of memory;
//! - the user's `/data` (their volume stays mounted) and a `/tmp` of its own.
//!
//! A session ends when it is closed (`DELETE`), idle past its idle timeout,
//! past its tier's lifetime, stopped by a limit in a step (wasmtime cannot
//! enter an instance again after a trap, and an interpreter stopped in the
//! middle of its code has no state to go on from), or when the server stops.
//! A server restart ends every session: its rows say so, and a step sent to
//! one is answered 410 `session_ended` with the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, Denial};
use super::auth::Authed;
use super::error::{ApiPath, parse_json, read_body};
use super::invoke::{InvokeRequest, Prepared, Runs, checked_timeout, denied, missing_tool, stored_report, tier};
use super::registry::{Registered, Runnable};
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::engine::ToolKind;
use crate::policy::UserId;
use crate::report::ExecutionReport;
use crate::report::Status;
use crate::runner::CodeSession;
use crate::store::Caller;
use axum::body::Bytes;

/// Sessions are not opened while the sessions' instances hold more than this
/// share of the host's memory budget for guests: the rest stays for calls.
pub const SESSION_MEMORY_SHARE: f64 = 0.5;

/// How often idle and expired sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its owner closed it.
    User,
    /// No step for its idle timeout.
    Idle,
    /// Its tier's lifetime passed.
    Lifetime,
    /// A step was stopped (by a limit, a crash, or a cancellation) with this
    /// status: the instance cannot go on.
    Stopped(Status),
    /// The server stopped.
    Shutdown,
    /// The MCP session that opened it ended.
    McpEnded,
    /// The tool version it runs was retired.
    Retired,
    /// The node whose memory held it is gone (a shared store's other node).
    NodeLost,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::User => "user",
            Reason::Idle => "idle",
            Reason::Lifetime => "lifetime",
            Reason::Stopped(status) => status.as_str(),
            Reason::Shutdown => "shutdown",
            Reason::McpEnded => "mcp_session_ended",
            Reason::Retired => "tool_retired",
            Reason::NodeLost => "node_lost",
        }
    }
}

/// Why a session that ended did, in words, from its row's reason.
fn ended_because(reason: Option<&str>) -> &'static str {
    match reason {
        Some("user") => "it was closed",
        Some("idle") => "it was idle past its idle timeout",
        Some("lifetime") => "it reached its tier's maximum lifetime",
        Some("timeout" | "cpu_limit" | "memory_limit" | "crashed" | "cancelled" | "internal_error") => {
            "a step was stopped (the session's `reason` says how), and an instance cannot go on after that"
        }
        Some("shutdown") => "the server stopped",
        Some("mcp_session_ended") => "the MCP session that opened it ended",
        Some("tool_retired") => "the tool version it ran was retired by an admin",
        Some("restart") => "server restarted: sessions do not survive a restart",
        Some("node_lost") => "the node that held it stopped: its instance was in that node's memory",
        _ => "it is closed",
    }
}

/// One open session.
pub(crate) struct Live {
    id: String,
    user: UserId,
    tool: String,
    registered: Arc<Registered>,
    /// Wall-clock budget of a step that asks for none.
    timeout: Option<Duration>,
    idle_timeout: Duration,
    lifetime: Duration,
    opened: Instant,
    opened_at: String,
    /// When the last step ended (or the session opened).
    last_active: Mutex<Instant>,
    steps: AtomicU64,
    /// The instance's linear memory after its last step.
    memory_bytes: AtomicU64,
    /// Fired when the session is closed: a running step stops.
    closed: CancellationToken,
    /// Why it ended, set by the first close. The session stays findable
    /// until its end is recorded, so a look in between sees it ended.
    ended: OnceLock<Reason>,
    /// Fired when the close is done: its place given back, its end recorded.
    recorded: CancellationToken,
    /// The instance and what it holds; `None` once closed. Locked by a step
    /// while it runs.
    session: Arc<tokio::sync::Mutex<Option<CodeSession>>>,
    /// Its place among its owner's and the server's sessions, given back by
    /// the close (not when the last reference goes), so a new session can
    /// open as soon as a step has been told this one ended.
    place: Mutex<Option<Place>>,
}

impl Live {
    fn idle(&self) -> Duration {
        self.last_active.lock().unwrap_or_else(PoisonError::into_inner).elapsed()
    }

    /// What a client sees of it.
    fn info(&self) -> SessionInfo {
        if let Some(reason) = self.ended.get() {
            let steps = Some(self.steps.load(Ordering::Relaxed));
            let reason = Some(reason.as_str().to_owned());
            return SessionInfo::ended(self.id.clone(), self.tool.clone(), reason, self.opened_at.clone(), steps);
        }
        let running = self.session.try_lock().is_err();
        SessionInfo {
            id: self.id.clone(),
            tool: self.tool.clone(),
            state: if running { "running" } else { "idle" }.into(),
            reason: None,
            opened_at: self.opened_at.clone(),
            steps: Some(self.steps.load(Ordering::Relaxed)),
            memory_bytes: Some(self.memory_bytes.load(Ordering::Relaxed)),
            idle_s: Some(if running { 0.0 } else { secs(self.idle()) }),
            age_s: Some(secs(self.opened.elapsed())),
            idle_timeout_s: Some(self.idle_timeout.as_secs()),
            lifetime_s: Some(self.lifetime.as_secs()),
            timeout_ms: self.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// Called by a step that finished: the session was used now.
    pub(crate) fn stepped(&self, session: &CodeSession) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.memory_bytes.store(session.memory_bytes(), Ordering::Relaxed);
        *self.last_active.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

/// A session's place among its owner's and the server's: given back when the
/// session is dropped.
struct Place {
    sessions: Arc<Places>,
    admission: Arc<Admission>,
    user: String,
}

/// Places taken, per user.
#[derive(Default)]
struct Places {
    per_user: Mutex<HashMap<String, u32>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.give_back_session_slot();
        let mut per_user = self.sessions.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

/// The server's open sessions.
pub struct Sessions {
    open: Mutex<HashMap<String, Arc<Live>>>,
    places: Arc<Places>,
    /// Sessions open at once on the server.
    max: u32,
}

impl Sessions {
    pub fn new(max: u32) -> Self {
        Self { open: Mutex::default(), places: Arc::default(), max }
    }

    fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    fn all(&self) -> Vec<Arc<Live>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Sessions open now, and the linear memory their instances hold.
    pub fn gauges(&self) -> (u64, u64) {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        (open.len() as u64, open.values().map(|l| l.memory_bytes.load(Ordering::Relaxed)).sum())
    }

    /// A place for one more session of `user`, whose tier allows `cap`.
    fn place(&self, admission: &Arc<Admission>, user: &str, cap: u32) -> Result<Place, Denial> {
        let mut per_user = self.places.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = per_user.get(user).copied().unwrap_or(0);
        if mine >= cap {
            return Err(Denial {
                reason: "user_sessions",
                message: format!(
                    "{mine} of your sessions are open, the tier's limit (sessions = {cap}): close one \
                     (DELETE /v1/sessions/{{id}}) or wait for one to go idle"
                ),
                retry_after: 1,
            });
        }
        if !admission.take_session_slot(self.max) {
            return Err(Denial {
                reason: "server_busy",
                message: format!(
                    "the server has no room for another session (at most {} sessions, and calls in flight \
                     share the instance pool with them)",
                    self.max
                ),
                retry_after: 1,
            });
        }
        per_user.insert(user.to_owned(), mine + 1);
        Ok(Place { sessions: Arc::clone(&self.places), admission: Arc::clone(admission), user: user.to_owned() })
    }
}

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// The interpreter (`python`, `javascript`) or another SDK tool.
    #[schemars(length(min = 1, max = 64))]
    pub tool: String,
    /// Close the session after this many seconds without a step (default and
    /// maximum: the tier's `session_idle_s`).
    #[schemars(range(min = 1))]
    #[serde(default, deserialize_with = "super::error::whole_number")]
    pub idle_timeout_s: Option<u64>,
    /// Wall-clock budget of each step that does not ask for its own (default
    /// and maximum from the policy, as for a call).
    #[schemars(range(min = 1))]
    #[serde(default, deserialize_with = "super::error::whole_number")]
    pub timeout_ms: Option<u64>,
}

/// `POST /v1/sessions/{id}/run`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    /// The code of this step, run in the session's live interpreter.
    pub code: String,
    /// Available to the code as `args` (default `{}`).
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// This step's wall-clock budget (default: the session's).
    #[schemars(range(min = 1))]
    #[serde(default, deserialize_with = "super::error::whole_number")]
    pub timeout_ms: Option<u64>,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// A session as its owner sees it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SessionInfo {
    pub id: String,
    pub tool: String,
    /// `idle`, `running` (a step runs now) or `ended`.
    pub state: String,
    /// Why it ended: `user` (closed), `idle`, `lifetime`, `shutdown`, `restart`,
    /// `mcp_session_ended`, `tool_retired`,
    /// or the status of the step that stopped it (`timeout`, `cpu_limit`,
    /// `memory_limit`, `crashed`, `cancelled`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub opened_at: String,
    /// Steps run so far (open sessions).
    pub steps: Option<u64>,
    /// Memory the instance holds (open sessions): its linear memory, or a
    /// native session's jail (its cgroup's).
    pub memory_bytes: Option<u64>,
    /// Seconds since its last step ended.
    pub idle_s: Option<f64>,
    /// Seconds since it was opened.
    pub age_s: Option<f64>,
    pub idle_timeout_s: Option<u64>,
    pub lifetime_s: Option<u64>,
    /// Default wall-clock budget of a step.
    pub timeout_ms: Option<u64>,
}

impl SessionInfo {
    /// What is left to say of a session that ended.
    fn ended(id: String, tool: String, reason: Option<String>, opened_at: String, steps: Option<u64>) -> Self {
        Self {
            id,
            tool,
            state: "ended".into(),
            reason,
            opened_at,
            steps,
            memory_bytes: None,
            idle_s: None,
            age_s: None,
            idle_timeout_s: None,
            lifetime_s: None,
            timeout_ms: None,
        }
    }
}

/// The caller's open sessions.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

pub async fn open(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, body, 64 << 10).await?;
    let request: OpenRequest = parse_json(&body)?;
    let live = open_live(&state, &caller, &request).await?;
    Ok((StatusCode::CREATED, Json(live.info())).into_response())
}

/// Opens a session for `caller` as `request` asks (HTTP and MCP).
pub(crate) async fn open_live(state: &AppState, caller: &Caller, request: &OpenRequest) -> Result<Arc<Live>, ApiError> {
    let tier = tier(state, caller)?;
    let idle_timeout = match request.idle_timeout_s {
        None => tier.session_idle_s,
        Some(s) if (1..=tier.session_idle_s).contains(&s) => s,
        Some(s) => {
            return Err(ApiError::bad_request(
                "bad_idle_timeout",
                format!("idle_timeout_s {s} is outside 1..={} s, the tier's maximum", tier.session_idle_s),
            ));
        }
    };
    let timeout = checked_timeout(state, caller, request.timeout_ms)?;
    let registered = state.registry.get(&request.tool, None).ok_or_else(|| missing_tool(state, &request.tool))?;
    match &registered.runnable {
        Runnable::Wasm(tool) if tool.kind() != ToolKind::Sdk => {
            return Err(not_sessionable(&request.tool, "not an SDK tool (it has no `call` to run steps with)"));
        }
        Runnable::Native(tool) if tool.warm.is_none() => {
            return Err(not_sessionable(
                &request.tool,
                "a native program without kept jails (only built-in ones, like python-data, run steps)",
            ));
        }
        _ => {}
    }
    let place = match state.sessions.place(&state.admission, caller.user.as_str(), tier.sessions) {
        Ok(place) => place,
        Err(denial) => return Err(denied(state, caller, Some(&request.tool), denial).await),
    };
    let pool = state.sandbox.engine.guest_memory();
    let (_, held) = state.sessions.gauges();
    if held as f64 >= pool.budget_bytes() as f64 * SESSION_MEMORY_SHARE {
        let denial = Denial {
            reason: "server_busy",
            message: format!(
                "sessions hold {held} bytes, their share of the server's memory budget of {}",
                pool.budget_bytes()
            ),
            retry_after: 1,
        };
        return Err(denied(state, caller, Some(&request.tool), denial).await);
    }
    let opened = match &registered.runnable {
        Runnable::Wasm(tool) => state.sandbox.open_session(tool, &caller.user, &caller.tier, timeout).await,
        Runnable::Native(tool) => state.sandbox.open_native_session(tool, &caller.user, &caller.tier, timeout).await,
    };
    let session = opened.map_err(|(status, message)| match status {
        Status::InvalidTool => ApiError::bad_request("not_sessionable", message),
        Status::InternalError if message == crate::runner::NO_ROOM_FOR_VOLUME => {
            ApiError::storage_full("opening a session (the user's data volume)")
        }
        Status::InternalError => ApiError::internal("opening a session", &message),
        _ => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "session_start_failed",
            format!("the tool's instance could not start ({}): {message}", status.as_str()),
        ),
    })?;
    let id = format!("ses_{}", uuid::Uuid::new_v4().simple());
    let lifetime = Duration::from_secs(tier.session_lifetime_s);
    let event = AuditEvent::new(Kind::SessionOpened, "ok")
        .actor(caller.user.as_str())
        .user(caller.user.as_str())
        .tool(request.tool.clone())
        .detail(serde_json::json!({
            "session": id,
            "version": registered.row.version,
            "tier": caller.tier,
            "idle_timeout_s": idle_timeout,
            "lifetime_s": lifetime.as_secs(),
            "memory_bytes": session.memory_bytes(),
        }));
    let opened_at =
        state.store.session_opened(id.clone(), caller.user.to_string(), request.tool.clone(), event).await?;
    if let Some(node) = &state.node
        && let Err(e) = node.own_session(&id).await
    {
        // The session works here; another node asked for it answers 404.
        tracing::warn!(error = %e, session = %id, "recording which node holds a session failed");
    }
    let live = Arc::new(Live {
        id: id.clone(),
        user: caller.user.clone(),
        tool: request.tool.clone(),
        registered: registered.clone(),
        timeout,
        idle_timeout: Duration::from_secs(idle_timeout),
        lifetime,
        opened: Instant::now(),
        opened_at,
        last_active: Mutex::new(Instant::now()),
        steps: AtomicU64::new(0),
        memory_bytes: AtomicU64::new(session.memory_bytes()),
        closed: CancellationToken::new(),
        ended: OnceLock::new(),
        recorded: CancellationToken::new(),
        session: Arc::new(tokio::sync::Mutex::new(Some(session))),
        place: Mutex::new(Some(place)),
    });
    state.sessions.open.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), Arc::clone(&live));
    state.metrics.session_opened();
    tracing::info!(session = %id, user = %caller.user, tool = %request.tool, "session opened");
    Ok(live)
}

fn not_sessionable(tool: &str, why: &str) -> ApiError {
    ApiError::bad_request("not_sessionable", format!("tool `{tool}` cannot hold a session: it is {why}"))
}

/// Where the caller's open session is.
pub(crate) enum Located {
    Here(Arc<Live>),
    /// Held by another node sharing the store, alive at `address`.
    There {
        node: String,
        address: String,
    },
}

/// The caller's open session `id`, or the error a step or a look at it gets:
/// 410 for one of theirs that ended (with why), 404 for anything else; 421
/// `session_elsewhere` for one another node holds (HTTP requests are
/// forwarded there instead: [`locate`]).
pub(crate) async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Arc<Live>, ApiError> {
    match locate(state, caller, id).await? {
        Located::Here(live) => Ok(live),
        Located::There { node, address } => Err(elsewhere(id, &node, &address)),
    }
}

fn elsewhere(id: &str, node: &str, address: &str) -> ApiError {
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "session_elsewhere",
        format!("session `{id}` is held by node {node} (at {address}): its steps run there"),
    )
}

/// Where the caller's open session `id` is, or why there is none: on a shared
/// store, another node may hold it; one whose node has no row in the nodes'
/// table answers 503 `node_unreachable` (the node that reaps a dead one ends
/// its sessions: `node_lost`, then 410).
pub(crate) async fn locate(state: &AppState, caller: &Caller, id: &str) -> Result<Located, ApiError> {
    if let Some(live) = state.sessions.get(id).filter(|l| l.user == caller.user) {
        return Ok(Located::Here(live));
    }
    if let Some(node) = &state.node
        && let Some(home) = node.session_elsewhere(id, caller.user.as_str()).await?
    {
        match home.address {
            Some(address) => return Ok(Located::There { node: home.node, address }),
            // Not in the nodes' table: dead (the node that reaps it ends its
            // sessions), or its row lost with the database's crash (back
            // within a second): not for this node to say which.
            None => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node_unreachable",
                    format!(
                        "session `{id}` is held by node {}, which has not said it is alive: if it is gone, the \
                         session ends within {} s",
                        home.node,
                        super::cluster::LEASE.as_secs() + 2 * super::cluster::HEARTBEAT.as_secs()
                    ),
                );
                error.retry_after = Some(2);
                return Err(error);
            }
        }
    }
    match state.store.session(id, caller.user.as_str()).await? {
        Some(row) if row.closed_at.is_some() => Err(ApiError::new(
            StatusCode::GONE,
            "session_ended",
            format!("session ended: {}", ended_because(row.reason.as_deref())),
        )),
        _ => Err(ApiError::not_found("unknown_session", format!("no session `{id}`"))),
    }
}

/// Forwards a request for a session another node holds, unless it was
/// forwarded already (then that node's own view answers: never a loop).
async fn forward(
    state: &AppState,
    (id, owner, address): (&str, String, String),
    (method, path): (Method, String),
    headers: &HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(node) = state.node.as_ref().filter(|_| !headers.contains_key(super::cluster::FORWARDED_BY)) else {
        return Err(elsewhere(id, &owner, &address));
    };
    let client = state.proxies.client_of(peer.map(|Extension(ConnectInfo(peer))| peer.ip()), headers);
    let limit = state.sandbox.policy.max_wall_time + FORWARD_MARGIN;
    super::cluster::forward(node, &owner, &address, method, &path, headers, client, (body, limit)).await
}

/// What a forwarded request may take beyond the longest step.
const FORWARD_MARGIN: Duration = Duration::from_secs(30);

/// Ends session `id`, whose node is gone, as `node_lost` (its steps are not
/// known here: recorded as 0).
async fn end_orphan(state: &AppState, id: &str, user: &str, tool: &str) {
    let reason = Reason::NodeLost.as_str();
    tracing::info!(session = %id, user, reason, "session closed: the node that held it is gone");
    let event = AuditEvent::new(Kind::SessionClosed, reason)
        .actor("sandbox")
        .user(user)
        .tool(tool.to_owned())
        .detail(serde_json::json!({"session": id, "reason": reason, "steps": null}));
    if let Err(e) = state.store.session_closed(id.to_owned(), reason.to_owned(), 0, event).await {
        tracing::error!(error = %e, session = %id, "recording a session's end failed");
    }
}

/// Ends the open sessions of `dead` nodes (the heartbeat that found them
/// dead calls this).
pub(crate) async fn end_sessions_of(state: &AppState, dead: &[String]) {
    let Some(node) = &state.node else { return };
    match node.sessions_of(dead).await {
        Ok(orphans) => {
            for orphan in orphans {
                end_orphan(state, &orphan.id, &orphan.user, &orphan.tool).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing the sessions of nodes that are gone failed"),
    }
}

/// Closes here the sessions the store says ended: this node's row was lost
/// while it was cut off past its lease, and the node that took it for dead
/// ended them (`node_lost`); their instances must not go on here.
pub(crate) async fn drop_ended_elsewhere(state: &AppState) {
    for live in state.sessions.all() {
        match state.store.session(&live.id, live.user.as_str()).await {
            Ok(Some(row)) if row.closed_at.is_some() => close(state, &live, Reason::NodeLost).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, session = %live.id, "reading a session's row failed"),
        }
    }
}

pub async fn run(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let limit = state.sandbox.policy.input_bytes.saturating_add(super::invoke::INVOKE_ENVELOPE_BYTES);
    let body = read_body(&headers, body, limit).await?;
    let step: StepRequest = parse_json(&body)?;
    let live = match locate(&state, &caller, &id).await? {
        Located::Here(live) => live,
        Located::There { node, address } => {
            let path = format!("/v1/sessions/{id}/run");
            return forward(&state, (&id, node, address), (Method::POST, path), &headers, peer, body).await;
        }
    };
    let (_, json) = run_step(&state, caller, live, step, arrived).await?;
    Ok(stored_report(json))
}

/// Runs `step` in `live` through the one invoke path (HTTP and MCP).
pub(crate) async fn run_step(
    state: &Arc<AppState>,
    caller: Caller,
    live: Arc<Live>,
    step: StepRequest,
    arrived: Instant,
) -> Result<(ExecutionReport, Bytes), ApiError> {
    let guard = match Arc::clone(&live.session).try_lock_owned() {
        Ok(guard) => Some(guard),
        // Closing: the step still running is being stopped.
        Err(_) if live.closed.is_cancelled() => None,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "session_busy",
                "a step of this session is still running: a session runs one step at a time; retry when it has \
                 finished",
            ));
        }
    };
    let Some(guard) = guard.filter(|g| g.is_some() && !live.closed.is_cancelled()) else {
        // Answer once the close is done, so the caller may open another
        // session in its place straight away.
        live.recorded.cancelled().await;
        let why = ended_because(live.ended.get().map(|r| r.as_str()));
        return Err(ApiError::new(StatusCode::GONE, "session_ended", format!("session ended: {why}")));
    };
    let timeout = step.timeout_ms.map(Duration::from_millis).or(live.timeout);
    let request = InvokeRequest {
        input: serde_json::json!({"code": step.code, "args": step.args}),
        args: Vec::new(),
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        version: None,
    };
    let prepared = Prepared::for_session(state, &caller, Arc::clone(&live.registered), &request)?;
    prepared.run(state, caller, request, None, arrived, Runs::Step(guard, live)).await
}

/// Ends a step's session when the step left it dead; called by the step's task.
pub(crate) async fn after_step(
    state: &AppState,
    live: &Arc<Live>,
    mut guard: OwnedMutexGuard<Option<CodeSession>>,
    status: Status,
) {
    let dead = guard.as_ref().is_none_or(CodeSession::is_dead);
    if let Some(session) = guard.as_ref() {
        live.stepped(session);
    }
    if dead {
        drop(guard.take());
        drop(guard);
        close(state, live, Reason::Stopped(status)).await;
    }
}

pub async fn list(State(state): State<Arc<AppState>>, Authed(caller): Authed) -> Json<SessionList> {
    let mut sessions: Vec<_> =
        state.sessions.all().into_iter().filter(|l| l.user == caller.user && l.ended.get().is_none()).collect();
    sessions.sort_by_key(|l| l.opened);
    Json(SessionList { sessions: sessions.iter().map(|l| l.info()).collect() })
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match locate(&state, &caller, &id).await {
        Ok(Located::Here(live)) => Ok(Json(live.info()).into_response()),
        Ok(Located::There { node, address }) => {
            let path = format!("/v1/sessions/{id}");
            forward(&state, (&id, node, address), (Method::GET, path), &headers, peer, Bytes::new()).await
        }
        Err(e) if e.status == StatusCode::GONE => Ok(Json(ended_info(&state, &caller, &id).await?).into_response()),
        Err(e) => Err(e),
    }
}

/// What the database says of the caller's ended session `id`.
async fn ended_info(state: &AppState, caller: &Caller, id: &str) -> Result<SessionInfo, ApiError> {
    let row = state
        .store
        .session(id, caller.user.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_session", format!("no session `{id}`")))?;
    Ok(SessionInfo::ended(id.to_owned(), row.tool, row.reason, row.opened_at, row.steps))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match locate(&state, &caller, &id).await {
        Ok(Located::Here(live)) => {
            close(&state, &live, Reason::User).await;
            Ok(Json(live.info()).into_response())
        }
        Ok(Located::There { node, address }) => {
            let path = format!("/v1/sessions/{id}");
            forward(&state, (&id, node, address), (Method::DELETE, path), &headers, peer, Bytes::new()).await
        }
        // Closing an ended session again answers how it ended.
        Err(e) if e.status == StatusCode::GONE => Ok(Json(ended_info(&state, &caller, &id).await?).into_response()),
        Err(e) => Err(e),
    }
}

/// Closes `live` for `reason`: stops a step that runs, drops the instance
/// (its memory back to the pool, its `/tmp` removed), and records why. Only
/// the first close of a session does anything; the session leaves the open
/// ones once its end is recorded, so nobody looking finds it in neither.
pub(crate) async fn close(state: &AppState, live: &Arc<Live>, reason: Reason) {
    if live.ended.set(reason).is_err() {
        return;
    }
    live.closed.cancel();
    // A running step sees the cancellation and gives the instance up.
    let session = live.session.lock().await.take();
    let memory_bytes = session.as_ref().map_or(0, CodeSession::memory_bytes);
    drop(session);
    drop(live.place.lock().unwrap_or_else(PoisonError::into_inner).take());
    state.metrics.session_closed(reason.as_str());
    tracing::info!(session = %live.id, user = %live.user, reason = reason.as_str(), "session closed");
    let event = AuditEvent::new(Kind::SessionClosed, reason.as_str())
        .actor(if reason == Reason::User { live.user.as_str() } else { "sandbox" })
        .user(live.user.as_str())
        .tool(live.tool.clone())
        .detail(serde_json::json!({
            "session": live.id,
            "reason": reason.as_str(),
            "steps": live.steps.load(Ordering::Relaxed),
            "memory_bytes": memory_bytes,
            "age_s": secs(live.opened.elapsed()),
        }));
    let steps = live.steps.load(Ordering::Relaxed);
    if let Err(e) = state.store.session_closed(live.id.clone(), reason.as_str().to_owned(), steps, event).await {
        tracing::error!(error = %e, session = %live.id, "recording a session's end failed");
    }
    state.sessions.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&live.id);
    live.recorded.cancel();
}

/// Closes every session running one of `versions` of tool `name`.
pub(crate) async fn close_tool(state: &AppState, name: &str, versions: &[u32]) {
    let running = state.sessions.all().into_iter().filter(|l| {
        let row = &l.registered.row;
        row.name == name && versions.contains(&row.version)
    });
    for live in running.collect::<Vec<_>>() {
        close(state, &live, Reason::Retired).await;
    }
}

/// Closes session `id` if it is open.
pub(crate) async fn close_by_id(state: &AppState, id: &str, reason: Reason) {
    if let Some(live) = state.sessions.get(id) {
        close(state, &live, reason).await;
    }
}

/// Closes sessions idle past their timeout or past their lifetime, forever.
pub(crate) async fn sweep(state: Arc<AppState>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        for live in state.sessions.all() {
            if live.opened.elapsed() >= live.lifetime {
                close(&state, &live, Reason::Lifetime).await;
            } else if live.session.try_lock().is_ok() && live.idle() >= live.idle_timeout {
                close(&state, &live, Reason::Idle).await;
            }
        }
    }
}

/// Closes every session (the server is stopping).
pub(crate) async fn close_all(state: &AppState) {
    for live in state.sessions.all() {
        close(state, &live, Reason::Shutdown).await;
    }
}
