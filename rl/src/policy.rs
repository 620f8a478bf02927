//! A model whose chosen tensors are trainable `Var`s, the rest frozen.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::RlError;
use ulm_model::bundle::ModelSource;
use ulm_model::weights::read_config;
use ulm_model::Janus;

/// What a [`TrainableBackend`] handed out, shared with whoever built it.
type Handed<T> = Arc<Mutex<Vec<(String, T)>>>;

fn take<T>(handed: &Handed<T>) -> Vec<(String, T)> {
    std::mem::take(&mut *handed.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Serves tensors from another backend, wrapping the chosen ones in `Var`s.
struct TrainableBackend<'a, F: Fn(&str) -> bool + Send + Sync> {
    base: VarBuilder<'a>,
    trainable: F,
    vars: Handed<Var>,
    frozen: Handed<Tensor>,
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
    cfg: &ulm_model::JanusConfig,
    base: VarBuilder,
    trainable: impl Fn(&str) -> bool + Send + Sync,
) -> Result<TrainableModel, RlError> {
    let (dtype, device) = (base.dtype(), base.device().clone());
    let vars: Handed<Var> = Arc::default();
    let frozen: Handed<Tensor> = Arc::default();
    let backend = TrainableBackend {
        base,
        trainable,
        vars: vars.clone(),
        frozen: frozen.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device);
    let model = Janus::new(cfg, vb)?;
    let mut params = take(&vars);
    // The lm_head of a tied model is the embedding table: one parameter.
    params.dedup_by(|a, b| a.0 == b.0);
    let frozen = take(&frozen);
    Ok(TrainableModel {
        model,
        params,
        frozen,
    })
}

/// The model of `source` with the language model trainable (full
/// fine-tuning): a copy apart from any model already loaded from it.
pub fn load_trainable(
    source: &ModelSource,
    cfg: &ulm_model::JanusConfig,
    dtype: DType,
    device: &Device,
) -> Result<TrainableModel, RlError> {
    build_trainable(cfg, source.weights(dtype, device)?, is_language_model)
}

/// [`load_trainable`] from a checkpoint directory, with its own config.
pub fn load_trainable_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<TrainableModel, RlError> {
    let source = ModelSource::Checkpoint(dir.to_path_buf());
    load_trainable(&source, &read_config(dir)?, dtype, device)
}
