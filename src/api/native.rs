//! Native tools in the registry: an admin registers a command spec (JSON),
//! stored like a module (`blobs/<sha256>.json`, the hash of the spec), and
//! users invoke it like any other tool; it runs in the jail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::auth::record;
use super::error::{parse_json, read_body};
use super::registry::{NATIVE_KIND, Registered, Runnable, write_new};
use super::tools::check_name;
use super::{ApiError, AppState};
use crate::audit::{AuditEvent, Kind};
use crate::jail::{ExtraBind, Jail, Layout};
use crate::runner::NativeTool;
use crate::store::{Caller, ToolRow};

/// The body of `POST /v1/tools` with `Content-Type: application/json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NativeSpec {
    /// Must be `"native"`.
    pub runtime: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The program (a path inside the jail, or a name looked up in its PATH)
    /// and its fixed arguments; a call's `args` follow them.
    pub argv: Vec<String>,
    /// A directory on the server whose entries make the jail's root instead
    /// of the host's system directories.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Variables set for the program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of the server's own environment variables passed through (read
    /// when the tool is loaded); nothing else of the host's environment is.
    #[serde(default)]
    pub env_allow: Vec<String>,
    #[serde(default)]
    pub input_schema: Option<serde_json::Value>,
    /// More host paths bound read-only into this tool's jail, each at its own
    /// path inside (a tool's own packages), besides the `[jail]` ones. Not
    /// with `rootfs`. Set by the built-in tools only: refused over the API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<ExtraBind>,
}

/// A spec is small: a few arguments and variables.
const MAX_SPEC_BYTES: usize = 64 * 1024;

pub(super) fn spec_path(blobs: &Path, sha256: &str) -> PathBuf {
    blobs.join(format!("{sha256}.json"))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks a spec; answers the tool it describes. `jail` builds the root of a
/// tool with binds of its own (none: the tool cannot run here anyway).
pub(super) fn build(spec: &NativeSpec, jail: Option<&Jail>) -> Result<NativeTool, String> {
    if spec.runtime != "native" {
        return Err(format!("runtime must be \"native\", not {:?}", spec.runtime));
    }
    let Some(program) = spec.argv.first() else {
        return Err("argv must name a program".to_owned());
    };
    if program.is_empty() {
        return Err("argv[0] is empty".to_owned());
    }
    if spec.argv.iter().chain(spec.env.values()).any(|s| s.contains('\0')) {
        return Err("argv and env may not contain NUL bytes".to_owned());
    }
    if let Some(bad) = spec.env.keys().chain(&spec.env_allow).find(|n| !valid_env_name(n)) {
        return Err(format!("`{bad}` is not a valid environment variable name"));
    }
    let layout = match (&spec.rootfs, spec.binds.is_empty()) {
        (Some(_), false) => return Err("a tool with its own rootfs takes no binds: put them in the rootfs".into()),
        (None, true) => None,
        (None, false) => match jail {
            Some(jail) => Some(Arc::new(jail.layout_with(&spec.binds).map_err(|e| e.to_string())?)),
            None => None,
        },
        (Some(dir), _) if !dir.is_absolute() => {
            return Err(format!("rootfs {} must be an absolute path", dir.display()));
        }
        (Some(dir), _) => Some(Arc::new(Layout::rootfs(dir).map_err(|e| e.to_string())?)),
    };
    let mut env = spec.env.clone();
    for name in &spec.env_allow {
        if let Ok(value) = std::env::var(name) {
            env.insert(name.clone(), value);
        }
    }
    Ok(NativeTool { name: spec.name.clone(), argv: spec.argv.clone(), env, layout, warm: None })
}

/// Loads a registered native tool from its stored spec.
///
/// # Errors
///
/// When the spec is missing, altered, or no longer valid (a rootfs gone).
pub fn load(blobs: &Path, row: &ToolRow, jail: Option<&Jail>) -> Result<NativeTool, String> {
    let path = spec_path(blobs, &row.sha256);
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if hex::encode(Sha256::digest(&bytes)) != row.sha256 {
        return Err(format!("{} does not match its sha256", path.display()));
    }
    let mut spec: NativeSpec = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    spec.name.clone_from(&row.name);
    build(&spec, jail)
}

pub async fn register(
    state: &Arc<AppState>,
    caller: &Caller,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(headers, body, MAX_SPEC_BYTES).await?;
    let spec: NativeSpec = parse_json(&bytes)?;
    check_name(&spec.name)?;
    // A bind exposes a host path to every caller of the tool: only the
    // operator decides that (`[[jail.binds]]`), and the built-in tools.
    if !spec.binds.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_tool",
            "`binds` are not accepted over the API (they would expose host paths to the tool's users): \
             the operator adds read-only binds for every jail with [[jail.binds]] in the config",
        ));
    }
    let tool = match build(&spec, state.jail.as_deref().ok()) {
        Ok(tool) => tool,
        Err(reason) => {
            let event = AuditEvent::new(Kind::ToolRegistered, "rejected")
                .actor(caller.user.as_str())
                .tool(spec.name.clone())
                .detail(serde_json::json!({"reason": reason, "runtime": "native"}));
            record(state, event).await;
            return Err(ApiError::bad_request("invalid_tool", reason));
        }
    };
    if let Err(why) = &state.jail {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "native_unavailable",
            format!("native tools cannot run on this server: {why}"),
        ));
    }
    // Stored canonically: the hash names the spec, whatever the client's spacing.
    let canonical = serde_json::to_vec_pretty(&spec).map_err(|e| ApiError::internal("encoding the spec", &e))?;
    let sha256 = hex::encode(Sha256::digest(&canonical));
    let path = spec_path(&state.blobs, &sha256);
    let (blobs, kept) = (state.blobs.clone(), bytes::Bytes::from(canonical.clone()));
    tokio::task::spawn_blocking(move || write_new(&blobs, &path, &canonical))
        .await
        .map_err(|e| ApiError::internal("storing the spec", &e))?
        .map_err(|e| ApiError::internal("storing the spec", &e))?;
    // In the store before its row: a node that sees the row finds the spec.
    state.store.put_blob(format!("{sha256}.json"), kept).await?;
    let row = ToolRow {
        name: spec.name.clone(),
        version: 0,
        label: None,
        sha256,
        kind: NATIVE_KIND.to_owned(),
        description: spec.description.clone(),
        input_schema: spec.input_schema.clone(),
        registered_by: caller.user.to_string(),
        registered_at: String::new(),
        retired_at: None,
    };
    let row = state.store.register_tool(row).await?;
    tracing::info!(tool = %row.name, version = row.version, argv = ?spec.argv, by = %row.registered_by, "native tool registered");
    state.registry.insert(Registered { row: row.clone(), runnable: Runnable::Native(tool) });
    Ok((StatusCode::CREATED, Json(row)).into_response())
}
