//! `ulm-server train`: offline CoRL GRPO over a JSONL or Parquet dataset.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use ulm_model::bundle::{ModelBundle, ModelChoice};
use ulm_rl::checkpoint::{read_state, restore_optimizer, save};
use ulm_rl::curves::{learning_curves_png, CurvePoint};
use ulm_rl::dataset::read_dataset;
use ulm_rl::grpo::T2iAlignment;
use ulm_rl::lora::{self, LoraConfig};
use ulm_rl::policy::{load_trainable, load_trainable_dir};
use ulm_rl::reward::{
    HttpReward, Reward, RewardTask, SelfCycle, T2iMatch, Weighted, WorldVerifier, FORMAT,
    FORMAT_TAG, QA_ACCURACY,
};
use ulm_rl::trainer::{Adaptation, Schedule, Trainer, TrainerConfig};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// JSONL or Parquet (`.parquet`) dataset in the CoRL format (caption, image, qa_problem, qa_solution, qa_type).
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint to train; absent: the built-in world model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Train the built-in random demo model instead.
    #[arg(long)]
    pub demo: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Output directory: metrics.jsonl and checkpoint-<step>/.
    #[arg(long)]
    pub out: PathBuf,
    /// Fine-tune the whole language model instead of LoRA adapters.
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Comma-separated projections to adapt.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub lora_targets: String,
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Dataset items per step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Samples per prompt and task (G).
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Classifier-free guidance weight of generation rollouts (default: the model's).
    #[arg(long)]
    pub cfg_weight: Option<f32>,
    /// Log-prob temperature; the sampling temperature when absent.
    #[arg(long)]
    pub logprob_temperature: Option<f64>,
    #[arg(long, default_value_t = 0.04)]
    pub beta: f64,
    /// Learning rate [default: 4e-6 full, 1e-4 LoRA].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// constant or cosine.
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.2)]
    pub epsilon_low: f64,
    #[arg(long, default_value_t = 0.2)]
    pub epsilon_high: f64,
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    /// 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Rows per forward/backward pass; gradients accumulate over them. About
    /// 10 GiB per row at the Janus-Pro-1B sizes in bf16 (BENCHMARKS.md).
    #[arg(long, default_value_t = 4)]
    pub micro_batch_rows: usize,
    /// predicting (as sampling) or own-position (the ULM-R1 reference).
    #[arg(long, default_value = "predicting")]
    pub alignment: String,
    /// Weighted rewards, name=weight: format, format_tag, qa_accuracy, t2i_match, self_cycle,
    /// verifier (the synthetic world's, for captions in its language).
    #[arg(long, default_value = "format=0.5,qa_accuracy=1,t2i_match=1")]
    pub rewards: String,
    /// External reward services, `task@url` (task: understanding or generation), weight 1 each.
    #[arg(long)]
    pub http_reward: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Checkpoint directory to continue from.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn parse_rewards(spec: &str) -> Result<Vec<Weighted>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|entry| {
            let (name, weight) = entry.split_once('=').unwrap_or((entry, "1"));
            let weight: f64 = weight
                .trim()
                .parse()
                .with_context(|| format!("reward weight in {entry:?}"))?;
            let reward: Box<dyn Reward> = match name.trim() {
                "format" => Box::new(FORMAT),
                "format_tag" => Box::new(FORMAT_TAG),
                "qa_accuracy" => Box::new(QA_ACCURACY),
                "t2i_match" => Box::new(T2iMatch),
                "self_cycle" => Box::new(SelfCycle::default()),
                "verifier" => Box::new(WorldVerifier),
                other => bail!(
                    "unknown reward {other:?} (format, format_tag, qa_accuracy, t2i_match, self_cycle, verifier)"
                ),
            };
            Ok(Weighted { reward, weight })
        })
        .collect()
}

/// Runs the training; returns the directory of the last checkpoint.
pub fn train(args: TrainArgs) -> Result<PathBuf> {
    let items = read_dataset(&args.data)?;
    let mut rewards = parse_rewards(&args.rewards)?;
    for spec in &args.http_reward {
        let (task, url) = spec
            .split_once('@')
            .context("--http-reward takes task@url")?;
        let task = match task {
            "understanding" => RewardTask::Understanding,
            "generation" => RewardTask::Generation,
            other => bail!("unknown reward task {other:?} (understanding, generation)"),
        };
        rewards.push(Weighted {
            reward: Box::new(HttpReward {
                name: format!("http:{url}"),
                url: url.to_string(),
                task,
                timeout: std::time::Duration::from_secs(60),
            }),
            weight: 1.0,
        });
    }
    let resumed = args.resume.as_ref().map(|d| read_state(d)).transpose()?;
    let full = resumed
        .as_ref()
        .map_or(args.full, |s| s.adaptation == "full");
    let base_dir = resumed
        .as_ref()
        .and_then(|s| s.base_model.clone())
        .or(args.model.clone());
    let mut config = TrainerConfig {
        group_size: args.group_size,
        temperature: args.temperature,
        logprob_temperature: args.logprob_temperature,
        max_new_tokens: args.max_new_tokens,
        beta: args.beta,
        epsilon_low: args.epsilon_low,
        epsilon_high: args.epsilon_high,
        num_iterations: args.num_iterations,
        lr: args.lr.unwrap_or(if full { 4e-6 } else { 1e-4 }),
        warmup_steps: args.warmup_steps,
        schedule: match args.schedule.as_str() {
            "constant" => Schedule::Constant,
            "cosine" => Schedule::Cosine,
            other => bail!("unknown schedule {other:?} (constant, cosine)"),
        },
        total_steps: args.steps,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        micro_batch_rows: args.micro_batch_rows,
        alignment: match args.alignment.as_str() {
            "predicting" => T2iAlignment::Predicting,
            "own-position" => T2iAlignment::OwnPosition,
            other => bail!("unknown alignment {other:?} (predicting, own-position)"),
        },
        seed: args.seed,
        ..TrainerConfig::default()
    };
    let choice = ModelChoice::from_args(base_dir.as_deref(), args.demo)?;
    let mut bundle = ModelBundle::open_named(&choice, &args.device, &args.dtype)?;
    config.cfg_weight = bundle.sampling.guidance_or(args.cfg_weight);
    let (device, dtype) = (bundle.model.device().clone(), bundle.model.dtype());
    let mut frozen = Vec::new();
    let adaptation = if full {
        // The policy is a trainable copy; the bundle's model stays the reference.
        let source = args.resume.clone().or(base_dir.clone());
        let trainable = match &source {
            Some(dir) => load_trainable_dir(dir, dtype, &device)?,
            None => load_trainable(&bundle.source, &bundle.model.cfg, dtype, &device)?,
        };
        frozen = trainable.frozen;
        let reference = std::mem::replace(&mut bundle.model, trainable.model);
        Adaptation::Full {
            params: trainable.params,
            reference: Box::new(reference),
        }
    } else {
        let lora = match &args.resume {
            Some(dir) => lora::load(&mut bundle.model, dir, &device)?,
            None => {
                let cfg = LoraConfig {
                    rank: args.lora_rank,
                    alpha: args.lora_alpha,
                    target_modules: args
                        .lora_targets
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .collect(),
                };
                lora::attach(&mut bundle.model, &cfg, args.seed)?
            }
        };
        Adaptation::Lora(lora)
    };
    let mut trainer = Trainer::new(bundle, adaptation, config, rewards)?;
    if let Some(dir) = &args.resume {
        restore_optimizer(&mut trainer, dir, &device)?;
        eprintln!("resumed from {} at step {}", dir.display(), trainer.step);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let metrics_path = args.out.join("metrics.jsonl");
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let progress = indicatif::ProgressBar::new(args.steps);
    progress.set_position(trainer.step);
    while trainer.step < args.steps {
        let start = (trainer.step as usize * args.batch_size) % items.len();
        let batch: Vec<_> = (0..args.batch_size.min(items.len()))
            .map(|k| items[(start + k) % items.len()].clone())
            .collect();
        let m = trainer.step(&batch)?;
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        tracing::info!(
            step = m.step,
            loss = m.loss,
            reward_understanding = m.reward_understanding,
            reward_generation = m.reward_generation,
            kl = m.kl,
            grad_norm = m.grad_norm,
            clip_fraction = m.clip_fraction,
            tokens_per_s = m.tokens_per_s,
            applied = m.applied,
            "step"
        );
        progress.inc(1);
        if args.save_every > 0 && trainer.step % args.save_every == 0 {
            let dir = args.out.join(format!("checkpoint-{}", trainer.step));
            save(&trainer, &dir, base_dir.as_deref(), &frozen)?;
            write_curves(&args.out)?;
        }
    }
    progress.finish();
    write_curves(&args.out)?;
    let last = args.out.join(format!("checkpoint-{}", trainer.step));
    if !last.exists() {
        save(&trainer, &last, base_dir.as_deref(), &frozen)?;
    }
    Ok(last)
}

/// `out/curves.png` from every step in `out/metrics.jsonl` (a resumed run's
/// earlier steps included).
fn write_curves(out: &Path) -> Result<()> {
    let metrics = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let points = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<Vec<CurvePoint>, _>>()
        .with_context(|| format!("reading the steps of {}", metrics.display()))?;
    if let Some(png) = learning_curves_png(&points) {
        let path = out.join("curves.png");
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
