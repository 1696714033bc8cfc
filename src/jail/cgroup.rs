//! Cgroups: one per run, with the tier's memory, CPU and process limits, on
//! cgroup v1 (controllers on their own hierarchies, as on hybrid hosts) or
//! cgroup v2 (the unified hierarchy), detected at start.
//!
//! A small module of our own: the cgroup crates assume systemd or v2 only.
//! Everything is plain file I/O on cgroupfs.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup version to use: `auto` picks v1 when the memory, cpu and pids
/// controllers are mounted on v1 hierarchies, else v2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    #[default]
    Auto,
    V1,
    V2,
}

/// Where runs' cgroups are created, found at start.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V1 { memory: PathBuf, cpu: PathBuf, cpuacct: PathBuf, pids: PathBuf, memsw: bool },
    V2 { parent: PathBuf, swap: bool },
}

/// Why cgroups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { what, path, source }
}

/// Mount points of cgroup hierarchies: v1 ones with their controllers, and
/// the v2 one.
#[derive(Debug, Default)]
struct Mounts {
    v1: Vec<(PathBuf, Vec<String>)>,
    v2: Option<PathBuf>,
}

fn mounts() -> io::Result<Mounts> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut found = Mounts::default();
    for line in text.lines() {
        // "... mount_point options [optional fields] - fstype source super_options"
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = left.split(' ').nth(4) else { continue };
        let mut right = right.split(' ');
        let (fstype, super_options) = (right.next(), right.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup") => {
                let controllers = super_options.split(',').map(str::to_owned).collect();
                found.v1.push((PathBuf::from(mount_point), controllers));
            }
            Some("cgroup2") => found.v2 = Some(PathBuf::from(mount_point)),
            _ => {}
        }
    }
    Ok(found)
}

/// This process's cgroup path in the hierarchy holding `controller` (v1), or
/// in the unified hierarchy (`None`).
fn own_path(controller: Option<&str>) -> io::Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        if matches {
            return Ok(path.to_owned());
        }
    }
    Err(io::Error::new(
        ErrorKind::NotFound,
        format!("no {} line in /proc/self/cgroup", controller.unwrap_or("cgroup v2")),
    ))
}

fn join(mount: &Path, own: &str, name: &str) -> PathBuf {
    mount.join(own.trim_start_matches('/')).join(name)
}

impl Cgroups {
    /// Finds the hierarchies and makes the parent cgroup `name` under this
    /// process's own cgroup (so limits put on the service also hold its runs).
    ///
    /// # Errors
    ///
    /// When no hierarchy has the controllers, or the parent cannot be made
    /// (not root, no delegation).
    pub fn detect(mode: CgroupMode, name: &str) -> Result<Self, CgroupError> {
        let mounts = mounts().map_err(io_error("reading", Path::new("/proc/self/mountinfo")))?;
        let v1_of = |c: &str| mounts.v1.iter().find(|(_, cs)| cs.iter().any(|x| x == c)).map(|(p, _)| p.clone());
        let v1 = (v1_of("memory"), v1_of("cpu"), v1_of("cpuacct"), v1_of("pids"));
        let use_v1 = match mode {
            CgroupMode::V1 => true,
            CgroupMode::V2 => false,
            CgroupMode::Auto => v1.0.is_some() && v1.1.is_some() && v1.3.is_some(),
        };
        if use_v1 {
            let (Some(memory), Some(cpu), Some(pids)) = (v1.0, v1.1, v1.3) else {
                return Err(CgroupError::Unavailable(
                    "cgroup v1 needs the memory, cpu and pids controllers mounted".to_owned(),
                ));
            };
            let cpuacct = v1.2.unwrap_or_else(|| cpu.clone());
            let parent = |mount: &Path, controller: &str| -> Result<PathBuf, CgroupError> {
                let own = own_path(Some(controller)).map_err(io_error("reading", Path::new("/proc/self/cgroup")))?;
                let dir = join(mount, &own, name);
                make_dir(&dir)?;
                Ok(dir)
            };
            let memory = parent(&memory, "memory")?;
            let memsw = memory.join("memory.memsw.limit_in_bytes").exists();
            return Ok(Cgroups::V1 {
                memory,
                cpu: parent(&cpu, "cpu")?,
                cpuacct: parent(&cpuacct, "cpuacct")?,
                pids: parent(&pids, "pids")?,
                memsw,
            });
        }
        let Some(mount) = mounts.v2 else {
            return Err(CgroupError::Unavailable("no cgroup2 hierarchy is mounted".to_owned()));
        };
        let own = own_path(None).map_err(io_error("reading", Path::new("/proc/self/cgroup")))?;
        let own_dir = mount.join(own.trim_start_matches('/'));
        enable_controllers(&own_dir, Some(&mount))?;
        let parent = own_dir.join(name);
        make_dir(&parent)?;
        enable_controllers(&parent, None)?;
        let swap = parent.join("memory.swap.max").exists() || own_dir.join("memory.swap.max").exists();
        Ok(Cgroups::V2 { parent, swap })
    }

    /// The directories of run `id` of `owner` (while it runs).
    pub fn run_dirs(&self, id: &str, owner: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V1 { memory, cpu, cpuacct, pids, .. } => {
                let mut all = vec![memory.join(id), cpu.join(format!("owner-{owner}")).join(id), pids.join(id)];
                if cpuacct != cpu {
                    all.push(cpuacct.join(id));
                }
                all
            }
            Cgroups::V2 { parent, .. } => vec![parent.join(format!("owner-{owner}")).join(id)],
        }
    }

    /// Removes the empty cgroups named `prefix…` that a process before this
    /// one left (it died before it could): those named `prefix<pid>-…` whose
    /// process is gone, at any age, and the others once older than `age` (a
    /// live server's cgroup is empty for a moment after it made it). A live
    /// run's cgroup holds processes, and the kernel refuses to remove it.
    pub fn sweep_stale(&self, prefix: &str, age: Duration) {
        let parents: Vec<PathBuf> = match self {
            Cgroups::V1 { memory, cpu, cpuacct, pids, .. } => {
                vec![memory.clone(), cpu.clone(), cpuacct.clone(), pids.clone()]
            }
            Cgroups::V2 { parent, .. } => vec![parent.clone()],
        };
        let mut dirs = Vec::new();
        for parent in &parents {
            let Ok(entries) = fs::read_dir(parent) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("owner-") {
                    dirs.extend(fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
                } else {
                    dirs.push(path);
                }
            }
        }
        let mut removed = 0;
        for dir in dirs {
            let Some(rest) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(prefix)) else {
                continue;
            };
            let dead = rest
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| pid != std::process::id() && !alive(pid));
            let old = dead
                || fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|e| e > age);
            if old && fs::remove_dir(&dir).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, prefix, "removed cgroups left by an earlier process");
        }
    }

    /// Whether a cgroup hierarchy is mounted with `favordynmods`, which keeps
    /// the kernel's cgroup-migration lock ready for writers: without it,
    /// moving a process into a cgroup can wait for an RCU grace period
    /// (10-25 ms here, at the 90th percentile).
    pub fn favors_dynamic_moves() -> bool {
        std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.lines().any(|l| l.contains(" - cgroup") && l.contains("favordynmods")))
    }

    pub fn version(&self) -> &'static str {
        match self {
            Cgroups::V1 { .. } => "v1",
            Cgroups::V2 { .. } => "v2",
        }
    }

    /// Makes the cgroup of one run of `owner`, with its limits set.
    ///
    /// In the CPU hierarchy (v1) or the one hierarchy (v2) the run goes under
    /// a cgroup of its owner's, all owners' at the same default weight: when
    /// the host is contended the kernel shares the CPU between owners, then
    /// between one owner's runs, so one user's twenty runs cannot starve
    /// another user's one (SECURITY.md, "CPU between users"). Owners' cgroups
    /// are kept for their next runs.
    ///
    /// # Errors
    ///
    /// When a directory cannot be made or a limit cannot be written; whatever
    /// was made is removed.
    pub fn create(&self, id: &str, owner: &str, limits: &CgroupLimits) -> Result<RunCgroup, CgroupError> {
        let quota = ((limits.cpu * CPU_PERIOD_US as f64).round() as u64).max(1000);
        // A floor far above what the tool's last steps before exec allocate
        // (see `child`): the tool shares the server's memory until then, and
        // an OOM kill in that window would reach every sharer.
        let limits = CgroupLimits { memory_bytes: limits.memory_bytes.max(MIN_MEMORY_BYTES), ..*limits };
        let mut run = RunCgroup { dirs: Vec::new(), v2: matches!(self, Cgroups::V2 { .. }), peak: None };
        match self {
            Cgroups::V1 { memory, cpu, cpuacct, pids, memsw } => {
                let memory = run.make(memory.join(id))?;
                write(&memory, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?;
                if *memsw {
                    // No swap: memory + swap may not exceed the memory limit.
                    write(&memory, "memory.memsw.limit_in_bytes", &limits.memory_bytes.to_string())?;
                }
                let cpu_dir = run.make(owner_dir(cpu, owner, false)?.join(id))?;
                write(&cpu_dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write(&cpu_dir, "cpu.cfs_quota_us", &quota.to_string())?;
                if cpuacct != cpu {
                    run.make(cpuacct.join(id))?;
                }
                let pids = run.make(pids.join(id))?;
                write(&pids, "pids.max", &limits.pids.to_string())?;
            }
            Cgroups::V2 { parent, swap } => {
                let dir = run.make(owner_dir(parent, owner, true)?.join(id))?;
                write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                if *swap {
                    write(&dir, "memory.swap.max", "0")?;
                }
                write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir, "pids.max", &limits.pids.to_string())?;
            }
        }
        Ok(run)
    }
}

/// The cgroup of one owner's runs under `parent`, made on first use. On v2
/// it passes the controllers down to the runs (it holds no process itself).
fn owner_dir(parent: &Path, owner: &str, v2: bool) -> Result<PathBuf, CgroupError> {
    let dir = parent.join(format!("owner-{owner}"));
    make_dir(&dir)?;
    if v2 {
        write(&dir, "cgroup.subtree_control", "+memory +cpu +pids")?;
    }
    Ok(dir)
}

const CPU_PERIOD_US: u64 = 100_000;

/// The smallest memory limit a run's cgroup gets.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;

/// The limits of one run's cgroup.
#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    /// Share of one core.
    pub cpu: f64,
    /// Processes (the jail's init is not in the cgroup).
    pub pids: u32,
}

/// Whether process `pid` exists (in this pid namespace; one we may not
/// signal, EPERM, exists too).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io { what: "creating", path: dir.to_owned(), source: e }),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(io_error("writing", &path))
}

fn read(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file)?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`).
fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    read(dir, file)?.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key { v.trim().parse().ok() } else { None }
    })
}

/// Lets `dir`'s children use the memory, cpu and pids controllers. A cgroup
/// with processes of its own cannot (v2's "no internal processes" rule): then
/// this process moves into a leaf `supervisor` first. `root` is the
/// hierarchy's root, exempt from the rule.
fn enable_controllers(dir: &Path, root: Option<&Path>) -> Result<(), CgroupError> {
    let available = read(dir, "cgroup.controllers").unwrap_or_default();
    let missing: Vec<&str> =
        ["memory", "cpu", "pids"].into_iter().filter(|c| !available.split_whitespace().any(|a| a == *c)).collect();
    if !missing.is_empty() {
        return Err(CgroupError::Unavailable(format!(
            "cgroup v2 at {} lacks the {} controller(s)",
            dir.display(),
            missing.join(", ")
        )));
    }
    let path = dir.join("cgroup.subtree_control");
    match fs::write(&path, "+memory +cpu +pids") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && root != Some(dir) => {
            let leaf = dir.join("supervisor");
            make_dir(&leaf)?;
            write(&leaf, "cgroup.procs", "0")?;
            fs::write(&path, "+memory +cpu +pids").map_err(io_error("writing", &path))
        }
        Err(e) => Err(CgroupError::Io { what: "writing", path, source: e }),
    }
}

/// What a run's cgroup recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupStats {
    pub peak_memory_bytes: Option<u64>,
    pub oom_kills: u64,
    pub peak_processes: Option<u64>,
    /// Forks refused at `pids.max`.
    pub pids_refused: u64,
    pub cpu: Option<Duration>,
}

/// One run's cgroup: a directory per v1 hierarchy, or one v2 directory.
/// Dropping it kills what is left inside and removes it.
#[derive(Debug)]
pub struct RunCgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
    /// v2's `memory.peak`, open since [`RunCgroup::reset_peaks`]: a reset
    /// holds for reads through the descriptor that wrote it.
    peak: Option<fs::File>,
}

impl RunCgroup {
    fn make(&mut self, dir: PathBuf) -> Result<PathBuf, CgroupError> {
        make_dir(&dir)?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    fn find(&self, file: &str) -> Option<&Path> {
        self.dirs.iter().map(PathBuf::as_path).find(|d| d.join(file).exists())
    }

    /// The `cgroup.procs` file of every hierarchy, open for writing: a
    /// process writing `0` into each joins the cgroup.
    ///
    /// # Errors
    ///
    /// When one cannot be opened.
    pub fn procs_files(&self) -> Result<Vec<std::os::fd::OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                fs::OpenOptions::new().write(true).open(&path).map(Into::into).map_err(io_error("opening", &path))
            })
            .collect()
    }

    /// CPU time used so far by every process of the run.
    pub fn cpu(&self) -> Option<Duration> {
        if self.v2 {
            let dir = self.dirs.first()?;
            keyed(dir, "cpu.stat", "usage_usec").map(Duration::from_micros)
        } else {
            let dir = self.find("cpuacct.usage")?;
            read_u64(dir, "cpuacct.usage").map(Duration::from_nanos)
        }
    }

    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats { cpu: self.cpu(), ..CgroupStats::default() };
        if self.v2 {
            if let Some(dir) = self.dirs.first() {
                stats.peak_memory_bytes = self.peak_v2(dir);
                stats.oom_kills = keyed(dir, "memory.events", "oom_kill").unwrap_or(0);
                stats.peak_processes = read_u64(dir, "pids.peak");
                stats.pids_refused = keyed(dir, "pids.events", "max").unwrap_or(0);
            }
        } else {
            if let Some(dir) = self.find("memory.max_usage_in_bytes") {
                stats.peak_memory_bytes = read_u64(dir, "memory.max_usage_in_bytes");
                stats.oom_kills = keyed(dir, "memory.oom_control", "oom_kill").unwrap_or(0);
            }
            if let Some(dir) = self.find("pids.max") {
                stats.peak_processes = read_u64(dir, "pids.peak");
                stats.pids_refused = keyed(dir, "pids.events", "max").unwrap_or(0);
            }
        }
        stats
    }

    /// Changes the run's limits (a warm jail's, when its call arrives). A
    /// memory limit below what the run holds already is refused (v1) or
    /// ends in an OOM kill (v2): callers check the usage first.
    ///
    /// # Errors
    ///
    /// When a limit cannot be written.
    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let quota = ((limits.cpu * CPU_PERIOD_US as f64).round() as u64).max(1000);
        let memory = limits.memory_bytes.max(MIN_MEMORY_BYTES).to_string();
        if self.v2 {
            let dir = self.dirs.first().ok_or_else(|| CgroupError::Unavailable("the run has no cgroup".into()))?;
            write(dir, "memory.max", &memory)?;
            write(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
            return write(dir, "pids.max", &limits.pids.to_string());
        }
        if let Some(dir) = self.find("memory.limit_in_bytes") {
            // memory + swap may never be below memory: order the two writes.
            let memsw = dir.join("memory.memsw.limit_in_bytes").exists();
            let lowering = read_u64(dir, "memory.limit_in_bytes").is_some_and(|now| now > limits.memory_bytes);
            if memsw && !lowering {
                write(dir, "memory.memsw.limit_in_bytes", &memory)?;
            }
            write(dir, "memory.limit_in_bytes", &memory)?;
            if memsw && lowering {
                write(dir, "memory.memsw.limit_in_bytes", &memory)?;
            }
        }
        if let Some(dir) = self.find("cpu.cfs_quota_us") {
            write(dir, "cpu.cfs_quota_us", &quota.to_string())?;
        }
        if let Some(dir) = self.find("pids.max") {
            write(dir, "pids.max", &limits.pids.to_string())?;
        }
        Ok(())
    }

    /// Starts the peak memory over from what the run holds now (a warm
    /// jail's call reports its own peak, not its warm-up's). v1 resets it
    /// for every reader; v2 (6.12 and later) for reads through the
    /// descriptor kept here. Where it cannot, the peak keeps the warm-up's.
    pub fn reset_peaks(&mut self) {
        if self.v2 {
            use std::io::Write;
            let Some(dir) = self.dirs.first() else { return };
            let opened = fs::OpenOptions::new().read(true).write(true).open(dir.join("memory.peak"));
            self.peak = opened.ok().and_then(|mut file| file.write_all(b"reset\n").ok().map(|()| file));
        } else if let Some(dir) = self.find("memory.max_usage_in_bytes") {
            let _ = fs::write(dir.join("memory.max_usage_in_bytes"), "0");
            if dir.join("memory.memsw.max_usage_in_bytes").exists() {
                let _ = fs::write(dir.join("memory.memsw.max_usage_in_bytes"), "0");
            }
        }
    }

    /// v2's peak memory: through the descriptor of a reset when there is one.
    fn peak_v2(&self, dir: &Path) -> Option<u64> {
        use std::io::{Read, Seek};
        match &self.peak {
            Some(file) => {
                let mut file = file;
                let mut text = String::new();
                file.seek(std::io::SeekFrom::Start(0)).ok()?;
                file.read_to_string(&mut text).ok()?;
                text.trim().parse().ok()
            }
            None => read_u64(dir, "memory.peak"),
        }
    }

    /// Memory the run's processes hold now.
    pub fn memory_now(&self) -> Option<u64> {
        if self.v2 {
            read_u64(self.dirs.first()?, "memory.current")
        } else {
            read_u64(self.find("memory.usage_in_bytes")?, "memory.usage_in_bytes")
        }
    }

    /// Processes still in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        self.dirs
            .first()
            .and_then(|d| read(d, "cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process left in the cgroup and waits (up to a second)
    /// until it is empty. v2 has `cgroup.kill`; on v1 the processes are
    /// killed one by one, again until none is left (the run's pid namespace
    /// is already gone with its init, so nothing can fork meanwhile).
    pub fn kill_all(&self) {
        if self.v2
            && let Some(dir) = self.dirs.first()
        {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let procs = self.procs();
            if procs.is_empty() || Instant::now() > until {
                return;
            }
            for pid in procs {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Removes the cgroup's directories (retrying while the last processes
    /// finish exiting).
    pub fn remove(&mut self) {
        let until = Instant::now() + Duration::from_secs(2);
        while let Some(dir) = self.dirs.last() {
            match fs::remove_dir(dir) {
                Ok(()) => {
                    self.dirs.pop();
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    self.dirs.pop();
                }
                Err(e) if Instant::now() < until => {
                    let _ = e;
                    self.kill_all();
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "could not remove a run's cgroup");
                    self.dirs.pop();
                }
            }
        }
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        if !self.dirs.is_empty() {
            self.kill_all();
            self.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cgroup2 mount, when there is one and this is root (a test that
    /// needs both is skipped otherwise, but never where root is required).
    fn v2_as_root(what: &str) -> Option<PathBuf> {
        let Ok(Mounts { v2: Some(mount), .. }) = mounts() else {
            eprintln!("SKIPPED: no cgroup2 hierarchy on this host");
            return None;
        };
        if !nix::unistd::geteuid().is_root() {
            let required = std::env::var_os("IMAGENTX_REQUIRE_PRIVILEGED_TESTS").is_some_and(|v| v == "1");
            assert!(!required, "{what} needs root, and IMAGENTX_REQUIRE_PRIVILEGED_TESTS=1");
            eprintln!("SKIPPED: {what} needs root");
            return None;
        }
        Some(mount)
    }

    /// The v2 file operations, on this host's cgroup2 hierarchy even when it
    /// has no controllers (limits cannot be set there; membership, CPU time,
    /// `cgroup.kill` and removal can). Skipped without root or cgroup2.
    #[test]
    fn a_v2_run_cgroup_tracks_kills_and_removes_its_processes() {
        let Some(mount) = v2_as_root("the cgroup v2 test") else { return };
        let own = own_path(None).unwrap_or_default();
        let dir = mount.join(own.trim_start_matches('/')).join(format!("imagentx-test-{}", std::process::id()));
        make_dir(&dir).expect("a cgroup2 directory");
        let mut run = RunCgroup { dirs: vec![dir.clone()], v2: true, peak: None };
        let mut child =
            std::process::Command::new("/bin/sh").args(["-c", "while :; do :; done"]).spawn().expect("a busy child");
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("moving the child in");
        std::thread::sleep(Duration::from_millis(200));
        assert!(run.cpu().is_some_and(|c| c > Duration::from_millis(20)), "{:?}", run.cpu());
        run.kill_all();
        let status = child.wait().expect("reaping the child");
        assert!(!status.success());
        assert!(run.procs().is_empty());
        run.remove();
        assert!(!dir.exists());
    }

    /// A dead server's warm cgroups go at any age; a live one's (this
    /// process's), an unnamed one still young and other names stay.
    #[test]
    fn a_sweep_removes_a_dead_servers_cgroups_at_once() {
        let Some(mount) = v2_as_root("the cgroup sweep test") else { return };
        let own = own_path(None).unwrap_or_default();
        let parent = mount.join(own.trim_start_matches('/')).join(format!("imagentx-sweep-{}", std::process::id()));
        let mut gone = std::process::Command::new("/bin/true").spawn().expect("a child");
        let dead = gone.id();
        gone.wait().expect("reaping the child");
        let me = std::process::id();
        let names = [
            format!("warm-{dead}-a"),
            format!("owner-x/warm-{dead}-b"),
            format!("warm-{me}-c"),
            "warm-young".to_owned(),
            format!("other-{dead}-d"),
        ];
        make_dir(&parent).expect("a cgroup2 directory");
        make_dir(&parent.join("owner-x")).expect("a cgroup2 directory");
        for name in &names {
            make_dir(&parent.join(name)).expect("a cgroup2 directory");
        }
        Cgroups::V2 { parent: parent.clone(), swap: false }.sweep_stale("warm-", Duration::from_secs(120));
        let left: Vec<bool> = names.iter().map(|n| parent.join(n).exists()).collect();
        for name in names.iter().rev().chain([&"owner-x".to_owned()]) {
            let _ = fs::remove_dir(parent.join(name));
        }
        let _ = fs::remove_dir(&parent);
        assert_eq!(left, [false, false, true, true, true], "{names:?}");
    }
}
