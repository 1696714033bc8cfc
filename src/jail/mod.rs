//! The native-tool fallback: a Linux namespace jailer.
//!
//! A native program gets the view a WASM tool gets — a read-only system, the
//! user's `/data`, a private `/tmp`, no network — under the same tier limits,
//! enforced by the kernel:
//!
//! - [`namespaces`]: user, pid, mount, net, uts, ipc and cgroup namespaces;
//! - [`rootfs`]: `pivot_root` onto read-only binds, fresh `/proc` (hidden
//!   pids), minimal `/dev` and `/etc`, tmpfs `/tmp` and `/var/tmp`, `/data`;
//! - [`cgroup`]: one cgroup per run with memory, cpu and pids limits (v1 or
//!   v2, detected at start);
//! - [`seccomp`]: an allow-list filter; `caps`: capabilities, ids and
//!   `no_new_privs`; `rlimits`; `landlock`: a second wall on file access;
//! - `child`: init and the tool after the clone, applying the above in order;
//! - `supervise`: the parent side, deadlines and the report's figures;
//! - [`warm`]: jails started before their call, attached to it when it comes.
//!
//! The raw system calls are in `sys`, each behind a `// SAFETY:` comment.
//! This shares the host kernel: it is container-grade isolation, weaker
//! than the WASM path, which stays the default.

mod caps;
mod cgroup;
mod child;
mod landlock;
mod namespaces;
mod rlimits;
mod rootfs;
mod seccomp;
mod session;
mod supervise;
mod sys;
mod warm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cgroup::{CgroupError, CgroupMode};
pub use rootfs::{Layout, LayoutError};
pub use supervise::READY_LINE;
pub use warm::{NativeSession, WarmPool, WarmSpec, WarmStats};

use crate::policy::Limits;
use crate::report::Status;

/// The uid and gid a tool runs as inside its user namespace ("nobody").
pub const SANDBOX_ID: u32 = 65534;

/// PATH inside the jail when the environment sets none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The `[jail]` table of the config file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// Host directories bound read-only at the same place (missing ones are
    /// skipped; symlinks, as on merged-/usr systems, are recreated).
    pub system: Vec<PathBuf>,
    /// Entries of the host's `/etc` bound read-only into the jail's minimal
    /// `/etc` (which also gets generated `passwd`, `group`, `hosts`, `hostname`).
    pub etc: Vec<String>,
    /// `auto`, `v1` or `v2`.
    pub cgroup: CgroupMode,
    /// The parent cgroup of runs, made under the server's own cgroup.
    pub cgroup_name: String,
    /// When the server is root, the host uid and gid a tool runs as.
    pub host_id: u32,
    /// Landlock as a second wall where the kernel has it.
    pub landlock: bool,
    /// More host paths bound read-only into every jail, each at its own path
    /// inside (`[[jail.binds]] source = "/srv/tools" target = "/opt/tools"`).
    pub binds: Vec<ExtraBind>,
    /// A directory whose entries make the root of every jail, instead of
    /// `system`, `etc` and `binds` (a tool registered with its own rootfs
    /// uses that one).
    pub rootfs: Option<PathBuf>,
    /// Jails kept warm for each built-in native tool that can use them
    /// (`python-data`): started, imports paid, waiting for their one call.
    /// 0: every call starts a fresh jail. Used only when the server is root.
    pub warm: usize,
}

/// A host path bound read-only into the jail.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtraBind {
    pub source: PathBuf,
    pub target: PathBuf,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            system: ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"].map(PathBuf::from).to_vec(),
            etc: [
                "ld.so.cache",
                "ld.so.conf",
                "ld.so.conf.d",
                "localtime",
                "nsswitch.conf",
                "alternatives",
                "mime.types",
                "ssl",
                "ca-certificates",
                "python3",
                "python3.11",
            ]
            .map(str::to_owned)
            .to_vec(),
            cgroup: CgroupMode::Auto,
            cgroup_name: "imagentx-sandbox".to_owned(),
            host_id: 65534,
            landlock: true,
            binds: Vec::new(),
            rootfs: None,
            warm: 2,
        }
    }
}

/// Why the jail cannot be used on this host.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("user namespaces are not available: {0}")]
    UserNamespaces(String),
    #[error("[jail] settings: {0}")]
    Config(String),
}

/// One native run as asked.
#[derive(Debug)]
pub struct NativeRun<'a> {
    /// The execution's id: its cgroup's name.
    pub id: &'a str,
    /// Whom it runs for (the user): the CPU is shared between owners first.
    pub owner: &'a str,
    /// The program and its arguments.
    pub argv: &'a [String],
    /// The whole environment (nothing of the host's is added).
    pub env: &'a [(String, String)],
    pub input: &'a [u8],
    /// The user's directory, bound at `/data`.
    pub data_dir: &'a Path,
    pub data_writable: bool,
    pub limits: &'a Limits,
    /// A tool's own root instead of the host's system directories.
    pub layout: Option<&'a Layout>,
    /// Set when the caller cancels: the run is killed (status `cancelled`).
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

/// How a native run ended, with what it used.
#[derive(Debug, Clone)]
pub struct NativeOutcome {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub wall: Duration,
    pub cpu: Option<Duration>,
    pub peak_memory_bytes: Option<u64>,
    pub peak_processes: Option<u64>,
    /// Bytes the run's processes sent to storage: the kernel's I/O
    /// accounting of every process reaped in the jail (`write_bytes` less
    /// `cancelled_write_bytes`). Writes into `/data`; not the tmpfs `/tmp`,
    /// nor a page written again before it reached the disk.
    pub bytes_written: Option<u64>,
    /// Limits the run ran into, whether or not it survived them
    /// (`pids`: a fork refused at `pids.max`; `memory`: an OOM kill).
    pub limits_hit: Vec<&'static str>,
    /// Where the supervisor's time went (for benchmarks and debug logs).
    pub timings: Timings,
}

/// Start-up and clean-up costs of one run, as the supervisor saw them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Making the cgroup and writing its limits.
    pub cgroup: Duration,
    /// Pipes, the plan and the clone into new namespaces.
    pub clone: Duration,
    /// Id maps and the move into the cgroup, until the child is let go.
    pub attach: Duration,
    /// From the go to the init's exit: all of the below.
    pub run: Duration,
    /// Inside: closing descriptors and building the root (init).
    pub mounts: Duration,
    /// Inside: forking the tool and its joining the run's cgroup (a cgroup
    /// move can wait for an RCU grace period).
    pub join: Duration,
    /// Inside: pivot_root, rlimits, credentials, Landlock, seccomp.
    pub confine: Duration,
    /// From the exec to the init's exit: the program, its exit, and the
    /// namespaces' teardown.
    pub program: Duration,
    /// Reading the cgroup's figures and removing it.
    pub cleanup: Duration,
}

impl NativeOutcome {
    /// A run that ended before the program could start.
    pub fn failed(status: Status, message: String, wall: Duration) -> Self {
        Self {
            status,
            exit_code: None,
            signal: None,
            error: Some(message),
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall,
            cpu: None,
            peak_memory_bytes: None,
            peak_processes: None,
            bytes_written: None,
            limits_hit: Vec::new(),
            timings: Timings::default(),
        }
    }
}

/// The jailer: what is found and built once at start (cgroup hierarchy,
/// seccomp programs, the host root's layout), shared by every run.
#[derive(Debug)]
pub struct Jail {
    config: JailConfig,
    layout: Layout,
    cgroups: cgroup::Cgroups,
    filter: seccomp::Filter,
    landlock: Option<landlock::Rights>,
    /// Whether this process is root (then the tool's ids map to
    /// `config.host_id`; otherwise to this process's own ids).
    privileged: bool,
}

impl Jail {
    /// Detects cgroups, builds the seccomp filter and prepares the host layout.
    ///
    /// # Errors
    ///
    /// When this host cannot run the jail (no cgroup access, no user
    /// namespaces), with the reason.
    pub fn new(config: JailConfig) -> Result<Self, JailError> {
        namespaces::check_available().map_err(JailError::UserNamespaces)?;
        let cgroups = cgroup::Cgroups::detect(config.cgroup, &config.cgroup_name)?;
        let filter = seccomp::Filter::build();
        for path in config.system.iter().chain(config.binds.iter().map(|b| &b.target)) {
            rootfs::check_inside(path).map_err(JailError::Config)?;
        }
        if let Some(bad) = config.etc.iter().find(|e| e.is_empty() || e.contains('/') || e.starts_with('.')) {
            return Err(JailError::Config(format!("etc entry `{bad}` must be a name in /etc")));
        }
        let binds: Vec<(PathBuf, String)> =
            config.binds.iter().map(|b| (b.source.clone(), b.target.to_string_lossy().into_owned())).collect();
        let layout = match &config.rootfs {
            Some(dir) if !dir.is_absolute() => {
                return Err(JailError::Config(format!("rootfs {} must be an absolute path", dir.display())));
            }
            Some(dir) => Layout::rootfs(dir)?,
            None => Layout::host(&config.system, &config.etc, &binds)?,
        };
        let landlock = if config.landlock { landlock::available() } else { None };
        let privileged = nix::unistd::geteuid().is_root();
        tracing::info!(cgroup = cgroups.version(), landlock = landlock.is_some(), privileged, "native jail ready");
        if !cgroup::Cgroups::favors_dynamic_moves() {
            tracing::info!(
                "cgroup moves may wait for an RCU grace period (milliseconds per native run); \
                 mounting cgroup2 with -o favordynmods avoids it (see README)"
            );
        }
        Ok(Self { config, layout, cgroups, filter, landlock, privileged })
    }

    /// The host's root as every jail has it, plus `extra` read-only binds (a
    /// native tool's own packages).
    ///
    /// # Errors
    ///
    /// A bind's target is not a path a bind may have, or its source cannot be
    /// opened; or this jail's root is a rootfs (binds go into it instead).
    pub fn layout_with(&self, extra: &[ExtraBind]) -> Result<Layout, JailError> {
        if self.config.rootfs.is_some() {
            return Err(JailError::Config("the jails' root is a rootfs: a tool's binds go into it".into()));
        }
        for bind in extra {
            rootfs::check_inside(&bind.target).map_err(JailError::Config)?;
            if !bind.source.is_absolute() {
                return Err(JailError::Config(format!("bind source {} must be absolute", bind.source.display())));
            }
        }
        let binds: Vec<(PathBuf, String)> = self
            .config
            .binds
            .iter()
            .chain(extra)
            .map(|b| (b.source.clone(), b.target.to_string_lossy().into_owned()))
            .collect();
        Ok(Layout::host(&self.config.system, &self.config.etc, &binds)?)
    }

    /// The directories run `id` of `owner` has (or had) while it runs.
    pub fn cgroup_paths(&self, id: &str, owner: &str) -> Vec<PathBuf> {
        self.cgroups.run_dirs(id, owner)
    }

    /// The cgroup version in use: `"v1"` or `"v2"`.
    pub fn cgroup_version(&self) -> &'static str {
        self.cgroups.version()
    }

    /// Whether Landlock is applied.
    pub fn landlock(&self) -> bool {
        self.landlock.is_some()
    }

    /// The host uid and gid that files a tool creates in `/data` belong to.
    pub fn host_ids(&self) -> (u32, u32) {
        if self.privileged {
            (self.config.host_id, self.config.host_id)
        } else {
            (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
        }
    }

    /// Who files made for a user's `/data` by the server should belong to: the
    /// tool's host ids when the server is root (a normal user's server and
    /// its tools share one uid already).
    pub fn file_owner(&self) -> Option<(u32, u32)> {
        self.privileged.then(|| self.host_ids())
    }

    /// Prepares a user's directory for `/data`: the tool's uid must own it.
    ///
    /// # Errors
    ///
    /// When it cannot be opened (never through a symlink) or chowned.
    pub fn prepare_data_dir(&self, dir: &Path) -> std::io::Result<()> {
        if !self.privileged {
            return Ok(());
        }
        let (uid, gid) = self.host_ids();
        let fd = rootfs::open_data(dir)?;
        nix::unistd::fchownat(
            &fd,
            "",
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_EMPTY_PATH,
        )
        .map_err(std::io::Error::from)
    }

    /// Runs one program in a fresh jail and waits for it. Blocking: call it
    /// from a blocking thread.
    pub fn run(&self, run: &NativeRun<'_>) -> NativeOutcome {
        supervise::run(self, run)
    }

    /// Jails to keep warm per built-in tool that can use them: `[jail]
    /// warm`, or none when this process is not root (attaching a user's
    /// directory to a running jail needs it; see [`WarmPool`]).
    pub fn warm_size(&self) -> usize {
        if self.privileged { self.config.warm } else { 0 }
    }

    /// The Landlock rules a warm jail's program applies to itself once its
    /// `/data` is attached (`IMAGENTX_LANDLOCK`), when Landlock is on.
    pub(crate) fn deferred_landlock(&self) -> Option<String> {
        self.landlock.map(landlock::deferred)
    }

    /// The jail's init shares the server's memory (`CLONE_VM`) instead of
    /// copying its page tables, which costs tens of milliseconds per run once
    /// the server holds a gigabyte. It is never in the run's memory cgroup,
    /// so the OOM killer (which kills every process sharing its victim's
    /// memory) never picks it.
    fn clone_flags(&self) -> libc::c_int {
        namespaces::CLONE_FLAGS | libc::CLONE_VM
    }

    fn map_ids(&self, pid: libc::pid_t) -> std::io::Result<()> {
        namespaces::map_ids(pid, self.privileged, self.config.host_id)
    }
}

/// The environment of a native run: the jail's base variables, then the
/// policy's, then the tool's own (later ones win).
pub fn environment(extra: &[&BTreeMap<String, String>]) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::from([
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("TMPDIR".to_owned(), "/tmp".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    for map in extra {
        env.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    env.into_iter().collect()
}
