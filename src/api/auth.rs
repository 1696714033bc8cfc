//! Authentication (`Authorization: Bearer <key>`) and the per-user request
//! rate, as extractors: a handler that takes [`Authed`] or [`Admin`] never
//! runs for a caller that is not allowed.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};

use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::store::{Caller, KeyCheck};

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
            let what = format!("{} {} with a user's key", parts.method, parts.uri.path());
            if let Some(found) = state.analyzer.observe_escape(caller.user.as_str(), what, Instant::now()) {
                super::behaviour::respond_later(state, vec![found]);
            }
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
    let check = match key {
        Ok(key) => state.store.authenticate(key).await?,
        Err(_) => KeyCheck::Refused(None),
    };
    let client = state.proxies.client(parts);
    let caller = match check {
        KeyCheck::Active(caller) => Caller { network: client.map(super::client::network_of), ..caller },
        KeyCheck::Suspended(suspended) => {
            let event = AuditEvent::new(Kind::Denied, "suspended")
                .actor(suspended.user.as_str())
                .user(suspended.user.as_str())
                .detail(serde_json::json!({"method": parts.method.as_str(), "path": parts.uri.path()}));
            record_refusal(state, event).await;
            let message = format!(
                "your account is suspended until {}: {}",
                crate::store::unix_rfc3339(suspended.until),
                suspended.reason
            );
            return Err(ApiError::new(StatusCode::FORBIDDEN, "suspended", message));
        }
        KeyCheck::Refused(owner) => {
            let message = key.err().unwrap_or("unknown or revoked API key");
            state.metrics.auth_failure();
            let mut detail = serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "reason": message,
            });
            // A revoked key names its user: a leaked key still in use.
            if let Some(owner) = &owner {
                detail["revoked_key_of"] = owner.as_str().into();
            }
            let mut event = AuditEvent::new(Kind::AuthFailure, "denied").detail(detail);
            if let Some(owner) = &owner {
                event = event.user(owner.as_str());
            }
            record_refusal(state, event).await;
            let source = match (&owner, client) {
                (Some(owner), _) => format!("key:{owner}"),
                (None, Some(client)) => super::client::source_of(client),
                (None, None) => "unknown".to_owned(),
            };
            if let Some(found) = state.analyzer.observe_auth_failure(&source, owner.as_deref(), Instant::now()) {
                super::behaviour::respond_later(state, vec![found]);
            }
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message));
        }
    };
    let tier_rate = state.sandbox.policy.tiers.get(&caller.tier).map(|t| t.requests_per_second).unwrap_or(1);
    // A throttle lowers the rate, never raises it.
    let rate = caller.throttle.map_or(tier_rate, |throttle| throttle.min(tier_rate));
    if let Err(denial) = state.admission.rate(caller.user.as_str(), rate) {
        return Err(super::invoke::denied(state, &caller, None, denial).await);
    }
    // Across the nodes (PostgreSQL): this node's bucket never refuses what the
    // shared one admits, so it goes first, at no round trip.
    if let Some(node) = &state.node
        && let Err(denial) = node.take_token(caller.user.as_str(), rate).await?
    {
        return Err(super::invoke::denied(state, &caller, None, denial).await);
    }
    Ok(caller)
}

/// Writes the audit record of a refused request, unless that caller's refusals
/// are being recorded faster than [`super::admission::AuditThrottle`] allows
/// (an unauthenticated flood must not fill the disk); the next record written
/// says how many were skipped.
pub(super) async fn record_refusal(state: &AppState, mut event: AuditEvent) {
    state.rollup.security_event(event.user.as_deref().or(event.actor.as_deref()), "-", event.kind.as_str());
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
