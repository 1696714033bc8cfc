//! Authentication (`Authorization: Bearer <key>`) and the per-user request
//! rate, as extractors: a handler that takes [`Authed`] or [`Admin`] never
//! runs for a caller that is not allowed.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::store::Caller;

/// A request from a known user with an active key, within their rate.
pub struct Authed(pub Caller);

/// A request from an admin.
pub struct Admin(pub Caller);

impl FromRequestParts<Arc<AppState>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        authenticate(parts, state).await.map(Authed)
    }
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state).await?;
        if !caller.admin {
            let event = AuditEvent::new(Kind::Denied, "forbidden")
                .actor(caller.user.as_str())
                .detail(serde_json::json!({"method": parts.method.as_str(), "path": parts.uri.path()}));
            record_refusal(state, event).await;
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this route is for admins"));
        }
        Ok(Admin(caller))
    }
}

pub(super) async fn authenticate(parts: &Parts, state: &Arc<AppState>) -> Result<Caller, ApiError> {
    let header = parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let key = match header {
        None => Err("no Authorization header; send `Authorization: Bearer <api key>`"),
        Some(h) => match h.strip_prefix("Bearer ") {
            Some(key) if !key.trim().is_empty() => Ok(key.trim()),
            _ => Err("the Authorization header must be `Bearer <api key>`"),
        },
    };
    let caller = match key {
        Ok(key) => state.store.authenticate(key)?.ok_or("unknown or revoked API key"),
        Err(e) => Err(e),
    };
    let caller = match caller {
        Ok(caller) => caller,
        Err(message) => {
            state.metrics.auth_failure();
            let event = AuditEvent::new(Kind::AuthFailure, "denied").detail(serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "reason": message,
            }));
            record_refusal(state, event).await;
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message));
        }
    };
    let rate = state.sandbox.policy.tiers.get(&caller.tier).map(|t| t.requests_per_second).unwrap_or(1);
    if let Err(denial) = state.admission.rate(caller.user.as_str(), rate) {
        return Err(super::invoke::denied(state, &caller, None, denial).await);
    }
    Ok(caller)
}

/// Writes the audit record of a refused request, unless that caller's refusals
/// are being recorded faster than [`super::admission::AuditThrottle`] allows
/// (an unauthenticated flood must not fill the disk); the next record written
/// says how many were skipped.
pub(super) async fn record_refusal(state: &AppState, mut event: AuditEvent) {
    let key = format!("{}/{}", event.kind.as_str(), event.actor.as_deref().unwrap_or("anonymous"));
    match state.audit_throttle.admit(&key) {
        None => {}
        Some(skipped) => {
            if skipped > 0
                && let Some(detail) = event.detail.as_object_mut()
            {
                detail.insert("skipped_before".into(), skipped.into());
            }
            record(state, event).await;
        }
    }
}

/// Writes an audit record, logging (not failing the request) if it cannot.
pub(super) async fn record(state: &AppState, event: AuditEvent) {
    if let Err(e) = state.store.audit(vec![event]).await {
        tracing::error!(error = %e, "audit record could not be written");
    }
}
