//! Every limit, twice: a tool that stays under it succeeds; a hostile tool that
//! breaks it is stopped with the right status, and the sandbox keeps serving.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use common::{call, load, run, sandbox, sandbox_with, with_timeout};
use imagentx_sandbox::policy::Policy;
use imagentx_sandbox::report::Status;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The sandbox still answers a trivial call after whatever happened before.
async fn still_serving(sandbox: &imagentx_sandbox::runner::Sandbox) {
    let tool = load(sandbox, "probe").await;
    let report = run(sandbox, &tool, &call("after", "free", json!({"op": "echo"}))).await;
    assert_eq!(report.status, Status::Ok, "sandbox did not keep serving: {report:?}");
}

#[tokio::test]
async fn allocation_under_the_tier_memory_succeeds() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    // 220 of the free tier's 256 MiB, plus the guest's own ~1 MiB.
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "alloc", "bytes": 220 * MIB}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.output.unwrap()["allocated"], 220 * MIB);
    let peak = report.usage.peak_memory_bytes.unwrap();
    assert!((220 * MIB..=256 * MIB).contains(&peak), "peak {peak}");
}

#[tokio::test]
async fn memory_bomb_stops_at_the_tier_memory_limit() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "alloc", "bytes": 300 * MIB}))).await;
    assert_eq!(report.status, Status::MemoryLimit, "{report:?}");
    assert!(report.error.unwrap().contains("its tier allows 268435456"));
    assert!(report.usage.peak_memory_bytes.unwrap() <= 256 * MIB);
    // The same request fits the premium tier.
    let report = run(&sb, &tool, &call("alice", "premium", json!({"op": "alloc", "bytes": 300 * MIB}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    still_serving(&sb).await;
}

#[tokio::test]
async fn sdk_tool_memory_bomb_is_a_memory_limit_too() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "sdk-probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "alloc", "bytes": 400 * MIB}))).await;
    assert_eq!(report.status, Status::MemoryLimit, "{report:?}");
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "alloc", "bytes": 64 * MIB}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
}

/// A core module with two memories, growing each by `pages` 64-KiB pages.
fn two_memories(pages: u32) -> String {
    format!(
        r#"(module
             (memory $a 1) (memory $b 1)
             (func (export "_start")
               (if (i32.eq (memory.grow $a (i32.const {pages})) (i32.const -1)) (then unreachable))
               (if (i32.eq (memory.grow $b (i32.const {pages})) (i32.const -1)) (then unreachable))))"#
    )
}

#[tokio::test]
async fn two_memories_are_capped_together_not_each() {
    let (sb, _dir) = sandbox();
    // free tier: 256 MiB = 4096 pages in all.
    let fits = sb.load(two_memories(1500).as_bytes(), "two-memories").await.unwrap();
    let report = run(&sb, &fits, &call("alice", "free", json!(null))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");

    // Each memory alone (3000 pages) is under the cap; together they are not.
    let bomb = sb.load(two_memories(3000).as_bytes(), "two-memories").await.unwrap();
    let report = run(&sb, &bomb, &call("alice", "free", json!(null))).await;
    assert_eq!(report.status, Status::MemoryLimit, "{report:?}");
    still_serving(&sb).await;
}

#[tokio::test]
async fn bounded_work_within_the_fuel_budget_succeeds() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "work", "rounds": 1_000_000}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    let fuel = report.usage.fuel_consumed.unwrap();
    assert!(fuel > 1_000_000, "fuel {fuel} was not counted");
}

#[tokio::test]
async fn infinite_loop_stops_at_the_fuel_budget_when_it_runs_out_first() {
    // 2e7 fuel per CPU-second: 1e8 fuel over the default 10 s at half a core,
    // gone in well under a second of CPU, long before the wall clock runs out.
    let policy = Policy { fuel_per_cpu_second: 20_000_000, ..Policy::default() };
    let (sb, _dir) = sandbox_with(policy);
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "standard", json!({"op": "spin"}))).await;
    assert_eq!(report.status, Status::CpuLimit, "{report:?}");
    assert_eq!(report.usage.fuel_consumed, Some(100_000_000));
    let sdk = load(&sb, "sdk-probe").await;
    let report = run(&sb, &sdk, &call("alice", "standard", json!({"op": "spin"}))).await;
    assert_eq!(report.status, Status::CpuLimit, "{report:?}");
    still_serving(&sb).await;
}

#[tokio::test]
async fn infinite_loop_stops_at_the_deadline_when_it_comes_first() {
    // So much fuel that only the wall clock can stop it.
    let policy = Policy { fuel_per_cpu_second: u64::MAX / 1000, ..Policy::default() };
    let (sb, _dir) = sandbox_with(policy);
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &with_timeout(call("alice", "premium", json!({"op": "spin"})), 300)).await;
    assert_eq!(report.status, Status::Timeout, "{report:?}");
    assert!(report.usage.wall_ms >= 300.0, "stopped before its deadline: {report:?}");
    // Stopped at an epoch tick, wasmtime has not flushed the running function's
    // fuel counter: the figure is unknown, so it is null, not a stale number.
    assert_eq!(report.usage.fuel_consumed, None, "{report:?}");
    assert!(report.usage.cpu_ms.unwrap() > 0.0);
    still_serving(&sb).await;
}

#[tokio::test]
async fn a_guest_blocked_in_a_host_call_is_stopped_by_the_outer_timeout() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report =
        run(&sb, &tool, &with_timeout(call("alice", "free", json!({"op": "sleep", "ms": 600_000})), 300)).await;
    assert_eq!(report.status, Status::Timeout, "{report:?}");
    assert!(report.usage.wall_ms < 10_000.0, "the sleep was not cut short: {report:?}");
    // A short sleep within the budget is fine.
    let report = run(&sb, &tool, &with_timeout(call("alice", "free", json!({"op": "sleep", "ms": 20})), 2_000)).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.output.unwrap()["slept_ms"], 20);
}

#[tokio::test]
async fn output_up_to_the_cap_is_kept_whole() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "flood", "bytes": 1 << 20}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.stdout.len(), 1 << 20);
    assert_eq!(report.stderr.len(), 1 << 20);
    assert!(!report.truncated.stdout && !report.truncated.stderr);
}

#[tokio::test]
async fn output_flood_is_capped_and_flagged_and_the_status_stays() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "flood", "bytes": 8 * MIB}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.stdout.len(), 1 << 20);
    assert_eq!(report.stderr.len(), 1 << 20);
    assert!(report.truncated.stdout && report.truncated.stderr && !report.truncated.output);
    still_serving(&sb).await;
}

#[tokio::test]
async fn an_sdk_result_over_the_cap_is_dropped_and_flagged() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "sdk-probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "big", "bytes": 2 * MIB}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert!(report.truncated.output);
    assert_eq!(report.output, None);
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "big", "bytes": 1000}))).await;
    assert_eq!(report.output.unwrap()["text"].as_str().unwrap().len(), 1000);
    assert!(!report.truncated.output);
}

#[tokio::test]
async fn input_over_the_cap_or_not_json_is_invalid_input() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let mut big = call("alice", "free", json!(null));
    big.input = format!("\"{}\"", "a".repeat(1 << 20)).into_bytes();
    let report = run(&sb, &tool, &big).await;
    assert_eq!(report.status, Status::InvalidInput);
    assert!(report.error.unwrap().contains("over the 1048576-byte limit"));

    let mut broken = call("alice", "free", json!(null));
    broken.input = b"{\"op\": ".to_vec();
    let report = run(&sb, &tool, &broken).await;
    assert_eq!(report.status, Status::InvalidInput);
    assert!(report.error.unwrap().starts_with("input is not valid JSON"));

    let mut just_under = call("alice", "free", json!(null));
    just_under.input = format!("{{\"op\":\"echo\",\"pad\":\"{}\"}}", "a".repeat((1 << 20) - 100)).into_bytes();
    let report = run(&sb, &tool, &just_under).await;
    assert_eq!(report.status, Status::Ok, "{:?}", report.error);
}

#[tokio::test]
async fn deep_recursion_is_a_crash_with_stack_overflow() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "premium", json!({"op": "recurse"}))).await;
    assert_eq!(report.status, Status::Crashed, "{report:?}");
    assert_eq!(report.error.as_deref(), Some("stack overflow"));

    // A Rust guest keeps big frames on a shadow stack in its linear memory;
    // overflowing that one is an out-of-bounds access, and a crash all the same.
    let report = run(&sb, &tool, &call("alice", "premium", json!({"op": "recurse_big_frames"}))).await;
    assert_eq!(report.status, Status::Crashed, "{report:?}");
    assert!(report.error.as_deref().unwrap().contains("out of bounds memory access"), "{report:?}");

    let wat = sb.load(br#"(module (func $f (call $f)) (func (export "_start") (call $f)))"#, "rec").await.unwrap();
    let report = run(&sb, &wat, &call("alice", "free", json!(null))).await;
    assert_eq!((report.status, report.error.as_deref()), (Status::Crashed, Some("stack overflow")));
    still_serving(&sb).await;
}

#[tokio::test]
async fn panics_are_crashes_with_the_message_in_stderr() {
    let (sb, _dir) = sandbox();
    for (guest, needle) in [("probe", "the probe panicked on purpose"), ("sdk-probe", "sdk-probe panicked on purpose")]
    {
        let tool = load(&sb, guest).await;
        let report = run(&sb, &tool, &call("alice", "free", json!({"op": "panic"}))).await;
        assert_eq!(report.status, Status::Crashed, "{guest}: {report:?}");
        assert!(report.stderr.contains(needle), "{guest}: {}", report.stderr);
    }
    still_serving(&sb).await;
}

#[tokio::test]
async fn unknown_tier_and_bad_timeouts_are_refused_before_running() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &call("alice", "gold", json!({"op": "echo"}))).await;
    assert_eq!(report.status, Status::InvalidInput);
    assert!(report.error.unwrap().contains("unknown tier `gold`"));
    let report = run(&sb, &tool, &with_timeout(call("alice", "free", json!({"op": "echo"})), 61_000)).await;
    assert_eq!(report.status, Status::InvalidInput);
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_guest_yields_so_other_calls_on_its_thread_still_run() {
    // Only the wall clock stops the spin; both calls share this one thread.
    let policy = Policy { fuel_per_cpu_second: u64::MAX / 1000, ..Policy::default() };
    let (sb, _dir) = sandbox_with(policy);
    let tool = load(&sb, "probe").await;
    let spin_call = with_timeout(call("alice", "premium", json!({"op": "spin"})), 3_000);
    let echo_call = call("bob", "free", json!({"op": "echo"}));
    let spin = run(&sb, &tool, &spin_call);
    tokio::pin!(spin);
    tokio::select! {
        report = &mut spin => panic!("the spinning call ended before the echo could run: {report:?}"),
        report = run(&sb, &tool, &echo_call) => assert_eq!(report.status, Status::Ok, "{report:?}"),
    }
    assert_eq!(spin.await.status, Status::Timeout);
}

/// The tightest loop there is: each iteration burns only the branch's fuel
/// (~0.7e9 fuel per CPU-second here, against ~9e9 for straight-line code), but
/// it burns it, and stops at the fuel budget.
#[tokio::test]
async fn an_empty_loop_burns_fuel_and_stops_at_the_fuel_budget() {
    let policy = Policy { fuel_per_cpu_second: 20_000_000, ..Policy::default() };
    let (sb, _dir) = sandbox_with(policy);
    let spin = sb.load(br#"(module (func (export "_start") (loop (br 0))))"#, "empty-loop").await.unwrap();
    let report = run(&sb, &spin, &call("alice", "standard", json!(null))).await;
    assert_eq!(report.status, Status::CpuLimit, "{report:?}");
    assert_eq!(report.usage.fuel_consumed, Some(100_000_000));
}

#[tokio::test]
async fn a_guest_with_fuel_to_spare_stops_at_its_cpu_time_share() {
    // Fuel cannot run out; 5% of a core over 5 s is 250 ms of CPU.
    let mut policy = Policy { fuel_per_cpu_second: u64::MAX / 1000, ..Policy::default() };
    policy.tiers.get_mut("free").unwrap().cpu = 0.05;
    let (sb, _dir) = sandbox_with(policy);
    let tool = load(&sb, "probe").await;
    let report = run(&sb, &tool, &with_timeout(call("alice", "free", json!({"op": "spin"})), 5_000)).await;
    assert_eq!(report.status, Status::CpuLimit, "{report:?}");
    assert_eq!(report.error.as_deref(), Some("CPU-time budget of 250 ms used up"));
    assert!(report.usage.cpu_ms.unwrap() >= 250.0, "{report:?}");
    // Work that fits the share succeeds under the same policy.
    let report =
        run(&sb, &tool, &with_timeout(call("alice", "free", json!({"op": "work", "rounds": 1000})), 5_000)).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    still_serving(&sb).await;
}
