//! Automatic responses to what behaviour analysis finds (`crate::behaviour`),
//! configured per rule in the config file's `[response]` table:
//!
//! - `alert`: a warning in the log, `imagentx_anomalies_total`, and a POST of
//!   the event to `webhook` (if set) from a queue of its own, retried with
//!   backoff: a slow or dead webhook never holds a call;
//! - `throttle`: the user's request rate is lowered to `throttle_rps` for
//!   `for_s` seconds;
//! - `suspend`: the user's keys answer 403 `suspended` for `for_s` seconds.
//!
//! Every detection is an `anomaly` audit record naming the actions taken;
//! a throttle or a suspension is its own record (`user_throttled`,
//! `user_suspended`), stored in the database (so it holds across a restart
//! and the command line sees it), and lifted by time or by an admin
//! (`POST /v1/users/{id}/unsuspend`, `imagentx-sandbox user unsuspend`).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Uri;
use serde::Deserialize;

use super::AppState;
use crate::audit::{AuditEvent, Kind};
use crate::behaviour::{Detection, Rule};
use crate::policy::UserId;
use crate::store::Restriction;

/// What a rule's detection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Alert,
    Throttle,
    Suspend,
}

/// One rule's response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleResponse {
    pub actions: Vec<Action>,
    /// How long a throttle or a suspension holds.
    #[serde(default = "default_for_s")]
    pub for_s: u64,
    /// A throttle's requests per second.
    #[serde(default = "default_throttle_rps")]
    pub throttle_rps: u32,
}

fn default_for_s() -> u64 {
    900
}

fn default_throttle_rps() -> u32 {
    1
}

/// The `[response]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseConfig {
    /// Where alerts are POSTed (`http://` only; none: no webhook).
    pub webhook: Option<String>,
    /// Each attempt's time limit.
    pub webhook_timeout_ms: u64,
    /// Attempts after the first (1 s, 2 s, 4 s, ... apart).
    pub webhook_retries: u32,
    /// Per rule (by its name); a rule left out keeps its default.
    pub rules: BTreeMap<String, RuleResponse>,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self { webhook: None, webhook_timeout_ms: 5000, webhook_retries: 4, rules: BTreeMap::new() }
    }
}

impl ResponseConfig {
    /// Checks the rule names, the durations and the webhook's URL.
    ///
    /// # Errors
    ///
    /// What is wrong, naming the key.
    pub fn check(&self) -> Result<(), String> {
        for (name, rule) in &self.rules {
            if Rule::parse(name).is_none() {
                let known: Vec<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
                return Err(format!("rules.{name}: no such rule (known: {})", known.join(", ")));
            }
            if rule.for_s == 0 || rule.for_s > 30 * 86_400 {
                return Err(format!("rules.{name}.for_s must be between 1 and 2592000 (30 days)"));
            }
            if rule.throttle_rps == 0 {
                return Err(format!("rules.{name}.throttle_rps must be at least 1"));
            }
            // Whoever holds a revoked key could otherwise restrict its owner.
            if name == Rule::AuthFailures.as_str() && rule.actions.iter().any(|a| *a != Action::Alert) {
                return Err(format!(
                    "rules.{name}: only `alert` (failed keys are someone else's doing: restricting the user they \
                     name would let whoever holds a revoked key restrict its owner)"
                ));
            }
        }
        if let Some(url) = &self.webhook {
            webhook_target(url)?;
        }
        if self.webhook_timeout_ms == 0 {
            return Err("webhook_timeout_ms must be at least 1".to_owned());
        }
        Ok(())
    }

    /// What `rule` does: the file's, else the default.
    pub fn for_rule(&self, rule: Rule) -> RuleResponse {
        if let Some(configured) = self.rules.get(rule.as_str()) {
            return configured.clone();
        }
        let actions = match rule {
            // Probing is hostile; a burst of calls or CPU may be a batch job
            // within the tier's rate, so it is told, not slowed.
            Rule::LimitProbing => vec![Action::Alert, Action::Throttle],
            Rule::EscapeAttempts => vec![Action::Alert, Action::Suspend],
            Rule::AuthFailures | Rule::CallRate | Rule::CpuSpike | Rule::WriteSpike | Rule::CrashingTool => {
                vec![Action::Alert]
            }
        };
        RuleResponse { actions, for_s: default_for_s(), throttle_rps: default_throttle_rps() }
    }
}

/// The host, port and path of an `http://` webhook URL.
fn webhook_target(url: &str) -> Result<(String, u16, Uri), String> {
    let uri: Uri = url.parse().map_err(|e| format!("webhook `{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "webhook `{url}`: only http:// is supported (point it at a local relay that speaks TLS onwards)"
        ));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "webhook `{url}`: credentials in the URL are not supported (put a token in its path or query)"
        ));
    }
    let host = uri.host().ok_or_else(|| format!("webhook `{url}` has no host"))?;
    // An IPv6 literal comes bracketed; the socket address wants it bare.
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok((host, uri.port_u16().unwrap_or(80), uri))
}

/// The queue of webhook deliveries: bounded, so a dead webhook costs a
/// dropped event (counted), never memory or a call's time.
pub struct Webhook {
    queue: tokio::sync::mpsc::Sender<serde_json::Value>,
}

const WEBHOOK_QUEUE: usize = 1024;

impl Webhook {
    /// Starts the delivery task (none without a `webhook`).
    pub(super) fn start(state: Weak<AppState>, config: &ResponseConfig) -> Option<Self> {
        let config = config.clone();
        let url = config.webhook.clone()?;
        let (queue, mut events) = tokio::sync::mpsc::channel::<serde_json::Value>(WEBHOOK_QUEUE);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let delivered = deliver(&url, &config, &event).await;
                let Some(state) = state.upgrade() else { return };
                match delivered {
                    Ok(attempts) => state.metrics.webhook("delivered", attempts),
                    Err((attempts, e)) => {
                        state.metrics.webhook("failed", attempts);
                        state.metrics.alert("webhook_failed");
                        tracing::error!(url, attempts, error = %e, "the alert webhook could not be reached; the event is in the audit trail");
                        let detail = serde_json::json!({"rule": "webhook_failed", "url": url, "attempts": attempts, "error": e, "event": event});
                        super::auth::record(&state, AuditEvent::new(Kind::Alert, "webhook_failed").detail(detail))
                            .await;
                    }
                }
            }
        });
        Some(Self { queue })
    }

    fn send(&self, state: &AppState, event: serde_json::Value) {
        if self.queue.try_send(event).is_err() {
            state.metrics.webhook("dropped", 0);
            tracing::warn!("the alert webhook's queue is full: an event was dropped (it is in the audit trail)");
        }
    }
}

/// POSTs `event`, retrying with backoff; answers the attempts made.
async fn deliver(url: &str, config: &ResponseConfig, event: &serde_json::Value) -> Result<u32, (u32, String)> {
    let body = Bytes::from(serde_json::to_vec(event).unwrap_or_default());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let timeout = Duration::from_millis(config.webhook_timeout_ms);
        let error = match tokio::time::timeout(timeout, post(url, body.clone())).await {
            Ok(Ok(status)) if status.is_success() => return Ok(attempt),
            Ok(Ok(status)) => format!("answered {status}"),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} ms", config.webhook_timeout_ms),
        };
        if attempt > config.webhook_retries {
            return Err((attempt, error));
        }
        tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(6))).await;
    }
}

async fn post(url: &str, body: Bytes) -> Result<hyper::StatusCode, String> {
    let (host, port, uri) = webhook_target(url)?;
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let authority = uri.authority().map_or_else(|| format!("{host}:{port}"), |a| a.as_str().to_owned());
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, concat!("imagentx-sandbox/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    Ok(response.status())
}

/// The `anomaly` audit record of `found`, naming the actions its rule takes.
pub(super) fn anomaly_event(state: &AppState, found: &Detection) -> AuditEvent {
    let response = state.settings.response.for_rule(found.rule);
    let mut event = AuditEvent::new(Kind::Anomaly, found.rule.as_str()).actor("behaviour").detail(serde_json::json!({
        "rule": found.rule,
        "evidence": found.evidence,
        "actions": response.actions,
    }));
    if let Some(user) = &found.user {
        event = event.user(user.as_str());
    }
    if let Some(tool) = &found.tool {
        event = event.tool(tool.as_str());
    }
    event
}

/// Records `found` (anomaly records) and responds, on a task of its own:
/// for detections outside a call (failed authentication, refused escapes).
/// The records of detections that name nobody (failed keys from many
/// addresses) are kept to the refusals' record rate, so an address-rotating
/// flood cannot fill the audit trail through them (the next record says how
/// many were left out); the metric, log and webhook see every one.
pub(super) fn respond_later(state: &Arc<AppState>, found: Vec<Detection>) {
    let state = state.clone();
    tokio::spawn(async move {
        let events: Vec<AuditEvent> = found
            .iter()
            .filter_map(|d| {
                let mut event = anomaly_event(&state, d);
                if d.user.is_some() {
                    return Some(event);
                }
                let skipped = state.audit_throttle.admit(&format!("anomaly/{}", d.rule.as_str()))?;
                if skipped > 0 {
                    event.detail["skipped_before"] = skipped.into();
                }
                Some(event)
            })
            .collect();
        if !events.is_empty()
            && let Err(e) = state.store.audit(events).await
        {
            tracing::error!(error = %e, "anomaly records could not be written");
        }
        act(&state, found).await;
    });
}

/// Takes the actions of each detection whose anomaly record is written.
pub(super) async fn act(state: &Arc<AppState>, found: Vec<Detection>) {
    for detection in found {
        let rule = detection.rule.as_str();
        let response = state.settings.response.for_rule(detection.rule);
        state.metrics.anomaly(rule);
        state.rollup.security_event(detection.user.as_deref(), "-", "anomaly");
        tracing::warn!(
            rule,
            user = detection.user.as_deref().unwrap_or("-"),
            tool = detection.tool.as_deref().unwrap_or("-"),
            evidence = %detection.evidence,
            actions = ?response.actions,
            "anomaly"
        );
        let until = crate::store::unix_now() + response.for_s as i64;
        for action in &response.actions {
            let restriction = match action {
                Action::Alert => {
                    if let Some(webhook) = &state.webhook {
                        webhook.send(
                            state,
                            serde_json::json!({
                                "event": "anomaly",
                                "rule": rule,
                                "user": detection.user,
                                "tool": detection.tool,
                                "evidence": detection.evidence,
                                "actions": response.actions,
                                "at": crate::report::rfc3339(std::time::SystemTime::now()),
                            }),
                        );
                    }
                    state.metrics.response("alert");
                    continue;
                }
                Action::Throttle => Restriction::Throttle(response.throttle_rps),
                Action::Suspend => Restriction::Suspend,
            };
            // A rule about a tool or a source, not a user: nobody to restrict.
            let Some(user) = detection.user.as_deref().and_then(|u| UserId::new(u).ok()) else { continue };
            let reason = format!("behaviour rule `{rule}`");
            match state.store.restrict(user.clone(), restriction, until, reason, "behaviour".to_owned()).await {
                Ok(held) if held.kept_longer => {
                    tracing::info!(rule, user = %user, action = restriction.kind(), "a longer restriction already holds");
                }
                Ok(_) => {
                    state.metrics.response(restriction.kind());
                    tracing::warn!(rule, user = %user, action = restriction.kind(), for_s = response.for_s, "user restricted");
                }
                Err(e) => {
                    tracing::error!(rule, user = %user, action = restriction.kind(), error = %e, "a response could not be taken")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_names_known_rules_and_an_http_webhook() {
        let ok: ResponseConfig =
            toml::from_str("webhook = \"http://127.0.0.1:9/hook\"\n[rules.cpu_spike]\nactions = [\"alert\"]\n")
                .unwrap();
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.for_rule(Rule::CpuSpike).actions, [Action::Alert]);
        assert_eq!(ok.for_rule(Rule::EscapeAttempts).actions, [Action::Alert, Action::Suspend]);
        let restricting: ResponseConfig = toml::from_str("[rules.auth_failures]\nactions = [\"suspend\"]\n").unwrap();
        assert!(restricting.check().unwrap_err().contains("only `alert`"));
        let unknown: ResponseConfig = toml::from_str("[rules.nope]\nactions = []\n").unwrap();
        assert!(unknown.check().unwrap_err().contains("no such rule"));
        let tls = ResponseConfig { webhook: Some("https://example.com/".into()), ..Default::default() };
        assert!(tls.check().unwrap_err().contains("only http://"));
        assert!(toml::from_str::<ResponseConfig>("[rules.cpu_spike]\nactions = [\"ban\"]\n").is_err());
    }
}
