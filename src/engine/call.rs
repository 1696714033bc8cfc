//! One call: a fresh store and instance, run under the call's limits, and the
//! way it ended turned into an [`Outcome`].
//!
//! A guest's failure is a result, not an error: fuel exhausted, memory refused,
//! deadline passed, trap, non-zero exit all come back as `Ok(Outcome)` with a
//! status. `Err(CallError)` means the host could not run the call at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::I32Exit;

use super::Engine;
use super::cpu_time::CpuTimed;
use super::deadline::{CpuTimeExceeded, DeadlineExceeded};
use super::fair::{Fair, RUN_TICKS};
use super::fs::{CallCounters, CallFs, DescriptorCaps};
use super::limiter::{LimiterRecord, Refusal};
use super::output::{CappedPipe, CapturedOutput};
use super::tool::{Entry, LoadError, Tool};
use super::wasi::{CallState, GuestView};
use crate::policy::Limits;
use crate::quota::Budget;
use crate::report::{Status, Truncated};

/// What one call gets: its input, arguments, environment, directories, limits.
pub struct Invocation<'a> {
    /// The input document. SDK tools receive it as `call`'s argument; command
    /// tools read it on stdin.
    pub input: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    /// Host directory shown as `/data`.
    pub data_dir: &'a Path,
    /// Whether `/data` may be written at all (writes are charged to
    /// `data_budget` as they happen, see [`super::fs`]).
    pub data_writable: bool,
    /// The user's `/data` budget: their ledger under their tier's caps.
    pub data_budget: Budget,
    /// Host directory shown as `/tmp`.
    pub scratch_dir: &'a Path,
    pub limits: &'a Limits,
    /// Whom the call runs for (the user): when the host is contended, the
    /// CPU goes round owners, not calls.
    pub owner: &'a str,
}

/// How a call ended, and what it used.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub truncated: Truncated,
    pub fuel_consumed: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time: Option<Duration>,
    /// Bytes the call added to files under `/data` and `/tmp`.
    pub bytes_written: Option<u64>,
    /// Limits the call ran into, whether or not it survived them.
    pub limits_hit: Vec<&'static str>,
}

/// The host could not run the call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("building the tool's WASI context: {0:#}")]
    Context(wasmtime::Error),
    #[error("setting up the store: {0:#}")]
    Store(wasmtime::Error),
    #[error("the engine's instance pool is full: {0:#}")]
    PoolExhausted(wasmtime::Error),
}

/// How the guest's code finished, when it was not stopped.
pub(super) enum Finish {
    /// An SDK tool's `call` returned.
    Returned(Result<String, String>),
    /// A command's `run` or `_start` finished with this exit code.
    Exited(i32),
}

/// Extra time past the wall-clock budget before the outer timeout drops the
/// call. Guests running wasm are stopped at the next epoch tick; this only
/// catches guests blocked in a host call (e.g. a long `sleep`).
pub(super) fn backstop(wall_time: Duration, tick: Duration) -> Duration {
    wall_time + tick * 4 + Duration::from_millis(20)
}

impl Engine {
    /// Runs one call of `tool`.
    ///
    /// # Errors
    ///
    /// [`CallError`] when the host cannot set the call up (a preopen cannot be
    /// opened, the instance pool is full). Everything the guest does, including
    /// breaking its limits, is an `Ok(Outcome)`.
    pub async fn call(&self, tool: &Tool, inv: Invocation<'_>) -> Result<Outcome, CallError> {
        let limits = inv.limits;
        let stdout = CappedPipe::new(limits.output_bytes);
        let stderr = CappedPipe::new(limits.output_bytes);
        let view = GuestView {
            argv0: tool.name(),
            args: inv.args,
            env: inv.env,
            stdin: if matches!(tool.entry, Entry::Sdk { .. }) { b"" } else { inv.input.as_bytes() },
            stdout: stdout.clone(),
            stderr: stderr.clone(),
            data_dir: Some((inv.data_dir, inv.data_writable)),
            scratch_dir: Some(inv.scratch_dir),
        };
        let state = || CallState::new(limits, &self.inner.guest_memory, &self.inner.cpu_gate, inv.owner);
        let backstop = backstop(limits.wall_time, self.inner.epoch_tick);
        let engine = &self.inner.wasmtime;
        let counters = Arc::new(CallCounters::default());
        let call_fs = || {
            let files = DescriptorCaps::for_call(&self.inner.guest_descriptors, limits, inv.owner);
            CallFs::new(
                inv.data_budget.clone(),
                Budget::empty(limits.tmp_bytes, limits.tmp_files),
                files,
                Arc::clone(&counters),
            )
        };

        let component_store = || view.component_host(state(), call_fs()).map(|h| Store::new(engine, h));
        let (ended, fuel_consumed, limiter) = match &tool.entry {
            Entry::Sdk { pre, call } => {
                let mut store = component_store().map_err(CallError::Context)?;
                drive(
                    &mut store,
                    limits.fuel,
                    backstop,
                    |h| &mut h.call,
                    async |store| {
                        let instance = pre.instantiate_async(&mut *store).await?;
                        let func = instance.get_typed_func::<(&str,), (Result<String, String>,)>(&mut *store, call)?;
                        let (returned,) = func.call_async(&mut *store, (inv.input,)).await?;
                        Ok(Finish::Returned(returned))
                    },
                )
                .await?
            }
            Entry::Command(pre) => {
                let mut store = component_store().map_err(CallError::Context)?;
                drive(
                    &mut store,
                    limits.fuel,
                    backstop,
                    |h| &mut h.call,
                    async |store| {
                        let command = pre.instantiate_async(&mut *store).await?;
                        let ran = command.wasi_cli_run().call_run(&mut *store).await?;
                        Ok(Finish::Exited(if ran.is_ok() { 0 } else { 1 }))
                    },
                )
                .await?
            }
            Entry::Module(pre) => {
                // Preview 1's file functions cannot be charged: a module that
                // the adapter could not make a component gets no directories.
                let view = GuestView { data_dir: None, scratch_dir: None, ..view };
                let host = view.module_host(state()).map_err(CallError::Context)?;
                drive(
                    &mut Store::new(engine, host),
                    limits.fuel,
                    backstop,
                    |h| &mut h.call,
                    async |store| {
                        let instance = pre.instantiate_async(&mut *store).await?;
                        let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
                        start.call_async(&mut *store, ()).await?;
                        Ok(Finish::Exited(0))
                    },
                )
                .await?
            }
        };

        let written = Some(counters.written.load(std::sync::atomic::Ordering::Relaxed));
        let spent = Spent { fuel_consumed, limiter, bytes_written: written, limits_hit: counters.limits_hit() };
        let is_sdk = matches!(tool.entry, Entry::Sdk { .. });
        conclude(ended, spent, (stdout.take(), stderr.take()), is_sdk, limits)
    }
}

/// What a driven call used, read from its store and counters afterwards.
pub(super) struct Spent {
    pub fuel_consumed: Option<u64>,
    pub limiter: LimiterRecord,
    pub bytes_written: Option<u64>,
    pub limits_hit: Vec<&'static str>,
}

/// Turns the way a driven call ended, what it used and what it printed into
/// its [`Outcome`].
pub(super) fn conclude(
    ended: Ended<Finish>,
    spent: Spent,
    (stdout, stderr): (CapturedOutput, CapturedOutput),
    is_sdk: bool,
    limits: &Limits,
) -> Result<Outcome, CallError> {
    let Spent { fuel_consumed, limiter, bytes_written, limits_hit } = spent;
    let mut outcome = Outcome {
        status: Status::Ok,
        exit_code: None,
        output: None,
        error: None,
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&stderr.bytes).into_owned(),
        truncated: Truncated { stdout: stdout.truncated, stderr: stderr.truncated, output: false },
        fuel_consumed,
        peak_memory_bytes: Some(limiter.peak_memory_bytes()),
        cpu_time: None,
        bytes_written,
        limits_hit,
    };
    match limiter.refusal() {
        Some(Refusal::Memory { .. }) => outcome.limits_hit.push("memory"),
        Some(Refusal::HostMemory { .. }) => outcome.limits_hit.push("host_memory"),
        Some(Refusal::UserMemory { .. }) => outcome.limits_hit.push("user_memory"),
        Some(Refusal::Table { .. }) => outcome.limits_hit.push("table"),
        None => {}
    }
    match ended {
        Err(_elapsed) => {
            outcome.status = Status::Timeout;
            outcome.error = Some(format!(
                "wall-clock budget of {} ms passed while the tool was blocked in a host call",
                limits.wall_time.as_millis()
            ));
        }
        Ok((result, cpu_time)) => {
            outcome.cpu_time = cpu_time;
            match result.map_err(|e| match e.downcast_ref::<I32Exit>() {
                Some(&I32Exit(code)) => Ok(Finish::Exited(code)),
                None => Err(e),
            }) {
                Ok(finish) | Err(Ok(finish)) => finished(&mut outcome, finish, limits),
                Err(Err(error)) => {
                    if error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
                        return Err(CallError::PoolExhausted(error));
                    }
                    let (status, message) = stopped(&error, limiter.refusal(), limits);
                    outcome.status = status;
                    outcome.error = Some(message);
                    // Stopped from the epoch callback, the running function has
                    // not written its fuel counter back to the store: the figure
                    // would be stale, so it is not reported.
                    if error.is::<DeadlineExceeded>() || error.is::<CpuTimeExceeded>() {
                        outcome.fuel_consumed = None;
                    }
                }
            }
        }
    }
    // A command's stdout is its output channel; an SDK tool's is a log.
    let stdout_text = String::from_utf8_lossy(&stdout.bytes).into_owned();
    if !is_sdk && outcome.status == Status::Ok && !stdout.truncated {
        match serde_json::from_str::<serde_json::Value>(&stdout_text) {
            Ok(value) => outcome.output = Some(value),
            Err(_) => outcome.stdout = stdout_text,
        }
    } else {
        outcome.stdout = stdout_text;
    }
    // A tool that failed after its memory growth was refused failed for memory.
    if matches!(outcome.status, Status::ToolError | Status::Crashed)
        && let Some(refusal) = limiter.refusal()
    {
        outcome.status = Status::MemoryLimit;
        outcome.error = Some(refusal_message(refusal, outcome.error.take()));
    }
    Ok(outcome)
}

/// How a driven call ended: the outer timeout fired, or the guest's code
/// finished or was stopped (with the CPU time its polls took).
pub(super) type Ended<R> = Result<(wasmtime::Result<R>, Option<Duration>), tokio::time::error::Elapsed>;

/// Arms `store`, runs `run` on it under the outer timeout, and collects what the
/// store knows afterwards: fuel consumed and the limiter's record.
pub(super) async fn drive<T: 'static, R>(
    store: &mut Store<T>,
    fuel: u64,
    backstop: Duration,
    state: fn(&mut T) -> &mut CallState,
    run: impl AsyncFnOnce(&mut Store<T>) -> wasmtime::Result<R>,
) -> Result<(Ended<R>, Option<u64>, LimiterRecord), CallError> {
    arm(store, fuel, state).map_err(CallError::Store)?;
    // Consumption is measured against what the store reports holding.
    let fuel_start = store.get_fuel().map_err(CallError::Store)?;
    let call = state(store.data_mut());
    let (cpu_spent, turns, owner) = (call.cpu_spent.clone(), Arc::clone(&call.turns), Arc::clone(&call.owner));
    let ended = tokio::time::timeout(backstop, Fair::new(CpuTimed::new(run(store), cpu_spent), turns, owner)).await;
    let fuel_consumed = store.get_fuel().ok().map(|left| fuel_start.saturating_sub(left));
    let limiter = state(store.data_mut()).limiter.record();
    Ok((ended, fuel_consumed, limiter))
}

/// Gives a fresh store its fuel, its memory limiter and its deadline check.
fn arm<T: 'static>(store: &mut Store<T>, fuel: u64, state: fn(&mut T) -> &mut CallState) -> wasmtime::Result<()> {
    store.limiter(move |data| &mut state(data).limiter);
    store.set_fuel(fuel)?;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |mut ctx| {
        let call = state(ctx.data_mut());
        if Instant::now() >= call.deadline {
            Err(DeadlineExceeded.into())
        } else if call.cpu_spent.get() > call.cpu_budget {
            Err(CpuTimeExceeded.into())
        } else if call.turns.contended() || call.ticks_run >= RUN_TICKS {
            // Give the turn to whoever waits, or the worker to its other tasks.
            call.ticks_run = 0;
            Ok(UpdateDeadline::Yield(1))
        } else {
            call.ticks_run += 1;
            Ok(UpdateDeadline::Continue(1))
        }
    });
    Ok(())
}

/// Fills `outcome` for a guest that finished on its own.
fn finished(outcome: &mut Outcome, finish: Finish, limits: &Limits) {
    match finish {
        Finish::Exited(0) => outcome.exit_code = Some(0),
        Finish::Exited(code) => {
            outcome.exit_code = Some(code);
            outcome.status = Status::ToolError;
            outcome.error = Some(format!("tool exited with code {code}"));
        }
        Finish::Returned(Ok(text)) => {
            outcome.exit_code = Some(0);
            if text.len() > limits.output_bytes {
                outcome.truncated.output = true;
            } else {
                match serde_json::from_str(&text) {
                    Ok(value) => outcome.output = Some(value),
                    Err(e) => {
                        outcome.status = Status::ToolError;
                        outcome.error = Some(format!("tool returned output that is not JSON: {e}"));
                    }
                }
            }
        }
        Finish::Returned(Err(text)) => {
            outcome.exit_code = Some(1);
            let (status, message) = tool_error(&text);
            outcome.status = status;
            outcome.error = Some(message);
        }
    }
}

/// Decodes an SDK tool's `err` string (see `guest-sdk/wit/tool.wit`).
fn tool_error(text: &str) -> (Status, String) {
    #[derive(serde::Deserialize)]
    struct Wire {
        code: String,
        message: String,
    }
    match serde_json::from_str::<Wire>(text) {
        Ok(w) if w.code == "invalid_input" => (Status::InvalidInput, w.message),
        Ok(w) => (Status::ToolError, w.message),
        Err(_) => (Status::ToolError, text.to_owned()),
    }
}

/// Why the guest was stopped, from the error its call ended with.
fn stopped(error: &wasmtime::Error, refusal: Option<Refusal>, limits: &Limits) -> (Status, String) {
    if error.downcast_ref::<DeadlineExceeded>().is_some() {
        return (Status::Timeout, format!("wall-clock budget of {} ms passed", limits.wall_time.as_millis()));
    }
    if error.downcast_ref::<CpuTimeExceeded>().is_some() {
        return (Status::CpuLimit, format!("CPU-time budget of {} ms used up", limits.cpu_time.as_millis()));
    }
    let trap = error.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        return (Status::CpuLimit, format!("CPU budget of {} fuel used up", limits.fuel));
    }
    if let Some(refusal) = refusal {
        return (Status::MemoryLimit, refusal_message(refusal, Some(format!("{error:#}"))));
    }
    match trap {
        Some(Trap::StackOverflow) => (Status::Crashed, "stack overflow".into()),
        Some(trap) => (Status::Crashed, format!("trap: {trap}")),
        None => (Status::Crashed, format!("{error:#}")),
    }
}

fn refusal_message(refusal: Refusal, then: Option<String>) -> String {
    let what = match refusal {
        Refusal::Memory { requested_bytes, limit_bytes } => format!(
            "memory limit reached: the tool asked for {requested_bytes} bytes of linear memory in all, \
             its tier allows {limit_bytes}"
        ),
        Refusal::Table { requested_elements, limit_elements } => format!(
            "table limit reached: the tool asked for {requested_elements} table elements in all, \
             the limit is {limit_elements}"
        ),
        Refusal::HostMemory { requested_bytes, budget_bytes } => format!(
            "the server's memory budget for all calls ({budget_bytes} bytes) is in use: the tool's growth \
             by {requested_bytes} bytes was refused although its tier allows it"
        ),
        Refusal::UserMemory { requested_bytes, held_bytes, share_bytes } => format!(
            "your calls in flight hold {held_bytes} bytes, the share of the server's memory that one user's \
             calls may hold together ({share_bytes}): the tool's growth by {requested_bytes} bytes was refused \
             although its tier allows it"
        ),
    };
    match then {
        Some(then) => format!("{what}; then: {then}"),
        None => what,
    }
}

/// Runs an SDK tool's `describe` in a fresh instance, under small fixed limits.
pub(super) async fn describe(engine: &Engine, tool: &Tool) -> Result<String, LoadError> {
    let Entry::Sdk { pre, .. } = &tool.entry else {
        return Err(LoadError::Describe("not an SDK tool".into()));
    };
    let limits = &engine.inner.describe_limits;
    let stderr = CappedPipe::new(limits.output_bytes);
    let env = BTreeMap::new();
    let view = GuestView {
        argv0: tool.name(),
        args: &[],
        env: &env,
        stdin: b"",
        stdout: CappedPipe::new(limits.output_bytes),
        stderr: stderr.clone(),
        // `describe` sees no directories at all.
        data_dir: None,
        scratch_dir: None,
    };
    // No preopens: nothing to charge, and no descriptor to hold.
    let files = DescriptorCaps {
        per_call: 0,
        per_owner: 0,
        owner: Arc::default(),
        pool: Arc::clone(&engine.inner.guest_descriptors),
    };
    let fs = CallFs::new(Budget::empty(0, 0), Budget::empty(0, 0), files, Arc::default());
    let state = CallState::new(limits, &engine.inner.guest_memory, &engine.inner.cpu_gate, "(describe)");
    let host = view.component_host(state, fs).map_err(|e| LoadError::Host(format!("{e:#}")))?;
    let mut store = Store::new(&engine.inner.wasmtime, host);
    let backstop = backstop(limits.wall_time, engine.inner.epoch_tick);
    let (ended, _, _) = drive(
        &mut store,
        limits.fuel,
        backstop,
        |h| &mut h.call,
        async |store| {
            let instance = pre.instantiate_async(&mut *store).await?;
            let func = instance.get_typed_func::<(), (String,)>(&mut *store, "describe")?;
            let (text,) = func.call_async(&mut *store, ()).await?;
            Ok(text)
        },
    )
    .await
    .map_err(|e| LoadError::Host(e.to_string()))?;
    match ended {
        Ok((Ok(text), _)) => Ok(text),
        Ok((Err(e), _)) => {
            let stderr = String::from_utf8_lossy(&stderr.take().bytes).into_owned();
            Err(LoadError::Describe(format!(
                "{e:#}{}",
                if stderr.is_empty() { String::new() } else { format!("; stderr: {stderr}") }
            )))
        }
        Err(_) => Err(LoadError::Describe("did not answer within 5 s".into())),
    }
}
