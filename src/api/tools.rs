//! The tool registry's routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::{Admin, Authed, record};
use super::error::{ApiPath, read_body};
use super::registry::{Registered, Runnable, StoreToolError, WasmRegistration};
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::engine::ToolKind;
use crate::store::ToolRow;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterQuery {
    name: Option<String>,
    description: Option<String>,
    input_schema: Option<String>,
}

/// `GET /v1/tools`: the list, or with `?format=openai` the function-calling
/// `tools` array (for the OpenAPI document).
#[derive(schemars::JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only its schema is used
pub enum ToolsAnswer {
    List(ToolList),
    OpenAi(Vec<serde_json::Value>),
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct ToolList {
    /// The newest active version of each tool.
    pub tools: Vec<ToolView>,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct ToolVersions {
    pub name: String,
    /// Active versions, oldest first; invoking the name takes the last.
    pub versions: Vec<ToolView>,
}

/// A tool version as the API shows it: its registry row, and what its
/// module declares beyond it.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct ToolView {
    #[serde(flatten)]
    pub row: ToolRow,
    /// JSON Schema of the tool's output (the `output` of its reports), when
    /// its module declares one: an SDK tool whose output type derives
    /// `JsonSchema`. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<serde_json::Value>,
}

impl ToolView {
    pub(crate) fn of(registered: &Registered) -> Self {
        let output_schema = match &registered.runnable {
            Runnable::Wasm(tool) => tool.info().output_schema.as_deref().cloned(),
            Runnable::Native(_) => None,
        };
        Self { row: registered.row.clone(), output_schema }
    }
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Retired {
    pub name: String,
    pub versions: Vec<u32>,
}

/// Tool names as LLM function-calling APIs accept them.
pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "bad_tool_name",
            format!("tool name `{name}` must be 1 to 64 characters of A-Z, a-z, 0-9, `-`, `_`"),
        ))
    }
}

pub(super) fn kind_name(kind: ToolKind) -> &'static str {
    match kind {
        ToolKind::Sdk => "sdk",
        ToolKind::WasiCommand => "wasi_command",
        ToolKind::WasiP1Module => "wasi_p1_module",
    }
}

pub async fn register(
    State(state): State<Arc<AppState>>,
    Admin(caller): Admin,
    query: Result<Query<RegisterQuery>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if json {
        return super::native::register(&state, &caller, &headers, body).await;
    }
    let bytes = read_body(&headers, body, state.sandbox.policy.module_bytes).await?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("empty_body", "send the tool's .wasm module as the request body"));
    }
    if let Some(name) = &q.name {
        check_name(name)?;
    }
    let input_schema = match &q.input_schema {
        None => None,
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| ApiError::bad_request("bad_input_schema", format!("input_schema is not JSON: {e}")))?,
        ),
    };
    let fallback = q.name.clone().unwrap_or_else(|| "tool".into());
    let mut tool = match state.sandbox.load(&bytes, &fallback).await {
        Ok(tool) => tool,
        Err(e) if e.is_host_failure() => return Err(ApiError::internal("loading the tool", &e)),
        Err(e) => {
            let event = AuditEvent::new(Kind::ToolRegistered, "rejected")
                .actor(caller.user.as_str())
                .tool(fallback)
                .detail(serde_json::json!({"reason": e.to_string(), "bytes": bytes.len()}));
            record(&state, event).await;
            return Err(ApiError::bad_request("invalid_tool", e.to_string()));
        }
    };
    let name = q.name.unwrap_or_else(|| tool.name().to_owned());
    check_name(&name)?;
    tool.rename(&name);
    let how = WasmRegistration { registered_by: caller.user.to_string(), description: q.description, input_schema };
    let registered =
        state.registry.register_wasm(&state.store, &state.blobs, (tool, bytes), how).await.map_err(|e| match e {
            StoreToolError::Blob(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                ApiError::storage_full("storing the module")
            }
            StoreToolError::Blob(e) => ApiError::internal("storing the module", &e),
            StoreToolError::Store(e) => e.into(),
        })?;
    let row = &registered.row;
    tracing::info!(tool = %row.name, version = row.version, sha256 = %row.sha256, by = %row.registered_by, "tool registered");
    let view = ToolView::of(&registered);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    format: Option<String>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Authed(_): Authed,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let newest = state.registry.newest();
    match q.format.as_deref() {
        None | Some("native") => {
            Ok(Json(ToolList { tools: newest.iter().map(|t| ToolView::of(t)).collect() }).into_response())
        }
        Some("openai") => {
            let functions: Vec<serde_json::Value> = newest
                .iter()
                .map(|t| t.row.clone())
                .map(|t| {
                    serde_json::json!({
                        "type": "function",
                        "function": {
                            "name": t.name,
                            "description": t.description.unwrap_or_default(),
                            "parameters": t.input_schema.unwrap_or_else(|| serde_json::json!({"type": "object"})),
                        }
                    })
                })
                .collect();
            Ok(Json(functions).into_response())
        }
        Some(other) => {
            Err(ApiError::bad_request("bad_query", format!("unknown format `{other}` (known: native, openai)")))
        }
    }
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    Authed(_): Authed,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ToolVersions>, ApiError> {
    let versions: Vec<ToolView> = state.registry.versions(&name).iter().map(|t| ToolView::of(t)).collect();
    if versions.is_empty() {
        return Err(ApiError::not_found("unknown_tool", format!("no tool `{name}`")));
    }
    Ok(Json(ToolVersions { name, versions }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireQuery {
    version: Option<u32>,
}

pub async fn retire(
    State(state): State<Arc<AppState>>,
    Admin(caller): Admin,
    ApiPath(name): ApiPath<String>,
    query: Result<Query<RetireQuery>, QueryRejection>,
) -> Result<Json<Retired>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let versions =
        state.store.retire_tool(name.clone(), q.version, caller.user.to_string()).await.map_err(|e| match e {
            crate::store::StoreError::NotFound(m) => ApiError::not_found("unknown_tool", m),
            e => e.into(),
        })?;
    state.registry.retire(&name, &versions);
    // Code sessions running a retired version end with it.
    super::sessions::close_tool(&state, &name, &versions).await;
    tracing::info!(tool = %name, ?versions, by = %caller.user, "tool retired");
    Ok(Json(Retired { name, versions }))
}
