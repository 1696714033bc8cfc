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

/// A server with the built-ins registered (python-data among them), or
/// `None` when this host cannot run the jail (then the test says so).
async fn serve() -> Option<TestServer> {
    if !nix::unistd::geteuid().is_root() {
        common::skip_unprivileged("the python-data tests");
        return None;
    }
    let dir = common::interpreters::built_dir();
    let srv = TestServer::start_with(Policy::default(), |s| {
        s.interpreters_dir = dir;
        s.artifact_cache_dir = Some(common::artifact_cache());
    })
    .await;
    let tools = srv.get("/v1/tools", &srv.admin).await.json();
    let listed = tools["tools"].as_array().unwrap().iter().any(|t| t["name"] == "python-data");
    assert!(listed, "python-data is not registered: {tools}");
    Some(srv)
}

async fn call(srv: &TestServer, key: &str, code: &str, timeout_ms: u64) -> Value {
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

/// README: upload a CSV, summarise it with pandas, get a chart back as a PNG.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_walkthrough_csv_to_pandas_summary_and_a_png_chart() {
    let Some(srv) = serve().await else { return };
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
    let Some(srv) = serve().await else { return };
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
}
