//! Line charts as standalone SVG: latency distributions (percentile against
//! latency, log scale) and figures against concurrency. Small on purpose:
//! axes, ticks, lines, a legend; no plotting library.

use std::fmt::Write;

const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const WIDTH: f64 = 760.0;
const PLOT_HEIGHT: f64 = 300.0;
const LEFT: f64 = 92.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;

pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Axis {
    pub label: &'static str,
    pub log: bool,
    pub format: fn(f64) -> String,
}

pub struct Chart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub lines: Vec<Line>,
}

/// An axis' range and ticks over the values it must show.
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl Scale {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Self {
        let values: Vec<f64> = values.filter(|v| v.is_finite() && (!log || *v > 0.0)).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !min.is_finite() {
            return Self { lo: 0.0, hi: 1.0, log: false, ticks: vec![0.0, 1.0] };
        }
        if log {
            let lo = 10f64.powf(min.log10().floor());
            let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
            let decades = (hi / lo).log10().round() as i32;
            let mut ticks = Vec::new();
            let mut t = lo;
            while t <= hi * 1.0001 {
                ticks.push(t);
                if decades <= 2 && t * 2.0 < hi {
                    ticks.extend([t * 2.0, t * 5.0].into_iter().filter(|v| *v < hi));
                }
                t *= 10.0;
            }
            ticks.sort_by(f64::total_cmp);
            Self { lo, hi, log, ticks }
        } else {
            let lo = if min >= 0.0 { 0.0 } else { min };
            let span = (max - lo).max(f64::MIN_POSITIVE);
            let raw = span / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(mag * 10.0);
            let hi = (max / step).ceil() * step;
            let ticks = (0..=((hi - lo) / step).round() as usize).map(|i| lo + step * i as f64).collect();
            Self { lo, hi: hi.max(lo + step), log, ticks }
        }
    }

    /// 0..1 along the axis.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl Chart {
    pub fn svg(&self) -> String {
        let xs = Scale::new(self.lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)), self.x.log);
        let ys = Scale::new(self.lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)), self.y.log);
        let plot_w = WIDTH - LEFT - RIGHT;
        let height = TOP + PLOT_HEIGHT + 60.0 + 18.0 * self.lines.len() as f64;
        let px = |v: f64| LEFT + xs.frac(v) * plot_w;
        let py = |v: f64| TOP + (1.0 - ys.frac(v)) * PLOT_HEIGHT;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            WIDTH / 2.0,
            escape(&self.title)
        );
        for &t in &xs.ticks {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##,
                TOP + PLOT_HEIGHT
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + PLOT_HEIGHT + 16.0,
                escape(&(self.x.format)(t))
            );
        }
        for &t in &ys.ticks {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##,
                LEFT + plot_w
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                escape(&(self.y.format)(t))
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PLOT_HEIGHT}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            TOP + PLOT_HEIGHT + 36.0,
            escape(self.x.label)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            TOP + PLOT_HEIGHT / 2.0,
            TOP + PLOT_HEIGHT / 2.0,
            escape(self.y.label)
        );
        for (i, line) in self.lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let points: Vec<String> = line
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!xs.log || *x > 0.0) && (!ys.log || *y > 0.0))
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if points.len() == 1 {
                let (x, y) = points[0].split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
            } else if !points.is_empty() {
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
                    points.join(" ")
                );
            }
            let ly = TOP + PLOT_HEIGHT + 56.0 + 18.0 * i as f64;
            let _ = writeln!(s, r#"<rect x="{LEFT}" y="{:.1}" width="14" height="4" fill="{color}"/>"#, ly - 6.0);
            let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#, LEFT + 20.0, escape(&line.name));
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_scale_spans_whole_decades() {
        let s = Scale::new([3.0, 450.0].into_iter(), true);
        assert_eq!((s.lo, s.hi), (1.0, 1000.0));
        assert!(s.ticks.contains(&10.0) && s.ticks.contains(&100.0));
        assert!((s.frac(10.0) - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn linear_scale_has_round_ticks() {
        let s = Scale::new([0.0, 4_730.0].into_iter(), false);
        assert_eq!(s.lo, 0.0);
        assert!(s.hi >= 4_730.0 && s.ticks.len() <= 7, "{:?}", s.ticks);
    }

    #[test]
    fn chart_is_one_svg_document_with_a_line_per_series() {
        let chart = Chart {
            title: "a <b> & c".into(),
            x: Axis { label: "x", log: true, format: |v| format!("{v}") },
            y: Axis { label: "y", log: false, format: |v| format!("{v}") },
            lines: vec![
                Line { name: "one".into(), points: vec![(1.0, 1.0), (10.0, 2.0)] },
                Line { name: "two".into(), points: vec![(5.0, 3.0)] },
            ],
        };
        let svg = chart.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
    }
}
