//! Opening a checkpoint directory: config, weights (single file or sharded
//! safetensors, any float dtype on disk), tokenizer and processor settings.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::JanusConfig;
use crate::janus::Janus;
use crate::ModelError;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

fn read_to_string(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub fn read_config(dir: &Path) -> Result<JanusConfig, ModelError> {
    JanusConfig::from_json_str(&read_to_string(&dir.join(CONFIG_FILE))?)
}

/// The safetensors files of a checkpoint: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.exists() {
        let text = read_to_string(&index)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                message: format!("{}: invalid JSON: {e}", index.display()),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Weights {
                message: format!("{}: no weight_map object", index.display()),
            })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::Weights {
                message: format!(
                    "{}: weight_map entry for {tensor} is not a file name",
                    index.display()
                ),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(ModelError::Weights {
                    message: format!(
                        "{}: shard name {file:?} leaves the checkpoint directory",
                        index.display()
                    ),
                });
            }
            files.insert(dir.join(file));
        }
        return files
            .into_iter()
            .map(|f| {
                if f.exists() {
                    Ok(f)
                } else {
                    Err(ModelError::Io {
                        path: f,
                        message: "shard listed in the index is missing".into(),
                    })
                }
            })
            .collect();
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let hint = if dir.join("pytorch_model.bin").exists()
        || dir.join("pytorch_model.bin.index.json").exists()
    {
        " (this checkpoint is in PyTorch pickle format: convert it to safetensors first)"
    } else {
        ""
    };
    Err(ModelError::Io {
        path: single,
        message: format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}"),
    })
}

/// The weights of a checkpoint directory, memory-mapped and converted to
/// `dtype` on `device` as they are read.
pub fn checkpoint_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    let files = weight_files(dir)?;
    // Safety: the files are mapped read-only; a checkpoint must not be
    // modified while a server has it open (documented in the README).
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
        ModelError::Weights {
            message: format!("cannot read {}: {e}", files_list(&files)),
        }
    })
}

/// Builds the model from a checkpoint directory.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Janus, ModelError> {
    let cfg = read_config(dir)?;
    let vb = checkpoint_weights(dir, dtype, device)?;
    Janus::new(&cfg, vb).map_err(|e| ModelError::Weights {
        message: format!("{}: {e}", dir.display()),
    })
}

fn files_list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
