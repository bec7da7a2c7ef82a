//! The benchmark's report: samples per series, grouped by scenario, with the
//! context that makes them comparable (mode, host, versions, commit). It is
//! rendered three ways: a table for the terminal, JSON for machines (with
//! every raw sample), and an SVG chart of each scenario's latency CDF, ours
//! against the peer's.
//!
//! Figures are only reported, never judged: nothing here passes or fails on
//! a time. Nothing is dropped either: p99 and max are printed next to p50.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Whose figure a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// capsid's own figure.
    Ours,
    /// The peer's figure, measured in the same run.
    Peer,
}

/// One measured quantity and all its samples, in measurement order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// What was measured, and on whom (e.g. `capsid run -- true`).
    pub name: String,
    /// The samples' unit (`ms`, `MiB`, …).
    pub unit: String,
    /// Ours or the peer's.
    pub who: Who,
    /// The samples, in measurement order.
    pub samples: Vec<f64>,
}

impl Series {
    /// An empty series.
    pub fn new(name: impl Into<String>, unit: &str, who: Who) -> Self {
        Self {
            name: name.into(),
            unit: unit.into(),
            who,
            samples: Vec::new(),
        }
    }

    /// The `percent` percentile (nearest rank) of the samples; NaN when there are none.
    pub fn p(&self, percent: usize) -> f64 {
        percentile(&self.samples, percent)
    }
}

/// Ours against the peer on one quantity: `ratio` = our p50 / the peer's p50.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The quantity compared.
    pub what: String,
    /// The name of our series.
    pub ours: String,
    /// The name of the peer's series.
    pub peer: String,
    /// Our p50 divided by the peer's p50: below 1 is faster or smaller.
    pub ratio: f64,
}

/// One scenario of the benchmark: its series and comparisons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// The scenario's name (`boot`, `run`, `ctr`, …).
    pub name: String,
    /// What was measured, in one sentence.
    pub about: String,
    /// Every measured series, ours and the peers'.
    pub series: Vec<Series>,
    /// Ours against the peer, one line per quantity.
    pub comparisons: Vec<Comparison>,
    /// Facts that are not samples (e.g. how many sandboxes fit).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Scenario {
    /// An empty scenario.
    pub fn new(name: &str, about: &str) -> Self {
        Self {
            name: name.into(),
            about: about.into(),
            series: Vec::new(),
            comparisons: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds the series, and a comparison of the first two when one is ours
    /// and the other the peer's.
    pub fn compare(&mut self, what: &str, ours: Series, peer: Series) {
        self.comparisons.push(Comparison {
            what: what.into(),
            ours: ours.name.clone(),
            peer: peer.name.clone(),
            ratio: ours.p(50) / peer.p(50),
        });
        self.series.push(ours);
        self.series.push(peer);
    }
}

impl Scenario {
    /// Adds our series and each peer's, with our series compared against
    /// each: the first comparison is named `what`, the others `what,
    /// against NAME`.
    pub fn compare_each(&mut self, what: &str, ours: Series, peers: Vec<(&str, Series)>) {
        for (i, (name, peer)) in peers.iter().enumerate() {
            self.comparisons.push(Comparison {
                what: match i {
                    0 => what.to_owned(),
                    _ => format!("{what}, against {name}"),
                },
                ours: ours.name.clone(),
                peer: peer.name.clone(),
                ratio: ours.p(50) / peer.p(50),
            });
        }
        self.series.push(ours);
        self.series
            .extend(peers.into_iter().map(|(_, series)| series));
    }
}

/// The machine the report was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// CPU cores available.
    pub cores: usize,
    /// Memory, in MiB.
    pub memory_mib: u64,
    /// The running kernel's release.
    pub kernel: String,
}

impl Host {
    /// This machine.
    pub fn this() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_mib: memory_kib / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// A whole benchmark run: where it ran, on what, and every scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `native`, or `nested` (KVM inside QEMU TCG: only ratios mean anything).
    pub mode: String,
    /// How the machine's KVM was judged.
    pub probe: String,
    /// The machine.
    pub host: Host,
    /// The capsid commit measured.
    pub commit: String,
    /// Version of each program measured (capsid, runc, containerd, QEMU …).
    pub versions: BTreeMap<String, String>,
    /// Measured runs per series (after one warm-up each); 0 in a merged
    /// report whose parts ran different counts (the table's `n` says).
    pub runs: usize,
    /// The scenarios, in the order they ran.
    pub scenarios: Vec<Scenario>,
}

/// Nearest-rank percentile, `percent` in 1..=100; NaN without samples.
pub fn percentile(samples: &[f64], percent: usize) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

impl Report {
    /// One report from several runs of the same build, each of some of the
    /// scenarios (in nested mode each runs on a fresh test host): the first
    /// one's header, every scenario in order. None when `parts` is empty or
    /// they come from different commits or modes.
    pub fn merge(parts: Vec<Report>) -> Option<Report> {
        let mut parts = parts.into_iter();
        let mut merged = parts.next()?;
        for part in parts {
            if part.commit != merged.commit || part.mode != merged.mode {
                return None;
            }
            if part.runs != merged.runs {
                merged.runs = 0;
            }
            merged.scenarios.extend(part.scenarios);
        }
        Some(merged)
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let h = &self.host;
        let runs = match self.runs {
            0 => "the runs in column n per series".to_owned(),
            runs => format!("{runs} runs per series"),
        };
        let _ = writeln!(
            out,
            "capsid bench — {} mode, {runs} after a warm-up; host: {} cores, {} MiB, Linux {}; commit {}",
            self.mode, h.cores, h.memory_mib, h.kernel, self.commit
        );
        if self.mode == "nested" {
            let _ = writeln!(
                out,
                "NESTED MODE: KVM runs inside QEMU TCG here, so absolute times are inflated many-fold;\n\
                 only each ratio against the peer, measured in the same run, means anything."
            );
        }
        for (name, version) in &self.versions {
            let _ = writeln!(out, "  {name}: {version}");
        }
        for scenario in &self.scenarios {
            let _ = writeln!(out, "\n[{}] {}", scenario.name, scenario.about);
            let _ = writeln!(
                out,
                "  {:<52} {:>9} {:>9} {:>9} {:>9}  {:<5} {:>3}",
                "", "p50", "p90", "p99", "max", "unit", "n"
            );
            for s in &scenario.series {
                let _ = writeln!(
                    out,
                    "  {:<52} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {:<5} {:>3}",
                    format!(
                        "{} ({})",
                        s.name,
                        if s.who == Who::Ours { "ours" } else { "peer" }
                    ),
                    s.p(50),
                    s.p(90),
                    s.p(99),
                    s.p(100),
                    s.unit,
                    s.samples.len()
                );
            }
            for c in &scenario.comparisons {
                let _ = writeln!(
                    out,
                    "  ratio {}: ours / peer at p50 = {:.2}",
                    c.what, c.ratio
                );
            }
            for note in &scenario.notes {
                let _ = writeln!(out, "  {note}");
            }
        }
        out
    }

    /// The report as one JSON document (what `--json` writes).
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// One panel per scenario with time series: the CDF of each series
    /// (x: the time, y: the share of samples at or below it), ours solid,
    /// the peer dashed.
    pub fn svg(&self) -> String {
        const W: f64 = 720.0;
        const PANEL: f64 = 230.0;
        const LEFT: f64 = 60.0;
        const PLOT_W: f64 = 420.0;
        const PLOT_H: f64 = 160.0;
        const COLOURS: [&str; 6] = [
            "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
        ];
        let panels: Vec<&Scenario> = self
            .scenarios
            .iter()
            .filter(|s| {
                s.series
                    .iter()
                    .any(|x| x.unit == "ms" && !x.samples.is_empty())
            })
            .collect();
        let height = 50.0 + PANEL * panels.len() as f64;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"20\" font-size=\"14\">capsid bench: latency CDFs, {} mode, commit {}{}</text>\n",
            escape(&self.mode),
            escape(&self.commit),
            if self.mode == "nested" {
                " (nested: compare ratios only)"
            } else {
                ""
            }
        );
        for (i, scenario) in panels.iter().enumerate() {
            let top = 40.0 + PANEL * i as f64;
            let series: Vec<&Series> = scenario
                .series
                .iter()
                .filter(|s| s.unit == "ms" && !s.samples.is_empty())
                .collect();
            let max = series
                .iter()
                .flat_map(|s| s.samples.iter().copied())
                .fold(0.0_f64, f64::max)
                .max(1e-9);
            let _ = write!(
                svg,
                "<text x=\"10\" y=\"{:.1}\" font-size=\"13\">{}</text>\n\
                 <rect x=\"{LEFT}\" y=\"{:.1}\" width=\"{PLOT_W}\" height=\"{PLOT_H}\" fill=\"none\" stroke=\"#999\"/>\n\
                 <text x=\"{LEFT}\" y=\"{:.1}\">0</text>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{max:.0} ms</text>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">100%</text>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0%</text>\n",
                top + 12.0,
                escape(&scenario.name),
                top + 20.0,
                top + 20.0 + PLOT_H + 14.0,
                LEFT + PLOT_W,
                top + 20.0 + PLOT_H + 14.0,
                LEFT - 4.0,
                top + 24.0,
                LEFT - 4.0,
                top + 20.0 + PLOT_H,
            );
            for (j, s) in series.iter().enumerate() {
                let mut sorted = s.samples.clone();
                sorted.sort_by(f64::total_cmp);
                let n = sorted.len() as f64;
                let mut points = format!("{LEFT:.1},{:.1}", top + 20.0 + PLOT_H);
                for (k, v) in sorted.iter().enumerate() {
                    let x = LEFT + v / max * PLOT_W;
                    let below = top + 20.0 + PLOT_H * (1.0 - k as f64 / n);
                    let above = top + 20.0 + PLOT_H * (1.0 - (k + 1) as f64 / n);
                    let _ = write!(points, " {x:.1},{below:.1} {x:.1},{above:.1}");
                }
                let colour = COLOURS[j % COLOURS.len()];
                let dash = if s.who == Who::Peer {
                    " stroke-dasharray=\"5,3\""
                } else {
                    ""
                };
                let legend_y = top + 30.0 + 14.0 * j as f64;
                let _ = write!(
                    svg,
                    "<polyline points=\"{points}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"{dash}/>\n\
                     <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>\
                     <text x=\"{:.1}\" y=\"{:.1}\">{} ({}, p50 {:.0} ms)</text>\n",
                    LEFT + PLOT_W + 10.0,
                    legend_y - 4.0,
                    LEFT + PLOT_W + 30.0,
                    legend_y - 4.0,
                    LEFT + PLOT_W + 34.0,
                    legend_y,
                    escape(&s.name),
                    if s.who == Who::Ours { "ours" } else { "peer" },
                    s.p(50),
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut scenario = Scenario::new("run", "spawn to exit");
        let mut ours = Series::new("capsid run", "ms", Who::Ours);
        ours.samples = vec![30.0, 10.0, 20.0, 40.0];
        let mut peer = Series::new("runc <run>", "ms", Who::Peer);
        peer.samples = vec![5.0, 5.0, 5.0, 5.0];
        scenario.compare("spawn to exit", ours, peer);
        let mut memory = Scenario::new("footprint", "memory");
        let mut pss = Series::new("PSS", "MiB", Who::Ours);
        pss.samples = vec![7.5];
        memory.series.push(pss);
        memory.notes.push("12 sandboxes fit".into());
        Report {
            mode: "nested".into(),
            probe: "test".into(),
            host: Host {
                cores: 2,
                memory_mib: 24000,
                kernel: "6.1".into(),
            },
            commit: "abc123".into(),
            versions: BTreeMap::from([("runc".into(), "1.1.5".into())]),
            runs: 4,
            scenarios: vec![scenario, memory],
        }
    }

    #[test]
    fn percentiles_are_nearest_rank_over_every_sample() {
        let samples = [30.0, 10.0, 20.0, 40.0];
        assert_eq!(percentile(&samples, 50), 20.0);
        assert_eq!(percentile(&samples, 90), 40.0);
        assert_eq!(percentile(&samples, 100), 40.0);
        assert!(percentile(&[], 50).is_nan());
    }

    #[test]
    fn the_report_renders_as_table_json_and_svg() {
        let report = report();
        assert_eq!(report.scenarios[0].comparisons[0].ratio, 4.0);
        let table = report.table();
        assert!(table.contains("NESTED MODE"), "{table}");
        assert!(table.contains("ours / peer at p50 = 4.00"), "{table}");
        assert!(table.contains("12 sandboxes fit"), "{table}");
        let back: Report = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(back, report);
        let merged = Report::merge(vec![report.clone(), report.clone()]).unwrap();
        assert_eq!(merged.scenarios.len(), 2 * report.scenarios.len());
        assert_eq!(merged.runs, report.runs);
        let fewer = Report {
            runs: 1,
            ..report.clone()
        };
        let merged = Report::merge(vec![report.clone(), fewer]).unwrap();
        assert!(merged.table().contains("the runs in column n per series"));
        let other = Report {
            commit: "other".into(),
            ..report.clone()
        };
        assert_eq!(Report::merge(vec![report.clone(), other]), None);
        let svg = report.svg();
        // One panel (only `run` has times), two curves, the name escaped.
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("runc &lt;run&gt;"));
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
