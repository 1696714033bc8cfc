//! The operator console (issue 17) in a real browser: Debian's headless
//! Chromium, driven through chromedriver by Selenium (from PyPI, in
//! `target/console-venv`), runs `tests/console/drive.py` against a real
//! server on a loopback port. The script signs in (a user's key and a bad
//! one are refused), sees a call made over the API appear, filters the audit
//! trail, suspends a user and sees the API refuse them, lifts it, and reads
//! an anomaly's evidence. Screenshots go to `IMAGENTX_CONSOLE_SCREENSHOTS`
//! (the ones in `docs/` were made so).
//!
//! Without Chromium the test says so and passes, unless
//! `IMAGENTX_REQUIRE_BROWSER=1` (CI sets it, and installs the browser).

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::json;
use server::TestServer;

const SELENIUM: &str = "selenium==4.50.0";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn browser_present() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    assert!(
        std::env::var_os("IMAGENTX_REQUIRE_BROWSER").is_none(),
        "IMAGENTX_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing \
         (apt-get install chromium chromium-driver)"
    );
    eprintln!("skipped: no {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)");
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_watches_a_call_suspends_a_user_and_reads_an_anomaly_in_a_real_browser() {
    if !browser_present() {
        return;
    }
    let python = common::venv_python("console-venv", SELENIUM);
    let srv = TestServer::start().await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "standard", false).await;
    let mallory = srv.add_user("mallory", "standard", false).await;

    let screenshots = std::env::var("IMAGENTX_CONSOLE_SCREENSHOTS").unwrap_or_default();
    let config = json!({
        "url": format!("http://{}", srv.addr),
        "admin": srv.admin,
        "alice": alice,
        "mallory": mallory,
        "screenshots": screenshots,
        "chromium": CHROMIUM,
        "chromedriver": CHROMEDRIVER,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.py");
    let mut driver = Command::new(python);
    // Selenium must not look for (or download) a driver of its own.
    driver.arg(script).arg(config.to_string()).env("SE_OFFLINE", "true");
    let ran = tokio::task::spawn_blocking(move || driver.output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&ran.stdout), String::from_utf8_lossy(&ran.stderr));
    assert!(ran.status.success(), "the browser test failed ({}):\n{stdout}\n{stderr}", ran.status);
    assert!(stdout.contains("console: all checks passed"), "{stdout}");

    // What the browser did is what the audit trail holds: the admin's
    // suspension of alice and its lifting, and the rule's of mallory.
    let suspended = srv.get("/v1/audit?kind=user_suspended", &srv.admin).await.json();
    let by: Vec<(String, String)> = suspended["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["user"].as_str().unwrap().to_owned(), r["actor"].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert!(by.contains(&("alice".to_owned(), "root".to_owned())), "{by:?}");
    assert!(by.contains(&("mallory".to_owned(), "behaviour".to_owned())), "{by:?}");
    let lifted = srv.get("/v1/audit?kind=user_unsuspended&user=alice", &srv.admin).await.json();
    assert_eq!(lifted["records"].as_array().unwrap().len(), 1, "{lifted}");
    srv.assert_healthy().await;
}

#[tokio::test]
async fn the_console_is_served_whole_with_a_strict_policy_and_no_data_in_it() {
    let srv = TestServer::start().await;
    srv.add_user("alice", "standard", false).await;
    for (path, content_type) in
        [("/console", "text/html"), ("/console/app.js", "text/javascript"), ("/console/app.css", "text/css")]
    {
        let a = srv.request(Method::GET, path, None, Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        let header = |name: &str| a.headers.get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        assert!(header("content-type").starts_with(content_type), "{path}: {}", header("content-type"));
        let policy = header("content-security-policy");
        assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"), "{path}: {policy}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        let body = String::from_utf8_lossy(&a.body);
        assert!(!body.contains("alice") && !body.contains(&srv.admin), "{path} holds a user's name or key");
    }
    // The console's data are the admin API's: a user's key is refused there.
    let alice = srv.add_user("alice2", "standard", false).await;
    for path in ["/v1/live", "/v1/stats?by=user", "/v1/users", "/v1/audit"] {
        assert_eq!(srv.get(path, &alice).await.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(srv.request(Method::GET, path, None, Bytes::new()).await.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let slash = srv.request(Method::GET, "/console/", None, Bytes::new()).await;
    let location = slash.headers.get("location").unwrap().to_str().unwrap();
    assert_eq!((slash.status, location), (StatusCode::PERMANENT_REDIRECT, "../console"));
    let missing = srv.request(Method::GET, "/console/secrets.txt", None, Bytes::new()).await;
    assert_eq!((missing.status, missing.error_code()), (StatusCode::NOT_FOUND, "no_route".to_owned()));
}
