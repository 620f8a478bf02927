//! `ulm-server pretrain`: the pretraining recipe on the synthetic world,
//! with a progress bar; metrics, summary and checkpoint go to `--out`.
//! `ulm-server eval`: a model's accuracy on the world's test split.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::oneshot::ModelArgs;

use ulm_pretrain::eval::{evaluate, EvalConfig, EvalReport};
use ulm_pretrain::lm::LmTraining;
use ulm_pretrain::recipe::{run, Progress, Recipe, Summary};
use ulm_pretrain::showcase::{generation_grid, SHOWCASE_PROMPTS};
use ulm_pretrain::vq::VqTraining;
use ulm_rl::lora;

#[derive(Args, Debug, Clone)]
pub struct PretrainArgs {
    /// Output directory: metrics-<stage>.jsonl, summary.json, checkpoint/.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the initial weights and of the world.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps of the VQ tokenizer stage.
    #[arg(long, default_value_t = 1000)]
    pub vq_steps: usize,
    /// Images per VQ step.
    #[arg(long, default_value_t = 8)]
    pub vq_batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub vq_lr: f64,
    /// First VQ steps as a plain autoencoder, before the codes are seeded
    /// from its latents.
    #[arg(long, default_value_t = 300)]
    pub vq_continuous_steps: usize,
    /// Steps of the multimodal stage (next-token prediction).
    #[arg(long, default_value_t = 4000)]
    pub lm_steps: usize,
    /// Examples per multimodal step (each three questions and a caption).
    #[arg(long, default_value_t = 16)]
    pub lm_batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lm_lr: f64,
    /// Validation scenes to measure on at the end.
    #[arg(long, default_value_t = 200)]
    pub eval_scenes: usize,
    /// Also save the model after this many multimodal steps, as
    /// `checkpoint-early/` (a weaker model of the same recipe); 0: never.
    #[arg(long, default_value_t = 300)]
    pub early_checkpoint: usize,
    /// Weight of the describing turn's loss (every object of an image, in
    /// words, as one answer); 0 leaves the turn out (TRAINING.md).
    #[arg(long, default_value_t = 0.5)]
    pub describe_weight: f64,
    /// Weight of the planning turn's loss (a prompt rewritten as a full
    /// caption of a scene it is true of, which generation then draws
    /// from); 0 leaves the turn out (TRAINING.md).
    #[arg(long, default_value_t = 0.5)]
    pub plan_weight: f64,
    /// Skip the VQ stage and start the multimodal stage from the VQ
    /// tokenizer of this checkpoint (one of this recipe, same seed and VQ
    /// settings): for tuning the second stage without retraining the first.
    #[arg(long)]
    pub vq_from: Option<PathBuf>,
}

/// A progress bar per stage on standard error.
struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn stage(&mut self, name: &str, steps: usize) {
        if let Some(bar) = self.0.take() {
            bar.finish();
        }
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>5} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        self.0 = Some(bar);
    }

    fn step(&mut self, line: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(line.to_string());
            bar.inc(1);
        }
    }
}

pub fn pretrain(args: &PretrainArgs) -> Result<Summary> {
    let recipe = Recipe {
        seed: args.seed,
        vq: VqTraining {
            steps: args.vq_steps,
            batch: args.vq_batch,
            lr: args.vq_lr,
            warmup: (args.vq_steps / 30).max(1),
            continuous_steps: args.vq_continuous_steps,
            ..VqTraining::default()
        },
        lm: LmTraining {
            steps: args.lm_steps,
            batch: args.lm_batch,
            lr: args.lm_lr,
            warmup: (args.lm_steps / 20).max(1),
            describe_weight: args.describe_weight,
            plan_weight: args.plan_weight,
            ..LmTraining::default()
        },
        eval_scenes: args.eval_scenes,
        early_checkpoint: (args.early_checkpoint > 0).then_some(args.early_checkpoint),
        vq_from: args.vq_from.clone(),
    };
    let mut bar = Bar(None);
    let summary = run(&recipe, &args.out, &mut bar)?;
    if let Some(bar) = bar.0 {
        bar.finish();
    }
    Ok(summary)
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Test prompts per generation category.
    #[arg(long, default_value_t = 20)]
    pub prompts: usize,
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    /// Seed of each prompt's first image; the next images take the seeds after it.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// LoRA adapters saved by `train` (a checkpoint-<step> directory), evaluated on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Test scenes whose questions are asked.
    #[arg(long, default_value_t = 100)]
    pub question_scenes: usize,
    /// The world whose test split is used (the seed the model was pretrained with).
    #[arg(long, default_value_t = 0)]
    pub world_seed: u64,
    /// Classifier-free guidance weight of generation (default: the model's).
    #[arg(long)]
    pub cfg_weight: Option<f32>,
    /// Sampling temperature of image tokens (default: the model's).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Draw each image from a plan of its prompt sampled at this
    /// temperature (default: the model's `plan_temperature`, if it plans).
    #[arg(long, conflicts_with = "no_plan")]
    pub plan_temperature: Option<f32>,
    /// Draw from the prompts themselves, even for a model that plans.
    #[arg(long)]
    pub no_plan: bool,
    /// Candidates drawn from each plan, of which the one the model's own
    /// describing turn finds the plan likeliest of is kept (default: the
    /// model's `best_of` when it plans, else 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub best_of: Option<u32>,
    /// Where to write the report as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also draw a fixed list of prompts (every category) into this PNG,
    /// `--seeds` images each, beside what the verifier read in each.
    #[arg(long)]
    pub grid: Option<PathBuf>,
}

/// Evaluates a model on the world's test split; prints a table, writes JSON.
pub fn eval(args: &EvalArgs) -> Result<EvalReport> {
    let mut bundle = args.model.open()?;
    if let Some(dir) = &args.adapter {
        let device = bundle.model.device().clone();
        lora::load_for_inference(&mut bundle.model, dir, &device)
            .with_context(|| format!("adapters of {}", dir.display()))?;
    }
    let cfg = EvalConfig {
        prompts_per_category: args.prompts,
        seeds: args.seeds,
        question_scenes: args.question_scenes,
        world_seed: args.world_seed,
        first_seed: args.first_seed,
        cfg_weight: bundle.sampling.guidance_or(args.cfg_weight),
        temperature: bundle.sampling.temperature_or(args.temperature),
        plan_temperature: match args.no_plan {
            true => None,
            false => args
                .plan_temperature
                .or(bundle.sampling.plan_temperature.map(|t| t as f32)),
        },
        best_of: args.best_of.or(bundle.sampling.best_of).unwrap_or(1) as usize,
        ..EvalConfig::default()
    };
    let report = evaluate(&bundle, &cfg)?;
    if let Some(path) = &args.grid {
        let (grid, accuracy) = generation_grid(
            &bundle,
            &SHOWCASE_PROMPTS,
            args.seeds,
            cfg.cfg_weight,
            cfg.temperature,
            cfg.plan_temperature,
            cfg.best_of,
        )?;
        grid.save(path)
            .with_context(|| path.display().to_string())?;
        eprintln!(
            "{}: {:.1} % of its images hold their prompt",
            path.display(),
            accuracy * 100.0
        );
    }
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    Ok(report)
}
