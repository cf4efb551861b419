//! Figures: a markdown table on stdout as each scenario ends and, with
//! `--json FILE`, every figure of the run as JSON; with `--plots DIR`, SVG
//! charts drawn from the measured data.
//!
//! The SVG is written by hand: two kinds of simple line chart do not
//! justify a plotting crate (and its build time in CI).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Value, json};

static FIGURES: Mutex<Vec<Value>> = Mutex::new(Vec::new());
static PLOTS: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Records one figure for the JSON output (tables print themselves).
pub(crate) fn record(scenario: &str, figure: &str, value: f64, unit: &str) {
    FIGURES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(json!({"scenario": scenario, "figure": figure, "value": value, "unit": unit}));
}

/// A two-column table of one scenario's figures.
pub(crate) struct Table {
    scenario: String,
    out: String,
}

impl Table {
    pub(crate) fn new(scenario: &str, title: &str) -> Table {
        Table {
            scenario: scenario.into(),
            out: format!("\n## {title}\n| figure | value |\n|---|---|\n"),
        }
    }

    /// `value` in `unit` goes to the JSON; `shown` to the table.
    pub(crate) fn row(&mut self, figure: &str, value: f64, unit: &str, shown: &str) {
        let _ = writeln!(self.out, "| {figure} | {shown} |");
        record(&self.scenario, figure, value, unit);
    }

    /// A row for the table only.
    pub(crate) fn text(&mut self, figure: &str, shown: &str) {
        let _ = writeln!(self.out, "| {figure} | {shown} |");
    }

    pub(crate) fn finish(self) -> anyhow::Result<()> {
        print!("{}", self.out);
        Ok(())
    }
}

/// Writes every recorded figure, with the machine and the commit.
pub(crate) fn write_json(path: &Path) -> anyhow::Result<()> {
    let figures = FIGURES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let doc = json!({
        "commit": commit,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "figures": figures,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    println!("\nfigures written to {}", path.display());
    Ok(())
}

pub(crate) fn set_plots(dir: PathBuf) {
    *PLOTS.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
}

/// One line of a chart.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// Draws `series` into `DIR/name.svg` if `--plots DIR` was given.
pub(crate) fn plot(
    name: &str,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let Some(dir) = PLOTS.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.svg"));
    std::fs::write(&path, svg(title, x_label, y_label, series))?;
    println!("plot written to {}", path.display());
    Ok(())
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (640.0, 400.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let all = series.iter().flat_map(|s| s.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let y_max = all.map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let (x_max, y_max) = (nice(x_max), nice(y_max));
    let px = |x: f64| left + x / x_max * (w - left - right);
    let py = |y: f64| h - bottom - y / y_max * (h - top - bottom);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        w / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let (x, y) = (x_max * i as f64 / 5.0, y_max * i as f64 / 5.0);
        let _ = write!(
            s,
            r##"<line x1="{l}" y1="{yy}" x2="{r}" y2="{yy}" stroke="#ddd"/><text x="{tl}" y="{ty}" text-anchor="end">{yl}</text>
<line x1="{xx}" y1="{t}" x2="{xx}" y2="{b}" stroke="#eee"/><text x="{xx}" y="{tb}" text-anchor="middle">{xl}</text>
"##,
            l = left,
            r = w - right,
            yy = py(y),
            tl = left - 6.0,
            ty = py(y) + 4.0,
            yl = label(y),
            xx = px(x),
            t = top,
            b = h - bottom,
            tb = h - bottom + 16.0,
            xl = label(x),
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        (left + w - right) / 2.0,
        h - 12.0,
        escape(x_label),
        (top + h - bottom) / 2.0,
        escape(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        if se.points.len() <= 12 {
            for &(x, y) in &se.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                    px(x),
                    py(y)
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            left + 10.0,
            top + 8.0 + 16.0 * i as f64,
            left + 28.0,
            top + 12.0 + 16.0 * i as f64,
            escape(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The next round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|x| *x >= v)
        .unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
