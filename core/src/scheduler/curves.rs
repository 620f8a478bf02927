//! A job's learning curves and metrics as files, and as the PNG the job API
//! serves, drawn from the steps recorded on the job (`{"steps": [...]}`).

use std::path::Path;

use serde::Deserialize;
use ulm_rl::curves::{learning_curves_png, CurvePoint};

/// The recorded steps that read as curve points (all of them, for metrics
/// this server wrote).
fn steps(metrics: &serde_json::Value) -> Vec<&serde_json::Value> {
    metrics
        .get("steps")
        .and_then(|s| s.as_array())
        .map(|steps| steps.iter().collect())
        .unwrap_or_default()
}

/// The job's curves as PNG; none before its first step.
pub fn job_curves_png(metrics: &serde_json::Value) -> Option<Vec<u8>> {
    let points: Vec<CurvePoint> = steps(metrics)
        .into_iter()
        .filter_map(|s| CurvePoint::deserialize(s).ok())
        .collect();
    learning_curves_png(&points)
}

/// Writes `dir/metrics.jsonl` (a step per line) and `dir/curves.png`.
pub fn write_job_files(dir: &Path, metrics: &serde_json::Value) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut lines = String::new();
    for step in steps(metrics) {
        lines.push_str(&step.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("metrics.jsonl"), lines)?;
    if let Some(png) = job_curves_png(metrics) {
        std::fs::write(dir.join("curves.png"), png)?;
    }
    Ok(())
}
