//! The built-in `python-data` tool: the host's Python with numpy, pandas and
//! matplotlib (real wheels from PyPI, built by `scripts/build-interpreters
//! python-data`) in the real jail, through a real server. The README's
//! walkthrough as a test, then what an attacker would try with it.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use base64::Engine as _;
use hyper::{Method, StatusCode};
use imagentx_sandbox::policy::Policy;
use serde_json::{Value, json};
use server::TestServer;

/// A server with the built-ins registered (python-data among them, with
/// `warm` jails kept warm), or `None` when this host cannot run the jail
/// (then the test says so).
async fn serve(warm: usize) -> Option<TestServer> {
    if !nix::unistd::geteuid().is_root() {
        common::skip_unprivileged("the python-data tests");
        return None;
    }
    let dir = common::interpreters::built_dir();
    let srv = TestServer::start_with(Policy::default(), |s| {
        s.interpreters_dir = dir;
        s.artifact_cache_dir = Some(common::artifact_cache());
        s.jail.warm = warm;
    })
    .await;
    let tools = srv.get("/v1/tools", &srv.admin).await.json();
    let listed = tools["tools"].as_array().unwrap().iter().any(|t| t["name"] == "python-data");
    assert!(listed, "python-data is not registered: {tools}");
    Some(srv)
}

/// Runs `code` in python-data; with warm jails kept, in one of them (it
/// waits for one to be ready).
async fn call(srv: &TestServer, key: &str, code: &str, timeout_ms: u64) -> Value {
    let metrics = srv.get("/metrics", "").await;
    if String::from_utf8_lossy(&metrics.body).contains("imagentx_warm_jails{") {
        warm_ready(srv, 1.0).await;
    }
    let body = json!({"input": {"code": code}, "timeout_ms": timeout_ms});
    let answer = srv.invoke("python-data", key, body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    answer.json()
}

/// The width and height a PNG's header says.
fn png_size(png: &[u8]) -> (u64, u64) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |b: &[u8]| u64::from(u32::from_be_bytes(b.try_into().unwrap()));
    (be(&png[16..20]), be(&png[20..24]))
}

/// README: upload a CSV, summarise it with pandas, get a chart back as a PNG
/// (fresh jails: the other tests run python-data warm).
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_walkthrough_csv_to_pandas_summary_and_a_png_chart() {
    let Some(srv) = serve(0).await else { return };
    let alice = srv.add_user("alice", "standard", false).await;
    let csv = "region,month,amount\nnorth,1,10\nsouth,1,5\nnorth,2,7\nsouth,2,9\neast,2,4\n";
    let put = srv.request(Method::PUT, "/v1/files/sales.csv", Some(&alice), csv).await;
    assert_eq!(put.status, StatusCode::OK);
    let code = "import pandas as pd\nimport matplotlib.pyplot as plt\n\
                df = pd.read_csv('/data/sales.csv')\n\
                totals = df.groupby('region')['amount'].sum().sort_values()\n\
                totals.plot.barh(title='Sales by region')\nplt.tight_layout()\nplt.show()\n\
                print(len(df), 'rows')\n\
                df.groupby('region')['amount'].agg(['sum', 'mean'])";
    let report = call(&srv, &alice, code, 30_000).await;
    assert_eq!(report["status"], "ok", "{report}");
    let output = &report["output"];
    assert_eq!(output["stdout"], "5 rows\n");
    let table = &output["result"];
    assert_eq!(table["type"], "dataframe", "{table}");
    assert_eq!(table["shape"], json!([3, 2]));
    let north = table["records"].as_array().unwrap().iter().find(|r| r["region"] == "north").unwrap();
    assert_eq!((north["sum"].as_f64(), north["mean"].as_f64()), (Some(17.0), Some(8.5)), "{table}");
    assert!(table["text"].as_str().unwrap().contains("north"), "{table}");
    let images = output["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{output}");
    let png = base64::engine::general_purpose::STANDARD.decode(images[0]["data"].as_str().unwrap()).unwrap();
    let (width, height) = png_size(&png);
    assert_eq!((json!(width), json!(height)), (images[0]["width"].clone(), images[0]["height"].clone()));
    assert!(width >= 100 && height >= 100, "{width}x{height}");
    assert_eq!(report["runtime"], "native");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_code_stays_in_its_jail_and_within_its_tier() {
    let Some(srv) = serve(2).await else { return };
    let alice = srv.add_user("alice", "free", false).await;
    let bob = srv.add_user("bob", "free", false).await;
    let put = srv.request(Method::PUT, "/v1/files/secret.csv", Some(&bob), "a\n1\n").await;
    assert_eq!(put.status, StatusCode::OK);

    // No network: the standard library, sockets, and pandas reading a URL.
    let code = r#"
import socket, urllib.request, pandas as pd
seen = {}
for name, attempt in [
    ("urllib", lambda: urllib.request.urlopen("http://1.1.1.1/", timeout=2)),
    ("socket", lambda: socket.create_connection(("1.1.1.1", 80), timeout=2)),
    ("pandas", lambda: pd.read_csv("http://1.1.1.1/x.csv")),
    ("dns", lambda: socket.getaddrinfo("pypi.org", 443)),
]:
    try:
        attempt()
        seen[name] = "CONNECTED"
    except Exception as e:
        seen[name] = type(e).__name__
seen
"#;
    let report = call(&srv, &alice, code, 20_000).await;
    assert_eq!(report["status"], "ok", "{report}");
    let seen = report["output"]["result"].as_object().unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.values().all(|v| v != "CONNECTED"), "a connection got out: {seen:?}");

    // The host's files and bob's data are out of reach, through numpy and pandas too.
    let code = r#"
import os, numpy as np, pandas as pd
seen = {}
for name, attempt in [
    ("shadow", lambda: open("/etc/shadow").read()),
    ("numpy", lambda: np.load("/etc/shadow", allow_pickle=False)),
    ("pandas", lambda: pd.read_csv("/data/../bob/secret.csv")),
    ("users", lambda: os.listdir("/data/..")),
    ("proc", lambda: open("/proc/1/environ").read()),
]:
    try:
        seen[name] = repr(attempt())[:200]
    except Exception as e:
        seen[name] = type(e).__name__
seen["data"] = sorted(os.listdir("/data"))
seen
"#;
    let report = call(&srv, &alice, code, 20_000).await;
    assert_eq!(report["status"], "ok", "{report}");
    let seen = &report["output"]["result"];
    for name in ["shadow", "numpy", "pandas"] {
        assert!(seen[name].as_str().unwrap().ends_with("Error"), "{name} was read: {seen}");
    }
    assert!(!seen["users"].as_str().unwrap().contains("bob"), "{seen}");
    assert!(!seen["proc"].as_str().unwrap().contains("PATH="), "{seen}");
    assert_eq!(seen["data"], json!([]), "alice sees another user's files: {seen}");

    // numpy growing past the tier's 256 MiB: memory_limit.
    let code = "import numpy as np\nheld = []\nwhile True:\n    held.append(np.ones(25_000_000))\n";
    let report = call(&srv, &alice, code, 30_000).await;
    assert_eq!(report["status"], "memory_limit", "{report}");

    // A multiprocessing fork bomb: pids_limit.
    let code = r#"
import multiprocessing as mp
def bomb():
    while True:
        mp.Process(target=bomb).start()
bomb()
"#;
    let report = call(&srv, &alice, code, 20_000).await;
    assert_eq!(report["status"], "pids_limit", "{report}");

    // A spinning loop: stopped by its CPU or wall-clock budget.
    let report = call(&srv, &alice, "while True:\n    pass", 3_000).await;
    assert!(["cpu_limit", "timeout"].contains(&report["status"].as_str().unwrap()), "{report}");

    // A chart flood is capped; a figure of 100,000 × 100,000 pixels is not drawn.
    let code = r#"
import matplotlib.pyplot as plt
for i in range(40):
    plt.figure()
    plt.plot([i, i + 1])
"drawn"
"#;
    let report = call(&srv, &alice, code, 30_000).await;
    assert_eq!(report["status"], "ok", "{report}");
    let output = &report["output"];
    assert_eq!(output["images"].as_array().unwrap().len(), 8, "{}", output["images_note"]);
    assert_eq!(output["images_truncated"], true);
    assert!(output["images_note"].as_str().unwrap().contains("more figures"), "{output}");
    let code = "import matplotlib.pyplot as plt\nplt.figure(figsize=(1000, 1000), dpi=100)\n'drawn'";
    let report = call(&srv, &alice, code, 30_000).await;
    let output = &report["output"];
    assert!(output.get("images").is_none(), "{output}");
    assert!(output["images_note"].as_str().unwrap().contains("100000x100000"), "{output}");

    // And the server, and the tool, go on.
    let report = call(&srv, &alice, "import numpy as np\nint(np.arange(10).sum())", 20_000).await;
    assert_eq!(report["output"]["result"], 45, "{report}");
    srv.assert_healthy().await;
    // Every one of these calls ran in a warm jail.
    assert_eq!(metric(&srv, r#"imagentx_warm_calls_total{ran="fresh",tool="python-data"}"#).await, 0.0);
}

/// A gauge or counter line of `/metrics`, by its name with labels.
async fn metric(srv: &TestServer, series: &str) -> f64 {
    let text = String::from_utf8(srv.get("/metrics", "").await.body.to_vec()).unwrap();
    let line = text.lines().find(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == series));
    line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Waits (up to a minute) until the pool has `n` warm jails ready.
async fn warm_ready(srv: &TestServer, n: f64) {
    let series = r#"imagentx_warm_jails{state="ready",tool="python-data"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric(srv, series).await < n {
        assert!(std::time::Instant::now() < deadline, "no {n} warm jails ready within a minute");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Jails started before their call: each serves exactly one call, and what
/// one user left in it (files in /tmp, interpreter state, their /data) is
/// never seen by the next. The user's /data is attached when the call comes,
/// read-write, as the working directory; the runner took its Landlock rules
/// (`IMAGENTX_LANDLOCK`, gone from the environment: applied, see the test below).
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_jail_serves_one_call_and_never_carries_a_user_over() {
    let Some(srv) = serve(2).await else { return };
    let alice = srv.add_user("alice", "free", false).await;
    let bob = srv.add_user("bob", "standard", false).await;
    let warm = r#"imagentx_warm_calls_total{ran="warm",tool="python-data"}"#;
    warm_ready(&srv, 2.0).await;
    let before = metric(&srv, warm).await;

    let code = r#"
import builtins, os
builtins.left_by = "alice"
open("/tmp/alice-was-here", "w").write("x")
open("/data/alice.txt", "w").write("alice's")
os.getcwd()
"#;
    let report = call(&srv, &alice, code, 20_000).await;
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(report["output"]["result"], "/data", "{report}");

    let probe = r#"
import builtins, os
seen = {
    "left_by": getattr(builtins, "left_by", None),
    "tmp": sorted(n for n in os.listdir("/tmp") if not n.startswith(".")),
    "data": sorted(os.listdir("/data")),
    "cwd": os.getcwd(),
    "env": sorted(k for k in os.environ if k.startswith("IMAGENTX_")),
}
seen
"#;
    for key in [&bob, &alice] {
        warm_ready(&srv, 1.0).await;
        let report = call(&srv, key, probe, 20_000).await;
        assert_eq!(report["status"], "ok", "{report}");
        let seen = &report["output"]["result"];
        assert_eq!(seen["left_by"], Value::Null, "a warm jail served a second call: {seen}");
        assert_eq!(seen["tmp"], json!([]), "{seen}");
        assert_eq!(seen["cwd"], "/data", "{seen}");
        assert_eq!(seen["env"], json!(["IMAGENTX_PYTHON_DATA_BUILD"]), "{seen}");
        let mine = if *key == alice { json!(["alice.txt"]) } else { json!([]) };
        assert_eq!(seen["data"], mine, "{seen}");
    }
    // A file the code left open is flushed at its end, as a normal exit would.
    let report = call(&srv, &alice, "f = open('/data/unclosed.txt', 'w')\nf.write('kept')", 20_000).await;
    assert_eq!(report["status"], "ok", "{report}");
    let got = srv.get("/v1/files/unclosed.txt", &alice).await;
    assert_eq!(&got.body[..], b"kept", "an open file lost its buffered write");
    // bob's file went to bob's directory, through his warm jail's /data.
    let report =
        call(&srv, &bob, "open('/data/bob.txt', 'w').write('b')\nimport os\nos.listdir('/data')", 20_000).await;
    assert_eq!(report["output"]["result"], json!(["bob.txt"]), "{report}");
    let got = srv.get("/v1/files/alice.txt", &alice).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(&got.body[..], b"alice's");
    let text = String::from_utf8(srv.get("/metrics", "").await.body.to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("imagentx_warm")).collect();
    assert!(metric(&srv, warm).await >= before + 5.0, "the calls did not run warm: {lines:#?}");
    srv.assert_healthy().await;
}

/// The Landlock rules a warm jail's runner applies to itself (`confine.py`,
/// run here by the host's Python): writes outside the allowed directory are
/// refused once applied, and a process with a second thread refuses to
/// apply them (they would bind one thread only).
#[test]
fn the_warm_runners_own_landlock_rules_hold_and_demand_one_thread() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interpreters/python-data");
    let script = r#"
import ctypes, os, sys, tempfile, threading, time
sys.path.insert(0, sys.argv[1])
from confine import landlock
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
if abi < 1:
    print("no-landlock")
    sys.exit(0)
handled = (1 << 13) - 1 | ((1 << 13) if abi >= 2 else 0) | ((1 << 14) if abi >= 3 else 0)
allowed, other = tempfile.mkdtemp(), tempfile.mkdtemp()
rules = f"{handled};/={1 | 4 | 8};{allowed}={handled & ~1}"
if sys.argv[2] == "thread":
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
    try:
        landlock(rules)
        print("applied")
    except RuntimeError as e:
        print("refused:", e)
    sys.exit(0)
libc.prctl(38, 1, 0, 0, 0)  # no_new_privs, as in the jail
landlock(rules)
open(os.path.join(allowed, "ok"), "w").write("x")
try:
    open(os.path.join(other, "no"), "w").write("x")
    print("written")
except PermissionError:
    print("denied")
"#;
    let run = |mode: &str| {
        let out = std::process::Command::new("python3")
            .args(["-I", "-c", script, dir.to_str().unwrap(), mode])
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let confined = run("one");
    if confined == "no-landlock" {
        eprintln!("SKIPPED: this kernel has no Landlock");
        return;
    }
    assert_eq!(confined, "denied", "a write outside the rules got through");
    let threaded = run("thread");
    assert!(threaded.starts_with("refused: 2 threads"), "{threaded}");
}

async fn session_step(srv: &TestServer, key: &str, id: &str, body: Value) -> (StatusCode, Value) {
    let a = srv.request(Method::POST, &format!("/v1/sessions/{id}/run"), Some(key), body.to_string()).await;
    let json = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
    (a.status, json)
}

/// python-data sessions: an agent's DataFrame lives on between steps in one
/// jailed interpreter (its state survives an exception), each step with its
/// own budget; another user sees neither the session nor its data; a step
/// that runs out of time ends the session, and its jail goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_data_session_keeps_its_dataframe_between_steps() {
    let Some(srv) = serve(2).await else { return };
    let alice = srv.add_user("alice", "free", false).await;
    let bob = srv.add_user("bob", "free", false).await;
    let csv = "region,amount\nnorth,10\nsouth,5\nnorth,7\n";
    let put = srv.request(Method::PUT, "/v1/files/sales.csv", Some(&alice), csv).await;
    assert_eq!(put.status, StatusCode::OK);
    let open = |key: String| {
        let srv = &srv;
        async move {
            let a = srv.request(Method::POST, "/v1/sessions", Some(&key), r#"{"tool": "python-data"}"#).await;
            assert_eq!(a.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&a.body));
            a.json()["id"].as_str().unwrap().to_owned()
        }
    };
    let id = open(alice.clone()).await;
    let ok = |(status, report): (StatusCode, Value)| {
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["status"], "ok", "{report}");
        report["output"].clone()
    };
    let step = |code: &str| json!({"code": code});
    let out =
        ok(session_step(&srv, &alice, &id, step("import pandas as pd\ndf = pd.read_csv('sales.csv')\nlen(df)")).await);
    assert_eq!(out["result"], 3, "{out}");
    let out = ok(session_step(&srv, &alice, &id, step("df.groupby('region').amount.sum()")).await);
    assert_eq!(out["result"]["type"], "series", "{out}");
    assert_eq!(out["result"]["records"], json!([{"region": "north", "amount": 17}, {"region": "south", "amount": 5}]));
    let out = ok(session_step(&srv, &alice, &id, step("df.plot.bar(x='region', y='amount')\nprint('drawn')")).await);
    assert_eq!(out["stdout"], "drawn\n");
    assert_eq!(out["images"].as_array().map(Vec::len), Some(1), "{out}");
    // An exception is that step's error; the session and its state go on.
    let (status, report) = session_step(&srv, &alice, &id, step("print('before')\n1 / 0")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["status"], "tool_error", "{report}");
    assert!(report["stderr"].as_str().unwrap().contains("ZeroDivisionError"), "{report}");
    assert_eq!(report["stdout"], "before\n", "{report}");
    let out = ok(session_step(&srv, &alice, &id, step("held = open('held-by-alice', 'w')\nlist(df.shape)")).await);
    assert_eq!(out["result"], json!([3, 2]));
    let info = srv.get(&format!("/v1/sessions/{id}"), &alice).await.json();
    assert_eq!(info["steps"], 5, "{info}");
    assert!(info["memory_bytes"].as_u64().unwrap() > 20 << 20, "the jail's memory is the session's: {info}");

    // bob: alice's session is not his, and his own sees his (empty) /data.
    assert_eq!(srv.get(&format!("/v1/sessions/{id}"), &bob).await.status, StatusCode::NOT_FOUND);
    let (status, _) = session_step(&srv, &bob, &id, step("df")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let bobs = open(bob.clone()).await;
    let code = "import os\nseen = [os.getcwd(), os.listdir('/data'), 'df' in globals()]\nheld = open('held-by-bob', 'w')\nseen";
    let out = ok(session_step(&srv, &bob, &bobs, step(code)).await);
    assert_eq!(out["result"], json!(["/data", [], false]), "{out}");
    assert!(holders("held-by-alice") > 0 && holders("held-by-bob") > 0, "the sessions' interpreters hold their files");

    // A spinning step runs out of its budget: the session ends with it.
    let (status, report) =
        session_step(&srv, &alice, &id, json!({"code": "while True:\n    pass", "timeout_ms": 1500})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(["timeout", "cpu_limit"].contains(&report["status"].as_str().unwrap()), "{report}");
    let (status, _) = session_step(&srv, &alice, &id, step("df")).await;
    assert_eq!(status, StatusCode::GONE);
    // bob's session grows numpy arrays past the tier's 256 MiB: its cgroup
    // stops it, and the session ends.
    let code = "import numpy as np\ngrowing = []\nwhile True:\n    growing.append(np.ones(25_000_000))";
    let (status, report) = session_step(&srv, &bob, &bobs, json!({"code": code, "timeout_ms": 20_000})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["status"], "memory_limit", "{report}");
    let info = srv.get(&format!("/v1/sessions/{bobs}"), &bob).await.json();
    assert_eq!(info["state"], "ended", "{info}");
    assert_eq!(info["reason"], "memory_limit", "{info}");
    // Both sessions' jails are gone: no process holds the files their
    // interpreters kept open.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while holders("held-by-alice") + holders("held-by-bob") > 0 {
        assert!(std::time::Instant::now() < deadline, "a session's interpreter outlived its session");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    srv.assert_healthy().await;
}

/// Processes of this host holding a file whose path ends with `name` open.
fn holders(name: &str) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_dir(p.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy().ends_with(name)))
        })
        .count()
}

/// What a session's code could leave behind: an answer past the output cap
/// is that step's error (the session goes on); a thread left spinning
/// between steps ends the session once it used a step's CPU; a session
/// closed while a step runs stops the step, and its interpreter is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_data_session_ends_on_what_would_outlive_its_steps() {
    let Some(srv) = serve(2).await else { return };
    let alice = srv.add_user("alice", "standard", false).await;
    let open = |timeout_ms: u64| {
        let (srv, alice) = (&srv, alice.clone());
        async move {
            let body = json!({"tool": "python-data", "timeout_ms": timeout_ms}).to_string();
            let a = srv.request(Method::POST, "/v1/sessions", Some(&alice), body).await;
            assert_eq!(a.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&a.body));
            a.json()["id"].as_str().unwrap().to_owned()
        }
    };
    let step = |code: &str| json!({"code": code});

    // 250,000 control characters printed: 1.5 MB once JSON-escaped, past the 1 MiB cap.
    let id = open(10_000).await;
    let (_, report) = session_step(&srv, &alice, &id, step("kept = 42\nprint('\\x01' * 250_000)")).await;
    assert_eq!(report["status"], "tool_error", "{report}");
    assert!(report["stderr"].as_str().unwrap().contains("output cap"), "{report}");
    let (_, report) = session_step(&srv, &alice, &id, step("kept")).await;
    assert_eq!(report["output"]["result"], 42, "{report}");

    // A thread left spinning: a step's CPU (0.5 core × 2 s = 1 s) is all it gets between steps.
    let id = open(2_000).await;
    let spin = "import threading\ndef spin():\n    while True:\n        pass\nthreading.Thread(target=spin, daemon=True).start()";
    let (_, report) = session_step(&srv, &alice, &id, step(spin)).await;
    assert_eq!(report["status"], "ok", "{report}");
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let (status, report) = session_step(&srv, &alice, &id, step("1")).await;
    let ended = status == StatusCode::GONE || report["status"] == "crashed";
    assert!(ended, "a session whose thread spun between steps goes on: {status} {report}");
    if status == StatusCode::OK {
        assert!(report["error"].as_str().unwrap().contains("between steps"), "{report}");
    }

    // DELETE while a step spins: the step is cancelled, the interpreter gone.
    let id = open(20_000).await;
    let (_, report) = session_step(&srv, &alice, &id, step("held = open('held-while-spinning', 'w')\n1")).await;
    assert_eq!(report["status"], "ok", "{report}");
    let running = {
        let (addr, key, id) = (srv.addr.to_string(), alice.clone(), id.clone());
        tokio::spawn(async move {
            let body = json!({"code": "while True:\n    pass"}).to_string();
            server::http(&addr, Method::POST, &format!("/v1/sessions/{id}/run"), &key, body).await.json()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let closed = srv.request(Method::DELETE, &format!("/v1/sessions/{id}"), Some(&alice), "").await;
    assert_eq!(closed.status, StatusCode::OK);
    let report = running.await.unwrap();
    assert_eq!(report["status"], "cancelled", "{report}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while holders("held-while-spinning") > 0 {
        assert!(std::time::Instant::now() < deadline, "a closed session's interpreter still runs");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    srv.assert_healthy().await;
}
