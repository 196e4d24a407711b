//! What a run's numbers come to: one CSV row per run, a summary table, and
//! the completion-time CDFs per N.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, ensure};

use crate::model::{Outcome, Params};

pub const CSV_HEADER: &str = "nodes,image_bytes,layers,node_mbit,origin_mbit,latency_ms,seed,\
t_star_s,p50_s,p99_s,p999_s,max_s,slowest_over_t_star,p99_over_t_star,origin_ratio,\
tracker_rpcs_per_s,finds_per_s,announces_per_s,received_ratio,peer_requests,busy,\
origin_requests,cancels,unlisted,wall_s";

/// Nearest-rank percentile (`q` in 0..=1) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One run, reduced.
#[derive(Debug, Clone)]
pub struct Row {
    pub nodes: usize,
    pub image_bytes: u64,
    pub layers: u64,
    pub node_mbit: u32,
    pub origin_mbit: u32,
    pub latency_ms: f64,
    pub seed: u64,
    pub t_star_s: f64,
    pub p50_s: f64,
    pub p99_s: f64,
    pub p999_s: f64,
    pub max_s: f64,
    pub origin_ratio: f64,
    /// Peak over simulated seconds: all tracker calls, finds, announces.
    pub tracker_rpcs_per_s: u32,
    pub finds_per_s: u32,
    pub announces_per_s: u32,
    /// Bytes into the nodes over what they needed (duplicates, aborts).
    pub received_ratio: f64,
    pub peer_requests: u64,
    pub busy: u64,
    pub origin_requests: u64,
    pub cancels: u64,
    pub unlisted: u64,
    pub wall_s: f64,
    /// Sorted pull times, for the plot.
    pub times: Vec<f64>,
}

impl Row {
    pub fn new(p: &Params, o: &Outcome, wall: Duration) -> Self {
        let mut times = o.pull_s.clone();
        times.sort_by(f64::total_cmp);
        let image = o.image_bytes as f64;
        Self {
            nodes: p.nodes,
            image_bytes: p.image_bytes,
            layers: p.layers,
            node_mbit: p.node_mbit,
            origin_mbit: p.origin_mbit,
            latency_ms: p.latency.as_secs_f64() * 1e3,
            seed: p.seed,
            t_star_s: o.t_star_s,
            p50_s: percentile(&times, 0.5),
            p99_s: percentile(&times, 0.99),
            p999_s: percentile(&times, 0.999),
            max_s: times.last().copied().unwrap_or(f64::NAN),
            origin_ratio: o.origin_bytes / image,
            tracker_rpcs_per_s: o.rpcs_peak(),
            finds_per_s: o.peak_of(0),
            announces_per_s: o.peak_of(1),
            received_ratio: o.received_bytes / (image * p.nodes as f64),
            peer_requests: o.stats.peer_requests,
            busy: o.stats.busy,
            origin_requests: o.stats.origin_requests,
            cancels: o.stats.cancels,
            unlisted: o.stats.unlisted,
            wall_s: wall.as_secs_f64(),
            times,
        }
    }

    pub fn slowest_over_t_star(&self) -> f64 {
        self.max_s / self.t_star_s
    }

    pub fn to_csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.1},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{:.3},{},{},{},{},{},{:.1}",
            self.nodes,
            self.image_bytes,
            self.layers,
            self.node_mbit,
            self.origin_mbit,
            self.latency_ms,
            self.seed,
            self.t_star_s,
            self.p50_s,
            self.p99_s,
            self.p999_s,
            self.max_s,
            self.slowest_over_t_star(),
            self.p99_s / self.t_star_s,
            self.origin_ratio,
            self.tracker_rpcs_per_s,
            self.finds_per_s,
            self.announces_per_s,
            self.received_ratio,
            self.peer_requests,
            self.busy,
            self.origin_requests,
            self.cancels,
            self.unlisted,
            self.wall_s,
        )
    }
}

/// The markdown summary of the rows.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| N | T* | p50 | p99 | p99.9 | slowest | slowest / T* | p99 / T* | origin / image | \
         received / needed | tracker calls/s (peak) | finds/s | announces/s | busy / peer requests | wall |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.2} | {:.1} s |",
            r.nodes,
            r.t_star_s,
            r.p50_s,
            r.p99_s,
            r.p999_s,
            r.max_s,
            r.slowest_over_t_star(),
            r.p99_s / r.t_star_s,
            r.origin_ratio,
            r.received_ratio,
            r.tracker_rpcs_per_s,
            r.finds_per_s,
            r.announces_per_s,
            r.busy as f64 / r.peer_requests.max(1) as f64,
            r.wall_s,
        );
    }
    out
}

/// Completion-time CDF per run (one line each, labelled by N).
pub fn plot(rows: &[Row], title: &str, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    ensure!(!rows.is_empty(), "no runs to plot");
    let max_t = rows
        .iter()
        .map(|r| r.max_s.max(r.t_star_s))
        .filter(|t| t.is_finite())
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_t * 1.05, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("pull time (s)")
        .y_desc("nodes done (fraction)")
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    for (i, r) in rows.iter().enumerate() {
        let color = palette[i % palette.len()];
        let n = r.times.len() as f64;
        let mut pts = vec![(0.0, 0.0)];
        for (k, &t) in r.times.iter().enumerate() {
            pts.push((t, k as f64 / n));
            pts.push((t, (k + 1) as f64 / n));
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(format!("N = {} (T* {:.1} s)", r.nodes, r.t_star_s))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        // T* of this run, dashed.
        chart.draw_series(DashedLineSeries::new(
            [(r.t_star_s, 0.0), (r.t_star_s, 1.0)],
            6,
            4,
            color.stroke_width(1),
        ))?;
    }
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
