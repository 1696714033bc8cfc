//! What a guest sees: the WASI context of one call, and the linkers that
//! provide WASI to components (p2) and to core modules (p1).
//!
//! The component linker carries clocks, random, cli, filesystem and io: no
//! `wasi:sockets`, no `wasi:http`. A tool that imports them still instantiates
//! ([`stub_unprovided_imports`] links them to stubs when it is loaded), but any
//! call to them stops the guest. The context turns sockets off as a second wall.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker as ComponentLinker, LinkerInstance, ResourceTable, ResourceType};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings as p2;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_io::IoView;

use super::cpu_time::CpuSpent;
use super::fair::CpuGate;
use super::fs::{CallFs, ChargedFilesystem, ChargedFs};
use super::limiter::{CallLimiter, MemoryPool};
use super::output::CappedPipe;
use crate::policy::Limits;

/// The guest path of the user's directory.
pub const DATA_DIR: &str = "/data";
/// The guest path of the per-call scratch directory.
pub const TMP_DIR: &str = "/tmp";

/// Everything the host keeps for one call, whatever the tool's kind.
pub(crate) struct CallState {
    pub limiter: CallLimiter,
    pub deadline: Instant,
    pub cpu_budget: Duration,
    pub cpu_spent: CpuSpent,
    /// Turns on the CPU, shared fairly between owners.
    pub turns: Arc<CpuGate>,
    /// Whom the call runs for: an owner's calls share one place in line.
    pub owner: Arc<str>,
    /// Epoch ticks since the guest last yielded.
    pub ticks_run: u32,
}

impl CallState {
    /// A fresh state for one call of `owner` under `limits`, charging
    /// `memory` and taking turns at `turns`; its wall-clock deadline starts now.
    pub(crate) fn new(limits: &Limits, memory: &Arc<MemoryPool>, turns: &Arc<CpuGate>, owner: &str) -> Self {
        Self {
            limiter: CallLimiter::new(limits.memory_bytes, limits.table_elements, Arc::clone(memory), owner),
            deadline: Instant::now() + limits.wall_time,
            cpu_budget: limits.cpu_time,
            cpu_spent: CpuSpent::default(),
            turns: Arc::clone(turns),
            owner: owner.into(),
            ticks_run: 0,
        }
    }
}

impl CallState {
    /// Readies a live instance's state for its next call (a session's step)
    /// under `limits`: a new deadline from now, a new CPU-time budget.
    pub(crate) fn restart(&mut self, limits: &Limits) {
        self.limiter.start_call();
        self.deadline = Instant::now() + limits.wall_time;
        self.cpu_budget = limits.cpu_time;
        self.cpu_spent = CpuSpent::default();
        self.ticks_run = 0;
    }
}

/// Store data of a component call (SDK tools and WASI commands).
pub(crate) struct ComponentHost {
    pub call: CallState,
    wasi: WasiCtx,
    table: ResourceTable,
    fs: CallFs,
}

impl ComponentHost {
    fn charged_fs(&mut self) -> ChargedFs<'_> {
        ChargedFs {
            fs: wasmtime_wasi::filesystem::WasiFilesystemCtxView {
                ctx: self.wasi.filesystem(),
                table: &mut self.table,
            },
            call: &mut self.fs,
        }
    }
}

/// Store data of a core-module call: a module without WASI imports, or a
/// preview 1 module the adapter cannot make a component (see
/// [`super::preview1`]), which then gets no directories.
pub(crate) struct ModuleHost {
    pub call: CallState,
    pub wasi: WasiP1Ctx,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl IoView for ComponentHost {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

/// The view one call gives its guest.
pub(crate) struct GuestView<'a> {
    pub argv0: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub stdin: &'a [u8],
    pub stdout: CappedPipe,
    pub stderr: CappedPipe,
    /// Host directory shown as `/data`; none for `describe`.
    /// And whether the tool may write to it.
    pub data_dir: Option<(&'a Path, bool)>,
    /// Host directory shown as `/tmp`; none for `describe`.
    pub scratch_dir: Option<&'a Path>,
}

impl GuestView<'_> {
    fn builder(&self) -> wasmtime::Result<WasiCtxBuilder> {
        let mut b = WasiCtxBuilder::new();
        b.stdin(MemoryInputPipe::new(self.stdin.to_vec()))
            .stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            .arg(self.argv0)
            .args(self.args)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (key, value) in self.env {
            b.env(key, value);
        }
        // cap-std resolution: `..`, absolute paths and symlinks cannot leave a preopen.
        if let Some((dir, writable)) = self.data_dir {
            b.preopened_dir(dir, DATA_DIR, if writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly })?;
        }
        if let Some(dir) = self.scratch_dir {
            b.preopened_dir(dir, TMP_DIR, FsPerms::ReadWrite)?;
        }
        Ok(b)
    }

    /// A component's store data: its WASI context, with its file-system use
    /// charged to `fs`.
    pub(crate) fn component_host(&self, call: CallState, fs: CallFs) -> wasmtime::Result<ComponentHost> {
        Ok(ComponentHost { call, wasi: self.builder()?.build(), table: ResourceTable::new(), fs })
    }

    pub(crate) fn module_host(&self, call: CallState) -> wasmtime::Result<ModuleHost> {
        Ok(ModuleHost { call, wasi: self.builder()?.build_p1() })
    }
}

/// The WASI p2 linker for components: every interface but sockets; the file
/// system charged (see [`super::fs`]).
pub(crate) fn component_linker(
    engine: &wasmtime::Engine,
    charge_files: bool,
) -> wasmtime::Result<ComponentLinker<ComponentHost>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::random::WasiRandom;

    let mut linker = ComponentLinker::new(engine);
    let l = &mut linker;
    wasmtime_wasi_io::add_to_linker_async(l)?;
    p2::clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, ComponentHost::clocks)?;
    p2::clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(l, ComponentHost::clocks)?;
    if charge_files {
        p2::filesystem::types::add_to_linker::<_, ChargedFilesystem>(l, ComponentHost::charged_fs)?;
        p2::filesystem::preopens::add_to_linker::<_, ChargedFilesystem>(l, ComponentHost::charged_fs)?;
    } else {
        p2::filesystem::types::add_to_linker::<_, WasiFilesystem>(l, ComponentHost::filesystem)?;
        p2::filesystem::preopens::add_to_linker::<_, WasiFilesystem>(l, ComponentHost::filesystem)?;
    }
    p2::random::random::add_to_linker::<_, WasiRandom>(l, |h| h.wasi.random())?;
    p2::random::insecure::add_to_linker::<_, WasiRandom>(l, |h| h.wasi.random())?;
    p2::random::insecure_seed::add_to_linker::<_, WasiRandom>(l, |h| h.wasi.random())?;
    p2::cli::exit::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::environment::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::stdin::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::stdout::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::stderr::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::terminal_input::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::terminal_output::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    p2::cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, ComponentHost::cli)?;
    Ok(linker)
}

/// The WASI p1 linker for core modules. Preview 1 has no way to open a socket
/// (only to use preopened ones, and none is preopened).
pub(crate) fn module_linker(engine: &wasmtime::Engine) -> wasmtime::Result<wasmtime::Linker<ModuleHost>> {
    let mut linker = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |h: &mut ModuleHost| &mut h.wasi)?;
    Ok(linker)
}

/// Interface packages the component linker provides (at WASI 0.2.x; guests
/// importing an older 0.2 version are matched by semver).
const PROVIDED_PACKAGES: &[&str] = &["wasi:io/", "wasi:clocks/", "wasi:filesystem/", "wasi:random/", "wasi:cli/"];

/// Links every import of `component` from a package the sandbox does not
/// provide (`wasi:sockets`, `wasi:http`, anything else) to a stub that stops the
/// guest when called, so that tools built with those imports (e.g. by a
/// language's standard library) still run as long as they do not use them.
///
/// wasmtime's `define_unknown_imports_as_traps` is not used: it looks names up
/// exactly, so a guest's `wasi:cli/stdout@0.2.6` would be stubbed over our
/// `@0.2.12` definition that semver matching would have used.
pub(crate) fn stub_unprovided_imports(
    linker: &mut ComponentLinker<ComponentHost>,
    component: &Component,
    engine: &wasmtime::Engine,
) -> wasmtime::Result<()> {
    for (name, item) in component.component_type().imports(engine) {
        if !PROVIDED_PACKAGES.iter().any(|p| name.starts_with(p)) {
            stub(&mut linker.root(), name, &item.ty, name, engine)?;
        }
    }
    Ok(())
}

fn stub(
    linker: &mut LinkerInstance<'_, ComponentHost>,
    name: &str,
    item: &ComponentItem,
    qualified: &str,
    engine: &wasmtime::Engine,
) -> wasmtime::Result<()> {
    match item {
        ComponentItem::ComponentFunc(_) => {
            let message = format!("`{qualified}` is not available in the sandbox (no network, no host services)");
            linker.func_new(name, move |_, _, _, _| Err(wasmtime::format_err!("{message}")))
        }
        ComponentItem::ComponentInstance(instance) => {
            let mut inner = linker.instance(name)?;
            for (export, item) in instance.exports(engine) {
                stub(&mut inner, export, &item.ty, &format!("{qualified}#{export}"), engine)?;
            }
            Ok(())
        }
        ComponentItem::Resource(_) => linker.resource(name, resource_type(name), |_, _| Ok(())),
        _ => Ok(()),
    }
}

/// The host type behind a resource of a stubbed interface. Interfaces such as
/// `wasi:sockets/udp` re-export `wasi:io` resources (`pollable`, streams,
/// `error`); those must be the very types our `wasi:io` uses or linking fails.
/// The interface's own resources (sockets, networks) get an inert host type:
/// no function can ever make one.
fn resource_type(name: &str) -> ResourceType {
    use wasmtime_wasi_io::poll::DynPollable;
    use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};
    match name {
        "pollable" => ResourceType::host::<DynPollable>(),
        "input-stream" => ResourceType::host::<DynInputStream>(),
        "output-stream" => ResourceType::host::<DynOutputStream>(),
        "error" | "io-error" => ResourceType::host::<wasmtime::Error>(),
        _ => ResourceType::host::<()>(),
    }
}
