//! The model being pretrained: the real architecture at the world's size,
//! every tensor a trainable variable drawn from a seed, saved as an
//! ordinary checkpoint in the original DeepSeek layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use ulm_model::demo::{build_random, demo_config_json, write_demo_side_files};
use ulm_model::weights::WEIGHTS_FILE;
use ulm_model::{Janus, JanusConfig};
use ulm_rl::policy::build_trainable;

use crate::PretrainError;

/// The world model's `config.json`: the demo's sizes, but a VQ made for the
/// world's 64-pixel images (8 x 8 = 64 codes per image, fewer channels at
/// full resolution where a training step spends its time).
pub fn world_config_json() -> Value {
    let mut config = demo_config_json();
    let vq = &mut config["gen_vision_config"]["params"];
    vq["ch"] = json!(16);
    vq["encoder_ch_mult"] = json!([1, 2, 2, 4]);
    vq["decoder_ch_mult"] = json!([1, 2, 2, 4]);
    vq["norm_num_groups"] = json!(8);
    config
}

/// Checkpoint names of the VQ tokenizer's tensors start with this.
pub const VQ_PREFIX: &str = "gen_vision_model.";

/// A model whose every tensor is a trainable variable.
pub struct PretrainModel {
    pub model: Janus,
    /// Every parameter, by checkpoint name.
    pub params: Vec<(String, Var)>,
    /// Tensors a checkpoint holds that the forward never reads.
    unused: HashMap<String, Tensor>,
}

impl PretrainModel {
    /// The architecture of `config`, with weights drawn from `seed`.
    pub fn new(config: Value, seed: u64) -> Result<Self, PretrainError> {
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
    /// tokenizer, processor settings) that `--model` loads. The directory
    /// appears complete or not at all.
    pub fn save(&self, dir: &Path) -> Result<(), PretrainError> {
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
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::rename(&staging, dir).map_err(io)?;
        Ok(())
    }
}
