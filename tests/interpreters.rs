//! The built-in interpreter tools (`interpreters/`: CPython packaged by
//! componentize-py, SpiderMonkey by componentize-js, both built by
//! `scripts/build-interpreters`) through the real engine and runner, and
//! through the real server: agents' code runs, and hostile code is stopped
//! with the right status while the sandbox keeps serving.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::path::Path;
use std::process::Command;

use hyper::{Method, StatusCode};
use imagentx_sandbox::policy::{Policy, UserId};
use imagentx_sandbox::report::Status;
use serde_json::{Value, json};

use common::interpreters::{Lang, assert_ok, built_dir, error, run_code, tool};

// ---- Python ----

#[tokio::test]
async fn python_prints_and_returns_its_result_from_args() {
    let (sandbox, _dir) = common::sandbox();
    let code = "import statistics, json\nprint('mean', statistics.mean(args['xs']))\nresult = {'sum': sum(args['xs'])}";
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", code, json!({"xs": [1, 2, 3]})).await;
    assert_ok(&r, code);
    assert_eq!(r.output, Some(json!({"stdout": "mean 2\n", "result": {"sum": 6}})));
}

#[tokio::test]
async fn python_has_its_baked_packages_without_installing() {
    let (sandbox, _dir) = common::sandbox();
    let code = "from dateutil import parser, relativedelta\nimport tabulate, jmespath, more_itertools\n\
                d = parser.parse('2024-01-31') + relativedelta.relativedelta(months=1)\n\
                result = [d.date().isoformat(), jmespath.search('a[*].b', {'a': [{'b': 1}, {'b': 2}]}),\n\
                          list(more_itertools.chunked(range(5), 2)), tabulate.tabulate([[1, 2]], tablefmt='plain')]";
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", code, json!({})).await;
    assert_ok(&r, code);
    assert_eq!(r.output.unwrap()["result"], json!(["2024-02-29", [1, 2], [[0, 1], [2, 3], [4]], "1  2"]));
    // Installing is not a thing here: there is no pip and no network.
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", "import pip", json!({})).await;
    assert!(error(&r).contains("ModuleNotFoundError"), "{}", error(&r));
}

#[tokio::test]
async fn python_exceptions_are_tool_errors_with_their_traceback() {
    let (sandbox, _dir) = common::sandbox();
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", "print('before')\n1 / 0", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("ZeroDivisionError") && error(&r).contains("Traceback"), "{}", error(&r));
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", "def f(): return f()\nf()", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("RecursionError"), "{}", error(&r));
}

#[tokio::test]
async fn python_runaway_code_is_stopped_and_the_next_call_runs() {
    let (sandbox, _dir) = common::sandbox();
    let r = run_code(&sandbox, Lang::Python, "mallory", "free", "while True: pass", json!({})).await;
    assert!(matches!(r.status, Status::CpuLimit | Status::Timeout), "{:?}: {}", r.status, error(&r));
    let r = run_code(&sandbox, Lang::Python, "mallory", "free", "x = bytearray(1 << 30)", json!({})).await;
    assert_eq!(r.status, Status::MemoryLimit, "{}", error(&r));
    let r = run_code(&sandbox, Lang::Python, "mallory", "free", "result = 1 + 1", json!({})).await;
    assert_ok(&r, "after the bombs");
    assert_eq!(r.output, Some(json!({"stdout": "", "result": 2})));
}

#[tokio::test]
async fn python_reaches_no_host_files_network_processes_or_native_code() {
    let (sandbox, _dir) = common::sandbox();
    for (code, expected) in [
        ("open('/etc/passwd').read()", "FileNotFoundError"),
        ("open('/data/../../../../etc/passwd').read()", "Error"),
        ("import os\nos.listdir('/data/../..')", "Error"),
        ("import os\nos.symlink('/etc/passwd', '/data/p')", "PermissionError"),
        ("import os\nos.symlink('../../../../../../etc/passwd', '/data/q')\nopen('/data/q').read()", "PermissionError"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", "Error"),
        ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:22/')", "Error"),
        ("import subprocess\nsubprocess.run(['ls'])", "Error"),
        ("import os\nos.system('ls')", "Error"),
        ("import ctypes", "ModuleNotFoundError"),
    ] {
        let r = run_code(&sandbox, Lang::Python, "mallory", "standard", code, json!({})).await;
        assert_eq!(r.status, Status::ToolError, "{code}: {:?}", r.output);
        assert!(error(&r).contains(expected), "{code}: {}", error(&r));
    }
    // There is no root to list: only /data and /tmp exist.
    let r =
        run_code(&sandbox, Lang::Python, "mallory", "standard", "import os\nresult = os.listdir('/')", json!({})).await;
    assert_eq!(r.status, Status::ToolError, "{:?}", r.output);
    assert!(error(&r).contains("FileNotFoundError"), "{}", error(&r));
}

#[tokio::test]
async fn python_data_persists_per_user_and_state_does_not_leak_between_calls() {
    let (sandbox, _dir) = common::sandbox();
    let write = "import csv\nwith open('/data/t.csv', 'w', newline='') as f:\n    csv.writer(f).writerows([[1, 2], [3, 4]])\n\
                 import sys\nsys.leaked = 'alice was here'\nopen('/tmp/scratch', 'w').write('x')";
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", write, json!({})).await;
    assert_ok(&r, write);
    let read = "import csv, os, sys\nrows = list(csv.reader(open('/data/t.csv')))\n\
                result = {'total': sum(int(c) for r in rows for c in r), 'leak': getattr(sys, 'leaked', None), \
                'tmp': os.listdir('/tmp')}";
    let r = run_code(&sandbox, Lang::Python, "alice", "standard", read, json!({})).await;
    assert_ok(&r, read);
    assert_eq!(r.output.unwrap()["result"], json!({"total": 10, "leak": null, "tmp": []}));
    let r =
        run_code(&sandbox, Lang::Python, "bob", "standard", "import os\nresult = os.listdir('/data')", json!({})).await;
    assert_eq!(r.output.unwrap()["result"], json!([]), "bob sees alice's files");
}

#[tokio::test]
async fn python_output_flood_is_capped() {
    let (sandbox, _dir) = common::sandbox();
    // Printing keeps the first 512 KiB and the result.
    let r =
        run_code(&sandbox, Lang::Python, "mallory", "standard", "print('x' * (20 << 20))\nresult = 7", json!({})).await;
    assert_ok(&r, "print flood");
    let output = r.output.unwrap();
    assert_eq!((output["stdout_truncated"].as_bool(), output["result"].as_i64()), (Some(true), Some(7)));
    assert_eq!(output["stdout"].as_str().unwrap().len(), 512 * 1024);
    // A result over the output cap is cut by the host.
    let r = run_code(&sandbox, Lang::Python, "mallory", "standard", "result = 'x' * (20 << 20)", json!({})).await;
    assert!(r.truncated.output, "{:?} {}", r.status, error(&r));
    assert!(r.output.is_none(), "the flood came back");
    let r = run_code(&sandbox, Lang::Python, "mallory", "standard", "result = 'still serving'", json!({})).await;
    assert_ok(&r, "after the flood");
}

// ---- JavaScript ----

#[tokio::test]
async fn javascript_prints_and_returns_its_result_from_args() {
    let (sandbox, _dir) = common::sandbox();
    let code =
        "console.log('sum', args.xs.reduce((a, b) => a + b, 0), {n: 1});\nlet result = {max: Math.max(...args.xs)}";
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", code, json!({"xs": [1, 2, 3]})).await;
    assert_ok(&r, code);
    assert_eq!(r.output, Some(json!({"stdout": "sum 6 {\"n\":1}\n", "result": {"max": 3}})));
    // A promise in `result` is awaited.
    let code = "var result = Promise.resolve(41).then((x) => x + 1)";
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", code, json!({})).await;
    assert_eq!(r.output, Some(json!({"stdout": "", "result": 42})), "{}", error(&r));
}

#[tokio::test]
async fn javascript_has_its_baked_packages_without_installing() {
    let (sandbox, _dir) = common::sandbox();
    let code = "const _ = require('lodash'), Papa = require('papaparse'), dayjs = require('dayjs'), YAML = require('yaml');\n\
                const rows = Papa.parse('a,b\\n1,2\\n3,4', {header: true, dynamicTyping: true}).data;\n\
                result = [_.sumBy(rows, 'b'), dayjs('2024-01-31').add(1, 'day').format('YYYY-MM-DD'), YAML.parse('k: [1, 2]')]";
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", code, json!({})).await;
    assert_ok(&r, code);
    assert_eq!(r.output.unwrap()["result"], json!([6, "2024-02-01", {"k": [1, 2]}]));
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", "require('left-pad')", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("Cannot find module 'left-pad'"), "{}", error(&r));
}

#[tokio::test]
async fn javascript_exceptions_are_tool_errors_with_their_stack() {
    let (sandbox, _dir) = common::sandbox();
    let r =
        run_code(&sandbox, Lang::JavaScript, "alice", "standard", "console.log('before');\nnull.x", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("TypeError") && error(&r).contains("<code>:2"), "{}", error(&r));
    let r =
        run_code(&sandbox, Lang::JavaScript, "alice", "standard", "function f() { return f() + 1 }\nf()", json!({}))
            .await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("too much recursion"), "{}", error(&r));
    assert!(error(&r).len() < 4096, "the stack is cut short: {} bytes", error(&r).len());
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", "throw 'a string'", json!({})).await;
    assert_eq!(r.status, Status::ToolError);
    assert!(error(&r).contains("a string"), "{}", error(&r));
}

#[tokio::test]
async fn javascript_runaway_code_is_stopped_and_the_next_call_runs() {
    let (sandbox, _dir) = common::sandbox();
    let r = run_code(&sandbox, Lang::JavaScript, "mallory", "free", "while (true) {}", json!({})).await;
    assert!(matches!(r.status, Status::CpuLimit | Status::Timeout), "{:?}: {}", r.status, error(&r));
    let bomb = "const hoard = []; for (;;) hoard.push(new Float64Array(1 << 20).fill(1))";
    let r = run_code(&sandbox, Lang::JavaScript, "mallory", "free", bomb, json!({})).await;
    assert_eq!(r.status, Status::MemoryLimit, "{}", error(&r));
    let r = run_code(&sandbox, Lang::JavaScript, "mallory", "free", "result = 1 + 1", json!({})).await;
    assert_ok(&r, "after the bombs");
    assert_eq!(r.output, Some(json!({"stdout": "", "result": 2})));
}

#[tokio::test]
async fn javascript_reaches_no_host_files_network_or_processes() {
    let (sandbox, _dir) = common::sandbox();
    for (code, expected) in [
        ("require('fs').readFileSync('/etc/passwd', 'utf8')", "ENOENT"),
        ("require('fs').readFileSync('/data/../../../etc/passwd', 'utf8')", "ENOENT"),
        ("require('fs').readdirSync('/')", "ENOENT"),
        ("result = fetch('http://127.0.0.1:22/')", "no network"),
        ("require('child_process').execSync('ls')", "Cannot find module 'child_process'"),
        ("require('net')", "Cannot find module 'net'"),
        ("process.exit(0)", "ReferenceError"),
        ("result = import('fs')", "Error"),
    ] {
        let r = run_code(&sandbox, Lang::JavaScript, "mallory", "standard", code, json!({})).await;
        assert_eq!(r.status, Status::ToolError, "{code}: {:?}", r.output);
        assert!(error(&r).contains(expected), "{code}: {}", error(&r));
    }
    let r = run_code(
        &sandbox,
        Lang::JavaScript,
        "mallory",
        "standard",
        "result = ['XMLHttpRequest', 'WebSocket', 'process', 'WebAssembly', 'Worker', 'SharedArrayBuffer'].map((n) => typeof globalThis[n])",
        json!({}),
    )
    .await;
    assert_eq!(r.output.unwrap()["result"], json!(vec!["undefined"; 6]), "a way out of the interpreter is defined");
}

#[tokio::test]
async fn javascript_data_persists_per_user_and_state_does_not_leak_between_calls() {
    let (sandbox, _dir) = common::sandbox();
    let write = "const fs = require('fs');\nfs.mkdirSync('/data/reports', {recursive: true});\n\
                 fs.writeFileSync('/data/reports/t.csv', 'a,b\\n1,2\\n');\nfs.appendFileSync('/data/reports/t.csv', '3,4\\n');\n\
                 fs.writeFileSync('/tmp/scratch', 'x');\nglobalThis.leaked = 'alice was here';";
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", write, json!({})).await;
    assert_ok(&r, write);
    let read = "const fs = require('fs');\nconst rows = require('papaparse').parse(fs.readFileSync('/data/reports/t.csv', 'utf8'), {header: true, skipEmptyLines: true}).data;\n\
                result = {rows, leak: globalThis.leaked ?? null, tmp: fs.readdirSync('/tmp'), ls: fs.readdirSync('/data')}";
    let r = run_code(&sandbox, Lang::JavaScript, "alice", "standard", read, json!({})).await;
    assert_ok(&r, read);
    assert_eq!(
        r.output.unwrap()["result"],
        json!({"rows": [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}], "leak": null, "tmp": [], "ls": ["reports"]})
    );
    let r = run_code(
        &sandbox,
        Lang::JavaScript,
        "bob",
        "standard",
        "result = require('fs').readdirSync('/data')",
        json!({}),
    )
    .await;
    assert_eq!(r.output.unwrap()["result"], json!([]), "bob sees alice's files");
}

#[tokio::test]
async fn javascript_output_flood_is_capped() {
    let (sandbox, _dir) = common::sandbox();
    let flood = "const line = 'x'.repeat(1 << 16); for (let i = 0; i < 320; i++) console.log(line); result = 7";
    let r = run_code(&sandbox, Lang::JavaScript, "mallory", "standard", flood, json!({})).await;
    assert_ok(&r, "print flood");
    let output = r.output.unwrap();
    assert_eq!((output["stdout_truncated"].as_bool(), output["result"].as_i64()), (Some(true), Some(7)));
    assert_eq!(output["stdout"].as_str().unwrap().len(), 512 * 1024);
    // A result too big to hand back is refused inside the interpreter.
    let r =
        run_code(&sandbox, Lang::JavaScript, "mallory", "standard", "result = 'x'.repeat(20 << 20)", json!({})).await;
    assert_eq!(r.status, Status::ToolError, "{}", error(&r));
    assert!(error(&r).contains("write big results to /data"), "{}", error(&r));
    let r = run_code(&sandbox, Lang::JavaScript, "mallory", "standard", "result = 'still serving'", json!({})).await;
    assert_ok(&r, "after the flood");
}

// ---- Both ----

/// A 10 MB CSV in the user's /data, parsed and summarised under the
/// standard tier's limits, in each language.
#[tokio::test]
async fn real_work_a_10_mb_csv_fits_the_standard_tier() {
    let (sandbox, _dir) = common::sandbox();
    let dir = sandbox.data_dir.user_dir(&UserId::new("analyst").unwrap()).unwrap();
    let mut csv = String::from("id,region,amount\n");
    let (mut n, mut total) = (0u64, 0u64);
    while csv.len() < 10 << 20 {
        let amount = (n * 7919) % 1000;
        csv.push_str(&format!("{n},region-{},{amount}\n", n % 13));
        total += amount;
        n += 1;
    }
    std::fs::write(dir.join("sales.csv"), &csv).unwrap();
    // The standard tier's own budget (10 s, 5 s of CPU), not the tests' 5 s.
    let run = async |lang: Lang, code: &str| {
        let call = common::call("analyst", "standard", json!({"code": code}));
        common::run(&sandbox, tool(&sandbox, lang).await, &call).await
    };
    let python = "import csv, statistics\nwith open('/data/sales.csv', newline='') as f:\n    \
                  rows = csv.reader(f)\n    next(rows)\n    amounts = [int(r[2]) for r in rows]\n\
                  result = {'rows': len(amounts), 'total': sum(amounts), 'median': statistics.median(amounts)}";
    let r = run(Lang::Python, python).await;
    assert_ok(&r, "python over 10 MB");
    let result = &r.output.unwrap()["result"];
    assert_eq!((result["rows"].as_u64(), result["total"].as_u64()), (Some(n), Some(total)));
    // Plain JavaScript: the interpreter has no JIT, and papaparse over 10 MB
    // takes more than the tier's 5 s of CPU.
    let javascript = "const lines = require('fs').readFileSync('/data/sales.csv', 'utf8').split('\\n');\n\
                      let rows = 0, total = 0;\n\
                      for (const line of lines.slice(1)) { if (line) { total += Number(line.split(',')[2]); rows++; } }\n\
                      result = {rows, total}";
    let r = run(Lang::JavaScript, javascript).await;
    assert_ok(&r, "javascript over 10 MB");
    assert_eq!(r.output.unwrap()["result"], json!({"rows": n, "total": total}));
}

/// Both tools are registered when the server starts, answer over HTTP, and a
/// restart keeps their versions (same build, nothing registered again).
#[tokio::test]
async fn the_server_registers_both_interpreters_at_start_and_runs_them_over_http() {
    let dir = built_dir();
    let settings = |s: &mut imagentx_sandbox::api::ServerSettings| {
        s.interpreters_dir = dir.clone();
        s.artifact_cache_dir = Some(common::artifact_cache());
    };
    let srv = server::TestServer::start_with(Policy::default(), settings).await;
    let alice = srv.add_user("alice", "standard", false).await;
    let tools = srv.request(Method::GET, "/v1/tools", Some(&alice), "").await.json();
    let listed: Vec<(String, String)> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t["registered_by"].as_str().unwrap().to_owned()))
        .collect();
    assert!(listed.contains(&("python".into(), "builtin".into())), "{tools}");
    assert!(listed.contains(&("javascript".into(), "builtin".into())), "{tools}");

    let answer = invoke(&srv, &alice, "python", "print('hi')\nresult = args['n'] ** 2").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.json()["output"], json!({"stdout": "hi\n", "result": 16}));
    let answer = invoke(&srv, &alice, "javascript", "console.log('hi'); result = args.n ** 2").await;
    assert_eq!(answer.json()["output"], json!({"stdout": "hi\n", "result": 16}));
    let answer = invoke(&srv, &alice, "python", "while True: pass").await;
    assert!(["cpu_limit", "timeout"].contains(&answer.json()["status"].as_str().unwrap()), "{}", answer.json());
    // A symlink the code leaves in /data pointing out of it is not followed by
    // the files API either.
    let plant = "import os\ntry:\n    os.symlink('../../../../../../../etc/passwd', '/data/leak')\nexcept OSError:\n    pass\n\
                 open('/data/note.txt', 'w').write('hello')";
    let answer = invoke(&srv, &alice, "python", plant).await;
    assert_eq!(answer.json()["status"], "ok", "{}", answer.json());
    let note = srv.request(Method::GET, "/v1/files/note.txt", Some(&alice), "").await;
    assert_eq!((note.status, &note.body[..]), (StatusCode::OK, &b"hello"[..]));
    let leak = srv.request(Method::GET, "/v1/files/leak", Some(&alice), "").await;
    assert!(leak.status.is_client_error(), "{}: {}", leak.status, String::from_utf8_lossy(&leak.body));
    assert!(!String::from_utf8_lossy(&leak.body).contains("root:"), "the host's passwd leaked");

    let data = srv.stop_keeping_data().await;
    let mut settings_again = imagentx_sandbox::api::ServerSettings {
        data_dir: data.path().to_owned(),
        max_instances: 8,
        ..Default::default()
    };
    settings(&mut settings_again);
    let srv = server::TestServer::start_in(data, Policy::default(), settings_again).await;
    let alice = srv.add_user("alice2", "standard", false).await;
    let versions = srv.request(Method::GET, "/v1/tools/python", Some(&alice), "").await;
    let body = versions.json();
    assert_eq!(body["versions"].as_array().map(Vec::len), Some(1), "a restart registered python again: {body}");
    let answer = srv
        .request(
            Method::POST,
            "/v1/tools/javascript/invoke",
            Some(&alice),
            json!({"input": {"code": "result = 2"}}).to_string(),
        )
        .await;
    assert_eq!(answer.json()["output"], json!({"stdout": "", "result": 2}));
    srv.stop().await;

    // `builtin_tools = false`: the same components are there, nothing is registered.
    let srv = server::TestServer::start_with(Policy::default(), |s| {
        settings(s);
        s.builtin_tools = false;
    })
    .await;
    let key = srv.add_user("dan", "standard", false).await;
    let tools = srv.request(Method::GET, "/v1/tools", Some(&key), "").await.json();
    assert_eq!(tools["tools"], json!([]), "{tools}");
}

async fn invoke(srv: &server::TestServer, key: &str, tool: &str, code: &str) -> server::Answer {
    let body = json!({"input": {"code": code, "args": {"n": 4}}}).to_string();
    srv.request(Method::POST, &format!("/v1/tools/{tool}/invoke"), Some(key), body).await
}

/// `imagentx-sandbox run python` runs the built-in by name; unbuilt, it says
/// how to build it.
#[test]
fn the_command_line_runs_a_built_in_by_name() {
    let data = tempfile::tempdir().unwrap();
    // The CLI's artifact cache is the tests' shared one: no compiling again.
    std::fs::create_dir_all(common::artifact_cache()).unwrap();
    std::os::unix::fs::symlink(common::artifact_cache(), data.path().join("cache")).unwrap();
    let run = |dir: &Path, input: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox"));
        command.args(["run", "--user", "carol", "--data-dir"]).arg(data.path()).arg("python");
        common::output_with_stdin(command.env("IMAGENTX_INTERPRETERS", dir), input)
    };
    let out = run(&built_dir(), r#"{"code": "import os\nresult = sorted(os.listdir('/data')) + [6 * 7]"}"#);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["status"].as_str(), report["tool"].as_str()), (Some("ok"), Some("python")));
    assert_eq!(report["output"]["result"], json!([42]));

    let out = run(&data.path().join("nothing-here"), "{}");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("scripts/build-interpreters"), "{stderr}");
}
