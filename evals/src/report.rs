//! Reports: `report.md` (a report card) and SVG plots of quality against energy.

use std::path::Path;

use plotters::prelude::*;

/// One training curve point: cumulative joules and a loss.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub joules: f64,
    pub loss: f64,
}

fn bounds(pts: &[Point]) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for p in pts {
        x0 = x0.min(p.joules);
        x1 = x1.max(p.joules);
        y0 = y0.min(p.loss);
        y1 = y1.max(p.loss);
    }
    if !x0.is_finite() {
        return (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    (x0.min(0.0), x1.max(x0 + 1e-9), y0 - pad, y1 + pad)
}

/// Training loss (line) and validation loss (marked points) against cumulative joules.
pub fn loss_vs_energy_svg(path: &Path, title: &str, train: &[Point], val: &[Point], method: &str) -> Result<(), String> {
    let all: Vec<Point> = train.iter().chain(val).copied().collect();
    let (x0, x1, y0, y1) = bounds(&all);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(format!("cumulative energy, J ({method})"))
        .y_desc("loss (nats/token)")
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(LineSeries::new(train.iter().map(|p| (p.joules, p.loss)), BLUE.mix(0.5)))
        .map_err(|x| e(&x))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(val.iter().map(|p| Circle::new((p.joules, p.loss), 5, RED.filled())))
        .map_err(|x| e(&x))?
        .label("validation loss (evals)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// One run in a comparison: a label, energy and a quality (lower is better).
#[derive(Debug, Clone)]
pub struct RunPoint {
    pub label: String,
    pub joules: f64,
    pub quality: f64,
}

/// Indices of the runs on the Pareto front (no other run uses less energy and reaches a lower
/// loss), sorted by energy.
pub fn pareto_front(runs: &[RunPoint]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..runs.len()).collect();
    idx.sort_by(|&a, &b| runs[a].joules.total_cmp(&runs[b].joules).then(runs[a].quality.total_cmp(&runs[b].quality)));
    let mut front = Vec::new();
    let mut best = f64::INFINITY;
    for i in idx {
        if runs[i].quality < best {
            best = runs[i].quality;
            front.push(i);
        }
    }
    front
}

/// Quality against energy across runs, the Pareto front drawn as a step line.
pub fn compare_svg(path: &Path, runs: &[RunPoint], quality_name: &str) -> Result<(), String> {
    let pts: Vec<Point> = runs.iter().map(|r| Point { joules: r.joules, loss: r.quality }).collect();
    let (x0, x1, y0, y1) = bounds(&pts);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{quality_name} against energy"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1 * 1.3, y0..y1) // room for the labels of the rightmost runs
        .map_err(|x| e(&x))?;
    chart.configure_mesh().x_desc("training energy, J").y_desc(quality_name).draw().map_err(|x| e(&x))?;
    let front = pareto_front(runs);
    chart
        .draw_series(LineSeries::new(front.iter().map(|&i| (runs[i].joules, runs[i].quality)), RED))
        .map_err(|x| e(&x))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(runs.iter().map(|r| {
            EmptyElement::at((r.joules, r.quality)) + Circle::new((0, 0), 5, BLUE.filled()) + Text::new(r.label.clone(), (7, -7), ("sans-serif", 12))
        }))
        .map_err(|x| e(&x))?;
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_front_keeps_only_undominated_runs() {
        let r = |l: &str, j: f64, q: f64| RunPoint { label: l.into(), joules: j, quality: q };
        let runs = vec![r("a", 10.0, 2.0), r("b", 20.0, 1.5), r("c", 15.0, 2.5), r("d", 30.0, 1.6), r("e", 5.0, 3.0)];
        assert_eq!(pareto_front(&runs), vec![4, 0, 1]);
    }

    #[test]
    fn svgs_are_written() {
        let d = tempfile::tempdir().unwrap();
        let train: Vec<Point> = (0..50).map(|i| Point { joules: i as f64, loss: 4.0 - i as f64 * 0.05 }).collect();
        let val = vec![Point { joules: 25.0, loss: 2.9 }, Point { joules: 49.0, loss: 1.8 }];
        let p = d.path().join("r.svg");
        loss_vs_energy_svg(&p, "run", &train, &val, "estimate").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("<svg") && s.contains("cumulative energy") && s.matches("<circle").count() >= 2, "{}", &s[..200.min(s.len())]);
        let runs = vec![RunPoint { label: "a".into(), joules: 1.0, quality: 2.0 }, RunPoint { label: "b".into(), joules: 2.0, quality: 1.0 }];
        compare_svg(&d.path().join("c.svg"), &runs, "val_loss").unwrap();
        assert!(std::fs::read_to_string(d.path().join("c.svg")).unwrap().contains("Pareto front"));
    }
}
