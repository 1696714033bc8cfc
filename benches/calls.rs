//! Criterion medians of one in-process call (fresh store + instance + call +
//! drop, fuel and epochs on): an SDK tool and a WASI command tool.
//! `cargo bench --bench calls`. Percentiles and peers: `benches/latency.rs`.

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use imagentx_sandbox::engine::Invocation;
use imagentx_sandbox::policy::Policy;
use imagentx_sandbox::quota::Budget;

fn calls(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = common::engine();
    let dirs = tempfile::tempdir().unwrap();
    let limits = Policy::default().resolve("standard", None).unwrap();
    let env = BTreeMap::new();
    let invocation = |input| Invocation {
        input,
        args: &[],
        env: &env,
        data_dir: dirs.path(),
        data_writable: true,
        data_budget: Budget::empty(limits.data_quota_bytes, limits.data_files),
        scratch_dir: dirs.path(),
        limits: &limits,
        owner: "bench",
    };
    let sdk = rt.block_on(engine.load(&common::guest_bytes("sdk-probe"), usize::MAX, "sdk")).unwrap();
    let cmd = rt.block_on(engine.load(&common::guest_bytes("probe"), usize::MAX, "cmd")).unwrap();

    c.bench_function("sdk tool call", |b| {
        b.iter(|| rt.block_on(engine.call(&sdk, invocation(r#"{"op":"echo","text":"hi"}"#))).unwrap())
    });
    c.bench_function("command tool call", |b| {
        b.iter(|| rt.block_on(engine.call(&cmd, invocation(r#"{"op":"echo"}"#))).unwrap())
    });
}

criterion_group!(benches, calls);
criterion_main!(benches);
