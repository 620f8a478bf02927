//! LoRA adapters on the language model's projections: attach, switch off
//! (the reference policy), save and load (safetensors plus a JSON config).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::RlError;
use ulm_model::nn::LoraAdapter;
use ulm_model::Janus;

pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names to adapt: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        }
    }
}

/// The adapters of one model: their parameters by name and the switch.
pub struct Lora {
    pub config: LoraConfig,
    /// `<module>.lora_A.weight` and `<module>.lora_B.weight` parameters.
    pub params: Vec<(String, Var)>,
    enabled: Arc<AtomicBool>,
    recording: Arc<AtomicBool>,
}

impl Lora {
    /// Adapters on (the policy) or off (the base model, the reference policy).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether forwards through the adapters record a gradient graph: off
    /// while sampling rollouts, whose KV caches would otherwise keep every
    /// decode step's graph alive until the rollout ends. Returns the
    /// previous setting.
    pub fn set_recording(&self, on: bool) -> bool {
        self.recording.swap(on, Ordering::Relaxed)
    }

    /// Writes the adapters, with `values` (one per parameter, as trained:
    /// the optimizer's master copies), and their config into `dir`.
    pub fn save(&self, dir: &Path, values: &[Tensor]) -> Result<(), RlError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .zip(values)
            .map(|((n, _), v)| (n.clone(), v.clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(ADAPTER_FILE))?;
        let json = serde_json::to_string_pretty(&self.config).unwrap_or_default();
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), json).map_err(|e| io_err(dir, e))
    }
}

fn io_err(path: &Path, e: std::io::Error) -> RlError {
    RlError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn uniform(rng: &mut StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// Attaches fresh adapters (A uniform in ±1/sqrt(in), B zero, so the model
/// is unchanged until trained) to the targeted projections.
pub fn attach(model: &mut Janus, config: &LoraConfig, seed: u64) -> Result<Lora, RlError> {
    if config.rank == 0 {
        return Err(RlError::InvalidData("LoRA rank must be at least 1".into()));
    }
    let enabled = Arc::new(AtomicBool::new(true));
    let recording = Arc::new(AtomicBool::new(true));
    let (device, dtype) = (model.device().clone(), model.dtype());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut params = Vec::new();
    let mut matched = 0;
    for (name, linear) in model.language_model.projections_mut() {
        let module = name.rsplit('.').next().unwrap_or_default();
        if !config.target_modules.iter().any(|t| t == module) {
            continue;
        }
        matched += 1;
        let (out_dim, in_dim) = linear.dims();
        let r = config.rank;
        let a = Var::from_vec(
            uniform(&mut rng, r * in_dim, 1.0 / (in_dim as f32).sqrt()),
            (r, in_dim),
            &device,
        )?;
        let b = Var::zeros((out_dim, r), DType::F32, &device)?;
        let (a, b) = (to_dtype_var(a, dtype)?, to_dtype_var(b, dtype)?);
        linear.lora = Some(LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: config.alpha / r as f64,
            enabled: enabled.clone(),
            recording: recording.clone(),
        });
        params.push((format!("{name}.lora_A.weight"), a));
        params.push((format!("{name}.lora_B.weight"), b));
    }
    if matched == 0 {
        return Err(RlError::InvalidData(format!(
            "no projection matches target_modules {:?}",
            config.target_modules
        )));
    }
    Ok(Lora {
        config: config.clone(),
        params,
        enabled,
        recording,
    })
}

fn to_dtype_var(v: Var, dtype: DType) -> candle_core::Result<Var> {
    if v.dtype() == dtype {
        Ok(v)
    } else {
        Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)
    }
}

/// Attaches adapters saved by [`Lora::save`].
pub fn load(model: &mut Janus, dir: &Path, device: &Device) -> Result<Lora, RlError> {
    let text =
        std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).map_err(|e| io_err(dir, e))?;
    let config: LoraConfig = serde_json::from_str(&text)
        .map_err(|e| RlError::Checkpoint(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
    let saved = candle_core::safetensors::load(dir.join(ADAPTER_FILE), device)?;
    let lora = attach(model, &config, 0)?;
    for (name, var) in &lora.params {
        let t = saved
            .get(name)
            .ok_or_else(|| RlError::Checkpoint(format!("{ADAPTER_FILE} has no tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(RlError::Checkpoint(format!(
                "{name}: shape {:?}, expected {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(lora)
}

/// Attaches adapters saved by [`Lora::save`] as plain tensors, for serving:
/// no `Var`s, so the inference forward records no gradient graph.
pub fn load_for_inference(model: &mut Janus, dir: &Path, device: &Device) -> Result<(), RlError> {
    load(model, dir, device)?;
    for (_, linear) in model.language_model.projections_mut() {
        if let Some(adapter) = linear.lora.as_mut() {
            adapter.a = adapter.a.detach();
            adapter.b = adapter.b.detach();
        }
    }
    Ok(())
}
