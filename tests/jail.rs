//! The native jailer, attacked: real programs (the system's shell and Python,
//! and C programs compiled here with `cc`) run in the jail, each checked for
//! its exact status and for the host afterwards.
//!
//! These need root (namespaces, cgroups). Without it they skip loudly, unless
//! `IMAGENTX_REQUIRE_PRIVILEGED_TESTS=1` (set by `.ci/run`) makes that a failure.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imagentx_sandbox::jail::{ExtraBind, Jail, JailConfig};
use imagentx_sandbox::policy::UserId;
use imagentx_sandbox::report::{ExecutionReport, Status};
use imagentx_sandbox::runner::{NativeTool, Sandbox, ToolCall};
use imagentx_sandbox::volume::VolumeSpace;
use tokio_util::sync::CancellationToken;

struct Setup {
    jail: Arc<Jail>,
    /// Compiled test programs, on the host.
    bin: PathBuf,
}

/// Where the test programs are inside the jail.
const BIN_INSIDE: &str = "/opt/imagentx-tests";

fn bind_test_programs(config: &mut JailConfig, bin: &Path) {
    // Bound elsewhere than their host path: a clone of the repository may
    // live under /tmp, which the jail replaces with its own.
    config.binds.push(ExtraBind { source: bin.to_owned(), target: BIN_INSIDE.into() });
}

fn compile(bin: &Path, name: &str) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/native").join(format!("{name}.c"));
    let out = Command::new("cc").args(["-O1", "-o"]).arg(bin.join(name)).arg(&source).output().expect("running cc");
    assert!(out.status.success(), "cc {}: {}", source.display(), String::from_utf8_lossy(&out.stderr));
}

/// The shared jail, or `None` (after a loud message) when this process may
/// not make one.
fn setup() -> Option<&'static Setup> {
    static SETUP: OnceLock<Option<Setup>> = OnceLock::new();
    SETUP
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                common::skip_unprivileged("the native jail tests");
                return None;
            }
            let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jail-bin-{}", std::process::id()));
            std::fs::create_dir_all(&bin).expect("bin dir");
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            for name in ["syscalls", "forkbomb", "spin", "daemon", "whoami"] {
                compile(&bin, name);
            }
            // A setuid-root copy: the jail must make it worthless.
            std::fs::copy(bin.join("whoami"), bin.join("whoami-setuid")).expect("copy");
            std::fs::set_permissions(bin.join("whoami-setuid"), std::fs::Permissions::from_mode(0o4755))
                .expect("setuid");
            let mut config = JailConfig::default();
            bind_test_programs(&mut config, &bin);
            let jail = Jail::new(config).expect("the jail should work on this host (root)");
            Some(Setup { jail: Arc::new(jail), bin })
        })
        .as_ref()
}

/// Skips the test (after `setup`'s message) when the jail is unavailable.
macro_rules! setup_or_skip {
    () => {
        match setup() {
            Some(s) => s,
            None => return,
        }
    };
}

struct Call<'a> {
    argv: Vec<String>,
    user: &'a str,
    tier: &'a str,
    input: &'a str,
    timeout: Option<Duration>,
}

fn call(argv: &[&str]) -> Call<'static> {
    Call {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        user: "alice",
        tier: "standard",
        input: "",
        timeout: Some(Duration::from_secs(10)),
    }
}

impl Call<'_> {
    async fn run(&self, sb: &Sandbox, setup: &Setup) -> ExecutionReport {
        let tool =
            NativeTool { name: "test".into(), argv: self.argv.clone(), env: BTreeMap::new(), layout: None, warm: None };
        self.run_tool(sb, setup, &tool, None).await
    }

    async fn run_tool(
        &self,
        sb: &Sandbox,
        setup: &Setup,
        tool: &NativeTool,
        cancel: Option<&CancellationToken>,
    ) -> ExecutionReport {
        let call = ToolCall {
            user: UserId::new(self.user).unwrap(),
            tier: self.tier.into(),
            input: self.input.as_bytes().to_vec(),
            args: Vec::new(),
            timeout: self.timeout,
        };
        let report = sb.run_native_cancellable(Ok(&setup.jail), tool, &call, cancel).await;
        // Whatever happened, the run's cgroup is gone afterwards.
        for dir in setup.jail.cgroup_paths(&report.id, self.user) {
            assert!(!dir.exists(), "cgroup {} left behind", dir.display());
        }
        report
    }
}

fn sh(script: &str) -> Call<'static> {
    call(&["/bin/sh", "-c", script])
}

fn bin(_setup: &Setup, name: &str) -> String {
    format!("{BIN_INSIDE}/{name}")
}

#[track_caller]
fn assert_status(report: &ExecutionReport, status: Status) {
    assert_eq!(report.status, status, "report: {}", serde_json::to_string_pretty(report).unwrap());
}

/// Host processes whose command line contains `marker`.
fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

#[tokio::test]
async fn a_program_reads_its_input_and_answers_json_with_usage_from_the_cgroup() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let mut c = call(&[
        "/usr/bin/python3",
        "-c",
        "import json,sys; d=json.load(sys.stdin); print(json.dumps({'sq': d['n']**2}))",
    ]);
    c.input = r#"{"n": 12}"#;
    let report = c.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!({"sq": 144})));
    assert_eq!(report.exit_code, Some(0));
    assert_eq!(serde_json::to_value(report.runtime).unwrap(), "native");
    assert!(report.tool_sha256.is_none());
    let usage = &report.usage;
    assert!(usage.cpu_ms.is_some_and(|c| c > 0.0), "{usage:?}");
    assert!(usage.peak_memory_bytes.is_some_and(|m| m > 1 << 20), "{usage:?}");
    assert!(usage.peak_processes.is_some_and(|p| p >= 1), "{usage:?}");
    assert!(usage.fuel_consumed.is_none());

    // A non-zero exit is a tool error with its code; stdout stays text.
    let report = sh("echo not json; echo oops >&2; exit 3").run(&sb, setup).await;
    assert_status(&report, Status::ToolError);
    assert_eq!(report.exit_code, Some(3));
    assert_eq!(report.stdout, "not json\n");
    assert_eq!(report.stderr, "oops\n");

    // A program that is not there is an invalid tool, not a crash.
    let report = call(&["/usr/bin/no-such-program"]).run(&sb, setup).await;
    assert_status(&report, Status::InvalidTool);
}

#[tokio::test]
async fn the_jail_is_nobody_on_host_sandbox_without_capabilities_or_host_environment() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let script = "id -u; id -g; hostname; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
                  grep NoNewPrivs /proc/self/status; grep Seccomp: /proc/self/status; env | sort";
    let report = sh(script).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    let lines: Vec<&str> = report.stdout.lines().collect();
    assert_eq!(&lines[..3], ["65534", "65534", "sandbox"], "{}", report.stdout);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(report.stdout.contains(&format!("{cap}:\t0000000000000000")), "{cap}: {}", report.stdout);
    }
    assert!(report.stdout.contains("NoNewPrivs:\t1"), "{}", report.stdout);
    assert!(report.stdout.contains("Seccomp:\t2"), "{}", report.stdout);
    // Only the jail's own variables (sh adds PWD, SHLVL and _).
    let env: Vec<&str> = lines[3..].iter().filter(|l| l.contains('=') && !l.starts_with("Cap")).copied().collect();
    let names: Vec<&str> = env.iter().map(|l| l.split('=').next().unwrap()).collect();
    for name in &names {
        assert!(["HOME", "LANG", "PATH", "TMPDIR", "PWD", "SHLVL", "_"].contains(name), "host variable leaked: {name}");
    }
    assert!(std::env::var_os("CARGO").is_some() && !names.contains(&"CARGO"));
}

#[tokio::test]
async fn host_files_are_absent_and_the_system_is_read_only() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let script = "cat /etc/shadow; echo shadow=$?; ls /root; echo root=$?; ls /home; echo home=$?; \
                  ls /sys; echo sys=$?; touch /usr/pwned; echo usr=$?; touch /etc/pwned; echo etc=$?; \
                  touch /pwned; echo rootfs=$?; echo x > /dev/null; echo devnull=$?; \
                  mkdir /proc/x; echo proc=$?";
    let report = sh(script).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    for expected in ["shadow=1", "root=2", "home=2", "sys=2", "usr=1", "etc=1", "rootfs=1", "devnull=0", "proc=1"] {
        assert!(report.stdout.contains(expected), "{expected} missing from:\n{}\n{}", report.stdout, report.stderr);
    }
    assert!(report.stderr.contains("Read-only file system"), "{}", report.stderr);
    assert!(!Path::new("/usr/pwned").exists() && !Path::new("/etc/pwned").exists());
}

#[tokio::test]
async fn files_written_to_tmp_or_data_do_not_execute() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let script = "cp /bin/true /tmp/t && chmod +x /tmp/t && /tmp/t; echo tmp=$?; \
                  cp /bin/true /data/t && chmod +x /data/t && /data/t; echo data=$?; \
                  cp /bin/true /var/tmp/t && chmod +x /var/tmp/t && /var/tmp/t; echo vartmp=$?; \
                  cp /bin/true /dev/shm/t && chmod +x /dev/shm/t && /dev/shm/t; echo shm=$?";
    let report = sh(script).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    for expected in ["tmp=126", "data=126", "vartmp=126", "shm=126"] {
        assert!(report.stdout.contains(expected), "{expected}: {}\n{}", report.stdout, report.stderr);
    }
    assert!(report.stderr.contains("Permission denied"), "{}", report.stderr);
}

#[tokio::test]
async fn dangerous_system_calls_are_denied() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let report = call(&[&bin(setup, "syscalls")]).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    let results: BTreeMap<&str, &str> = report.stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    let denied = [
        "ptrace",
        "process_vm_readv",
        "mount",
        "umount",
        "unshare_user",
        "unshare_net",
        "setns",
        "chroot",
        "pivot_root",
        "keyctl",
        "add_key",
        "bpf",
        "io_uring_setup",
        "perf_event_open",
        "userfaultfd",
        "open_tree",
        "fsopen",
        "kexec_load",
        "init_module",
        "open_by_handle_at",
        "socket_vsock",
        "socket_alg",
        "socket_inet",
        "socket_netlink",
        "tiocsti",
        "tiocsti_high",
        "clone_newuser",
        "memfd_exec",
        "personality",
        "x32_getpid",
    ];
    for name in denied {
        assert_eq!(results.get(name), Some(&"EPERM"), "{name}: {}", report.stdout);
    }
    // clone3 is refused as unknown, so C libraries fall back to clone.
    assert_eq!(results.get("clone3"), Some(&"ENOSYS"), "{}", report.stdout);
    for allowed in ["socket_unix", "fork", "getpid"] {
        assert_eq!(results.get(allowed), Some(&"ok"), "{allowed}: {}", report.stdout);
    }
}

#[tokio::test]
async fn the_network_is_unreachable_and_only_loopback_exists() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket\n\
         try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\n\
         except OSError as e:\n    print('refused', e.errno)\n\
         print(open('/proc/net/dev').read())"
    );
    let report = call(&["/usr/bin/python3", "-c", &script]).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(report.stdout.starts_with("refused 1"), "{}", report.stdout);
    // The network namespace has loopback and nothing else.
    let interfaces: Vec<&str> =
        report.stdout.lines().skip(3).filter_map(|l| l.trim().split(':').next()).filter(|n| !n.is_empty()).collect();
    assert_eq!(interfaces, ["lo"], "{}", report.stdout);
    // Nothing reached the host's listener.
    assert!(listener.accept().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock));
}

#[tokio::test]
async fn proc_shows_only_the_jail_and_leaked_descriptors_are_closed() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    // A descriptor without close-on-exec, leaked into this (the server's) process.
    let leaked = std::fs::File::open("/etc/hostname").unwrap();
    let leaked_fd = nix::unistd::dup(&leaked).unwrap();
    let report =
        sh("ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; ls /proc/self/fd | tr '\\n' ' '").run(&sb, setup).await;
    drop(leaked_fd);
    assert_status(&report, Status::Ok);
    let mut lines = report.stdout.lines();
    let pids: Vec<u32> = lines.next().unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    // sh, ls, grep, tr: the jail's own few, never pid 1 (the jail's init, hidden)
    // nor the host's.
    assert!(!pids.is_empty() && pids.iter().all(|&p| (2..20).contains(&p)), "pids: {pids:?}");
    let fds: Vec<u32> = lines.next().unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(fds, [0, 1, 2, 3], "only stdio and ls's own directory: {fds:?}");
}

#[tokio::test]
async fn a_fork_bomb_hits_the_pids_limit_and_a_few_processes_are_fine() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let mut bomb = call(&[&bin(setup, "forkbomb")]);
    bomb.tier = "free";
    bomb.timeout = Some(Duration::from_secs(2));
    let report = bomb.run(&sb, setup).await;
    assert_status(&report, Status::PidsLimit);
    // Free tier: 25 processes.
    assert!(report.usage.peak_processes.is_some_and(|p| p <= 25), "{:?}", report.usage);
    // The host can still fork.
    assert!(Command::new("/bin/true").status().unwrap().success());

    let mut few = sh("for i in 1 2 3 4 5 6 7 8; do sleep 0.2 & done; wait; echo '{\"done\": true}'");
    few.tier = "free";
    let report = few.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(report.usage.peak_processes.is_some_and(|p| p >= 9), "{:?}", report.usage);
}

/// SECURITY.md, "CPU between users": a run's CPU cgroup lies under its
/// owner's, so the kernel shares contended cores between users first.
#[tokio::test]
async fn runs_share_the_cpu_under_their_owners_cgroup() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let mut run = sh("echo '{}'");
    run.user = "carol";
    let report = run.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    let owners: Vec<_> =
        setup.jail.cgroup_paths(&report.id, "carol").iter().filter_map(|d| d.parent().map(Path::to_owned)).collect();
    let carol = owners.iter().find(|d| d.ends_with("owner-carol")).expect("no owner cgroup in the run's path");
    assert!(carol.is_dir(), "{} was not made", carol.display());
}

/// SECURITY.md, "Silent limits": a tool whose forks were refused at
/// `pids.max` but that then exits 0 is `ok`, and the report says so.
#[tokio::test]
async fn a_tool_that_survives_the_pids_limit_is_ok_and_the_report_names_the_limit() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let mut survivor = call(&[
        "/usr/bin/python3",
        "-c",
        "import os, time
n = 0
for _ in range(40):
    try:
        if os.fork() == 0:
            time.sleep(0.3)
            os._exit(0)
        n += 1
    except OSError:
        pass
while n:
    os.wait()
    n -= 1
print('{\"survived\": true}')",
    ]);
    survivor.tier = "free";
    let report = survivor.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.usage.limits_hit, ["pids"], "{:?}", report.usage);
    // Under the limit, nothing is listed.
    let mut few = sh("sleep 0.1 & wait; echo '{}'");
    few.tier = "free";
    let report = few.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(report.usage.limits_hit.is_empty(), "{:?}", report.usage);
}

#[tokio::test]
async fn a_memory_bomb_is_killed_for_memory_and_a_modest_program_is_not() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let grab = |mib: u32| {
        let mut c = call(&[
            "/usr/bin/python3",
            "-c",
            &format!("b = [bytearray(1 << 20) for _ in range({mib})]; print('{{\"held\": %d}}' % len(b))"),
        ]);
        c.tier = "free";
        c
    };
    // This process (the server) holds far more memory than the jail may: the
    // OOM killer must still pick the bomb, never the jail's init, which
    // shares this process's memory and whose death would take it along.
    let ballast = vec![7u8; 768 << 20];
    let report = grab(1024).run(&sb, setup).await;
    assert_status(&report, Status::MemoryLimit);
    assert_eq!(std::hint::black_box(&ballast)[12345], 7);
    assert!(report.error.as_deref().unwrap().contains("268435456"), "{:?}", report.error);
    let report = grab(64).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!({"held": 64})));
    assert!(report.usage.peak_memory_bytes.is_some_and(|m| m > 64 << 20 && m < 256 << 20), "{:?}", report.usage);
}

#[tokio::test]
async fn a_cpu_spin_is_stopped_and_short_work_finishes() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let mut spin = call(&[&bin(setup, "spin")]);
    spin.tier = "premium";
    spin.timeout = Some(Duration::from_millis(800));
    let report = spin.run(&sb, setup).await;
    assert!(matches!(report.status, Status::CpuLimit | Status::Timeout), "{report:?}");
    assert!(report.usage.wall_ms < 3000.0, "{:?}", report.usage);
    // The tier's share holds: at most a quarter of a core on free.
    let mut spin = call(&[&bin(setup, "spin")]);
    spin.tier = "free";
    spin.timeout = Some(Duration::from_millis(1000));
    let report = spin.run(&sb, setup).await;
    assert!(matches!(report.status, Status::CpuLimit | Status::Timeout), "{report:?}");
    let cpu = report.usage.cpu_ms.unwrap();
    assert!(cpu < 450.0, "free tier used {cpu} ms of CPU in one second");

    let report = call(&["/usr/bin/python3", "-c", "print(sum(range(100000)))"]).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!(4999950000u64)));
}

#[tokio::test]
async fn a_double_forked_daemon_dies_with_the_run() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let marker = format!("imagentx-daemon-{}", std::process::id());
    let report = call(&[&bin(setup, "daemon"), &marker]).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!({"daemonized": true})));
    assert!(host_processes_with(&marker).is_empty(), "the daemon survived: {:?}", host_processes_with(&marker));

    // Also when the run is stopped by its deadline while the daemon sleeps.
    let mut c = sh(&format!("{} {marker}; sleep 30", bin(setup, "daemon")));
    c.timeout = Some(Duration::from_millis(500));
    let report = c.run(&sb, setup).await;
    assert_status(&report, Status::Timeout);
    assert!(host_processes_with(&marker).is_empty(), "the daemon survived: {:?}", host_processes_with(&marker));
}

#[tokio::test]
async fn tmp_is_capped_and_output_over_the_cap_is_dropped() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let report = sh("dd if=/dev/zero of=/tmp/big bs=1M count=150 2>&1; echo dd=$?; du -m /tmp/big | cut -f1")
        .run(&sb, setup)
        .await;
    assert_status(&report, Status::Ok);
    assert!(report.stdout.contains("No space left on device"), "{}", report.stdout);
    assert!(report.stdout.contains("dd=1"), "{}", report.stdout);
    let kept: u64 = report.stdout.lines().last().unwrap().trim().parse().unwrap();
    assert!((90..=100).contains(&kept), "{kept} MiB in /tmp");
    // 50 MiB fit.
    let report =
        sh("dd if=/dev/zero of=/tmp/ok bs=1M count=50 2>/dev/null && echo '{\"ok\": true}'").run(&sb, setup).await;
    assert_status(&report, Status::Ok);

    let report = sh("head -c 3000000 /dev/zero | tr '\\0' x").run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(report.truncated.stdout);
    assert_eq!(report.stdout.len(), 1 << 20);
}

#[tokio::test]
async fn a_setuid_binary_gives_no_privilege() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let report = call(&[&bin(setup, "whoami-setuid")]).run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!({"uid": 65534, "euid": 65534})));
    // su is setuid root on the host: here it cannot switch.
    let report = sh("su -c id root </dev/null; echo su=$?").run(&sb, setup).await;
    assert!(!report.stdout.contains("uid=0"), "{}", report.stdout);
}

#[tokio::test]
async fn users_see_only_their_own_data_and_it_persists() {
    let setup = setup_or_skip!();
    let (sb, dir) = common::sandbox();
    let mut write = sh("echo secret > /data/note && echo '{\"written\": true}'");
    write.user = "alice";
    assert_status(&write.run(&sb, setup).await, Status::Ok);
    let mut peek = sh("ls -A /data; find / -name note 2>/dev/null; echo end");
    peek.user = "bob";
    // A walk of the whole root (all of /usr): seconds on a loaded machine.
    peek.timeout = Some(Duration::from_secs(30));
    let report = peek.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.stdout, "end\n", "bob saw: {}", report.stdout);
    let mut read = sh("cat /data/note");
    read.user = "alice";
    let report = read.run(&sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.stdout, "secret\n");
    // On the host the file is in alice's directory, owned by the jail's id.
    let note = dir.path().join("users/alice/note");
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "secret\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&note).unwrap().uid(), 65534);
}

mod server;

fn native_spec(name: &str, argv: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "runtime": "native",
        "name": name,
        "description": "a native test tool",
        "argv": argv,
        "input_schema": {"type": "object"},
    })
}

#[tokio::test]
async fn admins_register_native_tools_and_users_invoke_them_over_http() {
    use hyper::{Method, StatusCode};
    let setup = setup_or_skip!();
    let srv = server::TestServer::start_with(imagentx_sandbox::policy::Policy::default(), |s| {
        bind_test_programs(&mut s.jail, &setup.bin);
    })
    .await;
    assert_eq!(srv.get("/readyz", "").await.json()["native_tools"], "available");
    let json = [("content-type", "application/json")];
    let register = async |key: &str, body: serde_json::Value| {
        srv.request_with(Method::POST, "/v1/tools", Some(key), body.to_string(), &json).await
    };
    let square = "import json,sys; d=json.load(sys.stdin); print(json.dumps({'sq': d['n']**2}))";
    let answer = register(&srv.admin, native_spec("square", &["/usr/bin/python3", "-c", square])).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.json()["kind"], "native");
    assert_eq!(answer.json()["version"], 1);

    // Client mistakes: each a 400 with a reason, nothing registered.
    let user = srv.add_user("carol", "free", false).await;
    let mut wrong_runtime = native_spec("x", &["/bin/true"]);
    wrong_runtime["runtime"] = "wasm".into();
    let mut bad_env = native_spec("x", &["/bin/true"]);
    bad_env["env_allow"] = serde_json::json!(["NOT-A-NAME"]);
    let mut relative_rootfs = native_spec("x", &["/bin/true"]);
    relative_rootfs["rootfs"] = "srv/root".into();
    let mut missing_rootfs = native_spec("x", &["/bin/true"]);
    missing_rootfs["rootfs"] = "/no/such/rootfs".into();
    let mut unknown_field = native_spec("x", &["/bin/true"]);
    unknown_field["privileged"] = true.into();
    for (body, code) in [
        (wrong_runtime, "invalid_tool"),
        (native_spec("x", &[]), "invalid_tool"),
        (bad_env, "invalid_tool"),
        (relative_rootfs, "invalid_tool"),
        (missing_rootfs, "invalid_tool"),
        (native_spec("bad name", &["/bin/true"]), "bad_tool_name"),
        (unknown_field, "bad_json"),
    ] {
        let answer = register(&srv.admin, body.clone()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}: {}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.error_code(), code, "{body}");
    }
    let answer = srv.request_with(Method::POST, "/v1/tools", Some(&srv.admin), "{not json", &json).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = register(&user, native_spec("mine", &["/bin/true"])).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let listed = srv.get("/v1/tools", &user).await.json();
    let names: Vec<&str> = listed["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["square"]);

    let invoke = async |tool: &str, body: &str| {
        srv.request(Method::POST, &format!("/v1/tools/{tool}/invoke"), Some(&user), body.to_owned()).await
    };
    let report = invoke("square", r#"{"input": {"n": 7}}"#).await.json();
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(report["runtime"], "native");
    assert_eq!(report["output"], serde_json::json!({"sq": 49}));
    assert!(report["tool_sha256"].is_null());
    let id = report["id"].as_str().unwrap();
    assert_eq!(srv.get(&format!("/v1/executions/{id}"), &user).await.json()["status"], "ok");

    // A file the user uploads through the files API is the native tool's to change.
    let answer = srv.request(Method::PUT, "/v1/files/notes/in.txt", Some(&user), "line 1\n").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    let uploaded = std::fs::metadata(srv.dir.path().join("users/carol/notes/in.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((uploaded.mode() & 0o777, uploaded.uid(), uploaded.gid()), (0o644, 65534, 65534));
    let appender =
        native_spec("append", &["/bin/sh", "-c", "echo line 2 >> /data/notes/in.txt && touch /data/notes/new"]);
    assert_eq!(register(&srv.admin, appender).await.status, StatusCode::CREATED);
    let report = invoke("append", "{}").await.json();
    assert_eq!(report["status"], "ok", "{report}");
    let content = srv.get("/v1/files/notes/in.txt", &user).await;
    assert_eq!(String::from_utf8_lossy(&content.body), "line 1\nline 2\n");

    // A hostile native tool is stopped with its status, and the server keeps serving.
    let forkbomb = bin(setup, "forkbomb");
    let answer = register(&srv.admin, native_spec("bomb", &[&forkbomb])).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let report = invoke("bomb", r#"{"timeout_ms": 1500}"#).await.json();
    assert_eq!(report["status"], "pids_limit", "{report}");
    let report = invoke("square", r#"{"input": {"n": 3}}"#).await.json();
    assert_eq!(report["output"], serde_json::json!({"sq": 9}));

    // After a restart the native tools are loaded again from their stored specs.
    let dir = srv.stop_keeping_data().await;
    let mut settings = imagentx_sandbox::api::ServerSettings {
        data_dir: dir.path().to_owned(),
        max_instances: 8,
        ..Default::default()
    };
    bind_test_programs(&mut settings.jail, &setup.bin);
    let srv = server::TestServer::start_in(dir, imagentx_sandbox::policy::Policy::default(), settings).await;
    let user = srv.add_user("dave", "standard", false).await;
    let answer =
        srv.request(Method::POST, "/v1/tools/square/invoke", Some(&user), r#"{"input": {"n": 5}}"#.to_owned()).await;
    assert_eq!(answer.json()["output"], serde_json::json!({"sq": 25}), "{}", String::from_utf8_lossy(&answer.body));
}

#[test]
fn the_command_line_runs_native_programs() {
    let _setup = setup_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], input: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"));
        command.args(["run", "--native", "--data-dir"]).arg(dir.path()).args(args);
        let out = common::output_with_stdin(&mut command, input);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), report)
    };
    let (code, report) = run(&["--tier", "free", "--", "/bin/sh", "-c", "cat; echo"], r#"{"echo": [1, 2]}"#);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["runtime"], "native");
    assert_eq!(report["tier"], "free");
    assert_eq!(report["output"], serde_json::json!({"echo": [1, 2]}));
    let (code, report) = run(&["--", "/bin/sh", "-c", "exit 4"], "");
    assert_eq!(code, Some(1));
    assert_eq!(report["status"], "tool_error");
    assert_eq!(report["exit_code"], 4);
    let (code, report) = run(&["--timeout-ms", "300", "--", "/bin/sleep", "5"], "");
    assert_eq!(code, Some(1));
    assert_eq!(report["status"], "timeout");
}

#[tokio::test]
async fn a_tool_with_its_own_rootfs_sees_that_and_not_the_host_system() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    // A tiny root: one statically linked program in bin/.
    let rootfs = tempfile::tempdir().unwrap();
    std::fs::create_dir(rootfs.path().join("bin")).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/native/whoami.c");
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(rootfs.path().join("bin/whoami"))
        .arg(&source)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc -static: {}", String::from_utf8_lossy(&out.stderr));
    let layout = imagentx_sandbox::jail::Layout::rootfs(rootfs.path()).unwrap();
    let tool = NativeTool {
        name: "mini".into(),
        argv: vec!["/bin/whoami".into()],
        env: BTreeMap::new(),
        layout: Some(Arc::new(layout)),
        warm: None,
    };
    let call = ToolCall {
        user: UserId::new("alice").unwrap(),
        tier: "standard".into(),
        input: Vec::new(),
        args: Vec::new(),
        timeout: Some(Duration::from_secs(10)),
    };
    let report = sb.run_native(Ok(&setup.jail), &tool, &call).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!({"uid": 65534, "euid": 65534})));
    // The host's programs are not in this root.
    let tool = NativeTool { argv: vec!["/usr/bin/python3".into(), "-c".into(), "1".into()], ..tool };
    let report = sb.run_native(Ok(&setup.jail), &tool, &call).await;
    assert_status(&report, Status::InvalidTool);
}

// ---- /data of native tools: the user's own volume (src/volume.rs) ----

const MIB: u64 = 1 << 20;
const VOL_QUOTA: u64 = 16 * MIB;
const VOL_FILES: u64 = 100;
/// What an image may take on the host's disk beyond the files in it: the
/// journal (4 MiB at these sizes) and the metadata written.
const VOL_OVERHEAD: u64 = 6 * MIB;

/// A sandbox whose users' directories are volumes. Fields drop in order: the
/// sandbox (unmounting the volumes) before its data directory.
struct Volumed {
    sb: Sandbox,
    dir: tempfile::TempDir,
}

/// With tiers `small` and `larger` (see [`volume_policy`]).
fn volumed() -> Volumed {
    volumed_in(tempfile::tempdir().unwrap(), VolumeSpace::Sparse)
}

/// Volumes in `dir`, sparse or reserved on its filesystem.
fn volumed_in(dir: tempfile::TempDir, space: VolumeSpace) -> Volumed {
    use imagentx_sandbox::data_dir::DataDir;
    use imagentx_sandbox::volume::VolumeMode;
    let data_dir = DataDir::open_with_volumes(dir.path(), VolumeMode::Ext4Image, space).expect("volumes, as root");
    Volumed { sb: Sandbox { policy: volume_policy(), engine: common::engine(), data_dir }, dir }
}

/// Tiers `small` (16 MiB, 100 files) and `larger` (three times that).
fn volume_policy() -> imagentx_sandbox::policy::Policy {
    let mut policy = imagentx_sandbox::policy::Policy::default();
    let mut small = policy.tiers["free"].clone();
    small.data_quota_bytes = VOL_QUOTA;
    small.data_files = VOL_FILES;
    small.concurrent_calls = 8;
    let mut larger = small.clone();
    larger.data_quota_bytes = 3 * VOL_QUOTA;
    larger.data_files = 3 * VOL_FILES;
    policy.tiers.insert("small".into(), small);
    policy.tiers.insert("larger".into(), larger);
    policy
}

impl Drop for Volumed {
    /// Unmounted now, before the data directory is removed: a walk of a
    /// user's directory after a call may still hold the sandbox's data
    /// directory, and must not mount anything again.
    fn drop(&mut self) {
        if let Some(volumes) = self.sb.data_dir.volumes() {
            volumes.unmount_all();
        }
    }
}

impl Volumed {
    fn home(&self, user: &str) -> PathBuf {
        self.dir.path().join("users").join(user)
    }

    /// Bytes the user's image takes on the host's disk.
    fn host_bytes(&self, user: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.dir.path().join(format!("volumes/{user}.ext4"))).unwrap().blocks() * 512
    }

    /// Apparent bytes of the files in the user's directory.
    fn held(&self, user: &str) -> u64 {
        fn walk(dir: &Path) -> u64 {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let meta = e.metadata().unwrap();
                    if meta.is_dir() { walk(&e.path()) } else { meta.len() }
                })
                .sum()
        }
        walk(&self.home(user))
    }
}

fn small(mut call: Call<'static>, user: &'static str) -> Call<'static> {
    call.tier = "small";
    call.user = user;
    call
}

/// The attack found open: fifteen files of 99 MB in a loop. Each `dd` stops
/// at the volume's end; nothing past the quota reaches the host's disk.
#[tokio::test]
async fn a_native_tool_writing_many_large_files_stops_at_the_quota() {
    let setup = setup_or_skip!();
    let v = volumed();
    let script = "for i in $(seq 15); do dd if=/dev/zero of=/data/big$i bs=1M count=99 2>/dev/null; done; \
                  df -B1 /data >&2; echo '{\"done\": true}'";
    let report = small(sh(script), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(
        report.usage.limits_hit.contains(&"data_quota".to_owned()),
        "{:?} {}",
        report.usage.limits_hit,
        report.stderr
    );
    // To the quota, and at most a megabyte past it (ext4's last blocks: src/volume.rs).
    let held = v.held("alice");
    assert!((VOL_QUOTA..=VOL_QUOTA + MIB).contains(&held), "alice's files hold {held} bytes");
    let on_host = v.host_bytes("alice");
    assert!(on_host <= VOL_QUOTA + MIB + VOL_OVERHEAD, "the image takes {on_host} bytes of the host's disk");
    // The kernel's count of what the run wrote: the quota, give or take a block.
    let written = report.usage.bytes_written.expect("native runs count their writes");
    assert!((VOL_QUOTA..=VOL_QUOTA + 2 * MIB).contains(&written), "bytes_written {written}");

    // The next call works: room made, then used again.
    let report = small(
        sh("rm /data/big*; dd if=/dev/zero of=/data/again bs=1M count=8 2>/dev/null; ls -l /data >&2; echo '{}'"),
        "alice",
    )
    .run(&v.sb, setup)
    .await;
    assert_status(&report, Status::Ok);
    assert!(report.usage.limits_hit.is_empty(), "{:?}", report.usage.limits_hit);
    assert_eq!(v.held("alice"), 8 * MIB, "{}", report.stderr);
    // Gone with the sandbox: no mount left behind.
    let home = v.dir.path().to_owned();
    assert_eq!(common::mounts_under(&home), 1);
    drop(v);
    assert_eq!(common::mounts_under(&home), 0, "a volume is still mounted");
}

/// The tool catches the refusal (ENOSPC), answers, and other users are
/// untouched; a second call of the same user at once shares the one quota.
#[tokio::test]
async fn a_tool_that_catches_enospc_answers_and_concurrent_calls_share_the_quota() {
    let setup = setup_or_skip!();
    let v = volumed();
    let fill = "import errno, json, sys\nn = 0\ntry:\n    with open('/data/' + sys.argv[1], 'wb') as f:\n        \
                while True:\n            f.write(bytes(1 << 20))\n            n += 1\nexcept OSError as e:\n    \
                print(json.dumps({'errno': errno.errorcode[e.errno], 'mib': n}))\n";
    let one = small(call(&["/usr/bin/python3", "-c", fill, "one"]), "alice");
    let two = small(call(&["/usr/bin/python3", "-c", fill, "two"]), "alice");
    let bystander = small(sh("dd if=/dev/zero of=/data/b bs=1M count=12 2>/dev/null && echo '{}'"), "bob");
    let (a, b, c) = tokio::join!(one.run(&v.sb, setup), two.run(&v.sb, setup), bystander.run(&v.sb, setup));
    for report in [&a, &b] {
        assert_status(report, Status::Ok);
        assert_eq!(report.output.as_ref().unwrap()["errno"], "ENOSPC", "{:?}", report.output);
        assert!(report.usage.limits_hit.contains(&"data_quota".to_owned()), "{:?}", report.usage.limits_hit);
    }
    let mib = |r: &ExecutionReport| r.output.as_ref().unwrap()["mib"].as_u64().unwrap();
    assert!(mib(&a) + mib(&b) <= 17, "together they wrote {} MiB", mib(&a) + mib(&b));
    assert!(v.held("alice") <= VOL_QUOTA + MIB);
    assert_status(&c, Status::Ok);
    assert!(c.usage.limits_hit.is_empty(), "{:?}", c.usage.limits_hit);
    assert_eq!(v.held("bob"), 12 * MIB);
}

/// Files, directories and links stop at the tier's `data_files`; a byte at
/// 100 GiB and a truncate to 100 GiB are refused; the host's disk is untouched.
#[tokio::test]
async fn a_native_tool_stops_at_the_file_cap_and_cannot_make_huge_sparse_files() {
    let setup = setup_or_skip!();
    let v = volumed();
    let script = "i=0; while touch /data/f$i 2>/dev/null; do i=$((i+1)); [ $i -ge 100000 ] && break; done; \
                  echo \"{\\\"made\\\": $i}\"";
    let report = small(sh(script), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    let made = report.output.as_ref().unwrap()["made"].as_u64().unwrap();
    // ext4 rounds its inodes up to whole inode-table blocks (16 each).
    assert!((VOL_FILES - 10..=VOL_FILES + 16).contains(&made), "made {made} files");
    assert!(report.usage.limits_hit.contains(&"data_files".to_owned()), "{:?}", report.usage.limits_hit);

    let script = "rm -f /data/f*; dd if=/dev/zero of=/data/sparse bs=1 count=1 seek=100G 2>/dev/null; echo dd=$?; \
                  truncate -s 100G /data/t 2>/dev/null; echo truncate=$?; ls -ls /data";
    let report = small(sh(script), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(!report.stdout.contains("dd=0") && !report.stdout.contains("truncate=0"), "{}", report.stdout);
    assert!(v.held("alice") <= VOL_QUOTA + MIB, "{}", report.stdout);
    assert!(v.host_bytes("alice") <= VOL_OVERHEAD);
}

/// Files in a user's plain directory (from before volumes) move into the
/// volume at its first use; an idle volume is unmounted and comes back with
/// its files; a larger tier grows it at its next mount.
#[tokio::test]
async fn plain_files_move_into_the_volume_which_idles_out_and_grows_with_the_tier() {
    let setup = setup_or_skip!();
    let v = volumed();
    std::fs::create_dir_all(v.home("carol").join("notes")).unwrap();
    std::fs::write(v.home("carol").join("notes/a.txt"), "kept").unwrap();
    let report = small(sh("cat /data/notes/a.txt"), "carol").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.stdout, "kept");
    // Idle: unmounted (once the walk that follows a call lets go of it), and
    // nothing was left under the mount point.
    let volumes = v.sb.data_dir.volumes().unwrap();
    let mut tries = 0;
    while volumes.unmount_idle(Duration::ZERO) == 0 || std::fs::read_dir(v.home("carol")).unwrap().count() > 0 {
        tries += 1;
        assert!(tries < 500, "never unmounted, or plain files left under the mount point");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The larger tier: all of its quota is the tool's (resize2fs's lost
    // metadata figure is counted again), and no lost+found appears.
    let script = "df -B1 /data >&2; dd if=/dev/zero of=/data/big bs=1M count=60 2>/dev/null; ls -A /data";
    let mut big = sh(script);
    big.user = "carol";
    big.tier = "larger";
    let report = big.run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.stdout, "big\nnotes\n", "{}", report.stderr);
    assert!(report.usage.limits_hit.contains(&"data_quota".to_owned()), "{:?}", report.usage.limits_hit);
    let held = v.held("carol");
    assert!((3 * VOL_QUOTA..=3 * VOL_QUOTA + MIB).contains(&held), "carol holds {held}: {}", report.stderr);
}

/// Whether the filesystem at `dir` refuses writes (`EROFS`: ext4 after an
/// error, `emergency_ro` on 6.x kernels, which statvfs does not show).
fn refuses_writes(dir: &Path) -> bool {
    let probe = dir.join(".probe");
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            std::fs::remove_file(probe).unwrap();
            false
        }
        Err(e) => e.raw_os_error() == Some(libc::EROFS),
    }
}

/// `e2fsck -f -n` of a user's unmounted image: whether it is clean.
fn image_is_clean(v: &Volumed, user: &str) -> bool {
    v.sb.data_dir.volumes().unwrap().unmount_all();
    let image = v.dir.path().join(format!("volumes/{user}.ext4"));
    let out = Command::new("e2fsck").args(["-f", "-n"]).arg(&image).output().unwrap();
    eprintln!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out.status.success()
}

/// The host's disk fills under sparse volumes (the default): a tool's
/// synced write fails, and a volume whose journal cannot be written turns
/// read-only. Whether the kernel's journal hits an unallocated block of the
/// image depends on which it had written before, so the test then makes
/// sure of it the kernel's way (`remount,abort`). Once space is back, the
/// user's next call finds the volume checked (`e2fsck`) and mounted again:
/// writable, the file synced before the fault whole. A sparse volume gives
/// the host back the blocks of deleted files.
#[tokio::test]
async fn a_full_host_disk_under_sparse_volumes_fails_writes_then_the_volume_is_repaired() {
    let setup = setup_or_skip!();
    let host = common::SmallFs::new(64 * MIB);
    let v = volumed_in(tempfile::tempdir_in(host.path()).unwrap(), VolumeSpace::Sparse);
    let home = v.home("alice");
    let report = small(sh("printf kept > /data/kept && sync && echo '{}'"), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    let empty = v.host_bytes("alice");
    let report = small(sh("dd if=/dev/zero of=/data/big bs=1M count=12 conv=fsync 2>/dev/null && echo '{}'"), "alice")
        .run(&v.sb, setup)
        .await;
    assert_status(&report, Status::Ok);
    assert!(v.host_bytes("alice") >= empty + 12 * MIB, "{} bytes on the host", v.host_bytes("alice"));
    let report = small(sh("rm /data/big && sync && echo '{}'"), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    // The loop device punches the holes once the journal has committed the delete.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while v.host_bytes("alice") >= empty + MIB {
        assert!(std::time::Instant::now() < deadline, "deleted, yet {} bytes on the host", v.host_bytes("alice"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let ballast = host.fill();
    let script = "dd if=/dev/urandom of=/data/lost bs=1M count=8 conv=fsync 2>/dev/null; echo \"{\\\"dd\\\": $?}\"";
    let report = small(sh(script), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_ne!(report.output.as_ref().unwrap()["dd"], 0, "a synced write succeeded on a full disk: {report:?}");
    if !refuses_writes(&home) {
        let aborted = Command::new("mount").args(["-o", "remount,abort"]).arg(&home).output().unwrap();
        assert!(aborted.status.success(), "{}", String::from_utf8_lossy(&aborted.stderr));
    }
    // The kernel turns it read-only from a work queue: soon, not at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !refuses_writes(&home) {
        assert!(std::time::Instant::now() < deadline, "the volume never turned read-only");
        std::thread::sleep(Duration::from_millis(10));
    }
    // While the disk is full, a call is refused cleanly, never a hang.
    let report = small(sh("echo '{}'"), "alice").run(&v.sb, setup).await;
    assert!(matches!(report.status, Status::Ok | Status::InternalError), "{report:?}");

    std::fs::remove_file(ballast).unwrap();
    let script = "rm -f /data/lost; dd if=/dev/urandom of=/data/again bs=1M count=4 conv=fsync 2>/dev/null && \
                  echo \"{\\\"kept\\\": \\\"$(cat /data/kept)\\\"}\"";
    let report = small(sh(script), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert_eq!(report.output, Some(serde_json::json!({"kept": "kept"})), "{}", report.stderr);
    assert!(!refuses_writes(&home), "the volume was not mounted again");
    assert!(image_is_clean(&v, "alice"), "the image is not clean after the repair");
}

/// Reserved volumes (`data_volume_space = "reserved"`): each image's whole
/// size is allocated on the host's disk, so a tool writes its quota while
/// the disk is full and the data reads back whole; a volume that the disk
/// has no room for is refused, saying so.
#[tokio::test]
async fn reserved_volumes_keep_their_quota_when_the_host_disk_is_full() {
    let setup = setup_or_skip!();
    let host = common::SmallFs::new(48 * MIB);
    let v = volumed_in(tempfile::tempdir_in(host.path()).unwrap(), VolumeSpace::Reserved);
    let report = small(sh("echo '{}'"), "alice").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    assert!(v.host_bytes("alice") >= VOL_QUOTA, "{} bytes reserved", v.host_bytes("alice"));
    // carol's larger tier (48 MiB) does not fit in what is left.
    let mut carol = small(sh("echo '{}'"), "carol");
    carol.tier = "larger";
    let report = carol.run(&v.sb, setup).await;
    assert_status(&report, Status::InternalError);
    let said = report.error.clone().unwrap_or_default();
    assert!(said.contains("no room for your data volume") && !said.contains(host.path().to_str().unwrap()), "{said}");

    let ballast = host.fill();
    let sha = "sha256sum /data/x | cut -c1-64 | sed 's/.*/{\"sha\": \"&\"}/'";
    let script = format!("dd if=/dev/urandom of=/data/x bs=1M count=15 conv=fsync 2>/dev/null && {sha}");
    let written = small(sh(&script), "alice").run(&v.sb, setup).await;
    assert_status(&written, Status::Ok);
    assert!(written.output.as_ref().is_some_and(|o| o["sha"].is_string()), "{}", written.stderr);
    assert!(!refuses_writes(&v.home("alice")));
    // Unmounted (its cache gone with it) and mounted again: what the image holds.
    let volumes = v.sb.data_dir.volumes().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while volumes.unmount_idle(Duration::ZERO) == 0 {
        assert!(std::time::Instant::now() < deadline, "the volume was never idle");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let read = small(sh(sha), "alice").run(&v.sb, setup).await;
    assert_eq!(read.output, written.output, "{}", read.stderr);
    std::fs::remove_file(ballast).unwrap();
    assert!(image_is_clean(&v, "alice"));
}

/// Over HTTP, a reserved volume that the host's disk has no room for: the
/// user's file request and code session are answered 507 `storage_full`,
/// their call's report says why, and a user whose volume fits is served.
#[tokio::test]
async fn over_http_a_volume_the_host_disk_has_no_room_for_is_refused_clearly() {
    use hyper::{Method, StatusCode};
    use imagentx_sandbox::volume::VolumeMode;
    let setup = setup_or_skip!();
    let host = common::SmallFs::new(64 * MIB);
    let dir = tempfile::tempdir_in(host.path()).unwrap();
    let mut settings = imagentx_sandbox::api::ServerSettings {
        data_dir: dir.path().to_owned(),
        max_instances: 8,
        data_volumes: VolumeMode::Ext4Image,
        data_volume_space: VolumeSpace::Reserved,
        ..Default::default()
    };
    bind_test_programs(&mut settings.jail, &setup.bin);
    let srv = server::TestServer::start_in(dir, volume_policy(), settings).await;
    let spec = native_spec("hello", &["/bin/sh", "-c", "echo '{}'"]);
    let json = [("content-type", "application/json")];
    let answer = srv.request_with(Method::POST, "/v1/tools", Some(&srv.admin), spec.to_string(), &json).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&answer.body));
    let erin = srv.add_user("erin", "small", false).await;
    let carol = srv.add_user("carol", "larger", false).await;
    // erin's 16 MiB fit; carol's 48 MiB do not, beside them and the database.
    assert_eq!(srv.request(Method::PUT, "/v1/files/a.txt", Some(&erin), "fits").await.status, StatusCode::OK);
    let refused = srv.request(Method::PUT, "/v1/files/a.txt", Some(&carol), "too big").await;
    assert_eq!(refused.status, StatusCode::INSUFFICIENT_STORAGE, "{}", String::from_utf8_lossy(&refused.body));
    assert_eq!(refused.error_code(), "storage_full");
    let report = srv.request(Method::POST, "/v1/tools/hello/invoke", Some(&carol), "{}").await.json();
    assert_eq!(report["status"], "internal_error", "{report}");
    assert_eq!(report["error"], "the server's disk has no room for your data volume; try again later", "{report}");
    // A code session needs the volume too: 507 as well.
    srv.register("sdk-probe", "sdkp").await;
    let session = srv.request(Method::POST, "/v1/sessions", Some(&carol), r#"{"tool": "sdkp"}"#).await;
    assert_eq!(session.status, StatusCode::INSUFFICIENT_STORAGE, "{}", String::from_utf8_lossy(&session.body));
    let report = srv.request(Method::POST, "/v1/tools/hello/invoke", Some(&erin), "{}").await.json();
    assert_eq!(report["status"], "ok", "{report}");
    srv.assert_healthy().await;
    srv.stop().await;
}

/// One process at a time mounts a data directory's volumes (two mounts of
/// one image corrupt it); a process without volumes does not write into a
/// user's directory whose files are in a volume.
#[tokio::test]
async fn a_second_process_cannot_mount_the_same_volumes_nor_write_under_them() {
    use imagentx_sandbox::data_dir::DataDir;
    use imagentx_sandbox::volume::VolumeMode;
    let setup = setup_or_skip!();
    let v = volumed();
    let report = small(sh("echo kept > /data/a"), "erin").run(&v.sb, setup).await;
    assert_status(&report, Status::Ok);
    for mode in [VolumeMode::Auto, VolumeMode::Ext4Image] {
        let err = DataDir::open_with_volumes(v.dir.path(), mode, VolumeSpace::Sparse).unwrap_err();
        assert!(err.to_string().contains("another imagentx-sandbox process"), "{err}");
    }
    let plain = DataDir::open(v.dir.path()).unwrap();
    let err = plain.user_dir(&UserId::new("erin").unwrap()).unwrap_err();
    assert!(err.to_string().contains("volume"), "{err}");
    assert!(plain.user_dir(&UserId::new("frank").unwrap()).is_ok(), "a user without a volume is plain");
}

/// Over HTTP: a native tool fills the volume; the files API then refuses a
/// `PUT` (one quota for both), `/v1/me` shows the usage, a `DELETE` makes room
/// for the next call, another user is untouched, and `limits_hit` is counted.
#[tokio::test]
async fn over_http_a_native_tool_and_the_files_api_share_the_users_volume() {
    use hyper::{Method, StatusCode};
    let setup = setup_or_skip!();
    let srv = server::TestServer::start_with(volume_policy(), |s| {
        bind_test_programs(&mut s.jail, &setup.bin);
        s.data_volumes = imagentx_sandbox::volume::VolumeMode::Ext4Image;
    })
    .await;
    let json = [("content-type", "application/json")];
    let fill = native_spec(
        "fill",
        &["/bin/sh", "-c", "dd if=/dev/zero of=/data/fill bs=1M count=99 2>/dev/null; echo '{\"done\": true}'"],
    );
    let answer = srv.request_with(Method::POST, "/v1/tools", Some(&srv.admin), fill.to_string(), &json).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&answer.body));
    let erin = srv.add_user("erin", "small", false).await;
    let frank = srv.add_user("frank", "small", false).await;
    let invoke = async |key: &str| srv.request(Method::POST, "/v1/tools/fill/invoke", Some(key), "{}").await.json();

    let report = invoke(&erin).await;
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(report["usage"]["limits_hit"], serde_json::json!(["data_quota"]), "{report}");
    assert!(report["usage"]["bytes_written"].as_u64().unwrap() >= VOL_QUOTA, "{report}");
    // The walk after the call has the ledger agree: PUT refused, usage shown.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let me = srv.get("/v1/me", &erin).await.json();
        if me["data_used_bytes"].as_u64().unwrap() >= VOL_QUOTA {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the usage never showed: {me}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let put = srv.request(Method::PUT, "/v1/files/more.txt", Some(&erin), vec![b'x'; 2 << 20]).await;
    assert_eq!(put.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&put.body));
    // Another user of the same tier is untouched.
    let report = invoke(&frank).await;
    assert_eq!(report["status"], "ok", "{report}");
    // Room made through the files API is the tool's again.
    assert_eq!(srv.request(Method::DELETE, "/v1/files/fill", Some(&erin), "").await.status, StatusCode::OK);
    let report = invoke(&erin).await;
    assert_eq!(report["status"], "ok", "{report}");
    let metrics = String::from_utf8_lossy(&srv.get("/metrics", "").await.body).into_owned();
    assert!(metrics.contains("imagentx_limits_hit_total{limit=\"data_quota\"} 3"), "{metrics}");
    assert!(metrics.contains("imagentx_data_volumes_mounted 2"), "{metrics}");
}

/// Processes whose command line holds `marker`.
fn processes_with(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
        .count()
}

/// A token cancelled `after` from now.
fn cancelled_after(after: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let canceller = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        canceller.cancel();
    });
    token
}

/// A caller's cancellation (MCP's `notifications/cancelled`) kills a native
/// run at once, fresh or warm: status `cancelled`, its processes reaped, its
/// cgroup gone, what it printed kept. A run whose caller does not cancel ends
/// as it would have.
#[tokio::test]
async fn a_cancelled_native_run_is_killed_and_reaped_fresh_or_warm() {
    let setup = setup_or_skip!();
    let (sb, _dir) = common::sandbox();
    let script = "echo started; sleep 31.25 & sleep 31.25; wait";
    let fresh = NativeTool {
        name: "sleeper".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        layout: None,
        warm: None,
    };
    let started = std::time::Instant::now();
    let report = sh(script).run_tool(&sb, setup, &fresh, Some(&cancelled_after(Duration::from_millis(400)))).await;
    assert_eq!(report.status, Status::Cancelled, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "cancelled after {:?}", started.elapsed());
    assert_eq!(report.stdout, "started\n");
    assert_eq!(processes_with("31.25"), 0, "the run's processes outlived its cancellation");
    // Not cancelled (the token is there, it does not fire): the run ends by itself.
    let quick = NativeTool { argv: vec!["/bin/sh".into(), "-c".into(), "echo done".into()], ..fresh.clone() };
    let report = sh("echo done").run_tool(&sb, setup, &quick, Some(&CancellationToken::new())).await;
    assert_eq!((report.status, report.stdout.as_str()), (Status::Ok, "done\n"), "{report:?}");

    // A warm jail: its program says it is ready, then takes its call.
    let limits = sb.policy.resolve("standard", None).unwrap();
    let warm_script = "printf 'imagentx-warm-ready\\n' >&2; read -r limits; echo started; sleep 31.5 & sleep 31.5";
    let spec = imagentx_sandbox::jail::WarmSpec {
        tool: "sleeper".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), warm_script.into()],
        env: imagentx_sandbox::jail::environment(&[]),
        layout: None,
        limits,
    };
    let pool = imagentx_sandbox::jail::WarmPool::new(Arc::clone(&setup.jail), spec, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pool.counts().0 == 0 {
        assert!(std::time::Instant::now() < deadline, "the warm jail never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warm = NativeTool { warm: Some(Arc::clone(&pool)), ..fresh };
    let started = std::time::Instant::now();
    let report = sh(script).run_tool(&sb, setup, &warm, Some(&cancelled_after(Duration::from_millis(400)))).await;
    assert_eq!(report.status, Status::Cancelled, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "cancelled after {:?}", started.elapsed());
    assert_eq!(report.stdout, "started\n", "{report:?}");
    let served = pool.stats.served.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(served, 1, "the call did not run in the warm jail");
    pool.stop(Duration::from_secs(5));
    assert_eq!(processes_with("31.5"), 0, "the warm run's processes outlived its cancellation");
}
