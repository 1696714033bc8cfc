//! The WASM runtime: the only code that configures wasmtime.
//!
//! One [`Engine`] per process: Cranelift, the component model, a pooling
//! allocator sized for components, fuel and epoch interruption, async support,
//! one epoch ticker, and an on-disk cache of precompiled artifacts. A [`Tool`]
//! is loaded once (compiled or read from the cache, linked, pre-instantiated);
//! every call gets a fresh store and instance with its own fuel, deadline,
//! memory limiter, capped output and WASI view ([`Invocation`]).

mod cache;
mod call;
mod cpu_time;
mod deadline;
mod fair;
mod fs;
mod limiter;
mod output;
mod preview1;
mod session;
mod tool;
mod wasi;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi::p2::bindings::CommandPre;

pub use call::{CallError, Invocation, Outcome};
pub use fair::CpuGate;
pub use fs::DescriptorPool;
pub use limiter::{DEFAULT_MEMORY_SHARE, DEFAULT_USER_SHARE, MemoryPool, MemoryReservation, Short};
pub use session::{LiveError, LiveInstance, LiveSetup};
pub use tool::{LoadError, Tool, ToolInfo, ToolKind, module_sha256, sha256_hex};
pub use wasi::{DATA_DIR, TMP_DIR};

use cache::{AdaptedModule, ArtifactCache, CacheMiss};
use deadline::EpochTicker;
use tool::{Binary, Entry};
use wasi::{ComponentHost, ModuleHost};

/// How the process's engine is built.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The largest memory total one instance may reach: the biggest tier's
    /// memory. Sizes the pooling allocator's memory slots.
    pub max_memory_bytes: u64,
    /// Instances that may be live at once: the number of calls in flight.
    pub max_instances: u32,
    /// Epoch tick: the granularity of wall-clock deadlines and of yielding.
    pub epoch_tick: Duration,
    /// Where precompiled artifacts are kept.
    pub cache_dir: PathBuf,
    /// Bytes of each pooled memory kept resident between calls and reset
    /// in place. More makes calls faster and idle slots bigger.
    pub keep_resident_bytes: usize,
    /// Map cached artifacts instead of reading them: faster to load, but a
    /// file damaged underneath a live tool kills the process. For one-shot
    /// processes, not the server.
    pub map_artifacts: bool,
    /// Host descriptors that guests' open files may hold, over all calls.
    /// Size it below the process's `RLIMIT_NOFILE` so the server keeps a
    /// reserve of its own (see [`EngineConfig::new`]).
    pub guest_descriptors: Arc<DescriptorPool>,
    /// Linear memory that all guests may hold at once (the host's budget).
    pub guest_memory: Arc<MemoryPool>,
    /// Turns on the CPU, handed round users when the cores are contended.
    pub cpu_gate: Arc<CpuGate>,
    /// Charge guests' writes and opens to their budgets. Always on, but for
    /// the benchmark that measures what charging costs: off, `/data`, `/tmp`
    /// and descriptors are unbounded (wasmtime-wasi's file system as it is).
    pub charge_files: bool,
}

/// Descriptors kept for the server itself (listener, connections, database,
/// logs, artifacts): a quarter of the process's limit, at least this many.
pub const MIN_DESCRIPTOR_RESERVE: u64 = 512;

impl EngineConfig {
    pub fn new(cache_dir: PathBuf, max_memory_bytes: u64) -> Self {
        Self {
            max_memory_bytes,
            max_instances: 1000,
            epoch_tick: Duration::from_millis(1),
            cache_dir,
            keep_resident_bytes: 2 << 20,
            map_artifacts: false,
            guest_descriptors: DescriptorPool::for_this_process(MIN_DESCRIPTOR_RESERVE),
            guest_memory: MemoryPool::for_this_host(DEFAULT_MEMORY_SHARE),
            cpu_gate: CpuGate::for_this_host(),
            charge_files: true,
        }
    }
}

/// Why the engine could not be built. Always the host's problem.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("max_memory_bytes {0} is above the 4 GiB a 32-bit linear memory can address")]
    MemoryTooLarge(u64),
    #[error("configuring wasmtime: {0:#}")]
    Configure(wasmtime::Error),
    #[error("opening the artifact cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("starting the epoch ticker: {0}")]
    Ticker(std::io::Error),
}

/// The process's WASM engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    wasmtime: wasmtime::Engine,
    component_linker: wasmtime::component::Linker<ComponentHost>,
    module_linker: wasmtime::Linker<ModuleHost>,
    cache: ArtifactCache,
    /// Caps the `describe` call made at load time.
    describe_limits: crate::policy::Limits,
    epoch_tick: Duration,
    guest_descriptors: Arc<DescriptorPool>,
    guest_memory: Arc<MemoryPool>,
    cpu_gate: Arc<CpuGate>,
    _ticker: EpochTicker,
}

impl Engine {
    /// Builds the engine.
    ///
    /// # Errors
    ///
    /// [`EngineError`] when wasmtime rejects the configuration, the cache
    /// directory cannot be created, or the ticker thread cannot start.
    pub fn new(config: &EngineConfig) -> Result<Self, EngineError> {
        if config.max_memory_bytes > 4 << 30 {
            return Err(EngineError::MemoryTooLarge(config.max_memory_bytes));
        }
        let n = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::new();
        // A Rust wasip2 component takes 3 core instances, 1 memory and 2 tables
        // (FIELD-NOTES); the Python tool 14 core modules, each instantiated. With
        // fewer than that per call, `max_instances` Python calls in flight (which
        // admission allows) would run out of core instances before calls, and
        // the last ones would fail instead of waiting their turn. Slots are
        // address space, reserved, not resident.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(16))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(16))
            .total_stacks(n)
            .max_core_instances_per_component(50)
            .max_memories_per_component(16)
            .max_tables_per_component(64)
            .max_memories_per_module(16)
            .max_tables_per_module(16)
            .table_elements(100_000)
            .max_memory_size(config.max_memory_bytes as usize)
            // Reset a slot by zeroing only the pages the last call dirtied
            // (PAGEMAP_SCAN, Linux 6.7+; plain memset of the low addresses
            // elsewhere) and keep them resident, instead of madvise + page
            // faults on every call. The memory is zeroed either way.
            .linear_memory_keep_resident(config.keep_resident_bytes)
            .table_keep_resident(config.keep_resident_bytes / 8)
            .pagemap_scan(wasmtime::Enabled::Auto);

        let mut wt = wasmtime::Config::new();
        wt.wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let wasmtime = wasmtime::Engine::new(&wt).map_err(EngineError::Configure)?;

        let component_linker =
            wasi::component_linker(&wasmtime, config.charge_files).map_err(EngineError::Configure)?;
        let module_linker = wasi::module_linker(&wasmtime).map_err(EngineError::Configure)?;
        let cache = ArtifactCache::new(config.cache_dir.clone(), &wasmtime, config.map_artifacts)
            .map_err(|source| EngineError::Cache { path: config.cache_dir.clone(), source })?;
        let ticker = EpochTicker::start(wasmtime.clone(), config.epoch_tick).map_err(EngineError::Ticker)?;
        let describe_limits = crate::policy::Limits {
            tier: "describe".into(),
            wall_time: Duration::from_secs(5),
            fuel: 1_000_000_000,
            cpu_time: Duration::from_secs(5),
            memory_bytes: config.max_memory_bytes.min(64 << 20),
            table_elements: 100_000,
            output_bytes: 1 << 20,
            input_bytes: 0,
            data_quota_bytes: 0,
            data_files: 0,
            tmp_files: 0,
            cpu_share: 1.0,
            pids: 1,
            nofile_soft: 0,
            nofile_hard: 0,
            tmp_bytes: 0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                wasmtime,
                component_linker,
                module_linker,
                cache,
                describe_limits,
                epoch_tick: config.epoch_tick,
                guest_descriptors: Arc::clone(&config.guest_descriptors),
                guest_memory: Arc::clone(&config.guest_memory),
                cpu_gate: Arc::clone(&config.cpu_gate),
                _ticker: ticker,
            }),
        })
    }

    /// Loads a tool from its bytes (a component, a core module, or WAT text).
    ///
    /// Compiles it, or loads its precompiled artifact; links it against WASI
    /// without sockets; and, for SDK tools, calls `describe` once (under small
    /// fixed limits) to learn its name and input schema. `fallback_name` names
    /// tools that do not describe themselves.
    ///
    /// # Errors
    ///
    /// A [`LoadError`] saying what is wrong with the tool, or
    /// [`LoadError::Host`] when the sandbox itself failed.
    pub async fn load(&self, bytes: &[u8], max_bytes: usize, fallback_name: &str) -> Result<Tool, LoadError> {
        if bytes.len() > max_bytes {
            return Err(LoadError::TooLarge { size: bytes.len(), max: max_bytes });
        }
        let (wasm, binary) = tool::to_binary(bytes)?;
        let sha256 = tool::sha256_hex(&wasm);
        let this = self.clone();
        let wasm = wasm.into_owned();
        let digest = sha256.clone();
        // Compiling is CPU-bound work for seconds: keep it off the async workers.
        let (entry, kind, from_cache) = tokio::task::spawn_blocking(move || this.link(&wasm, binary, &digest))
            .await
            .map_err(|e| LoadError::Host(format!("compile task: {e}")))??;
        self.loaded(entry, kind, sha256, fallback_name, from_cache).await
    }

    /// [`Engine::load`] of the file at `path`, for processes that make one
    /// call (`imagentx-sandbox run`): a component whose file has the same
    /// [`cache::FileStamp`] as when it was last loaded is taken from its
    /// artifact without the file being read and hashed again (a 27 MB
    /// interpreter costs ~34 ms to read and hash).
    ///
    /// # Errors
    ///
    /// The file cannot be read (the outer error), or a [`LoadError`].
    pub async fn load_file(
        &self,
        path: &std::path::Path,
        max_bytes: usize,
        fallback_name: &str,
    ) -> std::io::Result<Result<Tool, LoadError>> {
        use std::io::Read;
        // The clock before the file is opened: a change after this moment
        // cannot be older than the settling time the stamp asks for.
        let now = std::time::SystemTime::now();
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        let stamp = cache::FileStamp::of(&meta, now);
        let cache = &self.inner.cache;
        if meta.len() <= max_bytes as u64
            && let Some(sha256) = cache.known(&stamp)
            && let Some(compiled) = cache.cached::<wasmtime::component::Component>(&self.inner.wasmtime, &sha256)
        {
            let loaded = match self.link_component(&compiled.code, false) {
                Ok((entry, kind)) => self.loaded(entry, kind, sha256, fallback_name, true).await,
                Err(e) => Err(e),
            };
            return Ok(loaded);
        }
        // The bytes of the file stamped, read through the same descriptor; one
        // byte over the limit is enough for `load` to refuse it as too large.
        let limit = max_bytes.saturating_add(1);
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(limit).min(limit));
        file.take(limit as u64).read_to_end(&mut bytes)?;
        let loaded = self.load(&bytes, max_bytes, fallback_name).await;
        if let Ok(tool) = &loaded
            && bytes.starts_with(&tool::COMPONENT_PREAMBLE)
        {
            cache.remember(&stamp, tool.sha256());
        }
        Ok(loaded)
    }

    /// The tool made of a linked `entry`, described when it is an SDK tool.
    async fn loaded(
        &self,
        entry: Entry,
        kind: ToolKind,
        sha256: String,
        fallback_name: &str,
        from_cache: bool,
    ) -> Result<Tool, LoadError> {
        let mut tool = Tool {
            info: ToolInfo {
                name: fallback_name.to_owned(),
                version: None,
                description: None,
                input_schema: None,
                output_schema: None,
                kind,
                sha256,
            },
            entry,
            from_cache,
        };
        if kind == ToolKind::Sdk {
            self.describe_into(&mut tool).await?;
        }
        Ok(tool)
    }

    fn link(&self, wasm: &[u8], binary: Binary, sha256: &str) -> Result<(Entry, ToolKind, bool), LoadError> {
        let inner = &self.inner;
        let miss = |CacheMiss::Compile(e)| LoadError::Invalid(format!("{e:#}"));
        match binary {
            Binary::Component => {
                let compiled =
                    inner.cache.get::<wasmtime::component::Component>(&inner.wasmtime, sha256, wasm).map_err(miss)?;
                let (entry, kind) = self.link_component(&compiled.code, false)?;
                Ok((entry, kind, compiled.from_cache))
            }
            Binary::CoreModule => {
                // A preview 1 command runs as the component the adapter makes
                // of it, so that everything it does with files is charged
                // like a component's (see `fs`).
                let adapted = inner.cache.get::<AdaptedModule>(&inner.wasmtime, sha256, wasm);
                let not_adapted = match adapted {
                    Ok(compiled) => match self.link_component(&compiled.code.0, true)? {
                        (command @ Entry::Command(_), _) => {
                            return Ok((command, ToolKind::WasiP1Module, compiled.from_cache));
                        }
                        _ => wasmtime::format_err!("the adapted module is not a command"),
                    },
                    Err(CacheMiss::Compile(e)) => e,
                };
                let compiled = inner.cache.get::<wasmtime::Module>(&inner.wasmtime, sha256, wasm).map_err(miss)?;
                let module = compiled.code;
                if module.get_export("_start").is_none() {
                    return Err(LoadError::NoEntryPoint);
                }
                let uses_wasi = module.imports().any(|i| i.module() == "wasi_snapshot_preview1");
                if uses_wasi && module.get_export("memory").is_none() {
                    return Err(LoadError::Link(
                        "a WASI preview 1 module must export its linear memory as `memory`".into(),
                    ));
                }
                if uses_wasi {
                    tracing::warn!(
                        sha256,
                        reason = %not_adapted,
                        "a WASI preview 1 module that the adapter cannot make a component (see the reason) runs \
                         without /data and /tmp"
                    );
                }
                let mut linker = inner.module_linker.clone();
                linker.define_unknown_imports_as_traps(&module).map_err(|e| LoadError::Link(format!("{e:#}")))?;
                let pre = linker.instantiate_pre(&module).map_err(|e| LoadError::Link(format!("{e:#}")))?;
                Ok((Entry::Module(pre), ToolKind::WasiP1Module, compiled.from_cache))
            }
        }
    }

    /// Links `component` against WASI (what the sandbox does not provide
    /// stubbed) as an SDK tool when it exports `describe` and `call`, else as a
    /// command. An adapted preview 1 module (`preview1`) gets its `proc_exit`.
    fn link_component(
        &self,
        component: &wasmtime::component::Component,
        preview1: bool,
    ) -> Result<(Entry, ToolKind), LoadError> {
        let inner = &self.inner;
        let mut linker = inner.component_linker.clone();
        let link_error = |e: wasmtime::Error| LoadError::Link(format!("{e:#}"));
        wasi::stub_unprovided_imports(&mut linker, component, &inner.wasmtime).map_err(link_error)?;
        if preview1 {
            // Over the stub made for it above.
            linker.allow_shadowing(true);
            preview1::add_exit_to_linker(&mut linker).map_err(link_error)?;
        }
        let pre = linker.instantiate_pre(component).map_err(link_error)?;
        let describe = component.get_export_index(None, "describe");
        let call = component.get_export_index(None, "call");
        if let (Some(_), Some(call)) = (describe, call) {
            return Ok((Entry::Sdk { pre, call }, ToolKind::Sdk));
        }
        let command = CommandPre::new(pre).map_err(|_| LoadError::NoEntryPoint)?;
        Ok((Entry::Command(command), ToolKind::WasiCommand))
    }

    /// Cores that guests may run on at once.
    pub fn guest_cores(&self) -> usize {
        self.inner.cpu_gate.slots()
    }

    /// The host's memory budget that guests share.
    pub fn guest_memory(&self) -> &Arc<MemoryPool> {
        &self.inner.guest_memory
    }

    /// The pool of host descriptors that guests share.
    pub fn guest_descriptors(&self) -> &Arc<DescriptorPool> {
        &self.inner.guest_descriptors
    }

    /// Calls an SDK tool's `describe` and fills its info from the answer.
    async fn describe_into(&self, tool: &mut Tool) -> Result<(), LoadError> {
        let text = call::describe(self, tool).await?;
        #[derive(serde::Deserialize)]
        struct Described {
            name: String,
            version: Option<String>,
            description: Option<String>,
            input_schema: Option<serde_json::Value>,
            output_schema: Option<serde_json::Value>,
        }
        let d: Described = serde_json::from_str(&text)
            .map_err(|e| LoadError::Describe(format!("answer is not the documented JSON object: {e}")))?;
        if d.name.trim().is_empty() {
            return Err(LoadError::Describe("the tool's name is empty".into()));
        }
        tool.info.name = d.name;
        tool.info.version = d.version;
        tool.info.description = d.description;
        tool.info.input_schema = d.input_schema;
        tool.info.output_schema = d.output_schema.map(Box::new);
        Ok(())
    }
}
