//! Our Prometheus side, checked by Prometheus' own tool (`promtool`, from
//! Debian's `prometheus` package; CI installs it): the alerting rules in
//! `deploy/prometheus/alerts.yml` load, and a real server's `/metrics`, with
//! every family filled by real calls, passes `promtool check metrics` and has
//! every metric the rules and the Grafana dashboard query.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod common;
mod server;

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::json;
use server::TestServer;

/// `promtool`, or `None` where it is not installed (a skip, except in CI,
/// which sets `IMAGENTX_REQUIRE_PROMTOOL=1`).
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some("promtool");
    }
    let required = std::env::var_os("IMAGENTX_REQUIRE_PROMTOOL").is_some_and(|v| v == "1");
    assert!(!required, "promtool is not installed (apt-get install prometheus), and IMAGENTX_REQUIRE_PROMTOOL=1");
    eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
    None
}

#[test]
fn the_alerting_rules_load_in_promtool() {
    let Some(promtool) = promtool() else { return };
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let out = Command::new(promtool).args(["check", "rules", rules]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_servers_metrics_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let srv = TestServer::start_with(Default::default(), |s| s.behaviour.escape_attempts = 1).await;
    srv.register("probe", "probe").await;
    let alice = srv.add_user("alice", "free", false).await;
    srv.report("probe", &alice, json!({"input": {"op": "echo"}})).await;
    srv.report("probe", &alice, json!({"input": {"op": "sleep", "ms": 5000}, "timeout_ms": 50})).await;
    assert_eq!(srv.get("/v1/me", "ixs_nope").await.status, StatusCode::UNAUTHORIZED);
    // An escape: an anomaly, a suspension, and every behaviour family filled.
    assert_eq!(srv.get("/v1/audit", &alice).await.status, StatusCode::FORBIDDEN);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = srv.request(Method::GET, "/metrics", None, Bytes::new()).await.body;
        let text = String::from_utf8(text.to_vec()).unwrap();
        if text.contains("imagentx_responses_total{action=\"suspend\"} 1") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for family in
        ["imagentx_calls_total{", "imagentx_anomalies_total{", "imagentx_limits_hit_total", "imagentx_pool_occupancy"]
    {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");

    // Every metric the alerting rules and the Grafana dashboard query is one the server exports.
    let exported: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let dashboard = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/imagentx-sandbox.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.iter().all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())), "a panel without a query");
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/metrics.rs")).unwrap();
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/imagentx-sandbox.json"] {
        let queries = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut named = 0;
        for (i, _) in queries.match_indices("imagentx_") {
            let name: String = queries[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name == "imagentx_sandbox" {
                continue; // the dashboard's own name
            }
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
            // Warm jails' series are per tool with warm jails, which this server has none of (the
            // format has no empty family): those names are checked against what the source declares.
            let declared = family.starts_with("imagentx_warm_") && source.contains(&format!("\"{family}\""));
            assert!(exported.contains(&family) || declared, "{file} queries {name}, which /metrics does not export");
            named += 1;
        }
        assert!(named > 10, "{file}: {named} metrics");
    }
}
