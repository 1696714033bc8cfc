//! Health, metrics, the caller's own account, and the audit trail.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::{Admin, Authed};
use super::error::{ApiPath, parse_json, read_body};
use super::{ApiError, AppState};
use crate::audit::{self, Kind, Record};
use crate::policy::UserId;
use crate::store::Restriction;

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Health {
    pub status: &'static str,
    /// `/readyz` only: `available`, or why native tools cannot run here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_tools: Option<String>,
    /// `/readyz` only: how the data quota and `/tmp` are held, by who writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_limits: Option<DiskLimits>,
}

/// How this server holds users' disk limits, by who writes (SECURITY.md, "Disk").
#[derive(Debug, Clone, Copy, serde::Serialize, schemars::JsonSchema)]
pub struct DiskLimits {
    pub wasm_components: &'static str,
    pub wasm_preview1_modules: &'static str,
    pub native_tools: &'static str,
    pub files_api: &'static str,
}

/// What this server enforces, by who writes: the WASM path's accounting is
/// the server's own and does not depend on the file system; native tools are
/// held by the kernel where users have volumes (`volumes`).
pub fn disk_limits(volumes: bool) -> DiskLimits {
    let wasm_components = "every write: /data quota (bytes and files) shared by the user's calls and the files API, \
                           /tmp per call, open files per call and across calls";
    let files_api = "every write, on the same ledger as the WASM calls";
    const PREVIEW1: &str = "as components: they run through wasmtime's preview 1 adapter; a module it cannot \
                            adapt (non-WASI imports) gets no /data and no /tmp";
    if volumes {
        DiskLimits {
            wasm_components,
            wasm_preview1_modules: PREVIEW1,
            native_tools: "every write: /data is the user's own ext4 volume, its blocks past the quota reserved \
                           from tools (ENOSPC at the quota, counted in 4 KiB blocks) and its inodes the tier's \
                           files; /tmp is a tmpfs of the tier's size",
            files_api,
        }
    } else {
        DiskLimits {
            wasm_components,
            wasm_preview1_modules: PREVIEW1,
            native_tools: "before each call only: /data is read-only while the user is at or over the quota (no \
                           per-write cap: this host has no per-user volumes, see the start-up log); /tmp is a \
                           tmpfs of the tier's size",
            files_api,
        }
    }
}

pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok", native_tools: None, disk_limits: None })
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "the server is shutting down"));
    }
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", e.to_string()))?;
    if !state.builtins_ready() {
        let mut loading = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "loading",
            "the built-in tools (python, javascript, python-data) are being registered: a new build compiles for \
             seconds; other tools are served meanwhile",
        );
        loading.retry_after = Some(1);
        return Err(loading);
    }
    let native = match &state.jail {
        Ok(_) => "available".to_owned(),
        Err(why) => format!("unavailable: {why}"),
    };
    Ok(Json(Health {
        status: "ready",
        native_tools: Some(native),
        disk_limits: Some(disk_limits(state.sandbox.data_dir.volumes().is_some())),
    }))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (sessions_open, sessions_memory_bytes) = state.sessions.gauges();
    let warm = state.registry.warm_pools();
    let now = super::metrics::Now {
        active_calls: state.admission.in_flight(),
        pool_capacity: state.admission.global_cap(),
        shared: super::metrics::SharedGauges {
            sessions_open,
            sessions_memory_bytes,
            ..super::metrics::SharedGauges::of(&state.sandbox)
        },
        warm: &warm,
        tools_unloadable: state.registry.unloadable_count(),
        report_bytes: state.store.report_bytes().await.ok(),
    };
    let text = state.metrics.render(&now);
    ([(header::CONTENT_TYPE, HeaderValue::from_static(super::metrics::CONTENT_TYPE))], text).into_response()
}

/// The caller's account as the server sees it.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Me {
    pub user: String,
    pub tier: String,
    pub admin: bool,
    pub memory_bytes: Option<u64>,
    pub cpu: Option<f64>,
    pub concurrent_calls: Option<u32>,
    pub requests_per_second: Option<u32>,
    pub data_quota_bytes: Option<u64>,
    pub data_used_bytes: u64,
    pub data_files: Option<u64>,
    pub data_used_files: u64,
}

pub async fn me(State(state): State<Arc<AppState>>, Authed(caller): Authed) -> Result<Json<Me>, ApiError> {
    let (used, files) = match state.sandbox.data_dir.ledger(&caller.user).await {
        Some(ledger) => ledger.used(),
        None => return Err(ApiError::internal("measuring usage", &"the data directory cannot be measured")),
    };
    let tier = state.sandbox.policy.tiers.get(&caller.tier);
    Ok(Json(Me {
        user: caller.user.to_string(),
        tier: caller.tier.clone(),
        admin: caller.admin,
        memory_bytes: tier.map(|t| t.memory_bytes),
        cpu: tier.map(|t| t.cpu),
        concurrent_calls: tier.map(|t| t.concurrent_calls),
        requests_per_second: tier.map(|t| t.requests_per_second),
        data_quota_bytes: tier.map(|t| t.data_quota_bytes),
        data_used_bytes: used,
        data_files: tier.map(|t| t.data_files),
        data_used_files: files,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    user: Option<String>,
    tool: Option<String>,
    kind: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<i64>,
    limit: Option<u32>,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct AuditPage {
    pub records: Vec<Record>,
    /// Pass as `?before=` for older records; `null` on the last page.
    pub next_before: Option<i64>,
}

/// An RFC 3339 bound (any offset, any year), in the form the audit trail
/// stores its times (UTC, microseconds), so that comparing the text compares
/// the times.
fn time_bound(t: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(t) = t else { return Ok(None) };
    let at = chrono::DateTime::parse_from_rfc3339(&t)
        .map_err(|e| ApiError::bad_request("bad_query", format!("`{t}` is not an RFC 3339 time ({e})")))?;
    Ok(Some(at.with_timezone(&chrono::Utc).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()))
}

/// A filter's value: not empty.
fn filter(name: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::bad_request("bad_query", format!("{name} is empty"))),
        v => Ok(v),
    }
}

async fn query_audit(state: &AppState, q: audit::Query) -> Result<Json<AuditPage>, ApiError> {
    let limit = q.limit;
    let records = state.store.audit_records(&q).await?;
    let next_before = if records.len() == limit as usize { records.last().map(|r| r.seq) } else { None };
    Ok(Json(AuditPage { records, next_before }))
}

pub async fn audit(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let kind = match &q.kind {
        None => None,
        Some(k) => Some(Kind::parse(k).ok_or_else(|| {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            ApiError::bad_request("bad_query", format!("unknown kind `{k}` (known: {})", known.join(", ")))
        })?),
    };
    let (since, until) = (time_bound(q.since)?, time_bound(q.until)?);
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("bad_query", "limit must be between 1 and 1000"));
    }
    let user = filter("user", q.user)?;
    if let Some(Err(e)) = user.as_deref().map(UserId::new) {
        return Err(ApiError::bad_request("bad_query", e.to_string()));
    }
    let (tool, before) = (filter("tool", q.tool)?, q.before);
    let q = audit::Query { user, tool, kind, since, until, before, limit };
    query_audit(&state, q).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    limit: Option<u32>,
}

pub async fn alerts(
    State(state): State<Arc<AppState>>,
    Admin(_): Admin,
    query: Result<Query<AlertQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("bad_query", "limit must be between 1 and 1000"));
    }
    query_audit(&state, audit::Query { kind: Some(Kind::Alert), limit, ..audit::Query::default() }).await
}

/// `GET /v1/users`.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct UserList {
    pub users: Vec<crate::store::UserRow>,
}

pub async fn users(State(state): State<Arc<AppState>>, Admin(_): Admin) -> Result<Json<UserList>, ApiError> {
    Ok(Json(UserList { users: state.store.list_users().await? }))
}

/// A tool's warm jails now.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct WarmNow {
    pub tool: String,
    pub ready: u64,
    pub warming: u64,
    pub memory_bytes: u64,
}

/// `GET /v1/live`: what the server is doing this moment.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Live {
    /// Calls running now, and the instance pool's places for calls.
    pub in_flight: u32,
    pub capacity: u32,
    /// Places held by code sessions' live instances.
    pub session_slots: u32,
    pub sessions_open: u64,
    pub sessions_memory_bytes: u64,
    /// The guests' memory against the server's budget for calls.
    pub memory_in_use_bytes: u64,
    pub memory_budget_bytes: u64,
    /// Host descriptors WASM guests hold, against their budget.
    pub descriptors_in_use: u64,
    pub descriptors_max: u64,
    /// Longest running first.
    pub calls: Vec<super::admission::Running>,
    /// Native tools' warm jails.
    pub warm: Vec<WarmNow>,
}

pub async fn live(State(state): State<Arc<AppState>>, Admin(_): Admin) -> Json<Live> {
    let (sessions_open, sessions_memory_bytes) = state.sessions.gauges();
    let shared = super::metrics::SharedGauges::of(&state.sandbox);
    let warm = state
        .registry
        .warm_pools()
        .iter()
        .map(|pool| {
            let (ready, warming, memory_bytes) = pool.counts();
            WarmNow { tool: pool.tool().to_owned(), ready: ready as u64, warming: warming as u64, memory_bytes }
        })
        .collect();
    Json(Live {
        in_flight: state.admission.in_flight(),
        capacity: state.admission.global_cap(),
        session_slots: state.admission.session_slots(),
        sessions_open,
        sessions_memory_bytes,
        memory_in_use_bytes: shared.memory_in_use_bytes,
        memory_budget_bytes: shared.memory_budget_bytes,
        descriptors_in_use: shared.descriptors_in_use,
        descriptors_max: shared.descriptors_max,
        calls: state.admission.running(),
        warm,
    })
}

/// `POST /v1/users/{id}/suspend`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SuspendRequest {
    /// Seconds, 1 to 2592000 (30 days); default 3600.
    #[schemars(range(min = 1, max = 2_592_000))]
    #[serde(default, deserialize_with = "super::error::whole_number")]
    pub for_s: Option<u64>,
    /// Why, shown to the user in the 403 (default: "suspended by an admin").
    pub reason: Option<String>,
}

/// The suspension that holds on a user (a longer one already there stays).
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Suspension {
    pub user: String,
    /// RFC 3339.
    pub suspended_until: String,
    pub reason: String,
}

/// What an unsuspend lifted.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Lifted {
    pub user: String,
    /// The restrictions that still held: `suspend`, `throttle`.
    pub lifted: Vec<String>,
}

const MAX_SUSPENSION_S: u64 = 30 * 86_400;

pub async fn suspend(
    State(state): State<Arc<AppState>>,
    Admin(admin): Admin,
    ApiPath(user): ApiPath<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Suspension>, ApiError> {
    let body = read_body(&headers, body, 16 << 10).await?;
    let request: SuspendRequest =
        if body.iter().all(u8::is_ascii_whitespace) { SuspendRequest::default() } else { parse_json(&body)? };
    let for_s = request.for_s.unwrap_or(3600);
    if !(1..=MAX_SUSPENSION_S).contains(&for_s) {
        return Err(ApiError::bad_request("bad_request", "for_s must be between 1 and 2592000 (30 days)"));
    }
    let reason = request.reason.unwrap_or_else(|| "suspended by an admin".to_owned());
    if reason.len() > 1024 {
        return Err(ApiError::bad_request("bad_request", "reason is longer than 1024 bytes"));
    }
    let id = UserId::new(&user).map_err(|e| ApiError::not_found("not_found", format!("no user `{user}`: {e}")))?;
    let until = crate::store::unix_now() + for_s as i64;
    let held = state.store.restrict(id, Restriction::Suspend, until, reason, admin.user.to_string()).await?;
    Ok(Json(Suspension { user, suspended_until: crate::store::unix_rfc3339(held.until), reason: held.reason }))
}

pub async fn unsuspend(
    State(state): State<Arc<AppState>>,
    Admin(admin): Admin,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<Lifted>, ApiError> {
    let id = UserId::new(&user).map_err(|e| ApiError::not_found("not_found", format!("no user `{user}`: {e}")))?;
    let lifted = state.store.lift_restrictions(id, admin.user.to_string()).await?;
    Ok(Json(Lifted { user, lifted }))
}

pub async fn no_route() -> ApiError {
    ApiError::not_found("no_route", "no such route; see GET /openapi.json")
}

pub async fn no_method() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
}
