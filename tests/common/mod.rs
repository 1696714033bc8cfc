//! Shared by the integration tests: builds the guest workspaces once per test
//! binary (real `cargo build --target wasm32-wasip2`, never committed `.wasm`),
//! and makes sandboxes on one shared engine with a fresh data directory each.

#![allow(dead_code)]

pub mod interpreters;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use imagentx_sandbox::data_dir::DataDir;
use imagentx_sandbox::engine::{Engine, EngineConfig, Tool};
use imagentx_sandbox::policy::{Policy, UserId};
use imagentx_sandbox::report::ExecutionReport;
use imagentx_sandbox::runner::{Sandbox, ToolCall};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where guests are built: inside the host's target dir, but a separate cargo
/// target so the nested build never waits on the outer one's lock.
fn guest_target_dir() -> PathBuf {
    repo().join("target").join("guests")
}

fn build_workspace(manifest: &Path) {
    let out = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(manifest)
        .env("CARGO_TARGET_DIR", guest_target_dir())
        .output()
        .expect("running cargo to build the guests");
    assert!(
        out.status.success(),
        "building {} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path of a guest built from `tests/guests` or `examples`, by crate name.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        build_workspace(&repo().join("tests/guests/Cargo.toml"));
        build_workspace(&repo().join("examples/Cargo.toml"));
    });
    let path = guest_target_dir().join("wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "guest {} was not built", path.display());
    path
}

pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("reading a built guest")
}

/// The artifact cache of the tests' engines, kept across test binaries and
/// runs (the interpreters take seconds to compile). Keyed by content and
/// engine configuration, so sharing it never loads a stale artifact.
pub fn artifact_cache() -> PathBuf {
    repo().join("target").join("test-artifacts")
}

/// One engine per test binary: building the pool and ticker once.
pub fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = EngineConfig::new(artifact_cache(), 1 << 30);
            config.max_instances = 64;
            Engine::new(&config).expect("engine")
        })
        .clone()
}

/// A sandbox with its own data directory (kept alive by the returned guard).
pub fn sandbox_with(policy: Policy) -> (Sandbox, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("data dir");
    let data_dir = DataDir::open(dir.path()).expect("data dir layout");
    (Sandbox { policy, engine: engine(), data_dir }, dir)
}

pub fn sandbox() -> (Sandbox, tempfile::TempDir) {
    sandbox_with(Policy::default())
}

pub fn call(user: &str, tier: &str, input: serde_json::Value) -> ToolCall {
    ToolCall {
        user: UserId::new(user).expect("test user id"),
        tier: tier.to_owned(),
        input: input.to_string().into_bytes(),
        args: Vec::new(),
        timeout: None,
    }
}

pub fn with_timeout(mut call: ToolCall, ms: u64) -> ToolCall {
    call.timeout = Some(Duration::from_millis(ms));
    call
}

pub async fn load(sandbox: &Sandbox, name: &str) -> Tool {
    sandbox.load(&guest_bytes(name), name).await.unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// Runs `call` and checks that the sandbox is still healthy afterwards: the
/// same engine runs a trivial call to success.
pub async fn run(sandbox: &Sandbox, tool: &Tool, call: &ToolCall) -> ExecutionReport {
    sandbox.run(Ok(tool), call).await
}

/// Says loudly that `what` is skipped without root, or fails when
/// `IMAGENTX_REQUIRE_PRIVILEGED_TESTS=1` (set by `.ci/run`) forbids skipping.
pub fn skip_unprivileged(what: &str) {
    let message = format!("{what} need root (namespaces and cgroups)");
    assert!(
        std::env::var_os("IMAGENTX_REQUIRE_PRIVILEGED_TESTS").is_none_or(|v| v != "1"),
        "{message}, and IMAGENTX_REQUIRE_PRIVILEGED_TESTS=1 forbids skipping them"
    );
    eprintln!("\n!!!!!!!! SKIPPED: {message}; run as root to test them !!!!!!!!\n");
}

/// Runs `command` with `input` on its stdin and collects its whole output.
pub fn output_with_stdin(command: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing stdin");
    child.wait_with_output().expect("waiting")
}

/// Mounts of this process's mount namespace under `path`.
pub fn mounts_under(path: &Path) -> usize {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    let path = path.to_string_lossy();
    mounts.lines().filter(|l| l.split(' ').nth(4).is_some_and(|at| at.starts_with(&*path))).count()
}

/// A server process stopped as an operator would (SIGTERM, then up to 30 s
/// for it to finish) however the test ends, a failed assertion included; a
/// server that does not stop by then is killed. A test whose point is a
/// crash kills it itself first.
pub struct StoppedOnDrop(pub std::process::Child);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while let Ok(None) = self.0.try_wait() {
                if std::time::Instant::now() > deadline {
                    let _ = self.0.kill();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = self.0.wait();
    }
}

/// The Python of a virtual environment in `target/NAME` holding
/// `requirement` (`package==version`, pip from PyPI): made on first use,
/// kept for the next runs.
pub fn venv_python(name: &str, requirement: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(name);
    let python = venv.join("bin/python");
    let (package, version) = requirement.split_once("==").expect("package==version");
    let probe = format!("import importlib.metadata as m; assert m.version('{package}') == '{version}'");
    let has_it = Command::new(&python).args(["-c", &probe]).output().is_ok_and(|o| o.status.success());
    if !has_it {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().expect("python3 -m venv");
        assert!(made.status.success(), "python3 -m venv: {}", String::from_utf8_lossy(&made.stderr));
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement])
            .output()
            .expect("pip");
        assert!(pip.status.success(), "pip install {requirement}: {}", String::from_utf8_lossy(&pip.stderr));
    }
    python
}

/// A size-capped tmpfs, unmounted when dropped.
pub struct SmallFs(tempfile::TempDir);

impl SmallFs {
    pub fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("a directory to mount on");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the filesystem with a file until it has no room left; answers the file.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.path().join("ballast");
        let mut file = std::fs::File::create(&path).expect("creating the ballast");
        let chunk = vec![0xa5u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        // The last partial block too.
        while file.write(&[0xa5]).is_ok_and(|n| n == 1) {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).output();
    }
}
