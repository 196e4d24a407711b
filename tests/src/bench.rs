//! The pure half of `dfly-bench`'s swarm comparison: the CSV rows it writes,
//! the lower bound T*, the markdown summary computed from the CSV alone (so a
//! table can be remade from any old CSV), and the plot.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, bail, ensure};

/// Shared with the simulator, which must describe the same setting.
pub use damselfly_core::rollout::{parse_rate, parse_size, t_star};

pub const CSV_HEADER: &str = "mode,nodes,repeat,scenario,node,pull_s,origin_bytes,image_bytes,\
t_star_s,agent_cpu_s,agent_rss_kib,extra_cpu_s,extra_rss_kib,cpu_busy,run_cpu,cpu_bound";

/// One node's pull in one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// `direct`, `central`, `damselfly`, `damselfly+seed`.
    pub mode: String,
    /// Pulling nodes in the run.
    pub nodes: usize,
    pub repeat: usize,
    /// `concurrent` (all nodes at once) or `sequential` (node 1, then node 2).
    pub scenario: String,
    pub node: usize,
    pub pull_s: f64,
    /// Per run: bytes out of the origin node's link during the run.
    pub origin_bytes: u64,
    /// Config plus layer blobs of the image.
    pub image_bytes: u64,
    /// The lower bound for this node's pull.
    pub t_star_s: f64,
    /// This node's agent: CPU seconds during the run, peak RSS (0 without an agent).
    pub agent_cpu_s: f64,
    pub agent_rss_kib: u64,
    /// Per run: the seed agent or the central cache, whichever the mode has.
    pub extra_cpu_s: f64,
    pub extra_rss_kib: u64,
    /// Per run: mean busy fraction of all CPUs (/proc/stat, every process on
    /// the machine), the share of it the testbed's own processes used (their
    /// cgroups' `cpu.stat`), and whether the CPUs rather than the links were
    /// the limit (busy >= 85 %).
    pub cpu_busy: f64,
    pub run_cpu: f64,
    pub cpu_bound: bool,
}

impl Row {
    pub fn to_csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3},{},{},{:.3},{:.3},{},{:.3},{},{:.3},{:.3},{}",
            self.mode,
            self.nodes,
            self.repeat,
            self.scenario,
            self.node,
            self.pull_s,
            self.origin_bytes,
            self.image_bytes,
            self.t_star_s,
            self.agent_cpu_s,
            self.agent_rss_kib,
            self.extra_cpu_s,
            self.extra_rss_kib,
            self.cpu_busy,
            self.run_cpu,
            self.cpu_bound,
        )
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        ensure!(f.len() == 16, "{} fields instead of 16: {line:?}", f.len());
        Ok(Self {
            mode: f[0].to_string(),
            nodes: f[1].parse()?,
            repeat: f[2].parse()?,
            scenario: f[3].to_string(),
            node: f[4].parse()?,
            pull_s: f[5].parse()?,
            origin_bytes: f[6].parse()?,
            image_bytes: f[7].parse()?,
            t_star_s: f[8].parse()?,
            agent_cpu_s: f[9].parse()?,
            agent_rss_kib: f[10].parse()?,
            extra_cpu_s: f[11].parse()?,
            extra_rss_kib: f[12].parse()?,
            cpu_busy: f[13].parse()?,
            run_cpu: f[14].parse()?,
            cpu_bound: f[15].parse()?,
        })
    }
}

pub fn parse_csv(text: &str) -> anyhow::Result<Vec<Row>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next() {
        Some(h) if h.trim() == CSV_HEADER => {}
        other => bail!("not a dfly-bench CSV (header {other:?})"),
    }
    lines
        .enumerate()
        .map(|(i, l)| Row::parse(l).with_context(|| format!("CSV line {}", i + 2)))
        .collect()
}

/// The medians over repeats of one (mode, scenario, nodes).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub mode: String,
    pub scenario: String,
    pub nodes: usize,
    pub runs: usize,
    /// The slowest node's pull time.
    pub slowest_s: f64,
    /// T* of the slowest node.
    pub t_star_s: f64,
    /// The worst node's pull time over its own T*.
    pub ratio: f64,
    pub origin_ratio: f64,
    /// All agents of the run together.
    pub agent_cpu_s: f64,
    /// The largest agent of the run.
    pub agent_rss_kib: u64,
    pub extra_cpu_s: f64,
    pub extra_rss_kib: u64,
    pub cpu_bound_runs: usize,
    /// Median pull time of each node (1-based order).
    pub per_node_s: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Group by (mode, scenario, nodes), in the order the CSV first names them,
/// each run reduced to its slowest node etc., then the median over repeats.
pub fn summarize(rows: &[Row]) -> Vec<Summary> {
    type Key = (String, String, usize);
    let mut order: Vec<Key> = Vec::new();
    // key -> repeat -> rows
    let mut runs: BTreeMap<Key, BTreeMap<usize, Vec<&Row>>> = BTreeMap::new();
    for r in rows {
        let key = (r.mode.clone(), r.scenario.clone(), r.nodes);
        if !runs.contains_key(&key) {
            order.push(key.clone());
        }
        runs.entry(key)
            .or_default()
            .entry(r.repeat)
            .or_default()
            .push(r);
    }
    order
        .into_iter()
        .map(|key| {
            let reps = &runs[&key];
            let mut slowest = Vec::new();
            let mut t_star = Vec::new();
            let mut ratio = Vec::new();
            let mut origin = Vec::new();
            let mut cpu = Vec::new();
            let mut rss = Vec::new();
            let mut extra_cpu = Vec::new();
            let mut extra_rss = Vec::new();
            let mut per_node: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            let mut cpu_bound_runs = 0;
            for run in reps.values() {
                let worst = run
                    .iter()
                    .max_by(|a, b| a.pull_s.total_cmp(&b.pull_s))
                    .expect("a run has rows");
                slowest.push(worst.pull_s);
                t_star.push(worst.t_star_s);
                ratio.push(
                    run.iter()
                        .map(|r| r.pull_s / r.t_star_s)
                        .fold(0.0, f64::max),
                );
                origin.push(worst.origin_bytes as f64 / worst.image_bytes.max(1) as f64);
                cpu.push(run.iter().map(|r| r.agent_cpu_s).sum());
                rss.push(run.iter().map(|r| r.agent_rss_kib).max().unwrap_or(0) as f64);
                extra_cpu.push(worst.extra_cpu_s);
                extra_rss.push(worst.extra_rss_kib as f64);
                cpu_bound_runs += usize::from(run.iter().any(|r| r.cpu_bound));
                for r in run {
                    per_node.entry(r.node).or_default().push(r.pull_s);
                }
            }
            Summary {
                runs: reps.len(),
                slowest_s: median(slowest),
                t_star_s: median(t_star),
                ratio: median(ratio),
                origin_ratio: median(origin),
                agent_cpu_s: median(cpu),
                agent_rss_kib: median(rss) as u64,
                extra_cpu_s: median(extra_cpu),
                extra_rss_kib: median(extra_rss) as u64,
                cpu_bound_runs,
                per_node_s: per_node.into_values().map(median).collect(),
                mode: key.0,
                scenario: key.1,
                nodes: key.2,
            }
        })
        .collect()
}

fn mib(kib: u64) -> String {
    if kib == 0 {
        "–".into()
    } else {
        format!("{:.0} MiB", kib as f64 / 1024.0)
    }
}

/// The markdown table of [`summarize`]d rows.
pub fn markdown(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| mode | scenario | N | slowest node | T* | slowest / T* | origin bytes / image | \
         agent CPU (all nodes) | agent peak RSS | seed / cache CPU, RSS | CPU-bound runs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in summaries {
        let scenario = if s.scenario == "sequential" {
            let nodes: Vec<String> = s
                .per_node_s
                .iter()
                .enumerate()
                .map(|(i, t)| format!("n{} {t:.1} s", i + 1))
                .collect();
            format!("sequential ({})", nodes.join(", "))
        } else {
            s.scenario.clone()
        };
        let cpu = if s.agent_rss_kib == 0 {
            "–".to_string()
        } else {
            format!("{:.1} s", s.agent_cpu_s)
        };
        let extra = if s.extra_rss_kib == 0 {
            "–".to_string()
        } else {
            format!("{:.1} s, {}", s.extra_cpu_s, mib(s.extra_rss_kib))
        };
        let _ = writeln!(
            out,
            "| {} | {scenario} | {} | {:.1} s | {:.1} s | {:.2} | {:.2} | {cpu} | {} | {extra} | {}/{} |",
            s.mode,
            s.nodes,
            s.slowest_s,
            s.t_star_s,
            s.ratio,
            s.origin_ratio,
            mib(s.agent_rss_kib),
            s.cpu_bound_runs,
            s.runs,
        );
    }
    out
}

/// Slowest-node time against N for each mode (concurrent runs), with T*.
pub fn plot(summaries: &[Summary], title: &str, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let concurrent: Vec<&Summary> = summaries
        .iter()
        .filter(|s| s.scenario == "concurrent")
        .collect();
    ensure!(!concurrent.is_empty(), "no concurrent runs to plot");
    let max_n = concurrent.iter().map(|s| s.nodes).max().unwrap_or(1) as f64;
    let max_t = concurrent
        .iter()
        .map(|s| s.slowest_s.max(s.t_star_s))
        .fold(1.0, f64::max);
    let mut modes: Vec<&str> = Vec::new();
    for s in &concurrent {
        if !modes.contains(&s.mode.as_str()) {
            modes.push(&s.mode);
        }
    }
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5..max_n + 0.5, 0.0..max_t * 1.1)?;
    chart
        .configure_mesh()
        .x_labels((max_n as usize).min(16))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .disable_x_mesh()
        .x_desc("nodes pulling at once (N)")
        .y_desc("slowest node's pull (s)")
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let palette = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    for (i, mode) in modes.iter().enumerate() {
        let color = palette[i % palette.len()];
        let pts: Vec<(f64, f64)> = concurrent
            .iter()
            .filter(|s| s.mode == *mode)
            .map(|s| (s.nodes as f64, s.slowest_s))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
            .label(*mode)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    // T* depends on N only; take it from any mode's runs at that N.
    let mut bound: BTreeMap<usize, f64> = BTreeMap::new();
    for s in &concurrent {
        bound.entry(s.nodes).or_insert(s.t_star_s);
    }
    chart
        .draw_series(LineSeries::new(
            bound.iter().map(|(&n, &t)| (n as f64, t)),
            BLACK.stroke_width(2),
        ))?
        .label("T* (lower bound)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart.draw_series(
        bound
            .iter()
            .map(|(&n, &t)| Cross::new((n as f64, t), 5, BLACK.stroke_width(2))),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        mode: &str,
        scenario: &str,
        nodes: usize,
        repeat: usize,
        node: usize,
        pull_s: f64,
    ) -> Row {
        Row {
            mode: mode.into(),
            nodes,
            repeat,
            scenario: scenario.into(),
            node,
            pull_s,
            origin_bytes: 200 * (repeat as u64 + 1),
            image_bytes: 100,
            t_star_s: 10.0,
            agent_cpu_s: 1.0,
            agent_rss_kib: 1024 * node as u64,
            extra_cpu_s: 0.0,
            extra_rss_kib: 0,
            cpu_busy: 0.5,
            run_cpu: 0.25,
            cpu_bound: repeat == 2,
        }
    }

    #[test]
    fn csv_round_trips_and_the_table_takes_medians_of_the_slowest_node() {
        let mut rows = Vec::new();
        // Three repeats of two nodes at once: slowest per run 30, 50, 20 -> median 30.
        for (rep, (a, b)) in [(10.0, 30.0), (50.0, 40.0), (20.0, 15.0)]
            .iter()
            .enumerate()
        {
            rows.push(row("direct", "concurrent", 2, rep, 1, *a));
            rows.push(row("direct", "concurrent", 2, rep, 2, *b));
        }
        rows.push(row("damselfly", "sequential", 2, 0, 1, 12.0));
        rows.push(row("damselfly", "sequential", 2, 0, 2, 2.0));
        let csv = std::iter::once(CSV_HEADER.to_string())
            .chain(rows.iter().map(Row::to_csv))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed = parse_csv(&csv).unwrap();
        assert_eq!(parsed, rows);

        let s = summarize(&parsed);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].mode.as_str(), s[0].runs), ("direct", 3));
        assert_eq!(s[0].slowest_s, 30.0);
        assert_eq!(s[0].ratio, 3.0);
        // origin bytes 200, 400, 600 over an image of 100.
        assert_eq!(s[0].origin_ratio, 4.0);
        assert_eq!(s[0].agent_cpu_s, 2.0);
        assert_eq!(s[0].agent_rss_kib, 2048);
        assert_eq!(s[0].cpu_bound_runs, 1);
        assert_eq!(s[0].per_node_s, vec![20.0, 30.0]);
        assert_eq!(s[1].per_node_s, vec![12.0, 2.0]);

        let table = markdown(&s);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[2],
            "| direct | concurrent | 2 | 30.0 s | 10.0 s | 3.00 | 4.00 | 2.0 s | 2 MiB | – | 1/3 |"
        );
        assert!(
            lines[3].starts_with("| damselfly | sequential (n1 12.0 s, n2 2.0 s) | 2 | 12.0 s |"),
            "{}",
            lines[3]
        );
        for l in &lines {
            assert_eq!(l.matches('|').count(), 12, "{l}");
        }
        assert!(parse_csv("nope\n1,2").is_err());
    }
}
