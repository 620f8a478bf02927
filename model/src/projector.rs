//! `MlpProjector` (aligner, gen_aligner) and the generation head.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{GenHeadConfig, ProjectorConfig};
use crate::nn::{linear, Linear};
use crate::ops::gelu_erf;

/// `layers.0` Linear, then for each further depth level GELU + Linear at
/// `layers.2`, `layers.4`, ... (odd indices are the parameter-free GELUs).
#[derive(Debug, Clone)]
pub struct MlpProjector {
    layers: Vec<Linear>,
}

impl MlpProjector {
    pub fn new(cfg: &ProjectorConfig, vb: VarBuilder) -> Result<Self> {
        let layers = match cfg.projector_type.as_str() {
            "identity" => Vec::new(),
            "linear" => vec![linear(vb.pp("layers"), cfg.input_dim, cfg.n_embed, true)?],
            _ => (0..cfg.depth)
                .map(|i| {
                    let in_dim = if i == 0 { cfg.input_dim } else { cfg.n_embed };
                    linear(
                        vb.pp(format!("layers.{}", 2 * i)),
                        in_dim,
                        cfg.n_embed,
                        true,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = gelu_erf(&x)?;
            }
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}

/// `gen_head`: `output_mlp_projector`, exact GELU, `vision_head`.
#[derive(Debug, Clone)]
pub struct GenHead {
    output_mlp_projector: Linear,
    vision_head: Linear,
}

impl GenHead {
    pub fn new(cfg: &GenHeadConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            output_mlp_projector: linear(
                vb.pp("output_mlp_projector"),
                cfg.n_embed,
                cfg.image_token_embed,
                true,
            )?,
            vision_head: linear(
                vb.pp("vision_head"),
                cfg.image_token_embed,
                cfg.image_token_size,
                true,
            )?,
        })
    }

    /// Codebook logits `[..., K]` of LM hidden states `[..., H]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        self.vision_head
            .forward(&gelu_erf(&self.output_mlp_projector.forward(hidden)?)?)
    }
}
