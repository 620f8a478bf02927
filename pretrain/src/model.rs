//! The model being pretrained: the real architecture at the world's size,
//! every tensor a trainable variable drawn from a seed, saved as an
//! ordinary checkpoint in the original DeepSeek layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use ulm_model::demo::{build_random, demo_config_json, write_demo_side_files};
use ulm_model::processor::TOKENIZER_FILE;
use ulm_model::sampling_defaults::{SamplingDefaults, GENERATION_CONFIG_FILE};
use ulm_model::weights::WEIGHTS_FILE;
use ulm_model::{Janus, JanusConfig};
use ulm_rl::policy::build_trainable;

use crate::tokenizer::{config_ids, world_tokenizer, WORLD_VOCAB};
use crate::PretrainError;

/// Side of the world model's images: a 3 x 3 grid of 16-pixel cells, so
/// that every cell is one SigLIP patch and 2 x 2 VQ codes.
pub const WORLD_IMAGE_SIZE: usize = 48;

/// The world model's `config.json`: the demo's LLaMA (with the world
/// tokenizer's vocabulary and special ids), SigLIP and VQ at the world's
/// image size (9 patches to read an image, 6 x 6 = 36 codes to draw one),
/// the VQ with fewer channels at full resolution, where a training step
/// spends its time.
pub fn world_config_json(tokenizer: &Tokenizer) -> Result<Value, PretrainError> {
    let mut config = demo_config_json();
    let [bos, eos, pad] = config_ids(tokenizer)?;
    let language = &mut config["language_config"];
    language["vocab_size"] = json!(WORLD_VOCAB);
    language["bos_token_id"] = json!(bos);
    language["eos_token_id"] = json!(eos);
    language["pad_token_id"] = json!(pad);
    let vision = &mut config["vision_config"]["params"];
    vision["model_name"] = json!("siglip_world_patch16_48");
    vision["image_size"] = json!(WORLD_IMAGE_SIZE);
    let vq = &mut config["gen_vision_config"]["params"];
    vq["image_size"] = json!(WORLD_IMAGE_SIZE);
    vq["ch"] = json!(16);
    vq["encoder_ch_mult"] = json!([1, 2, 2, 4]);
    vq["decoder_ch_mult"] = json!([1, 2, 2, 4]);
    vq["norm_num_groups"] = json!(8);
    Ok(config)
}

/// The sampling settings a world model is saved with (its
/// `generation_config.json`): the best of the sweep in TRAINING.md, where
/// Janus-Pro's guidance 5 and temperature 1 draw 29 % of images right
/// against 50 %.
pub const WORLD_SAMPLING: SamplingDefaults = SamplingDefaults {
    guidance_scale: 1.5,
    temperature: 0.7,
    plan_temperature: None,
    best_of: None,
};

/// How a world model trained with the planning turn draws: each image from
/// a plan sampled at this temperature, the best of this many candidates
/// (the sweep in TRAINING.md).
pub const WORLD_PLAN_TEMPERATURE: f64 = 0.5;
pub const WORLD_BEST_OF: u32 = 16;

/// The sampling settings a world model is saved with: [`WORLD_SAMPLING`],
/// and planning when it learned the planning turn.
pub fn world_sampling(plans: bool) -> SamplingDefaults {
    SamplingDefaults {
        plan_temperature: plans.then_some(WORLD_PLAN_TEMPERATURE),
        best_of: plans.then_some(WORLD_BEST_OF),
        ..WORLD_SAMPLING
    }
}

/// Checkpoint names of the VQ tokenizer's tensors start with this.
pub const VQ_PREFIX: &str = "gen_vision_model.";

/// A model whose every tensor is a trainable variable, with the tokenizer
/// it reads text with.
pub struct PretrainModel {
    pub model: Janus,
    pub tokenizer: Tokenizer,
    /// Every parameter, by checkpoint name.
    pub params: Vec<(String, Var)>,
    /// Tensors a checkpoint holds that the forward never reads.
    unused: HashMap<String, Tensor>,
}

impl PretrainModel {
    /// The world model of `seed`: its tokenizer learned from the world, its
    /// weights drawn from the seed.
    pub fn world(seed: u64) -> Result<Self, PretrainError> {
        let tokenizer = world_tokenizer(seed)?;
        let config = world_config_json(&tokenizer)?;
        Self::new(config, tokenizer, seed)
    }

    /// The architecture of `config`, with weights drawn from `seed`.
    pub fn new(config: Value, tokenizer: Tokenizer, seed: u64) -> Result<Self, PretrainError> {
        let (_, backend) = build_random(config.clone(), seed, DType::F32, &Device::Cpu)?;
        let cfg = JanusConfig::from_value(config)?;
        let drawn = backend.tensors();
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        let trainable = build_trainable(&cfg, vb, |_| true)?;
        let unused = drawn
            .into_iter()
            .filter(|(name, _)| !trainable.params.iter().any(|(n, _)| n == name))
            .collect();
        Ok(Self {
            model: trainable.model,
            tokenizer,
            params: trainable.params,
            unused,
        })
    }

    /// The VQ tokenizer's parameters (stage one), or all the others (stage two).
    pub fn params_of_vq(&self, vq: bool) -> Vec<(String, Var)> {
        self.params
            .iter()
            .filter(|(n, _)| n.starts_with(VQ_PREFIX) == vq)
            .cloned()
            .collect()
    }

    /// Writes the model as a checkpoint directory (config, weights,
    /// tokenizer, processor settings, `sampling` as its
    /// `generation_config.json`) that `--model` loads. The directory
    /// appears complete or not at all.
    pub fn save(&self, dir: &Path, sampling: &SamplingDefaults) -> Result<(), PretrainError> {
        let io = |e: std::io::Error| PretrainError::Invalid(format!("{}: {e}", dir.display()));
        let staging = dir.with_extension("partial");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io)?;
        }
        std::fs::create_dir_all(&staging).map_err(io)?;
        let mut tensors = self.unused.clone();
        for (name, var) in &self.params {
            tensors.insert(name.clone(), var.as_tensor().clone());
        }
        candle_core::safetensors::save(&tensors, staging.join(WEIGHTS_FILE))?;
        write_demo_side_files(&staging, &self.model.cfg)?;
        std::fs::write(
            staging.join(GENERATION_CONFIG_FILE),
            sampling.to_json_string(),
        )
        .map_err(io)?;
        let tokenizer = staging.join(TOKENIZER_FILE);
        self.tokenizer
            .save(&tokenizer, true)
            .map_err(|e| PretrainError::Invalid(format!("{}: {e}", tokenizer.display())))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::rename(&staging, dir).map_err(io)?;
        Ok(())
    }
}
