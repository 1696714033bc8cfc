//! `GET|PUT|DELETE /v1/files/{path}`: the caller's own data directory, the
//! one their tools see as `/data`. All file-system work is in [`crate::userfs`].

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::auth::Authed;
use super::error::{ApiPath, read_body};
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::quota::Budget;
use crate::store::Caller;
use crate::userfs::{DirEntry, Node, UserFs, read_all};
use crate::volume::DiskSize;

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<DirEntry>,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Written {
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Deleted {
    pub path: String,
}

/// Runs `f` on the caller's directory on a blocking thread. `request`
/// (e.g. `read /a/b`) names what was asked, in the evidence of a refused escape.
pub(super) async fn with_fs<T: Send + 'static>(
    state: &Arc<AppState>,
    caller: &Caller,
    request: &str,
    f: impl FnOnce(&UserFs) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    // A tier missing from the config is not a zero quota (a volume would be
    // made or shrunk to nothing): the caller is told.
    let tier = state.sandbox.policy.tier(&caller.tier).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "unknown_tier",
            format!("your account's tier is not configured: {e}"),
        )
    })?;
    let size = DiskSize { bytes: tier.data_quota_bytes, files: tier.data_files };
    let dir = state.sandbox.data_dir.open_user(&caller.user, size).await.map_err(|e| {
        if e.is_no_space() {
            tracing::error!(error = %e, "a user's data volume");
            ApiError::storage_full("preparing your data volume")
        } else {
            ApiError::internal("the data directory", &e)
        }
    })?;
    // Files made here belong to the native jail's uid, so native tools can write them.
    let jail = state.jail.as_ref().ok().cloned();
    let done = tokio::task::spawn_blocking(move || {
        let owner = match &jail {
            Some(jail) => {
                jail.prepare_data_dir(dir.path())
                    .map_err(|e| ApiError::internal("preparing the data directory", &e))?;
                jail.file_owner()
            }
            None => None,
        };
        f(&UserFs::open(dir.path())?.owned_by(owner))
    })
    .await
    .map_err(|e| ApiError::internal("the file operation", &e))?;
    if let Err(e) = &done
        && e.escape
    {
        state.rollup.security_event(Some(caller.user.as_str()), caller.tier.as_str(), "escape");
        let what = format!("{request}: {}", e.message);
        if let Some(found) = state.analyzer.observe_escape(caller.user.as_str(), what, std::time::Instant::now()) {
            super::behaviour::respond_later(state, vec![found]);
        }
    }
    done
}

/// The caller's `/data` budget: their ledger, shared with their calls in
/// flight, under their tier's caps.
async fn budget(state: &AppState, caller: &Caller) -> Result<Budget, ApiError> {
    let ledger = state.sandbox.data_dir.ledger(&caller.user).await.ok_or_else(|| {
        ApiError::internal("the data directory", &"it cannot be measured, so its quota cannot be kept")
    })?;
    let tier = state.sandbox.policy.tiers.get(&caller.tier);
    Ok(Budget::new(ledger, tier.map_or(0, |t| t.data_quota_bytes), tier.map_or(0, |t| t.data_files)))
}

pub async fn list_root(state: State<Arc<AppState>>, caller: Authed) -> Result<Response, ApiError> {
    get(state, caller, ApiPath(String::new())).await
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(path): ApiPath<String>,
) -> Result<Response, ApiError> {
    let shown = path.clone();
    with_fs(&state, &caller, &format!("files API read {shown}"), move |fs| match fs.get(&path)? {
        Node::Dir(entries) => Ok(Json(Listing { path: shown, entries }).into_response()),
        Node::File { file, size } => {
            let bytes = read_all(file, size).map_err(|e| ApiError::internal("reading the file", &e))?;
            let content_type = HeaderValue::from_static("application/octet-stream");
            Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
        }
    })
    .await
}

pub async fn put(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(path): ApiPath<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Written>, ApiError> {
    let body = read_body(&headers, body, state.settings.max_file_bytes).await?;
    let budget = budget(&state, &caller).await?;
    let target = path.clone();
    let written = with_fs(&state, &caller, &format!("files API write {path}"), move |fs| {
        let _writing = budget.ledger().writer();
        Ok(fs.put(&target, &body, &budget)?)
    })
    .await;
    let user = caller.user.as_str();
    let (outcome, detail) = match &written {
        Ok(bytes) => ("ok", serde_json::json!({"path": path, "bytes": bytes})),
        Err(e) => ("denied", serde_json::json!({"path": path, "reason": e.message})),
    };
    let event = AuditEvent::new(Kind::FileWritten, outcome).actor(user).user(user).detail(detail);
    state.store.audit(vec![event]).await?;
    Ok(Json(Written { path, bytes: written? }))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Authed(caller): Authed,
    ApiPath(path): ApiPath<String>,
) -> Result<Json<Deleted>, ApiError> {
    let budget = budget(&state, &caller).await?;
    let target = path.clone();
    let deleted = with_fs(&state, &caller, &format!("files API delete {path}"), move |fs| {
        let _writing = budget.ledger().writer();
        Ok(fs.delete(&target, &budget)?)
    })
    .await;
    let user = caller.user.as_str();
    let (outcome, detail) = match &deleted {
        Ok(()) => ("ok", serde_json::json!({"path": path})),
        Err(e) => ("denied", serde_json::json!({"path": path, "reason": e.message})),
    };
    let event = AuditEvent::new(Kind::FileDeleted, outcome).actor(user).user(user).detail(detail);
    state.store.audit(vec![event]).await?;
    deleted?;
    Ok(Json(Deleted { path }))
}
