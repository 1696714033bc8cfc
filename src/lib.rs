//! imagentx-sandbox runs AI agents' tool calls safely and fast.
//!
//! ```text
//! HTTP (api/) ──┐
//! CLI (cli.rs) ─┴─> runner (Sandbox::run) ──> policy (tier → Limits)
//!                        │                 └─> data_dir (users/<id> = /data, scratch = /tmp)
//!                        ├─> engine (wasmtime: load → fresh store + instance per call)
//!                        └─> jail (native: namespaces, cgroup, seccomp; Sandbox::run_native)
//!                                  └─> ExecutionReport (report.rs)
//! ```
//!
//! - [`policy`]: tiers and limits as plain data; the optional TOML config.
//! - [`engine`]: the only code that configures wasmtime.
//! - [`runner`]: one call for one user, always answered with a report.
//! - [`data_dir`]: where users' files, scratch directories and artifacts live.
//! - [`report`]: the `ExecutionReport` contract.
//! - [`cli`]: the `imagentx-sandbox` command line.
//! - [`api`]: the HTTP service (`serve`): routes, auth, admission, OpenAPI.
//! - [`store`], [`audit`]: the SQLite database and the hash-chained audit trail.
//! - [`userfs`]: a user's directory as the files API touches it.
//! - [`host`]: the host's memory, as the kernel and the cgroup tell it.
//! - [`quota`]: disk ledgers, charged at every write by calls and the files API.
//!
//! - [`bench`]: the benchmark harness behind `imagentx-sandbox bench`.
//! - [`jail`]: the native-tool fallback, a Linux namespace jail with cgroup
//!   limits, seccomp and Landlock (container-grade; the WASM path is the default).

pub mod api;
pub mod audit;
pub mod backup;
pub mod behaviour;
pub mod bench;
pub mod cli;
pub mod data_dir;
pub mod engine;
pub mod host;
pub mod interpreters;
pub mod jail;
pub mod notify;
pub mod policy;
pub mod quota;
pub mod report;
pub mod runner;
pub mod store;
pub mod userfs;
pub mod volume;
