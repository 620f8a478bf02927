//! The `answer` and `generate` subcommands: one request straight through the
//! model, without the server.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use ulm_model::bundle::ModelBundle;
use ulm_model::decode::TextPrompt;
use ulm_model::generate::{answer_batch, generate_images_batch, AnswerItem, ImageItem};
use ulm_model::image_processor::decode_image;
use ulm_model::sampling::SamplingParams;

/// Largest image accepted on the command line, in pixels.
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

pub struct AnswerArgs<'a> {
    pub image: &'a Path,
    pub question: &'a str,
    pub n: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
}

pub fn answer(bundle: &ModelBundle, args: &AnswerArgs) -> Result<Vec<String>> {
    let bytes =
        std::fs::read(args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let img = decode_image(&bytes, MAX_PIXELS)?;
    let item = AnswerItem {
        prompt: TextPrompt::question(
            &bundle.model,
            &bundle.processor,
            &bundle.image_processor,
            &img,
            args.question,
            args.n,
        )?,
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling,
        seeds: (0..args.n as u64)
            .map(|i| args.seed.wrapping_add(i))
            .collect(),
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

pub struct GenerateArgs<'a> {
    pub prompt: &'a str,
    pub n: usize,
    pub cfg_weight: f32,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub out_dir: &'a Path,
}

/// Writes `image-<i>.png` files and returns their paths.
pub fn generate(bundle: &ModelBundle, args: &GenerateArgs) -> Result<Vec<PathBuf>> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let item = ImageItem {
        prompt: bundle.processor.generation_prompt(args.prompt)?,
        cfg_weight: args.cfg_weight,
        sampling: args.sampling,
        seeds: (0..args.n as u64)
            .map(|i| args.seed.wrapping_add(i))
            .collect(),
    };
    let results = generate_images_batch(
        &bundle.model,
        &[item],
        bundle.processor.special.pad,
        &mut |_| true,
    )?;
    std::fs::create_dir_all(args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let mut paths = Vec::new();
    for (i, sample) in results.into_iter().flatten().enumerate() {
        let Some(sample) = sample else { continue };
        let path = args.out_dir.join(format!("image-{i}.png"));
        sample
            .image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}
