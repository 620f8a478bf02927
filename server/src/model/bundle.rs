//! A ready-to-serve model: network, prompt processor and image processor,
//! from a checkpoint directory or the built-in demo.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::demo;
use super::image_processor::ImageProcessorConfig;
use super::janus::Janus;
use super::processor::Processor;
use super::weights::load_model;
use super::ModelError;

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The built-in random demo model with this seed.
    Demo {
        seed: u64,
    },
    Checkpoint(PathBuf),
}

pub struct ModelBundle {
    pub model: Janus,
    pub processor: Processor,
    pub image_processor: ImageProcessorConfig,
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
            source: ModelSource::Demo { seed },
        })
    }

    pub fn is_demo(&self) -> bool {
        matches!(self.source, ModelSource::Demo { .. })
    }
}
