//! The Python interpreter tool (`interpreters/python`, CPython packaged by
//! componentize-py, built by `scripts/build-interpreters`) through the real
//! engine and runner: agents' code runs, and hostile code is stopped with the
//! right status while the sandbox keeps serving.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use imagentx_sandbox::engine::Tool;
use imagentx_sandbox::report::{ExecutionReport, Status};
use imagentx_sandbox::runner::Sandbox;
use serde_json::{Value, json};

/// The built interpreter, once per test binary.
fn python_wasm() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(repo.join("scripts/build-interpreters")).output().expect("running build-interpreters");
        assert!(out.status.success(), "build-interpreters failed:\n{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(repo.join("target/interpreters/python.wasm")).expect("python.wasm")
    })
}

/// The tool, compiled once (the first caller compiles, the others wait).
async fn python(sandbox: &Sandbox) -> &'static Tool {
    static TOOL: tokio::sync::OnceCell<Tool> = tokio::sync::OnceCell::const_new();
    TOOL.get_or_init(|| async { sandbox.load(python_wasm(), "python").await.unwrap() }).await
}

async fn run_code(sandbox: &Sandbox, user: &str, tier: &str, code: &str, args: Value) -> ExecutionReport {
    let tool = python(sandbox).await;
    let call = common::with_timeout(common::call(user, tier, json!({"code": code, "args": args})), 5_000);
    common::run(sandbox, tool, &call).await
}

fn error(report: &ExecutionReport) -> &str {
    report.error.as_deref().unwrap_or_default()
}

#[tokio::test]
async fn code_prints_and_returns_its_result_from_args() {
    let (sandbox, _dir) = common::sandbox();
    let code = "import statistics, json\nprint('mean', statistics.mean(args['xs']))\nresult = {'sum': sum(args['xs'])}";
    let r = run_code(&sandbox, "alice", "standard", code, json!({"xs": [1, 2, 3]})).await;
    assert_eq!(r.status, Status::Ok, "{}", error(&r));
    assert_eq!(r.output, Some(json!({"stdout": "mean 2\n", "result": {"sum": 6}})));
}

#[tokio::test]
async fn an_exception_is_a_tool_error_with_its_traceback() {
    let (sandbox, _dir) = common::sandbox();
    let r = run_code(&sandbox, "alice", "standard", "print('before')\n1 / 0", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("ZeroDivisionError") && error(&r).contains("Traceback"), "{}", error(&r));
    let r = run_code(&sandbox, "alice", "standard", "def f(): return f()\nf()", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("RecursionError"), "{}", error(&r));
}

#[tokio::test]
async fn runaway_code_is_stopped_and_the_next_call_runs() {
    let (sandbox, _dir) = common::sandbox();
    let r = run_code(&sandbox, "mallory", "free", "while True: pass", json!({})).await;
    assert!(matches!(r.status, Status::CpuLimit | Status::Timeout), "{:?}: {}", r.status, error(&r));
    let r = run_code(&sandbox, "mallory", "free", "x = bytearray(1 << 30)", json!({})).await;
    assert_eq!(r.status, Status::MemoryLimit, "{}", error(&r));
    let r = run_code(&sandbox, "mallory", "free", "result = 1 + 1", json!({})).await;
    assert_eq!(r.status, Status::Ok, "{}", error(&r));
    assert_eq!(r.output, Some(json!({"stdout": "", "result": 2})));
}

#[tokio::test]
async fn no_host_files_no_network_no_processes_no_native_code() {
    let (sandbox, _dir) = common::sandbox();
    for (code, expected) in [
        ("open('/etc/passwd').read()", "FileNotFoundError"),
        ("open('/data/../../../../etc/passwd').read()", "Error"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", "Error"),
        ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:22/')", "Error"),
        ("import subprocess\nsubprocess.run(['ls'])", "Error"),
        ("import os\nos.system('ls')", "Error"),
        ("import ctypes", "ModuleNotFoundError"),
    ] {
        let r = run_code(&sandbox, "mallory", "standard", code, json!({})).await;
        assert_eq!(r.status, Status::ToolError, "{code}: {:?}", r.output);
        assert!(error(&r).contains(expected), "{code}: {}", error(&r));
    }
    // There is no root to list: only /data and /tmp exist.
    let r = run_code(&sandbox, "mallory", "standard", "import os\nresult = os.listdir('/')", json!({})).await;
    assert_eq!(r.status, Status::ToolError, "{:?}", r.output);
    assert!(error(&r).contains("FileNotFoundError"), "{}", error(&r));
}

#[tokio::test]
async fn data_persists_per_user_and_state_does_not_leak_between_calls() {
    let (sandbox, _dir) = common::sandbox();
    let write = "import csv\nwith open('/data/t.csv', 'w', newline='') as f:\n    csv.writer(f).writerows([[1, 2], [3, 4]])\n\
                 import sys\nsys.leaked = 'alice was here'";
    let r = run_code(&sandbox, "alice", "standard", write, json!({})).await;
    assert_eq!(r.status, Status::Ok, "{}", error(&r));
    let read = "import csv, sys\nrows = list(csv.reader(open('/data/t.csv')))\n\
                result = {'total': sum(int(c) for r in rows for c in r), 'leak': getattr(sys, 'leaked', None)}";
    let r = run_code(&sandbox, "alice", "standard", read, json!({})).await;
    assert_eq!(r.status, Status::Ok, "{}", error(&r));
    assert_eq!(r.output.unwrap()["result"], json!({"total": 10, "leak": null}));
    let r = run_code(&sandbox, "bob", "standard", "import os\nresult = os.listdir('/data')", json!({})).await;
    assert_eq!(r.output.unwrap()["result"], json!([]), "bob sees alice's files");
}

#[tokio::test]
async fn an_output_flood_is_capped() {
    let (sandbox, _dir) = common::sandbox();
    let r = run_code(&sandbox, "mallory", "standard", "print('x' * (20 << 20))", json!({})).await;
    assert!(r.truncated.output, "{:?} {}", r.status, error(&r));
    assert!(r.output.as_ref().is_none_or(|o| o.to_string().len() < 20 << 20), "the flood came back whole");
    let r = run_code(&sandbox, "mallory", "standard", "result = 'still serving'", json!({})).await;
    assert_eq!(r.status, Status::Ok, "{}", error(&r));
}
