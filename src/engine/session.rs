//! A live instance: one SDK tool's store and instance kept between calls, so
//! that what a call leaves in the instance (an interpreter's variables and
//! imports) is there at the next. Code sessions are made of these.
//!
//! Each call on it ([`Engine::call_live`]) gets the limits of a fresh call —
//! its fuel, wall-clock and CPU-time budgets, output caps — while the instance
//! keeps, for its whole life, its pool slot, its linear memory (charged to
//! the host's memory pool and capped at the tier's memory), its open files
//! and its `/tmp`. A call that is stopped (a trap, a limit, a deadline, a
//! memory refusal) leaves the instance unusable: wasmtime cannot enter an
//! instance again after a trap, and an instance stopped in the middle of its
//! code has no consistent state to go on from. The instance is then dead and
//! the caller drops it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, Instance};

use super::Engine;
use super::call::{self, CallError, Finish, Outcome, Spent};
use super::fs::{CallCounters, CallFs, DescriptorCaps};
use super::output::CappedPipe;
use super::tool::{Entry, Tool};
use super::wasi::{CallState, ComponentHost, GuestView};
use crate::policy::Limits;
use crate::quota::Budget;
use crate::report::Status;

/// What an instance gets for its whole life: its directories, its owner, the
/// memory cap (the tier's) and the output caps of its calls.
pub struct LiveSetup<'a> {
    pub env: &'a BTreeMap<String, String>,
    /// Host directory shown as `/data`, and the user's budget for it.
    pub data_dir: &'a Path,
    pub data_budget: Budget,
    /// Host directory shown as `/tmp`: the instance's own for its life.
    pub scratch_dir: &'a Path,
    /// The limits it is made under; its memory and table caps hold for its life.
    pub limits: &'a Limits,
    pub owner: &'a str,
}

/// An SDK tool's instance, alive between calls.
pub struct LiveInstance {
    store: Store<ComponentHost>,
    instance: Instance,
    call: ComponentExportIndex,
    stdout: CappedPipe,
    stderr: CappedPipe,
    counters: Arc<CallCounters>,
    dead: bool,
}

/// Why an instance could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("only a tool exporting the imagentx:tool world (`describe`, `call`) keeps a live instance")]
    NotSdk,
    #[error(transparent)]
    Host(#[from] CallError),
    /// Instantiation itself was stopped (a limit, a trap).
    #[error("the tool's instance could not start: {0}")]
    Start(String),
}

impl LiveInstance {
    /// Linear memory the instance holds now (all its memories together).
    pub fn memory_bytes(&self) -> u64 {
        self.store.data().call.limiter.memory_bytes()
    }

    /// Whether a call stopped it: it cannot be called again.
    pub fn is_dead(&self) -> bool {
        self.dead
    }
}

impl Engine {
    /// Makes a live instance of the SDK `tool`, instantiated under `setup`'s
    /// limits (its start-up code runs with a call's budgets).
    ///
    /// # Errors
    ///
    /// [`LiveError`]: the tool is not an SDK tool, the host could not set the
    /// store up (a full pool), or instantiation was stopped.
    pub async fn instantiate_live(&self, tool: &Tool, setup: LiveSetup<'_>) -> Result<LiveInstance, LiveError> {
        let Entry::Sdk { pre, call } = &tool.entry else {
            return Err(LiveError::NotSdk);
        };
        let limits = setup.limits;
        let (stdout, stderr) = (CappedPipe::new(limits.output_bytes), CappedPipe::new(limits.output_bytes));
        let view = GuestView {
            argv0: tool.name(),
            args: &[],
            env: setup.env,
            stdin: b"",
            stdout: stdout.clone(),
            stderr: stderr.clone(),
            data_dir: Some((setup.data_dir, true)),
            scratch_dir: Some(setup.scratch_dir),
        };
        let counters = Arc::new(CallCounters::default());
        let files = DescriptorCaps::for_call(&self.inner.guest_descriptors, limits, setup.owner);
        let fs = CallFs::new(
            setup.data_budget,
            Budget::empty(limits.tmp_bytes, limits.tmp_files),
            files,
            Arc::clone(&counters),
        );
        let state = CallState::new(limits, &self.inner.guest_memory, &self.inner.cpu_gate, setup.owner);
        let host = view.component_host(state, fs).map_err(CallError::Context)?;
        let mut store = Store::new(&self.inner.wasmtime, host);
        let backstop = call::backstop(limits.wall_time, self.inner.epoch_tick);
        let (ended, _, _) = call::drive(
            &mut store,
            limits.fuel,
            backstop,
            |h| &mut h.call,
            async |store| pre.instantiate_async(&mut *store).await,
        )
        .await?;
        let instance = match ended {
            Ok((Ok(instance), _)) => instance,
            Ok((Err(e), _)) => {
                if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
                    return Err(CallError::PoolExhausted(e).into());
                }
                return Err(LiveError::Start(format!("{e:#}")));
            }
            Err(_) => return Err(LiveError::Start("instantiation passed its wall-clock budget".into())),
        };
        // What start-up printed is not the first call's.
        drop((stdout.take(), stderr.take()));
        Ok(LiveInstance { store, instance, call: *call, stdout, stderr, counters, dead: false })
    }

    /// Calls `live`'s `call` with `input` under `limits`' budgets (a fresh
    /// call's fuel, deadline and CPU time; the instance's memory cap). A call
    /// that does not end with the tool's own answer (ok, an error it
    /// returned, input it refused) leaves the instance dead.
    ///
    /// # Errors
    ///
    /// [`CallError`] when the host could not run the call; the instance is
    /// then dead too.
    pub async fn call_live(&self, live: &mut LiveInstance, input: &str, limits: &Limits) -> Result<Outcome, CallError> {
        if live.dead {
            return Err(CallError::Store(wasmtime::format_err!("the instance was stopped by an earlier call")));
        }
        // Dead unless the call comes back (a cancelled future never does).
        live.dead = true;
        live.store.data_mut().call.restart(limits);
        live.counters.written.store(0, Ordering::Relaxed);
        live.counters.hit.store(0, Ordering::Relaxed);
        let backstop = call::backstop(limits.wall_time, self.inner.epoch_tick);
        let (instance, export) = (live.instance, live.call);
        let (ended, fuel_consumed, limiter) = call::drive(
            &mut live.store,
            limits.fuel,
            backstop,
            |h| &mut h.call,
            async |store| {
                let func = instance.get_typed_func::<(&str,), (Result<String, String>,)>(&mut *store, export)?;
                let (returned,) = func.call_async(&mut *store, (input,)).await?;
                Ok(Finish::Returned(returned))
            },
        )
        .await?;
        let spent = Spent {
            fuel_consumed,
            limiter,
            bytes_written: Some(live.counters.written.load(Ordering::Relaxed)),
            limits_hit: live.counters.limits_hit(),
        };
        let outcome = call::conclude(ended, spent, (live.stdout.take(), live.stderr.take()), true, limits)?;
        live.dead = !matches!(outcome.status, Status::Ok | Status::ToolError | Status::InvalidInput);
        Ok(outcome)
    }
}
