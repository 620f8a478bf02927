//! The `answer` and `generate` subcommands: one request straight through the
//! model, without the server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ulm_core::engine::{Engine, EngineConfig, ImageWork};
use ulm_core::record::GenerateParams;
use ulm_model::bundle::{ModelBundle, ModelChoice};
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{answer_batch, AnswerItem};
use ulm_model::image_processor::decode_image;
use ulm_model::sampling::SamplingParams;

/// Largest image accepted on the command line, in pixels.
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Which model to open, as the commands name it.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Checkpoint directory (Janus-Pro / ULM-R1 layout). Absent: the built-in world model.
    #[arg(long, env = "ULM_MODEL")]
    pub model: Option<PathBuf>,
    /// The built-in random demo model instead (instant, for tests).
    #[arg(long)]
    pub demo: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "ULM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, env = "ULM_DTYPE", default_value = "f32")]
    pub dtype: String,
}

impl ModelArgs {
    pub fn open(&self) -> Result<ModelBundle> {
        let choice = ModelChoice::from_args(self.model.as_deref(), self.demo)?;
        let bundle = ModelBundle::open_named(&choice, &self.device, &self.dtype)?;
        eprintln!("model: {}", bundle.describe());
        Ok(bundle)
    }
}

/// `answer`: a question about an image.
#[derive(Args, Clone, Debug)]
pub struct AnswerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// PNG, JPEG or WebP file.
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long)]
    pub question: String,
    /// Number of answers to sample.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `generate`: images from a text prompt, as PNG files.
#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Classifier-free guidance weight (default: the model's).
    #[arg(long)]
    pub cfg_weight: Option<f32>,
    /// Sampling temperature (default: the model's).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw from the prompt itself, even for a model that plans its images
    /// first (the world model: its plan is printed).
    #[arg(long)]
    pub no_plan: bool,
    /// Directory for image-<i>.png.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// `n` consecutive seeds from `seed`.
fn seeds(seed: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| seed.wrapping_add(i)).collect()
}

/// The sampled answers' texts.
pub fn answer(args: &AnswerArgs) -> Result<Vec<String>> {
    let bundle = args.model.open()?;
    let bytes =
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let img = decode_image(&bytes, MAX_PIXELS)?;
    let item = AnswerItem {
        prompt: TextPrompt::question(
            &bundle.model,
            &bundle.processor,
            &bundle.image_processor,
            &img,
            &args.question,
            args.n,
        )?,
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        seeds: seeds(args.seed, args.n),
    };
    let special = bundle.processor.special;
    let samples = answer_batch(
        &bundle.model,
        &[item],
        special.eos,
        special.pad,
        &mut |_| true,
    )?;
    Ok(samples
        .into_iter()
        .flatten()
        .map(|s| bundle.processor.decode(&s.token_ids))
        .collect())
}

/// Writes `image-<i>.png` files and returns their paths.
pub fn generate(args: &GenerateArgs) -> Result<Vec<PathBuf>> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let bundle = args.model.open()?;
    let defaults = bundle.sampling;
    // Planned and read as the server plans and reads: through the engine.
    let plan_temperature = defaults
        .plan_temperature
        .filter(|_| !args.no_plan)
        .map(|t| t as f32);
    let params = GenerateParams {
        n: args.n as u32,
        cfg_weight: defaults.guidance_or(args.cfg_weight),
        temperature: defaults.temperature_or(args.temperature),
        top_k: args.top_k,
        plan_temperature,
        best_of: plan_temperature.and(defaults.best_of),
    };
    let work = ImageWork {
        prompt: args.prompt.clone(),
        params,
        seeds: seeds(args.seed, args.n),
    };
    let engine = Engine::start(bundle, "cli".into(), EngineConfig::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    let output = runtime.block_on(engine.generate(work, deadline))?;
    if let Some(plan) = &output.plan {
        eprintln!("plan: {plan}");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut paths = Vec::new();
    for (i, sample) in output.images.into_iter().enumerate() {
        let path = args.out.join(format!("image-{i}.png"));
        sample
            .image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}
