//! A model whose chosen tensors are trainable `Var`s, the rest frozen.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::model::demo::BackendRef;
use crate::model::weights::{read_config, weight_files};
use crate::model::{Janus, ModelError};

/// Serves tensors from another backend, wrapping the chosen ones in `Var`s.
struct TrainableBackend<'a, F: Fn(&str) -> bool + Send + Sync> {
    base: VarBuilder<'a>,
    trainable: F,
    vars: Mutex<Vec<(String, Var)>>,
    frozen: Mutex<Vec<(String, Tensor)>>,
}

impl<F: Fn(&str) -> bool + Send + Sync> SimpleBackend for TrainableBackend<'_, F> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .base
            .get_with_hints_dtype(s, name, h, dtype)?
            .to_device(dev)?;
        if !(self.trainable)(name) {
            if let Ok(mut frozen) = self.frozen.lock() {
                frozen.push((name.to_string(), t.clone()));
            }
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        if let Ok(mut vars) = self.vars.lock() {
            vars.push((name.to_string(), var));
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.base.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

/// The model and its trainable parameters by checkpoint name.
pub struct TrainableModel {
    pub model: Janus,
    pub params: Vec<(String, Var)>,
    /// The other tensors the model uses, by checkpoint name (to write a
    /// complete checkpoint after training).
    pub frozen: Vec<(String, Tensor)>,
}

/// True for the language model: the part CoRL trains.
pub fn is_language_model(name: &str) -> bool {
    name.starts_with("language_model.")
}

/// Builds `base` with the tensors selected by `trainable` as `Var`s.
pub fn build_trainable(
    cfg: &crate::model::JanusConfig,
    base: VarBuilder,
    trainable: impl Fn(&str) -> bool + Send + Sync,
) -> Result<TrainableModel, ModelError> {
    let (dtype, device) = (base.dtype(), base.device().clone());
    let backend = TrainableBackend {
        base,
        trainable,
        vars: Mutex::new(Vec::new()),
        frozen: Mutex::new(Vec::new()),
    };
    let model = {
        let vb = VarBuilder::from_backend(Box::new(BackendRef(&backend)), dtype, device);
        Janus::new(cfg, vb)?
    };
    let mut params = backend.vars.into_inner().unwrap_or_default();
    // The lm_head of a tied model is the embedding table: one parameter.
    params.dedup_by(|a, b| a.0 == b.0);
    let frozen = backend.frozen.into_inner().unwrap_or_default();
    Ok(TrainableModel {
        model,
        params,
        frozen,
    })
}

/// Loads a checkpoint with the language model trainable (full fine-tuning).
pub fn load_trainable(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<TrainableModel, ModelError> {
    let cfg = read_config(dir)?;
    let files = weight_files(dir)?;
    // Safety: read-only mapping of checkpoint files that are not modified while open.
    let base =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
            ModelError::Weights {
                message: e.to_string(),
            }
        })?;
    build_trainable(&cfg, base, is_language_model)
}
