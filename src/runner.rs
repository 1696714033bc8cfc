//! Runs one tool call for one user: resolve the policy, prepare the user's
//! directory and a scratch directory, call the engine, and answer an
//! [`ExecutionReport`] whatever happened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::data_dir::{DataDir, Scratch, UserDir};
use crate::engine::{Engine, Invocation, LiveError, LiveInstance, LiveSetup, LoadError, Outcome, Tool};
use crate::jail::{self, Jail, Layout, NativeOutcome, NativeRun};
use crate::policy::{Limits, Policy, UserId};
use crate::quota::Budget;
use crate::report::{ExecutionReport, Runtime, Status, Truncated, Usage, new_execution_id, rfc3339};
use crate::volume::DiskSize;

/// One call as requested: who, under which tier, with what.
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub user: UserId,
    pub tier: String,
    /// The input document as sent. Empty means JSON `null`.
    pub input: Vec<u8>,
    pub args: Vec<String>,
    /// The wall-clock budget asked for; the policy's default when `None`.
    pub timeout: Option<Duration>,
}

/// A native tool: a program with its arguments, run in the jail.
#[derive(Debug, Clone)]
pub struct NativeTool {
    pub name: String,
    /// The program and its fixed arguments; a call's `args` follow.
    pub argv: Vec<String>,
    /// Variables set for the tool, over the jail's and the policy's.
    pub env: BTreeMap<String, String>,
    /// Its own root (a rootfs directory), instead of the host's system.
    pub layout: Option<Arc<Layout>>,
    /// Jails kept warm for its calls (built-in tools that know how).
    pub warm: Option<Arc<jail::WarmPool>>,
}

/// A code session's live instance and what it holds while it lives: the
/// user's directory (their volume mounted) and its own `/tmp`, removed when
/// the session is dropped.
pub struct CodeSession {
    // Dropped first: the instance's open files are in the directories below.
    live: Live,
    name: String,
    sha256: Option<String>,
    /// `None` only while dropping.
    user_dir: Option<UserDir>,
}

/// How long a closed native session's directory stays held for its jail to
/// be reaped (its thread polls every 100 ms).
const JAIL_REAPED_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for CodeSession {
    /// A native session's jail keeps the user's directory mounted in its own
    /// namespace until its thread has killed and reaped it: the hold on the
    /// user's volume (which keeps it from being unmounted, checked or
    /// resized) is given back only then, from a thread of its own.
    fn drop(&mut self) {
        let Live::Native { session, .. } = &self.live else { return };
        session.close();
        let alive = session.alive_flag();
        let Some(dir) = self.user_dir.take() else { return };
        if !alive.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let waited = std::thread::Builder::new().name("session-hold".into()).spawn(move || {
            let deadline = std::time::Instant::now() + JAIL_REAPED_WITHIN;
            while alive.load(std::sync::atomic::Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            drop(dir);
        });
        if let Err(e) = waited {
            tracing::warn!(error = %e, "could not wait for a native session's jail before giving its volume back");
        }
    }
}

/// What runs a session's steps.
enum Live {
    /// A WASM instance, with the budget its writes are charged to and its `/tmp`.
    Wasm { instance: LiveInstance, data_budget: Budget, _scratch: Scratch },
    /// An interpreter in a jail (python-data), its memory in the jail's cgroup.
    Native { session: jail::NativeSession, data_writable: bool, note: Option<String> },
}

impl CodeSession {
    /// Memory the session's instance (or jail) holds now.
    pub fn memory_bytes(&self) -> u64 {
        match &self.live {
            Live::Wasm { instance, .. } => instance.memory_bytes(),
            Live::Native { session, .. } => session.memory_bytes(),
        }
    }

    /// Whether a step stopped it: it cannot run another.
    pub fn is_dead(&self) -> bool {
        match &self.live {
            Live::Wasm { instance, .. } => instance.is_dead(),
            Live::Native { session, .. } => session.is_dead(),
        }
    }

    /// The host directory that is the session's `/data`.
    pub fn data_dir(&self) -> &std::path::Path {
        self.user_dir.as_ref().map_or(std::path::Path::new(""), UserDir::path)
    }
}

/// The policy, the engine and the data directory: everything a call needs.
pub struct Sandbox {
    pub policy: Policy,
    pub engine: Engine,
    pub data_dir: DataDir,
}

impl Sandbox {
    /// Loads a tool from its bytes, under the policy's module size cap.
    ///
    /// # Errors
    ///
    /// See [`Engine::load`].
    pub async fn load(&self, bytes: &[u8], fallback_name: &str) -> Result<Tool, LoadError> {
        self.engine.load(bytes, self.policy.module_bytes, fallback_name).await
    }

    /// [`Sandbox::load`] of a file, for one-call processes (see
    /// [`Engine::load_file`]).
    ///
    /// # Errors
    ///
    /// The file cannot be read (the outer error), or a [`LoadError`].
    pub async fn load_file(
        &self,
        path: &std::path::Path,
        fallback_name: &str,
    ) -> std::io::Result<Result<Tool, LoadError>> {
        self.engine.load_file(path, self.policy.module_bytes, fallback_name).await
    }

    /// Runs `call` with `tool`, or reports why the tool could not be loaded.
    pub async fn run(&self, tool: Result<&Tool, (&str, &LoadError)>, call: &ToolCall) -> ExecutionReport {
        self.run_cancellable(tool, call, None).await
    }

    /// [`Sandbox::run`], stopped with status `cancelled` when `cancel` fires
    /// first: the guest is dropped where it stands (its `/tmp` removed, its
    /// instance freed), and the report says so.
    pub async fn run_cancellable(
        &self,
        tool: Result<&Tool, (&str, &LoadError)>,
        call: &ToolCall,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> ExecutionReport {
        let started_at = SystemTime::now();
        let clock = Instant::now();
        let id = new_execution_id();
        let (name, sha256) = match tool {
            Ok(t) => (t.name().to_owned(), Some(t.sha256().to_owned())),
            Err((name, _)) => (name.to_owned(), None),
        };
        let outcome = match (tool, cancel) {
            (Ok(tool), None) => self.execute(tool, call).await,
            (Ok(tool), Some(cancel)) => tokio::select! {
                outcome = self.execute(tool, call) => outcome,
                () = cancel.cancelled() => {
                    // What it wrote before it was stopped is measured again: a
                    // write cut off between its charge and the disk is not lost.
                    self.data_dir.usage_changed(&call.user);
                    Err((Status::Cancelled, "cancelled by the caller before it finished".into()))
                }
            },
            (Err((_, e)), _) => {
                let status = if e.is_host_failure() { Status::InternalError } else { Status::InvalidTool };
                Err((status, e.to_string()))
            }
        };
        let outcome = outcome.unwrap_or_else(|(status, message)| failed(status, message));
        wasm_report(Started { id, at: started_at, clock }, name, sha256, call, outcome)
    }

    /// Opens a code session of `user` (tier `tier`) on the SDK `tool`: a live
    /// instance, with the user's `/data` (their volume held mounted) and a
    /// `/tmp` of its own, both kept until the session is dropped.
    ///
    /// # Errors
    ///
    /// The status and message of why it could not be opened: `invalid_tool`
    /// for a tool that cannot keep a live instance, `internal_error` for the
    /// host's failures, the limit that stopped its start-up.
    pub async fn open_session(
        &self,
        tool: &Tool,
        user: &UserId,
        tier: &str,
        timeout: Option<Duration>,
    ) -> Result<CodeSession, (Status, String)> {
        let limits = self.policy.resolve(tier, timeout).map_err(|e| (Status::InvalidInput, e.to_string()))?;
        let internal = |e: &dyn std::fmt::Display| (Status::InternalError, e.to_string());
        let user_dir = self.data_dir.open_user(user, disk_size(&limits)).await.map_err(user_dir_failed)?;
        let scratch = self.data_dir.scratch().map_err(|e| internal(&e))?;
        let call = ToolCall { user: user.clone(), tier: tier.to_owned(), input: Vec::new(), args: Vec::new(), timeout };
        let (data_budget, _, _) = self.data_access(&call, &limits, true).await;
        let setup = LiveSetup {
            env: &self.policy.env,
            data_dir: user_dir.path(),
            data_budget: data_budget.clone(),
            scratch_dir: scratch.path(),
            limits: &limits,
            owner: user.as_str(),
        };
        let live = self.engine.instantiate_live(tool, setup).await.map_err(|e| match e {
            LiveError::NotSdk => (Status::InvalidTool, e.to_string()),
            LiveError::Host(e) => internal(&e),
            LiveError::Start(_) => (Status::Crashed, e.to_string()),
        })?;
        Ok(CodeSession {
            live: Live::Wasm { instance: live, data_budget, _scratch: scratch },
            name: tool.name().to_owned(),
            sha256: Some(tool.sha256().to_owned()),
            user_dir: Some(user_dir),
        })
    }

    /// Opens a code session of the native `tool` for `user`: an interpreter
    /// in a jail kept for it (its warm pool's), attached to the user's
    /// directory under the tier's limits, running one step after another.
    ///
    /// # Errors
    ///
    /// As [`Sandbox::open_session`]: `invalid_tool` for a tool without warm
    /// jails, `internal_error` for a jail that could not take the session.
    pub async fn open_native_session(
        &self,
        tool: &NativeTool,
        user: &UserId,
        tier: &str,
        timeout: Option<Duration>,
    ) -> Result<CodeSession, (Status, String)> {
        let Some(pool) = &tool.warm else {
            return Err((Status::InvalidTool, format!("native tool `{}` keeps no jails for sessions", tool.name)));
        };
        let limits = self.policy.resolve(tier, timeout).map_err(|e| (Status::InvalidInput, e.to_string()))?;
        let internal = |e: &dyn std::fmt::Display| (Status::InternalError, e.to_string());
        let user_dir = self.data_dir.open_user(user, disk_size(&limits)).await.map_err(user_dir_failed)?;
        pool.prepare_data_dir(user_dir.path()).map_err(|e| internal(&e))?;
        let call = ToolCall { user: user.clone(), tier: tier.to_owned(), input: Vec::new(), args: Vec::new(), timeout };
        let charged = self.data_dir.volumes().is_some();
        let (_, data_writable, note) = self.data_access(&call, &limits, charged).await;
        let session = pool.open_session(user_dir.path(), data_writable, &limits).await.map_err(|e| internal(&e))?;
        Ok(CodeSession {
            live: Live::Native { session, data_writable, note },
            name: tool.name.clone(),
            sha256: None,
            user_dir: Some(user_dir),
        })
    }

    /// Runs `call` as the next step of `session`, stopped with status
    /// `cancelled` when `cancel` fires first. A step that does not end with
    /// the tool's own answer leaves the session dead ([`CodeSession::is_dead`]).
    pub async fn step(
        &self,
        session: &mut CodeSession,
        call: &ToolCall,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> ExecutionReport {
        let started = Started { id: new_execution_id(), at: SystemTime::now(), clock: Instant::now() };
        let (instance, data_budget) = match &mut session.live {
            Live::Wasm { instance, data_budget, .. } => (instance, data_budget),
            Live::Native { session: native, data_writable, note } => {
                let outcome = match self.admit(call) {
                    Err((status, message)) => NativeOutcome::failed(status, message, started.clock.elapsed()),
                    // Without volumes nothing holds the quota during a call: a
                    // session whose user went over it ends (as a call would
                    // start with /data read-only).
                    Ok((limits, _))
                        if *data_writable
                            && self.data_dir.volumes().is_none()
                            && !self.data_access(call, &limits, false).await.1 =>
                    {
                        native.close();
                        let message = format!(
                            "the user's data directory is over its quota ({} bytes): the session ended (a new one \
                             sees /data read-only)",
                            limits.data_quota_bytes
                        );
                        NativeOutcome::failed(Status::Cancelled, message, started.clock.elapsed())
                    }
                    Ok((limits, input)) => {
                        let mut outcome = native.step(input.as_bytes().to_vec(), &limits, started.clock, cancel).await;
                        if *data_writable {
                            self.data_dir.usage_changed(&call.user);
                        }
                        add_note(&mut outcome.error, note.clone());
                        outcome
                    }
                };
                return native_report(started, session.name.clone(), call, outcome);
            }
        };
        let outcome = match self.admit(call) {
            Err(refused) => Err(refused),
            Ok((limits, input)) => {
                let writing = data_budget.ledger().writer();
                let outcome = tokio::select! {
                    // A session closed before the step started runs none of it.
                    biased;
                    () = cancel.cancelled() => {
                        Err((Status::Cancelled, "cancelled: the session was closed while this step ran".into()))
                    }
                    outcome = self.engine.call_live(instance, input, &limits) => {
                        outcome.map_err(|e| (Status::InternalError, e.to_string()))
                    }
                };
                drop(writing);
                if outcome.as_ref().is_ok_and(|o| o.limits_hit.iter().any(|l| l.starts_with("data_")))
                    || outcome.is_err()
                {
                    self.data_dir.usage_changed(&call.user);
                }
                outcome
            }
        };
        let outcome = outcome.unwrap_or_else(|(status, message)| failed(status, message));
        let report = wasm_report(started, session.name.clone(), session.sha256.clone(), call, outcome);
        if matches!(report.status, Status::Timeout | Status::CpuLimit | Status::MemoryLimit) {
            tracing::warn!(limit = report.status.as_str(), tool = %report.tool, user = %call.user, "session step stopped");
        }
        report
    }

    /// The call's limits and its input document, or why the call is refused.
    fn admit<'c>(&self, call: &'c ToolCall) -> Result<(Limits, &'c str), (Status, String)> {
        let invalid = |message: String| (Status::InvalidInput, message);
        let limits = self.policy.resolve(&call.tier, call.timeout).map_err(|e| invalid(e.to_string()))?;
        if call.input.len() > limits.input_bytes {
            return Err(invalid(format!(
                "input is {} bytes, over the {}-byte limit",
                call.input.len(),
                limits.input_bytes
            )));
        }
        let input = std::str::from_utf8(&call.input).map_err(|e| invalid(format!("input is not UTF-8: {e}")))?;
        let input = if input.trim().is_empty() { "null" } else { input };
        serde_json::from_str::<serde::de::IgnoredAny>(input)
            .map_err(|e| invalid(format!("input is not valid JSON: {e}")))?;
        Ok((limits, input))
    }

    /// The user's `/data` budget for this call, and whether `/data` is
    /// writable at all, with the note for the report when it is not.
    ///
    /// `charged`: the runtime charges every write to the budget as it happens
    /// (WASM tools), so `/data` stays writable at any usage: writes that
    /// would pass the quota are refused one by one and deletes still work.
    /// So do native tools' volumes, in the kernel. Otherwise (native tools
    /// without volumes) `/data` is read-only once the quota is used up,
    /// checked before the call.
    async fn data_access(&self, call: &ToolCall, limits: &Limits, charged: bool) -> (Budget, bool, Option<String>) {
        let Some(ledger) = self.data_dir.ledger(&call.user).await else {
            let note = "/data was read-only for this call: the user's data directory cannot be measured".to_owned();
            return (Budget::empty(0, 0), false, Some(note));
        };
        let budget = Budget::new(ledger, limits.data_quota_bytes, limits.data_files);
        let (used, _) = budget.ledger().used();
        if charged || used < limits.data_quota_bytes {
            return (budget, true, None);
        }
        let note = format!(
            "/data was read-only for this call: the user's data directory holds {used} bytes, its quota is {} bytes",
            limits.data_quota_bytes
        );
        (budget, false, Some(note))
    }

    /// Runs `call` with the native `tool` in `jail`; always answers a report.
    /// `jail` is the host's jail, or why there is none (then the report says so).
    pub async fn run_native(
        &self,
        jail: Result<&Arc<Jail>, &str>,
        tool: &NativeTool,
        call: &ToolCall,
    ) -> ExecutionReport {
        self.run_native_cancellable(jail, tool, call, None).await
    }

    /// [`Sandbox::run_native`], killed with status `cancelled` when `cancel`
    /// fires first (within the supervisor's 10 ms check); the run is still
    /// reaped and measured, and its report says so.
    pub async fn run_native_cancellable(
        &self,
        jail: Result<&Arc<Jail>, &str>,
        tool: &NativeTool,
        call: &ToolCall,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> ExecutionReport {
        let started = Started { id: new_execution_id(), at: SystemTime::now(), clock: Instant::now() };
        let outcome = match self.execute_native(&started.id, jail, tool, call, cancel).await {
            Ok(outcome) => outcome,
            Err((status, message)) => NativeOutcome::failed(status, message, started.clock.elapsed()),
        };
        native_report(started, tool.name.clone(), call, outcome)
    }

    async fn execute_native(
        &self,
        id: &str,
        jail: Result<&Arc<Jail>, &str>,
        tool: &NativeTool,
        call: &ToolCall,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<NativeOutcome, (Status, String)> {
        let jail =
            jail.map_err(|why| (Status::InternalError, format!("native tools cannot run on this host: {why}")))?;
        let (limits, input) = self.admit(call)?;
        let input = if call.input.is_empty() { Vec::new() } else { input.as_bytes().to_vec() };
        let internal = |e: &dyn std::fmt::Display| (Status::InternalError, e.to_string());
        let user_dir = self.data_dir.open_user(&call.user, disk_size(&limits)).await.map_err(user_dir_failed)?;
        let data_dir = user_dir.path().to_owned();
        jail.prepare_data_dir(&data_dir).map_err(|e| internal(&format!("preparing {}: {e}", data_dir.display())))?;
        // A volume refuses writes past the quota as they happen, like the WASM
        // path's ledger: /data stays writable (deletes work) at any usage.
        let charged = self.data_dir.volumes().is_some();
        let (_, data_writable, note) = self.data_access(call, &limits, charged).await;
        // Raised when the caller cancels: the supervisor kills the run.
        let cancelled = Arc::new(AtomicBool::new(false));
        if let Some(pool) = tool.warm.as_ref().filter(|_| call.args.is_empty()) {
            let serve = pool.serve(&data_dir, data_writable, &limits, &input, Instant::now(), Some(cancelled.clone()));
            let served = until_cancelled(serve, cancel, &cancelled).await;
            if let Some(outcome) = served {
                return Ok(self.after_native(call, user_dir, data_writable, note, outcome));
            }
            // No warm jail took it, and the caller has gone meanwhile: no fresh one.
            if cancelled.load(std::sync::atomic::Ordering::Acquire) {
                return Err((Status::Cancelled, "cancelled by the caller before it started".into()));
            }
        }
        let env = jail::environment(&[&self.policy.env, &tool.env]);
        let argv: Vec<String> = tool.argv.iter().chain(&call.args).cloned().collect();
        let (jail, layout, id, owner) = (Arc::clone(jail), tool.layout.clone(), id.to_owned(), call.user.clone());
        let flag = Arc::clone(&cancelled);
        let run = tokio::task::spawn_blocking(move || {
            jail.run(&NativeRun {
                id: &id,
                owner: owner.as_str(),
                argv: &argv,
                env: &env,
                input: &input,
                data_dir: &data_dir,
                data_writable,
                limits: &limits,
                layout: layout.as_deref(),
                cancel: Some(&flag),
            })
        });
        let outcome = until_cancelled(run, cancel, &cancelled)
            .await
            .map_err(|e| internal(&format!("the jail's supervisor failed: {e}")))?;
        Ok(self.after_native(call, user_dir, data_writable, note, outcome))
    }

    /// What follows a native run: the volume's limits it ran into, the
    /// user's usage remeasured, the note on `/data`.
    fn after_native(
        &self,
        call: &ToolCall,
        user_dir: UserDir,
        data_writable: bool,
        note: Option<String>,
        mut outcome: NativeOutcome,
    ) -> NativeOutcome {
        if data_writable {
            // What the volume ran out of: the kernel refused the tool's writes past it.
            if let Some(volumes) = self.data_dir.volumes() {
                for limit in volumes.full(call.user.as_str()) {
                    if !outcome.limits_hit.contains(&limit) {
                        outcome.limits_hit.push(limit);
                    }
                }
            }
            self.data_dir.usage_changed(&call.user);
        }
        drop(user_dir);
        add_note(&mut outcome.error, note);
        outcome
    }

    async fn execute(&self, tool: &Tool, call: &ToolCall) -> Result<Outcome, (Status, String)> {
        let (limits, input) = self.admit(call)?;

        let internal = |e: &dyn std::fmt::Display| (Status::InternalError, e.to_string());
        let user_dir = self.data_dir.open_user(&call.user, disk_size(&limits)).await.map_err(user_dir_failed)?;
        let data_dir = user_dir.path();
        let scratch = self.data_dir.scratch().map_err(|e| internal(&e))?;
        let env: &BTreeMap<String, String> = &self.policy.env;
        // Every write of a WASM tool is charged as it happens (see engine::fs).
        let (data_budget, data_writable, note) = self.data_access(call, &limits, true).await;
        // While the call may write, a walk of the directory must not replace
        // the ledger's figures (they hold this call's charges).
        let writing = data_budget.ledger().writer();
        let invocation = Invocation {
            input,
            args: &call.args,
            env,
            data_dir,
            data_writable,
            data_budget,
            scratch_dir: scratch.path(),
            limits: &limits,
            owner: call.user.as_str(),
        };
        let mut outcome = self.engine.call(tool, invocation).await.map_err(|e| {
            tracing::error!(error = %e, tool = tool.name(), "call could not run");
            internal(&e)
        })?;
        drop(writing);
        // A call that ran into the quota may have been refused over bytes the
        // ledger over-counted.
        if data_writable && outcome.limits_hit.iter().any(|l| l.starts_with("data_")) {
            self.data_dir.usage_changed(&call.user);
        }
        add_note(&mut outcome.error, note);
        // After a timeout a cancelled host call may still be writing into the
        // scratch directory: remove it (on drop) rather than hand it to the next call.
        if outcome.status != Status::Timeout {
            scratch.recycle();
        }
        if matches!(outcome.status, Status::Timeout | Status::CpuLimit | Status::MemoryLimit) {
            tracing::warn!(
                limit = outcome.status.as_str(),
                tool = tool.name(),
                user = %call.user,
                tier = %call.tier,
                "tool call stopped"
            );
        } else if !outcome.limits_hit.is_empty() {
            tracing::info!(
                limits_hit = ?outcome.limits_hit,
                tool = tool.name(),
                user = %call.user,
                tier = %call.tier,
                "tool call ran into limits and carried on"
            );
        }
        Ok(outcome)
    }
}

/// Runs `run` to its end. When `cancel` fires first, `flag` is raised (a
/// native run's supervisor kills the run when it sees it) and the run is still
/// awaited: its processes are reaped and its report is whole.
async fn until_cancelled<T>(
    run: impl Future<Output = T>,
    cancel: Option<&tokio_util::sync::CancellationToken>,
    flag: &AtomicBool,
) -> T {
    let Some(cancel) = cancel else {
        return run.await;
    };
    let mut run = std::pin::pin!(run);
    tokio::select! {
        out = &mut run => out,
        () = cancel.cancelled() => {
            flag.store(true, std::sync::atomic::Ordering::Release);
            run.await
        }
    }
}

/// When and as what a call started.
struct Started {
    id: String,
    at: SystemTime,
    clock: Instant,
}

/// The report of a WASM call that ended with `outcome`.
fn wasm_report(
    started: Started,
    tool: String,
    sha256: Option<String>,
    call: &ToolCall,
    outcome: Outcome,
) -> ExecutionReport {
    let report = ExecutionReport {
        id: started.id,
        tool,
        tool_sha256: sha256,
        user: call.user.to_string(),
        tier: call.tier.clone(),
        runtime: Runtime::Wasm,
        status: outcome.status,
        exit_code: outcome.exit_code,
        signal: None,
        output: outcome.output,
        error: outcome.error,
        stdout: outcome.stdout,
        stderr: outcome.stderr,
        truncated: outcome.truncated,
        usage: Usage {
            wall_ms: millis(started.clock.elapsed()),
            cpu_ms: outcome.cpu_time.map(millis),
            fuel_consumed: outcome.fuel_consumed,
            peak_memory_bytes: outcome.peak_memory_bytes,
            // A WASM tool is one instance and cannot start processes.
            peak_processes: Some(1),
            bytes_written: outcome.bytes_written,
            limits_hit: outcome.limits_hit.iter().map(|&l| l.to_owned()).collect(),
        },
        started_at: rfc3339(started.at),
        finished_at: rfc3339(SystemTime::now()),
        session: None,
    };
    tracing::debug!(
        execution = %report.id,
        tool = %report.tool,
        user = %report.user,
        tier = %report.tier,
        status = %report.status,
        wall_ms = report.usage.wall_ms,
        fuel = report.usage.fuel_consumed,
        "tool call finished"
    );
    report
}

/// The report of a native run (or session step) that ended with `outcome`.
fn native_report(started: Started, tool: String, call: &ToolCall, outcome: NativeOutcome) -> ExecutionReport {
    let (id, started_at, clock) = (started.id, started.at, started.clock);
    // As for a WASM command: stdout that is JSON is the output.
    let stdout_text = String::from_utf8_lossy(&outcome.stdout).into_owned();
    let (output, stdout) = match serde_json::from_str::<serde_json::Value>(&stdout_text) {
        Ok(value) if outcome.status == Status::Ok && !outcome.stdout_truncated => (Some(value), String::new()),
        _ => (None, stdout_text),
    };
    let report = ExecutionReport {
        id,
        tool,
        tool_sha256: None,
        user: call.user.to_string(),
        tier: call.tier.clone(),
        runtime: Runtime::Native,
        status: outcome.status,
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        output,
        error: outcome.error,
        stdout,
        stderr: String::from_utf8_lossy(&outcome.stderr).into_owned(),
        truncated: Truncated { stdout: outcome.stdout_truncated, stderr: outcome.stderr_truncated, output: false },
        usage: Usage {
            wall_ms: millis(clock.elapsed()),
            cpu_ms: outcome.cpu.map(millis),
            fuel_consumed: None,
            peak_memory_bytes: outcome.peak_memory_bytes,
            peak_processes: outcome.peak_processes.map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
            bytes_written: outcome.bytes_written,
            limits_hit: outcome.limits_hit.iter().map(|&l| l.to_owned()).collect(),
        },
        started_at: rfc3339(started_at),
        finished_at: rfc3339(SystemTime::now()),
        session: None,
    };
    if matches!(report.status, Status::Timeout | Status::CpuLimit | Status::MemoryLimit | Status::PidsLimit) {
        tracing::warn!(
            limit = report.status.as_str(),
            tool = %report.tool,
            user = %report.user,
            tier = %report.tier,
            "native run stopped"
        );
    }
    report
}

/// What a call or a session is told when the host's disk has no room for
/// the user's volume (an `internal_error`; the HTTP API's 507 for sessions).
pub const NO_ROOM_FOR_VOLUME: &str = "the server's disk has no room for your data volume; try again later";

/// The status and message of a user's directory that could not be made
/// ready: a full host disk is said as such (the operator's problem, logged
/// in full), without the host's paths.
fn user_dir_failed(e: crate::data_dir::DataDirError) -> (Status, String) {
    if e.is_no_space() {
        tracing::error!(error = %e, "a user's data volume: no space left on the host's disk");
        return (Status::InternalError, NO_ROOM_FOR_VOLUME.to_owned());
    }
    (Status::InternalError, e.to_string())
}

/// What a user's volume must hold for a call under `limits`.
fn disk_size(limits: &Limits) -> DiskSize {
    DiskSize { bytes: limits.data_quota_bytes, files: limits.data_files }
}

/// Adds `note` to a report's error (in parentheses after one already there).
fn add_note(error: &mut Option<String>, note: Option<String>) {
    if let Some(note) = note {
        *error = Some(match error.take() {
            Some(error) => format!("{error} ({note})"),
            None => note,
        });
    }
}

/// Milliseconds, to the microsecond: finer digits would be noise.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn failed(status: Status, message: String) -> Outcome {
    Outcome {
        status,
        exit_code: None,
        output: None,
        error: Some(message),
        stdout: String::new(),
        stderr: String::new(),
        truncated: Truncated::default(),
        fuel_consumed: None,
        peak_memory_bytes: None,
        cpu_time: None,
        bytes_written: None,
        limits_hit: Vec::new(),
    }
}
