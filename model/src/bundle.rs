//! A ready-to-serve model: network, prompt processor and image processor,
//! from a checkpoint directory, the built-in trained world model or the
//! built-in random demo.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::image_processor::ImageProcessorConfig;
use crate::janus::Janus;
use crate::processor::Processor;
use crate::sampling_defaults::{SamplingDefaults, GENERATION_CONFIG_FILE};
use crate::weights::{checkpoint_weights, load_model, CONFIG_FILE};
use crate::ModelError;
use crate::{builtin, demo};

/// Files of a checkpoint directory that describe the model besides its
/// weights: written next to new weights so the directory loads on its own.
const SIDE_FILES: [&str; 7] = [
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The built-in random demo model with this seed.
    Demo {
        seed: u64,
    },
    /// The built-in model pretrained on the synthetic world.
    World,
    Checkpoint(PathBuf),
}

/// Which model to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    Checkpoint(PathBuf),
    /// The built-in trained world model: the default.
    World,
    /// The built-in random demo model: instant, for tests.
    Demo,
}

impl ModelChoice {
    /// As the commands' `--model` and `--demo` name it.
    pub fn from_args(model: Option<&Path>, demo: bool) -> Result<Self, ModelError> {
        match (model, demo) {
            (Some(_), true) => Err(ModelError::InvalidInput(
                "--model and --demo name two models: give one".into(),
            )),
            (Some(dir), false) => Ok(Self::Checkpoint(dir.to_path_buf())),
            (None, true) => Ok(Self::Demo),
            (None, false) => Ok(Self::World),
        }
    }
}

#[derive(Clone)]
pub struct ModelBundle {
    pub model: Janus,
    pub processor: Processor,
    pub image_processor: ImageProcessorConfig,
    /// What requests that do not say are sampled with.
    pub sampling: SamplingDefaults,
    pub source: ModelSource,
}

impl ModelBundle {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let model = load_model(dir, dtype, device)?;
        let processor = Processor::from_dir(dir, model.cfg.vision.num_patches())?;
        let image_processor = ImageProcessorConfig::from_dir(dir, model.cfg.vision.image_size)?;
        Ok(Self {
            model,
            processor,
            image_processor,
            sampling: SamplingDefaults::from_dir(dir)?,
            source: ModelSource::Checkpoint(dir.to_path_buf()),
        })
    }

    pub fn demo(seed: u64, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let (model, _) = demo::build_demo(seed, dtype, device)?;
        let processor = Processor::new(
            demo::demo_tokenizer()?,
            true,
            model.cfg.vision.num_patches(),
        )?;
        let image_processor = ImageProcessorConfig::janus_default(model.cfg.vision.image_size);
        Ok(Self {
            model,
            processor,
            image_processor,
            sampling: SamplingDefaults::default(),
            source: ModelSource::Demo { seed },
        })
    }

    /// The built-in model trained on the synthetic world.
    pub fn world(dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let cfg = builtin::config()?;
        let model = Janus::new(&cfg, builtin::weights(dtype, device)?).map_err(|e| {
            ModelError::Weights {
                message: format!("the built-in world model: {e}"),
            }
        })?;
        let processor = Processor::new(builtin::tokenizer()?, true, cfg.vision.num_patches())?;
        let image_processor = ImageProcessorConfig::janus_default(cfg.vision.image_size);
        Ok(Self {
            model,
            processor,
            image_processor,
            sampling: builtin::sampling()?,
            source: ModelSource::World,
        })
    }

    pub fn is_demo(&self) -> bool {
        matches!(self.source, ModelSource::Demo { .. })
    }
}

/// `cpu`, `cuda` or `cuda:N`. CUDA needs the `cuda` cargo feature.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let invalid =
        || ModelError::InvalidInput(format!("unknown device {spec:?} (cpu, cuda, cuda:N)"));
    match spec {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(invalid)?,
                None => return Err(invalid()),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(ModelError::InvalidInput(
                    "CUDA is not available: build with `--features cuda` on a machine with an NVIDIA GPU".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(ModelError::from)
        }
    }
}

fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType, ModelError> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(ModelError::InvalidInput(format!(
            "unknown dtype {spec:?} (f32, bf16, f16)"
        ))),
    }
}

impl ModelBundle {
    /// Opens a model as a user names it: a choice of model, a device
    /// (`cpu`, `cuda`, `cuda:N`) and a dtype (`f32`, `bf16`, `f16`). The one
    /// place those names are read.
    pub fn open_named(choice: &ModelChoice, device: &str, dtype: &str) -> Result<Self, ModelError> {
        Self::open(choice, parse_dtype(dtype)?, &parse_device(device)?)
    }

    /// The chosen model, checked with one tiny forward: a dtype the device
    /// cannot compute is an error here.
    pub fn open(choice: &ModelChoice, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let bundle = match choice {
            ModelChoice::Checkpoint(dir) => Self::load(dir, dtype, device)?,
            ModelChoice::World => Self::world(dtype, device)?,
            ModelChoice::Demo => Self::demo(demo::DEFAULT_SEED, dtype, device)?,
        };
        bundle.model.check_runs().map_err(|e| {
            let hint = if device.is_cpu() && dtype == DType::BF16 {
                " (candle's CPU backend has no bf16 matmul: use --dtype f32 or f16 on the CPU, bf16 on a GPU)"
            } else {
                ""
            };
            ModelError::Unsupported(format!(
                "the model cannot run in {} on {}{hint}: {e}",
                dtype.as_str(),
                device_name(device)
            ))
        })?;
        Ok(bundle)
    }

    /// A short human description for logs and `/v1/models`.
    pub fn describe(&self) -> String {
        match &self.source {
            ModelSource::Demo { seed } => format!(
                "built-in demo model (seed {seed}): random weights, its images are noise and its answers nonsense"
            ),
            ModelSource::World => {
                "built-in world model: pretrained on the synthetic world of coloured shapes (TRAINING.md)".into()
            }
            ModelSource::Checkpoint(dir) => format!("checkpoint {}", dir.display()),
        }
    }
}

impl ModelSource {
    /// The source's weights, read lazily in `dtype` on `device`: the
    /// checkpoint files, or the demo's seeded draw.
    pub fn weights(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        match self {
            ModelSource::Checkpoint(dir) => checkpoint_weights(dir, dtype, device),
            ModelSource::World => builtin::weights(dtype, device),
            ModelSource::Demo { seed } => Ok(VarBuilder::from_backend(
                Box::new(demo::SeededBackend::new(*seed)),
                dtype,
                device.clone(),
            )),
        }
    }

    /// Writes the source's config, tokenizer and processor files into `dir`,
    /// so new weights written there form a loadable checkpoint.
    pub fn write_side_files(&self, dir: &Path, cfg: &crate::JanusConfig) -> Result<(), ModelError> {
        match self {
            ModelSource::Checkpoint(base) => {
                for file in SIDE_FILES {
                    let from = base.join(file);
                    if from.exists() {
                        std::fs::copy(&from, dir.join(file)).map_err(|e| ModelError::Io {
                            path: from.clone(),
                            message: e.to_string(),
                        })?;
                    }
                }
                Ok(())
            }
            ModelSource::World => builtin::write_side_files(dir),
            ModelSource::Demo { .. } => demo::write_demo_side_files(dir, cfg),
        }
    }
}
