//! `POST /v1/tools/{name}/invoke` and the caller's executions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::admission::Denial;
use super::auth::{Authed, record_refusal};
use super::error::{ApiPath, parse_json, read_body};
use super::registry::Runnable;
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::policy::Tier;
use crate::report::{ExecutionReport, Status};
use crate::runner::ToolCall;
use crate::store::{Caller, ExecutionPage};

/// The body of an invoke request; every field optional.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// The tool's input document (default `null`).
    #[serde(default)]
    pub input: serde_json::Value,
    /// Arguments (`argv[1..]`) for command-style tools.
    #[serde(default)]
    pub args: Vec<String>,
    /// Wall-clock budget in milliseconds (default and maximum from the policy).
    #[schemars(range(min = 1))]
    #[serde(default, deserialize_with = "super::error::whole_number")]
    pub timeout_ms: Option<u64>,
    /// A registered version (default: the newest).
    #[schemars(range(min = 1, max = 4_294_967_295u32))]
    #[serde(default, deserialize_with = "super::error::whole_number")]
    pub version: Option<u32>,
}

/// Room in an invoke body for the fields around the input.
pub const INVOKE_ENVELOPE_BYTES: usize = 64 << 10;
const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Answers a 429 for `denial`, counting and recording it.
pub(super) async fn denied(state: &AppState, caller: &Caller, tool: Option<&str>, denial: Denial) -> ApiError {
    state.metrics.rejection(denial.reason);
    let mut event = AuditEvent::new(Kind::Denied, "too_many_requests")
        .actor(caller.user.as_str())
        .user(caller.user.as_str())
        .detail(serde_json::json!({"reason": denial.reason, "tier": caller.tier}));
    if let Some(tool) = tool {
        event = event.tool(tool);
    }
    record_refusal(state, event).await;
    ApiError::too_many(denial.reason, denial.message, denial.retry_after)
}

/// Why there is no tool `name`: a built-in still being registered (503
/// `tool_loading`, retry soon), or none of that name (404 `unknown_tool`).
pub(super) fn missing_tool(state: &AppState, name: &str) -> ApiError {
    if !state.builtins_ready() && crate::interpreters::is_builtin(name) {
        let mut loading = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "tool_loading",
            format!("the built-in tool `{name}` is being registered (a new build compiles for seconds)"),
        );
        loading.retry_after = Some(2);
        return loading;
    }
    if let Err(unavailable) = unavailable(state, name, None) {
        return unavailable;
    }
    ApiError::not_found("unknown_tool", format!("no tool `{name}`"))
}

/// 503 `tool_unavailable` when the version of `name` a call would run was
/// registered but could not be loaded at start (its module damaged or gone).
fn unavailable(state: &AppState, name: &str, version: Option<u32>) -> Result<(), ApiError> {
    match state.registry.unloadable(name, version) {
        None => Ok(()),
        Some((version, why)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "tool_unavailable",
            format!(
                "tool `{name}` (version {version}) is registered but could not be loaded when the server started: \
                 {why}; an admin can register it again"
            ),
        )),
    }
}

/// The wall-clock budget `timeout_ms` asks for, checked against the policy.
pub(super) fn checked_timeout(
    state: &AppState,
    caller: &Caller,
    timeout_ms: Option<u64>,
) -> Result<Option<Duration>, ApiError> {
    let timeout = timeout_ms.map(Duration::from_millis);
    state
        .sandbox
        .policy
        .resolve(&caller.tier, timeout)
        .map_err(|e| ApiError::bad_request("bad_timeout", e.to_string()))?;
    Ok(timeout)
}

pub(super) fn tier<'a>(state: &'a AppState, caller: &Caller) -> Result<&'a Tier, ApiError> {
    state.sandbox.policy.tier(&caller.tier).map_err(|e| {
        ApiError::new(StatusCode::FORBIDDEN, "unknown_tier", format!("your account's tier is not configured: {e}"))
    })
}

pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body =
        read_body(&headers, body, state.sandbox.policy.input_bytes.saturating_add(INVOKE_ENVELOPE_BYTES)).await?;
    let request: InvokeRequest =
        if body.iter().all(u8::is_ascii_whitespace) { InvokeRequest::default() } else { parse_json(&body)? };
    let prepared = Prepared::new(&state, &caller, &name, &request)?;
    let idempotency = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => {
            let key = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY).ok_or_else(|| {
                ApiError::bad_request(
                    "bad_idempotency_key",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            })?;
            let mut h = Sha256::new();
            h.update(name.as_bytes());
            h.update([0]);
            h.update(&body);
            Some((key.to_owned(), hex::encode(h.finalize())))
        }
    };
    let _key_guard = match &idempotency {
        None => None,
        Some((key, request_hash)) => {
            if let Some(hit) = state.store.idempotent(caller.user.as_str(), key).await? {
                if hit.request_hash.as_deref() != Some(request_hash) {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used for a different request",
                    ));
                }
                let mut response = stored_report(hit.report);
                response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(response);
            }
            Some(KeyGuard::take(&state, caller.user.as_str(), key)?)
        }
    };

    // A client that hangs up does not cancel the call: it finishes and is recorded.
    let (_, json) = prepared.run(&state, caller, request, idempotency, arrived, Runs::Call(None)).await?;
    Ok(stored_report(json))
}

/// What a call runs in.
pub(crate) enum Runs {
    /// A fresh instance (or a native run); the token stops a WASM call.
    Call(Option<tokio_util::sync::CancellationToken>),
    /// The live instance of a code session, locked for this step.
    Step(tokio::sync::OwnedMutexGuard<Option<crate::runner::CodeSession>>, Arc<super::sessions::Live>),
}

/// A call checked and ready to run: the one invoke path of every face (HTTP,
/// MCP, code sessions). Checking comes first so that a mistake is answered before an
/// idempotency key is looked up.
pub(crate) struct Prepared {
    tier: Tier,
    registered: Arc<super::registry::Registered>,
    timeout: Option<Duration>,
}

impl Prepared {
    /// The tool version this call will run.
    pub(crate) fn registered(&self) -> &super::registry::Registered {
        &self.registered
    }

    /// The caller's tier, the timeout within it, and the tool (a version of it).
    pub(crate) fn new(
        state: &AppState,
        caller: &Caller,
        name: &str,
        request: &InvokeRequest,
    ) -> Result<Self, ApiError> {
        unavailable(state, name, request.version)?;
        let Some(registered) = state.registry.get(name, request.version) else {
            return Err(match request.version {
                Some(v) if state.registry.get(name, None).is_some() => {
                    ApiError::not_found("unknown_version", format!("tool `{name}` has no active version {v}"))
                }
                _ => missing_tool(state, name),
            });
        };
        Self::for_session(state, caller, registered, request)
    }

    /// A call of `registered` as it stands: a step of a code session runs
    /// the version the session was opened with, even if a newer one was
    /// registered since.
    pub(crate) fn for_session(
        state: &AppState,
        caller: &Caller,
        registered: Arc<super::registry::Registered>,
        request: &InvokeRequest,
    ) -> Result<Self, ApiError> {
        let tier = tier(state, caller)?.clone();
        let timeout = checked_timeout(state, caller, request.timeout_ms)?;
        Ok(Self { tier, registered, timeout })
    }

    /// Admits the call (or answers 429), runs it in a task of its own, records
    /// its execution, audit and metrics, and answers the report and its JSON.
    /// A caller that goes away does not stop it: it still finishes and is
    /// recorded. `cancel` stops a WASM call or a native run (status `cancelled`,
    /// recorded).
    pub(crate) async fn run(
        self,
        state: &Arc<AppState>,
        caller: Caller,
        request: InvokeRequest,
        idempotency: Option<(String, String)>,
        arrived: Instant,
        runs: Runs,
    ) -> Result<(ExecutionReport, Bytes), ApiError> {
        let Self { tier, registered, timeout } = self;
        let name = registered.row.name.clone();
        if let (Runnable::Native(_), Err(why)) = (&registered.runnable, &state.jail) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "native_unavailable",
                format!("tool `{name}` is a native program, and native tools cannot run on this server: {why}"),
            ));
        }
        // A native run's cgroup limit is held for it; a WASM call is charged as it grows.
        let reserve = if matches!(registered.runnable, Runnable::Native(_)) { tier.memory_bytes } else { 0 };
        let permit = match state.admission.admit(caller.user.as_str(), &name, tier.concurrent_calls, reserve) {
            Ok(permit) => permit,
            Err(denial) => {
                // A step's session lock goes before the refusal is recorded:
                // a close waiting for it must not wait on the database too.
                drop(runs);
                return Err(denied(state, &caller, Some(&name), denial).await);
            }
        };
        // Across the nodes (PostgreSQL): the user's calls on every node.
        let place = match &state.node {
            None => None,
            Some(node) => match node.take_place(caller.user.as_str(), tier.concurrent_calls).await {
                Ok(Ok(place)) => Some(place),
                Ok(Err(denial)) => {
                    drop((permit, runs));
                    return Err(denied(state, &caller, Some(&name), denial).await);
                }
                Err(unavailable) => return Err(unavailable),
            },
        };
        let input = serde_json::to_vec(&request.input).map_err(|e| ApiError::internal("encoding the input", &e))?;
        let call =
            ToolCall { user: caller.user.clone(), tier: caller.tier.clone(), input, args: request.args, timeout };
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            let report = match (&registered.runnable, runs) {
                (_, Runs::Step(mut guard, live)) => {
                    let Some(session) = guard.as_mut() else {
                        return Err(ApiError::new(StatusCode::GONE, "session_ended", "session ended: it was closed"));
                    };
                    let mut report = task_state.sandbox.step(session, &call, live.closed()).await;
                    report.session = Some(live.id().to_owned());
                    super::sessions::after_step(&task_state, &live, guard, report.status).await;
                    report
                }
                (Runnable::Wasm(tool), Runs::Call(cancel)) => {
                    task_state.sandbox.run_cancellable(Ok(tool), &call, cancel.as_ref()).await
                }
                (Runnable::Native(tool), Runs::Call(cancel)) => {
                    let jail = task_state.jail.as_ref().map_err(String::as_str);
                    task_state.sandbox.run_native_cancellable(jail, tool, &call, cancel.as_ref()).await
                }
            };
            let mut events = audit_events(&task_state, &caller, &report, registered.row.version, &call);
            // Behaviour analysis: its detections are recorded with the call that completed them.
            let facts = crate::behaviour::CallFacts {
                network: caller.network.as_deref(),
                ..crate::behaviour::CallFacts::of(&report)
            };
            let found = task_state.analyzer.observe_call(&facts, Instant::now());
            events.extend(found.iter().map(|d| super::behaviour::anomaly_event(&task_state, d)));
            let json: Bytes =
                serde_json::to_vec(&report).map_err(|e| ApiError::internal("encoding the report", &e))?.into();
            let stored = task_state
                .store
                .record_execution(&report, json.clone(), Some(registered.row.version), idempotency, events)
                .await;
            // Given back before the answer: the caller's next call must find it free.
            if let Some(place) = place {
                place.give_back().await;
            }
            task_state.metrics.call(&report, arrived.elapsed().as_secs_f64());
            task_state.rollup.call(&report);
            stored?;
            if !found.is_empty() {
                let responding = task_state.clone();
                tokio::spawn(async move { super::behaviour::act(&responding, found).await });
            }
            Ok::<_, ApiError>((report, json))
        });
        task.await.map_err(|e| ApiError::internal("the call's task", &e))?
    }
}

/// Marks an idempotency key as running; a second request with it while the
/// first runs gets 409 rather than a second run.
struct KeyGuard {
    state: Arc<AppState>,
    key: (String, String),
}

impl KeyGuard {
    fn take(state: &Arc<AppState>, user: &str, key: &str) -> Result<Self, ApiError> {
        let key = (user.to_owned(), key.to_owned());
        let mut running = state.running_keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !running.insert(key.clone()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a call with this Idempotency-Key is still running; retry when it has finished",
            ));
        }
        Ok(Self { state: state.clone(), key })
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.state.running_keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.key);
    }
}

/// The execution record, a limit-breach record when a limit stopped the call,
/// and alert records for the specification's thresholds.
fn audit_events(
    state: &AppState,
    caller: &Caller,
    report: &ExecutionReport,
    version: u32,
    call: &ToolCall,
) -> Vec<AuditEvent> {
    let user = caller.user.as_str();
    let mut detail = serde_json::json!({
        "execution": report.id,
        "version": version,
        "sha256": report.tool_sha256,
        "tier": report.tier,
        "usage": report.usage,
        "started_at": report.started_at,
        "finished_at": report.finished_at,
    });
    if let Some(session) = &report.session {
        detail["session"] = session.as_str().into();
    }
    if state.settings.audit_payloads {
        detail["input"] = serde_json::from_slice(&call.input).unwrap_or(serde_json::Value::Null);
        detail["output"] = report.output.clone().unwrap_or(serde_json::Value::Null);
    }
    let base = |kind, outcome: &str| AuditEvent::new(kind, outcome).actor(user).user(user).tool(report.tool.clone());
    let mut events = vec![base(Kind::Execution, report.status.as_str()).detail(detail)];
    // A limit that stopped the call, or limits the call ran into and survived.
    let stopped = matches!(report.status, Status::Timeout | Status::CpuLimit | Status::MemoryLimit | Status::PidsLimit);
    if stopped || !report.usage.limits_hit.is_empty() {
        let outcome = if stopped { report.status.as_str() } else { "survived" };
        events.push(base(Kind::LimitBreach, outcome).detail(serde_json::json!({
            "execution": report.id,
            "limit": report.status,
            "limits_hit": report.usage.limits_hit,
            "error": report.error,
        })));
    }
    for (rule, value, threshold) in alerts(state, report, call) {
        state.metrics.alert(rule);
        tracing::warn!(rule, value, threshold, user, tool = %report.tool, execution = %report.id, "alert");
        events.push(base(Kind::Alert, rule).detail(serde_json::json!({
            "rule": rule,
            "execution": report.id,
            "value": value,
            "threshold": threshold,
        })));
    }
    events
}

/// The specification's alert rules that `report` trips: (rule, value, threshold).
fn alerts(state: &AppState, report: &ExecutionReport, call: &ToolCall) -> Vec<(&'static str, f64, f64)> {
    let mut fired = Vec::new();
    let Ok(limits) = state.sandbox.policy.resolve(&call.tier, call.timeout) else { return fired };
    if let Some(peak) = report.usage.peak_memory_bytes {
        let threshold = 0.8 * limits.memory_bytes as f64;
        if peak as f64 > threshold {
            fired.push(("memory_over_80_percent", peak as f64, threshold));
        }
    }
    // The host as well as the call: all calls' memory against the budget.
    let pool = state.sandbox.engine.guest_memory();
    let (held, threshold) = (pool.in_use_bytes() as f64, 0.8 * pool.budget_bytes() as f64);
    if report.usage.limits_hit.iter().any(|l| l == "host_memory") || held > threshold {
        fired.push(("host_memory_over_80_percent", held, threshold));
    }
    if let Some(cpu_ms) = report.usage.cpu_ms {
        let threshold = 0.9 * limits.cpu_time.as_secs_f64() * 1e3;
        if cpu_ms > threshold {
            fired.push(("cpu_over_90_percent", cpu_ms, threshold));
        }
    }
    if let Some(processes) = report.usage.peak_processes
        && processes > 40
    {
        fired.push(("processes_over_40", f64::from(processes), 40.0));
    }
    if let Some(written) = report.usage.bytes_written
        && written > 1 << 30
    {
        fired.push(("writes_over_1_gib", written as f64, (1u64 << 30) as f64));
    }
    fired
}

pub(super) fn stored_report(json: impl Into<Bytes>) -> Response {
    let json: Bytes = json.into();
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], json).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    before: Option<i64>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ExecutionPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("bad_query", "limit must be between 1 and 500"));
    }
    Ok(Json(state.store.executions(caller.user.as_str(), limit, q.before).await?))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    // Another user's execution is answered exactly like one that does not exist.
    let owner = if caller.admin { None } else { Some(caller.user.as_str()) };
    match state.store.execution(&id, owner).await? {
        Some(json) => Ok(stored_report(json)),
        None => Err(ApiError::not_found("unknown_execution", format!("no execution `{id}`"))),
    }
}
