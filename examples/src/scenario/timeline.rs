//! The demo's picture: client request latency over time, with the
//! migration's start, the pause and the resumption marked.

use std::path::Path;

use super::Error;
use crate::common::clock::mono_ns;
use crate::figures::{DestinationFigures, SourceFigures};
use crate::kvd::load::LoadReport;

/// Draw request latency over time with the migration's phases marked (an
/// SVG file at `path`).
pub(super) fn draw(
    path: &Path,
    load: &LoadReport,
    source: Option<&SourceFigures>,
    dest: Option<&DestinationFigures>,
) -> Result<(), Error> {
    use plotters::prelude::*;
    let zero = load.started.map(mono_ns).unwrap_or(0) as f64;
    let at = |ns: Option<u64>| ns.map(|n| (n as f64 - zero) / 1e9);
    let points: Vec<(f64, f64)> = load
        .timeline
        .iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(t, max, _)| (t / 1e3, max.max(0.01)))
        .collect();
    let x_max = points.last().map_or(1.0, |p| p.0).max(0.1);
    let y_max = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.2;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "kvd live migration: client request latency",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time since clients started (s)")
        .y_desc("max latency per 10 ms (ms)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(points, &BLUE))?
        .label("max request latency")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let marks = [
        ("migration starts", at(source.map(|s| s.started_ns)), GREEN),
        ("freeze (paused on A)", at(source.map(|s| s.paused_ns)), RED),
        ("resumed on B", at(dest.and_then(|d| d.resumed_ns)), MAGENTA),
    ];
    for (label, x, color) in marks {
        if let Some(x) = x {
            chart
                .draw_series(LineSeries::new(vec![(x, 0.0), (x, y_max)], color))?
                .label(label)
                .legend(move |(px, py)| PathElement::new(vec![(px, py), (px + 20, py)], color));
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
