//! The whole recipe, stage by stage, from a seed to a checkpoint directory:
//! each stage writes its metrics (`metrics-<stage>.jsonl`, one JSON object
//! per step) and its loss curves (`loss-<stage>.png`),
//! `vq-reconstructions.png` shows validation images over their round trips
//! through the codes, and `summary.json` holds what was measured at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Var};
use serde::Serialize;
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::Processor;
use ulm_model::weights::WEIGHTS_FILE;
use ulm_world::{examples, Split};

use crate::lm::{train_lm, LmParts, LmTraining};
use crate::model::{world_sampling, PretrainModel};
use crate::vq::{reconstruction_accuracy, reconstruction_grid, train_vq, VqTraining};
use crate::PretrainError;
use ulm_plot::{line_chart, Panel, Scale, Series};

#[derive(Debug, Clone)]
pub struct Recipe {
    /// Seed of the initial weights and of the world.
    pub seed: u64,
    pub vq: VqTraining,
    pub lm: LmTraining,
    /// Validation scenes the verifier reads after the VQ's round trip.
    pub eval_scenes: usize,
    /// Multimodal steps after which the model is also saved as
    /// `checkpoint-early/`: the same recipe stopped early, a model with
    /// room to improve for reinforcement-learning experiments.
    pub early_checkpoint: Option<usize>,
    /// A checkpoint of the same recipe whose VQ tokenizer stage two starts
    /// from, in place of stage one: the tokenizer is trained once and kept
    /// while the multimodal stage is tuned (stage one is deterministic, so
    /// it gives the same model as rerunning it).
    pub vq_from: Option<PathBuf>,
}

/// What a stage reports as it goes: its name, the step, the steps in all.
pub trait Progress {
    fn stage(&mut self, name: &str, steps: usize);
    fn step(&mut self, line: &str);
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    /// The checkpoint the VQ tokenizer was copied from, when stage one did
    /// not run.
    pub vq_from: Option<PathBuf>,
    pub vq_steps: usize,
    pub vq_seconds: f64,
    /// Share of validation scenes the verifier reads exactly after encoding
    /// to codes and decoding back.
    pub vq_reconstruction_accuracy: f64,
    pub eval_scenes: usize,
    pub lm_steps: usize,
    pub lm_seconds: f64,
    /// The last step's losses, mean negative log-likelihood per token.
    pub lm_understanding: f64,
    pub lm_generation: f64,
    pub checkpoint: PathBuf,
}

/// A JSON-lines file of step metrics; the first write error is kept and
/// reported at the end, so that a full disk does not stop training midway.
struct Metrics {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    error: Option<std::io::Error>,
}

impl Metrics {
    fn create(path: &Path) -> Result<Self, PretrainError> {
        let file = std::fs::File::create(path).map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
            error: None,
        })
    }

    fn write(&mut self, step: &impl Serialize) {
        if self.error.is_none() {
            let line = serde_json::to_string(step).unwrap_or_default();
            // Flushed per step, so that the file can be followed while training.
            self.error = writeln!(self.file, "{line}")
                .and_then(|_| self.file.flush())
                .err();
        }
    }

    fn finish(mut self) -> Result<(), PretrainError> {
        match self.error.take() {
            Some(e) => Err(io(&self.path)(e)),
            None => self.file.flush().map_err(io(&self.path)),
        }
    }
}

/// Steps a plotted point averages over.
const PLOT_WINDOW: usize = 25;

/// Writes `out/loss-<stage>.png`: the curves of `losses` (name, value per
/// step), averaged over the last steps.
fn plot_losses(
    out: &Path,
    stage: &str,
    title: &str,
    losses: &[(&str, Vec<f64>)],
) -> Result<(), PretrainError> {
    if losses.iter().all(|(_, values)| values.is_empty()) {
        return Ok(());
    }
    let series: Vec<Series> = losses
        .iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, values)| Series::smoothed(name, values, PLOT_WINDOW))
        .collect();
    let path = out.join(format!("loss-{stage}.png"));
    let panel = Panel {
        title: title.to_string(),
        x_label: "step".into(),
        y_label: "loss (mean of 25 steps)".into(),
        scale: Scale::Log,
        series,
    };
    line_chart(&panel, (800, 480))
        .map_err(|e| PretrainError::Invalid(e.to_string()))?
        .save(&path)
        .map_err(|e| PretrainError::Invalid(format!("{}: {e}", path.display())))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PretrainError + '_ {
    move |e| PretrainError::Invalid(format!("{}: {e}", path.display()))
}

/// Stage one: trains the VQ tokenizer's `params`, writing its metrics and
/// loss curves into `out`.
fn train_vq_stage(
    model: &PretrainModel,
    params: &[(String, Var)],
    vq: &VqTraining,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<(), PretrainError> {
    let mut metrics = Metrics::create(&out.join("metrics-vq.jsonl"))?;
    let (mut reconstruction, mut codebook) = (Vec::new(), Vec::new());
    progress.stage("vq", vq.steps);
    train_vq(&model.model.gen_vision, params, vq, |s| {
        metrics.write(s);
        reconstruction.push(s.reconstruction);
        codebook.push(s.codebook);
        progress.step(&format!(
            "reconstruction {:.4}, {} codes",
            s.reconstruction, s.codes_used
        ));
    })?;
    metrics.finish()?;
    plot_losses(
        out,
        "vq",
        "VQ tokenizer",
        &[
            ("reconstruction (weighted L2)", reconstruction),
            ("codebook", codebook),
        ],
    )
}

/// Sets the VQ tokenizer's `params` to those of the checkpoint in `dir`,
/// which must have the same shapes.
fn copy_vq(dir: &Path, params: &[(String, Var)]) -> Result<(), PretrainError> {
    let path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| PretrainError::Invalid(format!("{}: {e}", path.display())))?;
    for (name, var) in params {
        let tensor = tensors.get(name).ok_or_else(|| {
            PretrainError::Invalid(format!("{}: no tensor {name}", path.display()))
        })?;
        if tensor.dims() != var.dims() {
            return Err(PretrainError::Invalid(format!(
                "{}: {name} is {:?}, the recipe's VQ has {:?}",
                path.display(),
                tensor.dims(),
                var.dims()
            )));
        }
        var.set(&tensor.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Runs the recipe into `out`; the checkpoint is `out/checkpoint`.
pub fn run(
    recipe: &Recipe,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Summary, PretrainError> {
    if recipe.vq.batch == 0 || recipe.lm.batch == 0 {
        return Err(PretrainError::Invalid(
            "batches need at least one example".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let model = PretrainModel::world(recipe.seed)?;
    let vq = VqTraining {
        world_seed: recipe.seed,
        ..recipe.vq.clone()
    };

    let (vq_steps, vq_seconds, accuracy) = {
        let params = model.params_of_vq(true);
        let started = Instant::now();
        let vq_steps = match &recipe.vq_from {
            Some(dir) => {
                copy_vq(dir, &params)?;
                0
            }
            None => {
                train_vq_stage(&model, &params, &vq, out, progress)?;
                vq.steps
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let validation: Vec<_> = examples(recipe.seed, Split::Validation)
            .take(recipe.eval_scenes)
            .collect();
        let vq_model = &model.model.gen_vision;
        let accuracy = reconstruction_accuracy(vq_model, &validation, &Device::Cpu)?;
        let shown = &validation[..validation.len().min(8)];
        if !shown.is_empty() {
            let path = out.join("vq-reconstructions.png");
            reconstruction_grid(vq_model, shown, &Device::Cpu)?
                .save(&path)
                .map_err(|e| PretrainError::Invalid(format!("{}: {e}", path.display())))?;
        }
        (vq_steps, seconds, accuracy)
    };

    let lm = LmTraining {
        world_seed: recipe.seed,
        ..recipe.lm.clone()
    };
    let sampling = world_sampling(lm.plan_weight > 0.0);
    let (lm_seconds, last) = {
        let params = model.params_of_vq(false);
        let vision = &model.model.cfg.vision;
        let processor = Processor::new(model.tokenizer.clone(), true, vision.num_patches())?;
        let image_processor = ImageProcessorConfig::janus_default(vision.image_size);
        let parts = LmParts {
            model: &model.model,
            processor: &processor,
            image_processor: &image_processor,
        };
        let started = Instant::now();
        let mut metrics = Metrics::create(&out.join("metrics-lm.jsonl"))?;
        let (mut answers, mut images) = (Vec::new(), Vec::new());
        let (mut descriptions, mut plans) = (Vec::new(), Vec::new());
        let mut saved_early = Ok(());
        progress.stage("lm", lm.steps);
        train_lm(&parts, &params, &lm, |s| {
            metrics.write(s);
            answers.push(s.understanding);
            images.push(s.generation);
            descriptions.extend(s.describe);
            plans.extend(s.plan);
            if recipe.early_checkpoint == Some(s.step + 1) {
                saved_early = model.save(&out.join("checkpoint-early"), &sampling);
            }
            progress.step(&format!(
                "answers {:.3}, images {:.3}",
                s.understanding, s.generation
            ));
        })?;
        metrics.finish()?;
        saved_early?;
        let seconds = started.elapsed().as_secs_f64();
        let last = (
            answers.last().copied().unwrap_or(f64::NAN),
            images.last().copied().unwrap_or(f64::NAN),
        );
        plot_losses(
            out,
            "lm",
            "Multimodal model, next-token prediction",
            &[
                ("answer tokens (nats)", answers),
                ("image tokens (nats)", images),
                ("description tokens (nats)", descriptions),
                ("plan tokens (nats)", plans),
            ],
        )?;
        (seconds, last)
    };

    let checkpoint = out.join("checkpoint");
    model.save(&checkpoint, &sampling)?;
    let summary = Summary {
        seed: recipe.seed,
        vq_from: recipe.vq_from.clone(),
        vq_steps,
        vq_seconds,
        vq_reconstruction_accuracy: accuracy,
        eval_scenes: recipe.eval_scenes,
        lm_steps: lm.steps,
        lm_seconds,
        lm_understanding: last.0,
        lm_generation: last.1,
        checkpoint,
    };
    let path = out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(summary)
}
