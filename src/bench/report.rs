//! `bench-report/`: `samples.csv` (every timed operation), `summary.json`
//! (the machine, every series' summary, every figure, what was skipped),
//! `report.md` (the same as tables, with the plots), and the plots as SVG.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::svg::{Axis, Chart, Line};
use super::{Harness, Machine, Series, Suite, human_us};

pub fn write(h: &Harness, machine: &Machine, took: Duration, out: &Path) -> anyhow::Result<()> {
    let write =
        |name: &str, text: &str| std::fs::write(out.join(name), text).with_context(|| format!("writing {name}"));
    write("samples.csv", &samples_csv(&h.series))?;
    let summary = serde_json::json!({
        "machine": machine,
        "duration_s": took.as_secs_f64(),
        "series": h.series.iter().map(Series::summary).collect::<Vec<_>>(),
        "figures": h.figures,
        "skipped": h.skipped,
        "failed": h.failed,
    });
    write("summary.json", &serde_json::to_string_pretty(&summary)?)?;
    let plots = plots(h);
    for (file, _, chart) in &plots {
        write(file, &chart.svg())?;
    }
    write("report.md", &markdown(h, machine, took, &plots))?;
    Ok(())
}

fn samples_csv(series: &[Series]) -> String {
    let mut csv = String::from("suite,case,who,concurrency,index,latency_us,ok\n");
    for s in series {
        let suite = serde_json::to_value(s.suite).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let who = serde_json::to_value(s.who).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let case = format!("\"{}\"", s.case.replace('"', "\"\""));
        for (i, sample) in s.samples.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{suite},{case},{who},{},{i},{:.3},{}",
                s.concurrency,
                sample.latency.as_secs_f64() * 1e6,
                u8::from(sample.ok)
            );
        }
    }
    csv
}

fn latency_axis(label: &'static str) -> Axis {
    Axis { label, log: true, format: |v| human_us(v) }
}

fn count_axis(label: &'static str, log: bool) -> Axis {
    Axis { label, log, format: |v| if v >= 10_000.0 { format!("{:.0}k", v / 1e3) } else { format!("{v}") } }
}

/// A latency distribution: percentile against latency, one line a series.
fn cdf(title: &str, series: &[&Series]) -> Chart {
    let lines = series
        .iter()
        .map(|s| {
            let sorted = s.sorted_us();
            let n = sorted.len();
            let step = (n / 200).max(1);
            let mut points: Vec<(f64, f64)> =
                sorted.iter().enumerate().step_by(step).map(|(i, v)| (*v, 100.0 * (i + 1) as f64 / n as f64)).collect();
            if let Some(last) = sorted.last() {
                points.push((*last, 100.0));
            }
            let label =
                if s.concurrency > 1 { format!("{} ({} in flight)", s.case, s.concurrency) } else { s.case.clone() };
            Line { name: label, points }
        })
        .collect();
    Chart {
        title: title.to_owned(),
        x: latency_axis("latency (log scale)"),
        y: Axis { label: "percentile", log: false, format: |v| format!("{v:.0}") },
        lines,
    }
}

/// A figure against concurrency, one line a case.
fn versus(title: &str, series: &[&Series], y: Axis, metric: fn(&super::Summary) -> f64, suffix: &str) -> Chart {
    let mut cases: Vec<&str> = Vec::new();
    for s in series {
        if !cases.contains(&s.case.as_str()) {
            cases.push(&s.case);
        }
    }
    let lines = cases
        .iter()
        .map(|case| Line {
            name: format!("{case}{suffix}"),
            points: series
                .iter()
                .filter(|s| s.case == *case)
                .map(|s| (s.concurrency as f64, metric(&s.summary())))
                .collect(),
        })
        .collect();
    Chart { title: title.to_owned(), x: count_axis("in flight (log scale)", true), y, lines }
}

/// (file, suite, chart) for every plot that has data.
fn plots(h: &Harness) -> Vec<(String, Suite, Chart)> {
    let pick = |f: &dyn Fn(&Series) -> bool| -> Vec<&Series> { h.series.iter().filter(|s| f(s)).collect() };
    let mut plots = Vec::new();
    let mut add = |file: &str, suite: Suite, chart: Chart| {
        if chart.lines.iter().any(|l| !l.points.is_empty()) {
            plots.push((file.to_owned(), suite, chart));
        }
    };
    let inproc = pick(&|s| s.suite == Suite::Wasm && s.case.contains("tool call"));
    add("wasm-inprocess-latency.svg", Suite::Wasm, cdf("WASM in-process calls: latency distribution", &inproc));
    let oneshot = pick(&|s| s.suite == Suite::Wasm && s.memory_of == "the process (GNU time)");
    add("wasm-oneshot-latency.svg", Suite::Wasm, cdf("One process per call: ours, wasmtime CLI, fork/exec", &oneshot));
    let start = pick(&|s| s.suite == Suite::Http && s.case.starts_with("create-to-first-result"));
    add(
        "http-create-to-first-result.svg",
        Suite::Http,
        cdf("HTTP create-to-first-result (new connection per call)", &start),
    );
    let ramp = pick(&|s| s.suite == Suite::Http && s.case == super::http::RAMP);
    let mut latency =
        versus("HTTP ramp: latency against clients", &ramp, latency_axis("latency (log scale)"), |s| s.p50_us, " p50");
    latency.lines.extend(versus("", &ramp, latency_axis(""), |s| s.p99_us, " p99").lines);
    add("http-ramp-latency.svg", Suite::Http, latency);
    add(
        "http-ramp-throughput.svg",
        Suite::Http,
        versus(
            "HTTP ramp: calls per second against clients",
            &ramp,
            count_axis("calls/s", false),
            |s| s.throughput_per_s,
            "",
        ),
    );
    let native_seq = pick(&|s| s.suite == Suite::Native && s.concurrency == 1);
    add("native-latency.svg", Suite::Native, cdf("Native: one run at a time, latency distribution", &native_seq));
    let native = pick(&|s| s.suite == Suite::Native);
    add(
        "native-concurrency-latency.svg",
        Suite::Native,
        versus(
            "Native: median latency against runs in flight",
            &native,
            latency_axis("p50 latency (log scale)"),
            |s| s.p50_us,
            "",
        ),
    );
    add(
        "native-concurrency-throughput.svg",
        Suite::Native,
        versus(
            "Native: runs per second against runs in flight",
            &native,
            count_axis("runs/s", false),
            |s| s.throughput_per_s,
            "",
        ),
    );
    let teardown = pick(&|s| s.suite == Suite::Teardown);
    add("teardown.svg", Suite::Teardown, cdf("Teardown of a runaway: time after its deadline", &teardown));
    plots
}

fn markdown(h: &Harness, m: &Machine, took: Duration, plots: &[(String, Suite, Chart)]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark report\n");
    let _ = writeln!(
        md,
        "- machine: {} cores ({}), {:.0} GiB, Linux {}\n- commit: {}; run started {} ({} size), took {:.0} s\n- command: `{}`\n",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.commit,
        m.started_at,
        m.size,
        took.as_secs_f64(),
        m.command
    );
    let _ = writeln!(
        md,
        "Latency per operation; *per s* is operations completed per second of the series' wall time \
         (with several in flight, the aggregate); *ok* the share that answered as expected; *peak memory* \
         is whose it says. Peers and the floor ran in the same run, on the same machine.\n"
    );
    for suite in Suite::ALL {
        let series: Vec<&Series> = h.series.iter().filter(|s| s.suite == suite).collect();
        let figures: Vec<_> = h.figures.iter().filter(|f| f.suite == suite).collect();
        if series.is_empty() && figures.is_empty() {
            continue;
        }
        let _ = writeln!(md, "## {}\n", suite.title());
        if !series.is_empty() {
            let _ = writeln!(md, "| case | who | in flight | n | p50 | p90 | p99 | max | per s | ok | peak memory |");
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
            for s in series {
                let s = s.summary();
                let memory = s.peak_memory_mib.map_or("-".to_owned(), |v| format!("{v:.1} MiB ({})", s.memory_of));
                let figures = s.figures().join(" | ");
                let _ =
                    writeln!(md, "| {} | {:?} | {} | {} | {figures} | {memory} |", s.case, s.who, s.concurrency, s.n);
            }
            md.push('\n');
        }
        if !figures.is_empty() {
            let _ = writeln!(md, "| figure | value | note |\n|---|---|---|");
            for f in figures {
                let _ = writeln!(md, "| {} | {} {} | {} |", f.name, super::human_value(f.value), f.unit, f.note);
            }
            md.push('\n');
        }
        for (file, _, chart) in plots.iter().filter(|p| p.1 == suite) {
            let _ = writeln!(md, "![{}]({file})\n", chart.title);
        }
    }
    if !h.skipped.is_empty() {
        let _ = writeln!(md, "## Not measured\n");
        for s in &h.skipped {
            let _ = writeln!(md, "- {s}");
        }
        md.push('\n');
    }
    if !h.failed.is_empty() {
        let _ = writeln!(md, "## Failed\n");
        for s in &h.failed {
            let _ = writeln!(md, "- {s}");
        }
    }
    md
}
