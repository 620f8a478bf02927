//! Training checkpoints, written atomically (temporary directory, fsync,
//! rename): the adapters (LoRA) or a complete model directory in the
//! original tensor names (full fine-tuning, loadable by the model loader),
//! plus the optimizer moments and step so a run resumes.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::lora::ADAPTER_FILE;
use crate::trainer::{Adaptation, Trainer, TrainerConfig};
use crate::RlError;
use ulm_model::weights::WEIGHTS_FILE;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub optimizer_step: u64,
    /// "lora" or "full".
    pub adaptation: String,
    /// The checkpoint the run started from; absent for the demo model.
    pub base_model: Option<PathBuf>,
    pub config: TrainerConfig,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RlError + '_ {
    move |e| RlError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), RlError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Writes `trainer`'s checkpoint to `dir` (replacing nothing: `dir` must not exist).
pub fn save(
    trainer: &Trainer,
    dir: &Path,
    base_model: Option<&Path>,
    frozen: &[(String, Tensor)],
) -> Result<(), RlError> {
    if dir.exists() {
        return Err(RlError::InvalidData(format!(
            "{} already exists",
            dir.display()
        )));
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("checkpoint"),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let params = trainer.adaptation.params();
    // What was trained, at the precision it was trained in.
    let values = trainer.optimizer.values(params)?;
    let kind = match &trainer.adaptation {
        Adaptation::Lora(lora) => {
            lora.save(&tmp, &values)?;
            "lora"
        }
        Adaptation::Full { params, .. } => {
            let mut tensors: HashMap<String, Tensor> = frozen.iter().cloned().collect();
            tensors.extend(params.iter().map(|(n, _)| n.clone()).zip(values));
            candle_core::safetensors::save(&tensors, tmp.join(WEIGHTS_FILE))?;
            trainer
                .bundle
                .source
                .write_side_files(&tmp, &trainer.bundle.model.cfg)?;
            "full"
        }
    };
    let mut moments = HashMap::new();
    for ((name, _), (m, v)) in params.iter().zip(&trainer.optimizer.moments) {
        moments.insert(format!("m.{name}"), m.clone());
        moments.insert(format!("v.{name}"), v.clone());
    }
    candle_core::safetensors::save(&moments, tmp.join(OPTIMIZER_FILE))?;
    let state = TrainerState {
        step: trainer.step,
        optimizer_step: trainer.optimizer.step,
        adaptation: kind.into(),
        base_model: base_model.map(Path::to_path_buf),
        config: trainer.config.clone(),
    };
    let state_path = tmp.join(STATE_FILE);
    let mut f = std::fs::File::create(&state_path).map_err(io(&state_path))?;
    f.write_all(
        serde_json::to_string_pretty(&state)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(io(&state_path))?;
    fsync_dir(&tmp)?;
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    std::fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io(parent))
}

pub fn read_state(dir: &Path) -> Result<TrainerState, RlError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| RlError::Checkpoint(format!("{STATE_FILE}: {e}")))
}

/// Sets the trainable parameters (and the optimizer's master copies) to
/// the values saved in `dir`, at the precision they were saved in: loading
/// them into a half-precision model rounds them, the master must not be.
pub fn restore_values(trainer: &mut Trainer, dir: &Path, device: &Device) -> Result<(), RlError> {
    let file = match trainer.adaptation {
        Adaptation::Lora(_) => ADAPTER_FILE,
        Adaptation::Full { .. } => WEIGHTS_FILE,
    };
    let saved = candle_core::safetensors::load(dir.join(file), device)?;
    let params = trainer.adaptation.params();
    let values = params
        .iter()
        .map(|(name, _)| {
            saved
                .get(name)
                .cloned()
                .ok_or_else(|| RlError::Checkpoint(format!("{file} has no tensor {name}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    trainer.optimizer.set_values(params, &values)?;
    Ok(())
}

/// Restores the trained values, the optimizer moments and the step counters
/// saved in `dir` into a trainer whose parameters were loaded from it.
pub fn restore_optimizer(
    trainer: &mut Trainer,
    dir: &Path,
    device: &Device,
) -> Result<(), RlError> {
    let state = read_state(dir)?;
    restore_values(trainer, dir, device)?;
    let saved = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), device)?;
    let names: Vec<String> = trainer
        .adaptation
        .params()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    for (name, (m, v)) in names.iter().zip(trainer.optimizer.moments.iter_mut()) {
        let dtype = m.dtype();
        let get = |key: String| {
            saved
                .get(&key)
                .ok_or_else(|| RlError::Checkpoint(format!("{OPTIMIZER_FILE} has no {key}")))?
                // Checkpoints written before the moments were kept in f32
                // hold them in the model's dtype.
                .to_dtype(dtype)
                .map_err(RlError::from)
        };
        *m = get(format!("m.{name}"))?;
        *v = get(format!("v.{name}"))?;
    }
    trainer.optimizer.step = state.optimizer_step;
    trainer.step = state.step;
    Ok(())
}
