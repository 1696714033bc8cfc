//! The three kinds of WASM tool: SDK components, WASI command components, and
//! WASI preview 1 core modules. Plus tools that are not tools at all.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use common::{call, guest_bytes, load, run, sandbox};
use imagentx_sandbox::engine::{Engine, EngineConfig, LoadError, ToolKind};
use imagentx_sandbox::report::{Runtime, Status};
use serde_json::json;

#[tokio::test]
async fn sdk_tool_describes_itself_with_a_real_input_schema() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "sdk-probe").await;
    let info = tool.info();
    assert_eq!(info.kind, ToolKind::Sdk);
    assert_eq!(info.name, "sdk-probe");
    assert_eq!(info.version.as_deref(), Some("0.3.1"));
    assert_eq!(info.description.as_deref(), Some("An SDK test guest that does what its input asks."));
    let schema = info.input_schema.as_ref().unwrap();
    let ops: Vec<&str> =
        schema["oneOf"].as_array().unwrap().iter().map(|v| v["properties"]["op"]["const"].as_str().unwrap()).collect();
    assert!(ops.contains(&"echo") && ops.contains(&"alloc"), "{schema}");
}

#[tokio::test]
async fn sdk_tool_call_answers_a_full_report() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "sdk-probe").await;
    let report = run(&sb, &tool, &call("alice", "standard", json!({"op": "echo", "text": "hi"}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.output, Some(json!({"text": "hi"})));
    assert_eq!(report.tool, "sdk-probe");
    assert_eq!(report.tool_sha256.as_deref(), Some(tool.sha256()));
    assert_eq!(report.runtime, Runtime::Wasm);
    assert_eq!((report.user.as_str(), report.tier.as_str()), ("alice", "standard"));
    assert_eq!(report.exit_code, Some(0));
    assert!(report.usage.fuel_consumed.unwrap() > 0);
    assert!(report.usage.peak_memory_bytes.unwrap() > 0);
    assert!(report.usage.cpu_ms.unwrap() > 0.0);
    assert!(report.started_at <= report.finished_at);
}

#[tokio::test]
async fn sdk_tool_errors_keep_their_kind() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "sdk-probe").await;
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "fail", "message": "no such city"}))).await;
    assert_eq!(report.status, Status::ToolError);
    assert_eq!(report.error.as_deref(), Some("no such city"));
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "refuse"}))).await;
    assert_eq!(report.status, Status::InvalidInput);
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "teleport"}))).await;
    assert_eq!(report.status, Status::InvalidInput);
    assert!(report.error.unwrap().contains("input does not match the tool's schema"));
}

#[tokio::test]
async fn command_tool_reads_stdin_and_its_json_stdout_is_the_output() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    assert_eq!(tool.kind(), ToolKind::WasiCommand);
    assert_eq!(tool.info().input_schema, None);
    let mut c = call("alice", "free", json!({"op": "echo", "n": 1}));
    c.args = vec!["--flag".into(), "value".into()];
    let report = run(&sb, &tool, &c).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    let out = report.output.unwrap();
    assert_eq!(out["input"]["n"], 1);
    assert_eq!(out["args"], json!(["probe", "--flag", "value"]));
    assert_eq!(report.stdout, "");
}

#[tokio::test]
async fn command_tool_exit_codes_are_reported() {
    let (sb, _dir) = sandbox();
    let tool = load(&sb, "probe").await;
    // WASI 0.2's `exit` carries only success or failure: any non-zero code
    // reaches the host as 1. (Preview 1 modules pass their exact code, below.)
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "exit", "code": 7}))).await;
    assert_eq!(report.status, Status::ToolError);
    assert_eq!(report.exit_code, Some(1));
    let report = run(&sb, &tool, &call("alice", "free", json!({"op": "exit", "code": 0}))).await;
    assert_eq!(report.status, Status::Ok);
    assert_eq!(report.exit_code, Some(0));
}

/// A WASI 0.2 command that ends with `wasi:cli/exit`'s `exit-with-code`
/// (WASI 0.2.12; what wasi-libc calls where it may) reports its real code, as
/// `wasmtime run` does; `exit` with an error stays 1.
#[tokio::test]
async fn a_command_that_exits_with_a_code_reports_it() {
    let (sb, _dir) = sandbox();
    let command = |code: u8| {
        format!(
            r#"(component
                 (import "wasi:cli/exit@0.2.12" (instance $exit (export "exit-with-code" (func (param "status-code" u8)))))
                 (core func $code (canon lower (func $exit "exit-with-code")))
                 (core module $m
                   (import "exit" "code" (func $code (param i32)))
                   (func (export "run") (result i32) (call $code (i32.const {code})) (i32.const 0)))
                 (core instance $i (instantiate $m (with "exit" (instance (export "code" (func $code))))))
                 (func $run (result (result)) (canon lift (core func $i "run")))
                 (instance $cli (export "run" (func $run)))
                 (export "wasi:cli/run@0.2.0" (instance $cli)))"#
        )
    };
    for (code, status) in [(7, Status::ToolError), (0, Status::Ok)] {
        let tool = sb.load(command(code).as_bytes(), "exits").await.unwrap();
        assert_eq!(tool.kind(), ToolKind::WasiCommand);
        let report = run(&sb, &tool, &call("alice", "free", json!(null))).await;
        assert_eq!((report.status, report.exit_code), (status, Some(i32::from(code))), "{report:?}");
    }
}

/// A hand-written WASI preview 1 module, as TinyGo or C toolchains emit:
/// copies stdin to stdout with `fd_read`/`fd_write`.
const P1_CAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (local $n i32)
    (loop $again
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 60000))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)) (then (call $proc_exit (i32.const 2))))
      (local.set $n (i32.load (i32.const 16)))
      (if (i32.gt_u (local.get $n) (i32.const 0))
        (then
          (i32.store (i32.const 4) (local.get $n))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 20)))
          (br $again))))))
"#;

#[tokio::test]
async fn wasi_p1_core_module_runs_with_stdin_and_stdout() {
    let (sb, _dir) = sandbox();
    let tool = sb.load(P1_CAT.as_bytes(), "cat").await.unwrap();
    assert_eq!(tool.kind(), ToolKind::WasiP1Module);
    assert_eq!(tool.name(), "cat");
    let report = run(&sb, &tool, &call("alice", "free", json!({"hello": ["p1", 1]}))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.output, Some(json!({"hello": ["p1", 1]})));
}

#[tokio::test]
async fn p1_module_that_spins_is_stopped_and_one_that_exits_nonzero_is_a_tool_error() {
    let (sb, _dir) = sandbox();
    let spin = sb.load(br#"(module (func (export "_start") (loop (br 0))))"#, "spin").await.unwrap();
    let mut c = call("alice", "free", json!(null));
    c.timeout = Some(std::time::Duration::from_millis(500));
    let report = run(&sb, &spin, &c).await;
    assert!(matches!(report.status, Status::CpuLimit | Status::Timeout), "{report:?}");

    let exit = sb
        .load(
            br#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                (memory (export "memory") 1)
                (func (export "_start") (call $exit (i32.const 4))))"#,
            "exit4",
        )
        .await
        .unwrap();
    let report = run(&sb, &exit, &call("alice", "free", json!(null))).await;
    assert_eq!(report.status, Status::ToolError);
    assert_eq!(report.exit_code, Some(4));
    // Codes of 126 and up are not a program's to give (wasmtime's rule).
    let exit = sb
        .load(
            br#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                (memory (export "memory") 1)
                (func (export "_start") (call $exit (i32.const 200))))"#,
            "exit200",
        )
        .await
        .unwrap();
    let report = run(&sb, &exit, &call("alice", "free", json!(null))).await;
    assert_eq!((report.status, report.exit_code), (Status::Crashed, None), "{report:?}");
    assert!(report.error.unwrap().contains("invalid exit status"));
}

/// A module whose memory cannot grow (Emscripten's default, or a maximum set
/// to the initial size) still runs: the adapter's pages are added to its
/// maximum.
#[tokio::test]
async fn a_p1_module_with_a_fixed_memory_runs() {
    let (sb, _dir) = sandbox();
    let fixed = P1_CAT.replace(r#"(memory (export "memory") 2)"#, r#"(memory (export "memory") 2 2)"#);
    let tool = sb.load(fixed.as_bytes(), "cat").await.unwrap();
    let report = run(&sb, &tool, &call("alice", "free", json!([1, 2]))).await;
    assert_eq!(report.status, Status::Ok, "{report:?}");
    assert_eq!(report.output, Some(json!([1, 2])));
}

/// A preview 1 module that also imports something the adapter cannot provide
/// runs on wasmtime's preview 1 host, whose writes nothing charges: it gets no
/// directories at all. This one exits with what `fd_prestat_get(3)` answers:
/// EBADF (8), no preopen; a module that got `/data` would exit 0.
#[tokio::test]
async fn a_p1_module_the_adapter_cannot_take_runs_without_directories() {
    let (sb, _dir) = sandbox();
    let tool = sb
        .load(
            br#"(module
                (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                (import "env" "not_wasi" (func))
                (memory (export "memory") 1)
                (func (export "_start") (call $exit (call $prestat (i32.const 3) (i32.const 16)))))"#,
            "mixed",
        )
        .await
        .unwrap();
    assert_eq!(tool.kind(), ToolKind::WasiP1Module);
    let report = run(&sb, &tool, &call("alice", "free", json!(null))).await;
    assert_eq!((report.status, report.exit_code), (Status::ToolError, Some(8)), "{report:?}");
}

async fn load_err(bytes: &[u8]) -> LoadError {
    let (sb, _dir) = sandbox();
    match sb.load(bytes, "bad").await {
        Ok(_) => panic!("a bad tool was loaded"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn bytes_that_are_not_wasm_are_an_invalid_tool() {
    let e = load_err(b"#!/bin/sh\nrm -rf /\n").await;
    assert!(matches!(e, LoadError::NotWasm(_)), "{e}");
    let e = load_err(&[0xff; 100]).await;
    assert!(matches!(e, LoadError::NotWasm(_)), "{e}");
}

#[tokio::test]
async fn a_truncated_module_is_an_invalid_tool_with_the_reason() {
    let wasm = guest_bytes("probe");
    let e = load_err(&wasm[..wasm.len() / 2]).await;
    assert!(matches!(e, LoadError::Invalid(_)), "{e}");
    assert!(!e.is_host_failure());
}

#[tokio::test]
async fn a_huge_module_is_refused_before_compiling() {
    let mut huge = b"\0asm\x01\0\0\0".to_vec();
    huge.resize(65 << 20, 0);
    let e = load_err(&huge).await;
    assert!(matches!(e, LoadError::TooLarge { size, max } if size == 65 << 20 && max == 64 << 20), "{e}");
}

#[tokio::test]
async fn a_module_without_an_entry_point_is_an_invalid_tool() {
    let e = load_err(b"(module (func (export \"main\")))").await;
    assert!(matches!(e, LoadError::NoEntryPoint), "{e}");
    let e = load_err(b"(component)").await;
    assert!(matches!(e, LoadError::NoEntryPoint), "{e}");
    let e = load_err(
        br#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))) (func (export "_start")))"#,
    )
    .await;
    assert!(e.to_string().contains("must export its linear memory"), "{e}");
}

#[tokio::test]
async fn the_invalid_tool_report_names_the_reason() {
    let (sb, _dir) = sandbox();
    let e = sb.load(b"not wasm", "junk").await.err().unwrap();
    let report = sb.run(Err(("junk", &e)), &call("alice", "free", json!(null))).await;
    assert_eq!(report.status, Status::InvalidTool);
    assert_eq!(report.tool, "junk");
    assert!(report.error.unwrap().starts_with("not a WebAssembly module"));
}

#[tokio::test]
async fn a_restarted_engine_loads_the_precompiled_artifact_instead_of_compiling() {
    let cache = tempfile::tempdir().unwrap();
    let config = {
        let mut c = EngineConfig::new(cache.path().to_owned(), 1 << 30);
        c.max_instances = 8;
        c
    };
    let wasm = guest_bytes("sdk-probe");
    let first = Engine::new(&config).unwrap();
    let tool = first.load(&wasm, usize::MAX, "x").await.unwrap();
    assert!(!tool.loaded_from_cache());
    drop((tool, first));

    let restarted = Engine::new(&config).unwrap();
    let tool = restarted.load(&wasm, usize::MAX, "x").await.unwrap();
    assert!(tool.loaded_from_cache());
    assert_eq!(tool.name(), "sdk-probe");

    // An artifact damaged in place, while a tool loaded from it is live, neither
    // crashes the process nor is trusted: it is recompiled.
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let reloaded = restarted.load(&wasm, usize::MAX, "x").await.unwrap();
    assert!(!reloaded.loaded_from_cache());
    let (sb, _dir) = sandbox();
    let sb = imagentx_sandbox::runner::Sandbox { engine: restarted, ..sb };
    for t in [&tool, &reloaded] {
        let report = run(&sb, t, &call("alice", "free", json!({"op": "echo", "text": "still here"}))).await;
        assert_eq!(report.status, Status::Ok, "{report:?}");
    }
}
