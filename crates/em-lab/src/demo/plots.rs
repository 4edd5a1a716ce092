//! The curves of the plotted runs: held-out greedy accuracy of every checkpoint and the
//! safeguard's signals per update, drawn one panel per run as SVG and rendered to PNG.

use std::path::{Path, PathBuf};

use anyhow::Context;
use em_convert::OutType;
use em_data::Problem;
use em_pipeline::eval::mean_score;
use em_pipeline::{sampling_model, Result};
use em_store::JsonlStore;
use serde::Serialize;
use serde_json::Value;

use super::evaluate::{eval_setting, setting};
use super::train::{as_model, first_alarm};
use super::Demo;

/// Held-out greedy accuracy and the safeguard's signals per update of one run.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Curve {
    /// (weights step, greedy accuracy on the curve problems)
    accuracy: Vec<(usize, f64)>,
    /// (weights step, answered share, drifted share of watched prompts)
    signals: Vec<(usize, f64, f64)>,
    /// Thresholds: lowest answered share and most drifted share that pass.
    answered_floor: f64,
    drift_ceiling: f64,
    alarm: Option<usize>,
}

/// The curve of the run in `run_dir`: every checkpoint (the subject at step 0) greedy on
/// `problems`, and the watch rounds of its metrics.
pub(super) fn curve(demo: &Demo, run_dir: &Path, problems: &[Problem]) -> Result<Curve> {
    let subject = demo.subject.as_path();
    let mut accuracy = vec![];
    for step in 0..=demo.plan.steps {
        let model = if step == 0 {
            subject.to_path_buf()
        } else {
            as_model(subject, &run_dir.join(format!("checkpoint-{step}")))?
        };
        let gguf = sampling_model(
            demo.backend,
            &model,
            &run_dir.join(format!("curve/gguf-{step}")),
            OutType::F32,
        )?;
        let items = eval_setting(
            demo,
            &model,
            &gguf,
            problems,
            &setting(&format!("curve-{step}"), 0.0, 1, None),
            &run_dir.join("curve"),
        )?;
        accuracy.push((step, mean_score(&items)));
    }
    let mut signals = vec![];
    let (mut floor, mut ceiling) = (0.0, 1.0);
    for v in JsonlStore::<Value>::read(&run_dir.join("metrics.jsonl"))? {
        let Some(w) = v.get("watch") else { continue };
        let get = |k: &str| w.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let prompts = get("prompts").max(1.0);
        signals.push((
            get("weights_step") as usize,
            get("answered"),
            get("drifted") / prompts,
        ));
        floor = get("answered_step0") - get("answered_drop_max");
        ceiling = get("drift_max") / prompts;
    }
    Ok(Curve {
        accuracy,
        signals,
        answered_floor: floor,
        drift_ceiling: ceiling,
        alarm: first_alarm(&run_dir.join("metrics.jsonl"))?.map(|(s, _)| s),
    })
}

/// One panel per plotted run: held-out greedy accuracy, the answered share and the drifted share
/// per update, the thresholds dashed, the first alarm marked; SVG and PNG.
pub(super) fn write_curves(curves: &[(String, Curve)], out: &Path) -> Result<Vec<PathBuf>> {
    use plotters::prelude::*;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let svg = out.join("safeguard.svg");
    {
        let root = SVGBackend::new(&svg, (520 * curves.len() as u32, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, curves.len()));
        for (panel, (title, c)) in panels.iter().zip(curves) {
            let x1 = c.accuracy.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 15))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(40)
                .build_cartesian_2d(0f64..x1, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_desc("updates")
                .y_desc("share")
                .draw()?;
            let acc: Vec<(f64, f64)> = c.accuracy.iter().map(|&(s, a)| (s as f64, a)).collect();
            let answered: Vec<(f64, f64)> =
                c.signals.iter().map(|&(s, a, _)| (s as f64, a)).collect();
            let drifted: Vec<(f64, f64)> =
                c.signals.iter().map(|&(s, _, d)| (s as f64, d)).collect();
            for (points, color, label) in [
                (acc, BLUE, "held-out greedy accuracy (labels, eval only)"),
                (answered, GREEN, "watch: answered and stopped"),
                (drifted, RED, "watch: majority answers drifted"),
            ] {
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            for (y, color) in [(c.answered_floor, GREEN), (c.drift_ceiling, RED)] {
                chart.draw_series(DashedLineSeries::new(
                    vec![(0.0, y), (x1, y)],
                    6,
                    4,
                    color.mix(0.6).stroke_width(1),
                ))?;
            }
            if let Some(a) = c.alarm {
                chart
                    .draw_series(LineSeries::new(
                        vec![(a as f64, 0.0), (a as f64, 1.0)],
                        BLACK.stroke_width(2),
                    ))?
                    .label(format!(
                        "safeguard alarm on the weights after {a} updates (keeps {})",
                        a.saturating_sub(1)
                    ))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 11))
                .draw()?;
        }
        root.present()?;
    }
    let png = out.join("safeguard.png");
    svg_to_png(&svg, &png)?;
    Ok(vec![svg, png])
}

/// Renders an SVG file to PNG (system fonts for the text, where there are any).
fn svg_to_png(svg: &Path, png: &Path) -> Result<()> {
    let data = std::fs::read(svg).with_context(|| format!("{}: cannot read", svg.display()))?;
    let mut options = resvg::usvg::Options::default();
    let db = options.fontdb_mut();
    db.load_system_fonts();
    // fontdb maps `sans-serif` to Arial; use a sans face this machine has.
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    if !families.iter().any(|f| f == "Arial") {
        if let Some(f) = families
            .iter()
            .find(|f| f.contains("Sans") && !f.contains("Mono"))
            .or(families.first())
        {
            db.set_sans_serif_family(f.clone());
        }
    }
    let tree = resvg::usvg::Tree::from_data(&data, &options)
        .map_err(|e| anyhow::anyhow!("{}: not a valid SVG: {e}", svg.display()))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .with_context(|| format!("{}: empty image", svg.display()))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .save_png(png)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", png.display()))?;
    Ok(())
}
