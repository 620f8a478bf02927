//! The learning curves of a GRPO run as one PNG: the mean of each reward
//! function, the KL to the reference, the loss and the gradient norm, by
//! step. `train` writes it next to `metrics.jsonl`; every RL job writes it
//! with its metrics, and the job API serves it.

use serde::Deserialize;
use ulm_plot::{grid, png, Panel, Scale, Series};

/// What the curves need of a step. Both the trainer's `StepMetrics` and a
/// job's step summaries read as this (their other fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct CurvePoint {
    pub step: u64,
    /// Mean of each reward function.
    #[serde(default)]
    pub rewards: Vec<(String, f64)>,
    pub kl: f64,
    pub loss: f64,
    pub grad_norm: f64,
}

const PANEL: (u32, u32) = (560, 360);

/// Steps a plotted point averages over: none for short runs, about a
/// twenty-fifth of a long one.
fn window(steps: usize) -> usize {
    (steps / 25).max(1)
}

/// The four panels of `points` as PNG bytes; none when there is no step.
pub fn learning_curves_png(points: &[CurvePoint]) -> Option<Vec<u8>> {
    if points.is_empty() {
        return None;
    }
    let k = window(points.len());
    let averaged = if k > 1 {
        format!(" (mean of {k} steps)")
    } else {
        String::new()
    };
    let steps: Vec<f64> = points.iter().map(|p| p.step as f64).collect();
    let curve = |name: &str, values: Vec<f64>| {
        let mut series = Series::smoothed(name, &values, k);
        for (point, &step) in series.points.iter_mut().zip(&steps) {
            point.0 = step;
        }
        series
    };
    let mut names: Vec<&str> = Vec::new();
    for p in points {
        for (name, _) in &p.rewards {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    // A function missing from a step (its task was not in the batch) keeps
    // its last value there, so each curve has a point per step.
    let rewards = names
        .iter()
        .map(|&name| {
            let mut last = f64::NAN;
            let values = points
                .iter()
                .map(|p| {
                    if let Some((_, v)) = p.rewards.iter().find(|(n, _)| n == name) {
                        last = *v;
                    }
                    last
                })
                .collect();
            curve(name, values)
        })
        .collect();
    let panel = |title: &str, y_label: &str, series: Vec<Series>| Panel {
        title: format!("{title}{averaged}"),
        x_label: "step".into(),
        y_label: y_label.to_string(),
        scale: Scale::Linear,
        series,
    };
    let values = |f: fn(&CurvePoint) -> f64| points.iter().map(f).collect::<Vec<f64>>();
    let panels = [
        panel("reward per function", "mean reward", rewards),
        panel(
            "KL to the reference",
            "KL",
            vec![curve("kl", values(|p| p.kl))],
        ),
        panel("GRPO loss", "loss", vec![curve("loss", values(|p| p.loss))]),
        panel(
            "gradient norm",
            "norm before clipping",
            vec![curve("grad norm", values(|p| p.grad_norm))],
        ),
    ];
    Some(png(&grid(&panels, 2, PANEL)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainer_metrics_and_job_summaries_both_read_as_points() {
        let trainer: CurvePoint = serde_json::from_str(
            r#"{"step":3,"lr":1e-5,"loss":0.1,"reward_understanding":0.5,"reward_generation":null,
                "rewards":[["qa_accuracy",0.5],["qa_format",1.0]],"kl":0.01,"grad_norm":2.0,"applied":true}"#,
        )
        .unwrap();
        assert_eq!(trainer.rewards.len(), 2);
        let job: CurvePoint = serde_json::from_str(
            r#"{"step":1,"source":"feedback","reward":0.5,"loss":0.0,"kl":0.0,"grad_norm":0.0,"applied":true}"#,
        )
        .unwrap();
        assert!(job.rewards.is_empty());
    }

    #[test]
    fn the_curves_are_a_png_with_a_panel_per_quantity() {
        let points: Vec<CurvePoint> = (1..=60)
            .map(|step| CurvePoint {
                step,
                rewards: if step % 2 == 0 {
                    vec![("qa_accuracy".into(), step as f64 / 60.0)]
                } else {
                    vec![("geneval".into(), 0.5), ("qa_accuracy".into(), 0.4)]
                },
                kl: step as f64 * 1e-4,
                loss: -0.01,
                grad_norm: 1.0,
            })
            .collect();
        let bytes = learning_curves_png(&points).unwrap();
        let image = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (2 * PANEL.0, 2 * PANEL.1));
        for (x0, y0) in [(0, 0), (PANEL.0, 0), (0, PANEL.1), (PANEL.0, PANEL.1)] {
            let blue = (x0..x0 + PANEL.0)
                .flat_map(|x| (y0..y0 + PANEL.1).map(move |y| (x, y)))
                .filter(|&(x, y)| image.get_pixel(x, y).0 == [31, 119, 180])
                .count();
            assert!(blue > 100, "panel at ({x0}, {y0}) has its first curve");
        }
        assert!(learning_curves_png(&[]).is_none());
    }
}
