//! The benchmark harness does not rot: `imagentx-sandbox bench --tiny` runs
//! every suite on a few samples and writes a well-formed report. Nothing
//! here is timed or compared; the figures of a tiny run mean nothing.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imagentx-sandbox")).arg("bench").args(args).output().expect("running bench")
}

#[test]
fn tiny_run_writes_samples_summary_report_and_plots() {
    let guests = common::guest("probe").parent().expect("guest dir").to_owned();
    common::guest("sdk-probe");
    let out = tempfile::tempdir().expect("out dir");
    let report = out.path().join("report");
    let run = bench(&[
        "--tiny",
        "--out",
        report.to_str().unwrap_or_default(),
        "--guests",
        guests.to_str().unwrap_or_default(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json")).expect("summary.json"))
            .expect("JSON");
    assert_eq!(summary["failed"], serde_json::json!([]));
    assert!(summary["machine"]["cpus"].as_u64().unwrap_or(0) >= 1);
    let series = summary["series"].as_array().expect("series");
    let privileged = nix::unistd::geteuid().is_root();
    let mut suites: Vec<&str> = vec!["wasm", "http", "density", "teardown"];
    if privileged {
        suites.push("native");
    } else {
        common::skip_unprivileged("the native rows of the benchmark harness");
    }
    for suite in suites {
        assert!(series.iter().any(|s| s["suite"] == suite), "no {suite} series in {series:?}");
    }
    let mut total = 0;
    for s in series {
        let n = s["n"].as_u64().expect("n");
        assert!(n >= 1, "{s}");
        total += n;
        for key in ["p50_us", "p90_us", "p99_us", "max_us"] {
            assert!(s[key].as_f64().is_some_and(|v| v >= 0.0), "{key} in {s}");
        }
        assert!(s["p50_us"].as_f64() <= s["p99_us"].as_f64() && s["p99_us"].as_f64() <= s["max_us"].as_f64(), "{s}");
        assert!(s["success_rate"].as_f64().is_some_and(|r| (0.0..=1.0).contains(&r)), "{s}");
        assert!(s["throughput_per_s"].as_f64().is_some_and(|r| r > 0.0), "{s}");
    }
    // The in-process calls, the HTTP calls and the jail runs all answered.
    for s in series.iter().filter(|s| s["suite"] == "wasm" || s["suite"] == "http" || s["suite"] == "native") {
        assert_eq!(s["success_rate"], 1.0, "{s}");
    }
    assert!(
        summary["figures"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["name"].as_str().is_some_and(|n| n.contains("per GiB"))))
    );

    let csv = std::fs::read_to_string(report.join("samples.csv")).expect("samples.csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("suite,case,who,concurrency,index,latency_us,ok"));
    assert_eq!(lines.count() as u64, total, "one CSV row per sample");

    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    assert!(md.starts_with("# Benchmark report"));
    let plots: Vec<&str> =
        md.lines().filter_map(|l| l.strip_prefix("![")).filter_map(|l| l.split("](").nth(1)).collect();
    assert!(plots.len() >= 5, "plots linked: {plots:?}");
    for plot in plots {
        let file = plot.trim_end_matches(')');
        let svg = std::fs::read_to_string(report.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{file}");
        assert!(svg.contains("<polyline") || svg.contains("<circle"), "{file} draws nothing");
    }
}

#[test]
fn missing_guests_are_a_clear_error() {
    let out = tempfile::tempdir().expect("out dir");
    let run = bench(&["--tiny", "--guests", "/nonexistent", "--out", out.path().to_str().unwrap_or_default()]);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("/nonexistent/probe.wasm is missing"), "{stderr}");
    assert!(!Path::new(out.path()).join("summary.json").exists());
}
