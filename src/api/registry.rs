//! The registered tools held loaded in memory, and their modules on disk in
//! a content-addressed blob directory (`blobs/<sha256>.wasm`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use crate::engine::Tool;
use crate::runner::{NativeTool, Sandbox};
use crate::store::{Store, ToolRow};

/// One registered version, ready to run.
pub struct Registered {
    pub row: ToolRow,
    pub runnable: Runnable,
}

/// What runs a registered tool: a compiled WASM tool, or a native program
/// for the jail.
pub enum Runnable {
    Wasm(Tool),
    Native(NativeTool),
}

/// The `kind` of native tools in the registry.
pub const NATIVE_KIND: &str = "native";

/// Who the registry records as having registered the built-in tools.
pub const BUILTIN_REGISTRAR: &str = "builtin";
/// Who offered a tool given on the command line (`mcp --tool`).
pub const LOCAL_REGISTRAR: &str = "command-line";

pub struct Registry {
    tools: RwLock<HashMap<String, BTreeMap<u32, Arc<Registered>>>>,
    /// Bumped at every registration and retirement (MCP's `list_changed`).
    changes: tokio::sync::watch::Sender<u64>,
    /// Registered tool versions that could not be loaded at start, by name
    /// and version: why (a module missing, or not matching its SHA-256).
    unloadable: RwLock<HashMap<String, BTreeMap<u32, String>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { tools: RwLock::default(), changes: tokio::sync::watch::Sender::new(0), unloadable: RwLock::default() }
    }
}

impl Registry {
    /// `name` at `version`, or its newest version.
    pub fn get(&self, name: &str, version: Option<u32>) -> Option<Arc<Registered>> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        let versions = tools.get(name)?;
        match version {
            Some(v) => versions.get(&v).cloned(),
            None => versions.last_key_value().map(|(_, t)| t.clone()),
        }
    }

    /// Every active version of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Vec<Arc<Registered>> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        tools.get(name).map(|v| v.values().cloned().collect()).unwrap_or_default()
    }

    /// The newest version of every tool, by name.
    pub fn newest(&self) -> Vec<Arc<Registered>> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = tools.values().filter_map(|v| v.last_key_value().map(|(_, t)| t.clone())).collect();
        all.sort_by(|a, b| a.row.name.cmp(&b.row.name));
        all
    }

    /// The warm-jail pools of the tools' newest versions.
    pub fn warm_pools(&self) -> Vec<Arc<crate::jail::WarmPool>> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        tools
            .values()
            .filter_map(|versions| match &versions.values().next_back()?.runnable {
                Runnable::Native(tool) => tool.warm.clone(),
                Runnable::Wasm(_) => None,
            })
            .collect()
    }

    /// Lets every warm jail go and waits (up to `within` for each pool)
    /// until they are gone: for the server's stop.
    pub fn stop_warm_pools(&self, within: std::time::Duration) {
        for pool in self.warm_pools() {
            pool.stop(within);
        }
    }

    pub fn insert(&self, registered: impl Into<Arc<Registered>>) {
        let registered = registered.into();
        let mut tools = self.tools.write().unwrap_or_else(PoisonError::into_inner);
        let (name, version) = (registered.row.name.clone(), registered.row.version);
        tools.entry(name.clone()).or_default().insert(version, registered);
        drop(tools);
        // A version that loads supersedes the older ones that did not.
        let mut unloadable = self.unloadable.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(broken) = unloadable.get_mut(&name) {
            broken.retain(|v, _| *v > version);
            if broken.is_empty() {
                unloadable.remove(&name);
            }
        }
        drop(unloadable);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Offers `tool` for this process only (`mcp --tool`), as the newest
    /// version of its name; not stored.
    pub fn insert_local(&self, tool: Tool) {
        let how = WasmRegistration { registered_by: LOCAL_REGISTRAR.to_owned(), description: None, input_schema: None };
        let mut row = wasm_row(&tool, how);
        row.version = self.get(&row.name, None).map_or(1, |t| t.row.version + 1);
        row.registered_at = crate::report::rfc3339(std::time::SystemTime::now());
        self.insert(Registered { row, runnable: Runnable::Wasm(tool) });
    }

    /// Wakes at every change of the tools (registered, retired).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn retire(&self, name: &str, versions: &[u32]) {
        let mut tools = self.tools.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = tools.get_mut(name) {
            for version in versions {
                v.remove(version);
            }
            if v.is_empty() {
                tools.remove(name);
            }
        }
        drop(tools);
        let mut unloadable = self.unloadable.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(broken) = unloadable.get_mut(name) {
            broken.retain(|v, _| !versions.contains(v));
            if broken.is_empty() {
                unloadable.remove(name);
            }
        }
        drop(unloadable);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Loads every active tool of the database from its blob, from the
    /// artifact cache when it can (no recompiling after a restart). A tool
    /// that cannot be loaded (its module missing, damaged: not matching its
    /// SHA-256, or refused) is logged, kept in [`Registry::unloadable`] and
    /// answered, not fatal; the failures are answered for the caller to
    /// record: `(name, version, why)`.
    pub async fn load_all(
        &self,
        store: &Store,
        sandbox: &Sandbox,
        blobs: &Path,
        jail: Option<&crate::jail::Jail>,
    ) -> Result<Vec<(String, u32, String)>, crate::store::StoreError> {
        let rows = store.active_tools().await?;
        let started = std::time::Instant::now();
        let (mut loaded, mut from_cache, total) = (0, 0, rows.len());
        let mut failed = Vec::new();
        for row in rows {
            match self.load_row(store, sandbox, blobs, jail, &row).await {
                Ok((runnable, cached)) => {
                    self.insert(Registered { row, runnable });
                    loaded += 1;
                    from_cache += usize::from(cached);
                }
                Err(why) => {
                    self.not_loaded(&row, &why);
                    failed.push((row.name, row.version, why));
                }
            }
        }
        tracing::info!(
            tools = loaded,
            from_cache,
            failed = total - loaded,
            ms = started.elapsed().as_millis() as u64,
            "registered tools loaded"
        );
        Ok(failed)
    }

    /// Brings this node's tools to the store's, for nodes that share one
    /// (PostgreSQL): versions registered by another node are loaded (their
    /// modules fetched from the store), versions retired by another node are
    /// dropped. Tools offered on the command line only are left alone.
    /// Answers how many versions were loaded and dropped.
    ///
    /// # Errors
    ///
    /// The store could not be read; nothing changed.
    pub async fn sync(
        &self,
        store: &Store,
        sandbox: &Sandbox,
        blobs: &Path,
        jail: Option<&crate::jail::Jail>,
    ) -> Result<(usize, usize), crate::store::StoreError> {
        let rows = store.active_tools().await?;
        let active: std::collections::HashSet<(&str, u32)> =
            rows.iter().map(|r| (r.name.as_str(), r.version)).collect();
        let gone: Vec<(String, u32)> = {
            let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
            tools
                .iter()
                .flat_map(|(name, versions)| versions.iter().map(move |(v, t)| (name, *v, t)))
                .filter(|(name, v, t)| t.row.registered_by != LOCAL_REGISTRAR && !active.contains(&(name.as_str(), *v)))
                .map(|(name, v, _)| (name.clone(), v))
                .collect()
        };
        for (name, version) in &gone {
            tracing::info!(tool = %name, version, "tool retired on another node: dropped");
            self.retire(name, &[*version]);
        }
        let mut loaded = 0;
        for row in rows {
            let known = self.get(&row.name, Some(row.version)).is_some()
                || self
                    .unloadable
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&row.name)
                    .is_some_and(|v| v.contains_key(&row.version));
            if known {
                continue;
            }
            match self.load_row(store, sandbox, blobs, jail, &row).await {
                Ok((runnable, _)) => {
                    tracing::info!(tool = %row.name, version = row.version, "tool registered on another node: loaded");
                    self.insert(Registered { row, runnable });
                    loaded += 1;
                }
                Err(why) => self.not_loaded(&row, &why),
            }
        }
        Ok((loaded, gone.len()))
    }

    /// Keeps why a registered version could not be loaded.
    fn not_loaded(&self, row: &ToolRow, why: &str) {
        tracing::error!(tool = %row.name, version = row.version, error = %why, "registered tool not loaded");
        let mut unloadable = self.unloadable.write().unwrap_or_else(PoisonError::into_inner);
        unloadable.entry(row.name.clone()).or_default().insert(row.version, why.to_owned());
    }

    /// Loads one registered version from its file in `blobs`, fetched from
    /// the store first when this node has none (another node registered it);
    /// answers it and whether its compiled form came from the artifact cache.
    async fn load_row(
        &self,
        store: &Store,
        sandbox: &Sandbox,
        blobs: &Path,
        jail: Option<&crate::jail::Jail>,
        row: &ToolRow,
    ) -> Result<(Runnable, bool), String> {
        let native = row.kind == NATIVE_KIND;
        let path = if native { super::native::spec_path(blobs, &row.sha256) } else { blob_path(blobs, &row.sha256) };
        if !path.exists() {
            fetch(store, blobs, &path).await?;
        }
        if native {
            return super::native::load(blobs, row, jail).map(|tool| (Runnable::Native(tool), false));
        }
        match std::fs::read(&path) {
            Err(e) => Err(format!("its module {} cannot be read: {e}", path.display())),
            // Checked before anything compiles it (a text module: its binary form).
            Ok(bytes) if crate::engine::module_sha256(&bytes).ok().as_ref() != Some(&row.sha256) => {
                Err(format!("its module {} does not match its sha256 (damaged)", path.display()))
            }
            Ok(bytes) => match sandbox.load(&bytes, &row.name).await {
                Ok(mut tool) => {
                    tool.rename(&row.name);
                    let cached = tool.loaded_from_cache();
                    Ok((Runnable::Wasm(tool), cached))
                }
                Err(e) => Err(format!("its module could not be loaded: {e}")),
            },
        }
    }

    /// A version of `name` that could not be loaded at start and that a
    /// call asking for `version` would run — that version, or with none the
    /// newest, when it is newer than every version that loaded (never a
    /// silent fall back to an older build): the version and why.
    pub fn unloadable(&self, name: &str, version: Option<u32>) -> Option<(u32, String)> {
        let unloadable = self.unloadable.read().unwrap_or_else(PoisonError::into_inner);
        let broken = unloadable.get(name)?;
        match version {
            Some(v) => broken.get(&v).map(|why| (v, why.clone())),
            None => {
                let (v, why) = broken.last_key_value()?;
                let newest_loaded = self.get(name, None).map_or(0, |t| t.row.version);
                (*v > newest_loaded).then(|| (*v, why.clone()))
            }
        }
    }

    /// Registered tool versions that could not be loaded at start (and were
    /// not since superseded or retired).
    pub fn unloadable_count(&self) -> usize {
        self.unloadable.read().unwrap_or_else(PoisonError::into_inner).values().map(BTreeMap::len).sum()
    }

    /// Registers the built-in interpreter tools found in `dir` (see
    /// [`crate::interpreters`]): a component not registered yet, or changed
    /// since (a rebuild), becomes the newest version of its name; one already
    /// registered with the same content is left as it is (loaded by
    /// [`Registry::load_all`] from the artifact cache). Missing components
    /// are logged, not fatal: the server serves without them.
    pub async fn register_builtins(
        &self,
        store: &Store,
        sandbox: &Sandbox,
        blobs: &Path,
        dir: &Path,
        jail: Option<&Arc<crate::jail::Jail>>,
    ) {
        self.register_python_data(store, sandbox, blobs, dir, jail).await;
        for name in crate::interpreters::NAMES {
            let Some(path) = crate::interpreters::component(dir, name) else { continue };
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(tool = name, path = %path.display(), "built-in tool not built (scripts/build-interpreters); not registered");
                    continue;
                }
                Err(e) => {
                    tracing::error!(tool = name, path = %path.display(), error = %e, "built-in tool unreadable; not registered");
                    continue;
                }
            };
            let sha256 = crate::engine::sha256_hex(&bytes);
            if self.get(name, None).is_some_and(|t| t.row.sha256 == sha256) {
                tracing::info!(tool = name, "built-in tool ready (this build is registered)");
                continue;
            }
            tracing::info!(tool = name, path = %path.display(), "registering a new build of a built-in tool (compiling it takes seconds)");
            let started = std::time::Instant::now();
            let mut tool = match sandbox.engine.load(&bytes, usize::MAX, name).await {
                Ok(tool) => tool,
                Err(e) => {
                    tracing::error!(tool = name, path = %path.display(), error = %e, "built-in tool could not be loaded");
                    continue;
                }
            };
            tool.rename(name);
            let compiled = !tool.loaded_from_cache();
            let how =
                WasmRegistration { registered_by: BUILTIN_REGISTRAR.to_owned(), description: None, input_schema: None };
            match self.register_wasm(store, blobs, (tool, bytes.into()), how).await {
                Ok(registered) => tracing::info!(
                    tool = name,
                    version = registered.row.version,
                    sha256 = %registered.row.sha256,
                    compiled,
                    ms = started.elapsed().as_millis() as u64,
                    "built-in tool registered (new build)"
                ),
                Err(e) => tracing::error!(tool = name, error = %e, "built-in tool could not be stored; not registered"),
            }
        }
    }
}

/// Why a WASM tool could not be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreToolError {
    #[error("storing the module: {0}")]
    Blob(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What registering a loaded WASM tool takes beyond the tool: who registers
/// it, and a description and input schema that override the module's own.
pub(crate) struct WasmRegistration {
    pub registered_by: String,
    pub description: Option<String>,
    pub input_schema: Option<serde_json::Value>,
}

/// A loaded WASM tool's row, before the store numbers its version and
/// stamps its time.
fn wasm_row(tool: &Tool, how: WasmRegistration) -> ToolRow {
    let info = tool.info();
    ToolRow {
        name: tool.name().to_owned(),
        version: 0,
        label: info.version.clone(),
        sha256: info.sha256.clone(),
        kind: super::tools::kind_name(info.kind).to_owned(),
        description: how.description.or_else(|| info.description.clone()),
        input_schema: how.input_schema.or_else(|| info.input_schema.clone()),
        registered_by: how.registered_by,
        registered_at: String::new(),
        retired_at: None,
    }
}

impl Registry {
    /// Registers a loaded WASM tool (already renamed to its registry name) as
    /// the next version of its name: the module stored content-addressed
    /// (off the runtime's threads), then its row, then the live registry.
    /// The one way a WASM tool is registered: the admin's `POST /v1/tools`
    /// and the built-ins at start both come here.
    ///
    /// # Errors
    ///
    /// The blob or the row could not be stored; nothing is registered.
    pub(crate) async fn register_wasm(
        &self,
        store: &Store,
        blobs: &Path,
        (tool, bytes): (Tool, bytes::Bytes),
        how: WasmRegistration,
    ) -> Result<Arc<Registered>, StoreToolError> {
        let row = wasm_row(&tool, how);
        let (blobs, sha, kept) = (blobs.to_owned(), row.sha256.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || write_blob(&blobs, &sha, &bytes))
            .await
            .map_err(|e| StoreToolError::Blob(std::io::Error::other(e)))?
            .map_err(StoreToolError::Blob)?;
        // In the store before its row: a node that sees the row finds the module.
        store.put_blob(format!("{}.wasm", row.sha256), kept).await?;
        let row = store.register_tool(row).await?;
        let registered = Arc::new(Registered { row, runnable: Runnable::Wasm(tool) });
        self.insert(Arc::clone(&registered));
        Ok(registered)
    }
}

impl Registry {
    /// Registers the built-in native `python-data` tool when it is built in
    /// `dir` and native tools can run: a spec whose bind puts the built
    /// packages at [`crate::interpreters::PYTHON_DATA_INSIDE`], registered
    /// again when the build (or the spec) changed.
    async fn register_python_data(
        &self,
        store: &Store,
        sandbox: &Sandbox,
        blobs: &Path,
        dir: &Path,
        jail: Option<&Arc<crate::jail::Jail>>,
    ) {
        use crate::interpreters::{PYTHON_DATA, PYTHON_DATA_INSIDE, SYSTEM_PYTHON};
        let built = dir.join(PYTHON_DATA);
        let Ok(build) = std::fs::read_to_string(built.join("BUILD")) else {
            tracing::info!(tool = PYTHON_DATA, path = %built.display(), "built-in tool not built (scripts/build-interpreters python-data); not registered");
            return;
        };
        let Some(jail) = jail else {
            tracing::info!(tool = PYTHON_DATA, "built-in tool not registered: native tools cannot run on this host");
            return;
        };
        let source = std::fs::canonicalize(&built).unwrap_or(built);
        let runner = format!("{PYTHON_DATA_INSIDE}/runner.py");
        let spec = super::native::NativeSpec {
            runtime: NATIVE_KIND.to_owned(),
            name: PYTHON_DATA.to_owned(),
            description: Some(
                "Runs Python code with numpy, pandas and matplotlib in a fresh jailed process: prints, the \
                 last expression's value (or `result`; a DataFrame as records and text) and the figures left \
                 open (as PNG images) come back."
                    .to_owned(),
            ),
            argv: vec![SYSTEM_PYTHON.to_owned(), "-I".to_owned(), "-B".to_owned(), runner],
            rootfs: None,
            env: BTreeMap::from([
                ("MPLBACKEND".to_owned(), "Agg".to_owned()),
                ("MPLCONFIGDIR".to_owned(), "/tmp/.matplotlib".to_owned()),
                ("HOME".to_owned(), "/tmp".to_owned()),
                ("IMAGENTX_PYTHON_DATA_BUILD".to_owned(), build.trim().to_owned()),
                // One thread: the tiers give at most a core, and a warm jail's
                // Landlock binds a single-threaded process only.
                ("OPENBLAS_NUM_THREADS".to_owned(), "1".to_owned()),
                ("OMP_NUM_THREADS".to_owned(), "1".to_owned()),
                ("MKL_NUM_THREADS".to_owned(), "1".to_owned()),
            ]),
            env_allow: Vec::new(),
            input_schema: Some(serde_json::json!({
                "type": "object",
                "properties": {
                    "code": {
                        "type": "string",
                        "description": "Python source to run, with numpy, pandas and matplotlib (Agg) importable. \
                            The value of the last expression statement is the result (a DataFrame or Series comes \
                            back as records and a text table), unless the code assigns `result`. Figures left open \
                            (or shown with plt.show()) come back as PNG images. Files are under /data."
                    },
                    "args": {"type": "object", "description": "available to the code as `args`"}
                },
                "required": ["code"]
            })),
            binds: vec![crate::jail::ExtraBind { source, target: PYTHON_DATA_INSIDE.into() }],
        };
        let mut tool = match super::native::build(&spec, Some(jail)) {
            Ok(tool) => tool,
            Err(e) => {
                tracing::error!(tool = PYTHON_DATA, error = %e, "built-in tool could not be made; not registered");
                return;
            }
        };
        tool.warm = warm_pool(&tool, sandbox, jail);
        let canonical = match serde_json::to_vec_pretty(&spec) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(tool = PYTHON_DATA, error = %e, "encoding the built-in tool's spec");
                return;
            }
        };
        let sha256 = crate::engine::sha256_hex(&canonical);
        if let Some(registered) = self.get(PYTHON_DATA, None).filter(|t| t.row.sha256 == sha256) {
            tracing::info!(tool = PYTHON_DATA, "built-in tool ready (this build is registered)");
            // The same tool, with its warm jails.
            self.insert(Registered { row: registered.row.clone(), runnable: Runnable::Native(tool) });
            return;
        }
        let row = ToolRow {
            name: PYTHON_DATA.to_owned(),
            version: 0,
            label: Some(build.trim().to_owned()),
            sha256: sha256.clone(),
            kind: NATIVE_KIND.to_owned(),
            description: spec.description.clone(),
            input_schema: spec.input_schema.clone(),
            registered_by: BUILTIN_REGISTRAR.to_owned(),
            registered_at: String::new(),
            retired_at: None,
        };
        let path = super::native::spec_path(blobs, &sha256);
        let stored = match write_new(blobs, &path, &canonical) {
            Ok(()) => match store.put_blob(format!("{sha256}.json"), canonical.into()).await {
                Ok(()) => store.register_tool(row).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(row) => {
                tracing::info!(tool = PYTHON_DATA, version = row.version, build = %build.trim(), "built-in tool registered (new build)");
                self.insert(Registered { row, runnable: Runnable::Native(tool) });
            }
            Err(e) => {
                tracing::error!(tool = PYTHON_DATA, error = %e, "built-in tool could not be stored; not registered")
            }
        }
    }
}

/// The warm jails of a built-in native tool, when this host keeps any
/// (`[jail] warm`, as root): they warm up with a core, [`WARM_MEMORY`], and
/// resource limits as high as any tier's (a call's limits replace them).
fn warm_pool(
    tool: &crate::runner::NativeTool,
    sandbox: &Sandbox,
    jail: &Arc<crate::jail::Jail>,
) -> Option<Arc<crate::jail::WarmPool>> {
    let size = jail.warm_size();
    if size == 0 {
        return None;
    }
    let policy = &sandbox.policy;
    let tier = if policy.tiers.contains_key("standard") { "standard" } else { policy.tiers.keys().next()? };
    let mut limits = policy.resolve(tier, None).ok()?;
    limits.memory_bytes = WARM_MEMORY;
    limits.cpu_share = 1.0;
    let tiers = policy.tiers.values();
    limits.pids = tiers.clone().map(|t| t.pids).max().unwrap_or(limits.pids);
    limits.nofile_soft = tiers.clone().map(|t| t.nofile_soft).max().unwrap_or(limits.nofile_soft);
    limits.nofile_hard = tiers.clone().map(|t| t.nofile_hard).max().unwrap_or(limits.nofile_hard);
    limits.data_quota_bytes = tiers.map(|t| t.data_quota_bytes).max().unwrap_or(limits.data_quota_bytes);
    let mut env = crate::jail::environment(&[&policy.env, &tool.env]);
    env.push(("IMAGENTX_WARM".to_owned(), "1".to_owned()));
    let spec = crate::jail::WarmSpec {
        tool: tool.name.clone(),
        argv: tool.argv.clone(),
        env,
        layout: tool.layout.clone(),
        limits,
    };
    tracing::info!(tool = %tool.name, size, "keeping jails warm");
    Some(crate::jail::WarmPool::new(Arc::clone(jail), spec, size))
}

/// Memory a warm jail may use while it warms up and waits.
const WARM_MEMORY: u64 = 512 << 20;

/// Writes the store's copy of the file `path` of `blobs` (a module or spec
/// another node registered) into `blobs`; none in the store is left for the
/// read that follows to report missing.
async fn fetch(store: &Store, blobs: &Path, path: &Path) -> Result<(), String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bytes = match store.blob(&name).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("its module could not be fetched from the store: {e}")),
    };
    let size = bytes.len();
    let (dir, file) = (blobs.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || write_new(&dir, &file, &bytes))
        .await
        .map_err(|e| format!("writing its module: {e}"))?
        .map_err(|e| format!("writing its module {}: {e}", path.display()))?;
    tracing::info!(blob = %name, bytes = size, "module fetched from the store");
    Ok(())
}

pub fn blob_path(blobs: &Path, sha256: &str) -> PathBuf {
    blobs.join(format!("{sha256}.wasm"))
}

/// Stores a module under its hash. Already there (same content, same name)
/// is fine.
///
/// # Errors
///
/// The write's failure.
pub fn write_blob(blobs: &Path, sha256: &str, bytes: &[u8]) -> std::io::Result<()> {
    write_new(blobs, &blob_path(blobs, sha256), bytes)
}

/// Writes `bytes` to `path` in directory `dir` unless it exists: temporary
/// file, fsync, rename, fsync of the directory.
///
/// # Errors
///
/// The write's failure.
pub fn write_new(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Content-addressed: one already there is these bytes, unless it was
    // damaged since (then it is replaced, which is how a re-registration mends it).
    if std::fs::read(path).is_ok_and(|there| there == bytes) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7().simple()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
