//! The `answer` and `generate` subcommands: one request straight through the
//! model, without the server.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ulm_model::bundle::{ModelBundle, ModelChoice};
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{answer_batch, generate_images_batch, AnswerItem, ImageItem};
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
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    let bundle = args.model.open()?;
    let item = ImageItem {
        prompt: bundle.processor.generation_prompt(&args.prompt)?,
        cfg_weight: bundle.sampling.guidance_or(args.cfg_weight),
        sampling: SamplingParams {
            temperature: bundle.sampling.temperature_or(args.temperature),
            top_k: args.top_k,
            top_p: None,
        },
        seeds: seeds(args.seed, args.n),
    };
    let results = generate_images_batch(
        &bundle.model,
        &[item],
        bundle.processor.special.pad,
        &mut |_| true,
    )?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut paths = Vec::new();
    for (i, sample) in results.into_iter().flatten().enumerate() {
        let Some(sample) = sample else { continue };
        let path = args.out.join(format!("image-{i}.png"));
        sample
            .image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}
