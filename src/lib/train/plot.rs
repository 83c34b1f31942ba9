//! `RUN/loss.svg`: the run's loss curve, redrawn at every evaluation.
//!
//! Top: training loss per step (averaged into at most `MAX_POINTS` buckets) and validation loss,
//! one circle per evaluation. Bottom: validation bits per byte, one triangle per evaluation. The history is rebuilt from
//! `train.jsonl` when a run resumes, so the curve spans every session of the run.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// Training-loss points drawn at most (a million-step run would make a huge SVG otherwise).
const MAX_POINTS: usize = 2000;

#[derive(Default, Debug, Clone)]
pub struct History {
    /// (step, training loss)
    pub train: Vec<(u64, f64)>,
    /// (step, validation loss, validation bits per byte)
    pub val: Vec<(u64, f64, f64)>,
}

impl History {
    /// The `step` and `eval` records of `train.jsonl` up to `upto` (a resumed run repeats the steps
    /// after its last checkpoint; those records are dropped). A missing log is an empty history;
    /// lines that do not parse (a torn last line after a crash) are skipped.
    pub fn from_log(path: &Path, upto: u64) -> Result<History> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(History::default()),
            Err(e) => return Err(Error::io(path, "reading", e)),
        };
        let mut h = History::default();
        for rec in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let step = rec["step"].as_u64().unwrap_or(u64::MAX);
            if step > upto {
                continue;
            }
            match rec["type"].as_str() {
                Some("step") => {
                    if let Some(l) = rec["loss"].as_f64() {
                        h.train.push((step, l));
                    }
                }
                Some("eval") => {
                    if let (Some(l), Some(b)) = (rec["val_loss"].as_f64(), rec["val_bpb"].as_f64())
                    {
                        h.val.push((step, l, b));
                    }
                }
                _ => {}
            }
        }
        Ok(h)
    }

    /// Training loss averaged over buckets of consecutive steps, at most `MAX_POINTS` of them.
    fn train_points(&self) -> Vec<(f64, f64)> {
        let per = self.train.len().div_ceil(MAX_POINTS).max(1);
        self.train
            .chunks(per)
            .map(|c| {
                let n = c.len() as f64;
                (
                    c.iter().map(|p| p.0 as f64).sum::<f64>() / n,
                    c.iter().map(|p| p.1).sum::<f64>() / n,
                )
            })
            .filter(|p| p.1.is_finite())
            .collect()
    }

    /// Writes the SVG to `path` atomically.
    pub fn draw(&self, path: &Path) -> Result<()> {
        let mut svg = String::new();
        self.render(&mut svg)
            .map_err(|e| Error::Io(format!("drawing {}: {e}", path.display())))?;
        crate::fsutil::write_atomic(path, svg.as_bytes())
    }

    fn render(&self, svg: &mut String) -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let train = self.train_points();
        let last_step = train
            .iter()
            .map(|p| p.0)
            .chain(self.val.iter().map(|v| v.0 as f64))
            .fold(1.0, f64::max);
        let root = SVGBackend::with_string(svg, (900, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(400);

        let losses = train
            .iter()
            .map(|p| p.1)
            .chain(self.val.iter().map(|v| v.1));
        let (lo, hi) = range(losses);
        let mut chart = ChartBuilder::on(&top)
            .caption("loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..last_step, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("nats per token")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(1)))?
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE));
        let val: Vec<(f64, f64)> = self.val.iter().map(|v| (v.0 as f64, v.1)).collect();
        chart
            .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))?
            .label("validation")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;

        let (lo, hi) = range(self.val.iter().map(|v| v.2));
        let mut chart = ChartBuilder::on(&bottom)
            .caption("validation bits per byte", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..last_step, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("bits per byte")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        let bpb: Vec<(f64, f64)> = self.val.iter().map(|v| (v.0 as f64, v.2)).collect();
        chart.draw_series(LineSeries::new(bpb.clone(), GREEN.stroke_width(2)))?;
        chart.draw_series(
            bpb.iter()
                .map(|&p| TriangleMarker::new(p, 4, GREEN.filled())),
        )?;
        root.present()?;
        Ok(())
    }
}

/// A y range around the finite values, with a margin; (0, 1) when there are none.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}
