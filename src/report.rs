//! The `ExecutionReport`: what every call answers, whatever the runtime
//! (DESIGN.md, "ExecutionReport (JSON)"). Its JSON shape is a contract.

use serde::{Deserialize, Serialize};

/// How a call ended. Exactly one per report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The tool ran and reported a failure, or exited non-zero.
    ToolError,
    /// The wall-clock budget ran out.
    Timeout,
    /// The fuel (WASM) or CPU-time (native) budget ran out.
    CpuLimit,
    MemoryLimit,
    PidsLimit,
    /// Trap, stack overflow, panic, or a kill by a signal.
    Crashed,
    /// The tool could not be loaded: not wasm, too large, invalid, wrong exports.
    InvalidTool,
    /// The input was refused: not JSON, too large, or rejected by the tool.
    InvalidInput,
    /// The sandbox failed; not the tool's fault.
    InternalError,
    /// The caller cancelled the call before it finished (MCP's
    /// `notifications/cancelled`); it was stopped and recorded.
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::ToolError => "tool_error",
            Status::Timeout => "timeout",
            Status::CpuLimit => "cpu_limit",
            Status::MemoryLimit => "memory_limit",
            Status::PidsLimit => "pids_limit",
            Status::Crashed => "crashed",
            Status::InvalidTool => "invalid_tool",
            Status::InvalidInput => "invalid_input",
            Status::InternalError => "internal_error",
            Status::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which runtime ran the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Wasm,
    Native,
}

/// Which outputs went over their cap and lost bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Truncated {
    pub stdout: bool,
    pub stderr: bool,
    pub output: bool,
}

/// Resources the call used. A figure the runtime cannot measure is `None`
/// (JSON `null`), never an estimate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Usage {
    pub wall_ms: f64,
    pub cpu_ms: Option<f64>,
    pub fuel_consumed: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub peak_processes: Option<u32>,
    /// Bytes the call added to files under `/data` and `/tmp`.
    pub bytes_written: Option<u64>,
    /// Every limit the call ran into, even one it survived and then exited 0:
    /// `memory`, `table`, `pids`, `data_quota`, `data_files`, `tmp`, `nofile`.
    /// Reports stored before this field existed read as empty.
    #[serde(default)]
    pub limits_hit: Vec<String>,
}

/// The answer to one tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExecutionReport {
    pub id: String,
    pub tool: String,
    pub tool_sha256: Option<String>,
    pub user: String,
    pub tier: String,
    pub runtime: Runtime,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub truncated: Truncated,
    pub usage: Usage,
    pub started_at: String,
    pub finished_at: String,
    /// The code session this call was a step of, if it was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// A fresh, time-ordered execution id.
pub fn new_execution_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `time` as RFC 3339 with microseconds, UTC.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_serialize_as_the_contract_names_them() {
        for status in [
            Status::Ok,
            Status::ToolError,
            Status::Timeout,
            Status::CpuLimit,
            Status::MemoryLimit,
            Status::PidsLimit,
            Status::Crashed,
            Status::InvalidTool,
            Status::InvalidInput,
            Status::InternalError,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }

    #[test]
    fn execution_ids_are_unique_and_sort_by_time() {
        let a = new_execution_id();
        let b = new_execution_id();
        assert_ne!(a, b);
        assert!(a < b);
    }
}
