//! What the module targets share: a sandbox as the server has it, under a
//! tight tier, and the checks that must hold whatever the module is.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use imagentx_sandbox::data_dir::DataDir;
use imagentx_sandbox::engine::{Engine, EngineConfig, ToolKind};
use imagentx_sandbox::policy::{Policy, UserId};
use imagentx_sandbox::report::Status;
use imagentx_sandbox::runner::{Sandbox, ToolCall};

/// The fuzz tier: 32 MiB of memory, a 100 ms call.
pub const MEMORY: u64 = 32 << 20;
pub const TIMEOUT: Duration = Duration::from_millis(100);
/// A call may end this much after its deadline (an instance's teardown, a
/// busy machine), never more.
const SLACK: Duration = Duration::from_secs(2);

struct Harness {
    rt: tokio::runtime::Runtime,
    sandbox: Sandbox,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a data directory");
        let mut config = EngineConfig::new(dir.path().join("cache"), MEMORY);
        config.max_instances = 4;
        let engine = Engine::new(&config).expect("the engine");
        let data_dir = DataDir::open(dir.path()).expect("the data directory's layout");
        let mut policy = Policy::default();
        let mut tier = policy.tiers["free"].clone();
        tier.memory_bytes = MEMORY;
        tier.tmp_bytes = 1 << 20;
        tier.data_quota_bytes = 1 << 20;
        tier.data_files = 64;
        tier.nofile_soft = 16;
        policy.tiers.insert("fuzz".into(), tier);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        Harness { rt, sandbox: Sandbox { policy, engine, data_dir }, _dir: dir }
    })
}

/// Loads `bytes` as a tool (any loader error is fine: it must only not
/// panic) and, when it loads, runs it once under the fuzz tier: the call
/// ends by its deadline, stays within its memory, and gives the server's
/// memory and descriptors back. Answers the kind it loaded as and how the
/// call ended, or `None` when it did not load.
pub fn load_and_run(bytes: &[u8]) -> Option<(ToolKind, Status)> {
    let h = harness();
    h.rt.block_on(async {
        let tool = h.sandbox.load(bytes, "fuzz").await.ok()?;
        let call = ToolCall {
            user: UserId::new("fuzz").expect("a user id"),
            tier: "fuzz".into(),
            input: br#"{"n": 1}"#.to_vec(),
            args: Vec::new(),
            timeout: Some(TIMEOUT),
        };
        let started = Instant::now();
        let report = h.sandbox.run(Ok(&tool), &call).await;
        let took = started.elapsed();
        assert!(took < TIMEOUT + SLACK, "the call ran {took:?} with a deadline of {TIMEOUT:?}: {report:?}");
        if let Some(peak) = report.usage.peak_memory_bytes {
            assert!(peak <= MEMORY, "the call held {peak} bytes, over the tier's {MEMORY}: {report:?}");
        }
        let engine = &h.sandbox.engine;
        assert_eq!(engine.guest_memory().in_use_bytes(), 0, "memory was not given back: {report:?}");
        assert_eq!(engine.guest_descriptors().in_use(), 0, "descriptors were not given back: {report:?}");
        Some((tool.kind(), report.status))
    })
}
