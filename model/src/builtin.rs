//! The trained world model, built into the binary: the checkpoint in
//! `models/world/` (the `pretrain` recipe's output, see TRAINING.md), so
//! that `serve` without `--model` answers and draws something real.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::processor::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::sampling_defaults::{SamplingDefaults, GENERATION_CONFIG_FILE};
use crate::weights::CONFIG_FILE;
use crate::{JanusConfig, ModelError};

const CONFIG: &str = include_str!("../../models/world/config.json");
const TOKENIZER: &str = include_str!("../../models/world/tokenizer.json");
const WEIGHTS: &[u8] = include_bytes!("../../models/world/model.safetensors");
const GENERATION_CONFIG: &str = include_str!("../../models/world/generation_config.json");

/// Every file of the checkpoint but its weights, by name.
const SIDE_FILES: [(&str, &str); 6] = [
    (CONFIG_FILE, CONFIG),
    (GENERATION_CONFIG_FILE, GENERATION_CONFIG),
    (TOKENIZER_FILE, TOKENIZER),
    (
        TOKENIZER_CONFIG_FILE,
        include_str!("../../models/world/tokenizer_config.json"),
    ),
    (
        crate::image_processor::PREPROCESSOR_FILE,
        include_str!("../../models/world/preprocessor_config.json"),
    ),
    (
        "processor_config.json",
        include_str!("../../models/world/processor_config.json"),
    ),
];

pub fn config() -> Result<JanusConfig, ModelError> {
    JanusConfig::from_json_str(CONFIG)
}

/// The sampling settings the world model draws best with (TRAINING.md).
pub fn sampling() -> Result<SamplingDefaults, ModelError> {
    SamplingDefaults::from_json_str(
        GENERATION_CONFIG,
        "the built-in world model's generation_config.json",
    )
}

pub fn tokenizer() -> Result<Tokenizer, ModelError> {
    Tokenizer::from_bytes(TOKENIZER).map_err(|e| ModelError::Tokenizer(e.to_string()))
}

/// The weights, converted to `dtype` on `device`.
pub fn weights(dtype: DType, device: &Device) -> Result<VarBuilder<'static>, ModelError> {
    VarBuilder::from_buffered_safetensors(WEIGHTS.to_vec(), dtype, device).map_err(|e| {
        ModelError::Weights {
            message: format!("the built-in world model: {e}"),
        }
    })
}

/// Writes the checkpoint's config, tokenizer and processor files into `dir`.
pub fn write_side_files(dir: &Path) -> Result<(), ModelError> {
    for (name, text) in SIDE_FILES {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| ModelError::Io {
            path,
            message: e.to_string(),
        })?;
    }
    Ok(())
}
